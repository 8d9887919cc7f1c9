"""Dataset throughput: frames per second segmenting many videos batched (BatchSegmenter, K
videos per step) against one video at a time (VideoSegmenter).

    python -m bench.dataset_throughput                       # defaults for the device present
    python -m bench.dataset_throughput --batch-sizes 1 4 --sequences 4 --size 120 216

Videos: DAVIS-2016 val sequences from ../shared/data (or --root; a synthetic set without
either), every --stride-th frame, decoded and resized before timing and kept as uint8. Each
variant runs in a fresh process (peak memory): "one at a time" segments the videos one after
another with VideoSegmenter; "batched K" runs
stm_model.inference.video_batches.segment_videos with a BatchSegmenter, K videos per step (a
finished video's place is taken by the next one at the next step). Timed: segmentation from
the first frame's mask, plus each frame's labels copied to the CPU (what a mask writer needs);
not decoding or writing files. Before timing, each
process segments a short warm-up set the same way. On a CPU every process keeps freed memory
(stm_model.runtime.cpu_allocator, as `stm segment-dataset` does; --default-malloc to compare):
glibc's default page-faults a batched step's memory back every step. Variants run --repeats
times, interleaved (other work on the machine then hits every variant alike); the table shows
the fastest run.
GPU: the official-size STM (ResNet-50; random weights, timing does not depend on them) at
480p under bf16 autocast, all 20 sequences; CPU: the small trained model at 240x432 on 8
sequences, every 4th frame. Writes bench/results/dataset_throughput_<device>_<date>.json and a
PNG beside it.
"""
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import common

SHARED_DAVIS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-val"
SEQUENTIAL = "one at a time"
DEFAULTS = {
    "cuda": dict(model="official", size=(480, 854), sequences=0, stride=1,
                 batch_sizes=(1, 2, 4, 8), amp="bf16", repeats=2),
    "cpu": dict(model="small", size=(240, 432), sequences=8, stride=4,
                batch_sizes=(1, 2, 4, 8), amp=None, repeats=2),
}


def load_videos(source, sequences, size, stride, max_frames=None):
    """([(name, frames uint8 (T, 3, h, w), first-frame labels (h, w) int64)], description).
    sequences: names, or a count of the first ones by name (0: all)."""
    if source == "synthetic":
        return _synthetic_videos(sequences, size, stride, max_frames)
    from PIL import Image
    from stm_model import io as video_io
    root = pathlib.Path(source)
    available = sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir() if p.is_dir())
    names = sequences if isinstance(sequences, list) else available[:sequences or None]
    videos = []
    for name in names:
        paths = video_io.list_frames(root / "JPEGImages" / "480p" / name)[::stride][:max_frames]
        frames = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(
            size[::-1], Image.BILINEAR)).copy()).permute(2, 0, 1) for p in paths]
        mask = video_io.read_mask(root / "Annotations" / "480p" / name / f"{paths[0].stem}.png")
        labels = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=tuple(size),
                               mode="nearest")[0, 0].long()
        videos.append((name, torch.stack(frames), labels))
    lengths = [len(frames) for _, frames, _ in videos]
    return videos, (f"{root.name}: {len(videos)} sequences, every {stride}th frame "
                    f"({min(lengths)}-{max(lengths)} frames each)" if stride > 1 else
                    f"{root.name}: {len(videos)} sequences ({min(lengths)}-{max(lengths)} "
                    "frames each)")


def _synthetic_videos(count, size, stride, max_frames):
    from stm_model.training.datasets import HELD_OUT_SEEDS
    from stm_model.training.synthetic import SyntheticVideo
    count = count if isinstance(count, int) and count > 0 else 4
    videos = []
    for index in range(count):
        length = (max_frames or 24) - 3 * (index % 4)  # different lengths
        video = SyntheticVideo(HELD_OUT_SEEDS + index, *size, num_objects=1 + index % 3)
        images, labels = zip(*video.frames(length * stride), strict=True)
        frames = torch.from_numpy((np.stack(images[::stride]) * 255).round().astype(np.uint8))
        videos.append((f"synthetic-{index}", frames.permute(0, 3, 1, 2).contiguous(),
                       torch.from_numpy(labels[0]).long()))
    return videos, f"synthetic: {count} videos"


def _frame(frames, t, device):
    return frames[t].to(device, non_blocking=True).float().div_(255)


def segment_one_at_a_time(model, videos, options, device):
    """(frames segmented, None: no steps to count): one VideoSegmenter per video, one video
    after another."""
    from stm_model.inference.video_segmenter import VideoSegmenter
    count = 0
    for _, frames, first in videos:
        segmenter = VideoSegmenter(model, **options)
        for t in range(len(frames)):
            probs = segmenter.step(_frame(frames, t, device), mask=first if t == 0 else None)
            segmenter.labels(probs).cpu()
            count += 1
    return count, None


def segment_batched(model, videos, options, device, batch_size):
    """(frames segmented, steps): videos batch_size at a time with segment_videos."""
    from stm_model.inference.batch_segmenter import BatchSegmenter
    from stm_model.inference.video_batches import FrameInput, VideoJob, segment_videos

    def inputs(frames, first):
        for t in range(len(frames)):
            yield FrameInput(str(t), _frame(frames, t, device), first if t == 0 else None)

    segmenter = BatchSegmenter(model, **options)
    step, steps = segmenter.step, [0]

    def counted_step(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    segmenter.step = counted_step
    jobs = [VideoJob(name, inputs(frames, first)) for name, frames, first in videos]
    count = 0
    for result in segment_videos(segmenter, jobs, batch_size):
        result.labels.cpu()
        count += 1
    return count, steps[0]


def run_variant(spec):
    """Time one variant (run in a fresh process); returns its record."""
    device = torch.device(spec["device"])
    if device.type == "cpu" and spec["keep_freed_memory"]:
        from stm_model.runtime.cpu_allocator import keep_freed_memory
        keep_freed_memory()
    torch.manual_seed(0)
    model, model_name = common.build_model(spec["model"], device)
    videos, description = load_videos(spec["source"], spec["sequences"], tuple(spec["size"]),
                                      spec["stride"], spec["max_frames"])
    if device.type == "cuda":
        videos = [(name, frames.to(device), first.to(device)) for name, frames, first in videos]
    options = dict(mem_every=spec["mem_every"], amp_dtype=spec["amp"])
    batch_size = spec["batch_size"]

    def run(subset):
        if batch_size is None:
            return segment_one_at_a_time(model, subset, options, device)
        return segment_batched(model, subset, options, device, batch_size)

    warm_up = [(name, frames[:2 + index], first) for index, (name, frames, first) in
               enumerate(videos[:(batch_size or 1) + 1])]
    baseline = 0 if device.type == "cuda" else common.status_bytes("VmRSS")
    with torch.inference_mode():
        run(warm_up)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        frames, steps = run(videos)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else common.status_bytes("VmHWM")) - baseline
    return dict(variant=spec["variant"], batch_size=batch_size, frames=frames, steps=steps,
                videos=len(videos), seconds=seconds, fps=frames / seconds,
                peak_mem_bytes=peak, model_name=model_name, video=description)


def _variant_name(batch_size):
    return SEQUENTIAL if batch_size is None else f"batched K={batch_size}"


def summary(payload):
    """Markdown table: the fastest run of each variant, and its speed-up over one video at a
    time."""
    best = _best_runs(payload)
    base = best.get(SEQUENTIAL)
    rows = [f"Videos: {payload['video']}, {payload['size'][1]}x{payload['size'][0]}, "
            f"{payload['model_name']}, mem_every={payload['mem_every']}"
            f"{', ' + payload['amp'] + ' autocast' if payload.get('amp') else ''}"
            f"{'; freed memory kept in the process' if payload.get('keep_freed_memory') else ''}"
            f"; fastest of {payload['repeats']} interleaved runs per variant.", "",
            "| variant | videos | frames | steps | videos per step | seconds | fps | "
            "vs one at a time | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, record in best.items():
        per_step = f"{record['frames'] / record['steps']:.2f}" if record["steps"] else "1"
        speedup = f"{record['fps'] / base['fps']:.2f}x" if base else "-"
        rows.append(f"| {name} | {record['videos']} | {record['frames']} | "
                    f"{record['steps'] or record['frames']} | {per_step} | "
                    f"{record['seconds']:.2f} | {record['fps']:.2f} | {speedup} | "
                    f"{record['peak_mem_bytes'] / 2**20:.0f} |")
    return "\n".join(rows)


def _best_runs(payload):
    """{variant: its fastest record}, in the order the variants ran."""
    best = {}
    for record in payload["records"]:
        name = record["variant"]
        if name not in best or record["fps"] > best[name]["fps"]:
            best[name] = record
    return best


def plot(payload, path):
    """Bar charts of fps and peak memory per variant (fastest run); returns [path]."""
    best = _best_runs(payload)
    figure, (fps_axis, memory_axis) = common.subplots(1, 2, figsize=(11, 4))
    names = list(best)
    colours = ["C0" if name == SEQUENTIAL else "C1" for name in names]
    fps_axis.bar(names, [best[n]["fps"] for n in names], color=colours)
    for record in payload["records"]:  # every run, to show the spread
        fps_axis.plot(names.index(record["variant"]), record["fps"], "k.", markersize=4)
    memory_axis.bar(names, [best[n]["peak_mem_bytes"] / 2**20 for n in names], color=colours)
    fps_axis.set(ylabel="frames per second (fastest run; dots: every run)")
    memory_axis.set(ylabel="peak memory MiB (fastest run)")
    for axis in (fps_axis, memory_axis):
        axis.tick_params(axis="x", labelrotation=20)
    figure.suptitle(f"Dataset throughput on {payload['device']} ({payload['model_name']}, "
                    f"{payload['size'][1]}x{payload['size'][0]})\n{payload['video']}; torch "
                    f"{payload['torch']}, {payload['date'][:10]}", fontsize=9)
    return common.save_figure(figure, path, dpi=100)


def main(argv=None):
    """`python -m bench dataset-throughput`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench.dataset_throughput")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the one-at-a-time baseline")
    parser.add_argument("--sequences", nargs="+",
                        help="sequence names, or one number: the first N by name (0: all)")
    parser.add_argument("--stride", type=int, help="use every STRIDE-th frame")
    parser.add_argument("--max-frames", type=int, help="at most this many frames per video")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--model", choices=["small", "official"])
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"])
    parser.add_argument("--mem-every", type=int, default=5)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: keep glibc's default of returning freed memory to the system "
                             "(see stm_model.runtime.cpu_allocator; by default the runs keep it)")
    parser.add_argument("--root", help="a DAVIS-format root, or 'synthetic' (default: "
                                       "../shared/data/davis2016-val when present)")
    args = common.parse_args_or_run_child(parser, argv, run_variant)
    if args is None:
        return 0
    device = common.pick_device(args.device)
    defaults = DEFAULTS[device.type]
    sequences = defaults["sequences"]
    if args.sequences:
        sequences = int(args.sequences[0]) if len(args.sequences) == 1 and \
            args.sequences[0].isdigit() else list(args.sequences)
    amp = args.amp or defaults["amp"]
    spec = dict(device=str(device), model=args.model or defaults["model"],
                size=list(args.size or defaults["size"]),
                source=args.root or (str(SHARED_DAVIS) if SHARED_DAVIS.exists() else "synthetic"),
                sequences=sequences, stride=args.stride or defaults["stride"],
                max_frames=args.max_frames, mem_every=args.mem_every,
                amp=None if amp == "none" else amp,
                keep_freed_memory=device.type == "cpu" and not args.default_malloc)
    batch_sizes = [None] * (not args.no_sequential) + list(args.batch_sizes or
                                                           defaults["batch_sizes"])
    repeats = args.repeats or defaults["repeats"]
    payload = common.environment(device)
    payload.update(benchmark="dataset_throughput",
                   **{k: v for k, v in spec.items() if k != "device"}, repeats=repeats,
                   peak_mem_note=("CUDA: allocator peak above what was allocated before "
                                  "timing; CPU: the process's resident-set high-water mark above "
                                  "its resident set once the model and videos were loaded "
                                  "(fresh process; warm-up included)"),
                   records=[])
    for repeat in range(repeats):
        for batch_size in batch_sizes:
            variant = dict(spec, variant=_variant_name(batch_size), batch_size=batch_size)
            # glibc's default allocator settings: unmapping every freed block would time page
            # faults, not the model
            record = common.run_isolated("bench.dataset_throughput", variant, timeout=3600,
                                         unmap_freed_memory=False)
            record["repeat"] = repeat
            payload["records"].append(record)
            payload.setdefault("video", record["video"])
            payload.setdefault("model_name", record["model_name"])
            print(f"run {repeat + 1}/{repeats} {record['variant']:16} {record['frames']} "
                  f"frames {record['seconds']:.2f} s {record['fps']:.2f} fps "
                  f"{record['peak_mem_bytes'] / 2**20:.0f} MiB", flush=True)
    common.finish_run("dataset_throughput", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
