"""A kept backward's copies of dO and q (backward_launcher.PreparedBackward): plain kernels
get each copy's whole padded allocation (they read it by the strides planned on the first
call, never past HW in a row); Gluon launches, whose TMA descriptors take the tensors'
shapes, the (B, C, HW) views; the gradients equal float64 either way."""
import dataclasses

import pytest
import torch

from helpers import random_inputs
from stm_kernels import memory_read, poison_outputs
from stm_kernels.backends.triton import backward_launcher, devices, kept_launches, launch, running

pytestmark = [pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("fresh_launches")]

SHAPE = dict(B=2, Bq=1, Ck=16, Cv=24, HW=30, N=64)  # HW 30: rows 30 apart, copied


def _case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, out, grad_out = (torch.randn(shape, generator=generator).bfloat16()
                              for shape in ((1, 16, 30), (2, 16, 64), (2, 24, 64), (2, 24, 30),
                                            (2, 24, 30)))
    return grad_out, q, k, v, out, torch.randn(2, 30, generator=generator)


def _recorded_backward(*case):
    """[(kernel name, arguments)] of a kept backward's launches (the second call's)."""
    launched = []
    with running.recording(lambda kernel, grid, arguments, *_: launched.append(
            (kernel.fn.__name__, arguments))), poison_outputs(False):
        grad_out, q, k, v, out, lse = case
        launch.triton_backward(grad_out, None, q, k, v, out, lse, 0.25, False)
        launched.clear()
        launch.triton_backward(grad_out, None, q, k, v, out, lse, 0.25, False)
    return launched


def test_plain_kernels_get_the_whole_padded_copies():
    launched = _recorded_backward(*_case())
    assert [name for name, _ in launched] == [
        "memory_read_bwd_kernel_prepare", "memory_read_bwd_kernel_dv",
        "memory_read_bwd_kernel_dkdq"]
    prepare = launched[0][1]
    # the strides the plan holds (those of a (B, C, 30) view of rows 32 apart), and the whole
    # allocation behind them
    assert (prepare["stride_cb"], prepare["stride_cc"], prepare["stride_pb"],
            prepare["stride_pc"]) == (24 * 32, 32, 16 * 32, 32)
    assert prepare["do_copy"].shape == (2, 24, 32) and prepare["q_copy"].shape == (1, 16, 32)
    assert prepare["dq"].shape == (1, 16, 30) and prepare["dq"].stride() == (16 * 32, 32, 1)
    for name, arguments in launched[1:]:
        assert arguments["do"] is prepare["do_copy"], name
        assert arguments["q"] is prepare["q_copy"], name


def test_a_gluon_launch_gets_the_views():
    """A PreparedBackward holding a Gluon dV launch gives it the (B, C, HW) views."""
    _recorded_backward(*_case())
    [kept] = [prepared for prepared in kept_launches._prepared.values()
              if isinstance(prepared, backward_launcher.PreparedBackward)]
    assert kept.plain
    seen = []
    gluon = backward_launcher.GluonDvLaunch(lambda q, k, do, lse, dv: seen.append((q, do)))
    with_gluon = dataclasses.replace(kept, dv=gluon)
    assert not with_gluon.plain
    grad_out, q, k, v, out, lse = _case(seed=1)
    with running.recording(lambda *arguments: None):
        with_gluon(grad_out, None, q, k, v, out, lse, None)
    [(q_copy, do_copy)] = seen
    assert q_copy.shape == q.shape and do_copy.shape == grad_out.shape
    assert q_copy.stride() == (16 * 32, 32, 1) and do_copy.stride() == (24 * 32, 32, 1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_kept_backwards_with_whole_copies_read_right(deterministic):
    """Three reads of one layout (planned once, then kept) against float64, dQ by atomics
    and by the deterministic dQ kernel."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for seed in range(3):
            q, k, v = random_inputs(SHAPE["B"], SHAPE["Bq"], SHAPE["Ck"], SHAPE["Cv"],
                                    SHAPE["HW"], SHAPE["N"], torch.float32, "cpu", seed=seed)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            grad = torch.randn(SHAPE["B"], SHAPE["Cv"], SHAPE["HW"],
                               generator=torch.Generator().manual_seed(seed))
            memory_read(*leaves, backend="triton").backward(grad)
            doubles = [t.double().requires_grad_() for t in (q, k, v)]
            scores = torch.einsum("bci,bcj->bij", doubles[0].expand(SHAPE["B"], -1, -1),
                                  doubles[1]) / SHAPE["Ck"] ** 0.5
            torch.einsum("bij,bcj->bci", scores.softmax(-1), doubles[2]).backward(grad.double())
            for leaf, double in zip(leaves, doubles, strict=True):
                torch.testing.assert_close(leaf.grad.double(), double.grad, rtol=1e-4,
                                           atol=1e-4)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert sum(isinstance(prepared, backward_launcher.PreparedBackward)
               for prepared in kept_launches._prepared.values()) == 1
