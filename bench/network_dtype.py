"""The network in float32 against bf16 autocast on real video: J&F and fps of the segmenter,
sequence by sequence, in one interleaved run.

    python -m bench network-dtype                          # small-real, the ten test sequences
    python -m bench network-dtype --sequences blackswan dog --rounds 2

Each sequence is segmented from its first frame's annotation by VideoSegmenter (mem_every 5,
the model's own internal size, the memory dtype `auto` picks) with the network in float32 and
under torch.autocast(bfloat16) (`stm segment --amp bf16`), the two one after the other and
their order swapped every sequence and round (ABBA: a drift in the machine's speed falls on
both alike); the masks are scored by `stm eval --davis2016`'s code and compared frame by frame
(the mean IoU of each object's mask, bench.memory_dtype.mask_iou). fps counts the segmenting
(decoding and writing excluded). The CPU's flags are recorded: on a CPU without bf16 dot
products autocast emulates them in float32 and makes no speed claim. Writes
bench/results/network_dtype_<device>_<date>.json and a PNG beside it.
"""
import argparse
import pathlib
import sys
import tempfile

from bench import common
from bench.davis_test import (TEST_SEQUENCES, add_arguments, load_model, score_masks,
                              segment_sequence)
from bench.memory_dtype import _iou_with
from stm_kernels.backends import cpu_features

MODES = {"fp32": None, "bf16-autocast": "bf16"}


def run(model, args, internal_size, scratch):
    """{mode: {"records": [per sequence], "J&F", "J", "F", "fps"}}: every sequence in both
    modes, the order swapped each time, --rounds times (fps: the best round's; the masks
    scored are the last round's)."""
    annotations = args.davis / "Annotations" / "480p"
    truth = annotations
    if args.max_frames:  # the scores' ground truth: the same first frames
        truth = scratch / "annotations"
        for name in args.sequences:
            (truth / name).mkdir(parents=True)
            for path in sorted((annotations / name).glob("*.png"))[:args.max_frames]:
                (truth / name / path.name).symlink_to(path)
    timings = {mode: {} for mode in MODES}
    turn = 0
    for _ in range(args.rounds):
        for name in args.sequences:
            order = list(MODES) if turn % 2 == 0 else list(MODES)[::-1]
            turn += 1
            for mode in order:
                frames, seconds, _ = segment_sequence(
                    model, args.davis / "JPEGImages" / "480p" / name,
                    annotations / name / "00000.png", scratch / mode / name, args.mem_every,
                    internal_size, amp_dtype=MODES[mode], max_frames=args.max_frames)
                best = timings[mode].get(name, (frames, float("inf")))
                timings[mode][name] = (frames, min(best[1], seconds))
                print(f"{mode:14} {name}: {frames} frames, {frames / seconds:.1f} fps",
                      flush=True)
    results = {}
    for mode in MODES:
        records = [dict(sequence=name, frames=frames, seconds=seconds, fps=frames / seconds)
                   for name, (frames, seconds) in timings[mode].items()]
        jf, j, f = score_masks(scratch / mode, truth, records)
        if mode != "fp32":
            for record in records:
                record["iou_with_fp32"] = _iou_with(scratch / mode, scratch / "fp32",
                                                    record["sequence"])
        frames = sum(r["frames"] for r in records)
        results[mode] = {"records": records, "J&F": jf, "J": j, "F": f,
                         "fps": frames / sum(r["seconds"] for r in records)}
    return results


def summary(payload):
    """Markdown: J&F and fps per sequence in each mode, the means, the speed ratio."""
    fp32, amp = (payload["results"][mode] for mode in MODES)
    rows = ["| sequence | frames | J&F fp32 | J&F bf16 autocast | mask IoU: mean | lowest "
            "frame | fps fp32 | fps bf16 autocast | speed-up |", "|---" * 9 + "|"]
    for plain, other in zip(fp32["records"], amp["records"], strict=True):
        iou = other["iou_with_fp32"]
        rows.append(f"| {plain['sequence']} | {plain['frames']} | {plain['J&F']:.3f} | "
                    f"{other['J&F']:.3f} | {iou['mean']:.3f} | {iou['min']:.3f} | "
                    f"{plain['fps']:.1f} | {other['fps']:.1f} | "
                    f"{other['fps'] / plain['fps']:.2f}x |")
    iou = sum(r["iou_with_fp32"]["mean"] for r in amp["records"]) / len(amp["records"])
    lowest = min(r["iou_with_fp32"]["min"] for r in amp["records"])
    rows.append(f"| **all** | {sum(r['frames'] for r in fp32['records'])} | "
                f"**{fp32['J&F']:.3f}** | **{amp['J&F']:.3f}** | {iou:.3f} | {lowest:.3f} | "
                f"{fp32['fps']:.1f} | {amp['fps']:.1f} | **{amp['fps'] / fp32['fps']:.2f}x** |")
    products = "with" if payload["bf16_dot_products"] else "without (autocast emulates them)"
    rows.append(f"\n`{payload['checkpoint']}` at internal size {payload['internal_size']}, "
                f"mem_every {payload['mem_every']}, {payload['device']}, {products} bf16 dot "
                f"products; fps the best of {payload['rounds']} interleaved round(s), the "
                "modes' order swapped every sequence.")
    return "\n".join(rows)


def plot(payload, path):
    """fps per sequence in both modes; returns [path]."""
    figure, axis = common.subplots(1, 1, figsize=(8, 3.6))
    names = [r["sequence"] for r in payload["results"]["fp32"]["records"]]
    width = 0.4
    for offset, mode in enumerate(MODES):
        fps = [r["fps"] for r in payload["results"][mode]["records"]]
        axis.bar([i + (offset - 0.5) * width for i in range(len(names))], fps, width,
                 label=f"{mode} (J&F {payload['results'][mode]['J&F']:.3f})")
    axis.set_xticks(range(len(names)), names, rotation=60)
    axis.set_ylabel("fps")
    axis.legend()
    figure.suptitle(f"Network fp32 vs bf16 autocast, {payload['device']}")
    figure.tight_layout()
    return [common.save_figure(figure, path)]


def main(argv=None):
    """`python -m bench network-dtype`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench network-dtype",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser, TEST_SEQUENCES, "the sequences (default: the ten test sequences)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each sequence is segmented in each mode (fps: the best)")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="each sequence's first frames only (a quick look; J&F then "
                             "scores those, the annotations' frames alike)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.max_frames is not None and args.max_frames < 3):
        parser.error("--rounds must be at least 1 and --max-frames at least 3")
    device, model, internal = load_model(args)
    payload = common.environment(device)
    payload.update(benchmark="network_dtype", checkpoint=args.checkpoint,
                   internal_size=internal, mem_every=args.mem_every, sequences=args.sequences,
                   rounds=args.rounds, max_frames=args.max_frames,
                   bf16_dot_products=cpu_features.bf16_dot_products())
    with tempfile.TemporaryDirectory() as scratch:
        payload["results"] = run(model, args, internal, pathlib.Path(scratch))
    common.finish_run("network_dtype", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
