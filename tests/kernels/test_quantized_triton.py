"""The fused Triton read of an 8-bit memory (memory_read_fwd_kernel_8bit) against the float64
read of the dequantised memory written in plain torch (reference.reference_read), outputs
poisoned with NaN. On the CPU these run in Triton's interpreter (TRITON_INTERPRET=1), whose
single forward tiling (32 x 32) leaves ragged blocks at HW = 37 and N = 150."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICES, TOLERANCE, relative_error, skip_unless_runnable
from reference import reference_read
from stm_kernels import FallbackWarning, QuantizedMemory, memory_read, poison_outputs
from stm_kernels import quantized
from stm_kernels.backends.triton import forward_launcher, kept_launches, launch
from stm_kernels.backends.triton.launch import ForwardConfig, use_configs

FORMATS = ("int8", "fp8")
AXES = ("channel", "position")


@pytest.fixture(autouse=True)
def _poisoned():
    with poison_outputs():
        yield


def inputs(device, dtype=torch.float32, B=2, Bq=1, Ck=24, Cv=40, HW=37, N=150, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    # keys and values whose channels and positions differ in scale, so that the axes matter
    k = torch.randn(B, Ck, N, generator=generator, dtype=torch.float64) * \
        torch.rand(B, Ck, 1, generator=generator, dtype=torch.float64).add(0.1)
    v = torch.randn(B, Cv, N, generator=generator, dtype=torch.float64) * \
        torch.rand(B, 1, N, generator=generator, dtype=torch.float64).mul(4).add(0.1)
    return q.to(device, dtype), k.to(device), v.to(device)


def fused_read(*args, **kwargs):
    """memory_read(..., backend="triton"), failing on a fallback to the torch backend."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        return memory_read(*args, backend="triton", **kwargs)


def expected(q, keys, values, **options):
    """(out, lse) of the float64 read of the dequantised memory (a QuantizedMemory or a
    tensor each)."""
    def wide(memory):
        return memory.dequantize(torch.float64) if isinstance(memory, QuantizedMemory) \
            else memory
    out, lse, _ = reference_read(q, wide(keys), wide(values), **options)
    return out, lse


def check(result, reference, dtype):
    out, lse = result
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out.flatten(2), reference[0]) < TOLERANCE[dtype]
    assert relative_error(lse.flatten(1), reference[1]) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("value_axis", AXES)
@pytest.mark.parametrize("key_axis", AXES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_read_matches_the_float64_read_of_the_dequantised_memory(
        device, fmt, key_axis, value_axis, similarity, plannings):
    skip_unless_runnable("triton", device)
    launch.forget_choices()  # planned in this test, whatever ran before it
    q, k, v = inputs(device)
    keys = QuantizedMemory.quantize(k, fmt, key_axis)
    values = QuantizedMemory.quantize(v, fmt, value_axis)
    result = fused_read(q, keys, values, similarity=similarity, return_lse=True)
    check(result, expected(q, keys, values, similarity=similarity), torch.float32)
    assert plannings["forward"] == 1  # the fused kernel read it, no torch fallback


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_8bit_read_in_16_bit(device, fmt, dtype):
    """A 16-bit query: the 8-bit tiles convert exactly to its dtype, the scales fold into
    the 16-bit query tile (keys per channel) and p (values per position). bf16 runs in the
    interpreter through its fp32 dot (UPCAST)."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, dtype, seed=1)
    for key_axis, value_axis in (("channel", "position"), ("position", "channel")):
        keys = QuantizedMemory.quantize(k, fmt, key_axis)
        values = QuantizedMemory.quantize(v, fmt, value_axis)
        result = fused_read(q, keys, values, return_lse=True)
        check(result, expected(q, keys, values), dtype)


def all_e4m3_codes(B, C, N, device):
    """float8_e4m3fn data holding every finite code (subnormals, zero, +-448) in turn."""
    codes = torch.arange(256, dtype=torch.int32)
    finite = codes[(codes & 0x7F) != 0x7F].to(torch.uint8).view(torch.int8)
    data = finite.repeat(B * C * N // finite.numel() + 1)[:B * C * N]
    return data.view(B, C, N).view(torch.float8_e4m3fn).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decode", [False, True], ids=["fp8 loads", "int8 bits decoded"])
def test_fp8_loads_every_finite_e4m3_code(device, decode, monkeypatch):
    """fp8 loads and conversions (the interpreter's, or a GPU's from sm_89) and the integer
    decoding of e4m3 codes passed as int8 (GPUs before sm_89) against torch's, for every
    finite code, with scales per channel (keys) and per position (values)."""
    skip_unless_runnable("triton", device)
    if device == "cuda" and not decode and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton has no e4m3 type before sm_89")
    launch.forget_choices()  # the kept launches of the layout decode as their device does
    monkeypatch.setattr(forward_launcher, "_decodes_fp8", lambda _: decode)
    monkeypatch.setattr(kept_launches, "_keeping_launches", False)
    q, _, _ = inputs(device, Ck=16, seed=2)
    key_data, value_data = all_e4m3_codes(2, 16, 150, device), all_e4m3_codes(2, 40, 150, device)
    keys = QuantizedMemory(key_data, torch.full((2, 16, 1), 1 / 448, device=device))
    values = QuantizedMemory(value_data.roll(7, 2),
                             torch.rand(2, 1, 150, device=device).add(0.5) / 448)
    result = fused_read(q, keys, values, return_lse=True)
    check(result, expected(q, keys, values), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ragged_memories_by_lengths(device, fmt):
    """memory_lengths: each object reads its first lengths[b] positions (one shorter than a
    tile, one ending inside one), also split over programs and merged."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, seed=3)
    keys = QuantizedMemory.quantize(k, fmt, "position")
    values = QuantizedMemory.quantize(v, fmt, "channel")
    lengths = torch.tensor([150, 21], device=device)
    reference = expected(q, keys, values, similarity="l2", lengths=lengths.cpu())
    check(fused_read(q, keys, values, similarity="l2", return_lse=True, memory_lengths=lengths),
          reference, torch.float32)
    with use_configs(ForwardConfig(block_m=16, block_n=16, block_v=16, num_warps=4,
                                   num_stages=1, splits=3)):
        check(fused_read(q, keys, values, similarity="l2", return_lse=True,
                         memory_lengths=lengths), reference, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_memory_and_query_any_spatial_shape(device):
    """8-bit data read through its strides (positions-major, every other position), scales
    as views, a strided 4-D query and a (B, C, T, HW) memory, a query per object."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, Bq=2, HW=36, N=300, seed=4)
    q = q.view(2, 24, 6, 6).transpose(2, 3)  # (B, Ck, H, W), not contiguous
    dense = QuantizedMemory.quantize(k, "int8", "channel")
    keys = QuantizedMemory(  # stride 1 along channels, 2 Ck along positions
        dense.data.transpose(1, 2).contiguous().transpose(1, 2)[:, :, ::2].unflatten(2, (3, 50)),
        dense.scale[..., None])
    wide = QuantizedMemory.quantize(v, "fp8", "position")
    values = QuantizedMemory(wide.data[:, :, ::2].unflatten(2, (3, 50)),
                             wide.scale[:, :, ::2].unflatten(2, (3, 50)))
    assert not keys.data.is_contiguous() and not values.data.is_contiguous()
    out, lse = fused_read(q, keys, values, return_lse=True)
    assert out.shape == (2, 40, 6, 6)
    check((out, lse), expected(q, keys, values), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_one_8bit_part_beside_a_float_one(device):
    """Float keys with 8-bit values, and 8-bit keys with float values."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, seed=5)
    k, v = k.float(), v.float()
    for keys, values in ((k, QuantizedMemory.quantize(v, "fp8", "position")),
                         (QuantizedMemory.quantize(k, "int8", "position"), v)):
        check(fused_read(q, keys, values, similarity="l2", return_lse=True),
              expected(q, keys, values, similarity="l2"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_of_one_format_with_position_scales_are_joined(device):
    """Per-position chunks join without widening (their codes and scales concatenated); chunks
    with channel scales of their own are refused in one line."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, seed=6)
    key_chunks = [QuantizedMemory.quantize(k[:, :, :100], "int8", "position"),
                  QuantizedMemory.quantize(k[:, :, 100:], "int8", "position")]
    value_chunks = [v[:, :, :100].float(), v[:, :, 100:].float()]
    check(fused_read(q, key_chunks, value_chunks, return_lse=True),
          expected(q, torch.cat([c.dequantize(torch.float64) for c in key_chunks], 2),
                   torch.cat(value_chunks, 2)), torch.float32)
    channel_chunks = [QuantizedMemory.quantize(k[:, :, :100], "int8", "channel"),
                      QuantizedMemory.quantize(k[:, :, 100:], "int8", "channel")]
    with pytest.raises(ValueError, match="frames of different sizes cannot be joined"):
        memory_read(q, channel_chunks, value_chunks, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_launch_reads_new_values(device, plannings):
    """A layout's second call runs its kept launch (no new planning) on the new memory."""
    skip_unless_runnable("triton", device)
    launch.forget_choices()
    for seed in (7, 8):
        q, k, v = inputs(device, seed=seed)
        keys = QuantizedMemory.quantize(k, "fp8", "channel")
        values = QuantizedMemory.quantize(v, "int8", "position")
        check(fused_read(q, keys, values, similarity="l2", return_lse=True),
              expected(q, keys, values, similarity="l2"), torch.float32)
    assert plannings["forward"] == 1


# ----------------------------------------------------------- keys per channel and frame


def framed(device, fmt, frame, frames=5, seed=12, value_axis="position", **sizes):
    """(q, keys, values): keys (B, Ck, frames, frame) quantised per channel and frame, whose
    frames differ in scale (each frame's scales matter), values per value_axis."""
    q, k, v = inputs(device, N=frames * frame, seed=seed, **sizes)
    k = k.unflatten(2, (frames, frame))
    k = k * torch.logspace(-1, 1, frames, dtype=k.dtype, device=device)[:, None]
    keys = QuantizedMemory.quantize(k, fmt, "channel_frame")
    values = QuantizedMemory.quantize(v.unflatten(2, (frames, frame)), fmt, value_axis)
    return q, keys, values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("frame", [20, 45], ids=["frames of 20", "frames of 45"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_keys_per_channel_and_frame(device, fmt, frame, similarity, plannings):
    """Keys with a scale per channel and frame (a memory bank's), one QuantizedMemory over 5
    frames: frames of 20 positions (fewer than the interpreter's 32-wide tile: a tile spans
    up to three frames) and of 45 (up to two), neither N (100, 225) nor a frame a multiple of
    the tile; values per position and per channel. Against the float64 read of the
    dequantised memory, and not the read with one scale per channel over the whole memory."""
    skip_unless_runnable("triton", device)
    launch.forget_choices()
    for value_axis in AXES:
        q, keys, values = framed(device, fmt, frame, value_axis=value_axis)
        result = fused_read(q, keys, values, similarity=similarity, return_lse=True)
        reference = expected(q, keys, values, similarity=similarity)
        check(result, reference, torch.float32)
        whole = QuantizedMemory.quantize(keys.dequantize().flatten(2), fmt, "channel")
        assert relative_error(result[0], expected(q, whole, values,
                                                  similarity=similarity)[0]) > 1e-4
    assert plannings["forward"] == 2  # the fused kernel read them, no torch fallback


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keys_per_channel_and_frame_in_16_bit(device, dtype):
    """A 16-bit query: the key tile dequantised in float32 and rounded once to its dtype
    (bf16 in the interpreter through its fp32 dot: UPCAST, as it converts int8 to bf16
    wrongly)."""
    skip_unless_runnable("triton", device)
    for fmt, frame in (("int8", 20), ("fp8", 45)):
        q, keys, values = framed(device, fmt, frame, seed=13)
        q = q.to(dtype)
        check(fused_read(q, keys, values, return_lse=True), expected(q, keys, values), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_keys_per_channel_and_frame_ragged_and_split(device, fmt):
    """memory_lengths ending inside a frame and inside a tile, the memory split over three
    programs (16-wide tiles: frames of 20 span two of them) and merged; a bank's storage
    view: 4 of 16 frames of (B, Ck, capacity, h*w) with scales (B, Ck, capacity, 1)."""
    skip_unless_runnable("triton", device)
    q, keys, values = framed(device, fmt, 20, frames=16, seed=14)
    lengths = torch.tensor([67, 23], device=device)
    view = (QuantizedMemory(keys.data[:, :, :4], keys.scale[:, :, :4]),
            QuantizedMemory(values.data[:, :, :4], values.scale[:, :, :4]))
    assert not view[0].data.is_contiguous()
    reference = expected(q, *view, similarity="l2", lengths=lengths.cpu())
    check(fused_read(q, *view, similarity="l2", return_lse=True, memory_lengths=lengths),
          reference, torch.float32)
    with use_configs(ForwardConfig(block_m=16, block_n=16, block_v=16, num_warps=4,
                                   num_stages=1, splits=3)):
        check(fused_read(q, *view, similarity="l2", return_lse=True, memory_lengths=lengths),
              reference, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_keys_per_channel_and_frame_as_e4m3_bits(device, monkeypatch):
    """fp8 keys per channel and frame decoded from int8 bits (GPUs before sm_89)."""
    skip_unless_runnable("triton", device)
    launch.forget_choices()
    monkeypatch.setattr(forward_launcher, "_decodes_fp8", lambda _: True)
    monkeypatch.setattr(kept_launches, "_keeping_launches", False)
    q, keys, values = framed(device, "fp8", 45, seed=15)
    check(fused_read(q, keys, values, return_lse=True), expected(q, keys, values),
          torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_per_frame_channel_chunks_join_as_keys_per_channel_and_frame(device):
    """One per-channel QuantizedMemory per frame (what the bank used to pass): joined as keys
    per channel and frame and read fused; values per channel and frame are refused by
    backend="triton" in one line and read by "auto" (the torch backend on a CPU)."""
    skip_unless_runnable("triton", device)
    q, keys, values = framed(device, "int8", 20, seed=16)
    key_chunks = [QuantizedMemory(keys.data[:, :, t], keys.scale[:, :, t]) for t in range(5)]
    value_chunks = [QuantizedMemory(values.data[:, :, t], values.scale[:, :, t])
                    for t in range(5)]
    assert {chunk.axis for chunk in key_chunks} == {"channel"}
    check(fused_read(q, key_chunks, value_chunks, return_lse=True), expected(q, keys, values),
          torch.float32)
    framed_values = QuantizedMemory.quantize(values.dequantize(), "int8", "channel_frame")
    with pytest.raises(ValueError) as raised:
        memory_read(q, keys, framed_values, backend="triton")
    assert "reads values with scales per channel or per position, not per frame" in \
        str(raised.value) and "\n" not in str(raised.value)
    out, lse = memory_read(q, keys, framed_values, return_lse=True)
    check((out, lse), expected(q, keys, framed_values), torch.float32)


class _LargestFloatOutput(TorchDispatchMode):
    """The most elements of a floating-point tensor any torch operation made in the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and \
                    tensor.element_size() > 1:
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("device", DEVICES)
def test_the_memory_is_never_widened_outside_the_kernel(device, monkeypatch):
    """No torch operation of the fused read makes a floating-point tensor as large as the
    8-bit keys or values (the torch backend widens one chunk at a time; this one none), keys
    per channel and frame included (the l2 term widened 64 positions at a time here)."""
    from stm_kernels.backends.triton import kernel_arguments
    monkeypatch.setattr(kernel_arguments, "TERM_POSITIONS", 64)
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, HW=16, Ck=32, Cv=64, seed=9)
    keys = QuantizedMemory.quantize(k, "int8", "channel")
    values = QuantizedMemory.quantize(v, "fp8", "position")
    with _LargestFloatOutput() as recorded:
        fused_read(q, keys, values)
    assert 0 < recorded.largest < k.numel()
    framed_keys = QuantizedMemory.quantize(k.unflatten(2, (6, 25)), "int8", "channel_frame")
    values = QuantizedMemory(values.data.unflatten(2, (6, 25)), values.scale.unflatten(2, (6, 25)))
    for similarity in ("dot", "l2"):  # l2: |k|^2 of one slice at a time
        with _LargestFloatOutput() as recorded:
            fused_read(q, framed_keys, values, similarity=similarity)
        assert 0 < recorded.largest < k.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_refusals_of_the_fused_8bit_read_in_one_line(device):
    """Gradients, top-k and usage: one-line errors naming why; "auto" reads such calls with
    torch. The read itself runs fused (the old code refused backend="triton")."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, seed=10)
    keys, values = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v, "fp8", "position")
    check(fused_read(q, keys, values, return_lse=True), expected(q, keys, values),
          torch.float32)
    for call, message in (
            (lambda: memory_read(q, keys, values, backend="triton", top_k=5),
             "backend='triton' has no top-k read of an 8-bit memory"),
            (lambda: memory_read(q, keys, values, backend="triton", return_usage=True),
             "backend='triton' has no usage of an 8-bit memory")):
        with pytest.raises(ValueError) as raised:
            call()
        assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(RuntimeError, match="inference only"):
        memory_read(q.clone().requires_grad_(), keys, values, backend="triton")
    out, _ = memory_read(q, keys, values, backend="auto", top_k=5, return_lse=True)
    assert torch.isfinite(out).all()


def test_auto_takes_the_fused_kernel_where_memory_read_would(monkeypatch):
    """"auto": the fused kernel where backends.resolve says "triton" for the query (CUDA),
    the torch backend for a top-k read, usage, or chunks that cannot be joined."""
    from stm_kernels import backends
    q, k, v = inputs("cpu", seed=11)
    keys, values = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v, "fp8", "position")
    asked = []
    monkeypatch.setattr(backends, "resolve", lambda backend, t: asked.append(t) or "triton")
    fused = quantized._fused_memory("auto", q, [keys], [values], None, False)
    assert asked[0] is q and fused[0][0].dtype == torch.int8 and fused[1][2] == "position"
    assert quantized._fused_memory("auto", q, [keys], [values], 5, False) is None
    assert quantized._fused_memory("auto", q, [keys], [values], None, True) is None
    # per-channel chunks of frames of one size join as scales per channel and frame
    joined = quantized._fused_memory("auto", q, [keys, keys], [values, values], None, False)
    assert joined[0][2] == "channel_frame" and joined[0][1].shape == (2, 24, 2)
    assert joined[1][2] == "position" and joined[1][0].shape == (2, 40, 300)
    shorter = (QuantizedMemory.quantize(k[:, :, :100]),
               QuantizedMemory.quantize(v[:, :, :100], "fp8", "position"))
    assert quantized._fused_memory("auto", q, [keys, shorter[0]], [values, shorter[1]], None,
                                   False) is None
    monkeypatch.setattr(backends, "resolve", lambda backend, t: "torch")
    assert quantized._fused_memory("auto", q, [keys], [values], None, False) is None
