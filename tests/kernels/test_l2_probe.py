"""The L2 read-bandwidth probe of the kernel benchmark (bench.l2_probe): its kernel reads what
it should (interpreter on CPU), and its figure reaches the benchmark's results and table."""
import pytest
import torch

from bench import kernel

l2_probe = pytest.importorskip("bench.l2_probe")


def test_every_program_sums_the_whole_buffer_passes_times():
    # Integers in bf16 sum exactly in fp32: each program's sum is passes x the buffer's.
    x = torch.arange(4 * 64, dtype=torch.float32).remainder(7).sub(3).to(torch.bfloat16)
    sums = l2_probe.read_sums(x, programs=5, passes=3, block=64)
    assert sums.shape == (5,) and sums.dtype == torch.float32
    expected = 3 * x.float().sum()
    assert torch.equal(sums, expected.expand(5))


@pytest.mark.parametrize("shape, programs, passes, match", [
    ((100,), 1, 1, "multiple of 64"), ((2, 64), 1, 1, "1-D"), ((0,), 1, 1, "positive"),
    ((64,), 0, 1, "programs and passes"), ((64,), 1, 0, "programs and passes")])
def test_bad_arguments_are_named(shape, programs, passes, match):
    with pytest.raises(ValueError, match=match):
        l2_probe.read_sums(torch.zeros(shape), programs, passes, block=64)


def test_the_kernel_table_reports_the_probe():
    payload = dict(records=[], device_type="cuda", matmul_tflops={"bf16": 800.0},
                   l2_read=dict(tbps=6.25, programs=528, buffer_mib=8))
    assert "L2 read probe (bench.l2_probe, a lower bound): 6.25 TB/s (528 programs re-reading " \
           "8 MiB)." in kernel.summary(payload)
    without = {key: value for key, value in payload.items() if key != "l2_read"}
    assert "L2 read probe" not in kernel.summary(without)


@pytest.mark.gpu
def test_the_probe_measures_a_positive_bandwidth_on_a_gpu():
    result = l2_probe.measure(torch.device("cuda"), passes=2)
    assert result["tbps"] > 0.1 and result["programs"] >= 1
    assert result["bytes"] == result["programs"] * 2 * 8 * 2**20
