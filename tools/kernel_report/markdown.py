"""The static report as the docs' page (docs/kernel_report.md), generated, never typed."""
from tools.kernel_report import report

PRECISION_TITLES = {"fp16": "fp16", "bf16": "bf16", "tf32": "TF32 (\"high\")",
                    "fp32": "exact fp32 (\"highest\")"}


def _keys(width):
    """A table key width in words: "keys ≤ 256", or "257 keys (256 tiled + rank-1)"."""
    if width in report.tilings.WIDTHS or width not in report.tilings.KEY_WIDTHS:
        return f"keys ≤ {width}"
    return f"{width} keys ({width - 1} tiled + rank-1)"


def config_text(config):
    """ForwardConfig(block_m=128, block_n=64, block_v=256, ...) as 'm128 n64 v256 8w 3s'; a
    tiling that streams its key (query) tile gets 'sk' ('sq') after its blocks, one taken
    only within a local memory budget '(≤ 32 B local)' at the end."""
    parts = [f"{name.removeprefix('block_')[0]}{value}" if name.startswith("block_")
             else None for name, value in config.items() if value is not None]
    parts = [part for part in parts if part] + [
        short for flag, short in (("stream_keys", "sk"), ("stream_queries", "sq"))
        if config.get(flag)]
    warps, stages = config.get("num_warps"), config.get("num_stages")
    budget = config.get("max_local_bytes")
    return " ".join(parts + [f"{warps}w", f"{stages}s"]
                    + ([] if budget is None else [f"(≤ {budget} B local)"]))


def cell(row):
    """One kernel in one precision: config, registers, shared memory, FMA dots (no matrix
    instruction), spills, work."""
    if row is None:
        return "-"
    if "unavailable" in row:
        return f"torch: {row['unavailable']}"
    if "error" in row:
        return f"**{row['error']}**"
    text = (f"{config_text(row['config'])} · {row['registers']} r · "
            f"{row['shared_bytes'] / 1024:.0f}/{row['shared_limit'] / 1024:.0f} KiB")
    if row.get("dots") and not row.get("mma"):  # no matrix instruction: CUDA-core FMA
        text += " · FMA"
    if row["spill_bytes"]:
        text += f" · **spills {row['spill_bytes']} B**"
    if row.get("vgpr_spills") and not row["spill_bytes"]:
        text += f" · **{row['vgpr_spills']} VGPRs spilled into AGPRs**"
    if row.get("sgpr_spills"):
        text += f" · {row['sgpr_spills']} SGPRs spilled into VGPR lanes (no memory)"
    if row["duplicated_dots"]:
        text += " · **duplicated dot**"
    if row.get("executed_macs_per_pair"):
        text += f" · {row['executed_macs_per_pair'] / row['passes']:.0f}"
        if row["passes"] > 1:
            text += f"x{row['passes']}"
    return text


def _case(entry, precision, case):
    return next((item for item in entry["cases"]
                 if item["precision"] == precision and item["case"] == case), None)


def _rows_by_kernel(item):
    rows = {row["kernel"]: row for row in item["rows"]} if item else {}
    if "every" in rows:  # the kernels do not run this case at all
        return {kernel: rows["every"] for kernel in report.KERNEL_ORDER}
    return rows


def target_section(name, entry):
    precisions = [p for p in report.PRECISIONS if _case(entry, p, "dot")]
    lines = [f"### {name}: {entry['gpus']}", "",
             f"Tilings table `{entry['architecture']}`; shared memory per block "
             f"{entry['shared_memory'] // 1024} KiB; {entry['multiprocessors']} "
             "multiprocessors. The dot similarity at Ck = 128:", "",
             "| kernel | " + " | ".join(PRECISION_TITLES[p] for p in precisions) + " |",
             "|---|" + "---|" * len(precisions)]
    by_precision = {p: _rows_by_kernel(_case(entry, p, "dot")) for p in precisions}
    for kernel in report.KERNEL_ORDER:
        if not any(kernel in rows for rows in by_precision.values()):
            continue
        lines.append(f"| {kernel} | " + " | ".join(cell(by_precision[p].get(kernel))
                                                    for p in precisions) + " |")
    totals = [f"{PRECISION_TITLES[p]} {_ratios(_case(entry, p, 'dot'))}" for p in precisions]
    lines += ["", "Executed / useful multiply-adds per (query, memory) pair: "
              + "; ".join(totals) + ".", ""]
    for case in report.CASES:
        if case == "dot":
            continue
        lines.append(f"- {case}: " + "; ".join(
            f"{PRECISION_TITLES[p]} {_case_summary(_case(entry, p, case))}" for p in precisions))
    return "\n".join(lines) + "\n"


def _ratios(item):
    totals = item["totals"] if item else {}
    if "forward_ratio" not in totals:
        return "-"
    text = f"forward {totals['forward_ratio']:.2f}"
    if "total_ratio" in totals:
        text += f", forward + backward {totals['total_ratio']:.2f}"
    return text


def _case_summary(item):
    """A case in a few words: what does not run, what spills, or that all is well."""
    if item is None:
        return "-"
    rows = item["rows"]
    unavailable = [row for row in rows if "unavailable" in row]
    if unavailable:
        return f"torch ({unavailable[0]['unavailable']})"
    spills = [f"{row['kernel']} {row['spill_bytes']} B" for row in rows
              if "error" not in row and row["spill_bytes"]]
    errors = [f"{row['kernel']}: {row['error']}" for row in rows if "error" in row]
    if errors or spills:
        return "**" + "; ".join(errors + [f"spills {text}" for text in spills]) + "**"
    largest = max(row["shared_bytes"] for row in rows if "error" not in row)
    return f"all {len(rows)} kernels compile, no spills (largest {largest / 1024:.0f} KiB)"


def document(payload):
    """The whole page."""
    shape = payload["shape"]
    lines = [
        "# Static kernel report (generated: `python -m tools.kernel_report`)", "",
        "Every kernel of the fused read as the runtime would launch it on each GPU "
        "architecture, compiled offline (no GPU) with Triton "
        f"{payload['triton']} (torch {payload['torch']}), commit {payload.get('commit')}, "
        f"{payload['date']}; kernel sources fingerprint `{payload['fingerprint']}`. Shape: "
        f"B = {shape['B']}, HW = {shape['HW']:,}, N = {shape['N']:,}, Cv = {shape['Cv']}; the "
        f"selection at top_k = {payload['select_top_k']}.", "",
        "A cell: the config the runtime chooses there (block sizes, sk/sq: the key/query "
        "tile streamed, warps, stages; \"≤ 32 B local\": taken only where its compile for "
        "the device uses at most that much local memory per thread, else the next one is) · "
        "registers per thread · shared memory used / the GPU's limit · FMA: its dots run as "
        "FMA on the CUDA cores (exact float32 on NVIDIA) · executed multiply-adds per "
        "(query, memory) pair (x3: a split precision's passes per dot, gfx950's bf16x3 for "
        "\"high\"). AMD kernels are compiled as a ROCm launch specialises them (tensors "
        "under 2 GB as 32-bit pointer ranges: buffer loads); their registers count VGPRs and "
        "AGPRs once (one register file on gfx90a, gfx942 and gfx950), their spills are bytes "
        "of scratch memory per lane, VGPRs spilled into AGPRs (no scratch) are named apart, "
        "and SGPRs spilled into VGPR lanes (no memory) are counted but not a problem. A "
        "kernel that cannot run reads with torch, with the reason. How the tables are "
        "chosen: docs/kernels.md.", ""]
    problems = report.problems(payload)
    exceptions = report.stated(payload)
    rows = sum(len(texts) for _, texts in exceptions.values())
    if problems:
        lines.append(f"Problems (no stated reason): {len(problems)}.")
    elif exceptions:
        lines.append(
            "Every chosen config compiles with no register spill, within shared memory, with no "
            "dot computed by several warps and within the work targets, except in the "
            f"{rows} rows below ({len(exceptions)} table entries). They miss the targets: "
            "each is listed with why no tiling the search tried meets them.")
    else:
        lines.append("Every chosen config compiles with no register spill, within shared "
                     "memory, with no dot computed by several warps, within the work targets.")
    lines += [f"- {problem}" for problem in problems] + [""]
    by_reason: dict = {}
    for (architecture, kernel, precision, width), (reason, texts) in exceptions.items():
        if architecture is None:
            where = f"every architecture, {_keys(width)}"
        elif kernel is None:
            where = f"`{architecture}`, every kernel"
        else:
            where = f"`{architecture}` {kernel} {precision} {_keys(width)}"
        by_reason.setdefault(reason, []).append((where, texts))
    if by_reason:
        lines += ["## Where the targets are not met (tilings.EXCEPTIONS)", ""]
    for reason, entries in by_reason.items():
        lines += [f"**{reason[0].upper() + reason[1:]}.**", ""]
        for where, texts in entries:
            lines.append(f"- {where} ({len(texts)} rows): {'; '.join(texts[:6])}"
                         f"{'; ...' if len(texts) > 6 else ''}")
        lines.append("")
    designed: dict = {}
    for (architecture, read, precision, width), (reason, cases) in \
            report.on_torch(payload).items():
        designed.setdefault(reason, []).append(
            f"`{architecture}` {read} {precision} {_keys(width)} ({', '.join(cases)})")
    if designed:
        lines += ["## Reads the torch backend computes by design (tilings.ON_TORCH)", "",
                  "There the Triton kernels of that read are not launched (the call's other "
                  "reads still are); the reason is the table's own.", ""]
    for reason, entries in designed.items():
        lines += [f"**{reason[0].upper() + reason[1:]}.**", ""]
        lines += [f"- {where}" for where in entries] + [""]
    for name, entry in payload["targets"].items():
        lines.append(target_section(name, entry))
    if payload.get("quantized"):
        lines.append(quantized_section(payload["quantized"]))
    return "\n".join(lines)


def quantized_section(quantized):
    """The 8-bit forward's rows (report.quantized_rows) as one table."""
    lines = ["## The 8-bit memory's forward (memory_read_fwd_kernel_8bit)", "",
             "An 8-bit memory (stm_kernels.QuantizedMemory, inference only) read by the fused "
             "forward at the same shape with a bf16 query, on the forward's tilings for "
             "16-bit; the split merge is the plain one. Axes: where the keys' and the values' "
             "scales are (channel: one per channel, folded into the query by the host; "
             "position: one per memory position, applied to the scores' or p's columns; "
             "channel_frame: one per channel and frame of 1,620 positions, a memory bank's "
             "keys, gathered per element of the key tile and applied to it in registers; "
             "Triton stages the gathered scales in shared memory, hence its larger shared "
             "use). MMA: "
             "the matrix instructions and their operand types (the 8-bit tiles are converted "
             "to bf16 in registers; before sm_89 e4m3 codes are decoded from int8 bits).", "",
             "| target | format | keys / values | case | config · registers · shared | "
             "spills | MMA |", "|---|---|---|---|---|---|---|"]
    for name, rows in quantized.items():
        for row in rows:
            where = (f"| {name} | {row['format']} | {row['key_axis']} / {row['value_axis']} "
                     f"| {row['case']} | ")
            if "unavailable" in row or "error" in row:
                lines.append(where + f"{cell(row)} | - | - |")
                continue
            mma = ", ".join(f"{count}x {instruction.replace('..', '.')}"
                            for instruction, count in sorted(row["mma"].items()))
            lines.append(where + f"{config_text(row['config'])} · {row['registers']} r · "
                         f"{row['shared_bytes'] / 1024:.0f}/{row['shared_limit'] / 1024:.0f} "
                         f"KiB | {row['spill_bytes']} B | {mma or 'none'} |")
    return "\n".join(lines) + "\n"
