"""Kept launches on a GPU (compiled Triton, not the interpreter; tests/kernels/
test_prepared_launch.py has the rest). memory_read drops a kept launch that fails and plans
the call again, silently: these tests call each kept pass directly, so that a failure shows
its own traceback, and count the plans of repeated reads, which stay at one per kernel only
where the kept launches ran.
"""
import pytest
import torch

from helpers import (TOLERANCE, check_read, random_inputs, read_with_grads, reference_with_grads,
                     relative_error)
from stm_kernels import memory_read
from stm_kernels.backends import pytorch
from stm_kernels.backends.triton import launch

pytestmark = [pytest.mark.gpu,
              # the kernels, never the torch backend's fallback, compute every result here
              pytest.mark.filterwarnings("error::stm_kernels.FallbackWarning"),
              pytest.mark.usefixtures("fresh_launches")]

# B, Bq, Ck, Cv, HW, N: the memory split in several parts on any GPU (a merge launch)
SHAPE = (2, 1, 64, 96, 300, 4000)


def _kept(kind):
    [kept] = [p for p in launch._prepared.values() if type(p).__name__ == kind]
    return kept


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_kept_forward_and_backward_run_compiled_on_new_inputs(plannings, similarity,
                                                              deterministic):
    dtype = torch.bfloat16
    torch.use_deterministic_algorithms(deterministic)
    try:
        read_with_grads(*random_inputs(*SHAPE, dtype, "cuda", seed=0), backend="triton",
                        similarity=similarity)
        planned = dict(plannings)
        # each kept pass called directly on other inputs: its exceptions propagate
        q, k, v = random_inputs(*SHAPE, dtype, "cuda", seed=5)
        out, lse = _kept("PreparedForward")(q, k, v, None)
        grad_out = torch.randn_like(out)
        gradients = _kept("PreparedBackward")(grad_out, None, q, k, v, out, lse, None)
        # the same inputs through memory_read: nothing is planned again
        results = read_with_grads(q, k, v, seed=7, backend="triton", similarity=similarity)
    finally:
        torch.use_deterministic_algorithms(False)
    assert plannings == planned, "a kept launch failed and its call was planned again"
    check_read(results, reference_with_grads(q, k, v, seed=7, similarity=similarity), dtype)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    expected, expected_lse = memory_read(q64, k64, v64, backend="naive", similarity=similarity,
                                         return_lse=True)
    expected.backward(grad_out.double().cpu())
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert relative_error(lse, expected_lse) < 1e-3
    for name, actual, reference in zip(("dq", "dk", "dv"), gradients, (q64.grad, k64.grad,
                                                                        v64.grad), strict=True):
        assert relative_error(actual, reference) < 3 * TOLERANCE[dtype], name


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_kept_selection_and_usage_run_compiled_on_new_inputs(plannings, similarity):
    l2, scale = similarity == "l2", 0.125
    for seed in (0, 3):
        q, k, _ = random_inputs(*SHAPE, torch.float16, "cuda", seed=seed)
        lse = torch.randn(SHAPE[0], SHAPE[4], device="cuda") + 8.0
        scores, indices = launch.triton_select(q, k, 7, scale, l2)
        usage = launch.triton_usage(q, k, lse, scale, l2)
        expected_scores, expected_indices = pytorch.select(q.double(), k.double(), 7, scale, l2,
                                                           None)
        assert (indices == expected_indices).float().mean() > 0.99  # fp16 near-ties may swap
        assert torch.allclose(scores.double(), expected_scores, atol=2e-2)
        expected_usage = pytorch.usage(q.double(), k.double(), lse.double(), scale, l2, None)
        assert torch.allclose(usage.double(), expected_usage.double(), rtol=1e-2, atol=1e-4)
    assert plannings == {"select": 1, "usage": 1}
