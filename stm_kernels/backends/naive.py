"""The "naive" backend: the official STM memory read (Oh et al., ICCV 2019, `Memory.forward`),
which materialises the whole (N x HW) affinity per object. Kept as the reference and the
baseline; autograd comes from PyTorch. Also the reference top-k selection and usage."""
from typing import Optional

import torch

from ..torch_common import accumulation_dtype, without_autocast
from .pytorch import exact_topk, padded


@without_autocast
def naive_memory_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, l2: bool,
                      need_lse: bool = True, lengths: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out (B, Cv, HW), lse (B, HW) or None) for q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N).

    Builds the (B, N, HW) affinity like the official code: bmm, scale, softmax over memory
    positions, bmm with the values. lse is computed only when asked (it costs another pass).
    lengths (B,): only the first lengths[b] memory positions of object b count; the others are
    zeroed before use (they may hold anything) and masked out of the softmax.
    """
    if lengths is not None:
        v = torch.where(_valid(k, lengths).unsqueeze(1), v, 0)
    affinity = scores(q, k, scale, l2, lengths)
    probabilities = torch.softmax(affinity, dim=1)
    out = torch.bmm(v, probabilities.to(v.dtype))
    lse = None
    if need_lse:
        lse = torch.logsumexp(affinity.to(accumulation_dtype(affinity.dtype)), dim=1)
    return out, lse


def _valid(k, lengths):
    """(B, N) bool: positions inside each object's memory."""
    return torch.arange(k.shape[2], device=k.device) < lengths.to(k.device).unsqueeze(1)


def scores(q, k, scale, l2, lengths=None):
    """The materialised (B, N, HW) scores; positions past lengths[b] are -inf (and never
    multiplied: they may hold anything)."""
    B = k.shape[0]
    valid = None
    if lengths is not None:
        valid = _valid(k, lengths)
        k = torch.where(valid.unsqueeze(1), k, 0)
    affinity = torch.bmm(k.transpose(1, 2), q.expand(B, -1, -1))  # (B, N, HW)
    if l2:
        affinity = 2 * affinity - k.pow(2).sum(1).unsqueeze(2)
    affinity = affinity * scale
    if valid is not None:
        affinity = affinity.masked_fill(~valid.unsqueeze(2), float("-inf"))
    return affinity


@without_autocast
def select(q, k, top_k, scale, l2, lengths=None):
    """The same from the materialised (B, HW, N) scores (the reference)."""
    acc_dtype = accumulation_dtype(k.dtype)
    values = scores(q.to(acc_dtype), k.to(acc_dtype), scale, l2, lengths).transpose(1, 2)
    return padded(*exact_topk(values, min(top_k, values.shape[2])), top_k)


@without_autocast
def usage(q, k, lse, scale, l2, lengths=None):
    """The same from the materialised (B, N, HW) scores."""
    acc_dtype = accumulation_dtype(k.dtype)
    values = scores(q.to(acc_dtype), k.to(acc_dtype), scale, l2, lengths)
    return torch.exp(values - lse.to(acc_dtype).unsqueeze(1)).sum(2).float()
