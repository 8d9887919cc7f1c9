"""The memory read's passes at the target shape, for a profiler (GPU).

    ncu --profile-from-start off --clock-control none --kernel-name regex:memory_read \\
        --set full -o prof python -m tools.gpu_session.profile_target
        # (bash tools/gpu_session/gpu_session.sh profile)
    python -m tools.gpu_session.profile_target --breakdown   # kernel times, no hardware counters

Target: B=1, HW=1,620 (one 480p frame), N=162,000 (100 memory frames), Ck=128, Cv=512, bf16.
Passes, in this order: the forward, the forward+backward, the opt-in warp-specialised Gluon
forward at its default tiling and with the row split, and the forward+backward with the opt-in
Gluon dV and dK/dQ kernels (last: they have never run on a GPU). A Gluon pass runs where it can
(sm_90 and a Triton with Gluon's Hopper API); otherwise it is recorded as skipped, with the
reason.

--passes NAME ...: only these passes (e.g. `--n 16200 --passes forward "forward (Gluon)"`,
the profile stage's look at ten memory frames, where the forward's kernel runs furthest below
its rate at N = 162,000).

Default mode: writes profile_passes_<device>_<date>.json (the passes in order, for
`python -m tools.gpu_session.ncu_summary`), then runs every pass once to compile and warm up and
once more
between cudaProfilerStart and cudaProfilerStop, which is all that `ncu --profile-from-start
off` profiles.

--breakdown: where the time goes without hardware counters (ncu cannot read them on every
machine): each pass --rounds times under torch.profiler, the device time of every kernel per
pass, and the pass's own time by CUDA events (the difference is launch gaps and host work);
writes kernel_breakdown_<device>_<date>.json and a bar chart of the kernel times beside it,
one file per --n given (`--n 3240 32400 64800`), then the fit below over them.

--fit FILE ...: the time of each of our kernels in each pass against the memory size, over
breakdown files of one GPU and query shape, fitted by least squares as fixed + per-frame x
N / 1,620: the fixed part is what the kernel costs whatever the memory (the forward runs one
wave of the same programs at every N, so it is a program's cost beside its memory blocks),
the per-frame part what each memory frame adds. Prints a table and draws each pass's kernels
(the measured times as points, the fitted lines) beside the last file: <its name>_fit.png.
"""
import argparse
import collections
import json
import pathlib
import time

import torch

from bench import common
from stm_kernels import memory_read
from stm_kernels.backends.triton import tilings as triton_configs

# Launch-order lead kernel of every pass: tools.gpu_session.ncu_summary splits ncu's kernels into
# passes
# at them.
FORWARD_KERNEL = "memory_read_fwd_kernel"
WARP_SPECIALIZED_KERNEL = "memory_read_ws_fwd_kernel"
# (pass, static work report row of its Gluon kernel, config) of the warp-specialised passes.
WARP_SPECIALIZED_PASSES = (
    ("forward (Gluon)", "fwd_ws (opt-in)", triton_configs.WarpSpecializedConfig()),
    ("forward (Gluon, split rows)", "fwd_ws rows (opt-in)", triton_configs.ROW_SPLIT_CONFIG),
)
# The forward+backward with the Gluon dV and dK/dQ kernels at their default tilings (its lead
# kernel is the plain forward's).
WARP_SPECIALIZED_BACKWARD_PASS = "forward+backward (Gluon dV, dK/dQ)"
FLOP_FACTOR = {"forward": 1.0, "forward+backward": 3.5}
# Every pass's name, in the order they run (--passes picks some).
PASS_NAMES = ("forward", "forward+backward",
              *(name for name, _, _ in WARP_SPECIALIZED_PASSES), WARP_SPECIALIZED_BACKWARD_PASS)


def passes(q, k, v, grad):
    """[dict(name, run, flops, lead_kernel, static_row, skipped)] of the profiled passes, in
    order; `skipped` is the reason a pass cannot run here (None when it can)."""
    from stm_kernels.experimental import gluon_forward as gluon
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    forward_flops = 2.0 * B * HW * N * (Ck + Cv)

    def forward():
        with torch.no_grad():
            memory_read(q, k, v, backend="triton")

    def forward_backward():
        q.grad = k.grad = v.grad = None  # as after zero_grad(): no accumulation kernels
        memory_read(q, k, v, backend="triton").backward(grad)

    def warp_specialized(config):
        def run():
            with common.warp_specialized_forward(config):
                forward()
        return run

    runs = [dict(name=name, run=run, flops=forward_flops * FLOP_FACTOR[name],
                 lead_kernel=FORWARD_KERNEL, static_row=None, skipped=None)
            for name, run in (("forward", forward), ("forward+backward", forward_backward))]
    for name, static_row, config in WARP_SPECIALIZED_PASSES:
        runs.append(dict(name=name, run=warp_specialized(config), flops=forward_flops,
                         lead_kernel=WARP_SPECIALIZED_KERNEL, static_row=static_row,
                         skipped=gluon.unsupported_reason(q, k, v, config)))
    def warp_specialized_backward():
        with common.warp_specialized_backward():
            forward_backward()
    runs.append(dict(name=WARP_SPECIALIZED_BACKWARD_PASS, run=warp_specialized_backward,
                     flops=forward_flops * FLOP_FACTOR["forward+backward"],
                     lead_kernel=FORWARD_KERNEL, static_row=None,
                     skipped=common.warp_specialized_backward_reason(q, k, v)))
    return runs


def _describe(runs):
    return [{key: value for key, value in run.items() if key != "run"} for run in runs]


def kernel_times(averages, rounds):
    """{kernel name: dict(calls, us)} per round from torch.profiler's key_averages() of
    `rounds` repetitions: device kernels only (CPU-side operators carry no device time of
    their own), slowest first."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for event in averages:
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        totals[event.key][0] += event.count
        totals[event.key][1] += event.self_device_time_total
    table = {name: dict(calls=calls / rounds, us=round(us / rounds, 2))
             for name, (calls, us) in totals.items()}
    return dict(sorted(table.items(), key=lambda item: -item[1]["us"]))


def breakdown(runs, device, rounds):
    """Each runnable pass `rounds` times under torch.profiler (kernel times), then timed by
    CUDA events: yields a record per pass, as soon as it is measured."""
    from torch.profiler import ProfilerActivity, profile
    for run in runs:
        record = _describe([run])[0]
        if run["skipped"] is None:
            run["run"]()  # compile and warm up outside the profile
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
                for _ in range(rounds):
                    run["run"]()
                torch.cuda.synchronize(device)
            kernels = kernel_times(profiler.key_averages(), rounds)
            median, low, high = common.time_ms(run["run"], device)
            kernel_us = sum(kernel["us"] for kernel in kernels.values())
            record.update(kernels=kernels, kernel_ms=round(kernel_us / 1e3, 4), median_ms=median,
                          q20_ms=low, q80_ms=high,
                          tflops=round(run["flops"] / (median * 1e-3) / 1e12, 1))
        yield record


def summary(payload):
    """Markdown table: every pass's kernels with their share of its kernel time."""
    lines = ["| pass | kernel | calls | us | share | pass ms (events) | TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for record in payload["records"]:
        if record["skipped"] is not None:
            lines.append(f"| {record['name']} | skipped: {record['skipped']} | | | | | |")
            continue
        if not record["kernels"]:  # the profiler saw no kernels (no CUPTI): the timing only
            lines.append(f"| {record['name']} | no kernel events recorded | | | | "
                         f"{record['median_ms']:.3f} | {record['tflops']:.0f} |")
            continue
        total = sum(kernel["us"] for kernel in record["kernels"].values()) or 1.0
        for i, (name, kernel) in enumerate(record["kernels"].items()):
            tail = f"{record['median_ms']:.3f} | {record['tflops']:.0f}" if i == 0 else " | "
            lines.append(f"| {record['name'] if i == 0 else ''} | {name} | {kernel['calls']:g} "
                         f"| {kernel['us']:.1f} | {kernel['us'] / total:.0%} | {tail} |")
    return "\n".join(lines)


FRAME = 1620  # memory positions per 480p frame: the fit's unit of memory


def fixed_costs(payloads):
    """[dict(device, B, HW, name, kernel, ns, us, fixed_us, frame_us, worst_residual)] of
    each of our kernels (memory_read_*) in each pass measured at two or more memory sizes N
    (ns, its times us) among the kernel breakdowns `payloads`: its time fitted as fixed_us +
    frame_us * N / FRAME by least squares, and the largest distance of a measured time from
    that line as a share of the time. Runs of another GPU or query shape are fitted apart."""
    points = collections.defaultdict(dict)  # (device, B, HW, pass, kernel) -> {N: us}
    for payload in payloads:
        shape = payload["shape"]
        for record in payload["records"]:
            for kernel, measured in (record.get("kernels") or {}).items():
                if kernel.startswith("memory_read"):
                    key = (payload["device"], shape["B"], shape["HW"], record["name"], kernel)
                    points[key][shape["N"]] = measured["us"]  # a later file's N replaces
    rows = []
    for (device, B, HW, name, kernel), by_n in points.items():
        if len(by_n) < 2:
            continue
        ns = sorted(by_n)
        frames = [n / FRAME for n in ns]
        times = [by_n[n] for n in ns]
        mean_f, mean_t = sum(frames) / len(frames), sum(times) / len(times)
        frame_us = sum((f - mean_f) * (t - mean_t) for f, t in zip(frames, times, strict=True)) \
            / sum((f - mean_f) ** 2 for f in frames)
        fixed_us = mean_t - frame_us * mean_f
        worst = max(abs(t - fixed_us - frame_us * f) / t
                    for f, t in zip(frames, times, strict=True))
        rows.append(dict(device=device, B=B, HW=HW, name=name, kernel=kernel, ns=ns, us=times,
                         fixed_us=round(fixed_us, 2) + 0.0, frame_us=round(frame_us, 3) + 0.0,
                         worst_residual=round(worst, 4)))
    return rows


def fixed_cost_table(rows):
    """fixed_costs' rows as a markdown table (a line saying so where there are none)."""
    if not rows:
        return "no kernel measured at two or more memory sizes in these breakdowns"
    lines = ["| GPU | B | HW | pass | kernel | N measured | fixed us | us per memory frame "
             "| worst residual |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['device']} | {row['B']} | {row['HW']} | {row['name']} | "
                     f"{row['kernel']} | {', '.join(f'{n:,}' for n in row['ns'])} | "
                     f"{row['fixed_us']:.1f} | {row['frame_us']:.2f} | "
                     f"{row['worst_residual']:.1%} |")
    return "\n".join(lines)


def fit_plot(rows, path):
    """fixed_costs' rows drawn, one panel per GPU, query shape and pass: each kernel's measured
    times against the memory frames (points) and its fitted line, so that a bend the line
    misses shows. Saved as the PNG `path`; returns [path] ([] without rows)."""
    if not rows:
        return []
    panels = {}
    for row in rows:
        panels.setdefault((row["device"], row["B"], row["HW"], row["name"]), []).append(row)
    figure, axes = common.panels(list(panels), 4.2)
    for axis, (device, B, HW, name) in axes:
        for row in panels[(device, B, HW, name)]:
            frames = [n / FRAME for n in row["ns"]]
            points = axis.plot(frames, row["us"], "o")[0]
            ends = [0.0, max(frames)]
            axis.plot(ends, [row["fixed_us"] + row["frame_us"] * f for f in ends], "-",
                      color=points.get_color(),
                      label=f"{row['kernel'].replace('memory_read_', '')}: "
                            f"{row['fixed_us']:.1f} + {row['frame_us']:.2f}/frame us")
        axis.set_xlabel(f"memory frames ({FRAME:,} positions each)")
        axis.set_ylabel("kernel time (us)")
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.set_title(f"{name}\n{device}, B={B}, HW={HW}", fontsize=8)
        axis.legend(fontsize=6)
    return common.save_figure(figure, pathlib.Path(path))


def plot(payload, path):
    """Horizontal stacked bars: each pass's kernel times (ms per call)."""
    records = [record for record in payload["records"] if record["skipped"] is None]
    if not records:
        return []
    figure, axis = common.subplots(figsize=(9, 0.8 + 0.6 * len(records)))
    for row, record in enumerate(records):
        left = 0.0
        for name, kernel in record["kernels"].items():
            width = kernel["us"] / 1e3
            axis.barh(row, width, left=left, label=name if row == 0 else None)
            if width > 0.08 * record["kernel_ms"]:
                axis.text(left + width / 2, row, name.replace("memory_read_", ""), ha="center",
                          va="center", fontsize=7)
            left += width
    axis.set_yticks(range(len(records)), [record["name"] for record in records])
    axis.invert_yaxis()
    axis.set_xlabel("device time per call (ms)")
    shape = payload["shape"]
    axis.set_title(f"Kernel times, {payload['device']}: B={shape['B']}, HW={shape['HW']}, "
                   f"N={shape['N']}, bf16", fontsize=9)
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m tools.gpu_session.profile_target`: the passes for ncu, or their kernel
    breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[162000],
                        help="memory positions; several with --breakdown: one file each")
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true",
                        help="kernel times per pass by torch.profiler (no hardware counters)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="repetitions of each pass under torch.profiler (--breakdown)")
    parser.add_argument("--passes", nargs="+", metavar="NAME", choices=PASS_NAMES,
                        help="run only these passes, in their usual order (default: all; "
                             "names: %(choices)s)")
    parser.add_argument("--fit", nargs="+", metavar="FILE", type=pathlib.Path,
                        help="fit each of our kernels' times in these breakdown files "
                             "against N (no GPU needed); the plot goes beside the last file "
                             "(<its name>_fit.png)")
    args = parser.parse_args(argv)
    if args.fit:
        missing = [str(path) for path in args.fit if not path.is_file()]
        if missing:
            raise SystemExit(f"no breakdown file {', '.join(missing)}")
        _print_fit(fixed_costs(json.loads(path.read_text()) for path in args.fit), args.fit[-1])
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if min(args.n) < 1 or args.hw < 1 or args.batch < 1 or args.rounds < 1:
        raise SystemExit("--n, --hw, --batch and --rounds must be positive")
    if len(args.n) > 1 and not args.breakdown:
        raise SystemExit("several --n need --breakdown (ncu profiles one memory size)")
    device = torch.device("cuda")
    if args.breakdown:
        payloads, path = [], None
        for n in args.n:
            payload, path = _breakdown_at(n, args, device,
                                          after=payloads[-1]["date"] if payloads else None)
            payloads.append(payload)
        if len(payloads) > 1:
            _print_fit(fixed_costs(payloads), path)
        return
    runs, payload = _runs_at(args.n[0], args, device)
    payload.update(passes=_describe(runs))
    print(f"passes written to {common.write_results('profile_passes', payload)}")
    for run in runs:
        if run["skipped"] is None:
            run["run"]()  # compile and warm up: not profiled
            torch.cuda.synchronize(device)
            torch.cuda.profiler.start()
            run["run"]()
            torch.cuda.synchronize(device)
            torch.cuda.profiler.stop()
            print(f"profiled: {run['name']}")


def _print_fit(rows, last_file):
    """Print fixed_costs' table and draw it beside the last breakdown file read or written."""
    print(fixed_cost_table(rows))
    for written in fit_plot(rows, last_file.with_name(f"{last_file.stem}_fit.png")):
        print(f"plot: {written}")


def _runs_at(n, args, device):
    """(the passes --passes picks at memory size n, their results payload so far)."""
    q, k, v, grad = common.read_inputs(args.batch, args.hw, n, 128, 512, torch.bfloat16,
                                       device, requires_grad=True)
    runs = [run for run in passes(q, k, v, grad)
            if args.passes is None or run["name"] in args.passes]
    payload = dict(benchmark="kernel_breakdown" if args.breakdown else "profile_passes",
                   **common.environment(device),
                   shape=dict(B=args.batch, HW=args.hw, N=n, Ck=128, Cv=512, dtype="bf16"))
    return runs, payload


def _breakdown_at(n, args, device, after=None):
    """The kernel breakdown at memory size n, written (saved after every pass: the Gluon
    passes come last and have never run on a GPU; if one crashes the process, the others'
    data stay); returns its payload and its file. after: the date of the breakdown written
    before it in this run, which its own must differ from (the file is named by the date, to
    the second)."""
    runs, payload = _runs_at(n, args, device)
    while payload["date"] == after:
        time.sleep(0.1)
        payload.update(date=common.environment(device)["date"])
    payload.update(rounds=args.rounds, records=[])
    for record in breakdown(runs, device, args.rounds):
        payload["records"].append(record)
        common.save_progress("kernel_breakdown", payload)
    return payload, common.finish_run("kernel_breakdown", payload, plot, summary)


if __name__ == "__main__":
    main()
