"""Objects cut out of one video by their masks and pasted over another's frames, touching the
objects already there: STM's copy-paste synthesis of multi-object clips. Training pastes
objects of its own sequences into its clips (datasets.PastedObjects); the multi-object
benchmark builds its test clips the same way from sequences no model trained on.

Arrays are numpy: frames (T, H, W, 3) float in [0, 1], masks (T, H, W) bool or int ids. The
pasted object keeps its own motion (its masks frame by frame, moved by one fixed offset), so
the two objects drift apart, touch more or occlude each other as the videos go on.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def shifted(array: np.ndarray, dy: int, dx: int, shape: tuple[int, int]) -> np.ndarray:
    """`array` (H', W', ...) placed on a zero canvas of `shape` (H, W) with its top-left corner
    at (dy, dx); what falls outside the canvas is cut off."""
    height, width = shape
    canvas = np.zeros((height, width, *array.shape[2:]), array.dtype)
    top, left = max(dy, 0), max(dx, 0)
    bottom, right = min(dy + array.shape[0], height), min(dx + array.shape[1], width)
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = array[top - dy:bottom - dy, left - dx:right - dx]
    return canvas


def touching_offset(target: np.ndarray, piece: np.ndarray, rng: np.random.Generator | None = None,
                    cover: float = 0.05, inside: float = 0.8, step: int = 2
                    ) -> tuple[int, int] | None:
    """Offset (dy, dx) at which the mask `piece` (h, w) bool, placed on the canvas of `target`
    (H, W) bool, touches target's object: it is slid from beside the object (right, left, below
    or above; in random order with `rng`, else in that order) towards it, `step` pixels at a
    time, until it covers `cover` of the smaller of the two objects' areas (a touching,
    slightly occluding pair). The first side at which at least `inside` of the piece stays on
    the canvas wins; None when no side does (or either mask is empty)."""
    if not target.any() or not piece.any():
        return None
    ys, xs = np.nonzero(target)
    py, px = np.nonzero(piece)
    smaller = min(int(target.sum()), int(piece.sum()))
    centre_y = int(round(ys.mean() - py.mean()))  # piece's centroid on target's centroid row
    centre_x = int(round(xs.mean() - px.mean()))
    starts = {  # (start offset, direction of the slide) from each side of target's box
        "right": ((centre_y, xs.max() + 1 - px.min()), (0, -1)),
        "left": ((centre_y, xs.min() - 1 - px.max()), (0, 1)),
        "below": ((ys.max() + 1 - py.min(), centre_x), (-1, 0)),
        "above": ((ys.min() - 1 - py.max(), centre_x), (1, 0)),
    }
    sides = list(starts)
    if rng is not None:
        rng.shuffle(sides)
    for side in sides:
        (dy, dx), (sy, sx) = starts[side]
        span = (xs.max() - xs.min() + px.max() - px.min() if sx else
                ys.max() - ys.min() + py.max() - py.min()) + 2
        for _ in range(0, int(span), step):
            placed = shifted(piece, dy, dx, target.shape)
            if placed.sum() < inside * piece.sum():
                break
            if (placed & target).sum() >= cover * smaller:
                return dy, dx
            dy, dx = dy + sy * step, dx + sx * step
    return None


def paste(frames: np.ndarray, labels: np.ndarray, piece_frames: np.ndarray,
          piece_masks: np.ndarray, offset: tuple[int, int], object_id: int,
          feather: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) and labels (T, H, W) with the object of piece_frames (T, h, w, 3)
    under piece_masks (T, h, w) bool pasted at `offset` (see `shifted`) as `object_id`, in
    front of everything. Its edge is blended inwards over `feather` pixels (a Gaussian's
    sigma) so that no hard seam gives the object away, and none of its own video's background
    shows; the labels take the mask itself. Returns new arrays."""
    frames, labels = frames.copy(), labels.copy()
    shape = frames.shape[1:3]
    for t in range(len(frames)):
        mask = shifted(piece_masks[t], *offset, shape)
        if not mask.any():
            continue
        alpha = mask.astype(np.float32)
        if feather:
            alpha = ndimage.gaussian_filter(alpha, feather) * alpha
        alpha = alpha[..., None]
        frames[t] = frames[t] * (1 - alpha) + shifted(piece_frames[t], *offset, shape) * alpha
        labels[t][mask] = object_id
    return frames, labels


def resize_clip(frames: np.ndarray, masks: np.ndarray, factor: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) float and masks (T, H, W) scaled by `factor` (bilinear, nearest)."""
    if factor == 1:
        return frames, masks
    zoom = (1, factor, factor)
    resized_frames = ndimage.zoom(frames, (*zoom, 1), order=1, grid_mode=True, mode="nearest")
    resized_masks = ndimage.zoom(masks, zoom, order=0, grid_mode=True, mode="nearest")
    return np.clip(resized_frames, 0, 1), resized_masks
