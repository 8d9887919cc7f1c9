"""The warp-specialised Gluon dK/dQ kernel (stm_kernels/experimental/gluon_backward.py).

Tested as the Gluon forward is: compiled for sm_90 (tools/tests/test_gluon_compile.py: no
spills, shared memory within 227 KiB), run on CPU by the emulation of tests/gluon_emulation.py
(ring indices, barrier phases, the ping-pong of the two MMA warpgroups, the dK hand-over,
masks, the dQ atomics, the host launcher), and on a GPU (`pytest -m gpu`) against float64.
"""
import math
import random

import pytest
import torch

triton = pytest.importorskip("triton")

from gluon_cases import (backward_inputs, backward_reference, padded_rows,  # noqa: E402
                         pretended_h100)
from gluon_emulation import emulate  # noqa: E402
from helpers import relative_error  # noqa: E402
from stm_kernels.experimental import gluon_backward  # noqa: E402
from stm_kernels.backends.triton import (backward_launcher, devices, gluon_opt_in,  # noqa: E402
                                         kept_launches, running)

H100_SHARED_MEMORY = 227 * 1024
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
Config = gluon_backward.WarpSpecializedBackwardConfig

needs_gluon = pytest.mark.skipif(not gluon_backward.AVAILABLE,
                                 reason=f"Gluon unavailable: {gluon_backward.UNAVAILABLE_REASON}")


@pytest.mark.parametrize("Cv", [512, 256])
def test_default_config_fits_shared_memory(Cv):
    assert gluon_backward.shared_memory_bytes(128, Cv, 2, Config()) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("Cv, box", [(512, 256), (384, 128), (96, 32), (48, 16), (256, 256)])
def test_value_box_divides_the_channels(Cv, box):
    assert gluon_backward.value_box(Cv) == box


def test_one_stage_ring_is_refused():
    """Query block j takes ring slot j % num_stages; with one stage a warpgroup can wait for
    a round two ahead of the slot's barrier, which its phase parity cannot tell (the emulation
    deadlocked or read stale tiles there)."""
    q, k, v, do = (torch.randn(1, 128, 64, dtype=torch.bfloat16) for _ in range(4))
    reason = gluon_backward._shape_reason(q, k, v, do, Config(num_stages=1))
    assert reason is not None and "at least 2" in reason


def test_unsupported_reason_on_cpu():
    q, k, v, do = (torch.randn(1, 128, 8, dtype=torch.bfloat16) for _ in range(4))
    assert gluon_backward.unsupported_reason(q, k, v, do) is not None


# --------------------------------------------------------------------------- CPU emulation


def _reference(q, k, v, do, scale, l2):
    """(dq, dk, lse, delta) in float64: autograd of the naive read."""
    ref = backward_reference(q, k, v, do, scale, l2)
    return ref.dq, ref.dk, ref.lse, ref.delta


def _run(q, k, v, do, scale, l2, config):
    """The launcher's call: padded q and dO, float32 lse and delta, zeroed float32 dq (with the
    padded query's strides), NaN-poisoned dk."""
    _, _, lse, delta = _reference(q, k, v, do, scale, l2)
    q, do = padded_rows(q), padded_rows(do)
    dq = torch.zeros(q.shape[:2] + (q.stride(1),))[:, :, :q.shape[2]]
    dk = torch.full(k.shape, float("nan"), dtype=k.dtype)
    gluon_backward.ws_backward_dkdq(q, k, v, do, lse.float(), delta.float(), dq, dk,
                                    scale=scale, l2=l2, config=config)
    return dq, dk


EMULATED_CASES = [
    # B, Bq, Ck, Cv, HW, N, l2, dtype, config, batch_gap
    pytest.param(1, 1, 32, 48, 45, 111, False, torch.float16, dict(), 0,
                 id="ragged-3-value-boxes"),
    pytest.param(2, 1, 16, 32, 70, 130, True, torch.bfloat16, dict(num_stages=2), 0,
                 id="broadcast-query-l2"),
    pytest.param(1, 1, 16, 32, 100, 64, False, torch.float16, dict(num_stages=3), 0,
                 id="three-stages-shared-by-both-warpgroups"),
    pytest.param(2, 2, 32, 64, 33, 64, False, torch.float16, dict(block_m=16, num_stages=4),
                 0, id="block-m-16-four-stages"),
    pytest.param(2, 2, 16, 32, 16, 100, True, torch.float16, dict(num_stages=3), 8,
                 id="per-object-launches-one-query-block"),
]


@pytest.fixture
def emulated_kernel(monkeypatch):
    """The Gluon kernel replaced by its CPU emulation, its device checks passed."""
    return emulate(monkeypatch, gluon_backward, "memory_read_ws_bwd_dkdq_kernel")


@needs_gluon
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, l2, dtype, config, batch_gap", EMULATED_CASES)
def test_emulated_kernel_matches_reference(emulated_kernel, B, Bq, Ck, Cv, HW, N, l2, dtype,
                                           config, batch_gap):
    """The kernel source and its launcher, emulated on CPU, against float64 autograd of the
    naive read: dK written whole (NaN-poisoned), dQ's terms added into dq, both scaled."""
    q, k, v, do = backward_inputs(B, Bq, Ck, Cv, HW, N, dtype, batch_gap=batch_gap)
    scale = 1 / math.sqrt(Ck)
    config = Config(**config)
    ref_dq, ref_dk, _, _ = _reference(q, k, v, do, scale, l2)
    for seed in range(2):  # different interleavings of the partitions and TMA completions
        random.seed(seed)
        dq, dk = _run(q, k, v, do, scale, l2, config)
        assert not dk.isnan().any()
        assert relative_error(dk, ref_dk) < TOLERANCE[dtype], (seed, relative_error(dk, ref_dk))
        assert relative_error(dq, ref_dq) < TOLERANCE[dtype], (seed, relative_error(dq, ref_dq))
    grid, _ = emulated_kernel.launches[0]
    assert grid == (triton.cdiv(N, config.block_n), 1 if batch_gap else B)
    assert len(emulated_kernel.launches) == 2 * (B if batch_gap else 1)


@needs_gluon
def test_emulated_kernel_masks_positions_past_the_memory(emulated_kernel):
    """L2 scores of long keys (scale (2 q.k - |k|^2)): the lse is so negative that
    exp2(0 - lse), the probability of a TMA-zeroed position past N, overflows float32; the
    kernel zeroes those rows (else inf * 0 reaches dQ as NaN)."""
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16, seed=3)
    k.mul_(40)  # in place: k keeps its 16-byte row stride
    scale = 1 / math.sqrt(16)
    ref_dq, ref_dk, lse, _ = _reference(q, k, v, do, scale, True)
    assert lse.max() * math.log2(math.e) < -128  # exp2(-lse2) overflows float32
    dq, dk = _run(q, k, v, do, scale, True, Config())
    # the softmax is one-hot here, the gradients nearly 0: compared absolutely
    assert dq.isfinite().all() and dk.isfinite().all()
    assert torch.allclose(dq.double(), ref_dq, atol=1e-3)
    assert torch.allclose(dk.double(), ref_dk, atol=1e-3)


@needs_gluon
def test_emulated_kernel_fails_without_the_scale(emulated_kernel, monkeypatch):
    """The comparison can fail: a kernel given the wrong derivative factor is caught."""
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16)
    scale = 0.25
    ref_dq, ref_dk, _, _ = _reference(q, k, v, do, scale, False)
    original = gluon_backward.prepare

    def unscaled(*args, **kwargs):
        launch = original(*args, **kwargs)
        launch.fixed["dq_scale"] = 1.0
        return launch

    monkeypatch.setattr(gluon_backward, "prepare", unscaled)
    dq, dk = _run(q, k, v, do, scale, False, Config())
    assert relative_error(dk, ref_dk) > 1.0 and relative_error(dq, ref_dq) > 1.0


@needs_gluon
@pytest.mark.parametrize("l2", [False, True], ids=["dot", "l2"])
def test_emulated_kernel_behind_memory_read(monkeypatch, emulated_kernel, fresh_launches, l2):
    """memory_read's backward opted into the Gluon dK/dQ kernel (warp_specialized_backward),
    the forward and dV kernels in Triton's interpreter (the Gluon dV kernel, opted in with it,
    cannot run on CPU tensors: it warns): gradients against float64, planned once, and the
    kept backward computing new inputs' gradients with the same launch."""
    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    if not devices.INTERPRETING:
        pytest.skip("the forward and dV kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setattr(running, "_warned", set())
    plannings, real = [], gluon_backward.prepare
    monkeypatch.setattr(gluon_backward, "prepare",
                        lambda *a, **kw: plannings.append(1) or real(*a, **kw))
    with gluon_opt_in.warp_specialized_backward(), devices.pretend(pretended_h100()), \
            pytest.warns(RuntimeWarning, match="plain Triton dV kernel"):
        for seed in range(2):
            q, k, v, do = backward_inputs(2, 1, 32, 64, 45, 136, torch.float16, seed=seed)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            random.seed(seed)
            memory_read(q, k, v, backend="triton", similarity="l2" if l2 else "dot").backward(do)
            ref_dq, ref_dk, _, _ = _reference(q.detach(), k.detach(), v.detach(), do,
                                              1 / math.sqrt(32), l2)
            assert relative_error(q.grad, ref_dq) < 1e-2, seed
            assert relative_error(k.grad, ref_dk) < 1e-2, seed
    assert len(plannings) == 1 and len(emulated_kernel.launches) == 2


@needs_gluon
def test_opt_in_warns_and_falls_back_where_it_cannot_run(fresh_launches):
    """On CPU tensors (no Hopper GPU) the opted-in backward warns once and takes the plain
    dK/dQ kernel: the gradients are still right."""
    from stm_kernels import memory_read
    if not devices.INTERPRETING:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU")
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with gluon_opt_in.warp_specialized_backward(), \
            pytest.warns(RuntimeWarning, match="WARP_SPECIALIZED_BACKWARD=1 ignored"):
        memory_read(q, k, v, backend="triton").backward(do)
    ref_dq, ref_dk, _, _ = _reference(q.detach(), k.detach(), v.detach(), do, 0.25, False)
    assert relative_error(k.grad, ref_dk) < 1e-2 and relative_error(q.grad, ref_dq) < 1e-2


def test_prepare_names_the_argument_with_the_wrong_shape(monkeypatch):
    monkeypatch.setattr(gluon_backward, "unsupported_reason", lambda *args, **kwargs: None)
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16)
    lse = delta = torch.zeros(1, 20)
    with pytest.raises(ValueError, match=r"dk must have shape \(1, 16, 70\)"):
        gluon_backward.prepare(q, k, v, do, lse, delta, torch.zeros(1, 16, 20),
                               torch.empty(1, 16, 71, dtype=k.dtype), scale=1.0, l2=False)


# --------------------------------------------------------------------------- on a GPU

GPU_CASES = [
    # B, Bq, Ck, Cv, HW, N, l2, batch_gap
    (1, 1, 128, 512, 45, 111, False, 0),
    (1, 1, 128, 512, 1620, 16200, False, 0),
    (3, 1, 128, 512, 100, 1000, True, 0),
    (2, 2, 64, 256, 100, 333, False, 16),
]


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("config", [Config(), Config(block_m=16, num_stages=4)],
                         ids=["default", "m16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, l2, batch_gap", GPU_CASES)
def test_gpu_matches_reference(dtype, config, B, Bq, Ck, Cv, HW, N, l2, batch_gap):
    """Both tilings tune times, against float64."""
    q, k, v, do = backward_inputs(B, Bq, Ck, Cv, HW, N, dtype, batch_gap=batch_gap, device="cuda")
    reason = gluon_backward.unsupported_reason(padded_rows(q), k, v, padded_rows(do), config)
    if reason is not None:
        pytest.skip(reason)
    scale = 1 / math.sqrt(Ck)
    ref_dq, ref_dk, lse, delta = _reference(q, k, v, do, scale, l2)
    q, do = padded_rows(q), padded_rows(do)
    dq = torch.zeros(q.shape[:2] + (q.stride(1),), device="cuda")[:, :, :q.shape[2]]
    dk = torch.full(k.shape, float("nan"), dtype=k.dtype, device="cuda")
    gluon_backward.ws_backward_dkdq(q, k, v, do, lse.float().cuda(), delta.float().cuda(), dq,
                                    dk, scale=scale, l2=l2, config=config)
    torch.cuda.synchronize()
    assert relative_error(dk.cpu(), ref_dk) < TOLERANCE[dtype]
    assert relative_error(dq.cpu(), ref_dq) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("l2", [False, True], ids=["dot", "l2"])
def test_gpu_opted_in_backward_matches_reference(monkeypatch, fresh_launches, l2):
    """memory_read's backward with the opt-in on a GPU (the launcher's padded q and dO, HW =
    1,620 rows off 16 elements): the Gluon kernel runs (no fallback warning), twice through
    its kept launch, and the gradients match float64."""
    import warnings

    from stm_kernels import memory_read
    monkeypatch.setattr(running, "_warned", set())
    shape = (2, 1, 128, 512, 1620, 16200)
    with gluon_opt_in.warp_specialized_backward(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WARP_SPECIALIZED_BACKWARD")
        for seed in range(2):
            q, k, v, do = backward_inputs(*shape, torch.bfloat16, seed=seed, device="cuda")
            reason = gluon_backward.read_unsupported_reason(q, k, v)
            if reason is not None:
                pytest.skip(reason)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            memory_read(q, k, v, backend="triton", similarity="l2" if l2 else "dot").backward(do)
            ref_dq, ref_dk, _, _ = _reference(*(t.detach() for t in (q, k, v, do)),
                                              1 / math.sqrt(128), l2)
            assert relative_error(k.grad.cpu(), ref_dk) < TOLERANCE[torch.bfloat16], seed
            assert relative_error(q.grad.cpu(), ref_dq) < TOLERANCE[torch.bfloat16], seed
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)
