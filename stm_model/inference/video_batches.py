"""Segmenting a stream of videos K at a time with a BatchSegmenter.

    jobs = [VideoJob("bear", frames_of_bear), VideoJob("camel", frames_of_camel), ...]
    for result in segment_videos(BatchSegmenter(model), jobs, batch_size=4):
        save(result.video, result.name, result.labels)      # result.last: the video's end

Up to batch_size videos run together; when one ends, the next job joins the batch at the next
step. A batch holds videos of one frame size: a job of another size waits until the running
videos have ended (order jobs by size to keep batches full). Each job's frames are read one
step ahead (to know which frame is a video's last) and only then: videos are never loaded
whole.
"""
import collections
import dataclasses
from typing import Any, Iterable, Optional

import torch


@dataclasses.dataclass
class FrameInput:
    """One input frame: its name (for the output), (3, H, W) float RGB in [0, 1], and an
    optional integer mask (required on a video's first frame) of the frame's size or of the
    size it was shrunk from (see BatchSegmenter.step)."""
    name: str
    frame: torch.Tensor
    mask: Optional[torch.Tensor] = None


@dataclasses.dataclass
class VideoJob:
    """A video to segment: a unique name and an iterable of FrameInput (read lazily)."""
    name: Any
    frames: Iterable


@dataclasses.dataclass
class SegmentedFrame:
    """One segmented frame: probabilities (K, H, W) (background first) and labels (H, W) on
    the segmenter's device; object_ids[k-1] is the id of channel k; memory_frames: the
    video's memory after this frame's read; last marks the video's final frame."""
    video: Any
    name: str
    index: int
    probs: torch.Tensor
    labels: torch.Tensor
    object_ids: list
    memory_frames: int
    last: bool


@dataclasses.dataclass
class _Running:
    frames: Any          # iterator over the job's FrameInputs
    current: FrameInput  # the frame the next step segments
    index: int = 0

    @property
    def size(self):
        return tuple(self.current.frame.shape[-2:])


def segment_videos(segmenter, jobs, batch_size):
    """Segment every job, batch_size videos at a time; yields a SegmentedFrame per frame, in
    step order (within a step, in the order the videos joined). Jobs with no frames are
    skipped. ValueError for a batch_size below 1 or a repeated video name."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    jobs = iter(jobs)
    waiting = collections.deque()  # (name, _Running) of another frame size than the batch
    running, seen = {}, set()
    while True:
        _admit(running, waiting, jobs, seen, int(batch_size))
        if not running:
            return
        probs = segmenter.step({name: video.current.frame for name, video in running.items()},
                               {name: video.current.mask for name, video in running.items()
                                if video.current.mask is not None})
        for name in list(running):
            video = running[name]
            following = next(video.frames, None)
            yield SegmentedFrame(name, video.current.name, video.index, probs[name],
                                 segmenter.labels(name, probs[name]),
                                 segmenter.object_ids(name), segmenter.memory_frames(name),
                                 last=following is None)
            if following is None:
                segmenter.finish(name)
                del running[name]
            else:
                video.current, video.index = following, video.index + 1


def _admit(running, waiting, jobs, seen, batch_size):
    """Fill the batch: first waiting jobs of the batch's frame size (any size when the batch
    is empty), then new jobs; a new job of another size waits (at most batch_size wait)."""
    def size():
        return next(iter(running.values())).size if running else None

    for name, video in list(waiting):
        if len(running) >= batch_size:
            return
        if size() in (None, video.size):
            waiting.remove((name, video))
            running[name] = video
    while len(running) < batch_size and len(waiting) < batch_size:
        job = next(jobs, None)
        if job is None:
            return
        if job.name in seen:
            raise ValueError(f"jobs: video name {job.name!r} is used twice")
        seen.add(job.name)
        frames = iter(job.frames)
        first = next(frames, None)
        if first is None:
            continue
        video = _Running(frames, first)
        if size() in (None, video.size):
            running[job.name] = video
        else:
            waiting.append((job.name, video))
