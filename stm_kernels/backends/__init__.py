"""The read's implementations, each in one place, behind one interface.

    naive    naive.py     the official read (materialises the affinity): the reference
    torch    pytorch.py   chunked online softmax in PyTorch: any device, bounded memory
    triton   triton/      the fused Triton kernels (CUDA and ROCm GPUs, or the CPU
                          interpreter), falling back to "torch" where a kernel cannot run

Each module provides forward(q, k, v, scale, l2, lengths) -> (out, lse), backward(...) ->
(dq, dk, dv), select(q, k, top_k, scale, l2, lengths) -> (scores, indices) and usage(q, k,
lse, scale, l2, lengths) -> (B, N), on the flattened layout q (Bq, Ck, HW), k (B, Ck, N),
v (B, Cv, N) (naive: `naive_memory_read` with PyTorch's autograd instead of forward and
backward). The opt-in warp-specialised Gluon forward lives outside this default path, in
stm_kernels/experimental.
"""
import warnings
from types import ModuleType
from typing import Optional

import torch

from ..options import BACKENDS
from . import naive, pytorch


class FallbackWarning(RuntimeWarning):
    """The Triton kernels could not run a read here (no Triton, a device they do not support,
    or a kernel that failed to compile or launch); the torch backend computed it instead."""


triton: Optional[ModuleType]
try:
    from . import triton
except ImportError:  # a PyTorch without Triton: the torch and naive backends remain
    triton = None

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_TOP_K = 64


def implementation(name):
    """The module of a resolved backend name ("naive", "torch" or "triton")."""
    return {"naive": naive, "torch": pytorch, "triton": triton}[name]


def resolve(backend, memory_key):
    """The backend that runs: "auto" resolved for memory_key's device and dtype; ValueError or
    TypeError for a backend that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        fused = (triton is not None and memory_key.is_cuda and memory_key.dtype in TRITON_DTYPES
                 and not triton.launch.exact_float32_on_torch(memory_key))
        return "triton" if fused else "torch"
    if backend == "triton":
        if triton is None:
            warnings.warn("stm_kernels: backend='triton' needs the triton package, which is not "
                          "installed; the torch backend reads instead (same result, slower).",
                          FallbackWarning, stacklevel=4)
            return "torch"
        if memory_key.dtype not in TRITON_DTYPES:
            raise TypeError(
                "backend='triton' supports float16, bfloat16 and float32; got "
                f"{memory_key.dtype} (use backend='torch')")
        triton.calls._check_device(memory_key)  # CUDA, or the interpreter
    return backend
