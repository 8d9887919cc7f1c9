"""Masks and probabilities, shared by the segmenters and the CLI: checks of the masks a video is
segmented from, the merge of a given mask into a frame's predictions, and the labels of
probabilities.

A first mask without any object would start a segmentation that tracks nothing (every later
frame all background); a mask with hundreds of ids is nearly always a colour or anti-aliased
image read as ids, and would build a memory per id. Both are refused with a message naming
the mask.

Masks and probabilities are torch tensors or numpy arrays (the ONNX runner's); torch is
imported only for tensors, so that the command's checks run where PyTorch is not installed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, overload

import numpy as np

from stm_model.inference.options import DEFAULT_MAX_OBJECTS
from stm_model.io.annotations import is_tensor

if TYPE_CHECKING:
    import torch


def object_ids(mask):
    """The object ids (> 0) of a (H, W) mask (tensor or array), ascending."""
    if is_tensor(mask):
        import torch
        return [int(i) for i in torch.unique(mask) if i > 0]
    return [int(i) for i in np.unique(np.asarray(mask)) if i > 0]


def check_first_mask(mask, known_ids, name=None):
    """ValueError when `mask` is the first one a segmentation gets (no objects known yet:
    `known_ids` empty) and holds no object. A later mask may be empty (nothing new on that
    frame); mask None is left to the caller's own check. `name` (a path) goes into the
    message."""
    if mask is None or len(known_ids) or object_ids(mask):
        return
    what = f"the first frame's mask {name}" if name else "the first frame's mask"
    raise ValueError(f"{what} has no object (every pixel is 0, background): mark at least one "
                     "object with an id 1..n (a palette PNG, or gray levels 1..n)")


def check_object_count(ids, limit=DEFAULT_MAX_OBJECTS, name=None, needed=None):
    """ValueError when more than `limit` object ids are given (`ids`: the ids of a video's
    masks so far); `name` (the mask that brought the count over) goes into the message and
    `needed` (default: their count) is the limit it suggests, e.g. the ids of all the
    video's masks."""
    ids = sorted(set(ids))
    count = len(ids)
    if limit is not None and count > limit:
        shown = ", ".join(map(str, ids[:8])) + (", ..." if count > 8 else "")
        where = f" (the masks up to {name})" if name else ""
        raise ValueError(f"{count} objects (ids {shown}){where}, more than --max-objects "
                         f"{limit}: a colour or anti-aliased image read as ids? Save object ids "
                         "as a palette PNG, or raise the limit with --max-objects "
                         f"{max(needed or count, count)}")


@overload
def labels_of(probs: torch.Tensor, object_ids: Sequence[int]) -> torch.Tensor: ...


@overload
def labels_of(probs: np.ndarray, object_ids: Sequence[int]) -> np.ndarray: ...


def labels_of(probs, object_ids):
    """(H, W) int64 object ids (0 = background) of the most probable channel of probs
    (K, H, W), channel k being object_ids[k - 1]; ties go to the first channel. A tensor for a
    tensor, an array for an array."""
    if not is_tensor(probs):
        return np.asarray([0] + list(object_ids), np.int64)[np.asarray(probs).argmax(0)]
    import torch
    ids = torch.tensor([0] + list(object_ids), device=probs.device)
    # max(0).indices is argmax(0) (first maximum), but far faster on CPU
    return ids[probs.max(0).indices]


def merge_mask(foreground, mask, object_ids):
    """Probabilities (K, Hp, Wp) of a frame that came with a mask, and the ids it introduces.

    foreground (n, Hp, Wp): the known objects' predicted probabilities (object_ids order);
    mask (Hp, Wp) int64 ids. Ids not in object_ids become new objects (appended, in id order;
    the caller records them); given ids take the mask's pixels; other objects lose the pixels
    the mask claims. When the mask gives every object, the probabilities are the mask itself
    (the official first frame); otherwise they are soft-aggregated.
    """
    import torch

    from stm_model.network.stm import soft_aggregate
    ids = [int(i) for i in torch.unique(mask) if i != 0]
    new_ids = [i for i in ids if i not in object_ids]
    all_ids = list(object_ids) + new_ids
    if new_ids:
        foreground = torch.cat([foreground, foreground.new_zeros(
            (len(new_ids),) + foreground.shape[1:])])
    claimed = (mask > 0).float()
    foreground = foreground * (1 - claimed)
    for i in ids:
        foreground[all_ids.index(i)] = (mask == i).float()
    if set(ids) == set(all_ids):
        # every object given: the probabilities are the mask itself (official first frame)
        background = (mask == 0).float().unsqueeze(0)
        return torch.cat([background, foreground]), new_ids
    return torch.softmax(soft_aggregate(foreground), dim=0), new_ids
