"""Interactive STM: the session's rounds, memory and cache; the robot user and its scores;
interactive training; `stm interactive-eval`."""
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video, write_davis_folder
from stm_model import STM, STMConfig
from stm_model.interactive import scribbles as S
from stm_model.cli import main as stm_main
from stm_model.training.clip_forward import ClipForward
from stm_model.training.datasets import InteractiveClips, SyntheticClips, collate_clips
from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model
from stm_model.commands.common import DEFAULT_INTERACTIVE_CHECKPOINT
from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint
from stm_model.interactive.session import InteractiveSession, as_interactive, merge_weights
from stm_model.interactive.robot import (RobotUser, evaluate_interactive, jf_scores,
                                        time_scores)
from stm_model.inference.resize import resize_frame
from stm_model.training.loop import TrainConfig, clip_loss, build_dataset, build_model


@pytest.fixture(scope="module")
def small_interactive():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return as_interactive(load_small_model())


def _round(gt, predicted, frame, num_objects):
    scribbles = S.empty_scribbles(len(gt))
    scribbles["scribbles"][frame] = S.synthesize_strokes(gt[frame], predicted[frame],
                                                         num_objects)
    return scribbles


def test_rounds_grow_the_memory_reuse_the_query_cache_and_touch_only_their_frames(
        small_interactive):
    frames, gt = synthetic_video(6)
    session = InteractiveSession(small_interactive, frames, 2, batch_size=4)
    calls = []
    encode_query = session.model.encode_query
    session.model.encode_query = lambda x: calls.append(len(x)) or encode_query(x)
    try:
        labels = session.interact(_round(gt, np.zeros_like(gt), 2, 2))
        assert labels.shape == (6, 64, 64) and labels.dtype == torch.int64
        assert session.memory_frame_indices == [2] and sum(calls) == 6
        assert session.rounds[-1].encoded_queries == 6
        slot_of_2 = session.bank.keys[:, :, 0].clone()
        first_probs = session.probs.clone()

        session.interact(_round(gt, labels.numpy(), 4, 2))
        assert session.memory_frame_indices == [2, 4] and session.memory_frames == 2
        # merged: frames up to the earlier annotation keep their masks, frame 3 is half new
        assert torch.equal(session.probs[:3], first_probs[:3])
        assert not torch.equal(session.probs[3:], first_probs[3:])
        assert sum(calls) == 6 and session.rounds[-1].encoded_queries == 0  # cached
        assert torch.equal(session.bank.keys[:, :, 0], slot_of_2)  # frame 2 untouched
        slot_of_4 = session.bank.keys[:, :, 1].clone()

        again = S.empty_scribbles(6)
        again["scribbles"][2] = [{"path": [[0.1, 0.1], [0.3, 0.1]], "object_id": 0}]
        labels = session.interact(again)
        assert session.memory_frame_indices == [2, 4]  # frame 2 replaced, not added
        assert not torch.equal(session.bank.keys[:, :, 0], slot_of_2)
        assert torch.equal(session.bank.keys[:, :, 1], slot_of_4)
        assert sum(calls) == 6
    finally:
        session.model.encode_query = encode_query
    # the drawn pixels carry their stroke's label; earlier strokes on frame 2 are kept
    drawn = session.scribble_maps[2]
    assert (drawn == 0).any() and (drawn > 0).any()
    np.testing.assert_array_equal(labels[2].numpy()[drawn >= 0], drawn[drawn >= 0])


def test_merge_weights_fall_towards_earlier_annotations():
    np.testing.assert_array_equal(merge_weights(5, [2], set()), np.ones(5))  # first round
    np.testing.assert_allclose(merge_weights(11, [5], {0, 10}),
                               [0, .2, .4, .6, .8, 1, .8, .6, .4, .2, 0])
    np.testing.assert_allclose(merge_weights(8, [1], {5}), [1, 1, .75, .5, .25, 0, 0, 0])
    # two new annotations: the larger weight; a frame annotated again is not "earlier"
    np.testing.assert_allclose(merge_weights(9, [2, 6], {4}), [1, 1, 1, .5, 0, .5, 1, 1, 1])
    weights = merge_weights(6, [3], set())
    assert np.isfinite(weights).all()


def test_unmerged_rounds_re_segment_every_frame(small_interactive):
    frames, gt = synthetic_video(6)
    merged, unmerged = (InteractiveSession(small_interactive, frames, 2, batch_size=4,
                                           merge=merge) for merge in (True, False))
    for session in (merged, unmerged):
        labels = session.interact(_round(gt, np.zeros_like(gt), 1, 2))
        labels = session.interact(_round(gt, labels.numpy(), 4, 2))
    torch.testing.assert_close(merged.probs[4:], unmerged.probs[4:])  # no earlier one beyond
    assert not torch.equal(merged.probs[0], unmerged.probs[0])
    # the same frame annotated twice blends old and new masks without NaNs
    merged.interact(_round(gt, labels.numpy(), 4, 2))
    assert torch.isfinite(merged.probs).all()


def test_a_max_internal_size_session_works_small_and_answers_at_the_input_size(
        small_interactive):
    """max_internal_size (as VideoSegmenter's): the session works on the frames resized so
    that their shorter side is that size, exactly as a session given those frames, and its
    labels come back at the input size."""
    frames, gt = synthetic_video(4, size=(64, 96))
    inner = torch.stack([resize_frame(frame, (32, 48)) for frame in frames])
    large = InteractiveSession(small_interactive, frames, 2, batch_size=3, max_internal_size=32)
    small = InteractiveSession(small_interactive, inner, 2, batch_size=3)
    scribbles = _round(gt[:, ::2, ::2], np.zeros_like(gt[:, ::2, ::2]), 1, 2)
    labels = large.interact(scribbles)
    small.interact(scribbles)
    assert large.size == (32, 48) and large.input_size == (64, 96)
    torch.testing.assert_close(large.probs, small.probs)
    assert labels.shape == (4, 64, 96) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="max_internal_size"):
        InteractiveSession(small_interactive, frames, 2, max_internal_size=8)


def test_stm_interactive_runs_your_scribble_files_as_rounds(tmp_path, capsys):
    """`stm interactive FRAMES --scribbles R1.json R2.json`: the masks written are those of an
    InteractiveSession given the same rounds with the shipped interactive model; a bad file
    is one line naming it, before anything is written."""
    import json
    from PIL import Image
    from stm_model import io as video_io
    from stm_model.cli import main
    frames, gt = synthetic_video(4, size=(32, 48))
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f"{t:05d}.png")
    frames = torch.stack([frame.tensor for frame in video_io.FrameReader(folder)])
    first = _round(gt, np.zeros_like(gt), 1, 2)
    # the command's default model (small-real-interactive) gives the session's masks
    default = load_checkpoint(resolve_checkpoint(DEFAULT_INTERACTIVE_CHECKPOINT))
    session = InteractiveSession(default, frames, 2)
    labels = session.interact(first)
    second = _round(gt, labels.numpy(), 3, 2)
    expected = session.interact(second)
    paths = [tmp_path / "r1.json", tmp_path / "r2.json"]
    for path, scribbles in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(scribbles))
    out = tmp_path / "out"
    assert main(["interactive", str(folder), "--scribbles", *map(str, paths), "--output",
                 str(out), "--overlay", "gif", "--quiet"]) == 0
    assert "2 rounds, 2 objects" in capsys.readouterr().out
    written = np.stack([video_io.read_mask(out / "masks" / f"{t:05d}.png") for t in range(4)])
    assert np.array_equal(written, expected.numpy())
    assert (out / "overlay.gif").exists()
    paths[1].write_text("{not json")
    assert main(["interactive", str(folder), "--scribbles", *map(str, paths), "--output",
                 str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"scribble file {paths[1]}" in err and not (tmp_path / "bad").exists()


def test_an_object_without_a_scribble_has_no_pixels(small_interactive):
    """Objects 1 and 3 scribbled, object 2 never: object 2 gets no pixel on any frame until a
    stroke draws it, then it does."""
    frames, gt = synthetic_video(5, size=(48, 64), objects=3)
    session = InteractiveSession(small_interactive, frames, 3)
    scribbles = S.empty_scribbles(5)
    for object_id in (1, 3):
        scribbles["scribbles"][0] += [s for s in S.synthesize_strokes(
            np.where(gt[0] == object_id, object_id, 0), np.zeros_like(gt[0]), 3)
            if s["object_id"] == object_id]
    assert {s["object_id"] for s in scribbles["scribbles"][0]} == {1, 3}
    labels = session.interact(scribbles)
    assert not (labels == 2).any() and (labels == 1).any() and (labels == 3).any()
    assert float(session.probs[:, 1].abs().max()) == 0  # no share of any pixel
    second = S.empty_scribbles(5)
    second["scribbles"][2] = [s for s in S.synthesize_strokes(
        np.where(gt[2] == 2, 2, 0), np.zeros_like(gt[2]), 3) if s["object_id"] == 2]
    assert (session.interact(second) == 2).any()


@pytest.mark.parametrize("ids, objects, fragment", [
    ((1, 3), None, "draw objects 1, 3 but not 2"), ((1, 2, 40), None, "not 3, 4, 5, 6, 7, ..."),
    ((1, 40), "2", "object 40 in"), ((1, 3), "3", None)])
def test_stm_interactive_object_ids_must_be_in_use(tmp_path, capsys, ids, objects, fragment):
    """An id above the objects in use (a typo'd 40) is one line naming it and the file, before
    anything is written; --objects N keeps objects without scribbles (they get no pixels)."""
    from helpers import write_frames
    folder = tmp_path / "frames"
    write_frames(folder, 3, (32, 48))
    scribbles = S.empty_scribbles(3)
    scribbles["scribbles"][0] = [{"path": [[0.1 + 0.2 * n, 0.2 + 0.2 * n], [0.2, 0.5]],
                                  "object_id": i, "start_time": 0, "end_time": 1}
                                 for n, i in enumerate(ids)]
    (tmp_path / "r1.json").write_text(json.dumps(scribbles))
    out = tmp_path / "out"
    argv = ["interactive", str(folder), "--scribbles", str(tmp_path / "r1.json"), "--output",
            str(out), "--overlay", "none", "--quiet"] + (["--objects", objects] if objects
                                                          else [])
    code = stm_main(argv)
    err = capsys.readouterr().err
    if fragment is None:
        assert code == 0
        from stm_model import io as video_io
        masks = [video_io.read_mask(path) for path in sorted((out / "masks").glob("*.png"))]
        assert len(masks) == 3 and not any((mask == 2).any() for mask in masks)
    else:
        assert code == 2 and fragment in err and not out.exists(), err


def test_batched_reads_equal_one_frame_at_a_time_and_the_naive_read(small_interactive):
    frames, gt = synthetic_video(5)
    scribbles = _round(gt, np.zeros_like(gt), 1, 2)
    results = []
    for batch_size, backend in [(1, "torch"), (4, "torch"), (5, "naive")]:
        session = InteractiveSession(small_interactive, frames, 2, batch_size=batch_size,
                                     read_backend=backend)
        session.interact(scribbles)
        results.append(session.probs.clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=2e-5, rtol=0)


def test_as_interactive_keeps_the_semi_supervised_model_without_scribbles():
    torch.manual_seed(0)
    model = STM(STMConfig.small()).eval()
    interactive = as_interactive(model)
    assert interactive.config.interactive and not model.config.interactive
    frame, probs = torch.rand(1, 3, 64, 64), torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        expected = model.encode_memory(frame, probs)
        empty = torch.zeros(1, 2, 2, 64, 64)
        encoded = interactive.encode_memory(frame, probs, empty)
        for actual, wanted in zip(encoded, expected, strict=True):
            torch.testing.assert_close(actual, wanted)
    with pytest.raises(ValueError, match="not interactive"):
        model.encode_memory(frame, probs, empty)
    with pytest.raises(ValueError, match=r"scribbles must be \(S, n, 2, H, W\)"):
        interactive.encode_memory(frame, probs, torch.zeros(1, 2, 1, 64, 64))


def test_session_rejects_bad_input_with_clear_errors(small_interactive):
    frames, gt = synthetic_video(3)
    with pytest.raises(ValueError, match=r"float \(T, 3, H, W\)"):
        InteractiveSession(small_interactive, frames[0], 2)
    with pytest.raises(ValueError, match="num_objects"):
        InteractiveSession(small_interactive, frames, 0)
    session = InteractiveSession(small_interactive, frames, 2)
    unknown = S.empty_scribbles(3)
    unknown["scribbles"][0] = [{"path": [[0.5, 0.5]], "object_id": 5}]
    with pytest.raises(S.ScribbleError, match="unknown object_id 5"):
        session.interact(unknown)
    with pytest.raises(S.ScribbleError, match="no stroke"):
        session.interact(S.empty_scribbles(3))
    with pytest.raises(S.ScribbleError, match="video has 3 frames"):
        session.interact(S.empty_scribbles(4))
    assert session.memory_frames == 0 and not session.rounds  # nothing half-done


def test_time_scores_follow_the_step_curve():
    auc, at_60 = time_scores([10, 30], [0.5, 0.8], num_objects=1)
    assert auc == pytest.approx((0.5 * 20 + 0.8 * 210) / 240)
    assert at_60 == 0.8
    auc, at_60 = time_scores([100, 160], [0.5, 0.8], num_objects=2)  # 50 s, 80 s per object
    assert at_60 == 0.5 and auc == pytest.approx((0.5 * 30 + 0.8 * 160) / 240)
    assert time_scores([300], [0.9], 1) == (0.0, 0.0)  # nothing delivered within the budget


def test_robot_picks_the_worst_frame_and_scribbles_its_errors():
    gt = np.zeros((3, 32, 32), dtype=np.int64)
    gt[:, 8:24, 8:24] = 1
    predicted = gt.copy()
    predicted[1] = 0
    robot = RobotUser()
    assert robot.first_frame(np.array([gt[0] * 0, gt[0], gt[0] * 0])) == 1
    scribbles, frame = robot.interact(gt, predicted, 1, sequence="s")
    assert frame == 1 and scribbles["sequence"] == "s"
    assert S.annotated_frames(scribbles) == [1]
    assert [s["object_id"] for s in scribbles["scribbles"][1]] == [1]
    assert robot.interact(gt, gt, 1) == (None, 0)
    assert jf_scores(gt, gt, 1) == (1.0, 1.0, 1.0)


def test_masks_do_not_worsen_over_robot_rounds_on_held_out_videos():
    """The robot's eight rounds on five held-out synthetic videos (100 frames, 3 objects): no
    round costs a video more than 0.02 J&F and on average the rounds add 0.05 or more."""
    model = load_small_model(SMALL_INTERACTIVE_WEIGHTS)
    assert model.config.interactive
    first, final = [], []
    for seed in range(5):
        frames, gt = synthetic_video(100, size=(128, 128), seed=seed, objects=3)
        result = evaluate_interactive(model, frames, gt, rounds=8, batch_size=10)
        scores = [r["J&F"] for r in result["rounds"]]
        assert len(scores) >= 2, scores
        assert all(later >= earlier - 0.02 for earlier, later in itertools.pairwise(scores)), \
            (seed, scores)
        assert scores[-1] >= scores[0], (seed, scores)
        annotated = [r["frame"] for r in result["rounds"]]
        assert [r["memory_frames"] for r in result["rounds"]] == [
            len(set(annotated[:i + 1])) for i in range(len(annotated))]
        assert 0 < result["auc"] <= 1 and result["jf_at_60s"] == scores[-1]  # well within 60 s
        first.append(scores[0])
        final.append(scores[-1])
    assert np.mean(final) >= np.mean(first) + 0.05, (first, final)


def test_interactive_training_items_batches_and_gradients():
    clips = SyntheticClips(4, clip_len=3, size=(64, 64), max_objects=2)
    dataset = InteractiveClips(clips, seed=0)
    first, again = dataset[1], dataset[1]
    assert torch.equal(first["scribble_map"], again["scribble_map"])  # deterministic
    assert first["scribble_map"].shape == (64, 64) and (first["scribble_map"] >= 0).any()
    batch = collate_clips([dataset[i] for i in range(2)], max_objects=2)
    assert batch["first_scribbles"].shape == (2, 2, 2, 64, 64)
    drawn = batch["first_scribbles"][:, :, 0] > 0
    assert (batch["first_probs"][drawn] == 1).all()  # positive strokes painted into the mask
    config = TrainConfig(model="small", interactive=True, size=(64, 64), steps=1,
                         batch_size=2, max_objects=2)
    model = build_model(config).train()
    loss = clip_loss(ClipForward(model), batch, torch.device("cpu"))
    loss.backward()
    assert model.memory_encoder.scribble_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = ClipForward(model)(batch["frames"], batch["first_probs"],
                                    batch["object_valid"], batch["first_scribbles"])
    assert logits.shape == (2, 3, 3, 64, 64)  # frame 0 is predicted too
    assert isinstance(build_dataset(config), InteractiveClips)


def test_cli_interactive_eval_on_a_davis_folder(tmp_path, capsys):
    frames, gt = synthetic_video(8, size=(96, 128), seed=7)
    write_davis_folder(tmp_path / "davis", frames, gt)
    output = tmp_path / "out"
    code = stm_main(["interactive-eval", str(tmp_path / "davis"), "--rounds", "2",
                     "--size", "48", "--output", str(output), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| synth | 2 | 8 |" in printed and "AUC" in printed
    report = json.loads((output / "interactive_eval.json").read_text())
    rounds = report["sequences"]["synth"]["rounds"]
    assert 1 <= len(rounds) <= 2 and all(0 <= r["J&F"] <= 1 for r in rounds)
    assert (output / "interactive_curve.png").stat().st_size > 0
    assert stm_main(["interactive-eval", str(tmp_path / "nothing"), "--quiet"]) == 2


@pytest.mark.skipif(not (SHARED / "data" / "davis2016-val").exists(),
                    reason="../shared/data is absent")
def test_cli_interactive_eval_on_a_real_davis_sequence(tmp_path, capsys):
    output = tmp_path / "out"
    code = stm_main(["interactive-eval", str(SHARED / "data" / "davis2016-val"),
                     "--sequences", "blackswan", "--rounds", "3",
                     "--output", str(output), "--quiet"])
    assert code == 0
    rounds = json.loads((output / "interactive_eval.json").read_text())[
        "sequences"]["blackswan"]["rounds"]
    # the default model (small-real-interactive) never saw blackswan: the machinery on real
    # frames (masks at full resolution, rounds, memory) and, at its own internal size, masks
    # that follow the swan (J&F 0.41 at half that size, 0.03 with the synthetic model)
    scores = [r["J&F"] for r in rounds]
    assert len(rounds) == 3 and all(0.6 < s <= 1 for s in scores), scores
    assert [r["memory_frames"] for r in rounds][-1] == len({r["frame"] for r in rounds})
    assert scores[-1] >= scores[0] - 0.01, scores


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_session_on_cuda_with_the_triton_read_matches_the_cpu(small_interactive, amp):
    frames, gt = synthetic_video(9)
    scribbles = _round(gt, np.zeros_like(gt), 4, 2)
    reference = InteractiveSession(small_interactive, frames, 2, read_backend="torch")
    reference.interact(scribbles)
    model = as_interactive(load_small_model(device="cuda"))
    session = InteractiveSession(model, frames.cuda(), 2, read_backend="triton", amp_dtype=amp,
                                 batch_size=4)
    session.interact(scribbles)
    # cuDNN convolutions may use TF32 and bf16 rounds everything: compare on average, and labels
    difference = (session.probs.float().cpu() - reference.probs.float()).abs().mean()
    assert difference < (2e-3 if amp is None else 2e-2)
    agreement = (session.labels() == reference.labels()).float().mean()
    assert agreement > (0.995 if amp is None else 0.98)


def test_rounds_propagate_from_the_annotated_frame_through_predicted_memory_frames(
        small_interactive, monkeypatch):
    """Each frame is propagated from its nearest frame annotated in the round, both ways,
    reading the annotated frames plus every mem_every-th frame predicted on the way; a run
    stops at a frame annotated in an earlier round (merge) and at the midpoint between two
    annotated now. mem_every=None reads the annotated frames alone."""
    from stm_model.interactive import session as session_module
    frames, gt = synthetic_video(16, size=(32, 32))
    session = InteractiveSession(small_interactive, frames, 2, batch_size=2, mem_every=3)
    encoded, reads = [], []
    encode = session._encode_prediction
    monkeypatch.setattr(session, "_encode_prediction",
                        lambda t: encoded.append(t) or encode(t))
    real_read = session_module.read_in_storage_dtype
    monkeypatch.setattr(session_module, "read_in_storage_dtype", lambda q, ks, vs, **options: (
        reads.append(len(ks) - 1) or real_read(q, ks, vs, **options)))
    session.interact(_round(gt, np.zeros_like(gt), 5, 2))
    # forwards 6-8 | 9-11 | 12-14 | 15 (memorising 8, 11, 14), backwards 4-2 | 1-0 (memorising 2)
    assert encoded == [8, 11, 14, 2]
    # a read per batch of two frames of a block, with the memory frames so far (the first
    # block of each way reads the bank alone, through its own read)
    assert reads == [1, 1, 2, 2, 3, 1]
    encoded.clear()
    before = session.probs.clone()
    labels = session.interact(_round(gt, session.labels().numpy(), 12, 2))
    # frames 6-15 are nearest 12 but 5 was annotated earlier: 11..6 backwards (weights > 0),
    # 13-15 forwards; frames before 5 keep their masks
    assert encoded == [9]
    assert torch.equal(session.probs[:6], before[:6])
    assert labels.shape == (16, 32, 32)
    plain, propagated = (InteractiveSession(small_interactive, frames, 2, batch_size=2,
                                            mem_every=mem_every) for mem_every in (None, 3))
    for one in (plain, propagated):
        one.interact(_round(gt, np.zeros_like(gt), 5, 2))
    # the same until the first memory frame on the way, then read with more memory
    torch.testing.assert_close(plain.probs[5:9], propagated.probs[5:9], atol=1e-4, rtol=0)
    assert (plain.probs[9:] - propagated.probs[9:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="mem_every must be a positive integer or None"):
        InteractiveSession(small_interactive, frames, 2, mem_every=0)
