"""An 8-bit memory (stm_kernels.QuantizedMemory): the quantisation's round-trip bounds, and the
read of an int8 / fp8 memory against the float64 read of its dequantised memory written out in
plain torch (tests/reference.py), on the torch backend (batched chunks and CPU row blocks, the
bf16 products path) and the naive one: both scale axes for keys and values, ragged lengths,
top-k, usage, non-contiguous data, lists of chunks, NaN-poisoned outputs; one-line errors."""
import contextlib

import pytest
import torch

from helpers import TOLERANCE, relative_error
from reference import reference_read
from stm_kernels import QuantizedMemory, poison_outputs
from stm_kernels import memory_read as read
from stm_kernels.backends import pytorch
from stm_kernels.torch_common import denormals_flushed

FORMATS = ["int8", "fp8"]
AXES = ["channel", "position"]


def memories(B=2, Ck=12, Cv=20, HW=37, N=111, seed=0, Bq=1):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    k = torch.randn(B, Ck, N, generator=generator, dtype=torch.float64)
    # values with channels and positions of different magnitudes: the axes then differ
    v = torch.randn(B, Cv, N, generator=generator, dtype=torch.float64) * \
        torch.logspace(-1, 1, Cv, dtype=torch.float64)[:, None]
    return q.float(), k.float(), v.float()


def expected(q, kq, vq, dtype=torch.float32, **options):
    """(out, lse, usage) of the float64 read of the dequantised memory (plain torch)."""
    key = kq.dequantize(dtype) if isinstance(kq, QuantizedMemory) else kq
    value = vq.dequantize(dtype) if isinstance(vq, QuantizedMemory) else vq
    return reference_read(q, key, value, **options)


@pytest.fixture(params=["batched", "row blocks"])
def torch_path(request, monkeypatch):
    """The torch backend's two forwards: batched chunks, or CPU row blocks (forced on small
    reads, with small blocks and chunks so that every object takes several)."""
    if request.param == "row blocks":
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
        monkeypatch.setattr(pytorch, "ROW_BLOCK", 8)
        monkeypatch.setattr(pytorch, "CPU_CHUNK", 16)
    else:
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", float("inf"))
        monkeypatch.setattr(pytorch.torch_common, "CHUNK_ELEMENTS", 2 * 37 * 25)
    return request.param


@pytest.fixture
def bf16_row_blocks(monkeypatch):
    """The CPU row blocks' bf16 path (bf16 products forced on), taken on small reads, with
    8-row blocks and 16-position chunks so that every object takes several."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1")
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
    monkeypatch.setattr(pytorch, "ROW_BLOCK", 8)
    monkeypatch.setattr(pytorch, "CPU_CHUNK", 16)


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_int8_round_trip_within_half_a_step(axis, source):
    _, k, _ = memories(N=63)
    x = (k * torch.logspace(-2, 2, 63)).to(source)  # positions of very different magnitudes
    quantized = QuantizedMemory.quantize(x, "int8", axis=axis)
    assert quantized.data.dtype == torch.int8 and quantized.scale.dtype == torch.float32
    assert quantized.axis == axis and quantized.format == "int8"
    assert quantized.scale.shape == ((2, 12, 1) if axis == "channel" else (2, 1, 63))
    assert int(quantized.data.abs().max()) == 127  # the absmax element takes the whole range
    error = (quantized.dequantize(torch.float64) - x.double()).abs()
    # half a step, and the float32 rounding of the quotient x / scale
    bound = quantized.scale.double() / 2 + x.double().abs() * 2 ** -22
    assert bool((error <= bound).all()), float((error / bound).max())
    assert quantized.nbytes == x.numel() + quantized.scale.numel() * 4


@pytest.mark.parametrize("axis", AXES)
def test_fp8_round_trip_within_e4m3_rounding(axis):
    _, k, _ = memories(N=63)
    x = k * torch.logspace(-3, 2, 63)
    quantized = QuantizedMemory.quantize(x, "fp8", axis=axis)
    assert quantized.data.dtype == torch.float8_e4m3fn and quantized.format == "fp8"
    assert float(quantized.data.float().abs().max()) == 448.0
    error = (quantized.dequantize(torch.float64) - x.double()).abs()
    scale = quantized.scale.double()
    # half an e4m3 step: 2^-4 of a normal element, 2^-10 scale below the smallest normal
    bound = torch.maximum(x.double().abs() * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6)
    assert bool((error <= bound).all()), float((error / bound).max())


def test_quantize_by_torch_dtype_and_spatial_layout():
    x = torch.randn(2, 8, 3, 4, 5)
    by_name = QuantizedMemory.quantize(x, "fp8", axis="position")
    by_dtype = QuantizedMemory.quantize(x, torch.float8_e4m3fn, axis="position")
    assert torch.equal(by_name.data.view(torch.int8), by_dtype.data.view(torch.int8))
    assert by_name.scale.shape == (2, 1, 3, 4, 5)
    assert QuantizedMemory.quantize(x, torch.int8).scale.shape == (2, 8, 1, 1, 1)
    zero = QuantizedMemory.quantize(torch.zeros(1, 2, 3))  # all-zero rows: scale 1, data 0
    assert torch.equal(zero.dequantize(), torch.zeros(1, 2, 3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_frame_scales_are_each_frames_channel_scales(fmt):
    """axis "channel_frame" on (B, C, T, h, w): a scale (B, C, T, 1, 1), each frame's data
    and scales bit for bit those of that frame quantised alone per channel (what a memory
    bank adding frames one at a time stores), dequantised per frame."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 4, 3, 5, generator=generator) * \
        torch.logspace(-2, 2, 4)[:, None, None]  # frames of very different magnitudes
    quantized = QuantizedMemory.quantize(x, fmt, axis="channel_frame")
    assert quantized.axis == "channel_frame" and quantized.scale.shape == (2, 6, 4, 1, 1)
    assert quantized.nbytes == x.numel() + 2 * 6 * 4 * 4
    for t in range(4):
        alone = QuantizedMemory.quantize(x[:, :, t], fmt, axis="channel")
        assert torch.equal(quantized.data[:, :, t].view(torch.int8),
                           alone.data.view(torch.int8))
        assert torch.equal(quantized.scale[:, :, t], alone.scale)
        assert torch.equal(quantized.dequantize()[:, :, t], alone.dequantize())
    assert torch.equal(QuantizedMemory(quantized.data, quantized.scale).dequantize(torch.float64),
                       quantized.data.double() * quantized.scale.double()
                       if fmt == "int8" else quantized.data.float().double() *
                       quantized.scale.double())
    # one frame: the per-channel layout
    assert QuantizedMemory.quantize(x[:, :, :1], fmt, axis="channel_frame").axis == "channel"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_columns_of_channel_frame_memory_take_each_frames_scales(dtype):
    """DequantizingMemory.columns over frames of 7 positions: ranges inside one frame, across
    a boundary, over whole frames and partial ones at both ends, objects by index; equal to
    the slices of dequantize() (the same float32 products, rounded once), made anew or into
    a given tensor through a given float32 scratch (the bf16 readers')."""
    from stm_kernels.quantized import DequantizingMemory
    x = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(6))
    for fmt in FORMATS:
        quantized = QuantizedMemory.quantize(x, fmt, axis="channel_frame")
        whole = quantized.dequantize(dtype).flatten(2)
        memory = DequantizingMemory([quantized], dtype)
        for start, stop in ((0, 35), (2, 5), (5, 9), (7, 14), (3, 31), (0, 1), (34, 35),
                            (6, 29)):
            for index in (slice(None), 1, torch.tensor([2, 0])):
                expected = whole[index, :, start:stop]
                assert torch.equal(memory.columns(index, start, stop, dtype), expected), \
                    (start, stop, index)
                # into a given tensor, widened in a given float32 scratch: the same values
                out = torch.full_like(expected, float("nan"))
                scratch = torch.full(expected.shape, float("nan"))
                assert memory.columns(index, start, stop, dtype, out, scratch) is out
                assert torch.equal(out, expected), (start, stop, index)
                # channels 1 to 3 alone, each with its own scales
                out = torch.full_like(expected[..., 1:3, :], float("nan"))
                memory.columns(index, start, stop, dtype, out, scratch[..., 1:3, :],
                               slice(1, 3))
                assert torch.equal(out, expected[..., 1:3, :]), (start, stop, index)


@pytest.mark.parametrize("value_axis", AXES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_torch_read_of_channel_frame_keys(torch_path, similarity, fmt, value_axis):
    """Keys with scales per channel and frame (3 frames of 37 positions: the chunks of 16
    positions and the batched chunks cross frame boundaries), values of each layout, one
    object's length ending inside a frame: the float64 read of the dequantised memory."""
    q, k, v = memories(B=3, Bq=3)
    kq = QuantizedMemory.quantize(k.unflatten(2, (3, 37)), fmt, "channel_frame")
    vq = QuantizedMemory.quantize(v.unflatten(2, (3, 37)), fmt, value_axis)
    lengths = torch.tensor([111, 50, 74])
    with poison_outputs():
        out, lse, usage = read(q, kq, vq, backend="torch", similarity=similarity,
                               return_lse=True, return_usage=True, memory_lengths=lengths)
    ref_out, ref_lse, ref_usage = reference_read(q, kq.dequantize().flatten(2),
                                                 vq.dequantize().flatten(2),
                                                 similarity=similarity, lengths=lengths)
    for name, actual, reference in (("out", out, ref_out), ("lse", lse, ref_lse),
                                    ("usage", usage, ref_usage)):
        error = relative_error(actual, reference)
        assert error < TOLERANCE[torch.float32], f"{name}: {error:.2e}"
    # the frames' own scales matter: not the read with one scale per channel
    whole = QuantizedMemory.quantize(k, fmt, "channel")
    assert relative_error(out, reference_read(q, whole.dequantize(), vq.dequantize().flatten(2),
                                              similarity=similarity, lengths=lengths)[0]) > 1e-4


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_top_k_and_float64_of_channel_frame_keys(monkeypatch, backend):
    """The top-k read gathers each pick's frame scales; a float64 query reads exactly."""
    monkeypatch.setattr(pytorch.torch_common, "CHUNK_ELEMENTS", 3 * 7 * 32 * 8)
    q, k, v = memories(B=3, HW=41)
    kq = QuantizedMemory.quantize(k.unflatten(2, (3, 37)), "int8", "channel_frame")
    vq = QuantizedMemory.quantize(v, "fp8", "position")
    vq = QuantizedMemory(vq.data.unflatten(2, (3, 37)), vq.scale.unflatten(2, (3, 37)))
    lengths = torch.tensor([111, 50, 5])
    out, lse, usage = read(q, kq, vq, backend=backend, top_k=7, memory_lengths=lengths,
                           return_lse=True, return_usage=True)
    ref_out, ref_lse, ref_usage = reference_read(q, kq.dequantize().flatten(2),
                                                 vq.dequantize().flatten(2), top_k=7,
                                                 lengths=lengths)
    for actual, reference in ((out, ref_out), (lse, ref_lse), (usage, ref_usage)):
        assert relative_error(actual, reference) < TOLERANCE[torch.float32]
    out = read(q.double(), kq, vq, backend=backend)
    ref_out, _, _ = reference_read(q.double(), kq.dequantize(torch.float64).flatten(2),
                                   vq.dequantize(torch.float64).flatten(2))
    assert relative_error(out, ref_out) < 1e-12


@pytest.mark.parametrize("call, message", [
    (lambda x: QuantizedMemory.quantize(x, "int4"), "dtype must be 'int8' or 'fp8'"),
    (lambda x: QuantizedMemory.quantize(x, axis="row"),
     "axis must be 'channel', 'position' or 'channel_frame'"),
    (lambda x: QuantizedMemory.quantize(x, axis="channel_frame"),
     "memory must have shape (B, C, frames, *positions per frame) for axis 'channel_frame'"),
    (lambda x: QuantizedMemory.quantize(x[0]), "memory must be a non-empty floating-point"),
    (lambda x: QuantizedMemory.quantize(x.long()), "memory must be a non-empty floating-point"),
    (lambda x: QuantizedMemory.quantize(x * float("nan")), "memory must be finite"),
    (lambda x: QuantizedMemory(x, torch.ones(2, 8, 1)), "data must be an int8 or float8_e4m3fn"),
    (lambda x: QuantizedMemory(x.to(torch.int8), torch.ones(2, 8, 1, dtype=torch.float16)),
     "scale must be a float32 tensor"),
    (lambda x: QuantizedMemory(x.to(torch.int8), torch.ones(2, 8, 7)),
     "scale must have shape (B=2, C=8, 1) per channel or (B=2, 1, 7) per position"),
    (lambda x: QuantizedMemory(x.to(torch.int8), torch.ones(2, 1)), "scale must have shape"),
    (lambda x: QuantizedMemory(x.view(2, 8, 1, 7).to(torch.int8), torch.ones(2, 8, 7, 1)),
     "scale must have shape (B=2, C=8, 1, 1) per channel, (B=2, 1, 1, 7) per position or "
     "(2, 8, 1, 1) per channel and frame; got shape (2, 8, 7, 1)"),
    (lambda x: QuantizedMemory(x.view(2, 8, 7, 1, 1).to(torch.int8), torch.ones(2, 8, 7, 1)),
     "scale must have shape (B=2, C=8, 1, 1, 1) per channel, (B=2, 1, 7, 1, 1) per position "
     "or (2, 8, 7, 1, 1) per channel and frame; got shape (2, 8, 7, 1)"),
    (lambda x: QuantizedMemory(x.to(torch.int8)[:, :, :0], torch.ones(2, 8, 1)),
     "every dimension at least 1"),
])
def test_format_errors_in_one_line(call, message):
    with pytest.raises((TypeError, ValueError)) as error:
        call(torch.randn(2, 8, 7))
    assert message in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- the read


@pytest.mark.parametrize("value_axis", AXES)
@pytest.mark.parametrize("key_axis", AXES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_torch_read_equals_float64_read_of_dequantised(torch_path, similarity, fmt, key_axis,
                                                       value_axis):
    q, k, v = memories(B=3, Bq=3)
    kq = QuantizedMemory.quantize(k, fmt, key_axis)
    vq = QuantizedMemory.quantize(v, fmt, value_axis)
    with poison_outputs():
        out, lse, usage = read(q, kq, vq, backend="torch", similarity=similarity,
                               return_lse=True, return_usage=True)
    ref_out, ref_lse, ref_usage = expected(q, kq, vq, similarity=similarity)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    for name, actual, reference in (("out", out, ref_out), ("lse", lse, ref_lse),
                                    ("usage", usage, ref_usage)):
        error = relative_error(actual, reference)
        assert error < TOLERANCE[torch.float32], f"{name}: {error:.2e}"
    # and not the read of the unquantised memory: the test sees the quantisation
    assert relative_error(out, reference_read(q, k, v, similarity=similarity)[0]) > 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_query_reads_in_bf16_products(monkeypatch, bf16_row_blocks, fmt):
    """A bf16 query on a CPU with bf16 products: the row blocks' bf16 path, its keys and
    values dequantised to bf16 a chunk at a time (CPU_CHUNK 16 over 111 positions: the last
    chunk overlaps), out in bf16."""
    calls = []
    monkeypatch.setattr(pytorch, "_bf16_softmax", lambda *a, f=pytorch._bf16_softmax:
                        calls.append(1) or f(*a))
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k, fmt), QuantizedMemory.quantize(v, fmt, "position")
    for similarity in ("dot", "l2"):
        with poison_outputs():
            out, lse = read(q.bfloat16(), kq, vq, similarity=similarity, return_lse=True)
        ref_out, ref_lse, _ = expected(q.bfloat16(), kq, vq, similarity=similarity)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, ref_out) < 6e-3
        assert relative_error(lse, ref_lse) < 1e-3
    assert calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_float64_query_and_naive_backend(fmt):
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k, fmt, "position"), QuantizedMemory.quantize(v, fmt)
    out, lse = read(q.double(), kq, vq, backend="torch", return_lse=True)
    ref_out, ref_lse, _ = expected(q.double(), kq, vq, torch.float64)
    assert out.dtype == torch.float64
    assert relative_error(out, ref_out) < 1e-12 and relative_error(lse, ref_lse) < 1e-12
    out, lse, usage = read(q, kq, vq, backend="naive", return_lse=True, return_usage=True)
    ref_out, ref_lse, ref_usage = expected(q, kq, vq)
    for actual, reference in ((out, ref_out), (lse, ref_lse), (usage, ref_usage)):
        assert relative_error(actual, reference) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "naive", "auto"])
def test_ragged_lengths(torch_path, backend):
    """Positions past a length hold NaN data (fp8) and NaN scales: never read."""
    q, k, v = memories(B=3, N=111)
    lengths = [111, 40, 7]
    kq = QuantizedMemory.quantize(k, "fp8", "position")
    vq = QuantizedMemory.quantize(v, "int8", "position")
    for b, length in enumerate(lengths):
        kq.data[b, :, length:] = float("nan")
        kq.scale[b, :, length:] = float("nan")
        vq.scale[b, :, length:] = float("nan")
    with poison_outputs():
        out, lse = read(q, kq, vq, backend=backend, memory_lengths=torch.tensor(lengths),
                        return_lse=True)
    for b, length in enumerate(lengths):
        ref_out, ref_lse, _ = reference_read(q, kq.dequantize()[b:b + 1, :, :length],
                                             vq.dequantize()[b:b + 1, :, :length])
        assert relative_error(out[b:b + 1], ref_out) < TOLERANCE[torch.float32]
        assert relative_error(lse[b:b + 1], ref_lse) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_top_k(monkeypatch, backend, fmt):
    """Selection and read of an 8-bit memory's top-k, the picks dequantised in blocks of
    query positions (CHUNK_ELEMENTS small: several blocks), with lengths below top_k."""
    monkeypatch.setattr(pytorch.torch_common, "CHUNK_ELEMENTS", 3 * 7 * 32 * 8)
    q, k, v = memories(B=3, HW=41)
    kq, vq = QuantizedMemory.quantize(k, fmt), QuantizedMemory.quantize(v, fmt, "position")
    lengths = torch.tensor([111, 50, 5])
    for similarity in ("dot", "l2"):
        out, lse, usage = read(q, kq, vq, backend=backend, top_k=7, similarity=similarity,
                               memory_lengths=lengths, return_lse=True, return_usage=True)
        ref_out, ref_lse, ref_usage = expected(q, kq, vq, top_k=7, similarity=similarity,
                                               lengths=lengths)
        for actual, reference in ((out, ref_out), (lse, ref_lse), (usage, ref_usage)):
            assert relative_error(actual, reference) < TOLERANCE[torch.float32]


def test_non_contiguous_spatial_and_mixed_chunks(torch_path):
    """A strided slice of a bank-like (B, C, capacity, h, w) storage, a (B, C, T, H, W) memory,
    a spatial query, and a memory given as chunks: a QuantizedMemory, then a float tensor."""
    generator = torch.Generator().manual_seed(5)
    storage = torch.randn(2, 12, 8, 3, 5, generator=generator)
    values = torch.randn(2, 20, 8, 3, 5, generator=generator)
    kq = QuantizedMemory.quantize(storage, "int8", "position")
    vq = QuantizedMemory.quantize(values, "fp8", "channel")
    k_view = QuantizedMemory(kq.data[:, :, :5], kq.scale[:, :, :5])  # 5 of 8 frames
    v_view = QuantizedMemory(vq.data[:, :, :5], vq.scale)
    assert not k_view.data.is_contiguous()
    q = torch.randn(1, 12, 4, 6, generator=generator)
    out = read(q, k_view, v_view)
    assert out.shape == (2, 20, 4, 6)
    ref_out, _, _ = reference_read(q, k_view.dequantize(), v_view.dequantize())
    assert relative_error(out.flatten(2), ref_out) < TOLERANCE[torch.float32]
    # transposed data (channels last in memory)
    data = kq.data.flatten(2).transpose(1, 2).contiguous().transpose(1, 2)
    k_t = QuantizedMemory(data, kq.scale.flatten(2))
    out = read(q.flatten(2), k_t, vq.dequantize().flatten(2))
    ref_out, _, _ = reference_read(q, k_t.dequantize(), vq.dequantize())
    assert relative_error(out, ref_out) < TOLERANCE[torch.float32]
    # chunks: frames 0-2 quantised, frames 3-7 in float32 (values quantised per frame)
    extra = torch.randn(2, 12, 5, 3, 5, generator=generator)
    v_chunks = [QuantizedMemory.quantize(values[:, :, :3], "int8", "channel"),
                QuantizedMemory.quantize(values[:, :, 3:], "fp8", "position")]
    out, lse = read(q, [QuantizedMemory(kq.data[:, :, :3], kq.scale[:, :, :3]), extra],
                    v_chunks, return_lse=True, memory_lengths=[15 * 3 + 20, 60])
    keys = torch.cat([kq.dequantize()[:, :, :3], extra], 2)
    vals = torch.cat([c.dequantize() for c in v_chunks], 2)
    ref_out, ref_lse, _ = reference_read(q, keys, vals, lengths=[65, 60])
    assert relative_error(out.flatten(2), ref_out) < TOLERANCE[torch.float32]
    assert relative_error(lse.flatten(1), ref_lse) < TOLERANCE[torch.float32]


def test_memory_read_of_float_value_and_quantized_key():
    q, k, v = memories()
    kq = QuantizedMemory.quantize(k, "int8")
    out = read(q, kq, v)
    ref_out, _, _ = reference_read(q, kq.dequantize(), v)
    assert relative_error(out, ref_out) < TOLERANCE[torch.float32]


def test_memory_read_of_float_keys_and_a_quantized_value():
    """An 8-bit value with float keys is an 8-bit read as well."""
    q, k, v = memories()
    vq = QuantizedMemory.quantize(v, "int8", axis="position")
    out = read(q, k, vq)
    assert relative_error(out, reference_read(q, k, vq.dequantize())[0]) < \
        TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_a_given_scale_reaches_the_8bit_read(backend):
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v, axis="position")
    out, lse = read(q, kq, vq, scale=0.05, backend=backend, return_lse=True)
    ref_out, ref_lse, _ = expected(q, kq, vq, scale=0.05)
    assert relative_error(out, ref_out) < TOLERANCE[torch.float32]
    assert relative_error(lse, ref_lse) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("given", ["shrinkage", "selection"])
def test_xmem_terms_without_xmem_are_refused_for_an_8bit_memory(given):
    """XMem's shrinkage or selection with another similarity: refused in one line, not
    dropped."""
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v)
    terms = {"shrinkage": torch.ones(2, 1, 111), "selection": torch.ones(1, 12, 37)}
    with pytest.raises(ValueError) as raised:
        read(q, kq, vq, **{given: terms[given]})
    assert str(raised.value) == ("similarity='xmem' (shrinkage, selection) does not read an "
                                 "8-bit memory; use 'dot' or 'l2'")


@pytest.mark.parametrize("call, error, message", [
    (lambda q, kq, vq, v: read(q, kq, vq, backend="triton", top_k=3), ValueError,
     "backend='triton' has no top-k read of an 8-bit memory"),
    (lambda q, kq, vq, v: read(q, kq, vq, backend="cuda"), ValueError, "backend must be one of"),
    (lambda q, kq, vq, v: read(q.requires_grad_(), kq, vq), RuntimeError,
     "is inference only: no gradients"),
    (lambda q, kq, vq, v: read(q, kq, v.requires_grad_()), RuntimeError, "inference only"),
    (lambda q, kq, vq, v: torch.func.grad(lambda x: read(x, kq, vq).sum())(q), RuntimeError,
     "inference only"),
    (lambda q, kq, vq, v: read(q, kq, vq, similarity="xmem"), ValueError,
     "similarity='xmem' (shrinkage, selection) does not read an 8-bit memory"),
    (lambda q, kq, vq, v: read(q.half(), kq, v), ValueError,
     "must share one dtype (it does not promote"),
    (lambda q, kq, vq, v: read(q, kq, vq.dequantize()[:, :, :50]), ValueError,
     "memory_value must have shape (B=2, Cv, 111) to match memory_key"),
    (lambda q, kq, vq, v: read(q[:, :5], kq, vq), ValueError,
     "query_key must have shape (B=2 or 1, Ck=12, ...)"),
    (lambda q, kq, vq, v: read(q, [kq, kq], [vq]), ValueError, "as many chunks"),
    (lambda q, kq, vq, v: read(q, kq, vq, memory_lengths=[112, 3]), ValueError,
     "memory_lengths must be a (B=2,) integer tensor on cpu with values in [1, N=111]"),
    (lambda q, kq, vq, v: read(q, kq, vq, top_k=0), ValueError, "top_k must be a positive"),
    (lambda q, kq, vq, v: read(q, kq, "v"), TypeError, "memory_value must be a torch.Tensor"),
])
def test_read_errors_in_one_line(call, error, message):
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v, "fp8")
    with pytest.raises(error) as raised:
        call(q, kq, vq, v)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_no_gradient_is_refused_under_no_grad():
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v)
    with torch.no_grad():
        out = read(q.requires_grad_(), kq, vq)
    assert not out.requires_grad


def test_autocast_reads_in_autocast_dtype():
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k), QuantizedMemory.quantize(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = read(q, kq, vq)
    assert out.dtype == torch.bfloat16
    ref_out, _, _ = expected(q.bfloat16(), kq, vq)
    assert relative_error(out, ref_out) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("flushing", [False, True], ids=["denormals kept", "flushed"])
def test_fp8_widening_equals_torch_conversion_for_every_code(flushing):
    """The read widens fp8 through integer operations: every one of the 256 e4m3fn codes
    (subnormals, both zeros, both NaN codes) as torch converts it, in strided slices too, and
    on a thread that flushes denormals (as the bf16 CPU reader's does while it reads, and a
    user's may), where the subnormal codes must not read as zero."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected_values = codes.to(torch.float32).view(1, 1, 256)
    with denormals_flushed() if flushing else contextlib.nullcontext():
        widened = QuantizedMemory(codes.view(1, 1, 256), torch.ones(1, 1, 1)).dequantize()
    assert torch.equal(widened.isnan(), expected_values.isnan())
    assert torch.equal(widened.nan_to_num(0), expected_values.nan_to_num(0))
    numbers = ~expected_values.isnan()
    assert torch.equal(widened.signbit()[numbers], expected_values.signbit()[numbers])  # -0
    data = codes[torch.randperm(256, generator=torch.Generator().manual_seed(0))][:240]
    data = data.view(2, 12, 10).transpose(1, 2)[:, :, 3:9]  # (2, 10, 6), strided
    scale = torch.rand(2, 1, 6) + 0.5
    memory = QuantizedMemory(data, scale)
    assert torch.equal(memory.dequantize().nan_to_num(0),
                       (data.to(torch.float32) * scale).nan_to_num(0))


@pytest.mark.parametrize("nan_code", [0x7F, 0xFF], ids=["+nan", "-nan"])
@pytest.mark.parametrize("where", ["key", "value"])
def test_one_fp8_nan_code_reaches_the_read(bf16_row_blocks, nan_code, where):
    """The CPU widening fills NaN codes only in a chunk that holds one: a single NaN code
    (either sign) among finite codes is NaN where torch's conversion puts it, and a read of
    it (bf16 readers) is NaN where the float64 read of the dequantised memory is: a NaN key
    makes its whole object NaN, a NaN value its channel of that object."""
    q, k, v = memories()
    kq, vq = QuantizedMemory.quantize(k, "fp8"), QuantizedMemory.quantize(v, "fp8", "position")
    stored = kq if where == "key" else vq
    stored.data.view(torch.uint8)[1, 3, 70] = nan_code  # object 1, the fifth chunk
    widened = stored.dequantize()
    assert torch.equal(widened.isnan(), stored.data.to(torch.float32).isnan())
    assert int(widened.isnan().sum()) == 1 and bool(widened[1, 3, 70].isnan())
    with poison_outputs():
        out = read(q.bfloat16(), kq, vq)
    ref_out, _, _ = expected(q.bfloat16(), kq, vq)
    nan = ref_out.isnan()
    assert bool(nan[1, 3].all()) and not bool(nan[0].any())
    assert bool(nan[1].all()) == (where == "key")
    assert torch.equal(out.isnan(), nan)
    assert relative_error(out[~nan], ref_out[~nan]) < 6e-3


@pytest.mark.parametrize("where", ["key", "value"])
def test_fp8_subnormal_codes_reach_the_bf16_read(bf16_row_blocks, where):
    """e4m3's subnormal codes (exponent bits 0: 1 to 7 times 2^-9) are values, not zeros: the
    bf16 readers flush denormals while they read, so the CPU widening must not pass these codes
    through denormal numbers. A memory whose every key or value is a subnormal code (of a
    scale that makes them ordinary values) reads as the float64 read of it does."""
    q, k, v = memories()
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(1, 8, (2, 12 if where == "key" else 20, 111), generator=generator,
                          dtype=torch.int8)
    codes = codes | (torch.randint(0, 2, codes.shape, generator=generator,
                                   dtype=torch.int8) << 7)  # either sign
    subnormal = QuantizedMemory(codes.view(torch.float8_e4m3fn),
                                torch.full((2, codes.shape[1], 1), 64.0))  # values 1/8 to 7/8
    assert bool((subnormal.dequantize().abs() >= 0.125).all())
    kq = subnormal if where == "key" else QuantizedMemory.quantize(k, "fp8")
    vq = subnormal if where == "value" else QuantizedMemory.quantize(v, "fp8", "position")
    with poison_outputs():
        out, lse = read(q.bfloat16(), kq, vq, return_lse=True)
    ref_out, ref_lse, _ = expected(q.bfloat16(), kq, vq)
    assert relative_error(out, ref_out) < 6e-3
    assert relative_error(lse, ref_lse) < 1e-3


@pytest.mark.parametrize("value_axis", AXES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_path_dequantises_each_chunk_once(monkeypatch, bf16_row_blocks, fmt, value_axis):
    """On two threads the bf16 path's readers share one object's chunks: each key and value
    chunk of an 8-bit memory is dequantised once a read, not once per row block,
    SCRATCH_CHANNELS channels at a time (8 here: 12 key channels in two slices, 20 value
    channels in three, each with its own channels' scales where they are per channel)."""
    from stm_kernels import quantized
    monkeypatch.setattr(pytorch, "SCRATCH_CHANNELS", 8)
    taken = []
    original = quantized.DequantizingMemory.columns

    def columns(self, index, start, stop, dtype, out=None, scratch=None,
                channels=slice(None)):
        taken.append((self.shape[1], start, channels.start, channels.stop))
        # into the reader's bf16 buffer, through its float32 scratch (nothing allocated)
        assert dtype == out.dtype == torch.bfloat16 and scratch.dtype == torch.float32
        return original(self, index, start, stop, dtype, out, scratch, channels)
    monkeypatch.setattr(quantized.DequantizingMemory, "columns", columns)
    q, k, v = memories(B=1)
    kq, vq = QuantizedMemory.quantize(k, fmt), QuantizedMemory.quantize(v, fmt, value_axis)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), poison_outputs():
            out = read(q.bfloat16(), kq, vq)
    finally:
        torch.set_num_threads(before)
    starts = pytorch._chunk_starts(111)  # 37 query rows: 5 row blocks
    assert sorted(taken, key=str) == sorted(
        [(12, s, low, min(low + 8, 12)) for s in starts for low in (0, 8)] +
        [(20, s, low, min(low + 8, 20)) for s in starts for low in (0, 8, 16)], key=str)
    assert relative_error(out, expected(q.bfloat16(), kq, vq)[0]) < 6e-3
