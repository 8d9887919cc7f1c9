"""The static report: every kernel of the fused read as the runtime would launch it on each
target GPU, compiled offline, with what the compiler says of it.

    python -m tools.kernel_report                        # every target: docs/kernel_report.*
    python -m tools.kernel_report --arch sm_80 gfx942    # some targets (any of TARGETS)
    python -m tools.kernel_report --json                 # print the JSON, write nothing

Per target, precision (fp16, bf16, TF32, exact fp32) and similarity case (dot and l2 with
Ck = 128; XMem with Ck = 64 and 128, i.e. 129 and 257 augmented key channels), at the target
shape (B = 1, HW = 1,620, N = 162,000, Cv = 512), it runs the runtime's own launchers with
meta tensors while pretending to be that GPU (compile.compiling_for): the config in each row is
the one the runtime would choose there. Each row: registers, spilled bytes, shared memory and
the target's limit, the matrix instructions, the dots of the main loop with how many warps
compute each element (1: no duplication), executed and useful multiply-adds per (query, memory)
pair, and the L2 bytes per pair the main loop loads. Speed is not here (no GPU).
"""
import dataclasses
import datetime
import hashlib
import pathlib
import re

import torch
import triton

from stm_kernels.backends.triton import launch, running, tilings
from tools.kernel_report import ptx
from tools.kernel_report.compile import TARGETS, compiling_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SHAPE = dict(B=1, HW=1620, N=162000, Cv=512)
SELECT_TOP_K = 64  # the largest top-k the fused selection supports
# name: (dtype, torch float32 matmul precision)
PRECISIONS = {"fp16": (torch.float16, "highest"), "bf16": (torch.bfloat16, "highest"),
              "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest")}
# name: (key channels the kernels see, l2); XMem's with a selection: 2 Ck + 1 channels
CASES = {"dot": (128, False), "l2": (128, True), "xmem Ck=64": (129, False),
         "xmem Ck=128": (257, False)}
# Tensor-core products per dot of each input precision: a split precision computes a float32
# dot as several products of its parts (its cost of exactness), counted once in the targets.
PASSES = {"tf32x3": 3, "bf16x3": 3, "bf16x6": 6}
# Targets of executed / useful multiply-adds per pair (dot and l2 at Ck = 128), per pass.
FORWARD_RATIO_TARGET = 1.2
TOTAL_RATIO_TARGET = 1.3
# dk, dq: dK and dQ by two kernels, the deterministic backward's (and, where tilings.SEPARATE_DQ
# says, every backward's); dkdq: the fused kernel with dQ by atomics.
KERNEL_ORDER = ("forward", "merge", "prepare", "dv", "dkdq", "dk", "dq", "select",
                "select_merge", "usage")
# Kernels without a product of tiles (a merge of partial reads, the backward's elementwise
# prepare pass, the selection's merge of its splits' keys): no MACs per pair to count, no
# matrix instruction expected.
NO_DOT_KERNELS = ("merge", "prepare", "select_merge")
# The sources whose change can change a compile: the report records their hash.
KERNEL_SOURCES = ("stm_kernels/backends/triton/kernels/forward.py",
                  "stm_kernels/backends/triton/kernels/backward.py",
                  "stm_kernels/backends/triton/kernels/topk.py",
                  "stm_kernels/backends/triton/kernels/common.py")
# The launchers: launch.py and the modules it names, where every launch's arguments, grid and
# config are decided.
LAUNCHER_SOURCES = tuple(f"stm_kernels/backends/triton/{name}.py" for name in (
    "launch", "forward_launcher", "backward_launcher", "selection_launchers", "running", "calls",
    "plans", "kernel_arguments", "gluon_opt_in", "kept_launches"))
SOURCES = LAUNCHER_SOURCES + ("stm_kernels/backends/triton/tilings.py",) + KERNEL_SOURCES
# The backends/triton modules the fingerprint leaves out: the fallback wrapper (__init__), fixes
# for older Triton releases, the compiler's captured stderr, the device description, and the
# direct path of kept launches (their later calls, which the offline compiles never take).
OUTSIDE_FINGERPRINT = tuple(f"stm_kernels/backends/triton/{name}.py" for name in (
    "__init__", "compat", "compiler_output", "devices", "direct_launch"))


def fingerprint(sources=SOURCES):
    """A hash of the kernel sources, the tilings and the Triton version: a report made from
    other sources or by another Triton is stale."""
    digest = hashlib.sha256(triton.__version__.encode())
    for name in sources:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- running a case


def _meta_inputs(dtype, channels):
    B, HW, N, Cv = (SHAPE[key] for key in ("B", "HW", "N", "Cv"))
    q = torch.empty(1, channels, HW, dtype=dtype, device="meta")
    k = torch.empty(B, channels, N, dtype=dtype, device="meta")
    v = torch.empty(B, Cv, N, dtype=dtype, device="meta")
    return q, k, v


def run_case(target, precision, case, only=None):
    """{kernel: Launch records, in launch order} of every pass of the read for one precision
    and case on the target, plus {kernel: reason} of the passes no kernel could run."""
    dtype, matmul_precision = PRECISIONS[precision]
    channels, l2 = CASES[case]
    q, k, v = _meta_inputs(dtype, channels)
    scale = channels ** -0.5
    records, unavailable = {}, {}
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    launch.forget_choices()  # choices are the runtime's per process; each case starts afresh
    try:
        with compiling_for(target, only=only) as launches:
            reason = launch.unsupported_reason(k)
            if reason is not None:
                unavailable["every"] = reason
            else:
                for run_pass in passes(q, k, v, scale, l2).values():
                    try:  # each pass on its own: one that cannot run skips no other
                        run_pass()
                    except running.KernelUnavailable as error:
                        unavailable[error.kernel] = error.reason
    finally:
        torch.set_float32_matmul_precision(previous)
    for record in launches:
        records.setdefault(record.kernel, []).append(record)
    return records, unavailable


def passes(q, k, v, scale, l2):
    """{pass name: a call launching its kernels} of a read of meta tensors q, k, v, each on its
    own meta inputs (the backward and usage take the forward's output shapes, not its run)."""
    B, Cv, HW = v.shape[0], v.shape[1], q.shape[2]
    out = torch.empty(B, Cv, HW, dtype=v.dtype, device="meta")
    lse = torch.empty(B, HW, dtype=torch.float32, device="meta")
    return dict(
        forward=lambda: launch.triton_forward(q, k, v, scale, l2),
        backward=lambda: launch.triton_backward(out, None, q, k, v, out, lse, scale, l2),
        deterministic=lambda: _deterministic_backward(q, k, v, out, lse, scale, l2),
        select=lambda: launch.triton_select(q, k, SELECT_TOP_K, scale, l2),
        usage=lambda: launch.triton_usage(q, k, lse, scale, l2))


def _deterministic_backward(q, k, v, out, lse, scale, l2):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        launch.triton_backward(out, None, q, k, v, out, lse, scale, l2)
    finally:
        torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------- rows


def fields(config):
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}


def _tile(record):
    """(tile pairs of one main-loop iteration, programs repeating a pair) of a launch."""
    arguments = record.arguments
    if record.kernel in NO_DOT_KERNELS:
        return None, 0
    block = arguments["BLOCK_M"] * arguments["BLOCK_N"]
    return block, arguments.get("NUM_V", 1)


def _inner_trips(record):
    """Trips of the runtime loop nested in a launch's main loop: the selection's key-channel
    chunks (CHUNK_CK < BLOCK_CK: cdiv(CK, CHUNK_CK)); 1 for the kernels that have none."""
    arguments = record.arguments
    chunk = arguments.get("CHUNK_CK")
    if chunk is None or chunk >= arguments["BLOCK_CK"]:
        return 1
    return -(-arguments["CK"] // chunk)


def mma_instructions(asm):
    """{instruction name: count} of the matrix instructions in the whole kernel (PTX wgmma /
    mma.sync with shape and types, tcgen05.mma with its kind, or AMD v_mfma)."""
    if "ptx" in asm:
        found = re.findall(r"\b(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.\w+\.\w+|"
                           r"mma\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.\w+\.\w+\.\w+\.\w+|"
                           r"tcgen05\.mma\.cta_group::\d\.kind::\w+)", asm["ptx"])
        found = [name.replace(".sync.aligned", "").replace("mma_async", "") for name in found]
    else:
        found = re.findall(r"\b(v_mfma_\w+)", asm.get("amdgcn", ""))
    counts = {}
    for name in found:
        counts[name] = counts.get(name, 0) + 1
    return counts


def analyse(record, target):
    """The report row of one recorded launch."""
    precision = record.arguments.get("PRECISION")
    row = dict(config=fields(record.config), grid=list(record.grid),
               num_warps=record.num_warps, num_stages=record.num_stages,
               input_precision=precision, passes=PASSES.get(precision, 1))
    if record.error:
        row["error"] = record.error
        return row
    compiled = record.compiled
    row.update(registers=compiled.registers, spill_bytes=compiled.spill_bytes,
               local_bytes=compiled.local_bytes,
               shared_bytes=compiled.shared_bytes, shared_limit=target.shared_memory,
               mma=mma_instructions(compiled.asm))
    for field in ("vgpr_spills", "sgpr_spills"):  # AMD's register-to-register spills
        if getattr(compiled, field, 0):
            row[field] = getattr(compiled, field)
    if compiled.warnings:
        row["compiler_warnings"] = compiled.warnings
    ttgir = compiled.asm["ttgir"]
    inner_trips = _inner_trips(record)
    dots = ptx.loop_dots(ttgir, inner_trips)
    row["dots"] = [{key: dot[key] for key in ("m", "n", "k", "warps", "instr", "fma",
                                              "duplication", "repeats")} for dot in dots]
    row["duplicated_dots"] = sum(dot["duplication"] > 1 for dot in dots)
    tile_pairs, repeats = _tile(record)
    if tile_pairs:
        row["executed_macs_per_pair"] = sum(d["executed_macs"] for d in dots) * repeats / tile_pairs
        row["dot_macs_per_pair"] = sum(d["useful_macs"] for d in dots) * repeats / tile_pairs
        memory = ptx.loop_memory(ttgir, inner_trips)
        row["l2_bytes_per_pair"] = (memory["load_bytes"] + memory["atomic_bytes"]) * repeats \
            / tile_pairs
    return row


def case_rows(target, precision, case, only=None):
    """(rows, totals) of one case: for every kernel the launch the runtime chose (the last
    record of the kernel, after the candidates that failed), with the failed candidates.
    only: the runtime names of the kernels to compile and report (default: all)."""
    records, unavailable = run_case(target, precision, case, only)
    rows = []
    for kernel in KERNEL_ORDER:
        if kernel not in records or (only is not None and kernel.split(" ")[0] not in only):
            continue
        ran = [record for record in records[kernel] if not record.error]
        chosen = ran[-1] if ran else records[kernel][-1]
        row = dict(kernel=kernel, **analyse(chosen, target))
        failed = list(dict.fromkeys(record.error for record in records[kernel] if record.error))
        if failed:
            row["failed_candidates"] = failed
        rows.append(row)
    for kernel, reason in unavailable.items():
        rows.append(dict(kernel=kernel, unavailable=reason))
    return rows, totals(rows, CASES[case][0])


def totals(rows, channels):
    """Executed / useful multiply-adds per pair: forward, and forward + backward (dV, dK/dQ)
    against the 2.5x of the forward the benchmarks count for the backward."""
    per_pair = {row["kernel"]: row["executed_macs_per_pair"] / row["passes"]
                for row in rows if row.get("executed_macs_per_pair")}
    useful = channels + SHAPE["Cv"]
    result = dict(useful_forward=useful, useful_backward=2.5 * useful)
    if per_pair.get("forward"):
        result["forward_ratio"] = round(per_pair["forward"] / useful, 3)
    # the backward as the runtime runs it without determinism: dK+dQ, or dK and dQ apart
    dk_dq = per_pair.get("dkdq") or (per_pair.get("dk") and per_pair.get("dq")
                                     and per_pair["dk"] + per_pair["dq"])
    if None not in (per_pair.get("forward"), per_pair.get("dv")) and dk_dq:
        result["total_ratio"] = round((per_pair["forward"] + per_pair["dv"] + dk_dq)
                                      / (3.5 * useful), 3)
    return result


def header():
    """The report payload without targets: versions, fingerprint, date, shape."""
    return dict(benchmark="kernel_report", triton=triton.__version__, torch=torch.__version__,
                fingerprint=fingerprint(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                shape=SHAPE, select_top_k=SELECT_TOP_K, targets={})


def target_entry(name, precisions=None, cases=None, progress=None, only=None):
    """The report of one target: its limits, the tilings table it runs, a case per
    (precision, similarity case) with its rows and totals."""
    target = TARGETS[name]
    architecture, reason = tilings.architecture_of(target.device)
    entry = dict(gpus=target.gpus, shared_memory=target.shared_memory,
                 multiprocessors=target.multiprocessors,
                 architecture=architecture.name if architecture else None,
                 unsupported=reason or None, cases=[])
    for precision in precisions or PRECISIONS:
        for case in cases or CASES:
            rows, case_totals = case_rows(target, precision, case, only)
            entry["cases"].append(dict(precision=precision, case=case, rows=rows,
                                       totals=case_totals))
            if progress:
                progress(name, precision, case)
    return entry


def report(targets=None, precisions=None, cases=None, progress=None):
    """The report payload for the given targets (None: all of TARGETS)."""
    payload = header()
    for name in TARGETS if targets is None else targets:
        payload["targets"][name] = target_entry(name, precisions, cases, progress)
    return payload


# --------------------------------------------------------------------------- 8-bit memory

# The 8-bit forward (memory_read_fwd_kernel_8bit; an 8-bit memory, inference only), compiled
# for the GPUs the issue names at the target shape with a bf16 query: each format, three
# pairs of scale axes (keys per channel with values per position, KIVI's; the reverse; and
# keys per channel and frame of HW positions, a memory bank's, with values per position),
# dot and l2. Its rows are reported beside the plain kernels', not held to their targets.
QUANTIZED_TARGETS = ("sm_80", "sm_89", "sm_90")
QUANTIZED_FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANTIZED_AXES = (("channel", "position"), ("position", "channel"),
                  ("channel_frame", "position"))
QUANTIZED_CASES = ("dot", "l2")
QUANTIZED_QUERY = "bf16"


def _scale(B, C, N, axis):
    shape = {"channel": (B, C, 1), "position": (B, 1, N),
             "channel_frame": (B, C, N // SHAPE["HW"])}[axis]  # frames of HW positions
    return torch.empty(shape, device="meta")


def quantized_rows(name):
    """The rows of the 8-bit forward on target `name`: per format, scale axes and case, the
    launch the runtime chooses there (analyse's row, with the config and failed
    candidates), or why no kernel runs."""
    target = TARGETS[name]
    B, HW, N, Cv = (SHAPE[key] for key in ("B", "HW", "N", "Cv"))
    Ck = CASES["dot"][0]
    q = torch.empty(1, Ck, HW, dtype=PRECISIONS[QUANTIZED_QUERY][0], device="meta")
    rows = []
    for fmt, dtype in QUANTIZED_FORMATS.items():
        k = torch.empty(B, Ck, N, dtype=dtype, device="meta")
        v = torch.empty(B, Cv, N, dtype=dtype, device="meta")
        for key_axis, value_axis in QUANTIZED_AXES:
            for case in QUANTIZED_CASES:
                row = dict(format=fmt, key_axis=key_axis, value_axis=value_axis,
                           query=QUANTIZED_QUERY, case=case)
                launch.forget_choices()
                with compiling_for(target, only=("forward_8bit",)) as launches:
                    try:
                        launch.triton_quantized_forward(
                            q, k, _scale(B, Ck, N, key_axis), key_axis, v,
                            _scale(B, Cv, N, value_axis), value_axis, Ck ** -0.5,
                            CASES[case][1])
                    except running.KernelUnavailable as error:
                        row["unavailable"] = error.reason
                records = [record for record in launches if record.kernel == "forward_8bit"]
                if records and "unavailable" not in row:
                    ran = [record for record in records if not record.error]
                    row.update(analyse(ran[-1] if ran else records[-1], target))
                    failed = list(dict.fromkeys(r.error for r in records if r.error))
                    if failed:
                        row["failed_candidates"] = failed
                rows.append(row)
    return rows


def quantized_report(targets=QUANTIZED_TARGETS):
    """{target: quantized_rows} of the 8-bit forward."""
    return {name: quantized_rows(name) for name in targets}


# --------------------------------------------------------------------------- checks


PRECISION_CLASS = {"fp16": "16-bit", "bf16": "16-bit", "tf32": "tf32", "fp32": "fp32"}
# The tables' key width of each case (tilings.key_widths): XMem's 257 channels at Ck = 128
# are 256 tiled and a rank-1 last one.
WIDTH = {"dot": 128, "l2": 128, "xmem Ck=64": 256, "xmem Ck=128": 257}


def shortfalls(payload):
    """[(exception key, text)] of every way the report falls short of the targets: a spill, a
    chosen config that fails or overflows shared memory, a duplicated dot, a dot/l2/xmem-64 case
    the kernels cannot run, a work ratio above its target. The key, (architecture, kernel,
    precision class, key width), is where tilings.EXCEPTIONS may state why (a 257-wide key
    also by its 256-wide entry: exception_key); keys wider than any tiling share one key,
    (None, None, None, width), and so do a target's rows whose work the report cannot read,
    (architecture, None, None, None)."""
    found = []
    for name, entry in payload["targets"].items():
        architecture = entry.get("architecture")
        for case in entry["cases"]:
            where = f"{name} {case['precision']} {case['case']}"
            precision = PRECISION_CLASS[case["precision"]]
            width = WIDTH[case["case"]]
            for row in case["rows"]:
                kernel = row["kernel"].split(" ")[0]
                key = (architecture, kernel, precision, width)
                here = f"{where} {row['kernel']}"
                if "unavailable" in row:
                    if tilings.stated_key(tilings.ON_TORCH, *key):  # by design, with its reason
                        continue
                    if width not in tilings.KEY_WIDTHS:  # one reason for all: no such tiling
                        found.append(((None, None, None, width),
                                      f"{here}: no kernel runs ({row['unavailable']})"))
                    else:
                        found.append((key, f"{here}: no kernel runs ({row['unavailable']})"))
                    continue
                if "error" in row:
                    found.append((key, f"{here}: {row['error']}"))
                    continue
                if row["spill_bytes"]:
                    found.append((key, f"{here}: spills {row['spill_bytes']} B"))
                elif row.get("vgpr_spills"):
                    found.append((key, f"{here}: spills {row['vgpr_spills']} VGPRs into AGPRs"))
                if row["shared_bytes"] > row["shared_limit"]:
                    found.append((key, f"{here}: shared memory {row['shared_bytes']} > "
                                       f"{row['shared_limit']}"))
                fma = row["dots"] and all(dot["fma"] for dot in row["dots"])
                if not row["mma"] and not fma and row["kernel"] not in NO_DOT_KERNELS:
                    found.append(((architecture, None, None, None),  # a matrix unit not parsed
                                  f"{here}: work not read (no matrix instruction nor FMA dot "
                                  f"the report parses)"))
                if row["duplicated_dots"]:
                    found.append((key, f"{here}: a dot computed by several warps "
                                       f"{[dot['duplication'] for dot in row['dots']]}"))
            if case["case"] in ("dot", "l2"):
                totals_ = case["totals"]
                if totals_.get("forward_ratio", 0) > FORWARD_RATIO_TARGET:
                    found.append(((architecture, "forward", precision, width),
                                  f"{where}: forward executes {totals_['forward_ratio']}x"))
                if totals_.get("total_ratio", 0) > TOTAL_RATIO_TARGET:
                    found.append(((architecture, "dv", precision, width),
                                  f"{where}: forward + backward executes "
                                  f"{totals_['total_ratio']}x"))
    return found


def exception_key(key):
    """The key of tilings.EXCEPTIONS that states a shortfall's reason, or None: the
    shortfall's own key or, for a rank-1 key width (257), its tiles' (256)."""
    return tilings.stated_key(tilings.EXCEPTIONS, *key)


def problems(payload):
    """The shortfalls no entry of tilings.EXCEPTIONS explains, one line each (the targets
    hold when it is empty)."""
    return [text for key, text in shortfalls(payload) if exception_key(key) is None]


def on_torch(payload):
    """{(architecture, read, precision class, width): (its reason, [the report's cases])} of
    the reads the torch backend computes by design (tilings.ON_TORCH)."""
    found = {}
    for name, entry in payload["targets"].items():
        for case in entry["cases"]:
            for row in case["rows"]:
                key = tilings.stated_key(tilings.ON_TORCH, entry.get("architecture"),
                                         row["kernel"], PRECISION_CLASS[case["precision"]],
                                         WIDTH[case["case"]])
                if "unavailable" in row and key is not None:
                    found.setdefault(key, (tilings.ON_TORCH[key], []))[1].append(
                        f"{name} {case['precision']} {case['case']}")
    return found


def stated(payload):
    """{exception key: (its reason, [the shortfalls it explains])} of the report."""
    found = {}
    for key, text in shortfalls(payload):
        stated_key = exception_key(key)
        if stated_key is not None:
            found.setdefault(stated_key, (tilings.EXCEPTIONS[stated_key], []))[1].append(text)
    return found
