"""Multi-object training labels for DAVIS-2016 sequences: their one-object ground truth split
into the objects of a multi-object prediction (e.g. OSVOS's published DAVIS-2017 results).

    python -m stm_model.training.pseudo_labels --davis DAVIS2016 --predictions OSVOS2017 \\
        --sequences bmx-trees kite-surf motocross-jump --output runs/davis-multi-labels

DAVIS-2016 annotates a rider and their bike as one object; DAVIS-2017 as two. A prediction
of the 2017 objects has the split but not the ground truth's outline. So each ground-truth
pixel takes the id of the predicted object there, or of the nearest predicted object where the
prediction says background; the outline stays the ground truth's. A predicted object that lies
mostly outside the ground truth over the whole sequence (a kite the 2016 annotation leaves
out) is an object the ground truth lacks: it keeps its predicted pixels (a pseudo-label).
Sequences whose prediction has one object are skipped: their ground truth is already right.
The output is a folder <sequence>/<frame>.png of palette masks (ids 1..n), which training's
--labels reads in place of the root's annotations.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from scipy import ndimage

from stm_model import io as video_io

INSIDE = 0.5  # the share of a predicted object's pixels inside the ground truth that makes it
              # one of the ground truth's objects


def split_labels(truths: list[np.ndarray], predictions: list[np.ndarray]) -> list[np.ndarray]:
    """Per frame, int64 (H, W) ids 1..n: the ground truth's foreground `truths` (bool (H, W))
    split by the ids of `predictions` (int (H, W)), with the predicted objects the ground truth
    lacks added (see the module's docstring); ids are renumbered 1..n in the predictions'
    order."""
    ids = sorted({int(i) for p in predictions for i in np.unique(p) if i})
    area = {k: sum(int((p == k).sum()) for p in predictions) for k in ids}
    inside = {k: sum(int(((p == k) & t).sum()) for p, t in zip(predictions, truths, strict=True))
              for k in ids}
    in_truth = [k for k in ids if inside[k] >= INSIDE * area[k]]
    extra = [k for k in ids if k not in in_truth]
    number = {k: n for n, k in enumerate(in_truth + extra, start=1)}
    renumber = np.zeros(max(ids, default=0) + 1, np.int64)
    renumber[list(number)] = list(number.values())
    labels = []
    for truth, prediction in zip(truths, predictions, strict=True):
        frame = np.zeros(truth.shape, np.int64)
        for k in extra:
            frame[(prediction == k) & ~truth] = number[k]
        seeds = np.isin(prediction, in_truth) & truth
        if seeds.any():
            # every truth pixel takes the id of the nearest truth pixel the prediction names
            nearest = ndimage.distance_transform_edt(~seeds, return_distances=False,
                                                     return_indices=True)
            frame[truth] = renumber[prediction[tuple(nearest)][truth]]
        elif in_truth:  # no predicted object on this frame's ground truth: the first one's
            frame[truth] = number[in_truth[0]]
        labels.append(frame)
    return labels


def write_split_labels(davis: pathlib.Path, predictions: pathlib.Path, output: pathlib.Path,
                       sequences: list[str] | None = None) -> list[str]:
    """split_labels for each sequence of a DAVIS-2016 root (Annotations/480p) whose prediction
    folder (predictions/<sequence>/<frame>.png) has more than one object, written to
    output/<sequence>/<frame>.png; returns the sequences written."""
    annotations = davis / "Annotations" / "480p"
    names = sequences or sorted(p.name for p in annotations.iterdir() if p.is_dir())
    written = []
    for name in names:
        paths = sorted((annotations / name).glob("*.png"))
        predicted = [video_io.read_mask(predictions / name / path.name) for path in paths]
        if len({int(i) for p in predicted for i in np.unique(p) if i}) < 2:
            continue
        truths = [video_io.read_mask(path) > 0 for path in paths]
        for path, labels in zip(paths, split_labels(truths, predicted), strict=True):
            video_io.write_mask(output / name / path.name, labels.astype(np.uint8))
        written.append(name)
        print(f"{name}: {len(paths)} frames, {int(max(p.max() for p in predicted))} objects",
              flush=True)
    return written


def main(argv=None):
    """`python -m stm_model.training.pseudo_labels`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m stm_model.training.pseudo_labels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--davis", type=pathlib.Path, required=True,
                        help="a DAVIS-2016 root (Annotations/480p/<sequence>/)")
    parser.add_argument("--predictions", type=pathlib.Path, required=True,
                        help="multi-object predictions: <sequence>/<frame>.png palette masks")
    parser.add_argument("--sequences", nargs="+", help="only these (default: all)")
    parser.add_argument("--output", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    written = write_split_labels(args.davis, args.predictions, args.output, args.sequences)
    print(f"wrote {len(written)} sequences into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
