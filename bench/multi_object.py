"""Touching objects kept apart: J&F per object on two-object clips composited from the DAVIS-2016
test sequences, with models trained on the other ten only.

    python -m bench multi-object                           # the shipped small-real model
    python -m bench multi-object --checkpoint official     # or any --checkpoint value
    python -m bench multi-object --write-root runs/multi   # also keep the clips (a DAVIS root:
    python -m bench interactive-eval --root runs/multi     #   the robot's rounds on them)

Clip i is test sequence i (object 1) with the object of test sequence i + 5 (object 2), cut out
by its ground truth frame by frame, scaled to at most the first one's size and pasted so that
on the first frame the two touch and overlap a little (stm_model.training.composite); the
pasted object keeps its own motion. Each clip is segmented from its first frame's two-object
mask by VideoSegmenter (mem_every=5) at the model's internal size, and scored with `stm eval`'s
code (DAVIS-2017 protocol: J and F per object over frames 1..T-2); a clip's J&F is the mean of
its two objects'. fps counts the segmenting of the 854x480 frames (decoding excluded). Writes
bench/results/multi_object_<device>_<date>.json, a bar plot per clip and a picture of each
clip's first frame with its two objects.
"""
import argparse
import contextlib
import csv
import io
import pathlib
import sys
import tempfile

import numpy as np
from PIL import Image

from bench import common, davis_test
from stm_model import io as video_io
from stm_model.commands.evaluate import evaluate_results
from stm_model.training import composite

# (object 1's sequence, object 2's sequence): each test sequence once in each role
PAIRS = tuple((davis_test.TEST_SEQUENCES[i], davis_test.TEST_SEQUENCES[(i + 5) % 10])
              for i in range(10))
GOAL = 0.65  # per clip


def clip_name(pair):
    """The clip's sequence name in the written root: "<first>+<second>"."""
    return "+".join(pair)


def _sequence(davis, name):
    """(frames (T, H, W, 3) float32 in [0, 1], masks (T, H, W) bool) of a DAVIS-2016 sequence."""
    paths = video_io.list_frames(davis / "JPEGImages" / "480p" / name)
    frames = np.stack([video_io.load_image(path) for path in paths]).astype(np.float32) / 255
    masks = np.stack([video_io.read_mask(davis / "Annotations" / "480p" / name /
                                         f"{path.stem}.png") > 0 for path in paths])
    return frames, masks


def composite_clip(davis, pair, seed):
    """(frames (T, H, W, 3) float32, labels (T, H, W) uint8 ids 0..2) of one clip (see the
    module's docstring); T is the shorter sequence's length."""
    frames, masks = _sequence(davis, pair[0])
    piece_frames, piece_masks = _sequence(davis, pair[1])
    length = min(len(frames), len(piece_frames))
    frames, masks = frames[:length], masks[:length]
    piece_frames, piece_masks = piece_frames[:length], piece_masks[:length]
    factor = min(1.0, 0.9 * float(np.sqrt(masks[0].sum() / piece_masks[0].sum())))
    piece_frames, piece_masks = composite.resize_clip(piece_frames, piece_masks,
                                                      max(factor, 0.3))
    offset = composite.touching_offset(masks[0], piece_masks[0], np.random.default_rng(seed))
    if offset is None:
        raise RuntimeError(f"{clip_name(pair)}: no place where the objects touch")
    return composite.paste(frames, masks.astype(np.uint8), piece_frames, piece_masks, offset, 2)


def write_root(davis, root, pairs=PAIRS):
    """The composited clips as a DAVIS-format root (JPEGImages/480p: JPEG quality 95,
    Annotations/480p: palette PNGs); returns the clip names."""
    names = []
    for index, pair in enumerate(pairs):
        frames, labels = composite_clip(davis, pair, seed=index)
        name = clip_name(pair)
        for t, (frame, label) in enumerate(zip(frames, labels, strict=True)):
            folder = root / "JPEGImages" / "480p" / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((frame * 255).round().astype(np.uint8)).save(
                folder / f"{t:05d}.jpg", quality=95)
            video_io.write_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png", label)
        names.append(name)
    return names


def score(folder, annotations, records):
    """J, F per object and the clip's J&F (the mean of its objects') into each record;
    returns the overall (J&F, J, F) of every object of every clip."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_results(folder, annotations, [r["sequence"] for r in records], output=folder)
    with open(folder / "per-sequence_results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for record in records:
        objects = [row for row in rows if row["Sequence"].rsplit("_", 1)[0] == record["sequence"]]
        record["objects"] = [dict(id=int(row["Sequence"].rsplit("_", 1)[1]),
                                  J=float(row["J-Mean"]), F=float(row["F-Mean"]))
                             for row in objects]
        for obj in record["objects"]:
            obj["J&F"] = (obj["J"] + obj["F"]) / 2
        for key in ("J", "F", "J&F"):
            record[key] = float(np.mean([obj[key] for obj in record["objects"]]))
    every = [obj for record in records for obj in record["objects"]]
    return tuple(float(np.mean([obj[key] for obj in every])) for key in ("J&F", "J", "F"))


def summary(payload):
    """Markdown table: J&F of each object and of the clip, fps; then the means."""
    rows = ["| clip (object 1 + object 2) | frames | J&F object 1 | J&F object 2 | clip J&F | "
            "fps |", "|---|---|---|---|---|---|"]
    for r in payload["records"]:
        first, second = (obj["J&F"] for obj in r["objects"])
        mark = "" if r["J&F"] >= payload["goal"] else " ✗"
        rows.append(f"| {r['sequence']} | {r['frames']} | {first:.3f} | {second:.3f} | "
                    f"{r['J&F']:.3f}{mark} | {r['fps']:.1f} |")
    frames = sum(r["frames"] for r in payload["records"])
    seconds = sum(r["seconds"] for r in payload["records"])
    reached = sum(r["J&F"] >= payload["goal"] for r in payload["records"])
    rows.append(f"| **mean** | {frames} | | | **{payload['J&F']:.3f}** | {frames / seconds:.1f} |")
    return (f"`{payload['checkpoint']}` at internal size {payload['internal_size']} (shorter "
            f"side), mem_every {payload['mem_every']}, {payload['device']}; {reached} of "
            f"{len(payload['records'])} clips at J&F ≥ {payload['goal']} (✗: below):\n\n"
            + "\n".join(rows))


def plot(payload, path):
    """Per-clip J&F bars, each object's beside the other, with the goal's line."""
    figure, axis = common.subplots(figsize=(9, 3.8))
    names = [r["sequence"].replace("+", "+\n") for r in payload["records"]]
    positions = np.arange(len(names))
    for k, colour in ((0, "tab:red"), (1, "tab:green")):
        axis.bar(positions + (k - 0.5) * 0.38, [r["objects"][k]["J&F"] for r in
                                                payload["records"]],
                 width=0.38, color=colour, label=f"object {k + 1}")
    axis.axhline(payload["goal"], color="black", linestyle="--", label=f"goal {payload['goal']}")
    axis.set_xticks(positions, names, fontsize=7)
    axis.set(ylim=(0, 1), ylabel="J&F", title=f"touching objects: {payload['checkpoint']} "
             f"(mean {payload['J&F']:.3f})")
    axis.legend(fontsize=8, loc="lower right")
    return common.save_figure(figure, path)


def picture(root, names, path, columns=5, width=240):
    """The first frame of each clip with its objects' colours (stm_model.io.overlay), in a grid
    of thumbnails; returns the path."""
    tiles = []
    for name in names:
        image = video_io.load_image(root / "JPEGImages" / "480p" / name / "00000.jpg")
        labels = video_io.read_mask(root / "Annotations" / "480p" / name / "00000.png")
        tile = Image.fromarray(video_io.overlay(image, labels))
        tiles.append(tile.resize((width, round(width * tile.height / tile.width))))
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * tiles[0].height), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * width, (index // columns) * tile.height))
    sheet.save(path)
    return path


def main(argv=None):
    """`python -m bench multi-object`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench multi-object",
                                     description=__doc__.split("\n\n")[0])
    davis_test.add_arguments(parser)
    parser.add_argument("--clips", nargs="+", metavar="FIRST+SECOND",
                        help="these clips instead of the ten test clips (PAIRS): sequence "
                             "FIRST with SECOND's object pasted beside its own")
    parser.add_argument("--write-root", type=pathlib.Path,
                        help="keep the composited clips in this folder (a DAVIS-format root)")
    args = parser.parse_args(argv)
    pairs = [tuple(clip.split("+")) for clip in args.clips] if args.clips else list(PAIRS)
    if any(len(pair) != 2 for pair in pairs):
        parser.error(f"--clips takes FIRST+SECOND sequence pairs; got {' '.join(args.clips)}")
    device, model, internal = davis_test.load_model(args)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.write_root or pathlib.Path(scratch) / "clips"
        names = write_root(args.davis, root, pairs)
        print(f"composited {len(names)} clips into {root}", flush=True)
        args.davis, args.sequences = root, names
        results = pathlib.Path(scratch) / "masks"
        records = [{key: value for key, value in record.items()
                    if key != "memory_bytes_per_frame"}
                   for record in davis_test.segment_sequences(model, args, internal, results)]
        jf, j, f = score(results, root / "Annotations" / "480p", records)
        payload = common.environment(device)
        payload.update(benchmark="multi_object", checkpoint=args.checkpoint,
                       internal_size=internal, mem_every=args.mem_every, goal=GOAL,
                       pairs=[list(pair) for pair in pairs], records=records,
                       **{"J&F": jf}, J=j, F=f)
        path = common.finish_run("multi_object", payload, plot, summary)
        picture(root, names, path.with_name(f"{path.stem}_clips.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
