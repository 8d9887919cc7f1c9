"""One interaction round of the interactive STM against the annotated frames in memory, fused vs
naive read.

    python -m bench interactive                                  # defaults for the device
    python -m bench interactive --memory-frames 1 4 8 --variants fused naive

The video: a real DAVIS-2016 sequence from ../shared/data ping-ponged to --frames (100) when that
folder is present, a synthetic video otherwise. Each variant runs in a fresh process: a first
round (which also encodes and caches every frame's query features: timed on its own), then
rounds on new frames until the memory holds k annotated frames; for every k of --memory-frames
the round is repeated on a frame already in memory (so the memory stays at k) and the median
is recorded: one round = the memory encoding of the annotated frame, the batched fused (or
naive) reads and the decoders of all frames (merge=False: a merged round re-segments only the
frames up to the neighbouring annotations, and would time less). Scribbles: the robot's
strokes (ground truth
against the current masks). On a CPU each variant runs twice: timed with glibc's allocator as
it is, then again for the peak with freed blocks unmapped (bench.common.speed_then_peak).
GPU: the official-size interactive STM (random weights: timing does
not depend on them) at 480p under bf16 autocast; CPU: the small interactive model at a smaller
size. Writes bench/results/interactive_<device>_<date>.json and a PNG beside it.
"""
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

from bench import common
from bench.long_video import SHARED_DAVIS, ping_pong

VARIANTS = ("fused", "naive")
DEFAULTS = {
    "cuda": dict(model="official", size=(480, 854), frames=100, memory_frames=(1, 4, 8),
                 variants=("fused", "naive"), repeats=5),
    "cpu": dict(model="small", size=(240, 432), frames=100, memory_frames=(1, 4, 8),
                variants=("fused", "naive"), repeats=3),
}


def load_sequence(source, sequence, frames, size):
    """(frames (T, 3, H, W) in [0, 1], labels (T, H, W), name): ping-ponged to `frames`."""
    if source != "synthetic":
        from stm_model.interactive.robot import load_davis_sequence, resize_labels
        root = pathlib.Path(source)
        name = sequence or sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir())[0]
        cycle, labels, _ = load_davis_sequence(root, name, size=size)
        labels = resize_labels(labels, size)
        video = f"{root.name}/{name} ({len(cycle)} frames, ping-pong)"
    else:
        from stm_model.training.datasets import HELD_OUT_SEEDS
        from stm_model.training.synthetic import SyntheticVideo
        synthetic = SyntheticVideo(HELD_OUT_SEEDS, *size, num_objects=2)
        images, labels = zip(*synthetic.frames(frames), strict=True)
        cycle = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        labels = np.stack(labels)
        video = f"synthetic seed {HELD_OUT_SEEDS}"
    order = [ping_pong(t, len(cycle)) for t in range(frames)]
    return cycle[order], labels[order], video


def build_model(kind, device):
    """(interactive STM in eval mode, its name), as common.build_model for "small" (its
    interactive variant) and the official size."""
    from stm_model import STM, STMConfig
    from stm_model.interactive.session import as_interactive
    if kind == "small":
        from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model
        if SMALL_INTERACTIVE_WEIGHTS.exists():
            return (load_small_model(SMALL_INTERACTIVE_WEIGHTS, device),
                    "small interactive (committed weights)")
        return as_interactive(STM(STMConfig.small())).to(device).eval(), \
            "small interactive (random weights)"
    return STM(STMConfig(interactive=True)).to(device).eval(), \
        "official size interactive (random weights)"


def run_variant(spec):
    """Time the rounds of one variant (run in a fresh process); returns its record."""
    from stm_model.interactive.session import InteractiveSession
    from stm_model.interactive.robot import RobotUser
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model, model_name = build_model(spec["model"], device)
    frames, gt, video = load_sequence(spec["source"], spec["sequence"], spec["frames"],
                                      tuple(spec["size"]))
    num_objects = int(gt.max())
    backend = ("triton" if device.type == "cuda" else "torch") \
        if spec["variant"] == "fused" else "naive"
    session = InteractiveSession(model, frames.to(device), num_objects, read_backend=backend,
                                 batch_size=spec["batch_size"], merge=False,
                                 amp_dtype="bf16" if device.type == "cuda" else None)
    robot = RobotUser()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # annotated frames spread over the video, the largest-object frame first
    first = robot.first_frame(gt)
    spread = [int(t) for t in np.linspace(0, spec["frames"] - 1, max(spec["memory_frames"]) + 1)]
    annotated = [first] + [t for t in spread if t != first]
    predicted = np.zeros_like(gt)

    def round_on(frame):
        scribbles, _ = robot.interact(gt, predicted, num_objects, frame=frame)
        if scribbles is None:  # nothing to correct there: a background dot keeps it a round
            from stm_model.interactive.scribbles import empty_scribbles
            scribbles = empty_scribbles(len(gt))
            scribbles["scribbles"][frame] = [{"path": [[0.0, 0.0]], "object_id": 0}]
        return session.interact(scribbles).numpy(), session.rounds[-1].seconds

    predicted, first_round_s = round_on(annotated[0])
    rounds = {}
    for k in sorted(spec["memory_frames"]):
        while session.memory_frames < k:
            predicted, _ = round_on(annotated[session.memory_frames])
        times = []
        for _ in range(spec["repeats"]):
            predicted, seconds = round_on(annotated[k - 1])
            times.append(seconds)
        rounds[str(k)] = dict(median_s=statistics.median(times), times_s=times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        common.status_bytes("VmHWM")
    return dict(spec, model_name=model_name, video=video, read_backend=backend,
                num_objects=num_objects, first_round_s=first_round_s, rounds=rounds,
                peak_mem_bytes=peak)


def summary(payload):
    """Markdown table: per variant the first round and the rounds at each memory size."""
    ks = sorted({int(k) for record in payload["records"] for k in record["rounds"]})
    first = payload["records"][0]
    rows = [f"Video: {first['video']}, {payload['frames']} frames, {payload['size'][1]}x"
            f"{payload['size'][0]}, {first['num_objects']} object(s), {first['model_name']}, "
            f"{payload['batch_size']} frames per read. One round = memory encoding of the "
            "annotated frame + reads and decoders of every frame (query features cached); "
            "median of the repeats. Peak: CUDA allocator peak, or the CPU process's resident "
            "peak.", "",
            "| variant | read | first round (with query encoding) s | "
            + " | ".join(f"round, {k} in memory s" for k in ks) + " | peak MiB |",
            "|---|---|---:|" + "---:|" * len(ks) + "---:|"]
    for record in payload["records"]:
        cells = [f"{record['rounds'][str(k)]['median_s']:.3f}" if str(k) in record["rounds"]
                 else "-" for k in ks]
        rows.append(f"| {record['variant']} | {record['read_backend']} | "
                    f"{record['first_round_s']:.2f} | " + " | ".join(cells)
                    + f" | {common.mib(record['peak_mem_bytes'])} |")
    return "\n".join(rows)


def plot(payload, path):
    """Seconds per round against annotated frames in memory; returns [path]."""
    figure, axis = common.subplots(figsize=(6, 4))
    for record in payload["records"]:
        ks = sorted(int(k) for k in record["rounds"])
        axis.plot(ks, [record["rounds"][str(k)]["median_s"] for k in ks], marker="o",
                  label=f"{record['variant']} ({record['read_backend']})")
    axis.set(xlabel="annotated frames in memory", ylabel="seconds per round",
             title=f"interactive round, {payload['frames']} frames, {payload['device']}")
    axis.set_ylim(bottom=0)
    axis.legend()
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m bench interactive`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench interactive")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--memory-frames", nargs="+", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--model", choices=["small", "official"])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source", help="a DAVIS-format root, or 'synthetic' (default: "
                                         "../shared/data/davis2016-val when present)")
    parser.add_argument("--sequence", help="DAVIS sequence (default: the first by name)")
    args = common.parse_args_or_run_child(parser, argv, run_variant)
    if args is None:
        return 0
    device = common.pick_device(args.device)
    defaults = DEFAULTS[device.type]
    spec = dict(device=str(device), model=args.model or defaults["model"],
                size=list(args.size or defaults["size"]),
                frames=args.frames or defaults["frames"],
                memory_frames=sorted(args.memory_frames or defaults["memory_frames"]),
                repeats=args.repeats or defaults["repeats"], batch_size=args.batch_size,
                source=args.source or (str(SHARED_DAVIS) if SHARED_DAVIS.exists()
                                       else "synthetic"),
                sequence=args.sequence or ("blackswan" if SHARED_DAVIS.exists() else None))
    payload = common.environment(device)
    payload.update(benchmark="interactive", **{k: v for k, v in spec.items() if k != "device"},
                   records=[])
    for variant in args.variants or defaults["variants"]:
        tick = time.perf_counter()
        record = common.speed_then_peak("bench.interactive", dict(spec, variant=variant),
                                        device, common.merge_peak)
        payload["records"].append(record)
        print(f"{variant:8} done in {time.perf_counter() - tick:.0f} s", flush=True)
    common.finish_run("interactive", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
