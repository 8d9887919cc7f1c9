"""The array work around the graphs, in numpy and PIL, each the twin of the torch segmenter's:
padding to multiples of 16, resizing, the merge of a given mask, labels, and the exact merge of
chunk reads. Also the int8 quantisation of a memory frame, the torch bank's. No torch (the
internal size is inference.options.internal_size, torch-free)."""
import numpy as np
from PIL import Image


def pad_to_multiple(x, multiple=16):
    """Zero-pad the last two axes to multiples of `multiple`, centred (network.stm's
    pad_to_multiple); returns (padded, pad) with pad = (left, right, top, bottom)."""
    height, width = x.shape[-2:]
    extra_h, extra_w = -height % multiple, -width % multiple
    pad = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    if not any(pad):
        return x, pad
    widths = [(0, 0)] * (x.ndim - 2) + [(pad[2], pad[3]), (pad[0], pad[1])]
    return np.pad(x, widths), pad


def unpad(x, pad):
    """Crop what pad_to_multiple added."""
    left, right, top, bottom = pad
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


def resize_bilinear(x, size):
    """(C, H, W) float32 -> (C, *size), bilinear, antialiased when shrinking: PIL's filter,
    which torch's F.interpolate(..., antialias=True) reproduces (and plain bilinear when
    enlarging)."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[0] == 0:  # no objects yet: nothing to resize
        return np.zeros((0,) + size, np.float32)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channel, np.float32))
                                .resize((size[1], size[0]), Image.BILINEAR))
                     for channel in x]).reshape((x.shape[0],) + size)


def downsample_area(x, size):
    """(C, H, W) -> (C, *size), each output pixel the mean of its input area (torch's
    adaptive average pooling, mode="area")."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    for axis, (before, after) in zip((1, 2), zip(x.shape[1:], size, strict=True), strict=True):
        starts = (np.arange(after) * before) // after
        stops = -((-(np.arange(after) + 1) * before) // after)
        cumulative = np.concatenate([np.zeros_like(np.take(x, [0], axis)),
                                     np.cumsum(x, axis=axis, dtype=np.float64)], axis)
        sums = np.take(cumulative, stops, axis) - np.take(cumulative, starts, axis)
        shape = [1, 1, 1]
        shape[axis] = after
        x = (sums / (stops - starts).reshape(shape)).astype(np.float32)
    return x


def labels_of(probs, object_ids):
    """(H, W) int64 ids (0 = background) of the most probable channel (ties: the first)."""
    ids = np.array([0] + list(object_ids), dtype=np.int64)
    return ids[np.argmax(probs, axis=0)]


def object_ids(mask):
    """The object ids (> 0) of a mask, ascending."""
    return [int(i) for i in np.unique(mask) if i > 0]


def merge_mask(foreground, mask, known_ids, aggregate):
    """(probabilities (K, H, W), new ids) of a frame that came with a mask
    (inference.masks.merge_mask): ids not known become objects; given ids take the mask's
    pixels, the others lose them; every object given: the mask itself, else aggregate(...)
    (soft aggregation) of the merged foreground."""
    ids = object_ids(mask)
    new_ids = [i for i in ids if i not in known_ids]
    all_ids = list(known_ids) + new_ids
    foreground = np.concatenate([foreground, np.zeros((len(new_ids),) + foreground.shape[1:],
                                                      np.float32)])
    foreground = foreground * (1 - (mask > 0).astype(np.float32))
    for i in ids:
        foreground[all_ids.index(i)] = (mask == i)
    if set(ids) == set(all_ids):
        background = (mask == 0).astype(np.float32)[None]
        return np.concatenate([background, foreground]), new_ids
    return aggregate(foreground), new_ids


def merge_chunks(readout, lse, chunk_readout, chunk_lse):
    """The read over two sets of memory positions from each one's normalised read-out
    (n, Cv, HW) and log-sum-exp (n, HW): the softmax over their union (stm_kernels.merge_reads);
    readout None: the chunk's own."""
    if readout is None:
        return chunk_readout, chunk_lse
    merged = np.logaddexp(lse, chunk_lse)
    return (readout * np.exp(lse - merged)[:, None] +
            chunk_readout * np.exp(chunk_lse - merged)[:, None]), merged


INT8_LARGEST = 127.0  # the largest magnitude of an int8 memory element (symmetric, no -128)


def quantize_int8(memory, axis):
    """(data int8, scale float32) of a float32 memory array (n, C, P): symmetric absmax
    scales along axis ("channel": one per (object, channel), shape (n, C, 1); "position": one
    per (object, position), shape (n, 1, P)), memory ~ data * scale. Bit for bit
    stm_kernels.QuantizedMemory.quantize(memory, "int8", axis) (float32 arithmetic, rounding
    half to even, an all-zero row's scale 1), the torch bank's format. ValueError for a memory
    that is not finite."""
    memory = np.asarray(memory, np.float32)
    if axis not in ("channel", "position"):
        raise ValueError(f"axis must be 'channel' or 'position'; got {axis!r}")
    absmax = np.abs(memory).max(axis=1 if axis == "position" else 2, keepdims=True)
    if not np.isfinite(absmax).all():
        raise ValueError("memory must be finite to be quantised; it holds inf or NaN")
    scale = absmax / np.float32(INT8_LARGEST)
    scale = np.where(scale > 0, scale, np.float32(1))
    data = np.clip(np.rint(memory / scale), -INT8_LARGEST, INT8_LARGEST).astype(np.int8)
    return data, scale
