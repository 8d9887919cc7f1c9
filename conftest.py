"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before stm_kernels is
imported, so it is set here. Tests marked `gpu` need CUDA and are skipped without it
(`pytest -m gpu` on the device machine runs them).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
