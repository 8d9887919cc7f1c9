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
writes kernel_breakdown_<device>_<date>.json and a bar chart of the kernel times beside it.
"""
import argparse
import collections

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
    parser.add_argument("--n", type=int, default=162000)
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true",
                        help="kernel times per pass by torch.profiler (no hardware counters)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="repetitions of each pass under torch.profiler (--breakdown)")
    parser.add_argument("--passes", nargs="+", metavar="NAME", choices=PASS_NAMES,
                        help="run only these passes, in their usual order (default: all; "
                             "names: %(choices)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.n < 1 or args.hw < 1 or args.batch < 1 or args.rounds < 1:
        raise SystemExit("--n, --hw, --batch and --rounds must be positive")
    device = torch.device("cuda")
    q, k, v, grad = common.read_inputs(args.batch, args.hw, args.n, 128, 512,
                                       torch.bfloat16, device, requires_grad=True)
    runs = [run for run in passes(q, k, v, grad)
            if args.passes is None or run["name"] in args.passes]
    payload = dict(benchmark="kernel_breakdown" if args.breakdown else "profile_passes",
                   **common.environment(device),
                   shape=dict(B=args.batch, HW=args.hw, N=args.n, Ck=128, Cv=512,
                              dtype="bf16"))
    # Saved before any pass runs, and the breakdown after every pass: the Gluon passes come
    # last and have never run on a GPU; if one crashes the process, the others' data stay.
    if args.breakdown:
        payload.update(rounds=args.rounds, records=[])
        for record in breakdown(runs, device, args.rounds):
            payload["records"].append(record)
            common.save_progress("kernel_breakdown", payload)
        common.finish_run("kernel_breakdown", payload, plot, summary)
        return
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


if __name__ == "__main__":
    main()
