"""Training memory scaling: peak memory and step time per clip length, fused vs naive read.

    python -m bench.training                       # CPU: small model, 240x432 frames
    python -m bench.training --size 480 864        # 480p (30x54 = 1,620 feature positions)

One training step (forward + backward of ClipForward over a clip, 2 objects) per point, for
clip lengths 3, 6, 12, 24, the fused read (triton on GPU, the chunked torch backend on CPU)
against the official materialising read, under activation checkpointing of the encoders and
of the whole network ("all"; the read keeps its inputs). For each checkpointing level it
reports the longest clip the fused read trains within the memory the naive read needs for a
given clip length (measured points, plus a quadratic fit flagged as extrapolated). Writes
bench/results/training_<device>_<date>.json and a plot.
"""
import sys
import time

import numpy as np
import torch

from bench import common
from stm_model.training.clip_forward import ClipForward
from stm_model.network.stm import STM, STMConfig

READS = {"fused": None, "naive": "naive"}


def _batch(clip_len, height, width, objects, device):
    generator = torch.Generator().manual_seed(0)
    frames = torch.rand(1, clip_len, 3, height, width, generator=generator)
    first = torch.zeros(1, objects, height, width)
    for o in range(objects):
        first[0, o, o * height // objects:(o + 1) * height // objects, width // 4:width // 2] = 1
    labels = torch.randint(0, objects + 1, (1, clip_len - 1, height, width), generator=generator)
    return frames.to(device), first.to(device), labels.to(device)


def make_step(spec, device):
    """A zero-argument training step (forward + backward) for the spec."""
    config = STMConfig.small() if spec["model"] == "small" else STMConfig()
    backend = READS[spec["read"]] or ("triton" if device.type == "cuda" else "torch")
    torch.manual_seed(0)
    model = STM(STMConfig(**{**config.__dict__, "read_backend": backend}))
    forward = ClipForward(model, spec["checkpointing"]).to(device).train()
    frames, first, labels = _batch(spec["clip_len"], *spec["size"], spec["objects"], device)
    amp = device.type == "cuda"

    def step():
        forward.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(frames, first)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 labels.flatten(0, 1))
        loss.backward()
    return step


def measure(spec, device):
    """Step time and peak extra memory of one spec; on a CPU from two fresh processes, the
    time with glibc's allocator as it is, the peak with freed blocks unmapped
    (common.speed_then_peak)."""
    if device.type == "cuda":
        step = make_step(spec, device)
        step()
        median, low, high = common.time_ms(step, device, min_runs=3, budget_s=1.0)
        peak = common.cuda_peak_extra_bytes(step, device)
        return dict(step_ms=median, step_q20_ms=low, step_q80_ms=high, peak_mem_bytes=peak)
    return common.speed_then_peak("bench.training", dict(spec, measure="time"), device,
                                  common.merge_peak,
                                  peak_spec=lambda record: dict(spec, measure="peak"))


def _cpu_child(spec):
    """measure "time": a warm-up step, then the time of one; "peak": the resident-set peak of
    a step after a warm-up one (common.cpu_peak_extra_bytes)."""
    step = make_step(spec, torch.device("cpu"))
    if spec["measure"] == "peak":
        return dict(peak_mem_bytes=common.cpu_peak_extra_bytes(step))
    step()
    start = time.perf_counter()
    step()
    return dict(step_ms=(time.perf_counter() - start) * 1e3)


def longest_within(records, read, checkpointing, budget):
    """(longest measured clip whose peak fits the budget, quadratic-fit estimate)."""
    points = sorted((r["clip_len"], r["peak_mem_bytes"]) for r in records
                    if r["read"] == read and r["checkpointing"] == checkpointing
                    and r.get("status") == "ok")
    measured = max((t for t, peak in points if peak <= budget), default=None)
    if len(points) < 3:
        return measured, None
    t, peak = np.array(points, dtype=float).T
    c2, c1, c0 = np.polyfit(t, peak, 2)
    roots = np.roots([max(c2, 0.0), c1, c0 - budget])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return measured, (min(real) if real else None)


def summary(payload):
    """Markdown table: per checkpointing level and budget clip, the fused read's longest clip
    within the memory the naive read needs at that clip (measured and fitted)."""
    height, width = payload["size"]
    lines = [f"{payload['model']} model, {width}x{height} frames ({payload['feature_positions']} "
             f"positions per memory frame), {payload['objects']} objects; fit = quadratic fit "
             "of the fused read's measured peaks (extrapolated beyond the longest measured clip)",
             "", "| checkpointing | budget = naive peak at clip | budget MiB "
             "| fused clip (measured) | fused clip (fit) | ratio (fit) |",
             "|---|---|---|---|---|---|"]
    records = payload["records"]
    for level in payload["checkpointing"]:
        for clip in payload["budget_clips"]:
            naive = next((r for r in records if r["read"] == "naive" and r["clip_len"] == clip
                          and r["checkpointing"] == level and r.get("status") == "ok"), None)
            if naive is None:
                continue
            measured, fitted = longest_within(records, "fused", level, naive["peak_mem_bytes"])
            lines.append(f"| {level} | {clip} | {naive['peak_mem_bytes'] / 2**20:.0f} | "
                         f"{measured} | {f'{fitted:.1f}' if fitted else 'n/a'} | "
                         f"{f'{fitted / clip:.1f}x' if fitted else 'n/a'} |")
    return "\n".join(lines)


def plot(payload, path):
    """Peak memory and step time against clip length; returns [path]."""
    figure, (memory, timing) = common.subplots(1, 2, figsize=(12, 4.5))
    for level in payload["checkpointing"]:
        for read in READS:
            series = sorted((r["clip_len"], r) for r in payload["records"]
                            if r["read"] == read and r["checkpointing"] == level
                            and r.get("status") == "ok")
            if not series:
                continue
            clips = [c for c, _ in series]
            style = "-" if read == "fused" else "--"
            label = f"{read}, checkpointing {level}"
            memory.plot(clips, [r["peak_mem_bytes"] / 2**20 for _, r in series], style,
                        marker="o", label=label)
            timing.plot(clips, [r["step_ms"] / 1e3 for _, r in series], style, marker="o",
                        label=label)
    memory.set(xlabel="clip length (frames)", ylabel="peak memory of a step (MiB)",
               xscale="log", yscale="log")
    timing.set(xlabel="clip length (frames)", ylabel="step time (s)", xscale="log",
               yscale="log")
    memory.legend(fontsize=7)
    height, width = payload["size"]
    figure.suptitle(f"STM training step ({payload['model']} model, {width}x{height}, "
                    f"{payload['objects']} objects) on {payload['device']}", fontsize=10)
    return common.save_figure(figure, path, dpi=110)


def main(argv=None):
    """`python -m bench training`; returns the exit code."""
    parser = common.benchmark_parser(__doc__)
    parser.add_argument("--model", choices=["small", "official"])
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--clip-lens", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--checkpointing", nargs="+", default=["encoders", "all"])
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--budget-clips", type=int, nargs="+", default=[6, 12])
    args = common.parse_args_or_run_child(parser, argv, _cpu_child)
    if args is None:
        return 0
    device = common.pick_device(args.device)
    model = args.model or ("official" if device.type == "cuda" else "small")
    size = tuple(args.size or ((480, 864) if device.type == "cuda" else (240, 432)))
    payload = common.environment(device)
    payload.update(benchmark="training", model=model, size=size, objects=args.objects,
                   checkpointing=args.checkpointing, budget_clips=args.budget_clips,
                   feature_positions=(size[0] // 16) * (size[1] // 16),
                   peak_mem_note=("CUDA allocator peak of one step above what was allocated "
                                  "before; CPU: resident-set high-water mark of the second step "
                                  "in a fresh process whose allocator unmaps freed blocks (the "
                                  "step time from another process, under glibc's defaults)"),
                   records=[])
    for level in args.checkpointing:
        for read in READS:
            for clip_len in args.clip_lens:
                spec = dict(model=model, read=read, checkpointing=level, clip_len=clip_len,
                            size=size, objects=args.objects)
                try:
                    record = {**spec, "status": "ok", **measure(spec, device)}
                except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                    record = {**spec, "status": f"error: {str(error)[:200]}"}
                payload["records"].append(record)
                shown = (f"{record['peak_mem_bytes'] / 2**20:9.0f} MiB "
                         f"{record['step_ms'] / 1e3:7.2f} s" if record["status"] == "ok"
                         else record["status"])
                print(f"{read:5} checkpointing={level:8} clip={clip_len:3}  {shown}", flush=True)
    common.finish_run("training", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
