"""`memory_read`: STM's space-time memory read as one differentiable op.

What happens to an input, in order:
    1. `_flatten_checked` validates the three tensors (shapes, dtypes, devices; errors name the
       argument and the expected shape) and views them as q (Bq, Ck, HW), k (B, Ck, N),
       v (B, Cv, N) without copying (spatial dims are merged as views where the strides allow,
       e.g. any slice of a preallocated memory bank along T; otherwise that tensor is copied).
    2. `_resolve_backend` picks the implementation.
    3. "naive" runs the official materialising read with PyTorch autograd; "triton" and "torch"
       go through the custom op `stm_kernels::memory_read`, whose autograd calls the custom op
       `stm_kernels::memory_read_backward` (both have fake implementations, so torch.compile
       traces them without graph breaks).

Precision: all backends accumulate in float32 (float64 for float64 inputs). For float32
inputs on a GPU the Triton kernels follow `torch.set_float32_matmul_precision`: "highest" (the
PyTorch default) gives exact float32 products, "high"/"medium" allow TF32 tensor cores (about
1e-3 relative error, several times faster).
"""
import math
from typing import Optional

import torch

from .memory_read_naive import naive_memory_read
from .memory_read_torch import torch_backward, torch_forward

try:
    from . import memory_read_triton as _triton
except ImportError:  # a CPU-only PyTorch without Triton: the torch and naive backends remain
    _triton = None

BACKENDS = ("auto", "triton", "torch", "naive")
SIMILARITIES = ("dot", "l2")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def memory_read(query_key, memory_key, memory_value, *, scale=None, similarity="dot",
                backend="auto", return_lse=False):
    """Space-time memory read: softmax attention of every query position over all memory positions.

    For each object b and query position i::

        out[b, :, i] = sum_j softmax_j(s_ij) * memory_value[b, :, j]
        s_ij = scale * q_i.k_j                    (similarity="dot", STM)
        s_ij = scale * (2 q_i.k_j - |k_j|^2)      (similarity="l2", STCN; -|q_i|^2 cancels)

    computed in tiles: the (N x HW) affinity is never materialised (except by backend="naive").

    Args:
        query_key: (B or 1, Ck, HW) or (B or 1, Ck, H, W). Batch 1, or a stride-0 `expand`, is
            shared by all B objects without copies.
        memory_key: (B, Ck, N) or (B, Ck, T, H', W'); B = objects, N = T*H'*W' positions.
        memory_value: (B, Cv, *M) with the same memory layout *M as memory_key.
        scale: score scale; defaults to 1/sqrt(Ck) (official STM).
        similarity: "dot" or "l2".
        backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (chunked online softmax, bounded memory), "naive" (official materialising read) or
            "auto" (triton on CUDA for fp16/bf16/fp32, torch otherwise).
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        out (B, Cv, *Q) in memory_value's dtype; with return_lse=True also lse (B, *Q), the
        natural log of sum_j exp(s_ij), in float32 (float64 for float64 inputs). query_key is
        cast to the memory's dtype. Gradients flow to all three inputs (and through lse).
    """
    q, k, v, query_spatial = _flatten_checked(query_key, memory_key, memory_value)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python number or None; got {scale!r}")
    backend = _resolve_backend(backend, k)
    l2 = similarity == "l2"
    if backend == "naive":
        out, lse = naive_memory_read(q, k, v, float(scale), l2, need_lse=return_lse)
    else:
        out, lse = torch.ops.stm_kernels.memory_read(q, k, v, float(scale), l2, backend)
    out = out.unflatten(2, query_spatial)
    if return_lse:
        return out, lse.unflatten(1, query_spatial)
    return out


def _flatten_checked(query_key, memory_key, memory_value):
    for name, tensor in (("query_key", query_key), ("memory_key", memory_key),
                         ("memory_value", memory_value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                f"float64); got {tensor.dtype}")
    if query_key.dim() not in (3, 4):
        raise ValueError(
            "query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W); got shape "
            f"{tuple(query_key.shape)}")
    if memory_key.dim() not in (3, 5):
        raise ValueError(
            "memory_key must have shape (B, Ck, N) or (B, Ck, T, H, W); got shape "
            f"{tuple(memory_key.shape)}")
    B, Ck = memory_key.shape[:2]
    memory_spatial = memory_key.shape[2:]
    if memory_value.dim() != memory_key.dim() or memory_value.shape[0] != B or \
            memory_value.shape[2:] != memory_spatial:
        layout = "(B, Cv, N)" if memory_key.dim() == 3 else "(B, Cv, T, H, W)"
        raise ValueError(
            f"memory_value must have shape {layout} = (B={B}, Cv, "
            f"{', '.join(map(str, memory_spatial))}) to match memory_key "
            f"{tuple(memory_key.shape)}; got shape {tuple(memory_value.shape)}")
    if query_key.shape[0] not in (1, B) or query_key.shape[1] != Ck:
        raise ValueError(
            f"query_key must have shape (B={B} or 1, Ck={Ck}, ...) to match memory_key "
            f"{tuple(memory_key.shape)}; got shape {tuple(query_key.shape)}")
    for name, tensor in (("query_key", query_key), ("memory_key", memory_key),
                         ("memory_value", memory_value)):
        if tensor.numel() == 0:
            raise ValueError(
                f"{name} is empty (shape {tuple(tensor.shape)}); every dimension, including "
                "the number of memory positions N, must be at least 1")
    if not query_key.device == memory_key.device == memory_value.device:
        raise ValueError(
            "query_key, memory_key and memory_value must be on one device; got "
            f"{query_key.device}, {memory_key.device} and {memory_value.device}")
    if memory_key.dtype != memory_value.dtype:
        raise TypeError(
            "memory_key and memory_value must share one dtype; got "
            f"{memory_key.dtype} and {memory_value.dtype}")
    q = query_key.to(memory_key.dtype).flatten(2)
    return q, memory_key.flatten(2), memory_value.flatten(2), query_key.shape[2:]


def _resolve_backend(backend, memory_key):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        fused = (_triton is not None and memory_key.is_cuda
                 and memory_key.dtype in _TRITON_DTYPES)
        return "triton" if fused else "torch"
    if backend == "triton":
        if _triton is None:
            raise ValueError("backend='triton' needs the triton package; use backend='torch'")
        if memory_key.dtype not in _TRITON_DTYPES:
            raise TypeError(
                "backend='triton' supports float16, bfloat16 and float32; got "
                f"{memory_key.dtype} (use backend='torch')")
    return backend


# --------------------------------------------------------------------------- custom ops


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("stm_kernels::memory_read", mutates_args=())
def _memory_read_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, l2: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    forward = _triton.triton_forward if backend == "triton" else torch_forward
    return forward(q, k, v, scale, l2)


@_memory_read_op.register_fake
def _(q, k, v, scale, l2, backend):
    B, Cv, HW = k.shape[0], v.shape[1], q.shape[2]
    return v.new_empty((B, Cv, HW)), v.new_empty((B, HW), dtype=_lse_dtype(v.dtype))


@torch.library.custom_op("stm_kernels::memory_read_backward", mutates_args=())
def _memory_read_backward_op(
        grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, l2: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = _triton.triton_backward if backend == "triton" else torch_backward
    return backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2)


@_memory_read_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, scale, l2, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, l2, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = (scale, l2, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.stm_kernels.memory_read_backward(
        grad_out, grad_lse, q, k, v, out, lse, *ctx.options)
    return dq, dk, dv, None, None, None


_memory_read_op.register_autograd(_backward, setup_context=_setup_context)
