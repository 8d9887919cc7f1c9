"""The kernels' tensor arguments as a launch passes them: strides (a memory's batch and channel
strides divided by its alignment), query-sized tensors with 16-aligned rows (a padded copy
where they are not), the memory's per-position score term, a ragged memory's lengths."""
import torch

from ..._buffers import new_buffer
from .plans import cdiv


def _alignment(t):
    """Largest power of two <= 16 dividing the batch and channel strides of a (B, C, N) tensor."""
    align = 16
    while align > 1 and any(stride % align for stride in t.stride()[:2]):
        align //= 2
    return align


def _memory_strides(name, t, align):
    """Keyword strides of a (B, C, N) memory tensor, batch and channel divided by align."""
    return {f"stride_{name}b": t.stride(0) // align, f"stride_{name}c": t.stride(1) // align,
            f"stride_{name}n": t.stride(2)}


def _strides(name, t, suffixes):
    return {f"stride_{name}{suffix}": stride
            for suffix, stride in zip(suffixes, t.stride(), strict=True)}


def _aligned_length(length):
    """round16(length): the row length of a query-sized buffer with 16-aligned rows."""
    return cdiv(length, 16) * 16


def _rows_aligned(t, compact=False):
    """Whether the rows of t (B, C, L) start on 16-element boundaries (compact: also exactly
    round16(L) apart, with no gaps between channels)."""
    channel_ok = t.stride(1) == _aligned_length(t.shape[2]) if compact else t.stride(1) % 16 == 0
    batch_ok = t.shape[0] == 1 or t.stride(0) % 16 == 0
    return t.stride(2) == 1 and channel_ok and batch_ok


def _padded_buffer(t, dtype=None):
    """An empty (B, C, L) buffer like t (or of `dtype`) whose rows are round16(L) apart: one
    strided allocation (a narrowed view of a padded one costs another op per call); the
    kernels never reach past L in a row."""
    B, C, length = t.shape
    row = _aligned_length(length)
    return new_buffer((B, C, length), dtype or t.dtype, t.device, strides=(C * row, row, 1))


def _padded_rows(t, compact=False):
    """t (B, C, L) with rows starting on 16-element boundaries (_rows_aligned): a padded copy
    unless they already do. Used for query-sized tensors (q, dO), which the kernels re-read
    per block."""
    return t if _rows_aligned(t, compact) else _padded_buffer(t).copy_(t)


def _memory_term(k, l2, rank1):
    """The per-memory-position score term (B, N) float32 the forward, selection and dQ kernels
    read beside each key tile (their `ksq`), once per call: |k|^2 for the L2 similarity (a
    per-block reduction in the kernels costs block barriers), the last key channel for a
    rank-1 read; otherwise k itself, a pointer the kernels never read."""
    if l2:
        return k.float().square().sum(1)
    return k[:, -1].float().contiguous() if rank1 else k


def _lengths_argument(lengths, k):
    """(pointer argument, RAGGED) for optional per-object memory lengths."""
    if lengths is None:
        return k, False  # never read
    return lengths.to(device=k.device, dtype=torch.int32).contiguous(), True


def _query_strides(q):
    """The query's strides; batch stride 0 for a query shared by all objects."""
    return dict(stride_qb=0 if q.shape[0] == 1 else q.stride(0), stride_qc=q.stride(1),
                stride_qm=q.stride(2))


def _query_inputs(q, k, lengths, l2, rank1, pad_query=True):
    """The tensor arguments of the kernels that stream the memory per query block (forward,
    selection): the query (with 16-aligned rows unless pad_query is False), the keys, their
    score term, the lengths."""
    return dict(q=_padded_rows(q) if pad_query else q, k=k, ksq=_memory_term(k, l2, rank1),
                lengths=_lengths_argument(lengths, k)[0])


# Memory positions per slice of the 8-bit memory term: a slice is widened to float32 on its
# own (at Ck = 128, 4 MiB), never the whole memory.
TERM_POSITIONS = 8192


def _quantized_memory_term(k, k_scale, l2, group=1):
    """_memory_term of the 8-bit read: |k|^2 (B, N) float32 of the keys k * k_scale (k_scale
    float32 (B, Ck, 1), (B, 1, N), or (B, Ck, N / group) each over `group` consecutive
    positions; or None for keys in the query's dtype), each slice of TERM_POSITIONS positions
    widened on its own; k itself (never read) without l2."""
    if not l2:
        return k
    B, _, N = k.shape
    term = torch.empty(B, N, dtype=torch.float32, device=k.device)
    for start in range(0, N, TERM_POSITIONS):
        stop = min(start + TERM_POSITIONS, N)
        part = k[:, :, start:stop].to(torch.float32)
        if k_scale is not None and k_scale.shape[2] == 1:
            part = part * k_scale
        elif k_scale is not None:  # each position's scales (of its frame)
            part = part * k_scale.index_select(
                2, torch.arange(start, stop, device=k.device) // group)
        term[:, start:stop] = part.square().sum(1)
    return term


def _scale_strides(name, scale, axis):
    """Keyword strides (b, c, n) of a float32 scale tensor (B, C, 1) (axis 1: per channel),
    (B, 1, N) (2: per position) or (B, C, G) (3: per channel and frame): an axis of size
    one's stride 0 (0: no scale, all 0)."""
    strides = (0, 0, 0) if axis == 0 else (
        scale.stride(0), scale.stride(1) if axis in (1, 3) else 0,
        scale.stride(2) if axis in (2, 3) else 0)
    return {f"stride_{name}{suffix}": stride for suffix, stride in zip("bcn", strides,
                                                                        strict=True)}
