"""InteractiveSession.interact(progress=...): frames done of total, and stopping a round."""
import pytest
import torch

from helpers import synthetic_video
from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model
from stm_model.interactive.session import InteractiveSession


def _scribbles(frames, frame=0):
    strokes = [[] for _ in range(frames)]
    strokes[frame] = [{"path": [[0.2, 0.3], [0.4, 0.5]], "object_id": 1}]
    return {"scribbles": strokes}


def test_progress_counts_the_frames_of_a_round_and_can_stop_it():
    model = load_small_model(SMALL_INTERACTIVE_WEIGHTS)
    frames, _ = synthetic_video(7, size=(48, 64), seed=2)
    calls = []
    session = InteractiveSession(model, frames, 1, batch_size=3)
    labels = session.interact(_scribbles(7), progress=lambda done, total: calls.append(
        (done, total)))
    assert calls == [(0, 7), (3, 7), (6, 7), (7, 7)]
    calls.clear()  # propagating: the scribbled frame, then 1-3, 4-5 (the memory frame at
    # mem_every 5 ends a block), then 6
    InteractiveSession(model, frames, 1, batch_size=3, mem_every=5).interact(
        _scribbles(7), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 7), (1, 7), (4, 7), (6, 7), (7, 7)]
    assert torch.equal(labels, InteractiveSession(model, frames, 1, batch_size=3).interact(
        _scribbles(7)))

    class Stop(Exception):
        pass

    def stop_after_first_batch(done, total):
        if done >= 3:
            raise Stop
    with pytest.raises(Stop):
        session.interact(_scribbles(7, frame=4), progress=stop_after_first_batch)
    assert len(session.rounds) == 1  # the stopped round is not recorded
