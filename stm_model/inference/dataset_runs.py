"""Segmenting a DAVIS-format dataset: every sequence, K at a time, resumable.

    sequences = list_sequences("DAVIS", resolution="480p")            # masks="first"
    todo, done = split_complete(sequences, "out")
    summaries = segment_sequences(BatchSegmenter(model), todo, "out", batch_size=4)

Layout: <root>/JPEGImages/<resolution>/<sequence>/<frame>.jpg with annotations in
<root>/Annotations/<resolution>/<sequence>/<frame>.png. Inputs: masks="first" (the DAVIS
semi-supervised protocol) gives the segmenter the first frame's annotation only;
masks="all" gives it every annotation PNG (objects that enter later are annotated on their
first frame, as in YouTube-VOS). Output: <output>/<sequence>/<frame>.png palette masks at the
frames' size (the layout `stm eval` reads).

Resumable and atomic: a sequence's masks are written into <output>/.incomplete/<sequence>
and the folder is renamed to <output>/<sequence> once every frame is written, so a sequence
folder in <output> is always complete; split_complete skips those and an interrupted
sequence is redone from its first frame.

Frames are decoded (and resized with size=(h, w)) by a thread pool a few frames ahead of the
segmenter, and masks are encoded and written by the same pool.
"""
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from stm_model import io as video_io
from stm_model.inference.masks import check_first_mask, check_object_count, labels_of, object_ids
from stm_model.inference.options import MASK_POLICIES
from stm_model.inference.resize import checked_max_internal_size, internal_size
from stm_model.inference.video_batches import FrameInput, VideoJob, segment_videos

INCOMPLETE = ".incomplete"


@dataclasses.dataclass
class Sequence:
    """A DAVIS-format sequence: frame images in order, the annotations given as input
    ({frame name: PNG}), and the frames' (height, width)."""
    name: str
    frames: list
    masks: dict
    size: tuple

    @property
    def num_frames(self):
        """Frames of the sequence."""
        return len(self.frames)


def list_sequences(root, resolution="480p", names=None, masks="first"):
    """The sequences of a DAVIS-format root (all, sorted by name, or `names` in that order).

    FileNotFoundError for a missing folder, a sequence without frames or without an
    annotation of its first frame; ValueError for an unknown masks policy."""
    if masks not in MASK_POLICIES:
        raise ValueError(f"masks must be one of {MASK_POLICIES}; got {masks!r}")
    root = pathlib.Path(root)
    images, annotations = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    for folder in (images, annotations):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: expected a DAVIS-format root "
                                    f"(JPEGImages/{resolution}/<sequence>, "
                                    f"Annotations/{resolution}/<sequence>)")
    available = sorted(p.name for p in images.iterdir() if p.is_dir())
    names = list(names) if names else available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise FileNotFoundError(f"sequences {unknown} are not in {images}")
    if not names:
        raise FileNotFoundError(f"no sequences in {images}")
    sequences = []
    for name in names:
        frames = video_io.list_frames(images / name)
        folder, given = annotations / name, {}
        if folder.is_dir() and any(folder.glob("*.png")):
            given = video_io.masks_for_frames([p.stem for p in frames], folder, strict=False)
        first = frames[0].stem
        if first not in given:
            raise FileNotFoundError(f"sequence {name}: no annotation of its first frame "
                                    f"({annotations / name / (first + '.png')})")
        if masks == "first":
            given = {first: given[first]}
        with Image.open(frames[0]) as image:
            size = (image.height, image.width)
        sequences.append(Sequence(name, frames, given, size))
    return sequences


def split_complete(sequences, output):
    """(to do, complete): sequences whose folder exists in output are complete."""
    output = pathlib.Path(output)
    done = [s for s in sequences if (output / s.name).is_dir()]
    return [s for s in sequences if not (output / s.name).is_dir()], done


def _load_frame(sequence, index, size):
    """FrameInput of frame `index`, resized to size=(h, w) when given (bilinear, antialiased).
    Its mask stays at the frame's size when the frame is shrunk (BatchSegmenter merges it
    there, as a single run does, so an annotated frame is written as given) and is resized
    with it (nearest neighbour) when it is enlarged. A mask within 1% of the frame's size is
    resized to it first, with a note (fit_mask_size)."""
    path = sequence.frames[index]
    image = video_io.load_image(path)
    if image.shape[:2] != tuple(sequence.size):
        raise ValueError(f"sequence {sequence.name}: frame {path.name} is "
                         f"{image.shape[1]}x{image.shape[0]} (WxH) but its first frame is "
                         f"{sequence.size[1]}x{sequence.size[0]}")
    frame = video_io.to_tensor(image)
    mask = None
    if path.stem in sequence.masks:
        given = sequence.masks[path.stem]
        labels, note = video_io.fit_mask_size(video_io.read_mask(given), image.shape[:2],
                                              mask_name=f"{sequence.name}/{given.name}")
        if note:
            tqdm.write(f"note: {note}", file=sys.stderr)
        mask = torch.from_numpy(labels)
        if index == 0:
            check_first_mask(mask, [], name=sequence.masks[path.stem])
    if size is not None and tuple(size) != tuple(sequence.size):
        frame = F.interpolate(frame[None], size=tuple(size), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        if mask is not None and (size[0] > sequence.size[0] or size[1] > sequence.size[1]):
            mask = F.interpolate(mask[None, None].float(), size=tuple(size),  # enlarged
                                 mode="nearest")[0, 0].long()
    return FrameInput(path.stem, frame, mask)


def _read_ahead(sequence, size, pool, depth=3, max_objects=None):
    """The sequence's FrameInputs, decoded by `pool` up to `depth` frames ahead; ValueError
    once its masks have given more than max_objects object ids (None: no limit)."""
    seen_ids = set()
    pending = collections.deque()
    indices = iter(range(sequence.num_frames))
    for index in indices:
        pending.append(pool.submit(_load_frame, sequence, index, size))
        if len(pending) >= depth:
            break
    while pending:
        frame = pending.popleft().result()
        index = next(indices, None)
        if index is not None:
            pending.append(pool.submit(_load_frame, sequence, index, size))
        if frame.mask is not None:
            seen_ids.update(object_ids(frame.mask))
            check_object_count(seen_ids, max_objects, name=sequence.masks[frame.name])
        yield frame


def _output_labels(result, size):
    """(H, W) labels at the frames' size: the probabilities are upsampled (bilinear) when the
    segmenter ran at another size (a frame given a mask comes at the mask's size already)."""
    if tuple(result.labels.shape) == tuple(size):
        return result.labels
    probs = F.interpolate(result.probs[None].float(), size=tuple(size), mode="bilinear",
                          align_corners=False)[0]
    return labels_of(probs, result.object_ids)


class _SequenceWriter:
    """Masks of one sequence written into <output>/.incomplete/<name>, moved to
    <output>/<name> by finish() once every write is done."""

    def __init__(self, output, name, pool):
        self.target = pathlib.Path(output) / name
        self.folder = pathlib.Path(output) / INCOMPLETE / name
        if self.folder.exists():  # left by an interrupted run: redo the sequence
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.pool, self.writes = pool, []

    def add(self, name, labels):
        self.writes.append(self.pool.submit(video_io.write_mask, self.folder / f"{name}.png",
                                            labels.cpu().numpy()))

    def finish(self):
        for write in self.writes:
            write.result()
        os.replace(self.folder, self.target)


def segment_sequences(segmenter, sequences, output, batch_size, *, size=None,
                      max_internal_size=None, workers=4, show_progress=True, rank=0,
                      max_objects=None):
    """Segment `sequences` batch_size at a time with a BatchSegmenter and write their masks
    to output (see the module docstring). size=(h, w): segment every sequence at that size;
    max_internal_size: segment a sequence whose frames' shorter side is larger resized to it
    (as VideoSegmenter's; the two exclude each other). Masks are written at the frames' size.
    A sequence whose first mask holds no object, or whose masks
    give more than max_objects ids (None: no limit), raises ValueError naming the mask.
    Returns one summary dict per sequence (name, frames, objects, size, segmented_size,
    memory_frames, seconds from its first to its last frame, rank)."""
    output = pathlib.Path(output)
    if size is not None and max_internal_size is not None:
        raise ValueError("give size or max_internal_size, not both")
    max_internal_size = checked_max_internal_size(max_internal_size)
    sequences = sorted(sequences, key=lambda s: (s.size, -s.num_frames, s.name))
    by_name = {s.name: s for s in sequences}
    summaries, writers, started = [], {}, {}
    bars = (tqdm(total=len(sequences), unit="seq", desc="sequences", position=0,
                 dynamic_ncols=True, disable=not show_progress),
            tqdm(total=sum(s.num_frames for s in sequences), unit="frame", desc="frames",
                 position=1, dynamic_ncols=True, disable=not show_progress))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        jobs = (VideoJob(s.name, _read_ahead(s, size or internal_size(s.size, max_internal_size),
                                             pool, max_objects=max_objects))
                for s in sequences)
        for result in segment_videos(segmenter, jobs, batch_size):
            sequence = by_name[result.video]
            if result.index == 0:
                writers[sequence.name] = _SequenceWriter(output, sequence.name, pool)
                started[sequence.name] = time.perf_counter()
                bars[0].set_postfix_str(sequence.name)
            writers[sequence.name].add(result.name, _output_labels(result, sequence.size))
            bars[1].update(1)
            if result.last:
                writers.pop(sequence.name).finish()
                summaries.append(dict(
                    name=sequence.name, frames=result.index + 1,
                    objects=len(result.object_ids), size=list(sequence.size),
                    segmented_size=list(result.probs.shape[-2:]),
                    memory_frames=result.memory_frames,
                    seconds=time.perf_counter() - started.pop(sequence.name), rank=rank))
                bars[0].update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for bar in bars:
            bar.close()
    return summaries


def remove_incomplete_folder(output):
    """Remove <output>/.incomplete when it is empty (call once every process has finished)."""
    try:
        (pathlib.Path(output) / INCOMPLETE).rmdir()
    except OSError:  # absent, or holds an interrupted sequence
        pass


def balanced_split(sequences, parts):
    """`parts` lists of sequences with about equal frame counts (longest first, each to the
    part with the fewest frames so far; deterministic)."""
    shares, totals = [[] for _ in range(parts)], [0] * parts
    for sequence in sorted(sequences, key=lambda s: (-s.num_frames, s.name)):
        part = min(range(parts), key=lambda p: (totals[p], p))
        shares[part].append(sequence)
        totals[part] += sequence.num_frames
    return shares


def format_report(summaries, ranks):
    """Table per rank (device, sequences, frames, seconds, fps, peak memory) with a total row;
    `ranks` are the per-rank dicts (rank, device, seconds, peak_memory_bytes)."""
    rows = ["| rank | device | sequences | frames | seconds | fps | peak memory MiB |",
            "|---|---|---|---|---|---|---|"]
    for info in ranks:
        mine = [s for s in summaries if s.get("rank") == info["rank"]]
        frames = sum(s["frames"] for s in mine)
        rows.append(f"| {info['rank']} | {info['device']} | {len(mine)} | {frames} | "
                    f"{info['seconds']:.1f} | {_fps(frames, info['seconds'])} | "
                    f"{info['peak_memory_bytes'] / 2**20:.0f} |")
    frames = sum(s["frames"] for s in summaries)
    wall = max((info["seconds"] for info in ranks), default=0.0)
    peak = max((info["peak_memory_bytes"] for info in ranks), default=0)
    rows.append(f"| all | | {len(summaries)} | {frames} | {wall:.1f} | {_fps(frames, wall)} | "
                f"{peak / 2**20:.0f} (max) |")
    return "\n".join(rows)


def _fps(frames, seconds):
    return f"{frames / seconds:.2f}" if seconds > 0 else "-"
