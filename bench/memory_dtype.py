"""The memory's storage dtype on real video: J&F, fps and memory per frame of the segmenter with
its memory kept in float32, bfloat16, float16 or 8 bits (int8, fp8: QuantizedMemory with
scales), and how far its masks move from float32's.

    python -m bench memory-dtype                          # small-real, its training sequences
    python -m bench memory-dtype --dtypes fp32 bf16 --sequences camel cows
    python -m bench memory-dtype --dtypes fp32 int8 fp8 --sequences camel kite-surf

Each sequence is segmented from its first frame's annotation by VideoSegmenter (mem_every=5,
the model's own internal size) once per memory dtype, the network in float32 throughout: only
the memory's keys and values are stored in the dtype (the query is cast to it for the read,
whose sums stay float32; an 8-bit memory is read in what "auto" stores, bf16 on a CPU with bf16
dot products, and its bytes per frame include its scales), its masks scored by `stm eval
--davis2016`'s code and compared with the float32 run's masks frame by frame (the IoU of each
object's mask, 1 where both are empty). The default sequences are the ones the small-real model
trains on, so that a choice made from this run is not made on its test set. Writes
bench/results/memory_dtype_<device>_<date>.json and a PNG beside it.
"""
import argparse
import pathlib
import sys
import tempfile

import numpy as np

from bench import common
from bench.davis_test import (TRAINING_SEQUENCES, add_arguments, load_model, score_masks,
                              segment_sequences)
from stm_model import io as video_io

DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")


def mask_iou(labels, reference):
    """Mean over objects of the IoU of each object's mask in labels and in reference (H, W)
    integer arrays, 1 for an object empty in both; 1 when neither has an object."""
    ids = (set(np.unique(labels)) | set(np.unique(reference))) - {0}
    scores = []
    for object_id in sorted(ids):
        mine, theirs = labels == object_id, reference == object_id
        union = np.logical_or(mine, theirs).sum()
        scores.append(np.logical_and(mine, theirs).sum() / union if union else 1.0)
    return float(np.mean(scores)) if scores else 1.0


def run(model, args, internal_size, scratch):
    """{dtype: {"records": [per sequence], "J&F", "J", "F", "fps", ...}} of every dtype."""
    annotations = args.davis / "Annotations" / "480p"
    results = {}
    for dtype in args.dtypes:
        folder = scratch / dtype
        records = segment_sequences(model, args, internal_size, folder, memory_dtype=dtype)
        jf, j, f = score_masks(folder, annotations, records)
        for record in records:
            if dtype != args.dtypes[0]:
                record["iou_with_first"] = _iou_with(folder, scratch / args.dtypes[0],
                                                     record["sequence"])
        frames = sum(r["frames"] for r in records)
        results[dtype] = {"records": records, "J&F": jf, "J": j, "F": f,
                          "fps": frames / sum(r["seconds"] for r in records),
                          "memory_bytes_per_frame": records[0]["memory_bytes_per_frame"]}
    return results


def _iou_with(folder, reference_folder, sequence):
    """{"mean", "min"} of the per-frame mask IoU of a sequence's masks in two folders."""
    ious = [mask_iou(video_io.read_mask(path), video_io.read_mask(reference_folder / sequence /
                                                                 path.name))
            for path in sorted((folder / sequence).glob("*.png"))]
    return {"mean": float(np.mean(ious)), "min": float(np.min(ious))}


def summary(payload):
    """Markdown: per dtype the J&F, J, F, fps, memory per frame and the IoU with the first."""
    first = payload["dtypes"][0]
    rows = [f"| memory dtype | J&F | J | F | fps | KiB per memory frame | mask IoU with {first}: "
            "mean | lowest frame |", "|---|---|---|---|---|---|---|---|"]
    for dtype in payload["dtypes"]:
        result = payload["results"][dtype]
        ious = [r["iou_with_first"] for r in result["records"] if "iou_with_first" in r]
        iou = (f"{np.mean([i['mean'] for i in ious]):.4f} | {min(i['min'] for i in ious):.4f}"
               if ious else "- | -")
        rows.append(f"| {dtype} | {result['J&F']:.4f} | {result['J']:.4f} | {result['F']:.4f} | "
                    f"{result['fps']:.2f} | {result['memory_bytes_per_frame'] / 1024:.0f} | "
                    f"{iou} |")
    return (f"`{payload['checkpoint']}` at internal size {payload['internal_size']}, mem_every "
            f"{payload['mem_every']}, {len(payload['sequences'])} DAVIS-2016 sequences "
            f"({', '.join(payload['sequences'])}):\n\n" + "\n".join(rows))


def plot(payload, path):
    """J&F per sequence for each dtype, and each sequence's mask IoU with the first dtype."""
    figure, axes = common.subplots(1, 2, figsize=(13, 3.8), squeeze=False)
    names = payload["sequences"]
    width = 0.8 / len(payload["dtypes"])
    for index, dtype in enumerate(payload["dtypes"]):
        records = payload["results"][dtype]["records"]
        positions = np.arange(len(names)) + (index - (len(payload["dtypes"]) - 1) / 2) * width
        axes[0][0].bar(positions, [r["J&F"] for r in records], width, label=dtype)
        if index:
            axes[0][1].bar(positions, [r["iou_with_first"]["mean"] for r in records], width,
                           label=dtype)
    for axis, title in ((axes[0][0], "J&F per sequence"),
                        (axes[0][1], f"mask IoU with {payload['dtypes'][0]}")):
        axis.set_xticks(np.arange(len(names)), names, rotation=60)
        axis.set(title=title, ylim=(0, 1.02))
        axis.legend()
    figure.tight_layout()
    return [common.save_figure(figure, path)]


def main(argv=None):
    """`python -m bench memory-dtype`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench memory-dtype",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser, TRAINING_SEQUENCES,
                  "the sequences (default: small-real's ten training sequences)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="the memory dtypes; the masks of the first are the reference")
    args = parser.parse_args(argv)
    if len(set(args.dtypes)) != len(args.dtypes):
        parser.error(f"--dtypes: each dtype once, got {' '.join(args.dtypes)}")
    device, model, internal = load_model(args)
    payload = common.environment(device)
    payload.update(benchmark="memory_dtype", checkpoint=args.checkpoint, internal_size=internal,
                   mem_every=args.mem_every, sequences=args.sequences, dtypes=args.dtypes)
    with tempfile.TemporaryDirectory() as scratch:
        payload["results"] = run(model, args, internal, pathlib.Path(scratch))
    common.finish_run("memory_dtype", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
