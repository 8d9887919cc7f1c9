"""What the Gluon kernels' launchers share (stm_kernels/experimental/gluon_common.py): their
host checks."""
import pytest
import torch

triton = pytest.importorskip("triton")

from stm_kernels.experimental import gluon_common  # noqa: E402


def test_device_reason_names_what_is_missing():
    q, k = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    assert gluon_common.device_reason(dict(q=q, k=k)) == "needs CUDA tensors"


def test_tma_reason_names_the_tensor_and_the_shared_memory():
    good = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    bad = torch.randn(1, 16, 70, dtype=torch.bfloat16)[:, :, :65]
    assert gluon_common.tma_reason(dict(k=good), 1000, 227 * 1024) is None
    assert gluon_common.tma_reason(dict(k=good, v=bad), 1000, 227 * 1024).startswith(
        "v is not TMA-addressable")
    assert "shared memory" in gluon_common.tma_reason(dict(k=good), 227 * 1024, 227 * 1024)
