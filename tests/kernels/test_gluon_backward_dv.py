"""The warp-specialised Gluon dV kernel (stm_kernels/experimental/gluon_backward_dv.py).

Tested as the Gluon dK/dQ kernel is: compiled for sm_90 (tools/tests/test_gluon_compile.py: no
spills, shared memory within 227 KiB), run on CPU by the emulation of tests/gluon_emulation.py
(ring indices, barrier phases and counts of the P^T warpgroup and the two dV warpgroups, masks,
the TMA-stored halves, the host launcher), and on a GPU (`pytest -m gpu`) against float64.
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
from stm_kernels.experimental import gluon_backward_dv  # noqa: E402
from stm_kernels.backends.triton import (backward_launcher, devices, gluon_opt_in,  # noqa: E402
                                         kept_launches, running)

H100_SHARED_MEMORY = 227 * 1024
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
Config = gluon_backward_dv.WarpSpecializedDvConfig

needs_gluon = pytest.mark.skipif(
    not gluon_backward_dv.AVAILABLE,
    reason=f"Gluon unavailable: {gluon_backward_dv.UNAVAILABLE_REASON}")


@pytest.mark.parametrize("config", [Config(), Config(num_p=3)], ids=["default", "num-p-3"])
def test_configs_fit_shared_memory(config):
    assert gluon_backward_dv.shared_memory_bytes(128, 512, 2, config) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("Cv, refused", [(512, False), (256, False), (32, False), (384, True),
                                         (96, True), (16, True), (1024, True)])
def test_value_width_must_be_two_power_of_two_halves(Cv, refused):
    """Each dV warpgroup's channels are one TMA box stored whole: a wider box would write
    into the next channels."""
    q, k = torch.randn(1, 128, 64), torch.randn(1, 128, 64)
    do, dv = torch.randn(1, Cv, 64), torch.randn(1, Cv, 64)
    reason = gluon_backward_dv._shape_reason(q, k, do, dv, Config())
    assert (reason is not None and "twice a power of two" in reason) == refused, reason


def test_other_block_sizes_are_refused():
    """dV is staged in a dO box: the query step must be as long as the memory block."""
    q, k, do, dv = (torch.randn(1, 128, 64) for _ in range(4))
    reason = gluon_backward_dv._shape_reason(q, k, do, dv, Config(block_m=32))
    assert reason is not None and "64" in reason


def test_unsupported_reason_on_cpu():
    q, k, do, dv = (torch.randn(1, 128, 8, dtype=torch.bfloat16) for _ in range(4))
    assert gluon_backward_dv.unsupported_reason(q, k, do, dv) is not None


# --------------------------------------------------------------------------- CPU emulation


def _reference(q, k, v, do, scale, l2):
    """(dv, lse) in float64: autograd of the naive read."""
    ref = backward_reference(q, k, v, do, scale, l2)
    return ref.dv, ref.lse


def _poisoned_dv(v):
    """A NaN-filled dv shaped like v, rows of round8(N) as v's (TMA's 16-byte strides)."""
    width = -(-v.shape[2] // 8) * 8
    dv = torch.full(v.shape[:2] + (width,), float("nan"), dtype=v.dtype, device=v.device)
    return dv[:, :, :v.shape[2]]


def _run(q, k, v, do, scale, l2, config):
    """The launcher's call: padded q and dO, float32 lse, a NaN-poisoned dv."""
    _, lse = _reference(q, k, v, do, scale, l2)
    dv = _poisoned_dv(v)
    gluon_backward_dv.ws_backward_dv(padded_rows(q), k, padded_rows(do), lse.float(), dv,
                                     scale=scale, l2=l2, config=config)
    return dv


EMULATED_CASES = [
    # B, Bq, Ck, Cv, HW, N, l2, dtype, config, batch_gap
    pytest.param(1, 1, 32, 64, 45, 111, False, torch.float16, dict(), 0,
                 id="ragged-memory-one-query-block"),
    pytest.param(2, 1, 16, 32, 150, 130, True, torch.bfloat16, dict(), 0,
                 id="broadcast-query-l2-three-query-blocks"),
    pytest.param(1, 1, 16, 32, 200, 64, False, torch.float16, dict(num_stages=3, num_p=1), 0,
                 id="three-stages-one-p-slot"),
    pytest.param(2, 2, 32, 64, 70, 64, False, torch.float16, dict(num_p=3), 0,
                 id="three-p-slots"),
    pytest.param(2, 1, 16, 32, 100, 100, True, torch.float16, dict(), 8,
                 id="per-object-launches"),
]


@pytest.fixture
def emulated_kernel(monkeypatch):
    """The Gluon kernel replaced by its CPU emulation, its device checks passed."""
    return emulate(monkeypatch, gluon_backward_dv, "memory_read_ws_bwd_dv_kernel")


@needs_gluon
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, l2, dtype, config, batch_gap", EMULATED_CASES)
def test_emulated_kernel_matches_reference(emulated_kernel, B, Bq, Ck, Cv, HW, N, l2, dtype,
                                           config, batch_gap):
    """The kernel source and its launcher, emulated on CPU, against float64 autograd of the
    naive read: dV written whole (NaN-poisoned), both halves of the channels."""
    q, k, v, do = backward_inputs(B, Bq, Ck, Cv, HW, N, dtype, batch_gap=batch_gap)
    scale = 1 / math.sqrt(Ck)
    config = Config(**config)
    ref_dv, _ = _reference(q, k, v, do, scale, l2)
    for seed in range(2):  # different interleavings of the partitions and TMA completions
        random.seed(seed)
        dv = _run(q, k, v, do, scale, l2, config)
        assert not dv.isnan().any()
        assert relative_error(dv, ref_dv) < TOLERANCE[dtype], (seed, relative_error(dv, ref_dv))
        half = Cv // 2  # each warpgroup's channels on their own
        assert relative_error(dv[:, half:], ref_dv[:, half:]) < TOLERANCE[dtype], seed
    grid, _ = emulated_kernel.launches[0]
    assert grid == (triton.cdiv(N, config.block_n), 1 if batch_gap else B)
    assert len(emulated_kernel.launches) == 2 * (B if batch_gap else 1)


@needs_gluon
def test_emulated_kernel_masks_positions_past_the_memory(emulated_kernel):
    """L2 scores of long keys: the lse is so negative that exp2(0 - lse), the probability of
    a TMA-zeroed position past N, overflows float32; those rows are zeroed, and stored
    nowhere (the TMA store stops at N)."""
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16, seed=3)
    k.mul_(40)  # in place: k keeps its 16-byte row stride
    scale = 1 / math.sqrt(16)
    ref_dv, lse = _reference(q, k, v, do, scale, True)
    assert lse.max() * math.log2(math.e) < -128  # exp2(-lse2) overflows float32
    dv = _run(q, k, v, do, scale, True, Config())
    assert dv.isfinite().all()
    assert relative_error(dv, ref_dv) < TOLERANCE[torch.float16]


@needs_gluon
def test_emulated_kernel_fails_with_a_wrong_scale(emulated_kernel, monkeypatch):
    """The comparison can fail: a kernel given the wrong score scale is caught."""
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16)
    scale = 0.25
    ref_dv, _ = _reference(q, k, v, do, scale, False)
    original = gluon_backward_dv.prepare

    def rescaled(*args, **kwargs):
        launch = original(*args, **kwargs)
        launch.fixed["qk_scale"] *= 2
        return launch

    monkeypatch.setattr(gluon_backward_dv, "prepare", rescaled)
    dv = _run(q, k, v, do, scale, False, Config())
    assert relative_error(dv, ref_dv) > 0.1


@needs_gluon
@pytest.mark.parametrize("l2", [False, True], ids=["dot", "l2"])
def test_emulated_kernel_behind_memory_read(monkeypatch, emulated_kernel, fresh_launches, l2):
    """memory_read's backward opted in (warp_specialized_backward) with the Gluon dV kernel
    emulated, the forward and the other backward kernels in Triton's interpreter: gradients
    against float64, the dV kernel planned once and kept, the kept backward computing new
    inputs' gradients with the same launch; the dK/dQ kernel, which cannot run here, fell
    back to the plain one with its warning."""
    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    if not devices.INTERPRETING:
        pytest.skip("the forward and dK/dQ kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setattr(running, "_warned", set())
    plannings, real = [], gluon_backward_dv.prepare
    monkeypatch.setattr(gluon_backward_dv, "prepare",
                        lambda *a, **kw: plannings.append(1) or real(*a, **kw))
    with gluon_opt_in.warp_specialized_backward(), devices.pretend(pretended_h100()), \
            pytest.warns(RuntimeWarning, match="dK/dQ kernel"):
        for seed in range(2):
            q, k, v, do = backward_inputs(2, 1, 32, 64, 45, 136, torch.float16, seed=seed)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            random.seed(seed)
            memory_read(q, k, v, backend="triton", similarity="l2" if l2 else "dot").backward(do)
            ref_dv, _ = _reference(q.detach(), k.detach(), v.detach(), do, 1 / math.sqrt(32), l2)
            assert relative_error(v.grad, ref_dv) < 1e-2, seed
    assert len(plannings) == 1 and len(emulated_kernel.launches) == 2
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch)
    assert not isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)


@needs_gluon
def test_both_emulated_kernels_behind_memory_read(monkeypatch, emulated_kernel, fresh_launches):
    """The whole opted-in backward: the Gluon dV and dK/dQ kernels both emulated, the forward
    in the interpreter; no fallback warning, the three gradients against float64, and the kept
    backward holding both Gluon launches for a second call on new inputs."""
    import warnings

    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    from stm_kernels.experimental import gluon_backward
    if not devices.INTERPRETING:
        pytest.skip("the forward needs TRITON_INTERPRET=1 on CPU")
    dkdq = emulate(monkeypatch, gluon_backward, "memory_read_ws_bwd_dkdq_kernel")
    monkeypatch.setattr(running, "_warned", set())
    with gluon_opt_in.warp_specialized_backward(), devices.pretend(pretended_h100()), \
            warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WARP_SPECIALIZED_BACKWARD")
        for seed in range(2):
            q, k, v, do = backward_inputs(2, 1, 32, 64, 45, 136, torch.bfloat16, seed=seed)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            random.seed(seed)
            memory_read(q, k, v, backend="triton", similarity="l2").backward(do)
            ref = backward_reference(q, k, v, do, 1 / math.sqrt(32), True)
            for tensor, reference in ((q, ref.dq), (k, ref.dk), (v, ref.dv)):
                error = relative_error(tensor.grad, reference)
                assert error < TOLERANCE[torch.bfloat16], (seed, error)
    assert len(emulated_kernel.launches) == 2 and len(dkdq.launches) == 2
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch)
    assert isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)


@needs_gluon
def test_deterministic_backward_keeps_the_gluon_dv_kernel(monkeypatch, emulated_kernel,
                                                          fresh_launches):
    """Under torch.use_deterministic_algorithms the dV kernel (no atomics) stays Gluon; dK and
    dQ take the deterministic kernels (the Gluon dK/dQ kernel adds dQ with atomics), without
    a warning; the gradients are right and a second call gives the same bits."""
    import warnings

    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    if not devices.INTERPRETING:
        pytest.skip("the forward and dK/dQ kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setattr(running, "_warned", set())
    q, k, v, do = backward_inputs(2, 1, 32, 64, 45, 136, torch.float16, seed=4)
    grads = []
    with gluon_opt_in.warp_specialized_backward(), devices.pretend(pretended_h100()), \
            warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WARP_SPECIALIZED_BACKWARD")
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                memory_read(*leaves, backend="triton").backward(do)
                grads.append([t.grad for t in leaves])
        finally:
            torch.use_deterministic_algorithms(False)
    ref = backward_reference(q, k, v, do, 1 / math.sqrt(32), False)
    for grad, reference in zip(grads[0], (ref.dq, ref.dk, ref.dv), strict=True):
        assert relative_error(grad, reference) < TOLERANCE[torch.float16]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch) and kept.dq is not None


def _sm90_running_by_default(monkeypatch, kernels):
    """sm_90's table with these Gluon kernels on by default (Architecture.warp_specialized),
    as a GPU run that shows them faster would set it."""
    import dataclasses

    from stm_kernels.backends.triton import tilings
    default = dataclasses.replace(tilings.ARCHITECTURES["sm_90"],
                                  warp_specialized=frozenset(kernels))
    monkeypatch.setitem(tilings.ARCHITECTURES, "sm_90", default)


@needs_gluon
@pytest.mark.parametrize("switch", [None, "0"], ids=["unset", "off"])
def test_an_architecture_default_runs_without_the_opt_in(monkeypatch, emulated_kernel,
                                                         fresh_launches, switch):
    """Where the architecture lists the dV kernel (tilings: Architecture.warp_specialized),
    the backward takes it without being asked, and STM_KERNELS_WARP_SPECIALIZED_BACKWARD=0
    turns it off; dK/dQ, not listed, stays plain; no warning either way."""
    import warnings

    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    if not devices.INTERPRETING:
        pytest.skip("the forward and dK/dQ kernels need TRITON_INTERPRET=1 on CPU")
    _sm90_running_by_default(monkeypatch, {"dv"})
    if switch is None:
        monkeypatch.delenv(gluon_opt_in.WARP_SPECIALIZED_BACKWARD_ENV, raising=False)
    else:
        monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_BACKWARD_ENV, switch)
    q, k, v, do = backward_inputs(2, 1, 32, 64, 45, 136, torch.float16, seed=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with devices.pretend(pretended_h100()), warnings.catch_warnings():
        warnings.simplefilter("error")
        memory_read(q, k, v, backend="triton").backward(do)
    ref = backward_reference(q, k, v, do, 1 / math.sqrt(32), False)
    assert relative_error(v.grad, ref.dv) < TOLERANCE[torch.float16]
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch) == (switch is None)
    assert len(emulated_kernel.launches) == (1 if switch is None else 0)
    assert not isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)


def test_an_architecture_refuses_a_gluon_kernel_it_cannot_name():
    """A misspelt name in Architecture.warp_specialized ("dV" for "dv") would leave the kernel
    opt-in without a word: the table refuses it."""
    import dataclasses

    from stm_kernels.backends.triton import tilings
    with pytest.raises(ValueError, match=r"names no Gluon kernel: \['dV'\]"):
        dataclasses.replace(tilings.ARCHITECTURES["sm_90"], warp_specialized=frozenset({"dV"}))
    with pytest.raises(ValueError, match=r"names no Gluon kernel: \['dV'\]"):
        dataclasses.replace(tilings.ARCHITECTURES["sm_90"], warp_specialized={"dV": 16200})


@pytest.mark.parametrize("fewest", [0, -1, 1.5, True, "16200"])
def test_an_architecture_refuses_a_memory_size_that_is_not_a_positive_integer(fewest):
    import dataclasses

    from stm_kernels.backends.triton import tilings
    with pytest.raises(ValueError, match="memory sizes must be positive integers"):
        dataclasses.replace(tilings.ARCHITECTURES["sm_90"], warp_specialized={"dv": fewest})


def test_an_architecture_runs_a_gluon_kernel_by_default_from_its_memory_size_on():
    """Architecture.warp_specialized: a set of names runs them at every memory size, a mapping
    from its N on; a kernel it does not name never runs by default."""
    import dataclasses

    from stm_kernels.backends.triton import tilings
    sm_90 = tilings.ARCHITECTURES["sm_90"]
    everywhere = dataclasses.replace(sm_90, warp_specialized=frozenset({"dv"}))
    from_n = dataclasses.replace(sm_90, warp_specialized={"forward": 16200, "dkdq": 1})
    assert [everywhere.runs_warp_specialized("dv", N) for N in (1, 10**9)] == [True, True]
    assert [from_n.runs_warp_specialized("forward", N) for N in (16199, 16200, 10**7)] == [
        False, True, True]
    assert from_n.runs_warp_specialized("dkdq", 1)
    assert not any(arch.runs_warp_specialized("dv", 10**9) for arch in (from_n, sm_90))
    assert dataclasses.replace(from_n).warp_specialized == {"forward": 16200, "dkdq": 1}


@needs_gluon
def test_an_architecture_default_that_cannot_run_falls_back_silently(monkeypatch,
                                                                      fresh_launches):
    """A default Gluon kernel that does not take the inputs (here: CPU tensors) gives way to
    the plain one without a warning: nobody asked for it."""
    import warnings

    from stm_kernels import memory_read
    from stm_kernels.backends.triton import devices
    if not devices.INTERPRETING:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU")
    _sm90_running_by_default(monkeypatch, {"dv", "dkdq"})
    monkeypatch.delenv(gluon_opt_in.WARP_SPECIALIZED_BACKWARD_ENV, raising=False)
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 72, torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with devices.pretend(pretended_h100()), warnings.catch_warnings():
        warnings.simplefilter("error")
        memory_read(q, k, v, backend="triton").backward(do)
    ref = backward_reference(q, k, v, do, 0.25, False)
    assert relative_error(v.grad, ref.dv) < 1e-2 and relative_error(k.grad, ref.dk) < 1e-2


@needs_gluon
def test_opt_in_warns_and_falls_back_where_it_cannot_run(monkeypatch, fresh_launches):
    """On CPU tensors (no Hopper GPU) the opted-in backward warns once for each Gluon kernel
    and takes the plain ones: the gradients are still right."""
    from stm_kernels import memory_read
    if not devices.INTERPRETING:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setattr(running, "_warned", set())
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 72, torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with gluon_opt_in.warp_specialized_backward(), \
            pytest.warns(RuntimeWarning) as caught:
        memory_read(q, k, v, backend="triton").backward(do)
    messages = [str(w.message) for w in caught]
    assert any("ignored (needs CUDA tensors); using the plain Triton dV kernel" in m
               for m in messages), messages
    assert any("using the plain Triton dK/dQ kernel" in m for m in messages), messages
    ref_dv, _ = _reference(q.detach(), k.detach(), v.detach(), do, 0.25, False)
    assert relative_error(v.grad, ref_dv) < 1e-2


def test_prepare_names_the_argument_with_the_wrong_shape(monkeypatch):
    monkeypatch.setattr(gluon_backward_dv, "unsupported_reason", lambda *args, **kwargs: None)
    q, k, v, do = backward_inputs(1, 1, 16, 32, 20, 70, torch.float16)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 20\)"):
        gluon_backward_dv.prepare(q, k, do, torch.zeros(1, 21), torch.empty_like(v), scale=1.0,
                                  l2=False)


# --------------------------------------------------------------------------- on a GPU

GPU_CASES = [
    # B, Bq, Ck, Cv, HW, N, l2, batch_gap
    (1, 1, 128, 512, 45, 111, False, 0),
    (1, 1, 128, 512, 1620, 16200, False, 0),
    (3, 1, 128, 512, 100, 1000, True, 0),
    (2, 2, 64, 256, 100, 336, False, 16),
]


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("config", [Config(), Config(num_p=3)], ids=["default", "num-p-3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, l2, batch_gap", GPU_CASES)
def test_gpu_matches_reference(dtype, config, B, Bq, Ck, Cv, HW, N, l2, batch_gap):
    """Both tilings tune times, against float64."""
    q, k, v, do = backward_inputs(B, Bq, Ck, Cv, HW, N, dtype, batch_gap=batch_gap, device="cuda")
    dv = _poisoned_dv(v)
    reason = gluon_backward_dv.unsupported_reason(padded_rows(q), k, padded_rows(do), dv, config)
    if reason is not None:
        pytest.skip(reason)
    scale = 1 / math.sqrt(Ck)
    ref_dv, lse = _reference(q, k, v, do, scale, l2)
    gluon_backward_dv.ws_backward_dv(padded_rows(q), k, padded_rows(do), lse.float().cuda(), dv,
                                     scale=scale, l2=l2, config=config)
    torch.cuda.synchronize()
    assert not dv.isnan().any()
    assert relative_error(dv.cpu(), ref_dv) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("l2", [False, True], ids=["dot", "l2"])
def test_gpu_opted_in_backward_matches_reference(monkeypatch, fresh_launches, l2):
    """memory_read's backward with the opt-in on a GPU (the launcher's padded q and dO, HW =
    1,620 rows off 16 elements): both Gluon kernels run (no fallback warning), twice through
    their kept launches, and the three gradients match float64."""
    import warnings

    from stm_kernels import memory_read
    monkeypatch.setattr(running, "_warned", set())
    shape = (2, 1, 128, 512, 1620, 16200)
    with gluon_opt_in.warp_specialized_backward(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*WARP_SPECIALIZED_BACKWARD")
        for seed in range(2):
            q, k, v, do = backward_inputs(*shape, torch.bfloat16, seed=seed, device="cuda")
            reason = gluon_backward_dv.read_unsupported_reason(q, k, v)
            if reason is not None:
                pytest.skip(reason)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            memory_read(q, k, v, backend="triton", similarity="l2" if l2 else "dot").backward(do)
            ref = _reference(*(t.detach() for t in (q, k, v, do)), 1 / math.sqrt(128), l2)
            assert relative_error(v.grad.cpu(), ref[0]) < TOLERANCE[torch.bfloat16], seed
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch)
    assert isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)
