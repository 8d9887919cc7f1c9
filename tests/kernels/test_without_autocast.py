"""torch_common.without_autocast: the wrapped backend function runs with autocast off; with no
autocast on anywhere (and for meta tensors, which torch.autocast refuses as a device) it enters
no autocast region."""
import pytest
import torch

from stm_kernels import topk
from stm_kernels.torch_common import without_autocast


@without_autocast
def _product(a, b):
    """a @ b, and whether autocast was on for a's device inside."""
    enabled = a.device.type != "meta" and torch.is_autocast_enabled(a.device.type)
    return a @ b, enabled


@pytest.fixture
def regions(monkeypatch):
    """The torch.autocast regions entered (device, enabled) during the test."""
    entered = []
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        entered.append((device_type, kwargs.get("enabled", True)))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    return entered


def test_inside_an_autocast_region_the_function_runs_without_it(regions):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16  # the region casts a plain product
        product, enabled = _product(a, b)
    assert product.dtype == torch.float32 and not enabled
    torch.testing.assert_close(product, a @ b)
    assert regions == [("cpu", True), ("cpu", False)]


def test_without_autocast_no_region_is_entered(regions):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    product, enabled = _product(a, b)
    assert product.dtype == torch.float32 and not enabled and regions == []


@pytest.mark.parametrize("autocast", [False, True])
def test_meta_tensors_run_with_or_without_an_autocast_region(regions, autocast):
    a, b = torch.empty(4, 8, device="meta"), torch.empty(8, 3, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        product, _ = _product(a, b)
        # the top-k read's softmax over its picks (topk.selected_read) on meta tensors
        q, k, v = (torch.empty(shape, dtype=torch.bfloat16, device="meta")
                   for shape in ((1, 16, 5), (2, 16, 9), (2, 6, 9)))
        indices = torch.empty(2, 5, 3, dtype=torch.int64, device="meta")
        out, lse, _ = topk.selected_read(q, k, v, indices, 0.25, False)
    assert product.shape == (4, 3) and product.device.type == "meta"
    assert out.shape == (2, 6, 5) and lse.shape == (2, 5)
    assert regions == [("cpu", autocast)]  # the test's own region only
