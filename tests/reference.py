"""The memory read written out in plain float64 torch, with no project code: the reference the
numerics tests compare every backend against (the naive backend shares the torch backend's
input preparation and top-k tie rule, so it cannot be the judge of either).

    reference_read(q, k, v, ...)   (out, lse, usage) of the read, differentiable
    reference_select(...)          (scores, indices) of the top-k selection

Everything is computed from the formulas of memory_read's docstring: the materialised
(B, HW, N) scores, the softmax over memory positions, the weighted sum of the values.
"""
import torch


def _positions_last(tensor, device=None):
    """(B, C, *positions) as (B, C, L) float64 on `device` (default: the CPU); a list of
    chunks concatenated."""
    if isinstance(tensor, (list, tuple)):
        return torch.cat([_positions_last(chunk, device) for chunk in tensor], dim=2)
    return tensor.to(device or "cpu", torch.float64).flatten(2)


def reference_scores(q, k, *, scale=None, similarity="dot", lengths=None, shrinkage=None,
                     selection=None, device=None):
    """(B, HW, N) float64 scores s_ij of query position i against memory position j, -inf past
    each object's length:

        dot:  scale * q_i.k_j
        l2:   scale * (2 q_i.k_j - |k_j|^2)
        xmem: -scale * shrinkage_j * sum_c selection_ic (q_ic - k_jc)^2
              without a selection: -scale * shrinkage_j * (|k_j|^2 - 2 q_i.k_j) (XMem's
              STCN-like case: the query's own term -|q_i|^2 left out, as memory_read's
              docstring says; it changes the lse, not the softmax)
    """
    q, k = _positions_last(q, device), _positions_last(k, device)
    B, Ck, N = k.shape
    q = q.expand(B, -1, -1)
    scale = Ck ** -0.5 if scale is None else scale
    if similarity == "dot":
        scores = scale * torch.einsum("bci,bcj->bij", q, k)
    elif similarity == "l2":
        scores = scale * (2 * torch.einsum("bci,bcj->bij", q, k) - (k * k).sum(1)[:, None, :])
    elif similarity == "xmem":
        if selection is None:
            scores = -scale * ((k * k).sum(1)[:, None, :]
                               - 2 * torch.einsum("bci,bcj->bij", q, k))
        else:
            weights = _positions_last(selection, device).expand(B, -1, -1)
            squared = (q[:, :, :, None] - k[:, :, None, :]) ** 2  # (B, Ck, HW, N)
            scores = -scale * (weights[:, :, :, None] * squared).sum(1)
        if shrinkage is not None:
            scores = scores * _positions_last(shrinkage, device)  # (B, 1, N) over the HW rows
    else:
        raise ValueError(f"unknown similarity {similarity!r}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths).to(k.device)
        outside = torch.arange(N, device=k.device)[None, :] >= lengths[:, None]  # (B, N)
        scores = scores.masked_fill(outside[:, None, :], float("-inf"))
    return scores


def reference_select(q, k, top_k, **options):
    """(scores (B, HW, top_k), indices (B, HW, top_k)) of each query position's top_k largest
    scores, largest first, ties to the lower memory index (a stable descending sort)."""
    scores = reference_scores(q, k, **options)
    values, order = torch.sort(scores, dim=2, descending=True, stable=True)
    return values[:, :, :top_k], order[:, :, :top_k]


def reference_read(q, k, v, *, top_k=None, **options):
    """(out (B, Cv, HW), lse (B, HW), usage (B, N)) in float64 for q (Bq, Ck, *Q), k (B, Ck,
    *M) and v (B, Cv, *M) (or lists of memory chunks), with reference_scores' options; top_k:
    the softmax over each query position's top_k scores only (reference_select's). Gradients
    flow to q, k, v (and shrinkage, selection) where they require them. Q and M come back
    flattened."""
    scores = reference_scores(q, k, **options)
    if top_k is not None and top_k < scores.shape[2]:
        _, kept = reference_select(q, k, top_k, **options)
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(2, kept, False)
        scores = scores.masked_fill(dropped, float("-inf"))
    lse = torch.logsumexp(scores, dim=2)  # (B, HW)
    probabilities = torch.exp(scores - lse[:, :, None])
    out = torch.einsum("bij,bcj->bci", probabilities, _positions_last(v, options.get("device")))
    return out, lse, probabilities.sum(1)


def reference_usage(q, k, lse, **options):
    """(B, N) float64: sum over the query positions of exp(s_ij - lse_i), each memory
    position's probability under a given log-sum-exp lse (B, HW)."""
    scores = reference_scores(q, k, **options)
    lse = lse.to(scores.device, torch.float64).flatten(1)
    return torch.exp(scores - lse[:, :, None]).sum(1)
