"""Fixtures shared by the kernel tests."""
import pytest


@pytest.fixture
def plannings(monkeypatch):
    """{kernel name: times a config was chosen for it} (launch_first_that_runs calls): a pass
    that runs its kept launches adds nothing."""
    from stm_kernels.backends.triton import launch
    counts = {}
    real = launch.launch_first_that_runs

    def counted(kernel, call, signature, run):
        counts[kernel] = counts.get(kernel, 0) + 1
        return real(kernel, call, signature, run)

    monkeypatch.setattr(launch, "launch_first_that_runs", counted)
    return counts
