"""Derive one architecture's tilings: each kernel's candidates compiled offline, in order of
preference, until one meets the targets; then the fallbacks.

    python -m tools.kernel_report.search --arch sm_80                 # every kernel and class
    python -m tools.kernel_report.search --arch gfx942 --kernels forward --precisions 16-bit

For every kernel, precision class and key width it compiles the candidates of CANDIDATES for
the target through the runtime's own launcher (use_configs forcing the candidate, so grid and
arguments are exactly a launch's), and keeps:
    first      the first candidate that compiles within the target's shared memory with no
               register spill and no dot computed by several warps, and meets the work target
               of its kernel (forward: at most 1.2x the useful multiply-adds per pair at
               Ck = 128; dV: what keeps forward + backward within 1.3x);
    fallbacks  up to two later candidates that compile and fit in less shared memory than the
               first (a device with less than the table assumes), spills allowed.
Both the dot and the l2 similarity must pass for width 128 (Ck = 128), XMem's augmented keys
of Ck = 64 (129 channels) for width 256, and of Ck = 128 (257: 256 tiled and a rank-1 last
one) for width 257, whose entries a table needs only where the 256-wide ones miss there.
It prints the entries as Python for tilings.py and writes the rows it compiled to --json.
The order of preference is the only guess here: larger tiles first (less traffic per pair),
the work targets first of all; no GPU can time them.
"""
import argparse
import dataclasses
import json
import sys
import time

import torch

from stm_kernels.backends.triton import launch, running, tilings
from stm_kernels.backends.triton.tilings import (DkdqConfig as K, DqConfig as Q,
                                                 DvConfig as V, ForwardConfig as F,
                                                 MergeConfig as M, PrepareConfig as P,
                                                 SelectConfig as S, SelectMergeConfig as SM,
                                                 UsageConfig as U)
from tools.kernel_report import report
from tools.kernel_report.compile import TARGETS

# Candidates per kernel and element size (2: fp16/bf16; 4: float32, TF32 or exact), in order
# of preference. Fields in each config's order.
CANDIDATES = {
    ("forward", 2): [F(128, 64, 256, 8, 3), F(128, 64, 256, 8, 2), F(128, 32, 256, 8, 3),
                     F(128, 32, 256, 8, 2), F(128, 64, 256, 4, 2), F(128, 32, 256, 4, 2),
                     F(64, 64, 256, 8, 3), F(64, 64, 256, 8, 2), F(64, 64, 256, 8, 1),
                     F(64, 128, 256, 8, 2), F(64, 64, 256, 4, 3), F(64, 64, 256, 4, 2),
                     F(64, 32, 256, 4, 2), F(64, 32, 256, 4, 1), F(64, 32, 256, 8, 2),
                     F(32, 64, 256, 4, 2), F(32, 32, 256, 4, 3), F(32, 32, 256, 4, 2),
                     F(32, 32, 256, 4, 1), F(32, 64, 256, 8, 2), F(32, 32, 256, 8, 2),
                     F(32, 32, 256, 2, 1), F(16, 64, 256, 8, 2), F(16, 64, 256, 8, 1),
                     F(16, 32, 256, 8, 2), F(16, 32, 256, 4, 2),
                     F(64, 32, 128, 4, 2), F(32, 32, 128, 4, 1), F(16, 32, 128, 4, 1),
                     F(16, 16, 64, 4, 1)],
    ("forward", 4): [F(128, 32, 256, 8, 3), F(128, 32, 256, 8, 2), F(128, 32, 256, 4, 2),
                     F(64, 32, 256, 8, 3), F(64, 32, 256, 8, 2), F(64, 32, 256, 8, 1),
                     F(64, 32, 256, 4, 2), F(64, 16, 256, 8, 2), F(64, 16, 256, 4, 2),
                     F(64, 32, 256, 4, 1), F(32, 32, 256, 4, 2), F(32, 32, 256, 4, 1),
                     F(32, 16, 256, 4, 1), F(32, 32, 256, 2, 1), F(16, 64, 256, 8, 2),
                     F(16, 64, 256, 8, 1), F(16, 32, 256, 8, 2), F(16, 32, 256, 8, 1),
                     F(16, 32, 256, 4, 1), F(16, 16, 256, 4, 2), F(16, 16, 256, 4, 1),
                     F(64, 32, 128, 4, 1), F(32, 32, 128, 4, 1), F(16, 64, 128, 8, 1),
                     F(16, 32, 128, 8, 1), F(16, 32, 128, 4, 2),
                     F(16, 32, 128, 4, 1), F(32, 16, 128, 4, 1),
                     F(16, 16, 64, 4, 1), F(16, 16, 64, 2, 1),
                     # FMA dots (exact float32 on NVIDIA): small score tiles, every value
                     # channel in one program (a value chunk would recompute the scores)
                     F(32, 16, None, 8, 1), F(16, 16, None, 4, 1), F(16, 16, None, 2, 1)],
    ("merge", 2): [M(64, 64, 4, 1), M(32, 64, 4, 1), M(32, 32, 4, 1)],
    ("prepare", 2): [P(32, 64, 4, 1), P(64, 64, 4, 1), P(32, 32, 4, 1)],
    ("select_merge", 2): [SM(16, 4, 1), SM(32, 4, 1), SM(8, 4, 1)],
    ("dv", 2): [V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1), V(128, 16, 256, 8, 2),
                V(128, 32, 256, 4, 2), V(64, 32, 256, 4, 2), V(64, 16, 256, 4, 2),
                V(64, 32, 256, 8, 2), V(64, 16, 256, 4, 1), V(128, 32, 128, 8, 2),
                V(64, 32, 128, 4, 2), V(64, 16, 128, 4, 1), V(32, 32, 128, 4, 1),
                V(32, 16, 128, 4, 1), V(32, 16, 64, 4, 1)],
    ("dv", 4): [V(128, 32, 128, 8, 2), V(128, 16, 128, 8, 2), V(128, 16, 128, 8, 1),
                V(128, 32, 128, 4, 2), V(64, 32, 128, 4, 2), V(64, 16, 128, 4, 2),
                V(64, 32, 128, 8, 2), V(64, 16, 128, 8, 1), V(64, 16, 128, 4, 1),
                V(32, 32, 128, 4, 1), V(32, 16, 128, 4, 1), V(32, 16, 128, 2, 1),
                V(16, 16, 128, 4, 1), V(16, 16, 128, 2, 1), V(32, 16, 64, 4, 1),
                V(16, 16, 64, 4, 1), V(32, 16, None, 8, 1), V(16, 16, None, 4, 1)],
    ("dkdq", 2): [K(128, 16, 8, 2, None), K(128, 16, 8, 1, None), K(128, 16, 8, 2, 128),
                  K(128, 16, 8, 2, 64), K(128, 16, 8, 1, 64), K(128, 16, 8, 2, 32),
                  K(128, 16, 8, 1, 32), K(128, 32, 8, 2, 64), K(128, 16, 4, 2, 64),
                  K(64, 16, 4, 2, None), K(64, 16, 4, 2, 128), K(64, 16, 4, 2, 64),
                  K(64, 32, 4, 2, 64), K(64, 16, 4, 1, 64), K(64, 16, 4, 2, 32),
                  K(64, 16, 4, 1, 32), K(64, 16, 8, 2, 64), K(32, 16, 4, 1, 64),
                  K(32, 16, 2, 1, 64), K(32, 16, 2, 1, 32), K(32, 16, 4, 1, 32),
                  K(16, 16, 4, 1, 32), K(16, 16, 2, 1, 16)],
    ("dkdq", 4): [K(128, 16, 8, 1, 64), K(128, 16, 8, 2, 64), K(128, 16, 8, 1, 32),
                  K(128, 16, 8, 1, 16), K(128, 16, 8, 3, 16), K(128, 16, 4, 1, 32),
                  K(64, 16, 4, 2, 64), K(64, 16, 4, 1, 64), K(64, 16, 4, 1, 32),
                  K(64, 16, 4, 1, 16),
                  K(64, 32, 4, 1, 32), K(64, 16, 8, 1, 32), K(64, 16, 8, 1, 16),
                  K(32, 16, 4, 1, 32), K(32, 16, 2, 1, 32), K(32, 16, 2, 1, 16),
                  K(32, 16, 4, 1, 16), K(16, 16, 4, 1, 16), K(16, 16, 2, 1, 16)],
    ("dq", 2): [Q(128, 64, 64, 8, 2), Q(128, 32, 64, 8, 3), Q(128, 32, 64, 8, 2),
                Q(128, 32, 32, 8, 2), Q(128, 32, 64, 4, 2), Q(64, 64, 64, 4, 2),
                Q(64, 32, 64, 4, 2), Q(64, 32, 32, 4, 2), Q(64, 32, 32, 4, 1),
                Q(64, 16, 32, 4, 1), Q(64, 16, 16, 4, 1), Q(64, 32, 64, 8, 2),
                Q(32, 32, 32, 4, 1), Q(32, 32, 32, 2, 1), Q(32, 16, 32, 4, 1),
                Q(32, 16, 16, 2, 1), Q(16, 16, 32, 4, 1), Q(16, 16, 16, 2, 1)],
    ("dq", 4): [Q(128, 32, 32, 8, 2), Q(128, 32, 32, 4, 2), Q(64, 32, 32, 4, 2),
                Q(64, 32, 32, 4, 1), Q(64, 32, 32, 8, 2), Q(64, 16, 32, 4, 1),
                Q(64, 16, 16, 4, 1), Q(32, 32, 32, 4, 1), Q(32, 32, 16, 4, 1),
                Q(32, 32, 16, 2, 1), Q(32, 16, 32, 4, 1), Q(32, 16, 16, 2, 1),
                Q(16, 32, 32, 4, 1), Q(16, 32, 16, 4, 1),
                Q(16, 16, 16, 4, 1), Q(16, 16, 16, 2, 1)],
    ("select", 2): [S(64, 4, 2), S(64, 4, 1), S(32, 4, 2), S(32, 4, 1), S(32, 2, 1),
                    S(16, 4, 1), S(16, 2, 1), S(16, 1, 1)],
    ("usage", 2): [U(128, 64, 8, 2), U(128, 32, 8, 2), U(128, 64, 4, 2), U(64, 64, 4, 2),
                   U(64, 32, 4, 2), U(64, 32, 4, 1), U(64, 64, 8, 2), U(32, 32, 4, 1),
                   U(32, 16, 4, 1), U(32, 16, 2, 1), U(16, 16, 4, 1)],
}
# The float32 selection: also 8 warps over small query blocks (FMA dots spill with fewer).
CANDIDATES[("select", 4)] = CANDIDATES[("select", 2)] + [S(32, 8, 1), S(16, 8, 2), S(16, 8, 1)]
# Each dV, dK+dQ and usage tiling also with its key tile streamed (loaded per query step), and
# each float32 forward, dQ and selection tiling with its query tile streamed (loaded per memory
# step), right after the same tiling holding it: where holding the tile spills, streaming it
# may not.
_STREAMED = {"dv": dict(stream_keys=True), "dkdq": dict(stream_keys=True),
             "usage": dict(stream_keys=True),
             "forward": dict(stream_queries=True), "dq": dict(stream_queries=True),
             "select": dict(stream_queries=True)}
for (_kernel, _size), _configs in list(CANDIDATES.items()):
    if _kernel in _STREAMED and (_kernel in ("dv", "dkdq", "usage") or _size == 4):
        CANDIDATES[(_kernel, _size)] = [
            config for held in _configs
            for config in (held, dataclasses.replace(held, **_STREAMED[_kernel]))]
# Right after the 64-row ones, the same with the scores summed over 64-channel key chunks:
# where a block of 256 float32 key channels (64 KiB) does not fit beside 64 query rows.
_AFTER_64_ROWS = 1 + max(index for index, config in enumerate(CANDIDATES[("select", 4)])
                         if config.block_m == 64)
CANDIDATES[("select", 4)][_AFTER_64_ROWS:_AFTER_64_ROWS] = [S(64, 4, 1, block_ck=64),
                                                           S(32, 4, 1, block_ck=64)]
CANDIDATES.update({("dk", 2): CANDIDATES[("dkdq", 2)], ("dk", 4): CANDIDATES[("dkdq", 4)],
                   ("merge", 4): CANDIDATES[("merge", 2)],
                   ("prepare", 4): CANDIDATES[("prepare", 2)],
                   ("select_merge", 4): CANDIDATES[("select_merge", 2)],
                   ("usage", 4): CANDIDATES[("usage", 2)]})
# The kernels of each runtime entry point, and the pass that launches them.
PASS_OF = dict(forward="forward", merge="forward", prepare="backward", dv="backward",
               dkdq="backward", dk="deterministic", dq="deterministic", select="select",
               select_merge="select", usage="usage")
# Per precision class: (report precision the search compiles, element size).
CLASSES = {"16-bit": ("bf16", 2), "tf32": ("tf32", 4), "fp32": ("fp32", 4)}
# Per key width: the cases that must pass: dot and l2 at Ck = 128 (STM, STCN); XMem's
# augmented keys of Ck = 64 (129 channels, a dot) for width 256, of Ck = 128 (257) for 257.
WIDTH_CASES = {128: ((128, False), (128, True)), 256: ((129, False),), 257: ((257, False),)}
# The other backward kernels' work per pair at the target shape when dV is chosen: forward
# 768 (two value chunks) + dK/dQ 896; dV may take what keeps the total within 1.3x.
DV_BUDGET = report.TOTAL_RATIO_TARGET * 3.5 * (128 + 512) - 768 - 896


def compile_candidate(target, kernel, precision_class, width, config, keep_going):
    """Rows (one per case of WIDTH_CASES[width]) of one candidate compiled for the target;
    the next case is compiled only while keep_going(rows so far) holds."""
    precision, _ = CLASSES[precision_class]
    dtype, matmul_precision = report.PRECISIONS[precision]
    rows = []
    for channels, l2 in WIDTH_CASES[width]:
        if rows and not keep_going(rows):
            break
        forced = {kernel: config}
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            with tilings.use_configs(**_others(kernel, forced)):
                records = _run_pass(target, kernel, dtype, channels, l2)
        finally:
            torch.set_float32_matmul_precision(previous)
        mine = [record for record in records if record.kernel == kernel]
        row = report.analyse(mine[-1], target) if mine else dict(error="not launched")
        row.update(case=f"Ck={channels}{' l2' if l2 else ''}")
        rows.append(row)
    return rows


def _others(kernel, forced):
    """use_configs arguments: the candidate for its kernel, the first candidate (never
    compiled) for every other kernel the pass launches."""
    configs = {name: CANDIDATES[(name, 2)][0] for name in tilings.KERNELS}
    configs.update(forced)
    return configs


def _run_pass(target, kernel, dtype, channels, l2):
    from tools.kernel_report.compile import compiling_for
    q, k, v = report._meta_inputs(dtype, channels)
    scale = channels ** -0.5
    launch.forget_choices()  # a forced config that failed before must be tried again
    with compiling_for(target, only={kernel}) as launches:
        try:
            report.passes(q, k, v, scale, l2)[PASS_OF[kernel]]()
        except running.KernelUnavailable:
            pass
    return launches


def meets_targets(kernel, width, rows):
    """Whether a candidate's rows may be the first of a table entry."""
    for row in rows:
        if "error" in row or row["spill_bytes"] or row.get("vgpr_spills") or \
                row["duplicated_dots"] or row["shared_bytes"] > row["shared_limit"]:
            return False
        executed = row.get("executed_macs_per_pair", 0) / row["passes"]  # per pass of a split dot
        if width == 128 and kernel == "forward" and \
                executed > report.FORWARD_RATIO_TARGET * (128 + 512) + 1:
            return False
        if width == 128 and kernel == "dv" and executed > DV_BUDGET:
            return False
    return True


def fits(rows, shared_limit):
    return all("error" not in row and row["shared_bytes"] <= shared_limit for row in rows)


def dominates(big, small):
    """Whether config `big` needs at least what `small` does: the same warps and streamed
    tiles, and no block size nor stage count below small's (None, all channels, counting as
    the largest). A streamed tile needs fewer registers than a held one, never more."""
    if type(big) is not type(small) or big.num_warps != small.num_warps:
        return False
    for field in dataclasses.fields(big):
        if field.name in ("num_warps", "splits"):
            continue
        a, b = getattr(big, field.name), getattr(small, field.name)
        if isinstance(a, bool):
            if a != b:
                return False
            continue
        a, b = (1 << 30 if a is None else a), (1 << 30 if b is None else b)
        if a < b:
            return False
    return True


def search(target, kernel, precision_class, width, fallbacks=1, log=print, start=0):
    """(first, [fallbacks], {config: rows}) for one table entry; first is None when no
    candidate meets the targets. Candidates before `start` are skipped (a wider key or an
    exact precision never fits where the narrower or faster one did not), and so is one that
    needs at least what a candidate that overflowed or spilled needed, and one that
    tilings.MISCOMPILED lists for the target's architecture."""
    _, size = CLASSES[precision_class]
    first, others, tried, failed = None, [], {}, []
    for config in CANDIDATES[(kernel, size)][start:]:
        if first is None and any(dominates(config, small) for small in failed):
            continue
        if target is not None and tilings.miscompiled(target.device.arch, kernel, config):
            log(f"  {kernel:7s} {precision_class:6s} w{width} {_short(config)}: skipped "
                "(tilings.MISCOMPILED)")
            continue
        started = time.time()
        limit = None if first is None else max(row["shared_bytes"] for row in tried[first]) - 1

        def keep_going(rows, limit=limit):
            return meets_targets(kernel, width, rows) if limit is None else fits(rows, limit)

        rows = compile_candidate(target, kernel, precision_class, width, config, keep_going)
        tried[config] = rows
        log(f"  {kernel:7s} {precision_class:6s} w{width} {_short(config)}: "
            + "; ".join(_summary(row) for row in rows) + f" ({time.time() - started:.0f} s)")
        if any(_exhausted(row) for row in rows):
            failed.append(config)
        complete = len(rows) == len(WIDTH_CASES[width])
        if first is None:
            if complete and meets_targets(kernel, width, rows):
                first = config
        elif complete and fits(rows, max(row["shared_bytes"] for row in tried[first]) - 1):
            others.append(config)
            if len(others) == fallbacks:
                break
    if first is None:
        first = best_effort(tried)
    return first, others, tried


def _exhausted(row):
    """Out of shared memory or registers: a larger config would be too."""
    if "error" in row:
        return "OutOfResources" in row["error"]
    return row["spill_bytes"] > 0 or row["shared_bytes"] > row["shared_limit"]


def best_effort(tried):
    """When no candidate meets the targets: of those that compile and fit, one with no
    duplicated dot and at most 64 spilled bytes if there is one (the only shortfall a table
    may state a reason for), then the fewest spilled bytes, duplicated dots and executed work
    per pair (None if none fits)."""
    def cost(item):
        rows = item[1]
        spills = max(row["spill_bytes"] for row in rows)
        duplicated = max(row["duplicated_dots"] for row in rows)
        return (spills > 64 or duplicated > 0, spills, duplicated,
                max(row.get("executed_macs_per_pair") or 0 for row in rows))
    complete = [(config, rows) for config, rows in tried.items()
                if all("error" not in row and row["shared_bytes"] <= row["shared_limit"]
                       for row in rows) and len(rows) > 0]
    return min(complete, key=cost)[0] if complete else None


def _short(config):
    return "(" + ", ".join(str(getattr(config, field.name))
                           for field in dataclasses.fields(config)
                           if field.name != "splits") + ")"


def _summary(row):
    if "error" in row:
        return f"{row['case']} {row['error'][:80]}"
    ratio = row.get("executed_macs_per_pair")
    return (f"{row['case']} {row['registers']}r {row['spill_bytes']}B "
            + (f"{row['vgpr_spills']}agpr " if row.get("vgpr_spills") else "")
            + f"{row['shared_bytes'] // 1024}K dup{row['duplicated_dots']}"
            + (f" {ratio:.0f}/pair" if ratio else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=sorted(TARGETS))
    parser.add_argument("--kernels", nargs="+", default=list(tilings.KERNELS),
                        choices=tilings.KERNELS)
    parser.add_argument("--precisions", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--widths", nargs="+", type=int, default=list(tilings.KEY_WIDTHS),
                        choices=tilings.KEY_WIDTHS)
    parser.add_argument("--json", help="write every compiled row here")
    args = parser.parse_args(argv)
    target = TARGETS[args.arch]
    entries, record = [], []
    for kernel in args.kernels:
        starts = {}  # where the search of the narrower key or faster precision ended
        for precision_class in args.precisions:
            widths = args.widths if kernel not in report.NO_DOT_KERNELS else [128]
            for width in widths:
                _, size = CLASSES[precision_class]
                narrower = [starts.get((size, w), 0) for w in tilings.KEY_WIDTHS if w < width]
                faster = [starts.get((size, width), 0)] if precision_class == "fp32" else []
                start = max([0] + narrower + faster)
                first, others, tried = search(target, kernel, precision_class, width,
                                              log=lambda text: print(text, flush=True),
                                              start=start)
                if first is not None:
                    starts[(size, width)] = CANDIDATES[(kernel, size)].index(first)
                met = first is not None and meets_targets(kernel, width, tried[first])
                entries.append((kernel, precision_class, width, first, others, met))
                record += [dict(kernel=kernel, precision=precision_class, width=width,
                                config=report.fields(config), rows=rows, first=config == first,
                                fallback=config in others)
                           for config, rows in tried.items()]
    print("\n# table entries")
    for kernel, precision_class, width, first, others, met in entries:
        chosen = ([first] if first else []) + others
        marker = "" if met else "  # NO CANDIDATE MEETS THE TARGETS: best effort"
        print(f'("{kernel}", "{precision_class}", {width}): '
              f'({", ".join(_code(config) for config in chosen)},),{marker}')
    if args.json:
        with open(args.json, "w") as file:
            json.dump(record, file, indent=1, default=str)
    return 0 if all(entry[-1] for entry in entries) else 1


def _code(config):
    letter = {F: "F", M: "M", V: "V", K: "K", Q: "Q", S: "S", U: "U"}[type(config)]
    return f"{letter}{_short(config)}"


if __name__ == "__main__":
    sys.exit(main())
