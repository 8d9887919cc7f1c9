"""Segmenting from a mask on any frame, forwards and backwards (`stm segment --both-directions`).

    frames = FrameSequence("clip.mp4")                 # or a folder, a tensor, a list of frames
    for result in segment_both_directions(VideoSegmenter(model), frames, {40: mask}):
        save(result.index, result.labels)               # frames 40..T-1, then 39..0

The forward pass steps frames t, t+1, ..., T-1 from the mask on frame t; the backward pass
steps t, t-1, ..., 0 with the memory reset and seeded with frame t and its mask, exactly as a
forward run over the reversed frame list would (it is one: VideoSegmenter(reverse=True) only
counts video indices down). Masks on other frames add or reset objects in the pass that
reaches them. One segmenter serves both passes (reset between them), so the forward pass's
memory is freed before the backward pass starts.

FrameSequence gives random access: a folder reads the images it is asked for; a video file is
indexed once from its packets' timestamps (no decoding) and a range of frames is decoded from
the keyframe before it, backwards in chunks of chunk_frames (each decoded forwards, then
handed out in reverse), so a backward pass never holds the whole video.

The passes drive any segmenter with VideoSegmenter's reset/step/replay (the ONNX runner's
too): frames and masks go to it as numpy arrays or as given, probabilities come back as it
returns them; torch is not imported here.
"""
from __future__ import annotations

import collections.abc
import typing
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union
from pathlib import Path

from stm_model import io as video_io
from stm_model.inference.masks import labels_of

if TYPE_CHECKING:
    import torch

    from stm_model.inference.video_segmenter import VideoSegmenter

# frames: a FrameSequence, a (T, 3, H, W) tensor or a sequence of (3, H, W) tensors / Frames
Frames = Union["FrameSequence", "torch.Tensor", Sequence[Any]]
# masks: {frame index: (H, W) ids}, or a callable frame index -> ids or None
Masks = Union[Mapping[int, Any], Callable[[int], Any]]
# written: frame index -> the (H, W) labels an interrupted run wrote for it, or None
Written = Callable[[int], Any]


class FrameSequence:
    """Random access to the frames of a folder of images or a video file.

    FrameSequence(source) with source a folder, a video file or a video_io.FrameReader.
    len(frames), frames.names (the names FrameReader gives: image stems, or zero-padded
    indices for videos), frames[i] (a video_io.Frame), frames.range(start, stop, step)
    (Frames in Python range order, step 1 or -1, decoding only what is needed).

    Raises as video_io.FrameReader for a bad source; ValueError for a video whose packets
    carry no timestamps (it cannot be indexed; read it with FrameReader).
    """

    def __init__(self, source: Union[str, Path, video_io.FrameReader], *,
                 chunk_frames: int = 32) -> None:
        self.reader = source if isinstance(source, video_io.FrameReader) else \
            video_io.FrameReader(source)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1; got {chunk_frames}")
        self.chunk_frames = chunk_frames
        self.source = Path(self.reader.source)
        self._pts = None
        if self.reader.is_video:
            self._pts = self._index_video()
            self._index_of = {pts: index for index, pts in enumerate(self._pts)}
            self.names = [f"{index:05d}" for index in range(len(self._pts))]
        else:
            assert self.reader.names is not None  # a folder's frame names
            self.names = list(self.reader.names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        index = self._checked_index(index)
        return next(iter(self.range(index, index + 1)))

    def range(self, start: int, stop: int, step: int = 1) -> Iterator[video_io.Frame]:
        """Frames start, start + step, ... up to (not including) stop, as Python's range;
        step is 1 or -1."""
        if step not in (1, -1):
            raise ValueError(f"step must be 1 or -1; got {step}")
        indices = range(start, stop, step)
        if not indices:
            return
        first, last = min(indices), max(indices)
        self._checked_index(first), self._checked_index(last)
        if not self.reader.is_video:
            assert self.reader.paths is not None
            for index in indices:
                yield video_io.Frame(self.names[index], index,
                                     video_io.load_image(self.reader.paths[index]))
            return
        if step == 1:
            yield from self._decode(first, last + 1)
            return
        high = last + 1
        while high > first:  # backwards: chunks decoded forwards, handed out in reverse
            low = max(first, high - self.chunk_frames)
            yield from reversed(list(self._decode(low, high)))
            high = low

    def _checked_index(self, index):
        if isinstance(index, bool) or not isinstance(index, int) or \
                not 0 <= index < len(self):
            raise IndexError(f"frame index {index!r} is outside [0, {len(self)}) of "
                             f"{self.source}")
        return index

    def _index_video(self):
        """Presentation timestamps of the frames, in order, from the packets (no decoding)."""
        container = self.reader._open_video()
        try:
            stream = container.streams.video[0]
            stamps = []
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's flush packet
                if packet.pts is None:
                    raise ValueError(f"{self.source}: packets without timestamps; its frames "
                                     "cannot be accessed at random (use FrameReader)")
                stamps.append(packet.pts)
        finally:
            container.close()
        if not stamps:
            raise ValueError(f"{self.source} has no video frames")
        return sorted(stamps)

    def _decode(self, start, stop):
        """Frames [start, stop) of the video: a seek to the keyframe at or before frame start,
        then decoding forwards; frames are identified by their timestamps."""
        for seek in (True, False):  # without the seek if the demuxer lands past the frame
            container = self.reader._open_video()
            try:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                if seek and start > 0:
                    container.seek(self._pts[start], stream=stream, backward=True,
                                   any_frame=False)
                expected = start
                for frame in _decoded(container, stream, self.source, expected):
                    index = self._index_of.get(frame.pts)
                    if index is None or index < expected:
                        continue  # before the range (decoded from the keyframe)
                    if index > expected:
                        break  # a frame was skipped: the seek overshot
                    if index >= stop:
                        return
                    yield video_io.Frame(self.names[index], index,
                                         frame.to_ndarray(format="rgb24"))
                    expected += 1
                    if expected == stop:
                        return
            finally:
                container.close()
            if expected == stop:
                return
            if expected > start or not seek:
                break  # frames already handed out, or decoding from the start failed too
        raise ValueError(f"{self.source}: could not decode frames {expected}..{stop - 1} "
                         "(timestamps out of order?)")

    def __repr__(self):
        return f"FrameSequence({str(self.source)!r}, {len(self)} frames)"


def _decoded(container, stream, source, near):
    """container.decode(stream), with decoding errors as video_io.FrameReadError (a
    ValueError) naming the video."""
    import av
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames, None)
        except av.FFmpegError as error:
            raise video_io.FrameReadError(f"cannot decode {source} near frame {near:05d}: "
                                          f"{error}") from error
        if frame is None:
            return
        yield frame


class FrameResult(typing.NamedTuple):
    """One segmented frame: its video index, the frame as the source gave it (a
    video_io.Frame for a FrameSequence), the (K, H, W) probabilities and the object ids of
    their channels 1..K-1 (as at that step)."""
    index: int  # type: ignore[assignment]  # shadows tuple.index, as a frame index reads best
    frame: typing.Any
    probs: torch.Tensor  # a numpy array where the segmenter is the ONNX runner
    object_ids: list

    @property
    def labels(self) -> torch.Tensor:
        """(H, W) int64 object ids of the most probable channel (an array where probs is
        one)."""
        return labels_of(self.probs, self.object_ids)


def segment_forward(segmenter: VideoSegmenter, frames: Frames, masks: Masks,
                    start: Optional[int] = None, stop: Optional[int] = None, *,
                    written: Optional[Written] = None) -> Iterator[FrameResult]:
    """Segment frames start, start + 1, ..., stop - 1 (default: to the end) from the mask on
    frame start (segmenter reset to start_frame=start); yields FrameResult per frame.

    frames: a FrameSequence, a (T, 3, H, W) tensor, or a sequence of (3, H, W) tensors (or
    video_io.Frames). masks: {frame index: (H, W) integer ids} or a callable index -> ids or
    None; start defaults to the smallest index of a mask mapping. written: resume an
    interrupted run: a callable index -> the labels it wrote for that frame, or None; the
    frames from start on that have labels are replayed from them (VideoSegmenter.replay: into
    the memory, not segmented, not yielded) up to the first without, where segmenting goes on.
    """
    start = _start(masks, start, frames)
    stop = len(frames) if stop is None else stop
    segmenter.reset(start_frame=start)
    yield from _run(segmenter, frames, masks, range(start, stop), written)


def segment_backward(segmenter: VideoSegmenter, frames: Frames, masks: Masks,
                     start: Optional[int] = None, *,
                     written: Optional[Written] = None) -> Iterator[FrameResult]:
    """Segment frames start - 1, ..., 0 backwards from a memory seeded with frame start and
    its mask (segmenter reset to start_frame=start, reverse=True): the same as a forward run
    over the reversed frames from start's mask. Yields FrameResult per frame (not frame start
    itself); arguments as segment_forward (written: frame start, then start - 1, ...)."""
    start = _start(masks, start, frames)
    segmenter.reset(start_frame=start, reverse=True)
    results = _run(segmenter, frames, masks, range(start, -1, -1), written)
    if written is None or written(start) is None:
        next(results)  # frame start: the given mask, segmented by the forward pass
    yield from results


def segment_both_directions(segmenter: VideoSegmenter, frames: Frames, masks: Masks,
                            start: Optional[int] = None, stop: Optional[int] = None, *,
                            written: Optional[Written] = None) -> Iterator[FrameResult]:
    """Frames start..stop-1 (segment_forward; stop defaults to the end), then start-1..0
    (segment_backward), with one segmenter reset between the passes; yields FrameResult per
    frame, every frame once. Call-time state (segmenter.object_ids, memory) is the current
    pass's. written: as segment_forward's, for each pass; a pass whose every frame has
    labels is skipped."""
    start = _start(masks, start, frames)
    stop = len(frames) if stop is None else stop
    if written is None or any(written(index) is None for index in range(start, stop)):
        yield from segment_forward(segmenter, frames, masks, start, stop, written=written)
    if start > 0:
        yield from segment_backward(segmenter, frames, masks, start, written=written)


def _start(masks, start, frames):
    if start is None:
        if not isinstance(masks, collections.abc.Mapping) or not masks:
            raise ValueError("start is needed unless masks is a non-empty {frame index: mask} "
                             "mapping (start: its smallest index)")
        start = min(masks)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(frames):
        raise ValueError(f"start must be a frame index in [0, {len(frames)}); got {start!r}")
    return start


def _mask(masks, index):
    """The mask of frame index, as given (the segmenter converts it), or None."""
    return masks(index) if callable(masks) else masks.get(index)


def _frames(frames, indices):
    if isinstance(frames, FrameSequence):
        return frames.range(indices.start, indices.stop, indices.step)
    return (frames[index] for index in indices)


def _run(segmenter, frames, masks, indices, written=None):
    replaying = written is not None
    for index, frame in zip(indices, _frames(frames, indices), strict=True):
        pixels = frame.array if isinstance(frame, video_io.Frame) else frame
        mask = _mask(masks, index)
        if replaying:
            labels = written(index)
            if labels is not None:
                segmenter.replay(pixels, labels, annotated=mask is not None)
                continue
            replaying = False
        probs = segmenter.step(pixels, mask=mask)
        yield FrameResult(index, frame, probs, list(segmenter.object_ids))
