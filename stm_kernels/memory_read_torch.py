"""The memory read in plain PyTorch with bounded memory: online softmax over memory chunks
(forward) and recomputation from the saved log-sum-exp (backward). The CPU path; also the
float64 path used by gradcheck."""
import torch

from ._buffers import new_buffer

# Score elements (B x HW x chunk) per memory chunk: 4M floats = 16 MB, a few of them alive.
CHUNK_ELEMENTS = 1 << 22


def _chunk_length(B, HW, N):
    return max(1, min(N, CHUNK_ELEMENTS // max(B * HW, 1)))


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q_rows, k_chunk, scale, l2):
    """Scaled scores (B, HW, n) for q_rows (Bq, HW, Ck) already multiplied by scale."""
    scores = torch.matmul(q_rows, k_chunk)
    if l2:
        scores = scores.mul_(2).sub_(k_chunk.square().sum(1, keepdim=True).mul_(scale))
    return scores


def torch_forward(q, k, v, scale, l2):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW)) for q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N)."""
    B, _, N = k.shape
    HW = q.shape[2]
    acc_dtype = _accumulation_dtype(v.dtype)
    q_rows = (q.to(acc_dtype) * scale).transpose(1, 2)  # (Bq, HW, Ck)
    chunk = _chunk_length(B, HW, N)
    acc = row_max = row_sum = None
    for start in range(0, N, chunk):
        k_chunk = k[:, :, start:start + chunk].to(acc_dtype)
        v_rows = v[:, :, start:start + chunk].to(acc_dtype).transpose(1, 2)  # (B, n, Cv)
        scores = _scores(q_rows, k_chunk, scale, l2)  # (B, HW, n)
        chunk_max = scores.amax(2)
        new_max = chunk_max if row_max is None else torch.maximum(row_max, chunk_max)
        probabilities = scores.sub_(new_max.unsqueeze(2)).exp_()
        if acc is None:
            row_sum = probabilities.sum(2)
            acc = torch.bmm(probabilities, v_rows)
        else:
            alpha = torch.exp(row_max - new_max)
            row_sum = row_sum.mul_(alpha).add_(probabilities.sum(2))
            acc = acc.mul_(alpha.unsqueeze(2)).baddbmm_(probabilities, v_rows)
        row_max = new_max
    out = acc.div_(row_sum.unsqueeze(2)).transpose(1, 2).to(v.dtype).contiguous()
    return out, row_max + torch.log(row_sum)


def torch_backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2):
    """(dq shaped like q, dk, dv) of the read, one memory chunk at a time."""
    B, Ck, N = k.shape
    HW = q.shape[2]
    acc_dtype = _accumulation_dtype(v.dtype)
    d_out = grad_out.to(acc_dtype)  # (B, Cv, HW)
    delta = (d_out * out.to(acc_dtype)).sum(1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc_dtype)
    q_cols = q.to(acc_dtype)  # (Bq, Ck, HW)
    q_rows = q_cols.transpose(1, 2) * scale
    lse = lse.to(acc_dtype).unsqueeze(2)
    delta = delta.unsqueeze(2)
    dq_rows = torch.zeros((B, HW, Ck), dtype=acc_dtype, device=k.device)
    dk = new_buffer((B, Ck, N), k.dtype, k.device)
    dv = new_buffer(v.shape[:2] + (N,), v.dtype, v.device)
    q_grad_scale = 2 * scale if l2 else scale
    chunk = _chunk_length(B, HW, N)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        k_chunk = k[:, :, start:stop].to(acc_dtype)
        v_chunk = v[:, :, start:stop].to(acc_dtype)
        probabilities = _scores(q_rows, k_chunk, scale, l2).sub_(lse).exp_()  # (B, HW, n)
        dv[:, :, start:stop] = torch.bmm(d_out, probabilities)
        d_scores = torch.bmm(d_out.transpose(1, 2), v_chunk).sub_(delta).mul_(probabilities)
        dk_chunk = torch.matmul(q_cols, d_scores).mul_(q_grad_scale)  # (B, Ck, n)
        if l2:
            dk_chunk.sub_(k_chunk * d_scores.sum(1, keepdim=True).mul_(2 * scale))
        dk[:, :, start:stop] = dk_chunk
        dq_rows.baddbmm_(d_scores, k_chunk.transpose(1, 2))
    dq = dq_rows.mul_(q_grad_scale).transpose(1, 2)
    if q.shape[0] == 1 and B > 1:
        dq = dq.sum(0, keepdim=True)
    return dq.to(q.dtype).contiguous(), dk, dv
