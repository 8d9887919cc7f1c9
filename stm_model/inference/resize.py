"""Segmenting high-resolution video at a bounded internal size (VideoSegmenter's
max_internal_size, `stm segment --size`).

The network runs on the frame resized so that its shorter side is at most max_internal_size
(aspect ratio kept); the memory stores frames at that size, so memory per frame and the cost
of a step stop growing with the input resolution. The probabilities returned are upsampled
back to the input size (bilinear: still probabilities, they sum to one per pixel). A given
mask is merged at the input size and reaches the memory area-downsampled.
"""
import torch.nn.functional as F

# re-exported: declared without torch in options, for the ONNX runner and the CLI
from stm_model.inference.options import (MIN_INTERNAL_SIZE, checked_max_internal_size,  # noqa: F401
                                         internal_size)


def model_internal_size(model, max_internal_size):
    """The max_internal_size a session runs at: the caller's, else the model's own
    (STMConfig.internal_size, the size it was trained at; None: the frames' size)."""
    if max_internal_size is not None:
        return max_internal_size
    return getattr(getattr(model, "config", None), "internal_size", None)


def resize_frame(frame, size):
    """(3, H, W) frame -> (3, *size): bilinear with antialiasing (a 4K frame shrunk to 480p
    would alias without it)."""
    if tuple(frame.shape[-2:]) == tuple(size):
        return frame
    return F.interpolate(frame.unsqueeze(0), size=tuple(size), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def upsample_probs(probs, size):
    """(K, h, w) probabilities -> (K, *size), bilinear (a convex combination per pixel, so the
    channels still sum to one)."""
    return _interpolate(probs, size, dict(mode="bilinear", align_corners=False))


def downsample_probs(probs, size):
    """(K, H, W) probabilities -> (K, *size), averaged over each output pixel's area (a thin
    object keeps a partial probability instead of vanishing between samples)."""
    return _interpolate(probs, size, dict(mode="area"))


def _interpolate(x, size, options):
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[0] == 0:  # no objects yet: nothing to interpolate
        return x.new_zeros((0,) + size)
    return F.interpolate(x.unsqueeze(0), size=size, **options)[0]
