"""Allocation of the op's output and scratch buffers, and the device their kernels launch on.

Every buffer a backend writes is allocated here so that tests can poison them with NaN
(`poison_outputs(True)`): an element that a kernel forgets to write then shows up as NaN
instead of as stale memory that happens to look right.
"""
import contextlib

import torch

_poison = False


def new_buffer(shape, dtype, device, strides=None):
    """An uninitialised tensor (NaN-filled while poisoning is on, for float dtypes); with
    strides, of those strides (one allocation, no view made of a larger one)."""
    buffer = torch.empty(shape, dtype=dtype, device=device) if strides is None else \
        torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if _poison and buffer.is_floating_point():
        buffer.fill_(float("nan"))
    return buffer


@contextlib.contextmanager
def poison_outputs(enabled=True):
    """Fill every output/scratch buffer with NaN before a backend writes it (for tests)."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def device_context(device):
    """The CUDA device a launch must run on (kernels launch on the current device, which need
    not be the tensors'); a no-op elsewhere (the CPU interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
