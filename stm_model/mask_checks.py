"""Checks of the masks a video is segmented from, shared by the segmenters and the CLI.

A first mask without any object would start a segmentation that tracks nothing (every later
frame all background); a mask with hundreds of ids is nearly always a colour or anti-aliased
image read as ids, and would build a memory per id. Both are refused with a message naming
the mask.
"""
import numpy as np
import torch

DEFAULT_MAX_OBJECTS = 32


def object_ids(mask):
    """The object ids (> 0) of a (H, W) mask (tensor or array), ascending."""
    if isinstance(mask, torch.Tensor):
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


def check_object_count(ids, limit=DEFAULT_MAX_OBJECTS, name=None):
    """ValueError when more than `limit` object ids are given (`ids`: the ids seen so far in a
    video); `name` (a mask's path) goes into the message."""
    count = len(set(ids))
    if limit is not None and count > limit:
        where = f" in {name}" if name else ""
        raise ValueError(f"{count} objects{where}, more than --max-objects {limit}: a colour or "
                         "anti-aliased image read as ids? Save object ids as a palette PNG, or "
                         f"raise the limit with --max-objects {count}")
