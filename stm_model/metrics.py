"""DAVIS video object segmentation measures: region similarity J and boundary F-measure F.

Reimplements the definitions of the DAVIS benchmark (Perazzi et al., CVPR 2016; the DAVIS-2017
semi-supervised evaluation) on in-memory arrays; reading images is left to the caller.

Per frame and object:
    J = |gt ∧ pred| / |gt ∨ pred|                      (1 when both masks are empty)
    F = 2PR / (P + R) of the boundary pixels, matched within a disk of radius
        ceil(0.008 · image diagonal) pixels
Per object over a sequence (`statistics`): mean, recall (fraction of frames above 0.5) and decay
(mean of the first quarter of the frames minus the mean of the last quarter). The challenge
scores frames 1..T-2 (the given first frame and the last frame are excluded) and averages every
statistic over all objects of all sequences; `summarize` does that and `write_csvs` writes the
two CSV files of the official evaluation.

Typical use::

    results = {name: evaluate_sequence(gt_frames, pred_frames) for name, ... in videos}
    per_object, global_row = summarize(results)
    print(format_table(per_object, global_row))
    write_csvs("out/", per_object, global_row)
"""
import csv
import math
import os
import warnings

import numpy as np

__all__ = [
    "GLOBAL_COLUMNS",
    "PER_OBJECT_COLUMNS",
    "boundary_map",
    "boundary_precision_recall",
    "contour_accuracy",
    "evaluate_sequence",
    "format_table",
    "region_similarity",
    "statistics",
    "summarize",
    "write_csvs",
]

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
PER_OBJECT_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
GLOBAL_CSV = "global_results.csv"
PER_OBJECT_CSV = "per-sequence_results.csv"


# --------------------------------------------------------------------------------------------
# Per-frame measures
# --------------------------------------------------------------------------------------------

def _mask_pair(gt, pred):
    """Both inputs as 2-D boolean arrays of the same shape, or a ValueError naming the shapes."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim != 2 or pred.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W); got gt shape {gt.shape} and pred shape "
                         f"{pred.shape}")
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} and pred shape {pred.shape} differ")
    return gt.astype(bool), pred.astype(bool)


def region_similarity(gt, pred, void=None):
    """Region similarity J (Jaccard index) of two binary masks.

    Args:
        gt, pred: 2-D arrays of the same shape, anything castable to bool (True = object).
        void: optional 2-D bool mask of pixels left out of both (DAVIS's void label).
    Returns:
        float |gt ∧ pred| / |gt ∨ pred|; 1.0 when both masks are empty (DAVIS convention).
    Raises:
        ValueError: an input is not 2-D or the shapes differ (the message names both shapes).
    """
    gt, pred = _without_void(*_mask_pair(gt, pred), void)
    union = np.count_nonzero(gt | pred)
    if union == 0:
        return 1.0
    return np.count_nonzero(gt & pred) / union


def boundary_map(seg):
    """One-pixel-wide boundary of a binary mask, as the DAVIS `seg2bmap` computes it.

    A pixel is a boundary pixel when it differs from its right, lower or lower-right
    neighbour. The last row only compares with the right neighbour, the last column only with
    the lower neighbour, and the bottom-right pixel is never a boundary pixel; pixels outside
    the image are not compared with (an object touching the border has no boundary there).

    Args:
        seg: 2-D array castable to bool.
    Returns:
        2-D bool array of the same shape.
    """
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {seg.shape}")
    seg = seg.astype(bool)
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    below_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    below_right[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ below_right)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def _tolerance_pixels(bound_th, shape):
    """Matching radius: bound_th pixels if >= 1, else that fraction of the image diagonal."""
    if bound_th >= 1:
        return bound_th
    return int(math.ceil(bound_th * math.hypot(*shape)))


def _count_matched(points, target, structure, chunk=1 << 20):
    """Number of True pixels of `points` at which the dilation of `target` by `structure` is True.

    Equals `count_nonzero(points & dilate(target, structure))` for the OpenCV dilation of the
    official code (kernel anchored at its centre index, zero border; for the odd, symmetric
    disks used here the same as `scipy.ndimage.binary_dilation`), but evaluates the dilation
    only at the pixels of `points`: boundaries are sparse, so this is ~50x faster than
    dilating the whole image.
    """
    ky, kx = structure.shape
    pad = max(ky, kx)
    padded = np.pad(target, pad).ravel()
    width = target.shape[1] + 2 * pad
    dy, dx = np.nonzero(structure)
    offsets = (dy - ky // 2) * width + (dx - kx // 2)
    ys, xs = np.nonzero(points)
    base = (ys + pad) * width + (xs + pad)
    step = max(1, chunk // len(offsets))
    matched = 0
    for start in range(0, len(base), step):
        hits = padded[base[start:start + step, None] + offsets[None, :]]
        matched += int(np.count_nonzero(hits.any(axis=1)))
    return matched


def _without_void(gt, pred, void):
    """gt and pred with the void pixels cleared in both (as the DAVIS evaluation does)."""
    if void is None:
        return gt, pred
    void = np.asarray(void, dtype=bool)
    if void.shape != gt.shape:
        raise ValueError(f"void shape {void.shape} and mask shape {gt.shape} differ")
    return gt & ~void, pred & ~void


def boundary_precision_recall(gt, pred, bound_th=0.008, void=None):
    """Boundary precision and recall of `pred` against `gt` (the two halves of F).

    Boundaries come from `boundary_map`; a boundary pixel counts as matched when the other
    mask's boundary, dilated by a disk (`skimage.morphology.disk`) of radius `bound_pix`, covers
    it, where `bound_pix = bound_th` if `bound_th >= 1`, else `ceil(bound_th * hypot(H, W))`.

    Args:
        gt, pred: 2-D arrays of the same shape, castable to bool.
        bound_th: tolerance, in pixels (>= 1) or as a fraction of the image diagonal (< 1).
        void: optional 2-D bool mask of pixels cleared in both masks first (DAVIS's void).
    Returns:
        (precision, recall) floats: matched fraction of the predicted boundary pixels and of
        the ground-truth boundary pixels. Without a predicted boundary but with a ground-truth
        one: (1, 0); with a predicted boundary but none in the ground truth: (0, 1); with
        neither: (1, 1).
    Raises:
        ValueError: an input is not 2-D or the shapes differ.
    """
    gt, pred = _without_void(*_mask_pair(gt, pred), void)
    gt_boundary = boundary_map(gt)
    pred_boundary = boundary_map(pred)
    n_gt = np.count_nonzero(gt_boundary)
    n_pred = np.count_nonzero(pred_boundary)
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0
    if n_pred == 0:
        return 1.0, 0.0
    if n_gt == 0:
        return 0.0, 1.0
    structure = _disk(_tolerance_pixels(bound_th, gt.shape))
    precision = _count_matched(pred_boundary, gt_boundary, structure) / n_pred
    recall = _count_matched(gt_boundary, pred_boundary, structure) / n_gt
    return precision, recall


def _disk(radius):
    """The boolean disk of `radius` (skimage.morphology.disk, the DAVIS toolkit's); imported
    here, so that importing the metrics needs numpy alone."""
    try:
        from skimage.morphology import disk
    except ImportError as error:
        raise ImportError("the boundary measure F needs scikit-image: pip install "
                          "scikit-image") from error
    return disk(radius).astype(bool)


def contour_accuracy(gt, pred, bound_th=0.008, void=None):
    """Contour accuracy F: the boundary F-measure of DAVIS.

    Args:
        gt, pred: 2-D arrays of the same shape, castable to bool.
        bound_th: boundary tolerance, see `boundary_precision_recall` (DAVIS uses 0.008).
        void: optional pixels left out, see `boundary_precision_recall`.
    Returns:
        float 2PR / (P + R) of `boundary_precision_recall`, 0.0 when P + R = 0. Both masks
        empty gives 1.0; exactly one empty gives 0.0.
    Raises:
        ValueError: an input is not 2-D or the shapes differ (the message names both shapes).
    """
    precision, recall = boundary_precision_recall(gt, pred, bound_th, void)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------

def _label_stack(frames, name):
    """A sequence of 2-D integer label maps as a list of arrays (validated)."""
    frames = [np.asarray(frame) for frame in frames]
    for t, frame in enumerate(frames):
        if frame.ndim != 2:
            raise ValueError(f"{name} frame {t} must be a 2-D label map; got shape {frame.shape}")
        if not (np.issubdtype(frame.dtype, np.integer) or frame.dtype == bool):
            raise TypeError(f"{name} frame {t} must hold integer labels; got dtype {frame.dtype}")
    return frames


def _object_ids_in(frames):
    ids = set()
    for frame in frames:
        ids.update(int(i) for i in np.unique(frame))
    ids.discard(0)
    return ids


def evaluate_sequence(gt_labels, pred_labels, object_ids=None, bound_th=0.008, void=None):
    """Per-object, per-frame J and F of one sequence (DAVIS-2017 semi-supervised protocol).

    Args:
        gt_labels: T ground-truth label maps (a sequence of (H, W) arrays or a (T, H, W)
            array) of integer object ids, 0 = background.
        pred_labels: T predicted label maps, same layout and sizes.
        object_ids: objects to evaluate; default: every id present in any ground-truth frame.
            An object absent from a predicted frame is scored as an empty mask there.
        bound_th: boundary tolerance of F (see `boundary_precision_recall`).
        void: optional T (H, W) bool masks of the ground truth's void pixels (DAVIS label 255,
            `stm_model.io.read_annotation`), left out of J and F.
    Returns:
        dict with "object_ids" (list of int, ascending unless given), "J" and "F"
        (float64 arrays of shape (n_objects, T); every frame is scored, including the first
        and last: `summarize` excludes them for the challenge statistics).
    Raises:
        ValueError: frame counts or frame sizes differ (naming both), a frame is not 2-D, or
            the prediction holds an object id that no ground-truth frame has (naming the first
            frame that does; the official evaluation refuses such results too).
        TypeError: labels are not integers.
    """
    gt_frames = _label_stack(gt_labels, "gt")
    pred_frames = _label_stack(pred_labels, "pred")
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"gt has {len(gt_frames)} frames and pred has {len(pred_frames)}")
    for t, (gt, pred) in enumerate(zip(gt_frames, pred_frames, strict=True)):
        if gt.shape != pred.shape:
            raise ValueError(f"frame {t}: gt shape {gt.shape} and pred shape {pred.shape} differ")

    gt_ids = _object_ids_in(gt_frames)
    extra = sorted(_object_ids_in(pred_frames) - gt_ids)
    if extra:
        first = next(t for t, frame in enumerate(pred_frames)
                     if set(np.unique(frame).tolist()) & set(extra))
        raise ValueError(f"prediction frame {first} holds object ids {extra} that the ground "
                         f"truth lacks (ground-truth ids: {sorted(gt_ids)})")
    ids = sorted(gt_ids) if object_ids is None else [int(i) for i in object_ids]

    n_frames = len(gt_frames)
    voids = [None] * n_frames if void is None else list(void)
    if len(voids) != n_frames:
        raise ValueError(f"void has {len(voids)} frames and gt has {n_frames}")
    j_values = np.empty((len(ids), n_frames))
    f_values = np.empty((len(ids), n_frames))
    for t, (gt, pred) in enumerate(zip(gt_frames, pred_frames, strict=True)):
        for k, object_id in enumerate(ids):
            gt_mask, pred_mask = gt == object_id, pred == object_id
            j_values[k, t] = region_similarity(gt_mask, pred_mask, voids[t])
            f_values[k, t] = contour_accuracy(gt_mask, pred_mask, bound_th, voids[t])
    return {"object_ids": ids, "J": j_values, "F": f_values}


def statistics(per_frame_values):
    """Mean, recall and decay of one object's per-frame values, as DAVIS `db_statistics`.

    mean = nanmean(v); recall = nanmean(v > 0.5) (a NaN frame counts as a miss); decay: the
    frames are cut into four overlapping bins at `ids = round(linspace(1, T, 5) + 1e-10) - 1`,
    bin i = v[ids[i] : ids[i+1] + 1], and decay = nanmean(bin 0) - nanmean(bin 3).
    (The official code stores `ids` as uint8, which wraps beyond 256 frames; here they are
    plain integers, identical for every DAVIS sequence.)

    Args:
        per_frame_values: 1-D sequence of per-frame J or F values (the challenge passes
            frames 1..T-2).
    Returns:
        (mean, recall, decay) floats; all NaN for an empty input.
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"per_frame_values must be 1-D; got shape {values.shape}")
    if values.size == 0:
        return math.nan, math.nan, math.nan
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i]:edges[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN slices give NaN
        mean = np.nanmean(values)
        recall = np.nanmean(values > 0.5)
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


def summarize(sequence_results, exclude_first_last=True):
    """Challenge scores over sequences: per-object means and the global row.

    Args:
        sequence_results: {sequence_name: evaluate_sequence(...) result}; order is kept.
        exclude_first_last: score frames 1..T-2 only, as the DAVIS-2017 semi-supervised
            challenge (the first frame is the given annotation).
    Returns:
        (per_object, global_row):
        per_object: {"<sequence>_<object_id>": {"J-Mean": float, "F-Mean": float}};
        global_row: {column: float} over `GLOBAL_COLUMNS`, each J/F statistic the mean over
        all objects of all sequences, and "J&F-Mean" = (J-Mean + F-Mean) / 2.
    """
    per_object = {}
    stats = {"J": [], "F": []}
    for sequence, result in sequence_results.items():
        for k, object_id in enumerate(result["object_ids"]):
            row = {}
            for measure in ("J", "F"):
                values = np.asarray(result[measure][k], dtype=np.float64)
                if exclude_first_last:
                    values = values[1:-1]
                mean, recall, decay = statistics(values)
                stats[measure].append((mean, recall, decay))
                row[f"{measure}-Mean"] = mean
            per_object[f"{sequence}_{object_id}"] = row

    global_row = {}
    for measure in ("J", "F"):
        table = np.asarray(stats[measure], dtype=np.float64).reshape(-1, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # no objects: NaN
            means = table.mean(axis=0) if len(table) else np.full(3, np.nan)
        for name, value in zip(("Mean", "Recall", "Decay"), means, strict=True):
            global_row[f"{measure}-{name}"] = float(value)
    global_row["J&F-Mean"] = (global_row["J-Mean"] + global_row["F-Mean"]) / 2
    return per_object, {column: global_row[column] for column in GLOBAL_COLUMNS}


def _fmt(value):
    return f"{value:.3f}"


def write_csvs(directory, per_object, global_row):
    """Write the two CSV files of the DAVIS evaluation into `directory` (created if needed).

    `global_results.csv`: header `J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay`
    and one row; `per-sequence_results.csv`: header `Sequence,J-Mean,F-Mean` and one row per
    object. Numbers are written with 3 decimals, like the official files.

    Args:
        directory: output folder.
        per_object, global_row: the two results of `summarize`.
    Returns:
        (global_path, per_object_path) of the written files.
    """
    os.makedirs(directory, exist_ok=True)
    global_path = os.path.join(directory, GLOBAL_CSV)
    per_object_path = os.path.join(directory, PER_OBJECT_CSV)
    with open(global_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([_fmt(global_row[column]) for column in GLOBAL_COLUMNS])
    with open(per_object_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PER_OBJECT_COLUMNS)
        for name, row in per_object.items():
            writer.writerow([name, _fmt(row["J-Mean"]), _fmt(row["F-Mean"])])
    return global_path, per_object_path


def format_table(per_object, global_row):
    """The global row and the per-object rows as an aligned text table, for printing.

    Args:
        per_object, global_row: the two results of `summarize`.
    Returns:
        str: a "Global results" block and a "Per-object results" block, 3 decimals.
    """
    width = max(len(column) for column in GLOBAL_COLUMNS)
    lines = ["Global results",
             "  ".join(column.rjust(width) for column in GLOBAL_COLUMNS),
             "  ".join(_fmt(global_row[column]).rjust(width) for column in GLOBAL_COLUMNS),
             "",
             "Per-object results"]
    name_width = max([len(PER_OBJECT_COLUMNS[0])] + [len(name) for name in per_object])
    lines.append(PER_OBJECT_COLUMNS[0].ljust(name_width) + "  "
                 + "  ".join(column.rjust(6) for column in PER_OBJECT_COLUMNS[1:]))
    for name, row in per_object.items():
        lines.append(name.ljust(name_width) + "  "
                     + "  ".join(_fmt(row[column]).rjust(6) for column in PER_OBJECT_COLUMNS[1:]))
    return "\n".join(lines)
