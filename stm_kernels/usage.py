"""Memory usage (XMem, Cutie): how much probability each memory position received from a read,
summed over the query positions, for consolidating or pruning a long-term memory.

    usage[b, j] = sum_i exp(s_ij - lse_bi)

Computed from the read's log-sum-exp in one more pass over the memory that recomputes the
scores but never stores them (torch: chunked; Triton: one program per memory block looping over
the queries, as the backward's dV kernel does; naive: materialised). Not differentiable: XMem
and Cutie use usage as a statistic, not in the loss.
"""
import torch

from .memory_read_naive import naive_scores
from .memory_read_torch import _accumulation_dtype, _chunk_length, _scores, _without_autocast


@_without_autocast
def torch_usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 usage of the memory positions, one memory chunk at a time."""
    B, _, N = k.shape
    HW = q.shape[2]
    acc_dtype = _accumulation_dtype(k.dtype)
    q_rows = (q.to(acc_dtype) * scale).transpose(1, 2)
    lse = lse.to(acc_dtype).unsqueeze(2)
    usage = torch.zeros((B, N), dtype=torch.float32, device=k.device)
    chunk = _chunk_length(B, HW, N)
    for start in range(0, N, chunk):
        scores = _scores(q_rows, k[:, :, start:start + chunk].to(acc_dtype), scale, l2)
        if lengths is not None:
            positions = torch.arange(start, start + scores.shape[2], device=k.device)
            scores.masked_fill_((positions >= lengths[:, None])[:, None, :], float("-inf"))
        usage[:, start:start + scores.shape[2]] = scores.sub_(lse).exp_().sum(1)
    return usage


def naive_usage(q, k, lse, scale, l2, lengths=None):
    """The same from the materialised (B, N, HW) scores."""
    acc_dtype = _accumulation_dtype(k.dtype)
    scores = naive_scores(q.to(acc_dtype), k.to(acc_dtype), scale, l2, lengths)
    return torch.exp(scores - lse.to(acc_dtype).unsqueeze(1)).sum(2).float()


def usage(q, k, lse, scale, l2, lengths, backend):
    """Dispatch to the backend."""
    with torch.no_grad():
        if backend == "triton":
            from .memory_read_triton import triton_usage
            return triton_usage(q, k, lse, scale, l2, lengths)
        if backend == "naive":
            return naive_usage(q, k, lse, scale, l2, lengths)
        return torch_usage(q, k, lse, scale, l2, lengths)
