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
                backend="auto", return_lse=False, memory_lengths=None):
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
            Or a list of such chunks (e.g. one per memory frame), read as their concatenation
            along N: autograd then saves the chunks themselves, not a concatenated copy, so a
            training loop that reads a growing list of memory frames keeps O(T) memory.
        memory_value: (B, Cv, *M) with the same memory layout *M as memory_key (chunk for
            chunk when memory_key is a list).
        scale: score scale; defaults to 1/sqrt(Ck) (official STM).
        similarity: "dot" or "l2".
        backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (chunked online softmax, bounded memory), "naive" (official materialising read) or
            "auto" (triton on CUDA for fp16/bf16/fp32, torch otherwise).
        return_lse: also return the log-sum-exp of the scores.
        memory_lengths: optional (B,) integer tensor (or sequence of ints): object b reads only
            its first memory_lengths[b] memory positions, 1 <= length <= N (positions counted
            over the flattened N = T*H'*W', chunks concatenated), as in FlashAttention's varlen.
            The rest of the padded memory (e.g. a memory bank's unused capacity) is never
            read, may hold anything, and gets zero gradient. Checking the values costs one
            device synchronisation (skipped while torch.compile traces).

    Returns:
        out (B, Cv, *Q) in memory_value's dtype; with return_lse=True also lse (B, *Q), the
        natural log of sum_j exp(s_ij), in float32 (float64 for float64 inputs). query_key is
        cast to the memory's dtype. Gradients flow to all three inputs (and through lse), to
        each chunk of a chunked memory.
    """
    q, keys, values, query_spatial = _flatten_checked(query_key, memory_key, memory_value)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python number or None; got {scale!r}")
    backend = _resolve_backend(backend, keys[0])
    lengths = _checked_lengths(memory_lengths, keys)
    l2 = similarity == "l2"
    if backend == "naive":
        out, lse = naive_memory_read(q, _concatenated(keys), _concatenated(values), float(scale),
                                     l2, need_lse=return_lse, lengths=lengths)
    else:
        out, lse = torch.ops.stm_kernels.memory_read(q, keys, values, float(scale), l2, backend,
                                                     lengths)
    out = out.unflatten(2, query_spatial)
    if return_lse:
        return out, lse.unflatten(1, query_spatial)
    return out


def _as_chunks(name, memory):
    if isinstance(memory, torch.Tensor):
        return [(name, memory)]
    if not isinstance(memory, (list, tuple)) or not memory:
        raise TypeError(f"{name} must be a torch.Tensor or a non-empty list of tensors "
                        f"(memory chunks); got {type(memory).__name__}")
    return [(f"{name}[{index}]", chunk) for index, chunk in enumerate(memory)]


def _check_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64); got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(tensor.shape)}); every dimension, including "
            "the number of memory positions N, must be at least 1")


def _flatten_checked(query_key, memory_key, memory_value):
    """Validate; return q (Bq, Ck, HW), key chunks [(B, Ck, N_i)], value chunks [(B, Cv, N_i)]
    (views where the strides allow) and the query's spatial shape."""
    _check_tensor("query_key", query_key)
    keys, values = _as_chunks("memory_key", memory_key), _as_chunks("memory_value", memory_value)
    if len(keys) != len(values):
        raise ValueError(f"memory_key and memory_value must hold as many chunks; got "
                         f"{len(keys)} and {len(values)}")
    if query_key.dim() not in (3, 4):
        raise ValueError(
            "query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W); got shape "
            f"{tuple(query_key.shape)}")
    first_key_name, first_key = keys[0]
    _check_tensor(first_key_name, first_key)
    B, Ck = first_key.shape[:2]
    Cv = None
    for (key_name, key), (value_name, value) in zip(keys, values):
        _check_tensor(key_name, key)
        _check_tensor(value_name, value)
        if key.dim() not in (3, 5) or key.shape[:2] != (B, Ck):
            raise ValueError(
                f"{key_name} must have shape (B, Ck, N) or (B, Ck, T, H, W) with B={B}, "
                f"Ck={Ck}; got shape {tuple(key.shape)}")
        Cv = value.shape[1] if Cv is None else Cv
        if value.dim() != key.dim() or value.shape[0] != B or value.shape[1] != Cv or \
                value.shape[2:] != key.shape[2:]:
            layout = "(B, Cv, N)" if key.dim() == 3 else "(B, Cv, T, H, W)"
            raise ValueError(
                f"{value_name} must have shape {layout} = (B={B}, Cv, "
                f"{', '.join(map(str, key.shape[2:]))}) to match {key_name} "
                f"{tuple(key.shape)}; got shape {tuple(value.shape)}")
        if not query_key.device == key.device == value.device:
            raise ValueError(
                f"query_key, {key_name} and {value_name} must be on one device; got "
                f"{query_key.device}, {key.device} and {value.device}")
        if key.dtype != first_key.dtype or value.dtype != first_key.dtype:
            raise TypeError(
                f"memory_key and memory_value must share one dtype; got {key.dtype} "
                f"({key_name}) and {value.dtype} ({value_name})")
    if query_key.shape[0] not in (1, B) or query_key.shape[1] != Ck:
        raise ValueError(
            f"query_key must have shape (B={B} or 1, Ck={Ck}, ...) to match memory_key "
            f"{tuple(first_key.shape)}; got shape {tuple(query_key.shape)}")
    q = query_key.to(first_key.dtype).flatten(2)
    return (q, [key.flatten(2) for _, key in keys], [value.flatten(2) for _, value in values],
            query_key.shape[2:])


def _checked_lengths(memory_lengths, keys):
    """memory_lengths as a (B,) int64 tensor on the memory's device, or None; ValueError when
    it is not (B,) integers in [1, N]."""
    if memory_lengths is None:
        return None
    B, device = keys[0].shape[0], keys[0].device
    N = sum(key.shape[2] for key in keys)
    expected = f"a (B={B},) integer tensor on {device} with values in [1, N={N}]"
    if not isinstance(memory_lengths, torch.Tensor):
        try:
            memory_lengths = torch.as_tensor(memory_lengths, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"memory_lengths must be {expected}; got {memory_lengths!r}") \
                from error
    if memory_lengths.is_floating_point() or memory_lengths.is_complex() or \
            memory_lengths.dtype == torch.bool:
        raise ValueError(f"memory_lengths must be {expected}; got dtype {memory_lengths.dtype}")
    if tuple(memory_lengths.shape) != (B,):
        raise ValueError(f"memory_lengths must be {expected}; got shape "
                         f"{tuple(memory_lengths.shape)}")
    if memory_lengths.device != device:
        raise ValueError(f"memory_lengths must be {expected}; got a tensor on "
                         f"{memory_lengths.device}")
    if not torch.compiler.is_compiling():
        low, high = memory_lengths.min().item(), memory_lengths.max().item()
        if low < 1 or high > N:
            raise ValueError(f"memory_lengths must be {expected}; got values in [{low}, {high}]")
    return memory_lengths.to(torch.int64)


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


def _concatenated(chunks):
    """The memory as one (B, C, N) tensor: the chunk itself when there is one (no copy)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


# The ops take the memory as a list of chunks and concatenate it only transiently, inside the
# forward and inside the backward: autograd saves the chunks themselves, so reading a growing
# list of memory frames at every step of a clip keeps O(T) memory alive, not O(T^2) copies.
@torch.library.custom_op("stm_kernels::memory_read", mutates_args=())
def _memory_read_op(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                    scale: float, l2: bool, backend: str,
                    lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    forward = _triton.triton_forward if backend == "triton" else torch_forward
    return forward(q, _concatenated(ks), _concatenated(vs), scale, l2, lengths)


@_memory_read_op.register_fake
def _(q, ks, vs, scale, l2, backend, lengths):
    B, Cv, HW = ks[0].shape[0], vs[0].shape[1], q.shape[2]
    return vs[0].new_empty((B, Cv, HW)), vs[0].new_empty((B, HW), dtype=_lse_dtype(vs[0].dtype))


@torch.library.custom_op("stm_kernels::memory_read_backward", mutates_args=())
def _memory_read_backward_op(
        grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
        ks: list[torch.Tensor], vs: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
        scale: float, l2: bool, backend: str,
        lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with dk, dv over the concatenated memory (split per chunk by autograd)."""
    backward = _triton.triton_backward if backend == "triton" else torch_backward
    return backward(grad_out, grad_lse, q, _concatenated(ks), _concatenated(vs), out, lse, scale,
                    l2, lengths)


@_memory_read_backward_op.register_fake
def _(grad_out, grad_lse, q, ks, vs, out, lse, scale, l2, backend, lengths):
    N = sum(k.shape[2] for k in ks)
    return (q.new_empty(q.shape), ks[0].new_empty(ks[0].shape[:2] + (N,)),
            vs[0].new_empty(vs[0].shape[:2] + (N,)))


def _setup_context(ctx, inputs, output):
    q, ks, vs, scale, l2, backend, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, out, lse, lengths, *ks, *vs)
    ctx.chunks = len(ks)
    ctx.options = (scale, l2, backend)


def _backward(ctx, grad_out, grad_lse):
    q, out, lse, lengths, *memory = ctx.saved_tensors
    ks, vs = memory[:ctx.chunks], memory[ctx.chunks:]
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.stm_kernels.memory_read_backward(
        grad_out, grad_lse, q, ks, vs, out, lse, *ctx.options, lengths)
    sizes = [k.shape[2] for k in ks]
    return dq, list(dk.split(sizes, dim=2)), list(dv.split(sizes, dim=2)), None, None, None, None


_memory_read_op.register_autograd(_backward, setup_context=_setup_context)
