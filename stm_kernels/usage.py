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
from .torch_common import accumulation_dtype, chunk_length, without_autocast


@without_autocast
def torch_usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 usage of the memory positions, one memory chunk at a time. The shifted
    scores s_ij - lse_i come out of one product over augmented channels (q' = [scale q, -lse],
    k' = [k, 1]; for L2 q' = [2 scale q, -scale, -lse], k' = [k, |k|^2, 1]), so each chunk
    costs one product, one exp and a sum over the queries."""
    B, Ck, N = k.shape
    HW = q.shape[2]
    acc_dtype = accumulation_dtype(k.dtype)
    lse = lse.to(acc_dtype)
    q_rows = q.to(acc_dtype).transpose(1, 2).expand(B, -1, -1)  # (B, HW, Ck)
    columns = [q_rows * (2 * scale if l2 else scale)]
    if l2:
        columns.append(q_rows.new_full((B, HW, 1), -scale))
    q_aug = torch.cat(columns + [-lse.unsqueeze(2)], 2)  # (B, HW, Ck + 1 or 2)
    usage = torch.zeros((B, N), dtype=torch.float32, device=k.device)
    ones = q_aug.new_ones((B, 1, HW))
    chunk = chunk_length(B, HW, N)
    for start in range(0, N, chunk):
        k_chunk = k[:, :, start:start + chunk].to(acc_dtype)
        n = k_chunk.shape[2]
        rows = [k_chunk] + ([k_chunk.square().sum(1, keepdim=True)] if l2 else [])
        k_aug = torch.cat(rows + [k_chunk.new_ones((B, 1, n))], 1)
        shifted = torch.bmm(q_aug, k_aug)  # (B, HW, n): s_ij - lse_i
        if lengths is not None and int(lengths.min()) < start + n:
            positions = torch.arange(start, start + n, device=k.device)
            shifted.masked_fill_((positions >= lengths[:, None])[:, None, :], float("-inf"))
        # a product with ones sums over the queries faster than .sum(1) on CPU
        usage[:, start:start + n] = torch.bmm(ones, shifted.exp_()).squeeze(1)
    return usage


def naive_usage(q, k, lse, scale, l2, lengths=None):
    """The same from the materialised (B, N, HW) scores."""
    acc_dtype = accumulation_dtype(k.dtype)
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
