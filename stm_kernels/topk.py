"""Top-k memory reads (STCN, XMem, Cutie): each query's softmax over its k largest scores only.

Two steps, neither of which materialises the (N x HW) affinity:
    selection     the k best memory positions of every query, ties broken by the lower memory
                  index (no gradient): streaming over memory chunks (torch), a fused Triton
                  kernel keeping a per-row running top-k of packed (score, index) keys, or the
                  materialised scores (naive, the reference). Memory O(HW * k) beyond a chunk.
    read          the softmax over the selected scores, recomputed from q and the gathered
                  keys, and the weighted sum of the gathered values: differentiable, so
                  gradients reach the query and only the selected memory positions.

Public: topk_scores (the selection, e.g. for a sharded memory's global top-k) and
read_selected (the read over given positions); memory_read(..., top_k=k) runs both.
"""
import torch

from . import backends, inputs, torch_common
from .torch_common import accumulation_dtype, without_autocast


# --------------------------------------------------------------------------- read


def _gathered(t, flat, h, k):
    """t (B, C, N) at positions flat (B, 1, h * k) -> (B, C, h, k), gathering along N: each
    channel's row is contiguous, so this never copies the memory."""
    B, C, _ = t.shape
    return torch.gather(t, 2, flat.expand(-1, C, -1)).view(B, C, h, k)


@without_autocast
def selected_read(q, k, v, indices, scale, l2):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW), probabilities (B, HW, k)) of the softmax over
    the given positions only (index -1: unused slot; a query with none gets out 0, lse -inf).
    Differentiable in q, k, v: autograd saves the gathered keys and values, O(HW * k) memory
    whatever N; without gradients the queries are processed in chunks of bounded size."""
    acc_dtype = accumulation_dtype(v.dtype)
    B, HW, top_k = indices.shape
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    per_query = B * top_k * (k.shape[1] + v.shape[1])  # gathered elements per query position
    step = HW if grad else max(1, torch_common.CHUNK_ELEMENTS // max(per_query, 1))
    outs, lses, probabilities = [], [], []
    for start in range(0, HW, step):
        part = indices[:, start:start + step]
        h = part.shape[1]
        flat = part.clamp_min(0).reshape(B, 1, h * top_k)  # index -1 reads position 0
        q_part = q[:, :, start:start + step].to(acc_dtype)  # (Bq, Ck, h)
        k_sel = _gathered(k, flat, h, top_k).to(acc_dtype)  # (B, Ck, h, k)
        v_sel = _gathered(v, flat, h, top_k).to(acc_dtype)  # (B, Cv, h, k)
        scores = torch.einsum("bch,bchk->bhk", q_part.expand(k.shape[0], -1, -1), k_sel)
        if l2:
            scores = 2 * scores - (k_sel * k_sel).sum(1)
        scores = (scores * scale).masked_fill(part < 0, float("-inf"))  # (B, h, k)
        lse = torch.logsumexp(scores, -1)
        p = torch.exp(scores - torch.where(torch.isneginf(lse), 0, lse).unsqueeze(-1))
        outs.append(torch.einsum("bchk,bhk->bch", v_sel, p))  # (B, Cv, h)
        lses.append(lse)
        probabilities.append(p.detach())
    if len(outs) == 1:  # one chunk (every read with gradients): no copy through cat
        return outs[0].to(v.dtype), lses[0], probabilities[0]
    out = torch.cat(outs, 2).to(v.dtype)
    return out, torch.cat(lses, 1), torch.cat(probabilities, 1)


def usage_of_selection(indices, probabilities, N):
    """(B, N) float32: each memory position's probability summed over the queries that
    selected it."""
    B = indices.shape[0]
    usage = torch.zeros((B, N + 1), dtype=torch.float32, device=indices.device)
    slots = torch.where(indices < 0, N, indices).view(B, -1)  # unused slots land in column N
    usage.scatter_add_(1, slots, probabilities.float().view(B, -1))
    return usage[:, :N]


# --------------------------------------------------------------------------- public


def topk_scores(query_key, memory_key, top_k, *, scale=None, similarity="dot", shrinkage=None,
                selection=None, memory_lengths=None, backend="auto"):
    """The top_k memory positions of every query, without gradients.

    Args as memory_read (memory_key may be a list of chunks; no memory_value needed).
    Returns (scores, indices): scores (B, *Q, top_k) float32 in natural units (the softmax's
    logits), indices (B, *Q, top_k) int64 positions in the flattened (concatenated) memory,
    sorted by score descending then index ascending. An object with fewer than top_k memory
    positions gets index -1 and score -inf in its last slots.
    """
    with torch.no_grad():
        call = inputs.prepared(query_key, memory_key, memory_key, scale=scale,
                               similarity=similarity, shrinkage=shrinkage, selection=selection,
                               memory_lengths=memory_lengths, backend=backend, top_k=top_k)
        scores, indices = backends.implementation(call.backend).select(
            call.q, inputs.concatenated(call.keys), call.top_k, call.scale, call.l2, call.lengths)
    shape = (scores.shape[0],) + tuple(call.query_spatial) + (call.top_k,)
    return scores.float().reshape(shape), indices.reshape(shape)


def read_selected(query_key, memory_key, memory_value, indices, *, scale=None,
                  similarity="dot", shrinkage=None, selection=None, return_lse=False):
    """The read restricted, per query, to given memory positions (differentiable).

    indices: (B, *Q, k) int64 positions in the flattened memory (as topk_scores returns
    them); -1 marks an unused slot, and a query with no valid slot reads out 0 (lse -inf).
    Other args as memory_read. Returns out (B, Cv, *Q) (and lse (B, *Q), float32; float64
    for float64 inputs).
    """
    call = inputs.prepared(query_key, memory_key, memory_value, scale=scale,
                           similarity=similarity, shrinkage=shrinkage, selection=selection,
                           backend="torch")
    B, HW = call.keys[0].shape[0], call.q.shape[2]
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) \
            or indices.dim() < 3 or indices.shape[0] != B or indices[0, ..., 0].numel() != HW:
        raise ValueError(f"indices must be a (B={B}, *Q, k) integer tensor of memory positions "
                         f"for the query's {HW} positions; got "
                         f"{getattr(indices, 'shape', type(indices).__name__)}")
    flat = indices.reshape(B, HW, indices.shape[-1]).to(call.q.device, torch.int64)
    out, lse, _ = selected_read(call.q, inputs.concatenated(call.keys),
                                inputs.concatenated(call.values), flat, call.scale, call.l2)
    out = out.unflatten(2, call.query_spatial)
    lse = lse.to(accumulation_dtype(lse.dtype))
    return (out, lse.unflatten(1, call.query_spatial)) if return_lse else out
