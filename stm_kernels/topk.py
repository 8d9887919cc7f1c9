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

from . import checks
from .memory_read_naive import naive_scores
from . import torch_common
from .torch_common import accumulation_dtype, chunk_scores, without_autocast

TRITON_MAX_TOP_K = 64


# --------------------------------------------------------------------------- selection


def exact_topk(scores, k):
    """(values, indices) of the k largest entries of each row of scores (..., n), sorted by
    value descending then index ascending: among equal values the lower indices are taken
    (torch.topk leaves that order unspecified)."""
    values, indices = torch.topk(scores, k, dim=-1)
    threshold = values[..., -1:]
    if bool(((scores >= threshold).sum(-1) != k).any()):
        # ties at the threshold reach past the k kept: take the lowest indices among them
        greater, equal = scores > threshold, scores == threshold
        needed = k - greater.sum(-1, keepdim=True)
        take = greater | (equal & (equal.cumsum(-1) <= needed))
        indices = take.nonzero()[:, -1].view(*scores.shape[:-1], k)
        values = scores.gather(-1, indices)
    return _ordered(values, indices)


def _ordered(values, indices):
    """Sort by value descending, then index ascending."""
    by_index = torch.sort(indices, dim=-1).indices
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), indices.gather(-1, order)


def _merge(best, candidates):
    """The k best of two (values, indices) sets whose ties are all ordered by index, the first
    set holding the lower indices."""
    values = torch.cat([best[0], candidates[0]], -1)
    indices = torch.cat([best[1], candidates[1]], -1)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    order = order[..., :best[0].shape[-1]]
    return values.gather(-1, order), indices.gather(-1, order)


@without_autocast
def torch_select(q, k, top_k, scale, l2, lengths=None):
    """(scores (B, HW, top_k), indices) of the top_k memory positions of each query, streaming
    over memory chunks (scores in the accumulation dtype; index -1 / score -inf where an object
    has fewer than top_k positions)."""
    B, _, N = k.shape
    HW = q.shape[2]
    acc_dtype = accumulation_dtype(k.dtype)
    q_rows = (q.to(acc_dtype) * scale).transpose(1, 2).contiguous()
    chunk = max(top_k, torch_common.CHUNK_ELEMENTS // max(B * HW, 1))
    best = None
    for start in range(0, N, chunk):
        k_chunk = k[:, :, start:start + chunk].to(acc_dtype).contiguous()
        scores = chunk_scores(q_rows, k_chunk, scale, l2)  # (B, HW, n)
        if lengths is not None:
            positions = torch.arange(start, start + scores.shape[2], device=k.device)
            scores.masked_fill_((positions >= lengths[:, None])[:, None, :], float("-inf"))
        values, indices = exact_topk(scores, min(top_k, scores.shape[2]))
        found = (values, indices + start)
        best = found if best is None else _merge(best, found)
    return _padded(*best, top_k)


def naive_select(q, k, top_k, scale, l2, lengths=None):
    """The same from the materialised (B, HW, N) scores (the reference)."""
    acc_dtype = accumulation_dtype(k.dtype)
    scores = naive_scores(q.to(acc_dtype), k.to(acc_dtype), scale, l2, lengths).transpose(1, 2)
    return _padded(*exact_topk(scores, min(top_k, scores.shape[2])), top_k)


def _padded(values, indices, top_k):
    """Pad to top_k entries and mark entries past an object's memory (-inf) with index -1."""
    missing = top_k - values.shape[-1]
    if missing > 0:
        values = torch.cat([values, values.new_full(values.shape[:-1] + (missing,),
                                                    float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_zeros(indices.shape[:-1] + (missing,))], -1)
    return values, torch.where(torch.isneginf(values), -1, indices)


def select(q, k, top_k, scale, l2, lengths, backend):
    """Dispatch the selection to the backend (see the module docstring)."""
    if backend == "triton":
        from .memory_read_triton import triton_select
        return triton_select(q, k, top_k, scale, l2, lengths)
    if backend == "naive":
        return naive_select(q, k, top_k, scale, l2, lengths)
    return torch_select(q, k, top_k, scale, l2, lengths)


# --------------------------------------------------------------------------- read


def _gathered(t, indices):
    """t (B, C, N) at indices (B, h, k) -> (B, C, h, k), gathering along N (index -1 reads
    position 0): each channel's row is contiguous, so this never copies the memory."""
    B, C, _ = t.shape
    h, k = indices.shape[1:]
    flat = indices.clamp_min(0).reshape(B, 1, h * k).expand(-1, C, -1)
    return torch.gather(t, 2, flat).view(B, C, h, k)


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
        q_part = q[:, :, start:start + step].to(acc_dtype)  # (Bq, Ck, h)
        k_sel = _gathered(k, part).to(acc_dtype)  # (B, Ck, h, k)
        v_sel = _gathered(v, part).to(acc_dtype)  # (B, Cv, h, k)
        scores = torch.einsum("bch,bchk->bhk", q_part.expand(k.shape[0], -1, -1), k_sel)
        if l2:
            scores = 2 * scores - (k_sel * k_sel).sum(1)
        scores = (scores * scale).masked_fill(part < 0, float("-inf"))  # (B, h, k)
        lse = torch.logsumexp(scores, -1)
        p = torch.exp(scores - torch.where(torch.isneginf(lse), 0, lse).unsqueeze(-1))
        outs.append(torch.einsum("bchk,bhk->bch", v_sel, p))  # (B, Cv, h)
        lses.append(lse)
        probabilities.append(p.detach())
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
    from .memory_read import prepared
    with torch.no_grad():
        call = prepared(query_key, memory_key, memory_key, scale=scale, similarity=similarity,
                        shrinkage=shrinkage, selection=selection, memory_lengths=memory_lengths,
                        backend=backend, top_k=top_k)
        scores, indices = select(call.q, checks.concatenated(call.keys), call.top_k, call.scale,
                                 call.l2, call.lengths, call.backend)
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
    from .memory_read import prepared
    call = prepared(query_key, memory_key, memory_value, scale=scale, similarity=similarity,
                    shrinkage=shrinkage, selection=selection, backend="torch")
    B, HW = call.keys[0].shape[0], call.q.shape[2]
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) \
            or indices.dim() < 3 or indices.shape[0] != B or indices[0, ..., 0].numel() != HW:
        raise ValueError(f"indices must be a (B={B}, *Q, k) integer tensor of memory positions "
                         f"for the query's {HW} positions; got "
                         f"{getattr(indices, 'shape', type(indices).__name__)}")
    flat = indices.reshape(B, HW, indices.shape[-1]).to(call.q.device, torch.int64)
    out, lse, _ = selected_read(call.q, checks.concatenated(call.keys),
                                checks.concatenated(call.values), flat, call.scale, call.l2)
    out = out.unflatten(2, call.query_spatial)
    lse = lse.to(accumulation_dtype(lse.dtype))
    return (out, lse.unflatten(1, call.query_spatial)) if return_lse else out
