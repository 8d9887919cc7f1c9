"""The static work report (python -m tools.kernel_report.report): the kernels compiled for Hopper
(sm_90) without a GPU, held to issue #11's targets.

Triton compiles to PTX and its bundled ptxas assembles it, so registers, spills, shared memory,
the matrix instructions of each main loop and the warp layouts of every dot are known here. The
tests fail when a default config spills, overflows 227 KiB, loses the tensor cores, lets two
warpgroups compute the same dot, or executes more multiply-adds per (query, memory) pair than
the targets allow (forward 1.2x the useful 640, forward + backward 1.3x the counted 2,240).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
H100_SHARED_MEMORY = 227 * 1024
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(),
                                 reason="Triton's NVIDIA backend (ptxas) is not installed")


def _run(*arguments, module="tools.kernel_report.report"):
    # Compiling needs the real JIT: conftest set TRITON_INTERPRET for this process.
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT,
                               env=environment, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return _run("--json", "--dtype", "bf16", "fp32", "--similarity", "dot", "l2")


@needs_ptxas
def test_every_default_config_compiles_without_spills_and_fits(report):
    assert {(entry["dtype"], entry["similarity"]) for entry in report["reports"]} == {
        ("bf16", "dot"), ("bf16", "l2"), ("fp32", "dot"), ("fp32", "l2")}
    for entry in report["reports"]:
        kernels = {row["kernel"] for row in entry["rows"]}
        assert {"fwd", "bwd_dv", "bwd_dkdq", "merge", "bwd_dkdq (deterministic)",
                "bwd_dq (deterministic)"} <= kernels
        for row in entry["rows"]:
            where = f"{entry['dtype']} {entry['similarity']} {row['kernel']}"
            if entry["dtype"] == "fp32" and row["kernel"].startswith("fwd_ws"):
                continue  # bf16/fp16 only: fp32 runs the plain kernel
            assert "error" not in row, f"{where}: {row.get('error')}"
            assert row["spill_store_bytes"] == 0, f"{where} spills: {row}"
            assert row["shared_bytes"] <= H100_SHARED_MEMORY, where
            assert row["blocks_per_sm"] >= 1, where
            if row["kernel"] != "merge":
                assert row["wgmma"] > 0, f"{where} lost the Hopper tensor-core path"


@needs_ptxas
def test_no_warpgroup_repeats_a_dot_and_the_two_readings_agree(report):
    for entry in report["reports"]:
        for row in entry["rows"]:
            if "error" in row or row["kernel"] == "merge":
                continue
            where = f"{entry['dtype']} {entry['similarity']} {row['kernel']}"
            assert row["dots"], f"{where}: no dot found in the main loop"
            assert row["duplicated_dots"] == 0, f"{where}: {row['dots']}"
            # PTX (instructions x warpgroups) and TTGIR (dot shapes x layouts) count the same.
            assert row["executed_macs_per_pair"] == row["executed_macs_per_pair_from_dots"], where
            assert row["executed_macs_per_pair"] == row["dot_macs_per_pair"], where


@needs_ptxas
def test_executed_work_per_pair_meets_the_targets(report):
    from tools.kernel_report.report import FORWARD_RATIO_TARGET, TOTAL_RATIO_TARGET
    for entry in report["reports"]:
        totals = entry["totals"]
        where = f"{entry['dtype']} {entry['similarity']}"
        assert totals["forward_ratio"] <= FORWARD_RATIO_TARGET, (where, totals)
        assert totals["total_ratio"] <= TOTAL_RATIO_TARGET, (where, totals)
        if entry["dtype"] == "bf16":
            # The minimum backward (S, dP, dV, dK, dQ: 3 Ck + 2 Cv = 1,408) plus S recomputed
            # by the dV kernel for each of its 2 value chunks; dP is computed once.
            assert totals["executed_backward"] <= 1408 + 2 * 128, (where, totals)
            assert totals["warp_specialized_forward_ratio"] == 1.0, (where, totals)
            # The row-split Gluon candidate repeats S per value chunk, as the plain forward.
            assert totals["warp_specialized_rows_forward_ratio"] <= FORWARD_RATIO_TARGET, (
                where, totals)


@needs_ptxas
def test_deterministic_backward_swaps_the_dq_atomics_for_one_dq_pass(report):
    """Under torch.use_deterministic_algorithms the dK/dQ kernel drops its dQ dot (Ck MACs per
    pair) and the dQ kernel does S, dP and dQ once each (Ck + Cv + Ck), with no atomics."""
    Ck, Cv = report["shape"]["Ck"], report["shape"]["Cv"]
    for entry in report["reports"]:
        rows = {row["kernel"]: row for row in entry["rows"]}
        where = f"{entry['dtype']} {entry['similarity']}"
        dkdq, no_atomics = rows["bwd_dkdq"], rows["bwd_dkdq (deterministic)"]
        dq = rows["bwd_dq (deterministic)"]
        for row in entry["rows"]:  # atomics in the PTX's main loop iff the TTGIR has them
            atomics, atomic_bytes = (row.get("atomics_per_iteration_per_thread"),
                                     row.get("l2_atomic_bytes_per_pair"))
            if atomics is not None and atomic_bytes is not None:
                assert (atomics > 0) == (atomic_bytes > 0), f"{where} {row['kernel']}"
        assert rows["bwd_dkdq"]["atomics_per_iteration_per_thread"] > 0, where
        assert no_atomics["executed_macs_per_pair"] == dkdq["executed_macs_per_pair"] - Ck, where
        assert dq["executed_macs_per_pair"] == 2 * Ck + Cv, where
        executed = rows["bwd_dv"]["executed_macs_per_pair"] + 2 * (2 * Ck + Cv)
        expected = executed / (2.5 * (Ck + Cv))
        assert entry["totals"]["deterministic_backward_ratio"] == round(expected, 3), where


@needs_ptxas
def test_the_report_sees_the_duplicated_scores_of_64_row_tiles():
    """The check can fail: the previous default forward (64 query rows for 8 warps) has both
    warpgroups computing the same QK product, 768 MACs per pair for 640 in its dots."""
    script = (
        "import json\n"
        "from tools.kernel_report import report as kr\n"
        "from stm_kernels.backends.triton.tilings import ForwardConfig, defaults\n"
        "old = ForwardConfig(block_m=64, block_n=32, block_v=512, num_warps=8, num_stages=3)\n"
        "spec = kr.kernel_specs('bf16', 'dot', old, defaults(2)[1])[0]\n"
        "print(json.dumps(kr.analyse(spec)))\n")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    scores = [dot for dot in row["dots"] if dot["n"] == 32]
    assert [dot["duplication"] for dot in scores] == [2]
    assert row["executed_macs_per_pair"] == 768 and row["dot_macs_per_pair"] == 640


def test_loop_reading_on_a_handmade_ptx_and_ttgir():
    """static_work on a tiny PTX/TTGIR: loop detection, nested trip counts, census, layouts."""
    from tools.kernel_report import ptx as static_work
    ptx = "\n".join([
        "$L__BB0_1:",
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {...};",
        "bar.sync 0;",
        "$L__BB0_2:",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};",
        "ex2.approx.ftz.f32 %r1, %r2;",
        "cp.async.cg.shared.global [ %r3 + 0 ], [ %rd1 + 0 ], 0x10, %r4;",
        "@%p3 atom.global.gpu.relaxed.add.v4.f32 { %r5 }, [ %rd2 + 0 ], { %r6 };",
        "@%p1 bra $L__BB0_2;",
        "@%p2 bra $L__BB0_1;",
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {...};",
    ])
    body = static_work.main_loop(ptx, inner_trip_counts=[3])
    census = {entry["shape"]: entry["count"] for entry in static_work.mma_census(body)}
    assert census == {"m64n32k16": 1, "m64n64k16": 3}
    assert static_work.executed_macs(static_work.mma_census(body), num_warps=8) == 2 * (
        64 * 32 * 16 + 3 * 64 * 64 * 16)
    assert static_work.count(body, "bar.sync") == 1
    assert static_work.count(body, "cp.async.cg") == 3
    # Opcodes, not substrings: "red.global" is in every cp.async...shared.global too.
    assert static_work.count(body, "red", "atom") == 3
    assert static_work.count(body, "red.global") == 0
    ttgir = "\n".join([
        "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
        "instrShape = [16, 32, 16]}>",
        "%c0_i32 = arith.constant 0 : i32",
        "%c4_i32 = arith.constant 4 : i32",
        "%c1_i32 = arith.constant 1 : i32",
        "%r:2 = scf.for %i = %lo to %hi step %c1_i32 iter_args(%a = %x) -> (f32) {",
        "  %s = ttng.warp_group_dot %q, %k, %z {inputPrecision = 0 : i32} : "
        "!ttg.memdesc<64x128xbf16, #shared> * !ttg.memdesc<128x32xbf16, #shared> -> "
        "tensor<64x32xf32, #mma>",
        "  %t = scf.for %j = %c0_i32 to %c4_i32 step %c1_i32 iter_args(%b = %y) -> (f32) {",
        "    %u = ttng.warp_group_dot %p, %v, %b : tensor<128x16xbf16, #dot> * "
        "!ttg.memdesc<16x32xbf16, #shared> -> tensor<128x32xf32, #mma>",
        "  }",
        "}",
    ])
    assert static_work.inner_trip_counts(ttgir) == [4]
    dots = static_work.loop_dots(ttgir)
    assert [(d["m"], d["n"], d["k"], d["duplication"], d["repeats"]) for d in dots] == [
        (64, 32, 128, 2, 1), (128, 32, 16, 1, 4)]
    assert static_work.blocks_per_sm(255, 176 * 1024, 8) == 1
    assert static_work.blocks_per_sm(128, 40 * 1024, 8) == 2  # registers
    assert static_work.blocks_per_sm(64, 100 * 1024, 4) == 2  # shared memory


def test_memory_reading_on_a_handmade_ttgir():
    """loop_memory counts the tiles a loop with runtime bounds loads (pointer tensors, TMA
    boxes) and updates atomically, repeats nested constant loops, and leaves out what runs
    before or after the loop and scalar accesses."""
    from tools.kernel_report import ptx as static_work
    ttgir = "\n".join([
        "%c0_i32 = arith.constant 0 : i32",
        "%c2_i32 = arith.constant 2 : i32",
        "%c1_i32 = arith.constant 1 : i32",
        "%q = tt.load %pq : tensor<128x64x!tt.ptr<bf16>, #blocked>",  # before the loop
        "%r = scf.for %i = %lo to %hi step %c1_i32 iter_args(%a = %x) -> (f32) {",
        "  %k = ttg.async_copy_global_to_local %pk, %bk mask %m : "
        "tensor<128x64x!tt.ptr<bf16>, #blocked1> -> <128x64xbf16, #shared, #smem, mutable>",
        "  %n = tt.load %pn : !tt.ptr<i32>",  # scalar
        "  scf.for %j = %c0_i32 to %c2_i32 step %c1_i32 {",
        "    %v = tt.load %pv, %mv : tensor<64x32x!tt.ptr<f32>, #blocked2>",
        "  }",
        "  %d = tt.atomic_rmw fadd, relaxed, gpu, %pd, %vd, %md : (tensor<128x16x!tt.ptr<f32>,"
        " #blocked3>, tensor<128x16xf32, #blocked3>, tensor<128x16xi1, #blocked3>) -> "
        "tensor<128x16xf32, #blocked3>",
        "  scf.if %c {",
        "    ttng.async_tma_copy_global_to_local %desc[%c0_i32, %n] %buf, %bar, %true : "
        "!tt.tensordesc<256x64xbf16, #shared>, !ttg.memdesc<1xi64, #shared1, #smem, mutable> "
        "-> !ttg.memdesc<256x64xbf16, #shared, #smem, mutable>",
        "  }",
        "}",
        "%o = tt.load %po : tensor<128x64x!tt.ptr<bf16>, #blocked>",  # after the loop
    ])
    assert static_work.loop_memory(ttgir) == dict(
        load_bytes=128 * 64 * 2 + 2 * 64 * 32 * 4 + 256 * 64 * 2, atomic_bytes=128 * 16 * 4)


@needs_ptxas
def test_l2_traffic_per_pair_is_the_tiles_each_iteration_streams(report):
    """The compiled kernels load exactly their tiles per main-loop iteration: the forward K
    (Ck x block_n) and one value chunk (block_v x block_n) for block_m queries, repeated per
    value chunk; dK/dQ adds Ck fp32 atomics per query for its block_n keys; the Gluon forward
    TMA-loads K and both halves of V for 64 queries (the L2 similarity adds the fp32 key
    norms of the plain kernels). The bandwidth figures follow from them."""
    from tools.kernel_report import report as kr
    from stm_kernels.backends.triton import tilings as triton_configs
    Ck, Cv = report["shape"]["Ck"], report["shape"]["Cv"]
    for entry in report["reports"]:
        item = kr.ITEMSIZE[entry["dtype"]]
        forward, backward = triton_configs.defaults(item)
        rows = {row["kernel"]: row for row in entry["rows"]}
        where = f"{entry['dtype']} {entry['similarity']}"
        fwd = rows["fwd"]
        key_norms = 4 if entry["similarity"] == "l2" else 0  # |k|^2 in fp32 per key
        assert fwd["l2_atomic_bytes_per_pair"] == 0, where
        assert fwd["l2_load_bytes_per_iteration"] == (
            ((Ck + forward.block_v) * item + key_norms) * forward.block_n), where
        assert fwd["l2_load_bytes_per_pair"] == (((Ck + forward.block_v) * item + key_norms)
                                                 * (Cv // forward.block_v) / forward.block_m), where
        dkdq = rows["bwd_dkdq"]
        assert dkdq["l2_atomic_bytes_per_pair"] == 4 * Ck / backward.dkdq.block_n, where
        assert rows["bwd_dkdq (deterministic)"]["l2_atomic_bytes_per_pair"] == 0, where
        totals = entry["totals"]
        backward_bytes = sum(rows[name][f"l2_{kind}_bytes_per_pair"]
                             for name in ("bwd_dv", "bwd_dkdq") for kind in ("load", "atomic"))
        assert totals["l2_bytes_per_pair_backward"] == backward_bytes, where
        if entry["dtype"] != "bf16":
            assert "l2_tbps_forward_at_target" not in totals, where  # targets are bf16 rates
            continue
        ws = rows["fwd_ws (opt-in)"]
        assert ws["l2_load_bytes_per_pair"] == (Ck + Cv) * item / 64, where
        pairs_per_s = kr.FORWARD_RATE_TARGET * kr.MATMUL_RATE / (2 * (Ck + Cv))
        assert totals["l2_tbps_forward_at_target"] == round(
            fwd["l2_load_bytes_per_pair"] * pairs_per_s / 1e12, 2), where
        # 64 query rows per K/V tile, not 128: the Gluon forward asks more of the L2 per pair.
        assert totals["l2_bytes_per_pair_warp_specialized"] > totals[
            "l2_bytes_per_pair_forward"], where
        # Its row split: 128 query rows per tile, K read once per value chunk, as the plain one.
        from stm_kernels.backends.triton.tilings import ROW_SPLIT_CONFIG as rows_config
        ws_rows = rows["fwd_ws rows (opt-in)"]
        assert ws_rows["l2_load_bytes_per_pair"] == (
            (Ck * rows_config.value_chunks + Cv) * item / rows_config.block_m), where
        assert totals["l2_bytes_per_pair_warp_specialized_rows"] == ws_rows[
            "l2_load_bytes_per_pair"] < totals["l2_bytes_per_pair_warp_specialized"], where


def test_the_sweep_takes_each_candidate_of_each_kernel(monkeypatch):
    """--sweep analyses every candidate of every kernel, the others at their defaults (the
    compiling itself is what the tests above check)."""
    from tools.kernel_report import report as kernel_resources
    monkeypatch.setattr(kernel_resources, "analyse",
                        lambda spec, arch=90: (spec["name"], spec["config"]))
    rows = kernel_resources.sweep("bf16")
    by_kernel = {}
    for name, config in rows:
        by_kernel.setdefault(name, []).append(config)
    sweeps = {"fwd": kernel_resources.FORWARD_SWEEP, "bwd_dv": kernel_resources.DV_SWEEP,
              "bwd_dkdq": kernel_resources.DKDQ_SWEEP,
              kernel_resources.DETERMINISTIC_DQ: kernel_resources.DQ_SWEEP[2]}
    assert set(by_kernel) == set(sweeps)
    for name, candidates in sweeps.items():
        assert by_kernel[name] == [kernel_resources._fields(c) for c in candidates], name
