"""The warp-specialised Gluon forward (stm_kernels/experimental/gluon_forward.py).

Triton's CPU interpreter does not run Gluon (a Gluon launch under TRITON_INTERPRET=1 still asks
for a GPU driver), so besides the compile-only checks for sm_90 (tools/tests/
test_gluon_compile.py: TMA, mbarriers and wgmma in the PTX, S computed by one partition only,
no spills, shared memory within 227 KiB) it is tested in two layers:

2. an emulation on CPU (tests/gluon_emulation.py): the kernel's own Python source runs with
   stand-ins for gl / mbarrier / tma / wgmma, which checks the ring indexing, barrier parities
   and counts, masks, splits and the host launcher (ws_forward) end to end, not layouts or
   Gluon's lowering;
3. on a GPU (`pytest -m gpu`): the real kernel against a float64 reference.
"""
import math
import pathlib
import random

import pytest
import torch

triton = pytest.importorskip("triton")

from gluon_cases import pretended_h100  # noqa: E402
from gluon_emulation import emulate  # noqa: E402
from helpers import relative_error  # noqa: E402
from stm_kernels.experimental import gluon_forward  # noqa: E402
from reference import reference_read  # noqa: E402
from stm_kernels import memory_read  # noqa: E402
from stm_kernels.backends.triton import (devices, gluon_opt_in,  # noqa: E402
                                         kept_launches, running)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
H100_SHARED_MEMORY = 227 * 1024
LOG2E = 1.4426950408889634
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}

needs_gluon = pytest.mark.skipif(not gluon_forward.AVAILABLE,
                                 reason=f"Gluon unavailable: {gluon_forward.UNAVAILABLE_REASON}")


@pytest.mark.parametrize("config", [gluon_forward.WarpSpecializedConfig(),
                                    gluon_forward.ROW_SPLIT_CONFIG], ids=["default", "rows"])
def test_config_fits_shared_memory(config):
    assert gluon_forward.shared_memory_bytes(128, 512, 2, config) <= H100_SHARED_MEMORY


def test_module_reports_availability():
    assert isinstance(gluon_forward.AVAILABLE, bool)
    assert gluon_forward.AVAILABLE == (gluon_forward.UNAVAILABLE_REASON == "")


def test_unsupported_reason_on_cpu():
    q, k, v = (torch.randn(1, 128, 8, dtype=torch.bfloat16) for _ in range(3))
    assert gluon_forward.unsupported_reason(q, k, v) is not None


# --------------------------------------------------------------------------- 2. CPU emulation


def _split_plan(N, block_n, splits):
    per_split = triton.cdiv(triton.cdiv(N, block_n), splits) * block_n
    return per_split, triton.cdiv(N, per_split)


def _merge(part_out, part_lse):
    lse = torch.logsumexp(part_lse.double(), 0)
    weights = torch.exp(part_lse.double() - lse)  # (S, B, HW)
    return (weights[:, :, None] * part_out.double()).sum(0), lse


def _run_forward(q, k, v, scale, l2, splits, config, out_dtype=None):
    """ws_forward with the launcher's buffers (final out/lse for one split, fp32 partials and a
    merge otherwise), poisoned with NaN; returns (out, lse) in float64."""
    B, _, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    per_split, splits = _split_plan(N, config.block_n, splits)
    if splits == 1:
        part_out = torch.full((1, B, Cv, HW), float("nan"), dtype=v.dtype, device=v.device)
    else:
        part_out = torch.full((splits, B, Cv, HW), float("nan"), device=v.device)
    part_lse = torch.full((splits, B, HW), float("nan"), device=v.device)
    gluon_forward.ws_forward(q, k, v, part_out, part_lse, per_split=per_split,
                             qk_scale=scale * LOG2E, l2=l2, config=config)
    if splits == 1:
        return part_out[0].double(), part_lse[0].double()
    return _merge(part_out, part_lse)


def _reference(q, k, v, scale, l2):
    """(out, lse) of the float64 read written out in plain torch (tests/reference.py)."""
    out, lse, _ = reference_read(q, k, v, scale=scale, similarity="l2" if l2 else "dot")
    return out, lse


def _inputs(B, Bq, Ck, Cv, HW, N, dtype, device, seed=0, pad_n=0, batch_gap=0):
    """Random q, k, v; pad_n > 0 stores k, v with room for N + pad_n positions per row (a slice:
    the descriptor's N is ragged, TMA zero-fills past it); batch_gap > 0 leaves extra channels
    between objects (object stride != C x channel stride: one launch per object)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    k = torch.randn(B, Ck + batch_gap, N + pad_n, generator=generator, dtype=torch.float64)
    v = torch.randn(B, Cv + batch_gap, N + pad_n, generator=generator, dtype=torch.float64)
    q = q.to(device=device, dtype=dtype)
    k = k.to(device=device, dtype=dtype)[:, :Ck, :N]
    v = v.to(device=device, dtype=dtype)[:, :Cv, :N]
    return q, k, v


EMULATED_CASES = [
    # B, Bq, Ck, Cv, HW, N, splits, l2, dtype, config, pad_n, batch_gap
    pytest.param(1, 1, 32, 64, 45, 111, 1, False, torch.float16,
                 dict(block_m=64, block_n=16), 1, 0, id="ragged-1split"),
    pytest.param(3, 1, 32, 96, 45, 200, 3, True, torch.bfloat16,
                 dict(block_m=32, block_n=16, num_stages=3), 0, 0, id="broadcast-l2-3splits"),
    pytest.param(2, 2, 16, 48, 70, 136, 2, False, torch.float16,
                 dict(block_m=32, block_n=16, num_stages=2, num_p=3), 0, 0, id="2blocks-m"),
    pytest.param(2, 2, 32, 50, 33, 96, 1, True, torch.float16,
                 dict(block_m=64, block_n=16, num_stages=1, num_p=1), 8, 16,
                 id="per-object-launches-odd-cv"),
    # The PV warpgroups splitting the rows (ROW_SPLIT_CONFIG's layout), value chunks over
    # programs: whole chunks, a short last chunk, odd channel halves with a per-chunk mask.
    pytest.param(2, 2, 32, 96, 45, 136, 2, True, torch.float16,
                 dict(block_m=32, block_n=16, value_chunks=2, split_rows=True), 0, 0,
                 id="split-rows-2chunks-l2"),
    pytest.param(3, 1, 16, 50, 70, 111, 1, False, torch.bfloat16,
                 dict(block_m=64, block_n=16, num_stages=3, value_chunks=3, split_rows=True),
                 1, 0, id="split-rows-short-last-chunk"),
    pytest.param(2, 2, 32, 51, 33, 96, 2, False, torch.float16,
                 dict(block_m=32, block_n=16, num_stages=2, value_chunks=2), 8, 16,
                 id="channel-halves-2chunks-odd-cv"),
]


@pytest.fixture
def emulated_kernel(monkeypatch):
    """The Gluon kernel replaced by its CPU emulation, its device checks passed: the
    EmulatedKernel, which records its launches."""
    return emulate(monkeypatch, gluon_forward, "memory_read_ws_fwd_kernel")


@pytest.fixture
def emulated_read(monkeypatch, emulated_kernel):
    """emulated_kernel behind memory_read: the read opted into the Gluon forward; the merge
    (and backward) kernels run in Triton's interpreter."""
    if not devices.INTERPRETING:
        pytest.skip("the merge and backward kernels need TRITON_INTERPRET=1 on CPU")
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "1")
    return emulated_kernel


@needs_gluon
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, splits, l2, dtype, config, pad_n, batch_gap",
                         EMULATED_CASES)
def test_emulated_kernel_matches_reference(emulated_kernel, B, Bq, Ck, Cv, HW, N, splits, l2,
                                           dtype, config, pad_n, batch_gap):
    """The kernel source and ws_forward, emulated on CPU (see the module docstring), against the
    float64 read written out in plain torch: pipeline protocol, masks, splits, value halves,
    transposed stores."""
    emulated = emulated_kernel
    q, k, v = _inputs(B, Bq, Ck, Cv, HW, N, dtype, "cpu", pad_n=pad_n, batch_gap=batch_gap)
    scale = 1 / math.sqrt(Ck)
    config = gluon_forward.WarpSpecializedConfig(**config)
    ref_out, ref_lse = _reference(q, k, v, scale, l2)
    for seed in range(3):  # different interleavings of the partitions and TMA completions
        random.seed(seed)
        out, lse = _run_forward(q, k, v, scale, l2, splits, config)
        assert relative_error(lse, ref_lse) < 1e-5, (seed, relative_error(lse, ref_lse))
        assert relative_error(out, ref_out) < TOLERANCE[dtype], (seed, relative_error(out, ref_out))
    assert len(emulated.launches) == 3 * (B if batch_gap else 1)


@needs_gluon
@pytest.mark.parametrize("config", [
    dict(block_m=32, block_n=16),
    dict(block_m=32, block_n=16, value_chunks=2, split_rows=True)], ids=["default", "rows"])
def test_emulated_kernel_behind_memory_read(emulated_read, config):
    """memory_read with the opt-in (STM_KERNELS_WARP_SPECIALIZED=1) and a tiling forced by
    use_configs: the launcher's split plan (value chunks included), its NaN-poisoned buffers,
    the merge kernel (interpreted) and the plain backward on the emulated kernel's lse."""
    from stm_kernels.backends.triton import devices, launch as launchers
    from stm_kernels import poison_outputs
    emulated, h100 = emulated_read, pretended_h100()  # 3 memory splits here
    q, k, v = _inputs(2, 1, 32, 96, 45, 200, torch.float16, "cpu", seed=5)
    k, v = k.requires_grad_(), v.requires_grad_()
    config = gluon_forward.WarpSpecializedConfig(**config)
    random.seed(0)
    with launchers.use_configs(warp_specialized=config), poison_outputs(), \
            devices.pretend(h100):
        out, lse = memory_read(q, k, v, backend="triton", return_lse=True)
        out.float().sum().backward()
    grid, arguments = emulated.launches[0]
    assert grid[0] == triton.cdiv(45, config.block_m) * config.value_chunks
    assert grid[2] == 3  # memory splits, merged by the merge kernel
    assert arguments["VALUE_CHUNKS"] == config.value_chunks
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    kd.requires_grad_(), vd.requires_grad_()
    ref_out, ref_lse, _ = reference_read(qd, kd, vd)
    ref_out.sum().backward()
    assert relative_error(lse, ref_lse) < 1e-5
    assert relative_error(out, ref_out) < TOLERANCE[torch.float16]
    assert relative_error(v.grad, vd.grad) < TOLERANCE[torch.float16]
    assert relative_error(k.grad, kd.grad) < 1e-2


@needs_gluon
@pytest.mark.parametrize("batch_gap", [0, 16], ids=["folded", "per-object"])
def test_emulated_kernel_launches_are_kept_per_layout(monkeypatch, emulated_read,
                                                        fresh_launches, gluon_plannings,
                                                        batch_gap):
    """The opted-in forward behind memory_read plans once per layout, like the plain one: a
    repeated read of new inputs makes no new WsLaunch and computes its own result. A later
    call whose keys do not start on 16 bytes (the same layout otherwise) cannot take TMA: its
    kept launch refuses it, and the read plans again and falls back to the plain forward."""
    from stm_kernels import poison_outputs
    from stm_kernels.backends.triton import devices
    monkeypatch.setattr(running, "_warned", set())
    emulated, h100 = emulated_read, pretended_h100()
    B, Ck, Cv, HW, N = 2, 32, 96, 45, 768  # 12 memory blocks of 64: 3 splits
    with poison_outputs(), devices.pretend(h100):
        for seed in range(3):
            q, k, v = _inputs(B, 1, Ck, Cv, HW, N, torch.float16, "cpu", seed=seed,
                              batch_gap=batch_gap)
            random.seed(seed)
            out, lse = memory_read(q, k, v, backend="triton", return_lse=True)
            ref_out, ref_lse, _ = reference_read(q, k, v)
            assert relative_error(lse, ref_lse) < 1e-5, seed
            assert relative_error(out, ref_out) < TOLERANCE[torch.float16], seed
        assert len(gluon_plannings) == 1  # planned by the first read only
        launches = len(emulated.launches)
        assert launches == 3 * (B if batch_gap else 1)
        assert emulated.launches[0][0][2] > 1  # memory splits, merged by the merge kernel
        rows = B * (Ck + batch_gap) * N
        storage = torch.randn(rows + 1, dtype=torch.float64).half()
        shifted = storage[1:].view(B, Ck + batch_gap, N)[:, :Ck]  # k's layout, 2 bytes later
        assert shifted.stride() == k.stride() and shifted.data_ptr() % 16
        with pytest.warns(RuntimeWarning, match="Gluon forward failed"):
            out = memory_read(q, shifted, v, backend="triton")
        assert len(emulated.launches) == launches  # the plain forward read it
        reference = reference_read(q, shifted, v)[0]
        assert relative_error(out, reference) < TOLERANCE[torch.float16]


# --------------------------------------------------------------------------- 3. on a GPU

GPU_CASES = [
    # B, Bq, Ck, Cv, HW, N, splits, l2, pad_n, batch_gap
    (1, 1, 128, 512, 45, 111, 1, False, 1, 0),
    (1, 1, 128, 512, 1620, 16200, 3, False, 0, 0),
    (3, 1, 128, 512, 45, 16200, 3, True, 0, 0),
    (3, 3, 128, 512, 1620, 1000, 1, True, 0, 0),
    (2, 2, 64, 256, 100, 333, 2, False, 3, 16),
]


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("dtype, config", [
    (torch.bfloat16, gluon_forward.WarpSpecializedConfig()),
    (torch.float16, gluon_forward.WarpSpecializedConfig()),
    (torch.bfloat16, gluon_forward.ROW_SPLIT_CONFIG)], ids=["bf16", "fp16", "bf16-rows"])
@pytest.mark.parametrize("B, Bq, Ck, Cv, HW, N, splits, l2, pad_n, batch_gap", GPU_CASES)
def test_gpu_matches_reference(dtype, config, B, Bq, Ck, Cv, HW, N, splits, l2, pad_n,
                               batch_gap):
    q, k, v = _inputs(B, Bq, Ck, Cv, HW, N, dtype, "cuda", pad_n=pad_n, batch_gap=batch_gap)
    reason = gluon_forward.unsupported_reason(q, k, v, config)
    if reason is not None:
        pytest.skip(reason)
    scale = 1 / math.sqrt(Ck)
    out, lse = _run_forward(q, k, v, scale, l2, splits, config)
    torch.cuda.synchronize()
    ref_out, ref_lse = _reference(q, k, v, scale, l2)
    assert relative_error(out, ref_out) < TOLERANCE[dtype], relative_error(out, ref_out)
    assert relative_error(lse, ref_lse) < 1e-4, relative_error(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.gluon
@needs_gluon
@pytest.mark.parametrize("batch_gap", [0, 16], ids=["folded", "per-object"])
def test_gpu_kept_launch_runs_on_new_inputs(monkeypatch, fresh_launches, gluon_plannings,
                                            batch_gap):
    """The opted-in read's kept forward (its WsLaunch and the merge) called directly on other
    inputs of the same layout, so that its exceptions propagate, then the same inputs through
    memory_read: nothing is planned again, and both match float64."""
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "1")
    shape = (2, 1, 128, 512, 1620, 16200)  # 52 programs on 132 SMs: 2 splits, merged
    q, k, v = _inputs(*shape, torch.bfloat16, "cuda", seed=0, batch_gap=batch_gap)
    if gluon_forward.unsupported_reason(q, k, v) is not None:
        pytest.skip(gluon_forward.unsupported_reason(q, k, v))
    memory_read(q, k, v, backend="triton")
    [kept] = kept_launches._prepared.values()
    assert isinstance(kept.forward, gluon_forward.WsLaunch) and kept.merge is not None
    assert kept.forward.direct is not None  # later launches call its compile directly
    q, k, v = _inputs(*shape, torch.bfloat16, "cuda", seed=1, batch_gap=batch_gap)
    direct, direct_lse = kept(q, k, v, None)
    out, lse = memory_read(q, k, v, backend="triton", return_lse=True)
    assert len(gluon_plannings) == 1, "a kept launch failed and its call was planned again"
    with kept_launches.binding_every_launch():  # Triton's own launch path: the same kernels
        assert torch.equal(memory_read(q, k, v, backend="triton"), out)
    ref_out, ref_lse = _reference(q, k, v, 1 / math.sqrt(shape[2]), False)
    for result, result_lse in ((direct, direct_lse), (out, lse)):
        assert relative_error(result, ref_out) < TOLERANCE[torch.bfloat16]
        assert relative_error(result_lse, ref_lse) < 1e-4


@needs_gluon
def test_an_architecture_default_from_a_memory_size_on(monkeypatch, emulated_kernel,
                                                       fresh_launches):
    """sm_90's table with the Gluon forward on by default from N = 200 memory positions on
    (Architecture.warp_specialized as a mapping): a read of 200 positions takes it without
    being asked, one of 192 reads with the plain forward; both right, no warning."""
    import dataclasses
    import warnings

    from stm_kernels.backends.triton import devices, launch as launchers, tilings
    if not devices.INTERPRETING:
        pytest.skip("the merge kernel and the plain forward need TRITON_INTERPRET=1 on CPU")
    monkeypatch.delenv(gluon_opt_in.WARP_SPECIALIZED_ENV, raising=False)
    monkeypatch.setitem(tilings.ARCHITECTURES, "sm_90", dataclasses.replace(
        tilings.ARCHITECTURES["sm_90"], warp_specialized={"forward": 200}))
    config = gluon_forward.WarpSpecializedConfig(block_m=32, block_n=16)
    random.seed(0)
    for N, gluon in ((192, False), (200, True)):
        q, k, v = _inputs(1, 1, 32, 96, 45, N, torch.float16, "cpu", seed=N)
        before = len(emulated_kernel.launches)
        with launchers.use_configs(warp_specialized=config), devices.pretend(pretended_h100()), \
                warnings.catch_warnings():
            warnings.simplefilter("error")
            out = memory_read(q, k, v, backend="triton")
        assert (len(emulated_kernel.launches) > before) == gluon, N
        reference = reference_read(q, k, v)[0]
        assert relative_error(out, reference) < TOLERANCE[torch.float16], N
