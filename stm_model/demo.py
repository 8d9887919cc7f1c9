"""The demo: a long synthetic video segmented by the small trained STM with a large memory.

    python -m stm_model.demo                      # 1,000 frames, 3 objects, seed 0
    python -m stm_model.demo --frames 200 --seed 4 --overlay demo.gif

Builds a held-out synthetic video (textured objects that move, occlude each other, leave and
re-enter the frame), segments it frame by frame from the first frame's mask with
VideoSegmenter (mem_every=5: 200 memory frames at 1,000 frames), scores it with DAVIS J&F,
writes an overlay video, and prints J&F, fps, memory frames and peak memory; the last line is
`J&F <value>`.
"""
import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from stm_model import metrics
from stm_model import io as video_io
from stm_model.network.checkpoint import SHIPPED, acknowledge_synthetic_only, load_checkpoint
from stm_model.training.datasets import HELD_OUT_SEEDS
from stm_model.runtime.devices import peak_memory_bytes
from stm_model.inference.options import MEMORY_DTYPES
from stm_model.inference.video_segmenter import VideoSegmenter
from stm_model.training.synthetic import SyntheticVideo

WEIGHTS, SMALL_INTERACTIVE_WEIGHTS = SHIPPED["small"], SHIPPED["small-interactive"]
_RECIPES = {WEIGHTS.name: "make small-synthetic-model",
            SMALL_INTERACTIVE_WEIGHTS.name: "make small-interactive-model"}


def load_small_model(path=None, device="cpu"):
    """The small STM trained on synthetic videos (the file committed with the package); pass
    SMALL_INTERACTIVE_WEIGHTS for its interactive variant. For synthetic video (the demo's,
    the benchmarks', the tests'): its sessions do not warn that it was trained on synthetic
    video only (load_checkpoint("small-real") is the model for real video)."""
    path = pathlib.Path(path or WEIGHTS)
    if not path.exists():
        recipe = _RECIPES.get(path.name, "make small-synthetic-model")
        raise FileNotFoundError(
            f"{path} is missing; train it with `{recipe}` (see README: the small trained "
            "models)")
    return acknowledge_synthetic_only(load_checkpoint(path, device))


def evaluate_video(model, video, frames, *, mem_every=5, overlay=None, fps=25.0,
                   show_progress=False, **segmenter_options):
    """Segment `frames` frames of a SyntheticVideo from its first mask and score them.

    Returns a dict with "object_ids", per-object per-frame "J" and "F" (n, frames), the DAVIS
    challenge scores ("J&F", "J-Mean", "F-Mean": means over frames 1..T-2 and objects), "fps"
    (segmentation only), "memory_frames" and "memory_bytes"; writes overlay frames to `overlay`
    (a .mp4/.gif path or a folder) when given.
    """
    segmenter = VideoSegmenter(model, mem_every=mem_every, **segmenter_options)
    device = segmenter.device
    writer = video_io.OverlayWriter(overlay, fps=fps) if overlay else None
    object_ids, j_rows, f_rows, busy = None, [], [], 0.0
    try:
        for t, (image, labels) in enumerate(tqdm(video.frames(frames), total=frames,
                                                 unit="frame", disable=not show_progress)):
            frame = torch.from_numpy(image).permute(2, 0, 1).to(device)
            start = time.perf_counter()
            probs = segmenter.step(frame, mask=torch.from_numpy(labels) if t == 0 else None)
            predicted = segmenter.labels(probs).cpu().numpy()
            busy += time.perf_counter() - start
            if object_ids is None:
                object_ids = sorted(int(i) for i in np.unique(labels) if i)
            j_rows.append([metrics.region_similarity(labels == i, predicted == i)
                           for i in object_ids])
            f_rows.append([metrics.contour_accuracy(labels == i, predicted == i)
                           for i in object_ids])
            if writer is not None:
                writer.add((image * 255).round().astype(np.uint8), predicted, name=f"{t:05d}")
    finally:
        if writer is not None:
            writer.close()
    result = {"object_ids": object_ids, "J": np.array(j_rows).T, "F": np.array(f_rows).T}
    _, row = metrics.summarize({"video": result})
    result.update({"J&F": row["J&F-Mean"], "J-Mean": row["J-Mean"], "F-Mean": row["F-Mean"],
                   "fps": frames / busy, "memory_frames": segmenter.memory_frames,
                   "memory_bytes": segmenter.memory_bytes})
    return result


def main(argv=None):
    """`python -m stm_model.demo`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m stm_model.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0,
                        help="held-out video seed (never trained on)")
    parser.add_argument("--objects", type=int, default=3, choices=[2, 3])
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--mem-every", type=int, default=5)
    parser.add_argument("--checkpoint", help="model to use (default: the committed small model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-dtype", default="auto", choices=MEMORY_DTYPES,
                        help="the memory bank's storage dtype (int8, fp8: 8-bit with scales)")
    parser.add_argument("--overlay", default="demo_output/overlay.mp4",
                        help="overlay video (.mp4/.gif) or folder; 'none' to skip")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    model = load_small_model(args.checkpoint, device)
    video = SyntheticVideo(HELD_OUT_SEEDS + args.seed, *args.size, num_objects=args.objects)
    overlay = None if args.overlay == "none" else pathlib.Path(args.overlay)
    if overlay is not None and overlay.suffix == ".mp4" and not importlib.util.find_spec("av"):
        overlay = overlay.with_suffix(".gif")  # PyAV (the video extra) is not installed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = evaluate_video(model, video, args.frames, mem_every=args.mem_every, overlay=overlay,
                            show_progress=not args.quiet, memory_dtype=args.memory_dtype)
    print(f"video: synthetic seed {HELD_OUT_SEEDS + args.seed}, {args.frames} frames "
          f"{args.size[1]}x{args.size[0]}, {len(result['object_ids'])} objects")
    print(f"J {result['J-Mean']:.4f}  F {result['F-Mean']:.4f}  (frames 1..T-2, DAVIS protocol)")
    print(f"segmentation fps {result['fps']:.1f} on {device}; wall time "
          f"{time.perf_counter() - start:.1f} s (with rendering and scoring)")
    print(f"memory frames {result['memory_frames']} "
          f"({result['memory_bytes'] / 2**20:.1f} MiB); peak memory "
          f"{peak_memory_bytes(device) / 2**20:.0f} MiB")
    if overlay is not None:
        print(f"overlay: {overlay}")
    print(f"J&F {result['J&F']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
