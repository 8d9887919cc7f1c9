"""User scribbles in the DAVIS interactive format: checking, rasterisation, synthesis.

The format the DAVIS interactive benchmark and its robot exchange::

    {"sequence": "bear",
     "scribbles": [                       # one list per frame of the video
         [],                              # frame 0: no scribble
         [{"path": [[x, y], ...],         # x, y normalised to [0, 1] (x across the width)
           "object_id": 1,                # 1..n an object, 0 the background
           "start_time": 0.0, "end_time": 1.2}],
         ...]}

Rasterisation follows the benchmark's convention: point (x, y) is pixel
(round(x·(W−1)), round(y·(H−1))), consecutive points are joined by Bresenham lines, later strokes
overwrite earlier ones, and pixels under no stroke are −1. `line_width` thickens strokes (a disk).

Synthesis (training and the robot user): the error regions of a prediction (pixels that should
be object k but are not, k = 0 the background) are thinned to a one-pixel skeleton
(`skimage.morphology.thin`, Guo & Hall) and a scribble follows it: a random walk along the
skeleton for training, the longest path of the skeleton for the robot.
"""
import collections
import itertools
import numbers

import numpy as np
from scipy import ndimage
from skimage import draw, measure, morphology

NO_SCRIBBLE = -1


class ScribbleError(ValueError):
    """Scribbles that are not in the DAVIS interactive format, or do not fit the video."""


# ------------------------------------------------------------------------------- checking


def check_scribbles(scribbles, num_frames=None, num_objects=None):
    """Validate scribbles (see the module docstring); returns the per-frame lists.

    Raises ScribbleError naming the frame and stroke for: a missing "scribbles" list, a frame
    count other than num_frames, a stroke without a path or with an empty one, points that are
    not [x, y] pairs in [0, 1], and object ids that are not integers in 0..num_objects.
    """
    if not isinstance(scribbles, dict) or not isinstance(scribbles.get("scribbles"), list):
        raise ScribbleError('scribbles must be a dict {"sequence": name, "scribbles": [[stroke, '
                            '...] per frame]} (the DAVIS interactive format); got '
                            f"{type(scribbles).__name__}"
                            + (f" with keys {sorted(scribbles)}" if isinstance(scribbles, dict)
                               else ""))
    frames = scribbles["scribbles"]
    if num_frames is not None and len(frames) != num_frames:
        raise ScribbleError(f'scribbles["scribbles"] has {len(frames)} frame entries but the '
                            f"video has {num_frames} frames (one list per frame, empty for "
                            "frames without scribbles)")
    for t, strokes in enumerate(frames):
        if not isinstance(strokes, list):
            raise ScribbleError(f"frame {t}: expected a list of strokes; got "
                                f"{type(strokes).__name__}")
        for s, stroke in enumerate(strokes):
            where = f"frame {t}, stroke {s}"
            if not isinstance(stroke, dict) or "path" not in stroke or "object_id" not in stroke:
                raise ScribbleError(f'{where}: a stroke is a dict with "path" and "object_id"')
            object_id = stroke["object_id"]
            if isinstance(object_id, bool) or not isinstance(object_id, numbers.Integral):
                raise ScribbleError(f"{where}: object_id must be an integer; got {object_id!r}")
            if object_id < 0 or (num_objects is not None and object_id > num_objects):
                known = "0 (background)" + (f" or 1..{num_objects}" if num_objects else "")
                raise ScribbleError(f"{where}: unknown object_id {object_id} (expected {known})")
            path = np.asarray(stroke["path"], dtype=np.float64) if len(stroke["path"]) else None
            if path is None:
                raise ScribbleError(f"{where}: empty path (a stroke needs at least one point)")
            if path.ndim != 2 or path.shape[1] != 2:
                raise ScribbleError(f"{where}: path must be a list of [x, y] points; got shape "
                                    f"{path.shape}")
            bad = ~np.isfinite(path).all(1) | (path < 0).any(1) | (path > 1).any(1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ScribbleError(f"{where}: point {i} {path[i].tolist()} is outside [0, 1] "
                                    "(coordinates are normalised by the frame's width and height)")
    return frames


def annotated_frames(scribbles):
    """Indices of the frames that carry at least one stroke."""
    return [t for t, strokes in enumerate(scribbles["scribbles"]) if strokes]


def object_ids(scribbles):
    """Object ids (0 = background) that appear in the scribbles, ascending."""
    return sorted({int(s["object_id"]) for strokes in scribbles["scribbles"] for s in strokes})


def empty_scribbles(num_frames, sequence=None):
    """Scribbles of `num_frames` frames without any stroke."""
    return {"sequence": sequence, "scribbles": [[] for _ in range(num_frames)]}


def fuse_scribbles(earlier, later):
    """Both rounds' strokes, frame by frame (later strokes drawn last)."""
    if earlier is None:
        return later
    if len(earlier["scribbles"]) != len(later["scribbles"]):
        raise ScribbleError(f"cannot fuse scribbles of {len(earlier['scribbles'])} and "
                            f"{len(later['scribbles'])} frames")
    return {"sequence": later.get("sequence", earlier.get("sequence")),
            "scribbles": [a + b for a, b in zip(earlier["scribbles"], later["scribbles"],
                                                strict=True)]}


# ------------------------------------------------------------------------------- rasterisation


def rasterize(strokes, height, width, line_width=1):
    """(H, W) int16 map of one frame's strokes: the stroke's object id (0 = background) under
    each stroke, NO_SCRIBBLE (−1) elsewhere; later strokes overwrite earlier ones."""
    if line_width < 1:
        raise ValueError(f"line_width must be >= 1 pixel; got {line_width}")
    canvas = np.full((height, width), NO_SCRIBBLE, dtype=np.int16)
    scale = np.array([width - 1, height - 1], dtype=np.float64)
    footprint = morphology.disk((line_width - 1) / 2) if line_width > 1 else None
    for stroke in strokes:
        points = np.rint(np.asarray(stroke["path"], dtype=np.float64) * scale).astype(np.int64)
        stroke_mask = np.zeros((height, width), dtype=bool)
        stroke_mask[points[0, 1], points[0, 0]] = True
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            rows, cols = draw.line(y0, x0, y1, x1)
            stroke_mask[rows, cols] = True
        if footprint is not None:
            stroke_mask = ndimage.binary_dilation(stroke_mask, structure=footprint)
        canvas[stroke_mask] = stroke["object_id"]
    return canvas


def scribble_channels(scribble_map, num_objects):
    """(n, 2, H, W) float32 positive and negative channels of objects 1..n from a rasterised map:
    positive where the object's strokes are, negative where the background's or another
    object's strokes are."""
    ids = np.arange(1, num_objects + 1).reshape(-1, 1, 1)
    drawn = scribble_map >= 0
    positive = scribble_map[None] == ids
    negative = drawn[None] & ~positive
    return np.stack([positive, negative], axis=1).astype(np.float32)


def paint_scribbles(object_probs, channels):
    """Object probabilities (..., n, H, W) with positive scribble pixels (channels
    (..., n, 2, H, W)) set to 1 and negative ones to 0: what the user drew is certain."""
    positive, negative = channels[..., 0, :, :], channels[..., 1, :, :]
    return object_probs * (1 - negative) * (1 - positive) + positive


def corrected_regions(labels, scribble_map, num_objects, reach=1.5):
    """(H, W) int16 map, like a rasterised one, of what the strokes of `scribble_map` say about
    the regions of the mask `labels` (H, W) they contradict: a stroke of id k crossing a region
    predicted as object j != k claims that region's part within `reach` times its half-width
    (the largest distance to its border under the stroke) of the stroke for k; NO_SCRIBBLE
    elsewhere. A stroke drawn along a mislabelled region claims all of it, a stroke on an
    overgrown part only that part; where strokes of several ids claim a pixel the nearest one
    wins. A stroke on background claims nothing (the objects' masks are 0 there)."""
    claimed = np.full(labels.shape, NO_SCRIBBLE, dtype=np.int16)
    drawn = scribble_map >= 0
    for j in range(1, num_objects + 1):
        region = labels == j
        conflict = drawn & region & (scribble_map != j)
        if not conflict.any():
            continue
        half_width = ndimage.distance_transform_edt(region)[conflict].max()
        components = measure.label(region, connectivity=2)
        touched = np.isin(components, np.unique(components[conflict]))
        distance, (rows, cols) = ndimage.distance_transform_edt(~conflict, return_indices=True)
        disputed = touched & (distance <= reach * half_width)
        claimed[disputed] = scribble_map[rows[disputed], cols[disputed]]
    return claimed


# ------------------------------------------------------------------------------- synthesis


def error_regions(gt_labels, pred_labels, ids):
    """{k: (H, W) bool} pixels that should be id k (0 = background) but are not."""
    return {k: (gt_labels == k) & (pred_labels != k) for k in ids}


def largest_component(region):
    """The largest 8-connected component of a boolean mask (all False if empty)."""
    labelled = measure.label(region, connectivity=2)
    if labelled.max() == 0:
        return np.zeros_like(region, dtype=bool)
    counts = np.bincount(labelled.ravel())
    counts[0] = 0
    return labelled == counts.argmax()


def _skeleton_graph(skeleton):
    """Adjacency of the skeleton's pixels (8-neighbourhood): {(r, c): [(r, c), ...]}."""
    pixels = set(map(tuple, np.argwhere(skeleton)))
    steps = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    return {p: [(p[0] + dr, p[1] + dc) for dr, dc in steps if (p[0] + dr, p[1] + dc) in pixels]
            for p in pixels}


def _farthest(graph, start):
    """(farthest pixel, parents) of a breadth-first search from start."""
    parents, queue, last = {start: None}, collections.deque([start]), start
    while queue:
        last = queue.popleft()
        for neighbour in graph[last]:
            if neighbour not in parents:
                parents[neighbour] = last
                queue.append(neighbour)
    return last, parents


def longest_skeleton_path(skeleton):
    """The pixels (row, col) of the skeleton's longest path (two breadth-first searches: exact
    on a tree, which a thinned region nearly is)."""
    graph = _skeleton_graph(skeleton)
    if not graph:
        return np.zeros((0, 2), dtype=np.int64)
    end, _ = _farthest(graph, min(graph))
    other, parents = _farthest(graph, end)
    path = [other]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return np.array(path, dtype=np.int64)


def random_walk_path(skeleton, rng, min_fraction=0.5):
    """Pixels of a random walk along the skeleton, never revisiting a pixel: from a random end
    (a pixel with one neighbour; any pixel of a loop), a random branch at every fork, until it
    is stuck; then cut to a random length of min_fraction..1 of the walk."""
    graph = _skeleton_graph(skeleton)
    if not graph:
        return np.zeros((0, 2), dtype=np.int64)
    nodes = sorted(graph)
    ends = [n for n in nodes if len(graph[n]) <= 1] or nodes
    current = ends[int(rng.integers(len(ends)))]
    path, seen = [current], {current}
    while True:
        options = [n for n in graph[current] if n not in seen]
        if not options:
            break
        current = options[int(rng.integers(len(options)))]
        path.append(current)
        seen.add(current)
    keep = max(1, int(round(len(path) * rng.uniform(min_fraction, 1.0))))
    return np.array(path[:keep], dtype=np.int64)


def region_scribble(region, object_id, rng=None, tolerance=1.0):
    """A stroke (DAVIS format) along the skeleton of a region: the longest path when rng is
    None (the robot), a random walk otherwise (training); None if the region is empty. The
    path is simplified (Douglas-Peucker, `tolerance` pixels) and normalised to [0, 1]."""
    if not region.any():
        return None
    skeleton = morphology.thin(region)
    pixels = longest_skeleton_path(skeleton) if rng is None else random_walk_path(skeleton, rng)
    height, width = region.shape
    scale = np.array([max(width - 1, 1), max(height - 1, 1)], dtype=np.float64)

    def stroke(points):
        path = np.clip(points[:, ::-1] / scale, 0, 1)  # (row, col) -> normalised (x, y)
        return {"path": path.round(6).tolist(), "object_id": int(object_id),
                "start_time": 0.0, "end_time": 0.0}
    full = stroke(pixels)
    if len(pixels) <= 2:
        return full
    simplified = stroke(measure.approximate_polygon(pixels, tolerance))
    # a simplified path may cut a corner out of a thin region: keep it only if it stays inside
    drawn = rasterize([simplified], height, width) >= 0
    return simplified if region[drawn].all() else full


def synthesize_strokes(gt_labels, pred_labels, num_objects, rng=None, min_pixels=None):
    """Strokes on one frame that correct a prediction: for every id k in 0..n (0 = background)
    whose error region (gt == k but pred != k) has a component of at least min_pixels pixels
    (default: 0.05% of the frame, at least 4), one stroke with object_id k along the skeleton
    of the largest component (see region_scribble)."""
    gt_labels, pred_labels = np.asarray(gt_labels), np.asarray(pred_labels)
    if gt_labels.shape != pred_labels.shape:
        raise ValueError(f"gt_labels {gt_labels.shape} and pred_labels {pred_labels.shape} "
                         "must have the same shape")
    if min_pixels is None:
        min_pixels = max(4, gt_labels.size // 2000)
    strokes = []
    for k, region in error_regions(gt_labels, pred_labels, range(num_objects + 1)).items():
        component = largest_component(region)
        if component.sum() < min_pixels:
            continue
        stroke = region_scribble(component, k, rng)
        if stroke is not None:
            strokes.append(stroke)
    return strokes
