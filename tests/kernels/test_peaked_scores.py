"""Reads whose scores span hundreds, as a real STM memory's do (a trained model's keys are not
normalised): most weights are far below float32's smallest normal number, where torch's CPU
exp is 10-25x slower. The torch backend takes its weights as powers of two (exp2, faster at
any argument) with the arguments raised to EXP2_FLOOR first. The results must still be those
of the float64 read: forward, lse, gradients and usage, on every CPU path (batched, row
blocks, backward, usage)."""

import pytest
import torch

from helpers import (check_read, random_inputs, read_with_grads, reference_with_grads,
                     relative_error)
from reference import reference_read, reference_usage
from stm_kernels import memory_read, poison_outputs, torch_common
from stm_kernels.backends import pytorch
from stm_kernels.torch_common import EXP2_FLOOR, exp2_shifted_


def test_exp2_shifted_raises_tiny_arguments_to_the_floor_on_a_cpu():
    shifted = torch.tensor([0.0, -1.0, -125.0, -130.0, -1000.0, float("-inf")])
    assert torch.equal(exp2_shifted_(shifted.clone()), torch.tensor(
        [1.0, 0.5, 2.0 ** -125, 2.0 ** -126, 2.0 ** -126, 2.0 ** -126], dtype=torch.float32))
    assert exp2_shifted_(shifted.double())[3].item() == 2.0 ** -130  # float64: above -1022
    assert exp2_shifted_(torch.tensor([-1100.0], dtype=torch.float64)).item() == 2.0 ** -1022
    assert exp2_shifted_(torch.tensor([-130.0], dtype=torch.bfloat16)).item() < 2.0 ** -126
    assert set(EXP2_FLOOR) == {torch.float32, torch.float64}
    # the floor is the smallest normal number's exponent
    for dtype, floor in EXP2_FLOOR.items():
        assert 2.0 ** floor == torch.finfo(dtype).tiny


def peaked_inputs(dtype, seed=3):
    """(q, k, v) of one object with keys 250x a unit normal's: scores spanning several
    hundred."""
    q, k, v = random_inputs(2, 1, 16, 24, 40, 300, torch.float64, "cpu", seed=seed)
    k = k * 250
    scores = torch.einsum("ck,bcn->bkn", q[0], k) / 4  # scale 1/sqrt(Ck)
    spread = (scores.amax(-1) - scores.amin(-1)).min().item()
    assert spread > 750, spread  # far below both floors for many weights
    return [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", ["batched", "row blocks"])
def test_peaked_reads_match_the_float64_read(monkeypatch, dtype, path):
    if path == "row blocks":
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
        monkeypatch.setattr(pytorch, "CPU_CHUNK", 64)
    else:
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 2 ** 62)
    q, k, v = peaked_inputs(dtype)
    with poison_outputs():
        with torch.no_grad():  # the row blocks run only without gradients
            out, lse, usage = memory_read(q, k, v, backend="torch", return_lse=True,
                                          return_usage=True)
        results = read_with_grads(q, k, v, backend="torch")
    expected = reference_with_grads(q, k, v)
    check_read([out, lse, None, None, None], expected[:2] + [None] * 3, dtype)
    check_read(results, expected, dtype)
    expected_usage = reference_usage(q, k, expected[1])
    # scores near 700 carry about 700 x 2^-24 = 4e-5 of float32 rounding into each weight;
    # float64 inputs' usage is computed in float64 and returned in float32 (memory_read's
    # contract): that one rounding, at most 2^-24 of a value (2^-23 leaves room for the sums)
    assert usage.dtype == torch.float32
    bound = 2 ** -23 if dtype == torch.float64 else 2e-4
    assert (usage.double() - expected_usage).abs().max() < bound * expected_usage.abs().max()



@pytest.mark.parametrize("path", ["batched", "row blocks"])
def test_every_exp_of_a_peaked_read_stays_on_the_fast_path(monkeypatch, path):
    """Every weight of the read is an exp2 of an argument at or above the floor, never a float32
    exp (forward, backward and usage; on the worker threads too)."""
    if path == "row blocks":
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
    else:
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 2 ** 62)
    q, k, v = peaked_inputs(torch.float32)
    smallest, exps = [], []
    exp_, exp2_ = torch.Tensor.exp_, torch.Tensor.exp2_

    def recorded_exp2(tensor):
        if tensor.dtype == torch.float32 and tensor.shape[-1] > 1:  # weights, not factors
            smallest.append(tensor.min().item())
        return exp2_(tensor)

    def recorded_exp(tensor):
        exps.append(tensor.dtype)
        return exp_(tensor)

    monkeypatch.setattr(torch.Tensor, "exp2_", recorded_exp2)
    monkeypatch.setattr(torch.Tensor, "exp_", recorded_exp)
    with torch.no_grad():
        memory_read(q, k, v, backend="torch", return_usage=True)
    read_with_grads(q, k, v, backend="torch")
    assert len(smallest) >= 4 and min(smallest) >= EXP2_FLOOR[torch.float32], smallest
    assert torch.float32 not in exps


# x86 CPUs flush denormals on request; others may not (the read is the same, only slower)
can_flush = pytest.mark.skipif(not torch.set_flush_denormal(False),
                               reason="this CPU cannot flush denormals")


@can_flush
@pytest.mark.parametrize("threads", [1, 2])
def test_a_peaked_bf16_read_takes_its_exp_with_denormals_flushed(monkeypatch, threads):
    """The bf16 products' path (row blocks, bf16 inputs) on peaked scores, most of whose
    weights are below float32's smallest normal number: every exp of its bf16 products takes
    arguments at or above BF16_EXP_FLOOR (no denormal result, whose slow path torch's OpenMP
    threads would take: they do not share the caller's flush setting) and runs with the
    caller's denormals flushed, the caller's thread left as it was, and the read within
    bf16's bound of the float64 read."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1")
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
    monkeypatch.setattr(pytorch, "CPU_CHUNK", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, k, v = peaked_inputs(torch.bfloat16)
    flushed, floored = [], []
    exp_ = torch.Tensor.exp_

    def recorded_exp(tensor):
        if tensor.dtype == torch.bfloat16:
            flushed.append(torch_common._flushing_denormals())
            floored.append(bool((tensor.float() >= pytorch.BF16_EXP_FLOOR).all()))
        return exp_(tensor)

    monkeypatch.setattr(torch.Tensor, "exp_", recorded_exp)
    with poison_outputs(), torch.no_grad():
        out, lse = memory_read(q, k, v, backend="torch", return_lse=True)
    assert len(flushed) >= 10 and all(flushed) and all(floored)
    assert not torch_common._flushing_denormals()
    expected, expected_lse, _ = reference_read(q, k, v)
    assert relative_error(out, expected) < 1e-2
    assert relative_error(lse, expected_lse) < 1e-3


@can_flush
@pytest.mark.parametrize("before", [False, True], ids=["off", "on"])
def test_flushing_denormals_is_restored_to_the_threads_own_setting(before):
    torch.set_flush_denormal(before)
    try:
        tiny = torch.full((1,), 2.0 ** -126)
        with torch_common.denormals_flushed():
            assert torch_common._flushing_denormals() and tiny.mul(0.5).item() == 0
        assert torch_common._flushing_denormals() == before
        assert (tiny.mul(0.5).item() == 0) == before
    finally:
        torch.set_flush_denormal(False)
