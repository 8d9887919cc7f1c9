"""A checkpoint on real video: J&F on the ten DAVIS-2016 test sequences and fps at 480p input.

    python -m bench davis-test                                  # the shipped small-real model
    python -m bench davis-test --checkpoint official            # or any --checkpoint value
    python -m bench davis-test --run runs/small-real            # + the run's training curve

Each test sequence (TEST_SEQUENCES: never trained, tuned or selected on) is segmented from its
first frame's annotation by VideoSegmenter (mem_every=5) at the model's own internal size
(STMConfig.internal_size; --size overrides), its masks written as `stm segment` writes them,
and the folder scored by `stm eval --davis2016`'s code (evaluate_results: DAVIS J&F, frames
1..T-2). fps counts the segmenting of the 854x480 frames (decoding excluded). Writes
bench/results/davis_test_<device>_<date>.json, a per-sequence bar plot, and with --run the
training curve of that run's metrics.csv.
"""
import argparse
import contextlib
import csv
import io
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

from bench import common
from stm_model import VideoSegmenter
from stm_model import io as video_io
from stm_model.commands.evaluate import evaluate_results
from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint

# DAVIS-2016 val split into the sequences the small-real model trains on (the Makefile's
# DAVIS_TRAIN) and its test set.
TRAINING_SEQUENCES = ("bmx-trees", "breakdance", "camel", "car-roundabout", "cows",
                      "drift-chicane", "goat", "kite-surf", "motocross-jump", "parkour")
TEST_SEQUENCES = ("blackswan", "car-shadow", "dance-twirl", "dog", "drift-straight",
                  "horsejump-high", "libby", "paragliding-launch", "scooter-black", "soapbox")
DEFAULT_DAVIS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "davis2016-val"


def segment_sequence(model, frames_dir, annotation, output, mem_every, max_internal_size,
                     memory_dtype=None, amp_dtype=None, max_frames=None):
    """Masks of one sequence written into output; returns (frames, seconds segmenting, memory
    bytes per memory frame). amp_dtype: the network under autocast in that dtype; max_frames:
    the sequence's first frames only."""
    segmenter = VideoSegmenter(model, mem_every=mem_every, max_internal_size=max_internal_size,
                               memory_dtype=memory_dtype, amp_dtype=amp_dtype)
    first = torch.from_numpy(video_io.read_mask(annotation))
    frames = list(video_io.FrameReader(frames_dir))[:max_frames]
    output.mkdir(parents=True, exist_ok=True)
    busy = 0.0
    for index, frame in enumerate(frames):
        tensor = frame.tensor
        start = time.perf_counter()
        probs = segmenter.step(tensor, mask=first if index == 0 else None)
        labels = segmenter.labels(probs)
        busy += time.perf_counter() - start
        video_io.write_mask(output / f"{frame.name}.png", labels.numpy().astype(np.uint8))
    return len(frames), busy, segmenter.memory_bytes_per_frame


def add_arguments(parser, sequences=None, sequences_help=None):
    """The options of a benchmark that segments DAVIS-2016 sequences with a checkpoint:
    --checkpoint, --davis, --sequences (default `sequences`; none when None), --size and
    --mem-every."""
    parser.add_argument("--checkpoint", default="small-real",
                        help="a --checkpoint value of stm segment (default: small-real)")
    parser.add_argument("--davis", type=pathlib.Path, default=DEFAULT_DAVIS,
                        help="the DAVIS-2016 root (JPEGImages/480p, Annotations/480p)")
    if sequences is not None:
        parser.add_argument("--sequences", nargs="+", default=list(sequences),
                            help=sequences_help)
    parser.add_argument("--size", type=int, help="internal size (default: the model's own)")
    parser.add_argument("--mem-every", type=int, default=5)


def load_model(args):
    """(device, model, internal size) for add_arguments' parsed options; SystemExit when
    --davis is not a DAVIS-2016 root."""
    if not (args.davis / "Annotations" / "480p").is_dir():
        raise SystemExit(f"{args.davis}: not a DAVIS-2016 root (give --davis)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(resolve_checkpoint(args.checkpoint), device)
    return device, model, args.size or model.config.internal_size


def segment_sequences(model, args, internal_size, folder, memory_dtype=None):
    """Each of args.sequences segmented from its first annotation into folder/<sequence>/;
    returns [{sequence, frames, seconds, fps, memory_bytes_per_frame}], printing a line each."""
    records = []
    for name in args.sequences:
        frames, seconds, per_frame = segment_sequence(
            model, args.davis / "JPEGImages" / "480p" / name,
            args.davis / "Annotations" / "480p" / name / "00000.png", folder / name,
            args.mem_every, internal_size, memory_dtype=memory_dtype)
        records.append(dict(sequence=name, frames=frames, seconds=seconds,
                            fps=frames / seconds, memory_bytes_per_frame=per_frame))
        print(f"{memory_dtype + ' ' if memory_dtype else ''}{name}: {frames} frames, "
              f"{frames / seconds:.1f} fps", flush=True)
    return records


def score_masks(folder, annotations, records):
    """Scores the masks in folder/<sequence>/ with `stm eval --davis2016`'s code: J, F and J&F
    into each record (a dict with "sequence"); returns the overall (J&F, J, F)."""
    sequences = [record["sequence"] for record in records]
    with contextlib.redirect_stdout(io.StringIO()):  # its table: the benchmark prints its own
        evaluate_results(folder, annotations, sequences, output=folder, davis2016=True)
    with open(folder / "per-sequence_results.csv", newline="") as file:
        rows = {row["Sequence"].rsplit("_", 1)[0]: row for row in csv.DictReader(file)}
    with open(folder / "global_results.csv", newline="") as file:
        overall = next(csv.DictReader(file))
    for record in records:
        row = rows[record["sequence"]]
        record.update(J=float(row["J-Mean"]), F=float(row["F-Mean"]))
        record["J&F"] = (record["J"] + record["F"]) / 2
    return tuple(float(overall[key]) for key in ("J&F-Mean", "J-Mean", "F-Mean"))


def summary(payload):
    """Markdown table: J&F, J, F and fps per sequence, then the means."""
    rows = ["| sequence | frames | J&F | J | F | fps |", "|---|---|---|---|---|---|"]
    for r in payload["records"]:
        rows.append(f"| {r['sequence']} | {r['frames']} | {r['J&F']:.3f} | {r['J']:.3f} | "
                    f"{r['F']:.3f} | {r['fps']:.1f} |")
    frames = sum(r["frames"] for r in payload["records"])
    seconds = sum(r["seconds"] for r in payload["records"])
    rows.append(f"| **mean** | {frames} | **{payload['J&F']:.3f}** | {payload['J']:.3f} | "
                f"{payload['F']:.3f} | {frames / seconds:.1f} |")
    memory = f", memory {payload['memory_dtype']}" if "memory_dtype" in payload else ""
    return (f"`{payload['checkpoint']}` at internal size {payload['internal_size']} (shorter "
            f"side), mem_every {payload['mem_every']}{memory}, {payload['device']}:\n\n" +
            "\n".join(rows))


def plot(payload, path):
    """Per-sequence J&F bars (and the training curve when the run's metrics are recorded)."""
    figure, axes = common.subplots(1, 2 if payload.get("training") else 1,
                                   figsize=(12 if payload.get("training") else 7, 3.6),
                                   squeeze=False)
    names = [r["sequence"] for r in payload["records"]]
    axes[0][0].bar(names, [r["J&F"] for r in payload["records"]], color="tab:blue")
    axes[0][0].axhline(payload["J&F"], color="black", linestyle="--",
                       label=f"mean {payload['J&F']:.3f}")
    axes[0][0].set(ylim=(0, 1), ylabel="J&F", title="DAVIS-2016 test sequences")
    axes[0][0].tick_params(axis="x", rotation=60)
    axes[0][0].legend()
    if payload.get("training"):
        steps = [row["step"] for row in payload["training"]]
        axes[0][1].plot(steps, [row["loss"] for row in payload["training"]])
        axes[0][1].set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log",
                       title="training curve")
        static = payload.get("static_steps")
        if static:
            axes[0][1].axvline(static, color="gray", linestyle=":",
                               label="static images -> video clips")
            axes[0][1].legend()
    figure.tight_layout()
    return [common.save_figure(figure, path)]


def _training_curve(run):
    """[{step, loss}] of a run folder's metrics.csv."""
    with open(pathlib.Path(run) / "metrics.csv", newline="") as file:
        return [{"step": int(row["step"]), "loss": float(row["loss"])}
                for row in csv.DictReader(file)]


def main(argv=None):
    """`python -m bench davis-test`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench davis-test",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser, TEST_SEQUENCES, "the sequences (default: the ten test sequences)")
    parser.add_argument("--run", type=pathlib.Path,
                        help="the training run folder: its metrics.csv is plotted")
    parser.add_argument("--static-steps", type=int,
                        help="with --run: the steps of its static-image stage (marked)")
    parser.add_argument("--memory-dtype", default="auto",
                        help="the memory's storage dtype (default: auto, as `stm segment`)")
    args = parser.parse_args(argv)
    device, model, internal = load_model(args)
    payload = common.environment(device)
    memory_dtype = VideoSegmenter(model, memory_dtype=args.memory_dtype).memory_dtype
    payload.update(benchmark="davis_test", checkpoint=args.checkpoint, internal_size=internal,
                   mem_every=args.mem_every, sequences=args.sequences,
                   memory_dtype=str(memory_dtype).replace("torch.", ""))
    if args.run:
        payload.update(training=_training_curve(args.run), static_steps=args.static_steps)
    with tempfile.TemporaryDirectory() as scratch:
        results = pathlib.Path(scratch)
        payload["records"] = [
            {key: value for key, value in record.items() if key != "memory_bytes_per_frame"}
            for record in segment_sequences(model, args, internal, results,
                                            memory_dtype=args.memory_dtype)]
        jf, j, f = score_masks(results, args.davis / "Annotations" / "480p",
                               payload["records"])
    payload.update(**{"J&F": jf}, J=j, F=f)
    common.finish_run("davis_test", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
