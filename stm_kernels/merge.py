"""Exact merge of memory reads over disjoint memory chunks (by their log-sum-exp)."""
from typing import Sequence

import torch

from .torch_common import accumulation_dtype


def merge_reads(outs: Sequence[torch.Tensor],
                lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge reads of one query over disjoint memory chunks into the read over all of them.

    Args:
        outs: sequence of read-outs, each (B, Cv, *Q), as returned by `memory_read`.
        lses: sequence of their log-sum-exps, each (B, *Q) (`memory_read(..., return_lse=True)`).

    Returns:
        (out, lse): out (B, Cv, *Q) in the dtype of outs[0], lse (B, *Q) in float32 (float64 if
        the lses are float64). Equal, up to rounding, to one `memory_read` over the memory chunks
        concatenated along N; differentiable, so chunks may live on other devices or on CPU.

    Reads with `top_k` are not merged into a top-k read: each chunk's read is over that
    chunk's top_k positions, so the merge is a softmax over up to chunks x top_k positions,
    not the top_k of the whole memory. For the global top-k over chunks, select first over all
    of them (`stm_kernels.topk.topk_scores` per chunk, keep the k best) and read those
    (`stm_kernels.topk.read_selected`), as `stm_kernels.distributed.memory_read` does; or
    pass the chunks as a list to `memory_read(..., top_k=k)`.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(
            f"merge_reads needs one lse per out and at least one read; got {len(outs)} outs "
            f"and {len(lses)} lses")
    out_shape, lse_shape = outs[0].shape, lses[0].shape
    if len(out_shape) < 3 or lse_shape != out_shape[:1] + out_shape[2:]:
        raise ValueError(
            f"merge_reads expects outs of shape (B, Cv, *Q) and lses of shape (B, *Q); got "
            f"outs[0] {tuple(out_shape)} and lses[0] {tuple(lse_shape)}")
    for index, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        if out.shape != out_shape or lse.shape != lse_shape:
            raise ValueError(
                f"merge_reads: outs[{index}] {tuple(out.shape)} / lses[{index}] "
                f"{tuple(lse.shape)} differ from outs[0] {tuple(out_shape)} / lses[0] "
                f"{tuple(lse_shape)}")
    acc_dtype = accumulation_dtype(lses[0].dtype)
    device = outs[0].device
    stacked = torch.stack([lse.to(device, acc_dtype) for lse in lses])  # (S, B, *Q)
    lse = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - lse).unsqueeze(2)  # (S, B, 1, *Q)
    out = sum(w * o.to(device, acc_dtype) for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype), lse
