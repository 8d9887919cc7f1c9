"""The static kernel report (python -m tools.kernel_report): the runtime's own launches compiled
offline for every target GPU, held to the targets.

Compiling every target, precision and case takes about 20 minutes on two cores, so the report is
committed (docs/kernel_report.json, with the fingerprint of the kernel sources and tilings it
was made from) and checked here three ways: it is current (same fingerprint and Triton) and
meets the targets (no spill, within shared memory, no duplicated dot, the work ratios) or
states why (tilings.EXCEPTIONS); a sample of it (every target, the main kernels in bf16) is
compiled again and must come out as committed; and the pieces that read the compiler's output
are tested on handmade PTX/TTGIR and on launches recorded here.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

from stm_kernels.backends.triton import tilings  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "kernel_report.json"
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_compiler = pytest.mark.skipif(not PTXAS.exists(),
                                    reason="Triton's NVIDIA backend (ptxas) is not installed")
PRECISION_CLASS = {"fp16": "16-bit", "bf16": "16-bit", "tf32": "tf32", "fp32": "fp32"}


def compiled(*arguments, script=None):
    """The last stdout line, as JSON, of `python -m tools.kernel_report ARGUMENTS` or of a
    script, run without TRITON_INTERPRET: conftest sets it for this process, and interpreted
    kernels cannot be compiled."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tools.kernel_report", *arguments] if script is None \
        else [sys.executable, "-c", textwrap.dedent(script)]
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=1800)
    assert completed.stdout.strip(), completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def committed():
    payload = json.loads(COMMITTED.read_text())
    if payload["triton"] != triton.__version__:
        pytest.skip(f"the committed report was made with Triton {payload['triton']}")
    return payload


# --------------------------------------------------------------------------- the committed report


def test_the_committed_report_is_current_and_meets_the_targets(committed):
    from tools.kernel_report import markdown, report
    from tools.kernel_report.compile import TARGETS
    assert committed["fingerprint"] == report.fingerprint(), (
        "the kernels or tilings changed since docs/kernel_report.json was made: run "
        "python -m tools.kernel_report")
    assert set(committed["targets"]) == set(TARGETS)
    for name, entry in committed["targets"].items():
        cases = {(case["precision"], case["case"]) for case in entry["cases"]}
        assert cases == {(p, c) for p in report.PRECISIONS for c in report.CASES}, name
    assert report.problems(committed) == [] == committed["problems"]
    # every stated exception still explains a shortfall (none is stale)
    assert set(report.stated(committed)) == set(tilings.EXCEPTIONS)
    assert (ROOT / "docs" / "kernel_report.md").read_text() == markdown.document(committed)


def test_the_fingerprint_covers_every_module_of_the_launchers():
    """Every module of backends/triton is in the fingerprint or named as left out of it: a new
    module of the launchers cannot change the launches without making the report stale."""
    from tools.kernel_report import report
    modules = {str(path.relative_to(ROOT)) for path in
               (ROOT / "stm_kernels" / "backends" / "triton").glob("*.py")}
    kernels = {str(path.relative_to(ROOT)) for path in
               (ROOT / "stm_kernels" / "backends" / "triton" / "kernels").glob("*.py")}
    assert modules == set(report.LAUNCHER_SOURCES) | {
        "stm_kernels/backends/triton/tilings.py"} | set(report.OUTSIDE_FINGERPRINT)
    assert not set(report.LAUNCHER_SOURCES) & set(report.OUTSIDE_FINGERPRINT)
    assert kernels - set(report.KERNEL_SOURCES) == {
        "stm_kernels/backends/triton/kernels/__init__.py"}


def test_every_target_runs_every_kernel_of_the_dot_and_l2_reads(committed):
    """No precision of any target sends the STM and STCN reads (Ck = 128) or XMem's Ck = 64
    and Ck = 128 (257 key channels: 256 tiled, the last a rank-1 term) to the torch backend
    but where tilings.ON_TORCH says so (never in 16-bit); each kernel's row is the table's
    first candidate there; dK+dQ is fused but where SEPARATE_DQ says."""
    from tools.kernel_report.compile import TARGETS
    from tools.kernel_report.report import WIDTH
    for name, entry in committed["targets"].items():
        architecture = tilings.ARCHITECTURES[entry["architecture"]]
        assert tilings.architecture_of(TARGETS[name].device)[0] is architecture
        for case in entry["cases"]:
            rows = {row["kernel"]: row for row in case["rows"]}
            precision = PRECISION_CLASS[case["precision"]]
            width = WIDTH[case["case"]]
            expected = {"forward", "prepare", "dv", "dkdq", "dk", "dq", "select",
                        "select_merge", "usage"}
            if tilings.separates_dq(architecture, precision, width):
                expected.discard("dkdq")
            for read, kernels in tilings.READS.items():
                if tilings.on_torch(architecture, read, precision, width):
                    assert precision != "16-bit", (name, case["case"], read)
                    expected = (expected - set(kernels)) | {read}
            # the merge runs only where the forward splits the memory (its grid's third axis)
            if "forward" in rows and rows["forward"]["grid"][2] > 1:
                expected.add("merge")
            assert set(rows) == expected, (name, case["precision"], case["case"])
            for row in rows.values():
                kernel = row["kernel"]
                if "unavailable" in row:  # only where the table takes the read to torch
                    assert tilings.on_torch(architecture, kernel, precision, width), \
                        (name, case["precision"], case["case"], kernel)
                    continue
                first = architecture.candidates(kernel, precision, width)[0]
                assert row["config"] == dataclasses.asdict(first) or "failed_candidates" in row,\
                    (name, case["precision"], case["case"], kernel)


def test_exact_float32_is_fma_on_nvidia_and_the_float32_matrix_cores_on_amd(committed):
    """Exact float32 runs the kernels everywhere in "ieee", one pass per dot: AMD's float32
    matrix instructions; NVIDIA's CUDA-core FMA (no matrix instruction in the forward)."""
    for name, entry in committed["targets"].items():
        case = next(c for c in entry["cases"] if (c["precision"], c["case"]) == ("fp32", "dot"))
        forward = next(row for row in case["rows"] if row["kernel"] == "forward")
        assert forward["input_precision"] == "ieee" and forward["passes"] == 1, name
        if name.startswith("gfx"):
            assert any("f32" in instruction for instruction in forward["mma"]), forward["mma"]
        else:
            assert forward["mma"] == {}, (name, forward["mma"])


def test_the_deterministic_backward_swaps_the_dq_atomics_for_one_dq_pass(committed):
    """Under torch.use_deterministic_algorithms the dK/dQ kernel drops its dQ dot (Ck MACs per
    pair) and the dQ kernel does S, dP and dQ once each (Ck + Cv + Ck), with no atomics."""
    Ck, Cv = 128, committed["shape"]["Cv"]
    for name, entry in committed["targets"].items():
        for case in entry["cases"]:
            if case["case"] != "dot":
                continue
            rows = {row["kernel"]: row for row in case["rows"]}
            where = f"{name} {case['precision']}"
            if "dkdq" not in rows:  # dK and dQ apart in every mode there (SEPARATE_DQ)
                assert tilings.separates_dq(tilings.ARCHITECTURES[entry["architecture"]],
                                            PRECISION_CLASS[case["precision"]], 128), where
                continue
            if not rows["dkdq"]["dots"]:  # work not read there (a stated exception)
                assert (entry["architecture"], None, None, None) in tilings.EXCEPTIONS, where
                continue
            dkdq, without = rows["dkdq"], rows["dk"]
            # the multiply-adds of the dots (a dot repeated by several warps counts once), per
            # pass of a split precision (gfx950's bf16x3 for "high")
            passes = dkdq["passes"]
            assert without["dot_macs_per_pair"] / passes == \
                dkdq["dot_macs_per_pair"] / passes - Ck, where
            dq = rows["dq"]
            assert dq["executed_macs_per_pair"] / passes == 2 * Ck + Cv, where


@pytest.fixture(scope="module")
def sample():
    """The forward, merge, dV and dK/dQ kernels of the bf16 dot read for every target,
    compiled here (two targets at a time)."""
    if not PTXAS.exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    return compiled("--precision", "bf16", "--case", "dot", "--only", "forward", "merge", "dv",
                    "dkdq", "--json", "--jobs", "2")


def test_a_sample_compiles_again_as_committed(committed, sample):
    """What the sample compiles here is what the committed report says (config, registers,
    spills, shared memory, work): the report is a measurement anyone can repeat."""
    kernels = {"forward", "merge", "dv", "dkdq"}
    assert set(sample["targets"]) == set(committed["targets"])
    for name, entry in sample["targets"].items():
        (case,) = entry["cases"]
        reference = next(item for item in committed["targets"][name]["cases"]
                         if (item["precision"], item["case"]) == ("bf16", "dot"))
        expected = {row["kernel"]: row for row in reference["rows"]
                    if row["kernel"].split(" ")[0] in kernels}
        assert {row["kernel"] for row in case["rows"]} == set(expected), name
        for row in case["rows"]:
            for key in ("config", "registers", "spill_bytes", "shared_bytes",
                        "executed_macs_per_pair"):
                assert row.get(key) == expected[row["kernel"]].get(key), (
                    name, row["kernel"], key)


# --------------------------------------------------------------------------- recording launches


@needs_compiler
def test_the_recorder_compiles_what_the_runtime_launches():
    """On a pretended H100 the forward launches the sm_90 table's first config, with the
    runtime's grid (query blocks x value chunks x memory splits from its 132 SMs), and the
    merge kernel of the splits; both compile, the forward without spills in 176 KiB."""
    result = compiled(script="""
        import dataclasses, json, torch
        from stm_kernels.backends.triton import launch, plans, tilings
        from tools.kernel_report import report
        from tools.kernel_report.compile import TARGETS, compiling_for
        q, k, v = report._meta_inputs(torch.bfloat16, 128)
        with compiling_for(TARGETS["sm_90"], only={"forward", "merge"}) as launches:
            out, lse = launch.triton_forward(q, k, v, 0.088, False)
        first = tilings.ARCHITECTURES["sm_90"].candidates("forward", "16-bit", 128)[0]
        plan = plans.forward_plan(first, 1, 1620, 162000, 512, 132)
        print(json.dumps(dict(
            out=[out.device.type, list(out.shape)], kernels=[r.kernel for r in launches],
            first=launches[0].config == first, grid=list(launches[0].grid),
            expected_grid=list(plan.grid(1)), splits=plan.splits,
            spills=launches[0].compiled.spill_bytes, shared=launches[0].compiled.shared_bytes,
            precision=launches[0].arguments["PRECISION"],
            block_ck=launches[0].arguments["BLOCK_CK"])))
    """)
    assert result["out"] == ["meta", [1, 512, 1620]]
    assert result["kernels"] == ["forward", "merge"] and result["splits"] > 1
    assert result["first"] and result["grid"] == result["expected_grid"]
    assert result["spills"] == 0 and result["shared"] == 176 * 1024
    assert result["precision"] == "ieee" and result["block_ck"] == 128


@needs_compiler
def test_a_candidate_over_the_shared_memory_falls_through_offline():
    """A first candidate too large for the target's shared memory fails as it would at its
    first launch there, and the runtime takes the next one."""
    result = compiled(script="""
        import dataclasses, json
        from stm_kernels.backends.triton import tilings
        from tools.kernel_report import report
        from tools.kernel_report.compile import TARGETS
        huge, fitting = (tilings.ForwardConfig(256, 128, 512, 8, 4),
                         tilings.ForwardConfig(64, 32, 128, 4, 1))
        sm86 = tilings.ARCHITECTURES["sm_86"]
        table = {**sm86.tilings, ("forward", "16-bit", 128): (huge, fitting)}
        tilings.ARCHITECTURES["sm_86"] = dataclasses.replace(sm86, tilings=table)
        rows, _ = report.case_rows(TARGETS["sm_86"], "bf16", "dot", only={"forward"})
        print(json.dumps(dict(rows=rows, fitting=dataclasses.asdict(fitting))))
    """)
    (row,) = result["rows"]
    assert row["config"] == result["fitting"]
    assert row["failed_candidates"][0].startswith("OutOfResources: shared memory")


@needs_compiler
def test_a_candidate_over_its_local_memory_budget_falls_through_offline():
    """generic's TF32 dK+dQ compiled as sm_120: sm_80's tiling, first, uses more local memory
    (ptxas' stack frame, what the driver reports at run time) than its max_local_bytes, so the
    runtime takes sm_120's, which keeps within it."""
    result = compiled(script="""
        import dataclasses, json
        from stm_kernels.backends.triton import tilings
        from tools.kernel_report import report
        from tools.kernel_report.compile import TARGETS
        rows, _ = report.case_rows(TARGETS["generic@sm_120"], "tf32", "dot", only={"dkdq"})
        first, second = tilings.ARCHITECTURES["generic"].candidates("dkdq", "tf32", 128)
        print(json.dumps(dict(rows=rows, second=dataclasses.asdict(second))))
    """)
    (row,) = result["rows"]
    budget = row["config"]["max_local_bytes"]
    assert row["config"] == result["second"] and 0 < row["local_bytes"] <= budget
    (failure,) = row["failed_candidates"]
    used = int(failure.split(": ")[1].split(" B")[0])
    assert failure.startswith("LocalMemoryExceeded") and used > budget


def test_budgeted_tilings_are_taken_only_within_their_local_memory(committed):
    """Every row of a candidate with max_local_bytes uses at most that much local memory, and
    the candidates passed over before it were over theirs. generic's TF32 dK+dQ: sm_80's tiling
    as sm_80, sm_120's as sm_120, fused either way (1.2x the useful work forward + backward)."""
    budgeted = 0
    for name, entry in committed["targets"].items():
        for case in entry["cases"]:
            for row in case["rows"]:
                budget = row.get("config", {}).get("max_local_bytes")
                if budget is None:
                    continue
                budgeted += 1
                assert row["local_bytes"] <= budget, (name, case["case"], row["kernel"])
                assert all(failure.startswith("LocalMemoryExceeded")
                           for failure in row.get("failed_candidates", [])), row
    assert budgeted
    generic = tilings.ARCHITECTURES["generic"].candidates("dkdq", "tf32", 128)
    for name, expected in (("generic@sm_80", generic[0]), ("generic@sm_120", generic[1])):
        for case in committed["targets"][name]["cases"]:
            if case["precision"] == "tf32" and case["case"] in ("dot", "l2"):
                rows = {row["kernel"]: row for row in case["rows"]}
                assert rows["dkdq"]["config"] == dataclasses.asdict(expected), name
                assert case["totals"]["total_ratio"] <= 1.3, name


@needs_compiler
def test_the_report_sees_the_duplicated_scores_of_64_row_tiles():
    """The check can fail: 64 query rows for 8 warps on Hopper has both warpgroups computing
    the same QK product, 768 MACs per pair for 640 in its dots."""
    from tools.kernel_report import report
    result = compiled(script="""
        import json
        from stm_kernels.backends.triton import tilings
        from tools.kernel_report import report
        from tools.kernel_report.compile import TARGETS
        old = tilings.ForwardConfig(block_m=64, block_n=32, block_v=512, num_warps=8,
                                    num_stages=3)
        with tilings.use_configs(forward=old):
            rows, _ = report.case_rows(TARGETS["sm_90"], "bf16", "dot", only={"forward"})
        print(json.dumps(rows))
    """)
    (row,) = result
    scores = [dot for dot in row["dots"] if dot["n"] == 32]
    assert [dot["duplication"] for dot in scores] == [2]
    assert row["executed_macs_per_pair"] == 768 and row["dot_macs_per_pair"] == 640
    payload = dict(targets={"sm_90": dict(architecture="sm_90", cases=[dict(
        precision="bf16", case="dot", rows=result, totals={})])})
    assert any("a dot computed by several warps" in problem
               for problem in report.problems(payload))


def test_compiles_are_specialised_as_a_launch_on_the_target_is():
    """The report compiles each kernel with the specialisation Triton's JIT gives that launch
    on the target: here derived independently (the JIT's binder and packing for the target's
    backend, run by hand) and compared with what compile_kernel hands the compiler, for a
    small merge and a launch at the report's shape. AMD adds the 32-bit pointer range of
    tensors under 2 GB (its buffer loads), NVIDIA does not."""
    result = compiled(script="""
        import json, torch
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        from stm_kernels.backends.triton.kernels.forward import memory_read_merge_kernel
        from tools.kernel_report import compile as offline
        arguments = dict(po=torch.empty(2, 1, 8, 32, device="meta"),
                         plse=torch.empty(2, 1, 32, device="meta"),
                         o=torch.empty(1, 8, 32, dtype=torch.bfloat16, device="meta"),
                         lse=torch.empty(1, 32, device="meta"),
                         stride_pos=256, stride_pob=256, stride_poc=32, stride_pom=1,
                         stride_pls=32, stride_plb=32, stride_plm=1, stride_ob=256,
                         stride_oc=32, stride_om=1, stride_lb=32, stride_lm=1, HW=30, CV=8,
                         SPLITS=2, BLOCK_M=64, BLOCK_V=64, I64=False)
        names = [parameter.name for parameter in memory_read_merge_kernel.params]
        handed = {}
        def compile_(kernel, signature, constexprs, attrs, options, target):
            handed[target.name] = (signature, constexprs, attrs)
            raise RuntimeError("not compiled here")
        offline._compile = compile_
        found = {}
        for name in ("sm_90", "gfx942"):
            target = offline.TARGETS[name]
            options = dict(num_warps=4, num_stages=1)
            try:
                offline.compile_kernel(memory_read_merge_kernel, arguments, options, target)
            except RuntimeError:
                pass
            backend = make_backend(target.gpu_target)
            binder = create_function_from_signature(memory_read_merge_kernel.signature,
                                                    memory_read_merge_kernel.params, backend)
            bound, specialization, launch_options = binder(**arguments, **options)
            _, signature, constexprs, attrs = memory_read_merge_kernel._pack_args(
                backend, dict(options), bound, specialization, launch_options)
            attrs = {path: attr for path, attr in attrs.items() if attr}
            signature_, constexprs_, attrs_ = handed[name]
            found[name] = dict(
                same=[signature_ == signature, constexprs_ == constexprs, attrs_ == attrs],
                signature=signature,
                constexprs={names[path[0]]: value for path, value in constexprs.items()},
                attrs={names[path[0]]: attr for path, attr in attrs.items()})
        print(json.dumps(found))
    """)
    for name in ("sm_90", "gfx942"):
        found = result[name]
        assert found["same"] == [True, True, True], name
        signature, constexprs, attrs = found["signature"], found["constexprs"], found["attrs"]
        assert signature["po"] == "*fp32" and signature["o"] == "*bf16"
        assert signature["stride_pom"] == "constexpr" and constexprs["stride_pom"] == 1
        assert signature["HW"] == "i32" and constexprs["BLOCK_M"] == 64 and not constexprs["I64"]
        assert ["tt.divisibility", 16] in attrs["stride_pos"] and "HW" not in attrs  # 30
    assert result["sm_90"]["attrs"]["po"] == [["tt.divisibility", 16]]
    assert result["gfx942"]["attrs"]["po"] == [["tt.divisibility", 16], ["tt.pointer_range", 32]]
    assert ["tt.pointer_range", 32] not in result["gfx942"]["attrs"]["stride_pos"]


def test_amd_registers_are_counted_once_and_sgpr_spills_are_not_memory():
    """An AMDGPU kernel's metadata (handmade): on gfx90a, gfx942 and gfx950 .vgpr_count holds
    the AGPRs too (not added twice); the memory spilled is the scratch per lane; VGPR spills
    without scratch went into AGPRs and SGPR spills into VGPR lanes, both counted apart."""
    from tools.kernel_report.compile import _amd_resources
    metadata = textwrap.dedent("""
        amdhsa.kernels:
          - .agpr_count:     128
            .name:           memory_read_bwd_kernel_dv
            .private_segment_fixed_size: 0
            .sgpr_count:     96
            .sgpr_spill_count: 12
            .vgpr_count:     256
            .vgpr_spill_count: 0
    """)
    assert _amd_resources(metadata, "gfx950") == (256, 0, 0, 12)
    assert _amd_resources(metadata, "gfx908") == (384, 0, 0, 12)  # two register files there
    into_agprs = metadata.replace(".vgpr_spill_count: 0", ".vgpr_spill_count: 8")
    assert _amd_resources(into_agprs, "gfx950") == (256, 0, 8, 12)  # no scratch: AGPRs
    to_memory = into_agprs.replace(".private_segment_fixed_size: 0",
                                   ".private_segment_fixed_size: 80")
    assert _amd_resources(to_memory, "gfx950") == (256, 80, 8, 12)


def test_the_report_names_every_problem():
    from tools.kernel_report import report
    good = dict(kernel="forward", spill_bytes=0, shared_bytes=100, shared_limit=200,
                duplicated_dots=0, dots=[], mma={"mma.m16n8k16.row.col.f32.bf16.bf16": 8})
    case = dict(precision="bf16", case="dot", totals=dict(forward_ratio=1.5, total_ratio=1.2),
                rows=[good, dict(good, kernel="dv", spill_bytes=8),
                      dict(good, kernel="dkdq", shared_bytes=300),
                      dict(good, kernel="select", error="CompilationError: x"),
                      dict(kernel="usage", unavailable="no tiling"),
                      dict(good, kernel="dq", mma={}),
                      # an FMA dot (exact float32 on NVIDIA): no matrix instruction, work read
                      dict(good, kernel="dk", mma={}, dots=[dict(fma=True)])])
    payload = dict(targets={"sm_80": dict(architecture="sm_80", cases=[case])})
    amd = dict(precision="tf32", case="l2", totals={}, rows=[
        dict(good, kernel="dv", vgpr_spills=8, sgpr_spills=4),  # into AGPRs: a problem
        dict(good, kernel="forward", sgpr_spills=12)])  # SGPRs into VGPR lanes: none
    assert report.problems(dict(targets={"gfx950": dict(architecture="gfx950",
                                                         cases=[amd])})) == [
        "gfx950 tf32 l2 dv: spills 8 VGPRs into AGPRs"]
    problems = report.problems(payload)
    assert problems == ["sm_80 bf16 dot dv: spills 8 B",
                        "sm_80 bf16 dot dkdq: shared memory 300 > 200",
                        "sm_80 bf16 dot select: CompilationError: x",
                        "sm_80 bf16 dot usage: no kernel runs (no tiling)",
                        "sm_80 bf16 dot dq: work not read (no matrix instruction nor FMA dot "
                        "the report parses)",
                        "sm_80 bf16 dot: forward executes 1.5x"]
    exception = ("sm_80", "dv", "16-bit", 128)
    tilings.EXCEPTIONS[exception] = "a stated reason"
    try:
        assert "sm_80 bf16 dot dv: spills 8 B" not in report.problems(payload)
        assert report.stated(payload) == {exception: ("a stated reason",
                                                      ["sm_80 bf16 dot dv: spills 8 B"])}
    finally:
        del tilings.EXCEPTIONS[exception]


def test_the_search_keeps_the_first_that_meets_the_targets_and_skips_what_cannot_fit(
        monkeypatch):
    """search() compiles candidates in order, skips one that needs at least what an
    overflowing one needed, keeps the first meeting the targets and a smaller fallback."""
    from tools.kernel_report import search
    F = tilings.ForwardConfig
    candidates = [F(128, 64, 256, 8, 3), F(128, 64, 256, 8, 4), F(64, 32, 256, 8, 2),
                  F(32, 32, 256, 4, 2), F(32, 16, 256, 4, 1)]
    monkeypatch.setitem(search.CANDIDATES, ("forward", 2), candidates)

    def fake(target, kernel, precision_class, width, config, keep_going):
        shared = config.block_m * config.block_n * config.num_stages * 8
        row = dict(case="Ck=128", spill_bytes=40 if config.block_m == 64 else 0,
                   shared_bytes=shared, shared_limit=100_000, duplicated_dots=0,
                   executed_macs_per_pair=768, passes=1, registers=200)
        return [row, dict(row, case="Ck=128 l2")]

    monkeypatch.setattr(search, "compile_candidate", fake)
    first, others, tried = search.search(None, "forward", "16-bit", 128, log=lambda text: None)
    assert first == F(32, 32, 256, 4, 2) and others == [F(32, 16, 256, 4, 1)]
    assert F(128, 64, 256, 8, 4) not in tried  # dominates the first, which overflowed
    assert search.dominates(F(64, 64, None, 8, 2), F(64, 32, 256, 8, 2))
    assert not search.dominates(F(64, 64, 256, 4, 2), F(64, 32, 256, 8, 2))
    # a streamed tile needs fewer registers: a spill of the held tiling says nothing of it
    assert not search.dominates(F(64, 32, 256, 8, 2, stream_queries=True), F(64, 32, 256, 8, 2))
    # AMD: VGPRs spilled into AGPRs (no scratch) miss the targets as scratch spills do
    clean = dict(case="Ck=128", spill_bytes=0, shared_bytes=1, shared_limit=2,
                 duplicated_dots=0, executed_macs_per_pair=768, passes=1)
    assert search.meets_targets("forward", 128, [clean])
    assert not search.meets_targets("forward", 128, [dict(clean, vgpr_spills=8)])


def test_the_search_skips_what_a_triton_release_compiles_wrong_for_the_target(monkeypatch):
    """tilings.MISCOMPILED: on sm_90 the dK+dQ tilings of 64 key rows over 16 query rows on 4
    warps are never compiled nor kept (first or fallback); elsewhere they are."""
    from tools.kernel_report import search
    from tools.kernel_report.compile import TARGETS
    K = tilings.DkdqConfig
    candidates = [K(128, 16, 8, 2, None), K(64, 16, 4, 2, None), K(64, 16, 4, 1, 64),
                  K(64, 32, 4, 1, 32)]
    monkeypatch.setitem(search.CANDIDATES, ("dkdq", 2), candidates)
    compiled = []

    def fake(target, kernel, precision_class, width, config, keep_going):
        compiled.append(config)
        row = dict(case="Ck=128", spill_bytes=0, shared_bytes=1000 * config.block_n,
                   shared_limit=300_000, duplicated_dots=0, executed_macs_per_pair=896,
                   passes=1, registers=200)
        return [row, dict(row, case="Ck=128 l2")]

    monkeypatch.setattr(search, "compile_candidate", fake)
    first, others, _ = search.search(TARGETS["sm_90"], "dkdq", "16-bit", 128, fallbacks=2,
                                     log=lambda text: None)
    assert first == candidates[0] and others == [candidates[3]]
    assert compiled == [candidates[0], candidates[3]]
    compiled.clear()
    first, others, _ = search.search(TARGETS["sm_100"], "dkdq", "16-bit", 128, fallbacks=2,
                                     log=lambda text: None)
    assert others == candidates[1:3]


def test_when_nothing_meets_the_targets_a_small_spill_beats_a_duplicated_dot():
    from tools.kernel_report import search
    F = tilings.ForwardConfig

    def row(spills, duplicated, shared=1):
        return dict(spill_bytes=spills, duplicated_dots=duplicated, shared_bytes=shared,
                    shared_limit=2, executed_macs_per_pair=768)

    tried = {F(64, 32, 256, 4, 2): [row(0, 1)], F(32, 32, 256, 4, 2): [row(40, 0)],
             F(16, 16, 64, 4, 1): [row(200, 0)], F(128, 64, 256, 8, 3): [row(0, 0, shared=3)]}
    assert search.best_effort(tried) == F(32, 32, 256, 4, 2)
    del tried[F(32, 32, 256, 4, 2)]
    assert search.best_effort(tried) == F(64, 32, 256, 4, 2)  # then the fewest spills


# --------------------------------------------------------------------------- compiler output


def test_loop_reading_on_a_handmade_ptx_and_ttgir():
    """ptx.py on a tiny PTX/TTGIR: loop detection, nested trip counts, census, layouts
    (Hopper's wgmma, Ampere's mma.sync, AMD's MFMA, Blackwell's tcgen05 and FMA dots)."""
    from tools.kernel_report import ptx
    text = "\n".join([
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
    body = ptx.main_loop(text, inner_trip_counts=[3])
    census = {entry["shape"]: entry["count"] for entry in ptx.mma_census(body)}
    assert census == {"m64n32k16": 1, "m64n64k16": 3}
    assert ptx.executed_macs(ptx.mma_census(body), num_warps=8) == 2 * (
        64 * 32 * 16 + 3 * 64 * 64 * 16)
    assert ptx.count(body, "bar.sync") == 1
    assert ptx.count(body, "cp.async.cg") == 3
    # Opcodes, not substrings: "red.global" is in every cp.async...shared.global too.
    assert ptx.count(body, "red", "atom") == 3
    assert ptx.count(body, "red.global") == 0
    ttgir = "\n".join([
        "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
        "instrShape = [16, 32, 16]}>",
        "#mma1 = #ttg.amd_mfma<{version = 3, warpsPerCTA = [8, 1], instrShape = [32, 32, 8], "
        "isTransposed = true}>",
        "#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 2], "
        "instrShape = [16, 8]}>",
        "#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [2, 16], "
        "warpsPerCTA = [4, 1], order = [1, 0]}>",
        "#blocked1 = #ttg.blocked<{sizePerThread = [4, 4], threadsPerWarp = [1, 32], "
        "warpsPerCTA = [1, 4], order = [1, 0]}>",
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
        "  %w = tt.dot %p2, %v2, %c2 : tensor<128x64xbf16, #dot1> * tensor<64x32xbf16, #dot2> "
        "-> tensor<128x32xf32, #mma1>",
        "  %x2 = tt.dot %p3, %v3, %c3 : tensor<32x64xbf16, #dot1> * tensor<64x16xbf16, #dot2> "
        "-> tensor<32x16xf32, #mma2>",
        "  %f1 = tt.dot %q4, %k4, %c4 : tensor<16x128xf32, #ttg.dot_op<{opIdx = 0, parent = "
        "#blocked}>> * tensor<128x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> "
        "tensor<16x16xf32, #blocked>",
        "  %f2 = tt.dot %p5, %v5, %c5 : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = "
        "#blocked1}>> * tensor<16x256xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked1}>> -> "
        "tensor<16x256xf32, #blocked1>",
        "  ttng.tc_gen5_mma %a5, %b5, %d5, %true, %true, %bar[%true] {is_async} : "
        "!ttg.memdesc<64x64xbf16, #tmem1, #ttng.tensor_memory>, !ttg.memdesc<64x256xbf16, "
        "#shared, #smem>, !ttg.memdesc<64x256xf32, #tmem, #ttng.tensor_memory, mutable>, "
        "!ttg.memdesc<1xi64, #shared1, #smem, mutable>",
        "}",
        "ttng.tc_gen5_mma %a6, %b6, %d6 : !ttg.memdesc<64x128xbf16, #shared>, "
        "!ttg.memdesc<128x64xbf16, #shared2>, !ttg.memdesc<64x64xf32, #tmem1>",  # after: out
    ])
    assert ptx.inner_trip_counts(ttgir) == [4]
    dots = ptx.loop_dots(ttgir)
    assert [(d["m"], d["n"], d["k"], d["duplication"], d["repeats"]) for d in dots] == [
        (64, 32, 128, 2, 1), (128, 32, 16, 1, 4),
        (128, 32, 64, 2, 1),  # 8 wavefronts x 32-row MFMAs over 128 rows: each row twice
        (32, 16, 64, 1, 1),  # 2 x 16 rows by 2 x 8 columns: each element once
        (16, 16, 128, 1, 1),  # FMA: 8 rows x 16 columns of lanes, twice over the tile
        (16, 256, 16, 2, 1),  # FMA: 4 rows x 512 columns of lanes, half of them repeats
        (64, 256, 64, 1, 1)]  # Blackwell's tcgen05: one MMA per block, A 64 x 64, B 64 x 256
    assert [d["fma"] for d in dots] == [False] * 4 + [True] * 2 + [False]
    assert ptx.blocks_per_sm(255, 176 * 1024, 8) == 1
    assert ptx.blocks_per_sm(128, 40 * 1024, 8) == 2  # registers
    assert ptx.blocks_per_sm(64, 100 * 1024, 4) == 2  # shared memory


def test_memory_reading_on_a_handmade_ttgir():
    """loop_memory counts the tiles a loop with runtime bounds loads (pointer tensors, TMA
    boxes) and updates atomically, repeats nested constant loops, and leaves out what runs
    before or after the loop and scalar accesses."""
    from tools.kernel_report import ptx
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
    assert ptx.loop_memory(ttgir) == dict(
        load_bytes=128 * 64 * 2 + 2 * 64 * 32 * 4 + 256 * 64 * 2, atomic_bytes=128 * 16 * 4)


def test_runtime_loop_nested_in_the_main_loop_repeats_inner_trips():
    """A loop with runtime bounds inside the main loop (the selection's key-channel chunks) is
    not a main loop of its own: its dots and loads repeat the caller's inner_trips times, and
    the main loop's own once; a dot after the main loop is not counted."""
    from tools.kernel_report import ptx
    ttgir = "\n".join([
        "%c0_i32 = arith.constant 0 : i32",
        "%c64_i32 = arith.constant 64 : i32",
        "%r = scf.for %n = %lo to %hi step %c64_i32 iter_args(%a = %x) -> (f32) {",
        "  %s = scf.for %c = %c0_i32 to %ck step %c64_i32 iter_args(%b = %y) -> (f32) {",
        "    %q = tt.load %pq : tensor<32x64x!tt.ptr<f32>, #blocked>",
        "    %k = tt.load %pk : tensor<64x64x!tt.ptr<f32>, #blocked>",
        "    %d = tt.dot %q2, %k2, %b : tensor<32x64xf32, #dot1> * tensor<64x64xf32, #dot2> "
        "-> tensor<32x64xf32, #mma>",
        "  }",
        "  %w = tt.load %pw : tensor<64x!tt.ptr<f32>, #blocked1>",
        "}",
        "%e = tt.dot %q3, %k3, %z : tensor<32x64xf32, #dot1> * tensor<64x64xf32, #dot2> "
        "-> tensor<32x64xf32, #mma>",
    ])
    assert [(d["k"], d["repeats"]) for d in ptx.loop_dots(ttgir)] == [(64, 1)]
    assert [(d["k"], d["repeats"], d["executed_macs"]) for d in ptx.loop_dots(ttgir, 3)] == [
        (64, 3, 3 * 32 * 64 * 64)]
    assert ptx.loop_memory(ttgir, 3)["load_bytes"] == 3 * (32 + 64) * 64 * 4 + 64 * 4
    assert ptx.inner_trip_counts(ttgir) == []
