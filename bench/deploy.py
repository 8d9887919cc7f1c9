"""The ONNX runner (stm_model.deploy) against the torch segmenter on this CPU: frames per second
at 480p with both read forms, J&F on a real clip, and peak memory against the memory's size.

    python -m bench deploy [--sequence blackswan] [--frames 50] [--memory-frames 10 100 300 1000]

Speed and J&F: the shipped small-real on one DAVIS sequence (../shared; else a synthetic
480 x 854 clip, without J&F), every runtime on the same frames in one process: torch with its
default memory dtype ("auto") and with float32, onnxruntime with the chunk read and the whole
read; fps leaves out the first frame and is the best of two runs, the runtimes taking
turns. Memory: each runtime in a fresh process
(common.run_isolated), one object, its memory filled with M random frames at the model's
internal size, then one step measured: the memory's own bytes and the step's peak above them
(VmHWM); the chunk read should stay flat in M, the whole read grow with M x HW.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

from bench import common, davis_test

RUNTIMES = ("torch", "torch_fp32", "onnx_chunk", "onnx_whole")
MEMORY_RUNTIMES = ("torch_fp32", "onnx_chunk", "onnx_whole")
FRAME_SIZE = (480, 854)
CHECKPOINT = "small-real"
GOAL_PEAK_RATIO = 1.5  # the chunk read's peak within 1.5x the torch segmenter's


def _segmenter(runtime, folder, checkpoint=CHECKPOINT):
    if runtime.startswith("onnx"):
        from stm_model.deploy import OnnxSegmenter
        return OnnxSegmenter(folder, read=runtime.split("_")[1])
    from stm_model import VideoSegmenter, load_checkpoint
    model = load_checkpoint(checkpoint)
    return VideoSegmenter(model, memory_dtype="fp32" if runtime == "torch_fp32" else "auto")


def _step(seg, runtime, frame, mask=None):
    if runtime.startswith("onnx"):
        return seg.step(frame, mask)
    import torch
    return seg.step(torch.from_numpy(frame), None if mask is None else torch.from_numpy(mask))


def _clip(davis, sequence, frames):
    """(frames (T, 3, H, W) float32, first mask, truth (T, H, W) or None)."""
    from stm_model import io as video_io
    folder = pathlib.Path(davis) / "JPEGImages" / "480p" / sequence
    if folder.is_dir():
        paths = sorted(folder.glob("*.jpg"))[:frames]
        images = np.stack([video_io.load_image(p).astype(np.float32).transpose(2, 0, 1) / 255
                           for p in paths])
        truth = np.stack([(video_io.read_mask(pathlib.Path(davis) / "Annotations" / "480p" /
                                              sequence / f"{p.stem}.png") > 0).astype(np.int64)
                          for p in paths])
        return images, truth[0], truth
    rng = np.random.default_rng(0)  # no ../shared: a synthetic clip, timed only
    images = rng.random((frames, 3) + FRAME_SIZE, dtype=np.float32)
    return images, _box(FRAME_SIZE), None


def _box(size):
    """A mask (int64) with one object, a box in the middle of a frame of `size`."""
    height, width = size
    mask = np.zeros(size, np.int64)
    mask[height // 4:height // 2, width // 4:width // 2] = 1
    return mask


def speed_records(folder, images, mask, truth, rounds=2, checkpoint=CHECKPOINT):
    """fps (the best of `rounds` runs, the runtimes taking turns) and J&F against truth of
    every runtime on the same frames."""
    from stm_model.metrics import evaluate_sequence
    records = {}
    for _ in range(rounds):
        for runtime in RUNTIMES:
            seg = _segmenter(runtime, folder, checkpoint)
            labels, start = [], None
            for t, image in enumerate(images):
                if t == 1:
                    start = time.perf_counter()
                probs = _step(seg, runtime, image, mask if t == 0 else None)
                labels.append(np.asarray(probs).argmax(0))
            fps = (len(images) - 1) / (time.perf_counter() - start)
            record = records.setdefault(runtime, dict(runtime=runtime, frames=len(images) - 1,
                                                      fps=0.0, fps_runs=[], status="ok"))
            record["fps_runs"].append(fps)
            record["fps"] = max(record["fps"], fps)
            if truth is not None and "J&F" not in record:
                scores = evaluate_sequence(truth[1:], np.stack(labels[1:]))
                record.update(J=float(scores["J"].mean()), F=float(scores["F"].mean()))
                record["J&F"] = (record["J"] + record["F"]) / 2
            print(f"{runtime:<11} {fps:6.2f} fps"
                  + (f"  J&F {record['J&F']:.4f}" if "J&F" in record else ""), flush=True)
    return list(records.values())


def _memory_child(spec):
    """In a fresh process: one runtime's memory bytes and step peak with M memory frames."""
    runtime, frames = spec["runtime"], spec["memory_frames"]
    if not runtime.startswith("onnx"):
        import torch
        torch.set_num_threads(spec["threads"])
    seg = _segmenter(runtime, spec["folder"], spec.get("checkpoint", CHECKPOINT))
    rng = np.random.default_rng(0)
    size = tuple(spec.get("frame_size", FRAME_SIZE))
    frame = rng.random((3,) + size, dtype=np.float32)
    _step(seg, runtime, frame, _box(size))
    _step(seg, runtime, frame)  # the first frame memorised: the bank exists
    bank = seg.banks[0]
    if runtime.startswith("onnx"):
        key, value = bank.keys[0], bank.values[0]
        for index in range(frames - bank.num_frames):
            bank.add(rng.standard_normal(key.shape, np.float32),
                     rng.standard_normal(value.shape, np.float32), True, index + 2)
    else:
        import torch
        keys, values = bank.memory_views()
        h, w = bank.size
        for index in range(frames - bank.num_frames):
            bank.add(torch.randn(1, keys.shape[1], h, w, dtype=keys.dtype),
                     torch.randn(1, values.shape[1], h, w, dtype=values.dtype), True,
                     index + 2)
    stored = seg.memory_bytes
    extra = common.cpu_peak_extra_bytes(lambda: _step(seg, runtime, frame))
    return dict(runtime=runtime, memory_frames=frames, frames_read=seg.memory_frames,
                memory_bytes=stored,
                step_extra_bytes=extra, peak_bytes=stored + extra, status="ok")


def memory_records(folder, sizes, threads, checkpoint=CHECKPOINT):
    records = []
    for frames in sizes:
        for runtime in MEMORY_RUNTIMES:
            spec = dict(runtime=runtime, memory_frames=frames, folder=str(folder),
                        threads=threads, checkpoint=checkpoint, frame_size=FRAME_SIZE)
            try:
                record = common.run_isolated("bench.deploy", spec)
            except RuntimeError as error:
                record = dict(runtime=runtime, memory_frames=frames, status=f"error: {error}")
            records.append(record)
            if record["status"] == "ok":
                print(f"{runtime:<11} {frames:5d} memory frames: memory "
                      f"{record['memory_bytes'] / 2**20:7.1f} MiB, step peak above it "
                      f"{record['step_extra_bytes'] / 2**20:7.1f} MiB", flush=True)
    return records


def peak_ratios(payload):
    """{memory frames: onnx_chunk's total peak / torch_fp32's}."""
    by = {(r["runtime"], r["memory_frames"]): r for r in payload["memory"]
          if r["status"] == "ok"}
    return {m: by[("onnx_chunk", m)]["peak_bytes"] / by[("torch_fp32", m)]["peak_bytes"]
            for (runtime, m) in by if runtime == "onnx_chunk" and ("torch_fp32", m) in by}


def summary(payload):
    """Markdown tables: fps and J&F per runtime; memory and step peak per memory size."""
    rows = [f"`{payload['checkpoint']}`, {payload['clip']} at "
            f"{payload['frame_size'][0]}x{payload['frame_size'][1]} (internal size "
            f"{payload['internal_size']}), {payload['device']}:", "",
            "| runtime | fps | J&F |", "|---|---|---|"]
    torch_fps = next(r["fps"] for r in payload["speed"] if r["runtime"] == "torch")
    for r in payload["speed"]:
        jf = f"{r['J&F']:.4f}" if "J&F" in r else "-"
        rows.append(f"| {r['runtime']} | {r['fps']:.2f} ({r['fps'] / torch_fps:.2f}x torch) "
                    f"| {jf} |")
    rows += ["", "| memory frames | " + " | ".join(
        f"{runtime} memory / step peak MiB" for runtime in MEMORY_RUNTIMES) +
        " | onnx_chunk peak / torch_fp32 peak |", "|---|" + "---|" * (len(MEMORY_RUNTIMES) + 1)]
    ratios = peak_ratios(payload)
    for frames in sorted({r["memory_frames"] for r in payload["memory"]}):
        cells = []
        for runtime in MEMORY_RUNTIMES:
            r = next((r for r in payload["memory"] if r["runtime"] == runtime and
                      r["memory_frames"] == frames), None)
            cells.append("-" if r is None or r["status"] != "ok" else
                         f"{r['memory_bytes'] / 2**20:.0f} / {r['step_extra_bytes'] / 2**20:.0f}")
        ratio = f"{ratios[frames]:.2f}x" if frames in ratios else "-"
        rows.append(f"| {frames} | " + " | ".join(cells) + f" | {ratio} |")
    rows.append(f"\nGoals: onnxruntime at least torch's fps; the chunk read's peak (memory + "
                f"step) within {GOAL_PEAK_RATIO}x the torch segmenter's (float32 memory).")
    return "\n".join(rows)


def plot(payload, path):
    """Step peak above the memory against memory frames (log-log), per runtime; fps bars."""
    figure, (speed, memory) = common.subplots(1, 2, figsize=(10, 3.8))
    names = [r["runtime"] for r in payload["speed"]]
    speed.bar(names, [r["fps"] for r in payload["speed"]],
              color=["tab:blue", "tab:cyan", "tab:green", "tab:red"])
    speed.set(ylabel="frames per second", title=f"{payload['clip']}, 480p")
    for runtime, colour in zip(MEMORY_RUNTIMES, ("tab:cyan", "tab:green", "tab:red"), strict=True):
        points = sorted((r["memory_frames"], r["step_extra_bytes"] / 2**20)
                        for r in payload["memory"] if r["runtime"] == runtime and
                        r["status"] == "ok")
        if points:
            memory.plot(*zip(*points, strict=True), marker="o", color=colour, label=runtime)
    memory.set(xscale="log", yscale="log", xlabel="memory frames",
               ylabel="step peak above the memory (MiB)", title="working memory of a step")
    memory.legend(fontsize=8)
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m bench deploy`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench deploy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--davis", default=str(davis_test.DEFAULT_DAVIS),
                        help="DAVIS-2016 root (default: ../shared/data/davis2016-val)")
    parser.add_argument("--sequence", default="blackswan")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--checkpoint", default=CHECKPOINT,
                        help="the model (default small-real, the shipped default)")
    parser.add_argument("--export", type=pathlib.Path,
                        help="an export folder of --checkpoint (default: exported now, into a "
                             "temporary folder)")
    args = common.parse_args_or_run_child(parser, argv, _memory_child)
    if args is None:
        return 0
    import tempfile

    import torch

    from stm_model import load_checkpoint
    from stm_model.export import to_onnx
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.export or pathlib.Path(scratch) / "onnx"
        if args.export is None:
            to_onnx(args.checkpoint, folder)
        images, mask, truth = _clip(args.davis, args.sequence, args.frames)
        payload = common.environment(torch.device("cpu"))
        payload.update(benchmark="deploy", checkpoint=args.checkpoint,
                       internal_size=load_checkpoint(args.checkpoint).config.internal_size,
                       clip=args.sequence if truth is not None else "synthetic",
                       frame_size=list(images.shape[-2:]),
                       speed=speed_records(folder, images, mask, truth,
                                           checkpoint=args.checkpoint))
        payload["memory"] = memory_records(folder, args.memory_frames, args.threads,
                                           args.checkpoint)
        import onnxruntime
        payload["onnxruntime"] = onnxruntime.__version__
        common.finish_run("deploy", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
