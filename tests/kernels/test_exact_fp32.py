"""Exact float32 (torch's default matmul precision, "highest") at the target shape: one 480p
query frame against N = 162,000 memory positions, Ck = 128, Cv = 512, for a sample of the
query positions (each query's result depends on its own row only), against float64.

Where it runs: the Triton kernels with input precision "ieee" (AMD's float32 matrix cores,
NVIDIA's CUDA-core FMA; here the interpreter) and the torch backend. Both are held to 1e-5
here. TF32 ("high") is checked against an
emulation of its rounding, to show what the exact path buys.
"""
import pytest
import torch

from helpers import relative_error
from reference import reference_read
from stm_kernels import memory_read
from stm_kernels.backends.triton import devices

SAMPLE = 32  # query positions of the target's 1,620 (one query block of the interpreter)


@pytest.fixture(scope="module")
def target_shape():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 128, SAMPLE, generator=generator)
    k = torch.randn(1, 128, 162000, generator=generator)
    v = torch.randn(1, 512, 162000, generator=generator)
    reference = reference_read(q, k, v)[0]  # float64, plain torch
    return q, k, v, reference


def test_the_torch_backend_is_exact_float32(target_shape):
    q, k, v, reference = target_shape
    assert relative_error(memory_read(q, k, v, backend="torch"), reference) <= 1e-5


@pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_the_kernels_in_ieee_are_exact_float32(target_shape):
    q, k, v, reference = target_shape
    assert relative_error(memory_read(q, k, v, backend="triton"), reference) <= 1e-5


def tf32(x):
    """float32 rounded to TF32 (10 mantissa bits), to nearest, ties away from zero (PTX
    cvt.rna.tf32.f32, what the tensor cores take)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_is_not_exact(target_shape):
    """The same read with the scores' and values' operands rounded to TF32, as the "high"
    kernels compute them: about 4e-4, forty times the exact bound."""
    q, k, v, reference = target_shape
    scores = (tf32(q[0].T) @ tf32(k[0])) * 128 ** -0.5
    probabilities = torch.softmax(scores, dim=1)
    out = (tf32(probabilities) @ tf32(v[0].T)).T[None]
    assert 1e-4 < relative_error(out, reference) < 5e-3  # selftest's bound for TF32


def test_the_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-11)])
    assert tf32(x).tolist() == [1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-9)]


class _CudaKey:
    """Stands for a CUDA memory key on the device devices.pretend describes."""

    is_cuda = True
    device = torch.device("cpu")

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize("arch, precision, dtype, expected", [
    ("sm_80", "highest", torch.float32, "torch"),   # FMA at best level with SGEMM
    ("sm_90", "highest", torch.float32, "torch"),   # behind it
    ("sm_90", "high", torch.float32, "triton"),     # TF32: the tensor cores
    ("sm_90", "highest", torch.bfloat16, "triton"),
    ("gfx942", "highest", torch.float32, "triton"),  # AMD's float32 matrix cores
])
def test_auto_reads_exact_float32_by_the_static_estimate(monkeypatch, arch, precision, dtype,
                                                         expected):
    from stm_kernels import backends
    from stm_kernels.backends.triton import devices, tilings
    monkeypatch.delenv(tilings.EXACT_FLOAT32_ENV, raising=False)
    vendor = "amd" if arch.startswith("gfx") else "nvidia"
    device = devices.Device(f"a {arch} GPU", vendor, arch, 160 * 1024, 100)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        with devices.pretend(device):
            assert backends.resolve("auto", _CudaKey(dtype)) == expected
            monkeypatch.setattr(tilings, "EXACT_FLOAT32_FUSED", frozenset({arch}))
            assert backends.resolve("auto", _CudaKey(dtype)) == "triton"  # a report moved it
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_user_decides_exact_float32_for_every_gpu(monkeypatch):
    from stm_kernels import backends
    from stm_kernels.backends.triton import devices, tilings
    sm_90 = devices.Device("H100", "nvidia", "sm_90", 227 * 1024, 132)
    with devices.pretend(sm_90):
        monkeypatch.setenv(tilings.EXACT_FLOAT32_ENV, "triton")
        assert backends.resolve("auto", _CudaKey(torch.float32)) == "triton"
        assert backends.resolve("triton", _CudaKey(torch.float32)) == "triton"
        monkeypatch.setenv(tilings.EXACT_FLOAT32_ENV, " Torch ")
        assert backends.resolve("auto", _CudaKey(torch.float32)) == "torch"
        monkeypatch.setenv(tilings.EXACT_FLOAT32_ENV, "cublas")
        with pytest.raises(ValueError, match="STM_KERNELS_EXACT_FLOAT32 must be 'triton' or "
                                             "'torch'; got 'cublas'"):
            backends.resolve("auto", _CudaKey(torch.float32))
