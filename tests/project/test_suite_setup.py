"""The suite's own set-up (conftest.py at the repository's root)."""
import importlib.util
import os
import pathlib

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "root_conftest", pathlib.Path(__file__).resolve().parents[2] / "conftest.py")
_ROOT_CONFTEST = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_ROOT_CONFTEST)
threads_per_worker = _ROOT_CONFTEST.threads_per_worker


def test_threads_are_the_cores_shared_out_among_the_workers():
    assert threads_per_worker(2, 2) == 1
    assert threads_per_worker(16, 2) == 8
    assert threads_per_worker(2, 3) == 1  # never none
    assert threads_per_worker(4, 0) == 4


@pytest.mark.skipif("PYTEST_XDIST_WORKER_COUNT" not in os.environ, reason="not an xdist worker")
def test_an_xdist_worker_and_the_commands_it_starts_use_its_share_of_the_cores():
    # OMP_NUM_THREADS: conftest's share, or the caller's own choice, which it keeps
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
