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
    with pytest.raises(ValueError, match="channel scales of their own cannot be joined"):
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
def test_the_memory_is_never_widened_outside_the_kernel(device):
    """No torch operation of the fused read makes a floating-point tensor as large as the
    8-bit keys or values (the torch backend widens one chunk at a time; this one none)."""
    skip_unless_runnable("triton", device)
    q, k, v = inputs(device, HW=16, Ck=32, Cv=64, seed=9)
    keys = QuantizedMemory.quantize(k, "int8", "channel")
    values = QuantizedMemory.quantize(v, "fp8", "position")
    with _LargestFloatOutput() as recorded:
        fused_read(q, keys, values)
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
    assert quantized._fused_memory("auto", q, [keys, keys], [values, values], None, False) \
        is None
    monkeypatch.setattr(backends, "resolve", lambda backend, t: "torch")
    assert quantized._fused_memory("auto", q, [keys], [values], None, False) is None
