"""Where the time goes, from Nsight Compute: the profile stage's report summarised per kernel.

    ncu --import profile.ncu-rep --page raw --csv --print-units base > profile_raw.csv
    python -m tools.gpu_session.ncu_summary profile_raw.csv --passes profile_passes_cuda_<date>.json

Per profiled kernel (launch order): its pass (tools.gpu_session.profile_target's order),
duration, SM and
tensor-pipe use, L2 and DRAM bytes and their rates, L2 throughput, achieved occupancy,
registers, shared memory, and the warp stall reasons that dominate; beside the measured L2
bytes, the ones the static work report predicts from the tiles (its bytes per (query, memory)
pair x B x HW x N; the newest bench/results/kernel_work_sm90_*.json unless --static names
one). Metrics are picked by their ncu names: a metric this ncu does not report is left out
(null), never guessed. Reads the raw page (one row per kernel under a units row) or a
long CSV (one row per metric). Writes bench/results/ncu_<device type>_<date>.json.
"""
import argparse
import csv
import datetime
import json
import pathlib
import re

from bench import common
from tools.gpu_session.profile_target import FORWARD_KERNEL, WARP_SPECIALIZED_KERNEL

# Scale of ncu's units to seconds and bytes. A value without a unit (an export without the
# units row) is taken in ncu's base unit, which the profile stage asks for (--print-units
# base): nanoseconds and bytes.
SECONDS = {"": 1e-9, "nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6,
           "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}
BYTES = {"": 1.0, "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12}
# name in the summary: ncu metric names, first present wins
METRICS = {
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
    "tensor_pipe_pct": ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed",
                        "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                        "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
                        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    "l2_throughput_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed",),
    "dram_throughput_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                            "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    "occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "registers": ("launch__registers_per_thread",),
    "grid_size": ("launch__grid_size",),
    "block_size": ("launch__block_size",),
}
DURATION = "gpu__time_duration.sum"
SHARED = ("launch__shared_mem_per_block_static", "launch__shared_mem_per_block_dynamic")
L2_BYTES = "lts__t_bytes.sum"
L2_SECTORS = "lts__t_sectors.sum"  # x 32 bytes where the bytes are not reported
DRAM_BYTES = "dram__bytes.sum"
DRAM_PARTS = ("dram__bytes_read.sum", "dram__bytes_write.sum")  # where the sum is not reported
# Warp stall reasons: the Warp State section's cycles per issued instruction, else the
# sampled stalls.
STALLS = (re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$"),
          re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$"))
# Kernel name -> the static work report's row (the Gluon kernel's row is its pass's).
STATIC_ROWS = {FORWARD_KERNEL: "fwd", "memory_read_bwd_kernel_dv": "bwd_dv",
               "memory_read_bwd_kernel_dkdq": "bwd_dkdq", "memory_read_merge_kernel": "merge"}


def _number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_ncu_csv(text):
    """[dict(id, name, metrics={metric: (value, unit)})] of the kernels in an ncu CSV export,
    in report order: the raw page (a header row of metric names, a units row, one row per
    kernel) or a long export (one row per metric: "Metric Name", "Metric Unit",
    "Metric Value"). Lines before the header (==PROF== messages) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu CSV header (a line starting with "ID") found')
    rows = [row for row in csv.reader(lines[start:]) if row]
    header = rows[0]
    if "Kernel Name" not in header:
        raise ValueError("the ncu CSV header has no \"Kernel Name\" column")
    kernels = {}

    def kernel(row):
        fields = dict(zip(header, row, strict=False))
        return kernels.setdefault(fields["ID"], dict(id=fields["ID"], name=fields["Kernel Name"],
                                                     metrics={})), fields
    if "Metric Name" in header:
        for row in rows[1:]:
            entry, fields = kernel(row)
            entry["metrics"][fields["Metric Name"]] = (fields.get("Metric Value", ""),
                                                       fields.get("Metric Unit", ""))
        return list(kernels.values())
    has_units = len(rows) > 1 and rows[1][0] == ""
    units = rows[1] if has_units else [""] * len(header)
    for row in rows[2 if has_units else 1:]:
        entry, _ = kernel(row)
        for name, unit, value in zip(header, units, row, strict=False):
            entry["metrics"][name] = (value, unit)
    return list(kernels.values())


def _value(metrics, name, scales=None):
    """The metric as a float (scaled to seconds or bytes when scales is given), else None."""
    if name not in metrics:
        return None
    text, unit = metrics[name]
    value = _number(text)
    if value is None or scales is None:
        return value
    scale = scales.get(unit.lower())
    return None if scale is None else value * scale


def _first(metrics, names):
    return next((value for value in (_value(metrics, name) for name in names)
                 if value is not None), None)


def _sum(metrics, names, scales):
    values = [_value(metrics, name, scales) for name in names]
    return None if None in values else sum(values)


def stalls(metrics, top=5):
    """{reason: value} of the largest warp stall reasons (one ncu family, see STALLS)."""
    for pattern in STALLS:
        found = {}
        for name in metrics:
            match = pattern.match(name)
            if match and not match.group(1).endswith("not_issued"):
                value = _value(metrics, name)
                if value is not None:
                    found[match.group(1)] = value
        if found:
            ranked = sorted(found.items(), key=lambda item: -item[1])[:top]
            return dict(source=pattern.pattern, reasons=dict(ranked))
    return None


def summarise_kernel(kernel):
    """The summary fields of one kernel (module docstring)."""
    metrics = kernel["metrics"]
    seconds = _value(metrics, DURATION, SECONDS)
    l2, sectors = _value(metrics, L2_BYTES, BYTES), _value(metrics, L2_SECTORS)
    if l2 is None and sectors is not None:
        l2 = 32 * sectors
    dram = _value(metrics, DRAM_BYTES, BYTES)
    if dram is None:
        dram = _sum(metrics, DRAM_PARTS, BYTES)
    row = dict(id=kernel["id"], kernel=kernel["name"],
               duration_us=None if seconds is None else round(seconds * 1e6, 2),
               **{field: _first(metrics, names) for field, names in METRICS.items()},
               shared_bytes=_sum(metrics, SHARED, BYTES), l2_bytes=l2, dram_bytes=dram)
    for field, count in (("l2_tbps", l2), ("dram_tbps", dram)):
        row[field] = (round(count / seconds / 1e12, 3)
                      if count is not None and seconds else None)
    row["stalls"] = stalls(metrics)
    return row


def assign_passes(rows, passes):
    """Label each kernel row with its pass: passes ran in order, each starting with its lead
    kernel (the forward kernel, or the Gluon one), so a new pass begins at the next pass's
    lead kernel."""
    ran = [run for run in passes if run.get("skipped") is None]
    index = -1
    for row in rows:
        following = ran[index + 1] if index + 1 < len(ran) else None
        if following is not None and following["lead_kernel"] in row["kernel"]:
            index += 1
        row["pass"] = ran[index]["name"] if index >= 0 else None
    return rows


def add_static_predictions(rows, passes, static, shape):
    """Beside each kernel's measured L2 bytes, the static report's (bf16, dot): its L2 bytes
    per pair (loads and atomics of the main loop) x B x HW x N, and measured / predicted."""
    if static is None:
        return rows
    report = next((entry for entry in static["reports"]
                   if entry["dtype"] == "bf16" and entry["similarity"] == "dot"), None)
    if report is None:
        return rows
    per_row = {row["kernel"]: row for row in report["rows"]}
    static_of_pass = {run["name"]: run.get("static_row") for run in passes}
    pairs = shape["B"] * shape["HW"] * shape["N"]
    for row in rows:
        name = static_of_pass.get(row.get("pass")) if WARP_SPECIALIZED_KERNEL in row[
            "kernel"] else next(
            (static for kernel, static in STATIC_ROWS.items() if kernel in row["kernel"]), None)
        entry = per_row.get(name)
        if entry is None or entry.get("l2_load_bytes_per_pair") is None:
            continue
        per_pair = entry["l2_load_bytes_per_pair"] + (entry.get("l2_atomic_bytes_per_pair") or 0)
        row["static_row"] = name
        row["static_l2_bytes"] = per_pair * pairs
        if row["l2_bytes"] is not None:
            row["l2_measured_over_static"] = round(row["l2_bytes"] / row["static_l2_bytes"], 3)
    return rows


def newest_static_report(directory=common.RESULTS):
    paths = sorted(pathlib.Path(directory).glob("kernel_work_sm90_*.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def summary(payload):
    """Markdown table of the kernels, launch order."""
    lines = ["| pass | kernel | us | SM % | tensor % | L2 TB/s | L2 GB (static) | DRAM TB/s "
             "| occupancy % | regs | top stalls |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in payload["kernels"]:
        l2 = _fmt(None if row["l2_bytes"] is None else row["l2_bytes"] / 1e9, ".2f")
        if row.get("static_l2_bytes") is not None:
            l2 += f" ({row['static_l2_bytes'] / 1e9:.2f})"
        top = ", ".join(f"{reason} {value:.3g}" for reason, value in
                        list((row["stalls"] or {}).get("reasons", {}).items())[:3])
        lines.append(
            f"| {row['pass'] or '-'} | {row['kernel']} | {_fmt(row['duration_us'], '.1f')} | "
            f"{_fmt(row['sm_throughput_pct'], '.0f')} | {_fmt(row['tensor_pipe_pct'], '.0f')} | "
            f"{_fmt(row['l2_tbps'], '.2f')} | {l2} | {_fmt(row['dram_tbps'], '.2f')} | "
            f"{_fmt(row['occupancy_pct'], '.0f')} | {_fmt(row['registers'], '.0f')} | {top} |")
    return "\n".join(lines)


def summarise(text, passes=None, static=None):
    """The payload's kernel rows from an ncu CSV export, the passes manifest and a static
    work report (either may be None)."""
    rows = [summarise_kernel(kernel) for kernel in read_ncu_csv(text)]
    assign_passes(rows, passes["passes"] if passes is not None else [])
    if passes is not None:
        add_static_predictions(rows, passes["passes"], static, passes["shape"])
    return rows


def main(argv=None):
    """`python -m tools.gpu_session.ncu_summary CSV [--passes FILE] [--static FILE]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=pathlib.Path, help="ncu --page raw --csv export")
    parser.add_argument("--passes", type=pathlib.Path,
                        help="tools.gpu_session.profile_target's profile_passes_*.json")
    parser.add_argument("--static", type=pathlib.Path,
                        help="static work report (default: the newest in bench/results)")
    args = parser.parse_args(argv)
    for path in (args.csv, args.passes, args.static):
        if path is not None and not path.is_file():
            raise SystemExit(f"no such file: {path}")
    passes = json.loads(args.passes.read_text()) if args.passes else None
    static = json.loads(args.static.read_text()) if args.static else newest_static_report()
    try:
        rows = summarise(args.csv.read_text(), passes, static)
    except ValueError as error:
        raise SystemExit(f"{args.csv}: {error}") from None
    if passes is not None:
        source = {key: passes[key] for key in ("device", "device_type", "torch", "triton",
                                               "commit", "date", "shape")}
    else:
        source = dict(device="unknown (no --passes)", device_type="cuda", commit=None,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"))
    payload = dict(benchmark="ncu", **source, csv=args.csv.name,
                   static_report=None if static is None else static.get("commit"),
                   kernels=rows, complete=True)
    path = common.write_results("ncu", payload)
    print(f"wrote {path}")
    print(summary(payload))


if __name__ == "__main__":
    main()
