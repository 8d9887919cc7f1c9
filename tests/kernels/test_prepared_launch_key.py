"""The kept-launch key (kept_launches._layout_key): what a kept launch is found under, and when
a kept pass is no longer found (its Call planned from tables replaced since). Plain CPU tests
of the key itself (no kernel runs), beside test_prepared_launch.py's reads."""
import dataclasses
import types

import pytest
import torch

from stm_kernels.backends.triton import calls, devices, kept_launches, tilings

H100 = devices.Device("NVIDIA H100", "nvidia", "sm_90", 227 * 1024, 132)


def _tensor(device, dtype=torch.bfloat16, shape=(1, 64, 100)):
    """What the key reads of a tensor (shape, strides, dtype, device), for devices this machine
    lacks."""
    strides = torch.empty(shape, device="meta").stride()
    return types.SimpleNamespace(shape=torch.Size(shape), stride=lambda: strides, dtype=dtype,
                                 device=torch.device(device))


def _key(device, described=H100, **tensor_options):
    tensors = [_tensor(device, **tensor_options) for _ in range(3)]
    with devices.pretend(described):
        return kept_launches._layout_key("forward", tensors[1], 0.125, False, None, *tensors)


def test_two_gpus_of_one_model_keep_launches_of_their_own():
    """Two GPUs of one model share their description (devices.Device holds no index): a
    launch kept for cuda:0 must not be found for cuda:1, whose kernels and streams differ."""
    assert _key("cuda:0") != _key("cuda:1")
    assert _key("cuda:1") == _key("cuda:1")


def test_the_key_holds_every_tensors_dtype_and_shape():
    assert _key("cuda:0", dtype=torch.float16) != _key("cuda:0")
    assert _key("cuda:0", shape=(1, 64, 101)) != _key("cuda:0")


def test_the_key_holds_what_decides_the_call():
    """A kept pass is found without planning its Call (calls._call), so the key holds what the
    Call is planned from besides the tensors: the device's description and torch's float32
    matmul precision."""
    other = dataclasses.replace(H100, name="NVIDIA H200", multiprocessors=132)
    assert _key("cuda:0", described=other) != _key("cuda:0")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = _key("cuda:0", dtype=torch.float32)
        torch.set_float32_matmul_precision("high")
        fast = _key("cuda:0", dtype=torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert exact != fast


@pytest.fixture
def kept(monkeypatch):
    """A pass kept under a layout key of its own (a stand-in holding an H100 Call), none
    kept before it."""
    monkeypatch.setattr(kept_launches, "_prepared", {})
    with devices.pretend(H100):
        call = calls._call(torch.empty(1, 128, 64, dtype=torch.bfloat16, device="meta"),
                           "forward", False)
    prepared = types.SimpleNamespace(call=call)
    kept_launches._keep_prepared("layout", prepared)
    assert kept_launches._kept("layout") is prepared
    return prepared


def test_a_pass_planned_before_on_torch_was_replaced_is_not_found(kept, monkeypatch):
    monkeypatch.setattr(tilings, "ON_TORCH", {("sm_90", "forward", "16-bit", 128): "no"})
    assert kept_launches._kept("layout") is None


def test_a_pass_of_a_replaced_architecture_is_not_found(kept, monkeypatch):
    replaced = dataclasses.replace(tilings.ARCHITECTURES["sm_90"], fp32_fast="bf16x3")
    monkeypatch.setitem(tilings.ARCHITECTURES, "sm_90", replaced)
    assert kept_launches._kept("layout") is None


def test_an_architecture_added_drops_the_kept_passes(kept, monkeypatch):
    own = dataclasses.replace(tilings.ARCHITECTURES["sm_86"], name="sm_89")
    monkeypatch.setitem(tilings.ARCHITECTURES, "sm_89", own)
    assert kept_launches._kept("layout") is None
    # a pass kept from the new tables is found; the one from the old ones is gone
    fresh = types.SimpleNamespace(call=kept.call)
    kept_launches._keep_prepared("another layout", fresh)
    assert kept_launches._kept("another layout") is fresh
    assert list(kept_launches._prepared) == ["another layout"]


def test_the_tables_restored_find_a_pass_kept_from_them(kept, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(tilings, "ON_TORCH", {})
        assert kept_launches._kept("layout") is None
    assert kept_launches._kept("layout") is kept
