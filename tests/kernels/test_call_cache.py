"""calls._call remembers a read's Call per (device, dtype, key channels, read, similarity,
float32 matmul precision) and plans it again whenever anything it depends on changes: each
invalidating change gets a test that fails if the remembered Call were returned."""
import dataclasses

import pytest
import torch

from stm_kernels.backends.triton import calls, devices, kept_launches, tilings
from stm_kernels.backends.triton.running import KernelUnavailable

H100 = devices.Device("H100 (test)", "nvidia", "sm_90", 227 * 1024, 132)
A100 = devices.Device("A100 (test)", "nvidia", "sm_80", 163 * 1024, 108)


def _memory(channels=128, dtype=torch.bfloat16):
    return torch.empty(1, channels, 64, dtype=dtype, device="meta")


@pytest.fixture
def plannings(monkeypatch):
    """The calls planned (calls._plan_call) during the test, none remembered before it."""
    monkeypatch.setattr(calls, "_calls", {})
    planned = []
    real = calls._plan_call

    def plan(k):
        planned.append((k.dtype, k.shape[1]))
        return real(k)

    monkeypatch.setattr(calls, "_plan_call", plan)
    return planned


def test_a_repeated_call_is_planned_once(plannings):
    with devices.pretend(H100):
        first = calls._call(_memory(), "forward", False)
        again = calls._call(_memory(), "forward", False)
    assert again is first and len(plannings) == 1
    assert first.device == H100 and first.architecture is tilings.ARCHITECTURES["sm_90"]


def _answer(channels=128, dtype=torch.bfloat16, read="forward", l2=False, device=H100):
    """The Call of that read (calls._call), or the reason it is refused."""
    with devices.pretend(device):
        try:
            return calls._call(_memory(channels, dtype), read, l2)
        except KernelUnavailable as refused:
            return refused.reason


@pytest.mark.parametrize("change", [
    dict(dtype=torch.float32),  # another precision class
    dict(channels=256),  # another key width
    dict(read="backward"),  # refused by ON_TORCH (below), where the forward runs
    dict(channels=257, l2=True),  # the rank-1 channel refuses l2 (RANK1_L2), not dot
    dict(device=A100),  # another architecture
], ids=["dtype", "channels", "read", "l2", "device"])
def test_each_part_of_the_key_gets_its_own_answer(plannings, monkeypatch, change):
    monkeypatch.setattr(tilings, "ON_TORCH", {("sm_90", "backward", "16-bit", 128): "no"})
    base = dict(channels=257, l2=False) if "l2" in change else {}
    first = _answer(**base)
    second = _answer(**{**base, **change})
    assert isinstance(first, calls.Call) and second != first and len(plannings) == 2
    calls._calls.clear()  # planned afresh, the same answers
    assert _answer(**{**base, **change}) == second and _answer(**base) == first
    assert len(plannings) == 4  # each planned again after the clear, then remembered
    # a refusal is planned again each time (only Calls are remembered)
    assert _answer(**{**base, **change}) == second
    assert len(plannings) == 4 + (not isinstance(second, calls.Call))


def test_a_float32_memory_follows_the_matmul_precision(plannings):
    previous = torch.get_float32_matmul_precision()
    try:
        with devices.pretend(H100):
            torch.set_float32_matmul_precision("highest")
            exact = calls._call(_memory(dtype=torch.float32), "forward", False)
            torch.set_float32_matmul_precision("high")
            fast = calls._call(_memory(dtype=torch.float32), "forward", False)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (exact.input_precision, exact.precision_class) == ("ieee", "fp32")
    assert (fast.input_precision, fast.precision_class) == ("tf32", "tf32")


def test_a_replaced_on_torch_table_is_read_again(plannings, monkeypatch):
    with devices.pretend(H100):
        calls._call(_memory(), "backward", False)
        monkeypatch.setattr(tilings, "ON_TORCH", {("sm_90", "backward", "16-bit", 128): "no"})
        with pytest.raises(KernelUnavailable, match="no"):
            calls._call(_memory(), "backward", False)
        calls._call(_memory(), "forward", False)  # another read of the same memory still runs


def test_a_replaced_architecture_is_read_again(plannings, monkeypatch):
    with devices.pretend(H100):
        first = calls._call(_memory(), "forward", False)
        replaced = dataclasses.replace(tilings.ARCHITECTURES["sm_90"], fp32_fast="bf16x3")
        monkeypatch.setitem(tilings.ARCHITECTURES, "sm_90", replaced)
        second = calls._call(_memory(), "forward", False)
    assert first.architecture is not replaced and second.architecture is replaced


def test_an_architecture_added_is_read_again(plannings, monkeypatch):
    """An sm_89 device runs sm_80's or sm_86's tilings until an entry of its own exists."""
    sm_89 = devices.Device("L40S (test)", "nvidia", "sm_89", 99 * 1024, 142)
    with devices.pretend(sm_89):
        first = calls._call(_memory(), "forward", False)
        own = dataclasses.replace(tilings.ARCHITECTURES["sm_86"], name="sm_89")
        monkeypatch.setitem(tilings.ARCHITECTURES, "sm_89", own)
        second = calls._call(_memory(), "forward", False)
    assert first.architecture is tilings.ARCHITECTURES["sm_86"] and second.architecture is own


def test_an_unsupported_call_is_refused_every_time(plannings):
    old = devices.Device("T4 (test)", "nvidia", "sm_75", 64 * 1024, 40)
    with devices.pretend(old):
        for _ in range(2):
            with pytest.raises(KernelUnavailable, match="below sm_80"):
                calls._call(_memory(), "forward", False)
    assert len(plannings) == 2


def test_forget_choices_forgets_the_calls(plannings):
    with devices.pretend(H100):
        calls._call(_memory(), "forward", False)
        kept_launches.forget_choices()
        calls._call(_memory(), "forward", False)
    assert len(plannings) == 2


def test_a_devices_hash_is_its_fields():
    """Device remembers its hash (made from the fields that decide equality): equal devices
    find each other's calls, a changed one does not."""
    same = devices.Device(*(getattr(H100, name) for name in (
        "name", "vendor", "arch", "shared_memory", "multiprocessors")))
    assert same == H100 and hash(same) == hash(H100) and {H100: 1}[same] == 1
    other = dataclasses.replace(H100, multiprocessors=114)
    assert other != H100 and hash(other) == hash(devices.Device(
        H100.name, "nvidia", "sm_90", H100.shared_memory, 114))
