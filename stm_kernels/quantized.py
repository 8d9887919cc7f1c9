"""An 8-bit memory: keys and values stored as int8 or float8 (e4m3) with float32 scales, read
without ever widening the whole memory.

    from stm_kernels import QuantizedMemory, memory_read
    keys = QuantizedMemory.quantize(memory_key, "int8", axis="channel")     # KIVI: keys per channel
    values = QuantizedMemory.quantize(memory_value, "fp8", axis="position")  # values per position
    out = memory_read(query_key, keys, values)           # inference only; out in query's dtype

The format: `data` (B, C, *M) int8 or torch.float8_e4m3fn and `scale` float32 of one of three
layouts (its `axis`):

    "channel"        (B, C, 1, ..., 1)     one per channel over the whole memory
    "position"       (B, 1, *M)            one per memory position
    "channel_frame"  (B, C, T, 1, ..., 1)  one per channel and frame, for data (B, C, T, *P)
                                           with at least one dimension P after the frames

A frame of "channel_frame" is one index along the first memory dimension: prod(P) consecutive
positions of the flattened memory (a flat memory (B, C, N) of frames of g positions is
data.view(B, C, N // g, g)). It is what a memory bank quantising each frame as it is added
holds (keys per channel per frame: KIVI's most accurate key format, docs/op.md), read as one
memory. The memory it stands for is `data * scale` (`dequantize()`), symmetric (no zero
point). `quantize` takes each scale from the absolute maximum over what it covers: |x| / scale
reaches 127 (int8) or 448 (e4m3's largest finite value), so no element is clipped.

`read` is memory_read for a memory of which at least one of memory_key and memory_value (or
one of their chunks) is a QuantizedMemory; memory_read hands such calls to it. The "torch"
backend dequantises one bounded chunk of the memory at a time (backends/pytorch.py reads it
through `DequantizingMemory.columns`), "naive" dequantises the whole memory (it materialises
the affinity anyway), and "triton" reads it with the fused 8-bit kernel
(backends/triton/kernels/forward.py: memory_read_fwd_kernel_8bit), which loads the 8-bit tiles
and applies the scales in registers. "auto" takes "triton" where memory_read's "auto" would for
the query's dtype and device (CUDA) and the kernel takes the call, else "torch". The fused
kernel takes one QuantizedMemory (or tensor) per argument, or chunks it can join without
widening them (tensors; QuantizedMemory chunks of one format with scales per position; or
with scales per channel or per channel and frame whose frames all hold as many positions, a
chunk with scales per channel being one frame), keys with any of the three scale layouts and
values with scales per channel or per position; not a top-k read nor usage (the selection
and usage kernels read 16- and 32-bit keys).
"""
from typing import Optional, Sequence, Union

import torch
from torch.autograd import forward_ad

from . import inputs
from .options import BACKENDS, Backend, Similarity
from .torch_common import accumulation_dtype

# format name -> (storage dtype, the largest magnitude a scaled element may take)
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
_FORMAT_OF = {dtype: name for name, (dtype, _) in FORMATS.items()}
AXES = ("channel", "position", "channel_frame")


class QuantizedMemory:
    """A memory key or value tensor (B, C, *M) stored in 8 bits: data * scale.

    Args:
        data: (B, C, *M) int8 or torch.float8_e4m3fn; *M the memory positions (N, or T, H, W).
        scale: float32 on data's device with as many dimensions as data: (B, C, 1, ..., 1)
            (one scale per channel: axis "channel"), (B, 1, *M) (one per memory position:
            axis "position") or, for data (B, C, T, *P), (B, C, T, 1, ..., 1) (one per channel
            and frame, a frame being the prod(P) positions of one index along T: axis
            "channel_frame"; with T = 1 it is the axis "channel"). Its values are not checked
            (no device read): a scale that is not finite makes the read's output not
            finite.

    Inference only: a read of a QuantizedMemory refuses gradients in one line.
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor) -> None:
        if not isinstance(data, torch.Tensor) or data.dtype not in _FORMAT_OF:
            got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
            raise TypeError(f"QuantizedMemory data must be an int8 or float8_e4m3fn tensor "
                            f"(B, C, *positions); got {got}")
        if data.dim() < 3 or data.numel() == 0:
            raise ValueError(f"QuantizedMemory data must have shape (B, C, *positions) with "
                             f"every dimension at least 1; got shape {tuple(data.shape)}")
        B, C, positions = data.shape[0], data.shape[1], tuple(data.shape[2:])
        expected = (f"(B={B}, C={C}, {', '.join(['1'] * len(positions))}) per channel, "
                    f"(B={B}, 1, {', '.join(map(str, positions))}) per position")
        frame = (B, C, positions[0]) + (1,) * (len(positions) - 1)
        if len(positions) > 1:
            expected += f" or {frame} per channel and frame"
        else:
            expected = expected.replace(", (B", " or (B")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise TypeError(f"QuantizedMemory scale must be a float32 tensor {expected}; got "
                            f"{got}")
        shape = tuple(scale.shape)
        if shape == (B, C) + (1,) * len(positions):
            axis = "channel"
        elif shape == (B, 1) + positions:
            axis = "position"
        elif len(positions) > 1 and shape == frame:
            axis = "channel_frame"
        else:
            raise ValueError(f"QuantizedMemory scale must have shape {expected}; got shape "
                             f"{shape}")
        if scale.device != data.device:
            raise ValueError(f"QuantizedMemory data and scale must be on one device; got "
                             f"{data.device} and {scale.device}")
        self.data, self.scale, self.axis = data, scale, axis

    @classmethod
    def quantize(cls, memory: torch.Tensor, dtype: Union[str, torch.dtype] = "int8",
                 axis: str = "channel") -> "QuantizedMemory":
        """memory (B, C, *M), floating point, as a QuantizedMemory of `dtype` ("int8" or "fp8",
        or torch.int8 / torch.float8_e4m3fn) with symmetric absmax scales along `axis`
        ("channel": one scale per (object, channel) over the positions; "position": one per
        (object, position) over the channels; "channel_frame": one per (object, channel,
        frame) over the frame's positions, for memory (B, C, T, *P) of at least 4
        dimensions). Elementwise error: at most scale / 2 for int8;
        for fp8 at most 2^-4 of the element (e4m3 keeps 3 bits), or 2^-10 scale below
        e4m3's smallest normal. A memory with a non-finite element is a ValueError (one
        device read: the scales' check)."""
        name = _FORMAT_OF.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        if name not in FORMATS:
            raise ValueError(f"dtype must be 'int8' or 'fp8' (torch.int8 or "
                             f"torch.float8_e4m3fn); got {dtype!r}")
        if axis not in AXES:
            raise ValueError(f"axis must be 'channel', 'position' or 'channel_frame'; got "
                             f"{axis!r}")
        if not isinstance(memory, torch.Tensor) or not memory.is_floating_point() or \
                memory.dim() < 3 or memory.numel() == 0:
            got = (f"{memory.dtype} of shape {tuple(memory.shape)}"
                   if isinstance(memory, torch.Tensor) else type(memory).__name__)
            raise ValueError(f"memory must be a non-empty floating-point tensor (B, C, "
                             f"*positions); got {got}")
        if axis == "channel_frame" and memory.dim() < 4:
            raise ValueError(f"memory must have shape (B, C, frames, *positions per frame) for "
                             f"axis 'channel_frame'; got shape {tuple(memory.shape)}")
        storage, largest = FORMATS[name]
        compute = torch.float64 if memory.dtype == torch.float64 else torch.float32
        x = memory.to(compute)
        # the dimensions each scale spans: the channels, or every position (of a frame)
        over = (1,) if axis == "position" else \
            tuple(range(3 if axis == "channel_frame" else 2, memory.dim()))
        absmax = x.abs().amax(dim=over, keepdim=True)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("memory must be finite to be quantised; it holds inf or NaN")
        scale = (absmax / largest).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
        scaled = x / scale.to(compute)
        if name == "int8":
            data = scaled.round_().clamp_(-largest, largest).to(storage)
        else:
            data = scaled.clamp_(-largest, largest).to(storage)
        return cls(data, scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The memory data * scale as a (B, C, *M) tensor of dtype: computed in float32 and
        rounded once to dtype (in float64 for float64), as the read dequantises its chunks."""
        return _dequantized(self.data, self.scale, dtype)

    @property
    def format(self) -> str:
        """"int8" or "fp8"."""
        return _FORMAT_OF[self.data.dtype]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of data and scales."""
        return self.data.nbytes + self.scale.nbytes

    def __repr__(self) -> str:
        return (f"QuantizedMemory({self.format}, shape={tuple(self.shape)}, scale per "
                f"{self.axis}, device={self.device})")


def _dequantized(data, scale, dtype, scratch=None):
    """data * scale in dtype: in float32 rounded once to dtype (exact in float64). scratch: an
    optional float32 tensor of data's shape the float32 product is made in (and returned, for
    dtype float32), so that a chunk read again and again allocates nothing."""
    wide = _widened(data, scratch)
    if dtype == torch.float64:
        return wide.to(torch.float64) * scale.to(torch.float64)
    product = wide.mul_(scale) if _broadcasts_into(scale.shape, wide.shape) else wide * scale
    return product if dtype == torch.float32 else product.to(dtype)


def _broadcasts_into(shape, target):
    """Whether a tensor of `shape` broadcasts to `target` without growing it (so an in-place
    product keeps target's shape): torch.broadcast_shapes's answer, at a tenth of its cost."""
    if len(shape) > len(target):
        return False
    return all(size in (1, goal) for size, goal in zip(shape, target[len(target) - len(shape):],
                                                        strict=True))


def _widened(data, scratch=None):
    """8-bit codes as float32: in scratch (a float32 tensor of data's shape) where given."""
    if data.dtype == torch.float8_e4m3fn:
        return _fp8_as_float32(data, scratch)
    return data.to(torch.float32) if scratch is None else scratch.copy_(data)


def _dequantized_columns(part, scale, group, low, high, dtype, scratch=None):
    """Columns [low, high) of a flattened 8-bit chunk, dequantised to dtype as _dequantized:
    part (..., C, high - low) their codes, scale (..., C or 1, G) the chunk's, each covering
    `group` consecutive columns (1: per position; G = 1: per channel). Scales per channel and
    frame multiply the widened columns in place, a partial first frame, the whole frames (one
    broadcast product) and a partial last frame, so the slice is widened once, no wider.
    scratch: as _dequantized's."""
    if group == 1:
        return _dequantized(part, scale[..., low:high], dtype, scratch)
    first, last = low // group, (high - 1) // group
    if first == last:
        return _dequantized(part, scale[..., first:first + 1], dtype, scratch)
    wide = _widened(part, scratch)
    if dtype == torch.float64:
        wide, scale = wide.to(torch.float64), scale.to(torch.float64)
    whole_from = min(high, -(-low // group) * group)  # the first frame boundary at or past low
    whole_to = max(whole_from, high // group * group)
    if whole_from > low:
        wide[..., :whole_from - low].mul_(scale[..., first:first + 1])
    frames = (whole_to - whole_from) // group
    if frames:
        wide[..., whole_from - low:whole_to - low].unflatten(-1, (frames, group)).mul_(
            scale[..., whole_from // group:whole_to // group, None])
    if whole_to < high:
        wide[..., whole_to - low:].mul_(scale[..., last:last + 1])
    return wide if dtype in (torch.float32, torch.float64) else wide.to(dtype)


# An e4m3fn code's sign, exponent and mantissa bits where float16 keeps them (the int8 code,
# sign-extended to int16 and shifted left 7): 0xBF80 as a signed int16.
_FLOAT16_FIELDS = -0x4080


def _fp8_as_float32(data, out=None):
    """float8_e4m3fn data as float32, exactly as data.to(torch.float32) (NaN codes included),
    through integer operations: torch's CPU conversion is elementwise scalar code, about 8x
    slower on a (512, 1024) chunk. The code's bits shifted into a float16's fields read as
    2^-8 times the value (subnormal codes as float16 subnormals), widened to float32 and
    scaled by 2^8. float16's widening reads its subnormals exactly whether or not the thread
    flushes denormals (a float32 route would pass subnormal codes through denormal float32s,
    which a flushing thread, such as the bf16 CPU reader's, reads as zero). out: an optional
    float32 tensor of data's shape to make them in. On the CPU the NaN codes are looked for
    first (two reductions over the codes, a fortieth of the masked fill's cost) and filled
    only where present; elsewhere they are filled unconditionally (no host read)."""
    codes = data.view(torch.int8)
    bits = codes.to(torch.int16).mul_(1 << 7).bitwise_and_(_FLOAT16_FIELDS)
    halves = bits.view(torch.float16)
    values = (halves.to(torch.float32) if out is None else out.copy_(halves)).mul_(2.0 ** 8)
    if codes.device.type == "cpu" and not _holds_nan_codes(codes):
        return values
    return values.masked_fill_((codes | -128) == -1, float("nan"))  # the code 0x7F / 0xFF


def _holds_nan_codes(codes):
    """Whether int8-viewed e4m3fn codes hold a NaN code: 0x7F (int8 127, the largest int8) or
    0xFF (uint8 255, the largest uint8)."""
    return codes.numel() > 0 and (int(codes.amax()) == 0x7F or
                                  int(codes.view(torch.uint8).amax()) == 0xFF)


def is_quantized(memory) -> bool:
    """Whether a memory argument (a tensor, a QuantizedMemory, or a list of chunks) holds a
    QuantizedMemory."""
    if isinstance(memory, QuantizedMemory):
        return True
    return isinstance(memory, (list, tuple)) and any(isinstance(c, QuantizedMemory)
                                                     for c in memory)


class DequantizingMemory:
    """The flattened memory (B, C, N) the torch backend reads from a list of chunks (each a
    QuantizedMemory or a floating-point tensor, concatenated along N), dequantised a slice at
    a time by `columns`: it stands where the backend takes a tensor k or v, with the
    attributes it reads (shape, device, requires_grad; dtype is the read's, the query's)."""

    requires_grad = False

    def __init__(self, chunks, dtype):
        # (first position, data (B, C, n), scale (B, C or 1, G) or None, positions per scale
        # column: n // G)
        self.chunks = []
        first = 0
        for chunk in chunks:
            if isinstance(chunk, QuantizedMemory):
                data, scale = chunk.data.flatten(2), chunk.scale.flatten(2)
                group = data.shape[2] // scale.shape[2]
            else:
                data, scale, group = chunk.flatten(2), None, None
            self.chunks.append((first, data, scale, group))
            first += data.shape[2]
        B, C = self.chunks[0][1].shape[:2]
        self.shape = torch.Size((B, C, first))
        self.device = self.chunks[0][1].device
        self.dtype = dtype
        self.is_cuda = self.device.type == "cuda"

    def columns(self, index, start, stop, dtype, out=None, scratch=None,
                channels=slice(None)):
        """memory[index, channels, start:stop] dequantised to dtype (index: an int, a slice
        or a tensor of rows, as tensor indexing takes it): only that slice is widened. out: a
        tensor of the slice's shape (and dtype) to write it into; scratch: a float32 one the
        8-bit parts are widened in, so that a reader taking chunk after chunk allocates
        nothing."""
        pieces = []
        for first, data, scale, group in self.chunks:
            low, high = max(start, first), min(stop, first + data.shape[2])
            if low >= high:
                continue
            part = data[index, channels, low - first:high - first]
            if scale is None:
                pieces.append(part.to(dtype))
            else:
                span = scratch if scratch is None or (low, high) == (start, stop) else \
                    scratch[..., low - start:high - start]
                # into out: the float32 product (scratch), rounded once when copied
                wide = dtype if out is None or dtype == torch.float64 else torch.float32
                rows = scale[index]
                if rows.shape[-2] > 1:  # a scale per channel: the channels' own
                    rows = rows[..., channels, :]
                pieces.append(_dequantized_columns(part, rows, group, low - first,
                                                   high - first, wide, span))
        if out is not None and len(pieces) == 1:
            return out.copy_(pieces[0])
        if out is not None:
            offset = 0
            for piece in pieces:
                out[..., offset:offset + piece.shape[-1]].copy_(piece)
                offset += piece.shape[-1]
            return out
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)

    def whole(self, dtype):
        """The whole memory dequantised to dtype (the naive backend's)."""
        return self.columns(slice(None), 0, self.shape[2], dtype)


def read(query_key: torch.Tensor, memory_key, memory_value, *, scale: Optional[float] = None,
         similarity: Similarity = "dot", backend: Backend = "auto", return_lse: bool = False,
         memory_lengths=None, top_k: Optional[int] = None, return_usage: bool = False,
         shrinkage=None, selection=None):
    """memory_read for a memory with 8-bit parts (its arguments and results; see the module
    docstring). The read runs in query_key's dtype: a floating-point memory part (a tensor
    chunk) must share it, out comes back in it, lse in float32 (float64 for float64)."""
    query_key, memory_key, memory_value = inputs.autocast_inputs(query_key, memory_key,
                                                                 memory_value)
    if shrinkage is not None or selection is not None or similarity == "xmem":
        raise ValueError("similarity='xmem' (shrinkage, selection) does not read an 8-bit "
                         "memory; use 'dot' or 'l2'")
    similarity = inputs.checked_similarity(similarity)
    q, keys, values, query_spatial = _checked(query_key, memory_key, memory_value)
    _refuse_gradients(q, keys, values)
    dtype = q.dtype
    k, v = DequantizingMemory(keys, dtype), DequantizingMemory(values, dtype)
    scale = inputs.checked_scale(scale, q.shape[1], accumulation_dtype(dtype))
    l2 = similarity == "l2"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    fused = _fused_memory(backend, q, keys, values, top_k, return_usage)
    backend = "torch" if backend == "auto" else backend
    lengths = inputs.checked_lengths(memory_lengths, [k])
    top_k = inputs.checked_top_k(top_k, backend, k.shape[2])
    with torch.no_grad():
        if backend == "naive":
            from .memory_read import memory_read
            naive = memory_read(q, k.whole(dtype), v.whole(dtype), scale=scale,
                                similarity=similarity, backend="naive", return_lse=True,
                                memory_lengths=lengths, top_k=top_k, return_usage=return_usage)
            out, lse = naive[0], naive[1]
            usage = naive[2] if return_usage else None
        elif fused is not None:
            from .backends import pytorch
            from .backends.triton import quantized_forward
            (k_data, k_scale, k_axis), (v_data, v_scale, v_axis) = fused
            out, lse = quantized_forward(
                q, k_data, k_scale, k_axis, v_data, v_scale, v_axis, scale, l2, lengths,
                reference=lambda: pytorch.forward(q, k, v, scale, l2, lengths))
            usage = None
        elif top_k is not None:
            out, lse, usage = _topk_read(q, k, v, top_k, scale, l2, lengths, return_usage)
        else:
            from .backends import pytorch
            out, lse = pytorch.forward(q, k, v, scale, l2, lengths)
            usage = pytorch.usage(q, k, lse, scale, l2, lengths) if return_usage else None
    results: list = [out if len(query_spatial) == 1 else out.unflatten(2, query_spatial)]
    if return_lse:
        results.append(lse if len(query_spatial) == 1 else lse.unflatten(1, query_spatial))
    if return_usage:
        results.append(usage)
    return results[0] if len(results) == 1 else tuple(results)


def _fused_memory(backend, q, keys, values, top_k, return_usage):
    """((k, k_scale, k_axis), (v, v_scale, v_axis)) for the fused 8-bit kernel, or None where
    the read goes to the torch or naive backend. "triton": a ValueError in one line for what
    the kernel does not read (checked before the device); "auto": the kernel where
    memory_read's "auto" would take "triton" for the query (backends.resolve: its dtype,
    CUDA) and the kernel reads the call."""
    from . import backends
    if backend not in ("triton", "auto"):
        return None
    why = None
    if top_k is not None:
        why = ("has no top-k read of an 8-bit memory (the selection kernel reads 16- and "
               "32-bit keys)")
    elif return_usage:
        why = "has no usage of an 8-bit memory (the usage kernel reads 16- and 32-bit keys)"
    if why is None and backend == "auto" and backends.resolve(backend, q) != "triton":
        return None  # off CUDA, or a dtype the kernels do not take
    memory = None
    if why is None:
        memory = (_joined(keys), _joined(values))
        if None in memory:
            why = ("reads an 8-bit memory as one QuantizedMemory per argument, or chunks of "
                   "one format with scales per position, or per channel (and frame) over "
                   "frames of one size (chunks with channel scales over frames of different "
                   "sizes cannot be joined)")
        elif memory[1][2] == "channel_frame":
            why = "reads values with scales per channel or per position, not per frame"
    if why is not None:
        if backend == "triton":
            raise ValueError(f"backend='triton' {why}; use backend='torch'")
        return None
    if backend == "triton" and backends.resolve(backend, q) != "triton":
        return None  # no triton package: resolve warned, the torch backend reads
    return memory


def _joined(chunks):
    """(data (B, C, N), scale (B, C or 1, G) or None, axis or None) of a memory argument's
    chunks as one, joined along N without widening them, or None where they cannot be:
    tensors; QuantizedMemory chunks of one format with scales per position; or with scales
    per channel (one frame each) or per channel and frame, every frame of as many positions
    (then axis "channel_frame", the scale (B, C, frames))."""
    if all(isinstance(chunk, torch.Tensor) for chunk in chunks):
        data = [chunk.flatten(2) for chunk in chunks]
        return (data[0] if len(data) == 1 else torch.cat(data, 2)), None, None
    if len(chunks) == 1:
        chunk = chunks[0]
        return chunk.data.flatten(2), chunk.scale.flatten(2), chunk.axis
    if any(not isinstance(chunk, QuantizedMemory) or
           chunk.data.dtype != chunks[0].data.dtype for chunk in chunks):
        return None
    scales = [chunk.scale.flatten(2) for chunk in chunks]
    if all(chunk.axis == "position" for chunk in chunks):
        axis = "position"
    else:
        groups = {chunk.data[0, 0].numel() // scale.shape[2]
                  for chunk, scale in zip(chunks, scales, strict=True)}
        if len(groups) != 1 or any(chunk.axis == "position" for chunk in chunks):
            return None
        axis = "channel_frame"
    return torch.cat([chunk.data.flatten(2) for chunk in chunks], 2), torch.cat(scales, 2), axis


def _topk_read(q, k, v, top_k, scale, l2, lengths, return_usage):
    """(out, lse, usage or None) of the top-k read: the torch backend's streaming selection,
    then the softmax over each query's picks, the picked keys and values dequantised for a
    bounded block of query positions at a time (topk.selected_read on them)."""
    from . import topk, torch_common
    from .backends import pytorch
    _, indices = pytorch.select(q, k, top_k, scale, l2, lengths)  # (B, HW, top_k)
    B, HW = indices.shape[:2]
    acc_dtype = accumulation_dtype(q.dtype)
    step = max(1, torch_common.CHUNK_ELEMENTS // (B * top_k * (k.shape[1] + v.shape[1])))
    outs, lses, probabilities = [], [], []
    for start in range(0, HW, step):
        part = indices[:, start:start + step]  # (B, h, top_k)
        h = part.shape[1]
        flat = part.clamp_min(0).reshape(B, h * top_k)
        k_sel, v_sel = _gathered(k, flat, acc_dtype), _gathered(v, flat, acc_dtype)
        # the picks laid out as a memory of h * top_k positions, each query reading its own
        local = torch.arange(h * top_k, device=part.device).view(1, h, top_k).expand(B, -1, -1)
        out, lse, p = topk.selected_read(q[:, :, start:start + step].to(acc_dtype), k_sel,
                                         v_sel, torch.where(part < 0, -1, local), scale, l2)
        outs.append(out)
        lses.append(lse)
        probabilities.append(p)
    out = torch.cat(outs, 2).to(q.dtype)
    lse = torch.cat(lses, 1).to(acc_dtype)
    usage = None
    if return_usage:
        usage = topk.usage_of_selection(indices, torch.cat(probabilities, 1), k.shape[2])
    return out, lse, usage


def _gathered(memory, flat, dtype):
    """memory (B, C, N) at positions flat (B, n), dequantised: (B, C, n) in dtype."""
    pieces = []
    for first, data, scale, group in memory.chunks:
        n = data.shape[2]
        inside = (flat >= first) & (flat < first + n)
        local = (flat - first).clamp(0, n - 1).unsqueeze(1)  # (B, 1, n)
        # through int8 bits: torch's CPU gather has no float8
        bits = data.view(torch.int8) if data.dtype == torch.float8_e4m3fn else data
        picked = torch.gather(bits, 2, local.expand(-1, data.shape[1], -1)).view(data.dtype)
        if scale is None:
            values = picked.to(dtype)
        else:
            picked_scale = scale if scale.shape[2] == 1 else torch.gather(
                scale, 2, (local // group).expand(-1, scale.shape[1], -1))
            values = _dequantized(picked, picked_scale, dtype)
        pieces.append(torch.where(inside.unsqueeze(1), values, 0))
    return pieces[0] if len(pieces) == 1 else sum(pieces[1:], pieces[0])


def _refuse_gradients(q, keys, values):
    """RuntimeError in one line when a gradient or a torch.func transform would go through
    the read: an 8-bit memory is for inference."""
    tensors = [q] + [t for t in (*keys, *values) if isinstance(t, torch.Tensor)]
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or \
            forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        raise RuntimeError("memory_read of an 8-bit memory (QuantizedMemory) is inference "
                           "only: no gradients or torch.func transforms (run it under "
                           "torch.no_grad() or detach query_key)")


def _checked(query_key, memory_key, memory_value):
    """(q (Bq, Ck, HW), key chunks, value chunks, the query's spatial shape): each chunk a
    QuantizedMemory or a tensor; errors name the argument."""
    inputs.check_tensor("query_key", query_key)
    if query_key.dim() not in (3, 4):
        raise ValueError("query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W); "
                         f"got shape {tuple(query_key.shape)}")
    keys, values = _chunks("memory_key", memory_key), _chunks("memory_value", memory_value)
    if len(keys) != len(values):
        raise ValueError(f"memory_key and memory_value must hold as many chunks; got "
                         f"{len(keys)} and {len(values)}")
    first_name, first = keys[0]
    B, Ck = first.shape[:2]
    Cv = values[0][1].shape[1]
    floating = [("query_key", query_key)]
    for (key_name, key), (value_name, value) in zip(keys, values, strict=True):
        if key.shape[:2] != (B, Ck):
            raise ValueError(f"{key_name} must have shape (B={B}, Ck={Ck}, *positions); got "
                             f"shape {tuple(key.shape)}")
        if value.shape[0] != B or value.shape[1] != Cv or value.shape[2:] != key.shape[2:]:
            raise ValueError(f"{value_name} must have shape (B={B}, Cv, "
                             f"{', '.join(map(str, key.shape[2:]))}) to match {key_name} "
                             f"{tuple(key.shape)}; got shape {tuple(value.shape)}")
        if not query_key.device == key.device == value.device:
            raise ValueError(f"query_key, {key_name} and {value_name} must be on one device; "
                             f"got {query_key.device}, {key.device} and {value.device}")
        floating += [(name, t) for name, t in ((key_name, key), (value_name, value))
                     if isinstance(t, torch.Tensor)]
    if query_key.shape[0] not in (1, B) or query_key.shape[1] != Ck:
        raise ValueError(f"query_key must have shape (B={B} or 1, Ck={Ck}, ...) to match "
                         f"{first_name} {tuple(first.shape)}; got shape "
                         f"{tuple(query_key.shape)}")
    inputs.check_one_dtype(floating)
    q = query_key if query_key.dim() == 3 else query_key.flatten(2)
    return (q, [chunk for _, chunk in keys], [chunk for _, chunk in values],
            tuple(query_key.shape[2:]))


def _chunks(name, memory) -> Sequence:
    """[(name, chunk)] of a memory argument: each chunk a QuantizedMemory or a non-empty
    floating-point tensor of at least 3 dimensions."""
    named = inputs.as_chunks(name, memory) if not isinstance(memory, QuantizedMemory) \
        else [(name, memory)]
    for chunk_name, chunk in named:
        if isinstance(chunk, QuantizedMemory):
            continue
        inputs.check_tensor(chunk_name, chunk)
        if chunk.dim() < 3:
            raise ValueError(f"{chunk_name} must have shape (B, C, *positions); got shape "
                             f"{tuple(chunk.shape)}")
    return named
