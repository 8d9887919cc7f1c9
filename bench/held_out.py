"""Accuracy of the committed small model on held-out synthetic videos (never trained on).

    python -m bench.held_out          # 5 videos x 300 frames + the 1,000-frame demo video
    python -m bench.held_out --seeds 0 1 --frames 100

Each video is segmented from its first frame's mask by VideoSegmenter (mem_every=5) and scored
with DAVIS J&F (frames 1..T-2). Writes bench/results/held_out_<device>_<date>.json.
"""
import argparse
import sys

import numpy as np
import torch

from bench import common
from stm_model.training.datasets import HELD_OUT_SEEDS
from stm_model.demo import WEIGHTS, evaluate_video, load_small_model
from stm_model.training.synthetic import SyntheticVideo


def summary(payload):
    """Markdown table: J&F, J, F, memory frames and fps per video, and the mean J&F."""
    rows = ["| video seed | frames | objects | J&F | J | F | memory frames | fps |",
            "|---|---|---|---|---|---|---|---|"]
    for r in payload["records"]:
        rows.append(f"| {r['seed']} | {r['frames']} | {r['objects']} | {r['J&F']:.3f} | "
                    f"{r['J']:.3f} | {r['F']:.3f} | {r['memory_frames']} | {r['fps']:.1f} |")
    short = [r["J&F"] for r in payload["records"] if r["frames"] == payload["frames"]]
    rows.append(f"\nMean J&F over the {len(short)} videos of {payload['frames']} frames: "
                f"**{np.mean(short):.3f}**.")
    return "\n".join(rows)


def main(argv=None):
    """`python -m bench held-out`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--long-frames", type=int, default=1000,
                        help="also the demo video (seed 0) at this length; 0 to skip")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--mem-every", type=int, default=5)
    parser.add_argument("--checkpoint", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_small_model(args.checkpoint, device)
    payload = common.environment(device)
    payload.update(benchmark="held_out", checkpoint=args.checkpoint, frames=args.frames,
                   size=args.size, mem_every=args.mem_every,
                   note=f"synthetic seeds HELD_OUT_SEEDS + s = {HELD_OUT_SEEDS} + s", records=[])
    runs = [(seed, args.frames) for seed in args.seeds]
    if args.long_frames:
        runs.append((0, args.long_frames))
    for seed, frames in runs:
        video = SyntheticVideo(HELD_OUT_SEEDS + seed, *args.size, num_objects=args.objects)
        result = evaluate_video(model, video, frames, mem_every=args.mem_every)
        record = dict(seed=seed, frames=frames, objects=len(result["object_ids"]),
                      **{"J&F": result["J&F"]}, J=result["J-Mean"], F=result["F-Mean"],
                      fps=result["fps"], memory_frames=result["memory_frames"],
                      per_object_J=result["J"].mean(1).tolist(),
                      per_object_F=result["F"].mean(1).tolist())
        payload["records"].append(record)
        print(f"seed {seed} frames {frames}: J&F {record['J&F']:.4f} (J {record['J']:.4f}, "
              f"F {record['F']:.4f}) fps {record['fps']:.1f}", flush=True)
    common.finish_run("held_out", payload, None, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
