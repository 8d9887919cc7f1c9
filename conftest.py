"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before stm_kernels is
imported, so it is set here. Tests marked `gpu` need CUDA and are skipped without it
(`pytest -m gpu` on the device machine runs them). Under pytest-xdist each worker gets its
share of the cores for torch's threads.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def threads_per_worker(cores, workers):
    """Torch's threads in each of pytest-xdist's worker processes: the cores shared out, at
    least one. Two workers on two cores each running two OpenMP threads (torch's default, one
    per core) fight over the cores and spin while they wait for each other."""
    return max(1, cores // max(1, workers))


# xdist sets the count before it loads this file; a thread count the caller chose stays
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _threads = threads_per_worker(os.cpu_count() or 1, int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the commands the tests start too


def pytest_configure(config):
    # A read that falls back from the Triton kernels to torch without a test expecting it is a
    # failure: the fallback would otherwise hide a broken kernel behind a correct result. Added
    # here, not in pytest.ini: resolving the category imports stm_kernels, which must happen
    # after TRITON_INTERPRET is set above.
    config.addinivalue_line("filterwarnings", "error::stm_kernels.FallbackWarning")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
