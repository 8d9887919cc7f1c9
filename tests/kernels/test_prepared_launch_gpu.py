"""Kept launches on a GPU (compiled Triton, not the interpreter; tests/kernels/
test_prepared_launch.py has the rest). memory_read drops a kept launch that fails and plans
the call again, silently: these tests call each kept pass directly, so that a failure shows
its own traceback, and count the plans of repeated reads, which stay at one per kernel only
where the kept launches ran.
"""
import pytest
import torch

from reference import reference_read, reference_select, reference_usage
from helpers import (TOLERANCE, check_read, random_inputs, read_with_grads, reference_with_grads,
                     relative_error)
from stm_kernels import memory_read
from stm_kernels.backends.triton import kept_launches, launch, running

pytestmark = [pytest.mark.gpu,
              # the kernels, never the torch backend's fallback, compute every result here
              pytest.mark.filterwarnings("error::stm_kernels.FallbackWarning"),
              pytest.mark.usefixtures("fresh_launches")]

# B, Bq, Ck, Cv, HW, N: the memory split in several parts on any GPU (a merge launch)
SHAPE = (2, 1, 64, 96, 300, 4000)


def _kept(kind):
    [kept] = [p for p in kept_launches._prepared.values() if type(p).__name__ == kind]
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
    expected, expected_lse, _ = reference_read(q64, k64, v64, similarity=similarity)
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
        options = dict(scale=scale, similarity=similarity, device="cuda")
        expected_scores, expected_indices = reference_select(q, k, 7, **options)
        assert (indices == expected_indices).float().mean() > 0.99  # fp16 near-ties may swap
        assert torch.allclose(scores.double(), expected_scores, atol=2e-2)
        expected_usage = reference_usage(q, k, lse, **options)
        assert torch.allclose(usage.double(), expected_usage, rtol=1e-2, atol=1e-4)
    assert plannings == {"select": 1, "usage": 1}


@pytest.fixture
def launch_routes(monkeypatch):
    """{"direct": kernels launched by a kept launch's DirectLaunch, "triton": through running.run
    (Triton's binder)}, counted as they happen."""
    from stm_kernels.backends.triton.direct_launch import DirectLaunch
    counts, real_run, real_direct = {"direct": 0, "triton": 0}, running.run, DirectLaunch.__call__

    def run(*args, **kwargs):
        counts["triton"] += 1
        return real_run(*args, **kwargs)

    def direct(self, tensors):
        launched = real_direct(self, tensors)
        counts["direct"] += launched
        return launched

    monkeypatch.setattr(running, "run", run)
    monkeypatch.setattr(DirectLaunch, "__call__", direct)
    return counts


def _misaligned_copy(tensor):
    """tensor's values in a tensor of its shape, strides and dtype starting off 16 bytes."""
    storage = torch.empty(tensor.numel() + 8, dtype=tensor.dtype, device=tensor.device)
    view = storage[1:1 + tensor.numel()].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 16
    return view


def test_kept_launches_go_direct_and_compute_what_tritons_launch_does(launch_routes):
    dtype = torch.bfloat16
    memory_read(*random_inputs(*SHAPE, dtype, "cuda", seed=0), backend="triton")
    assert launch_routes == {"direct": 0, "triton": 2}  # planned: the forward and its merge
    q, k, v = random_inputs(*SHAPE, dtype, "cuda", seed=5)
    direct = memory_read(q, k, v, backend="triton")
    assert launch_routes == {"direct": 2, "triton": 2}
    with kept_launches.binding_every_launch():
        through_triton = memory_read(q, k, v, backend="triton")
    assert launch_routes == {"direct": 2, "triton": 4}
    assert torch.equal(direct, through_triton)
    assert relative_error(direct, reference_read(q, k, v)[0]) < TOLERANCE[dtype]

    # values off 16 bytes: the forward kernel goes through Triton (another compile), the merge
    # of its aligned buffers still directly
    misaligned = memory_read(q, k, _misaligned_copy(v), backend="triton")
    assert launch_routes == {"direct": 3, "triton": 5}
    assert relative_error(misaligned, direct.double()) < TOLERANCE[dtype]

    # the backward: planned once, then direct
    read_with_grads(q, k, v, backend="triton")
    planned = dict(launch_routes)
    results = read_with_grads(q, k, v, seed=7, backend="triton")
    assert launch_routes["triton"] == planned["triton"]
    assert launch_routes["direct"] - planned["direct"] >= 4  # forward, merge, dV, dK/dQ
    check_read(results, reference_with_grads(q, k, v, seed=7), dtype)
