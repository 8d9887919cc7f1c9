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


def _fields(descriptor):
    """(base, every other field): a descriptor's fields differ between Triton versions."""
    return descriptor.base, {name: value for name, value in vars(descriptor).items()
                             if name != "base"}


@pytest.fixture
def descriptors():
    if not gluon_common.AVAILABLE:
        pytest.skip(gluon_common.UNAVAILABLE_REASON)
    layouts = gluon_common.nvmma_layouts(torch.bfloat16, dict(k=[64, 128]))
    return gluon_common.Descriptors(layouts), layouts


def test_descriptors_after_the_first_equal_tritons_own_and_hold_no_tensor(descriptors):
    made, layouts = descriptors
    first = torch.randn(256, 512).bfloat16()
    made("k", first)
    assert all(field is not first for field in made.made["k"][1].values())
    for later in (torch.randn(256, 512).bfloat16(), first.clone()):
        copy = made("k", later)
        assert type(copy) is gluon_common.TensorDescriptor and copy.base is later
        assert _fields(copy) == _fields(gluon_common.descriptor(later, *layouts["k"]))


@pytest.mark.parametrize("other", ["shape", "strides", "dtype", "misaligned"])
def test_descriptors_of_another_layout_are_made_and_checked_by_triton(descriptors, other):
    made, layouts = descriptors
    made("k", torch.randn(256, 512).bfloat16())
    later = {"shape": lambda: torch.randn(128, 512).bfloat16(),
             "strides": lambda: torch.randn(256, 1024).bfloat16()[:, :512],
             "dtype": lambda: torch.randn(256, 512).half(),
             "misaligned": lambda: torch.randn(256 * 512 + 1).bfloat16()[1:].view(256, 512),
             }[other]()
    if other == "misaligned":  # not copied: Triton's own check refuses it
        with pytest.raises(AssertionError, match="16-byte aligned"):
            made("k", later)
        return
    copy = made("k", later)
    assert _fields(copy) == _fields(gluon_common.descriptor(later, *layouts["k"]))
    assert made.made["k"][0] == (later.shape, later.stride(), later.dtype)
