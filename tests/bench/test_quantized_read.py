"""`python -m bench quantized-read` on tiny sizes: the stored variants hold what they say, the
errors it reports are the errors of the reads it makes, the speed and peak runs write their
JSON, and it refuses the reserved test sequences. The real-memory run skips without
../shared's DAVIS frames."""
import json

import pytest
import torch

from bench import quantized_read
from helpers import SHARED, relative_error
from reference import reference_read
from stm_kernels import QuantizedMemory

DAVIS = SHARED / "data" / "davis2016-val"


def captured_memory(seed=0, frames=4, positions=15, Ck=8, Cv=12, HW=20):
    """One (sequence, frame, q, k, v, positions per frame) capture of random data with a
    peaked query, as capture_memories returns them."""
    generator = torch.Generator().manual_seed(seed)
    q = 3 * torch.randn(1, Ck, HW, generator=generator)
    k = torch.randn(2, Ck, frames * positions, generator=generator)
    v = torch.randn(2, Cv, frames * positions, generator=generator)
    return ("synthetic", 7, q, k, v, positions)


def test_stored_variants_round_trip():
    _, _, _, k, _, positions = captured_memory()
    names = [name for name, *_ in quantized_read.storage_variants()]
    assert len(names) == len(set(names)) and names[0] == "bf16"
    per_frame = quantized_read.stored(k, "int8", "channel/frame", positions)
    assert len(per_frame) == 4 and all(c.scale.shape == (2, 8, 1) for c in per_frame)
    whole = quantized_read.stored(k, "int8", "channel", positions)
    assert isinstance(whole, QuantizedMemory) and whole.scale.shape == (2, 8, 1)
    # per frame, the scales follow each frame's own maximum: a closer fit than one scale
    error_frames = relative_error(quantized_read.widened(per_frame), k)
    error_whole = relative_error(quantized_read.widened(whole), k)
    assert 0 < error_frames <= error_whole < 1e-2
    # split into frames without changing a value
    for memory in (whole, quantized_read.stored(k, "fp8", "position"), k):
        frames = quantized_read.as_frames(memory, positions)
        assert len(frames) == 4
        assert torch.equal(quantized_read.widened(frames), quantized_read.widened(memory))


def test_errors_are_the_reads_errors():
    capture = captured_memory()
    _, _, q, k, v, positions = capture
    results = quantized_read.measure_errors([capture], "dot")
    reference = reference_read(q, k, v)[0]
    # bf16: the float64 read of the bf16-rounded memory
    bf16 = reference_read(q, k.bfloat16().double(), v.bfloat16().double())[0]
    assert results["bf16"]["mean"] == pytest.approx(relative_error(bf16, reference), rel=1e-6)
    name = "int8 K/position V/channel"
    kq, vq = QuantizedMemory.quantize(k, "int8", "position"), QuantizedMemory.quantize(v, "int8")
    expected = relative_error(reference_read(q, kq.dequantize(torch.float64),
                                             vq.dequantize(torch.float64))[0], reference)
    assert results[name]["mean"] == pytest.approx(expected, rel=1e-6)
    # the torch backend's read of the 8-bit memory is the float64 read's, to float32 rounding
    assert results[name]["torch_mean"] == pytest.approx(expected, rel=1e-3)
    assert results["K fp32, int8 V/position"]["torch_mean"] is None
    for result in results.values():
        assert 0 < result["mean"] < 0.5 and result["mean"] <= result["max"]


def test_speed_and_peak_runs_write_their_json(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert quantized_read.main(["--captures", "0", "--sizes", "2000", "--rounds", "1"]) == 0
    [path] = tmp_path.glob("quantized_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["complete"] and payload["cpu_model"]
    speed = payload["speed"]["2000"]
    assert set(speed) == set(quantized_read.SPEED_VARIANTS)
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 1 for r in speed.values())
    peaks = payload["peaks"]["2000"]
    assert all(isinstance(b, int) and b >= 0 for b in peaks.values())
    assert "8-bit / bf16 time" in quantized_read.summary(payload)


def test_reserved_sequences_refused(capsys):
    with pytest.raises(SystemExit):
        quantized_read.main(["--sequences", "camel", "blackswan", "--sizes"])
    assert "blackswan reserved test sequence" in capsys.readouterr().err


@pytest.mark.skipif(not (DAVIS / "Annotations" / "480p" / "camel").is_dir(),
                    reason="needs ../shared/data/davis2016-val")
def test_real_memories_of_a_training_sequence(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert quantized_read.main(["--sequences", "camel", "--captures", "1", "--size", "96",
                                "--sizes"]) == 0
    [path] = tmp_path.glob("quantized_read_cpu_*.json")
    payload = json.loads(path.read_text())
    [capture] = payload["captures"]
    assert capture["sequence"] == "camel" and capture["frame"] == 45
    errors = payload["errors"]
    # an 8-bit memory rounds more than bf16; int8 less than fp8 (3 mantissa bits)
    assert 0 < errors["bf16"]["mean"] < errors["int8 K/position V/position"]["mean"] < \
        errors["fp8 K/position V/position"]["mean"] < 0.5
    assert "speed" not in payload


def test_products_time_the_reads_block_and_compute_what_they_name(monkeypatch):
    from stm_kernels.backends import pytorch
    monkeypatch.setattr(pytorch, "ROW_BLOCK", 24)  # a small block: the same ops, quickly
    monkeypatch.setattr(pytorch, "CPU_CHUNK", 48)
    ops = quantized_read.product_ops()
    # the int8 products are exact integer products; the bf16 ones the read's own calls
    generator = torch.Generator().manual_seed(0)  # product_ops' operands, drawn again
    codes = [torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)
             for shape in ((24, 128), (128, 48), (512, 48), (24, 48))]
    q8, k8, v8, p8 = codes
    assert torch.equal(ops["QK int8 (torch._int_mm)"][0](), q8.long().mm(k8.long()).int())
    assert torch.equal(ops["PV int8 x int8 (torch._int_mm, p in 8 bits)"][0](),
                       p8.long().mm(v8.long().T).int())
    qk = ops["QK bf16 (addmm, as the read)"][0]()
    assert torch.allclose(qk.double(), q8.double().mm(k8.double()), rtol=1e-2)
    assert ops["QK bf16 (addmm, as the read)"][1] == 24 * 128 * 48
    # the two bounds of a chunk's making make the same bf16 chunk: the codes, exactly
    copied = ops["copy a bf16 value chunk (as the bf16 read)"][0]().clone()
    widened = ops["widen an int8 value chunk to bf16 (no scale)"][0]()
    assert widened.dtype == torch.bfloat16 and torch.equal(widened, v8.bfloat16())
    assert torch.equal(copied, widened)
    results = quantized_read.measure_products(rounds=2, repeats=1)
    assert list(results) == list(ops)
    for name, result in results.items():
        if "error" in result:  # this torch refuses the op: said, not timed
            assert result["error"], name
            continue
        assert result["median_ms"] > 0
        work = ops[name][1]
        assert (result["gflops"] is None) == (work is None)
        if work is not None:
            assert result["gflops"] == pytest.approx(2 * work / result["median_ms"] / 1e6)
    table = quantized_read.summary({"products": results, "rounds": 2, "device": "this CPU"})
    assert "| QK int8 (torch._int_mm) |" in table and "2 interleaved rounds" in table
