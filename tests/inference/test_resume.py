"""Resuming an interrupted run: VideoSegmenter.replay and the directions' `written`."""
import numpy as np
import pytest
import torch

from helpers import synthetic_video
from stm_model import VideoSegmenter
from stm_model.demo import load_small_model
from stm_model.inference.directions import segment_both_directions, segment_forward


@pytest.fixture(scope="module")
def model():
    return load_small_model()


@pytest.fixture(scope="module")
def video():
    frames, labels = synthetic_video(14, size=(64, 96), seed=5, objects=2)
    masks = {0: torch.from_numpy(labels[0]).clamp(max=1),  # object 2 enters at frame 4
             4: torch.from_numpy(np.where(labels[4] == 2, 2, 0))}
    return frames, masks


def _uninterrupted(model, video, **options):
    frames, masks = video
    return [r.labels for r in segment_forward(VideoSegmenter(model, **options), frames, masks)]


def _encodings(segmenter, monkeypatch):
    """Count the memory encodings of a segmenter."""
    calls = []
    real = type(segmenter)._memorise
    monkeypatch.setattr(segmenter, "_memorise", lambda pending: calls.append(
        pending.frame_index) or real(segmenter, pending))
    return calls


@pytest.mark.parametrize("options", [dict(mem_every=3), dict(mem_every=2, max_memory_frames=3),
                                     dict(mem_every=3, max_internal_size=32)])
@pytest.mark.parametrize("cut", [1, 6, 9])
def test_replaying_the_written_masks_rebuilds_the_runs_memory(model, video, options, cut,
                                                              monkeypatch):
    """Frames 0..cut-1 replayed from the labels an uninterrupted run gave them: the memory
    holds the frames that run held (slots, objects), only the kept frames are encoded, and
    the frames after the cut get that run's masks (up to the soft probabilities the run
    memorised where a replay has one-hot labels)."""
    frames, masks = video
    expected = _uninterrupted(model, video, **options)
    reference = VideoSegmenter(model, **options)
    steps = segment_forward(reference, frames, masks)
    for _ in range(cut + 1):  # up to frame cut: its memory is the resumed run's at that step
        result = next(steps)
    resumed = VideoSegmenter(model, **options)
    encodings = _encodings(resumed, monkeypatch)
    results = segment_forward(resumed, frames, masks,
                              written=lambda t: expected[t] if t < cut else None)
    first = next(results)
    assert first.index == cut
    assert resumed.object_ids == reference.object_ids == result.object_ids
    assert [bank.slot_frames for bank in resumed.banks] == \
        [bank.slot_frames for bank in reference.banks]
    kept = {t for t in range(cut - 1) if t % options["mem_every"] == 0 or t in masks}
    assert sorted(encodings) == sorted(kept | {cut - 1})  # the kept ones, and frame cut - 1
    later = [first.labels] + [r.labels for r in results]
    assert len(later) == len(frames) - cut
    agreement = np.mean([(a == b).float().mean().item()
                         for a, b in zip(later, expected[cut:], strict=True)])
    assert agreement > 0.99, agreement


def test_replay_refuses_ids_that_came_with_no_mask(model, video):
    frames, masks = video
    segmenter = VideoSegmenter(model)
    segmenter.replay(frames[0], masks[0], annotated=True)
    with pytest.raises(ValueError, match=r"hold ids \[2\] that are not objects"):
        segmenter.replay(frames[1], masks[4])
    with pytest.raises(ValueError, match="replay needs the labels"):
        segmenter.replay(frames[1], None)
    with pytest.raises(ValueError, match="has no object"):
        VideoSegmenter(model).replay(frames[0], torch.zeros(64, 96, dtype=torch.long),
                                     annotated=True)


def test_both_directions_resume_in_the_backward_pass(model):
    """Interrupted in the backward pass: the forward pass (all written) is skipped, the
    backward one replays its written frames and goes on; every frame is yielded once."""
    frames, labels = synthetic_video(10, size=(64, 96), seed=6, objects=2)
    masks = {5: torch.from_numpy(labels[5])}
    full = {r.index: r.labels for r in segment_both_directions(
        VideoSegmenter(model, mem_every=2), frames, masks)}
    assert sorted(full) == list(range(10))
    written = {t: full[t] for t in (5, 6, 7, 8, 9, 4, 3)}  # cut after frame 3
    resumed = {r.index: r.labels for r in segment_both_directions(
        VideoSegmenter(model, mem_every=2), frames, masks, written=written.get)}
    assert sorted(resumed) == [0, 1, 2]
    for t in resumed:
        assert (resumed[t] == full[t]).float().mean() > 0.99
