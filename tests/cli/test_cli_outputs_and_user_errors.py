"""The `stm` command as a new user meets it: output integrity, empty or gray-level first masks,
`stm train` options, resuming a finished run, checkpoint config validation, one-line user
errors.

Everything runs the small untrained model on tiny synthetic frames (no ../shared needed)."""
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import synthetic_video, write_davis_folder
import stm_model.network.checkpoint as checkpoint_module
import stm_model.training.loop as train_module
from stm_model import BatchSegmenter, STM, CheckpointError, STMConfig, VideoSegmenter
from stm_model import io as video_io
from stm_model.network.checkpoint import load_checkpoint, save_checkpoint
from stm_model.cli import main
from stm_model.commands.common import write_json
from stm_model.io.files import can_write_into
from stm_model.training.loop import TrainConfig, train

HW = (32, 48)


def _frames(folder, count=3, hw=HW, seed=0):
    """`count` PNG frames 00000.png... of random pixels; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for t in range(count):
        Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)).save(
            folder / f"{t:05d}.png")
    return folder


def _box_mask(path, ids=(1,), hw=HW):
    """A palette mask with one 8x8 box per id; returns the path."""
    labels = np.zeros(hw, dtype=np.uint8)
    for i, object_id in enumerate(ids):
        labels[4:12, 2 + 10 * i:10 + 10 * i] = object_id
    video_io.write_mask(path, labels)
    return path


def _cli(argv):
    """main(argv)'s exit code, also for argparse's SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _is_note(line):
    """A warning or the one-line note on the shipped synthetic model: not the error line."""
    return "warning:" in line or line.startswith("note: the shipped model")


def _user_error(capsys, argv, *fragments):
    """Run the CLI and check it failed as a user error: exit 2, one line on stderr, no
    traceback, every fragment in the message. Returns the message."""
    code = _cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not _is_note(line)]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def video(tmp_path):
    """(frames folder, first-frame mask) of a 3-frame 48x32 video."""
    return _frames(tmp_path / "frames"), _box_mask(tmp_path / "first.png", ids=(1, 2))


def _segment(video, output, *extra):
    frames, mask = video
    return ["segment", str(frames), "--mask", str(mask), "--output",
            str(output), "--quiet", *extra]


# --------------------------------------------------------------------------- 1. outputs


def test_segment_refuses_an_output_holding_masks_unless_overwrite(tmp_path, video, capsys):
    out = tmp_path / "out"
    assert _cli(_segment(video, out, "--overlay", "png")) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "00000.png", "00001.png", "00002.png"]
    _user_error(capsys, _segment(video, out, "--overlay", "png", "--max-frames", "2"),
                str(out), "--overwrite")
    assert len(list((out / "masks").iterdir())) == 3  # untouched
    assert _cli(_segment(video, out, "--overlay", "gif", "--overwrite")) == 0  # a GIF run
    assert (out / "overlay.gif").exists()
    # --overwrite clears the old masks and overlays first: no mix of two runs
    assert _cli(_segment(video, out, "--overlay", "png", "--max-frames", "2",
                         "--overwrite")) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in (out / "overlay").iterdir()) == ["00000.png", "00001.png"]
    assert not (out / "overlay.gif").exists()
    # an earlier overlay alone is an earlier run's result too
    empty = tmp_path / "other"
    (empty / "masks").mkdir(parents=True)
    (empty / "overlay.mp4").write_bytes(b"old")
    _user_error(capsys, _segment(video, empty), "--overwrite")


@pytest.mark.parametrize("overlay", ["png", "gif", "mp4"])
def test_an_interrupted_segment_leaves_only_complete_files(tmp_path, video, monkeypatch, capsys,
                                                          overlay):
    if overlay == "mp4":
        pytest.importorskip("av")
    out, real_save, calls = tmp_path / "out", Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3 if overlay == "png" else len(calls) == 2:
            # the second frame's mask: half a file, then the user hits Ctrl-C
            opened = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp
            opened.write(b"\x89PNG\r\n\x1a\n half")
            opened.flush()
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save_then_die)
    capsys.readouterr()
    assert main(_segment(video, out, "--overlay", overlay)) == 130  # Ctrl-C: 128 + SIGINT
    err = capsys.readouterr().err
    assert [line for line in err.strip().splitlines() if not _is_note(line)] == [
        f"stm segment: interrupted: wrote 1 of 3 masks to {out / 'masks'}, each complete (an "
        "unfinished overlay video or GIF is dropped); run the same command with --resume to "
        "continue"], err
    monkeypatch.setattr(Image.Image, "save", real_save)
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = [".stm_written"] + ["masks/00000.png"] + (  # .stm_written: for --overwrite
        ["overlay/00000.png"] if overlay == "png" else []) + [
        "segment_run.json"]  # what --resume compares
    assert leftovers == expected
    video_io.read_mask(out / "masks" / "00000.png")  # complete
    assert _cli(_segment(video, out, "--overlay", overlay, "--overwrite")) == 0
    assert len(list((out / "masks").glob("*.png"))) == 3


def test_write_mask_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m.png"
    video_io.write_mask(target, np.ones((4, 4), np.uint8))
    before = target.read_bytes()

    def broken(self, fp, *args, **kwargs):
        fp.write(b"partial") if hasattr(fp, "write") else open(fp, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        video_io.write_mask(target, np.zeros((4, 4), np.uint8))
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_eval_names_the_mask_it_cannot_read(tmp_path, capsys):
    truth, results = tmp_path / "truth" / "seq", tmp_path / "results" / "seq"
    for t in range(3):
        _box_mask(truth / f"{t:05d}.png")
        _box_mask(results / f"{t:05d}.png")
    (results / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _user_error(capsys, ["eval", str(results.parent), str(truth.parent)],
                str(results / "00001.png"))


def test_eval_of_results_of_another_size_names_the_sequence_and_file(tmp_path, capsys):
    truth, results = tmp_path / "truth" / "seq", tmp_path / "results" / "seq"
    for t in range(2):
        _box_mask(truth / f"{t:05d}.png")
        _box_mask(results / f"{t:05d}.png", hw=(HW[0] // 2, HW[1]))
    message = _user_error(capsys, ["eval", str(results.parent), str(truth.parent)],
                          "seq: result 00000.png is 48x16 (WxH) but its annotation is 48x32")
    assert "its frame" not in message


def test_writing_into_a_read_only_folder_names_the_file_asked_for(tmp_path, capsys):
    target = pathlib.Path("/sys/stm_export.pt")
    if can_write_into(target.parent):
        pytest.skip("no read-only folder here")
    save_checkpoint(STM(STMConfig.small()), tmp_path / "model.pt")
    message = _user_error(capsys, ["export", str(tmp_path / "model.pt"), str(target)],
                          f"cannot write {target}")
    assert ".tmp" not in message


def test_eval_leaves_the_annotations_void_pixels_out(tmp_path, capsys):
    """Ground truth with DAVIS's void label (255) along a band: a prediction that differs only
    there scores J = F = 1 and void is no object of its own."""
    truth, results = tmp_path / "truth" / "seq", tmp_path / "results" / "seq"
    for t in range(3):
        gt = np.zeros(HW, np.uint8)
        gt[8:20, 10:30] = 1
        gt[0:3, :] = 255
        predicted = np.where(gt == 255, 1, gt).astype(np.uint8)  # wrong only under void
        video_io.write_mask(truth / f"{t:05d}.png", gt)
        video_io.write_mask(results / f"{t:05d}.png", predicted)
    assert _cli(["eval", str(results.parent), str(truth.parent)]) == 0
    rows = (results.parent / "per-sequence_results.csv").read_text().splitlines()
    assert rows == ["Sequence,J-Mean,F-Mean", "seq_1,1.000,1.000"], rows


def test_eval_of_several_objects_against_one_names_the_frame_and_has_a_davis2016_mode(
        tmp_path, capsys):
    """Multi-object predictions against single-object (DAVIS-2016) ground truth: the error
    names the sequence and the frame, and points to --davis2016, which scores the union of the
    objects as the one foreground object."""
    truth, results = tmp_path / "truth" / "seq", tmp_path / "results" / "seq"
    for t in range(3):
        gt = np.zeros(HW, np.uint8)
        gt[8:20, 10:30] = 1
        predicted = gt.copy()
        if t >= 1:
            predicted[8:20, 20:30] = 2  # the same foreground, split into two objects
        video_io.write_mask(truth / f"{t:05d}.png", gt)
        video_io.write_mask(results / f"{t:05d}.png", predicted)
    _user_error(capsys, ["eval", str(results.parent), str(truth.parent)],
                "seq: prediction 00001.png holds object ids [2]", "--davis2016")
    assert _cli(["eval", str(results.parent), str(truth.parent), "--davis2016"]) == 0
    rows = (results.parent / "per-sequence_results.csv").read_text().splitlines()
    assert rows == ["Sequence,J-Mean,F-Mean", "seq_1,1.000,1.000"], rows


def test_eval_refuses_an_unwritable_output_before_scoring(tmp_path, capsys, monkeypatch):
    """The CSVs' folder is checked first: a read-only one (here under /sys, read-only even for
    root) is a one-line error with the way out, and no frame is scored."""
    truth, results = tmp_path / "truth" / "seq", tmp_path / "results" / "seq"
    for t in range(2):
        _box_mask(truth / f"{t:05d}.png")
        _box_mask(results / f"{t:05d}.png")
    scored = []
    monkeypatch.setattr("stm_model.metrics.evaluate_sequence",
                        lambda *a: scored.append(a) or pytest.fail("scored"))
    read_only = pathlib.Path("/sys/stm_eval_output")
    if can_write_into(read_only):
        pytest.skip("no read-only folder here")
    _user_error(capsys, ["eval", str(results.parent), str(truth.parent), "--output",
                         str(read_only)], "cannot write the CSV files into", "--output")
    assert not scored
    assert can_write_into(tmp_path / "new" / "folder") and not can_write_into(
        results / "00000.png")


# --------------------------------------------------------------------------- 2. first masks


def test_gray_level_masks_are_ids_0_255_one_object_and_mixtures_an_error(tmp_path):
    ids = np.array([[0, 1, 2], [3, 0, 2]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "ids.png")                     # mode 'L'
    np.testing.assert_array_equal(video_io.read_mask(tmp_path / "ids.png"), ids)
    Image.fromarray(ids * 85).save(tmp_path / "mixed.png")              # 85, 170, 255
    with pytest.raises(ValueError, match="mixed.png.*85, 170, 255"):
        video_io.read_mask(tmp_path / "mixed.png")                      # neither convention
    Image.fromarray((ids > 1).astype(np.uint8) * 255).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(video_io.read_mask(tmp_path / "binary.png"), ids > 1)


def test_segment_refuses_a_first_mask_without_objects(tmp_path, capsys):
    frames = _frames(tmp_path / "frames")
    empty = tmp_path / "empty.png"
    video_io.write_mask(empty, np.zeros(HW, np.uint8))
    _user_error(capsys, ["segment", str(frames), "--mask", str(empty),
                         "--output", str(tmp_path / "out"), "--quiet"],
                str(empty), "no object")
    gray = tmp_path / "gray.png"
    ids = np.zeros(HW, np.uint8)
    ids[:4, :4] = 2                                                     # id 2 as gray level 2
    Image.fromarray(ids).save(gray)
    assert _cli(["segment", str(frames), "--mask", str(gray),
                 "--output", str(tmp_path / "out2"), "--quiet", "--overlay", "none"]) == 0
    assert "objects: 1" in capsys.readouterr().out
    assert set(np.unique(video_io.read_mask(tmp_path / "out2" / "masks" / "00000.png"))) \
        == {0, 2}


def test_dataset_refuses_a_first_annotation_without_objects(davis_root, tmp_path, capsys):
    first = davis_root / "Annotations" / "480p" / "synth" / "00000.png"
    video_io.write_mask(first, np.zeros(HW, np.uint8))
    _user_error(capsys, ["segment-dataset", str(davis_root), "--output", str(tmp_path / "o"),
                         "--quiet"], str(first), "no object")


def test_first_masks():
    from stm_model.inference.masks import check_first_mask, check_object_count
    with pytest.raises(ValueError, match="no object"):
        check_first_mask(torch.zeros(4, 4, dtype=torch.int64), [])
    check_first_mask(torch.zeros(4, 4, dtype=torch.int64), [1])  # later masks may be empty
    check_first_mask(None, [])  # no mask: checked elsewhere
    with pytest.raises(ValueError, match="40 objects.*--max-objects 32"):
        check_object_count(range(1, 41), 32, "m.png")


def test_segmenter_step_refuses_a_first_mask_without_objects():
    torch.manual_seed(0)
    seg = VideoSegmenter(STM(STMConfig.small()).eval())
    with pytest.raises(ValueError, match="no object"):
        seg.step(torch.rand(3, 32, 32), mask=torch.zeros(32, 32, dtype=torch.int64))


def test_batch_segmenter_refuses_a_video_whose_first_mask_has_no_object():
    torch.manual_seed(0)
    batch = BatchSegmenter(STM(STMConfig.small()).eval())
    ok = torch.zeros(32, 32, dtype=torch.int64)
    ok[4:12, 4:12] = 1
    frames = {"a": torch.rand(3, 32, 32), "b": torch.rand(3, 32, 32)}
    with pytest.raises(ValueError, match="video 'b': the first frame's mask has no object"):
        batch.step(frames, masks={"a": ok, "b": torch.zeros(32, 32, dtype=torch.int64)})


# --------------------------------------------------------------------------- 3. stm train


def test_stm_train_forwards_its_options(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(train_module, "train",
                        lambda config, show_progress: seen.append((config, show_progress)))
    assert _cli(["train", "--output", str(tmp_path), "--steps", "7", "--clip-size", "32", "48",
                 "--no-amp", "--no-progress"]) == 0
    config, show = seen[0]
    assert (config.steps, config.size, config.amp, show) == (7, (32, 48), False, False)
    assert config.output == str(tmp_path)
    # it ends by saying where the trained model is
    assert f"trained model: {tmp_path / 'model.pt'}" in capsys.readouterr().out


def test_written_files_take_the_umask_mode_not_a_private_one(tmp_path):
    """Checkpoints, exported models and JSON summaries are written atomically (a temporary
    file renamed into place) with the mode any new file gets (0644 under umask 022), as the
    masks are: not the 0600 of a private temporary file."""
    previous = os.umask(0o022)
    try:
        save_checkpoint(STM(STMConfig.small()), tmp_path / "model.pt")
        assert _cli(["export", str(tmp_path / "model.pt"), str(tmp_path / "small.pt"),
                     "--dtype", "fp16"]) == 0
        write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(previous)
    for name in ("model.pt", "small.pt", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_stm_train_accepts_only_known_models(tmp_path, capsys):
    _user_error(capsys, ["train", "--output", str(tmp_path), "--model", "huge"], "huge")
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="huge")


# --------------------------------------------------------------------------- 4. resume


TINY = dict(model="small", steps=2, batch_size=1, clip_len=2, size=(32, 32), max_objects=1,
            warmup_steps=1, log_every=1, save_every=1)


def test_a_run_killed_before_model_pt_writes_it_when_run_again(tmp_path, monkeypatch):
    config = TrainConfig(output=str(tmp_path), **TINY)
    real_save = train_module.save_checkpoint

    def killed_before_model_pt(model, path, **extra):
        if path.name == train_module.MODEL:
            raise KeyboardInterrupt
        return real_save(model, path, **extra)
    monkeypatch.setattr(train_module, "save_checkpoint", killed_before_model_pt)
    with pytest.raises(KeyboardInterrupt):
        train(config, show_progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert not (tmp_path / "model.pt").exists()
    # a save killed mid-write leaves its temporary file
    stale = [tmp_path / "checkpoint.ptk1ll3d.tmp", tmp_path / "model.pt0dd.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    model = train(config, show_progress=False)
    assert not any(path.exists() for path in stale)
    final = load_checkpoint(tmp_path / "model.pt")
    for (name, a), b in zip(model.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 2


# --------------------------------------------------------------------------- 5. checkpoints


@pytest.fixture(scope="module")
def small_payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    torch.manual_seed(0)
    save_checkpoint(STM(STMConfig.small()), path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("change, message", [
    (dict(colour="blue"), "unknown.*colour"),
    (dict(key_dim="64"), "key_dim.*int"),
    (dict(key_dim=True), "key_dim.*int"),
    (dict(value_dim=10**7), "value_dim.*10000000"),
    (dict(backbone_layers=[1, 1, 10**6]), "backbone_layers"),
    (dict(backbone="resnet9000"), "backbone"),
    (dict(similarity=3), "similarity"),
    (dict(internal_size=8), "internal_size.*16..8192"),
    (dict(internal_size="240"), "internal_size"),
])
def test_checkpoint_configs_are_checked_before_building_a_model(small_payload, tmp_path,
                                                                 monkeypatch, change, message):
    payload = dict(small_payload, config={**small_payload["config"], **change})
    path = tmp_path / "bad.pt"
    torch.save(payload, path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from an unchecked config")
    monkeypatch.setattr(checkpoint_module, "STM", no_model)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(payload)


def test_checkpoint_config_that_does_not_match_its_weights(small_payload, tmp_path, capsys):
    payload = dict(small_payload, config={**small_payload["config"], "value_dim": 4096})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(payload)
    torch.save(dict(small_payload, config="small"), tmp_path / "bad.pt")
    _user_error(capsys, ["export", str(tmp_path / "bad.pt"), str(tmp_path / "out.pt")],
                "config")


# --------------------------------------------------------------------------- 6. user errors


def test_unwritable_output_is_a_user_error(tmp_path, video, capsys):
    (tmp_path / "file").write_text("not a folder")
    _user_error(capsys, _segment(video, tmp_path / "file" / "out"), str(tmp_path / "file"))
    # --output naming a file: said as it is, not "File exists"
    message = _user_error(capsys, _segment(video, tmp_path / "file"), "--output",
                          "is a file; give a folder")
    assert "File exists" not in message
    read_only = pathlib.Path("/sys/stm_segment_output")
    if not can_write_into(read_only):  # read-only filesystem: not "permission denied"
        message = _user_error(capsys, _segment(video, read_only), "read-only")
        assert "permission denied" not in message


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path, video, capsys):
    frames, _ = video
    _user_error(capsys, ["segment", str(frames), "--mask", str(tmp_path / "missing.png"),
                         "--output", str(tmp_path / "out"), "--quiet"], "--mask")
    _user_error(capsys, _segment(video, tmp_path / "out2", "--checkpoint",
                                 str(_box_mask(tmp_path / "x.png"))), "could not read")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_overwrite_also_removes_the_earlier_masks_jf_tables(tmp_path, video, capsys):
    """stm eval wrote its CSVs beside the masks; a new run with --overwrite removes them with
    the masks (they scored the old ones), and without it they count as earlier results."""
    out = tmp_path / "out"
    assert _cli(_segment(video, out, "--overlay", "none")) == 0
    for folder in (out, out / "masks"):
        (folder / "global_results.csv").write_text("J&F-Mean\n0.5\n")
        (folder / "per-sequence_results.csv").write_text("Sequence,J-Mean,F-Mean\n")
    (out / "masks" / "00000.png").unlink()
    for name in ("00001.png", "00002.png"):
        (out / "masks" / name).unlink()
    _user_error(capsys, _segment(video, out, "--overlay", "none"), "--overwrite", "J&F")
    assert _cli(_segment(video, out, "--overlay", "none", "--overwrite")) == 0
    assert not list(out.rglob("*.csv"))
    assert len(list((out / "masks").glob("*.png"))) == 3


def test_a_davis_like_root_without_annotations_says_so(tmp_path, capsys):
    (tmp_path / "root" / "JPEGImages" / "480p" / "seq").mkdir(parents=True)
    _user_error(capsys, ["segment", str(tmp_path / "root")], "JPEGImages/ but no Annotations/")


def test_a_frame_cut_short_is_found_before_any_work(tmp_path, capsys, monkeypatch):
    """A truncated JPEG late in the folder (a copy that stopped) is refused before the first
    frame is segmented, naming it; complete frames pass the check."""
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for t in range(4):
        Image.fromarray(rng.integers(0, 256, HW + (3,), dtype=np.uint8)).save(
            frames / f"{t:05d}.jpg", quality=90)
    video_io.check_complete(sorted(frames.iterdir()))
    cut = frames / "00003.jpg"
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    stepped = []
    monkeypatch.setattr(VideoSegmenter, "step", lambda *a, **k: stepped.append(1))
    _user_error(capsys, ["segment", str(frames), "--mask", str(_box_mask(tmp_path / "m.png")),
                         "--output", str(tmp_path / "out"), "--quiet"], "00003.jpg",
                "cut short")
    assert not stepped and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["another size", "not an image"])
def test_a_frame_of_another_size_or_no_image_is_found_before_any_work(tmp_path, capsys,
                                                                     monkeypatch, bad):
    """A 430x240 frame among 432x240 ones, or a file that is no image at all, late in the
    folder: one line naming it (and the size) before the first mask is written."""
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(2)
    for t in range(6):
        width = 430 if bad == "another size" and t == 5 else 432
        Image.fromarray(rng.integers(0, 256, (240, width, 3), dtype=np.uint8)).save(
            frames / f"{t:05d}.jpg", quality=90)
    if bad == "not an image":
        (frames / "00005.jpg").write_bytes(b"<html>not found</html>")
    mask = np.zeros((240, 432), np.uint8)
    mask[50:120, 60:200] = 1
    video_io.write_mask(tmp_path / "m.png", mask)
    stepped = []
    monkeypatch.setattr(VideoSegmenter, "step", lambda *a, **k: stepped.append(1))
    fragments = ("00005.jpg", "430x240", "00000.jpg is 432x240") if bad == "another size" \
        else ("00005.jpg", "not an image file")
    _user_error(capsys, ["segment", str(frames), "--mask", str(tmp_path / "m.png"),
                         "--output", str(tmp_path / "out"), "--quiet"], *fragments)
    assert not stepped and not (tmp_path / "out").exists()


def test_undecodable_frame_is_named(tmp_path, capsys):
    frames = _frames(tmp_path / "frames")
    (frames / "00001.png").write_bytes(b"garbage")
    _user_error(capsys, ["segment", str(frames), "--mask", str(_box_mask(tmp_path / "m.png")),
                         "--output", str(tmp_path / "out"), "--quiet"],
                "00001.png")
    assert not (tmp_path / "out" / "masks" / "00001.png").exists()


@pytest.mark.parametrize("slow", [True, False])
def test_slow_autocast_on_the_cpu_is_warned_about_before_the_work(tmp_path, video, capsys,
                                                                  monkeypatch, slow):
    """A CPU without native fp16 (or bf16) instructions emulates autocast, many times slower
    than float32: --amp there is warned about; where it has them, or without --amp, not."""
    asked = []
    monkeypatch.setattr("stm_model.commands.models.autocast_is_slow",
                        lambda device, amp: asked.append((device.type, amp)) or slow)
    assert _cli(_segment(video, tmp_path / "out", "--device", "cpu", "--amp", "fp16",
                         "--overlay", "none")) == 0
    err = capsys.readouterr().err
    assert asked == [("cpu", "fp16")]
    assert ("warning: --amp fp16 on this CPU is many times slower than float32" in err) == slow
    assert _cli(_segment(video, tmp_path / "plain", "--device", "cpu", "--overlay",
                         "none")) == 0
    assert "--amp" not in capsys.readouterr().err and len(asked) == 1


@pytest.mark.parametrize("bf16_products, extra, network", [
    ("1", [], torch.bfloat16), ("1", ["--amp", "fp32"], torch.float32), ("0", [], torch.float32),
], ids=["bf16-cpu", "bf16-cpu-amp-fp32", "no-bf16-cpu"])
def test_segment_runs_the_network_under_bf16_autocast_by_default_on_a_bf16_cpu(
        tmp_path, video, capsys, monkeypatch, bf16_products, extra, network):
    """--amp auto, the default: the encoders run under bf16 autocast (their keys in bf16) on
    a CPU with bf16 dot products (STM_KERNELS_CPU_BF16 stands in for its flags), in float32
    on one without and with --amp fp32; the summary names it, and nothing is warned."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", bf16_products)
    seen = []

    def recording(encode):
        def recorded(self, *args, **kwargs):
            encoded = encode(self, *args, **kwargs)
            key = encoded.key if hasattr(encoded, "key") else encoded[0]
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") \
                else None
            seen.append((autocast, key.dtype))
            return encoded
        return recorded
    for name in ("encode_query", "encode_memory"):
        monkeypatch.setattr(STM, name, recording(getattr(STM, name)))
    assert _cli(_segment(video, tmp_path / "out", "--device", "cpu", "--overlay", "none",
                         *extra)) == 0
    out, err = capsys.readouterr()
    autocast = network if network is torch.bfloat16 else None
    assert len(seen) >= 4 and set(seen) == {(autocast, network)}
    summary = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    assert summary["network"] == ("float32, bfloat16 autocast" if autocast else "float32")
    assert "warning" not in err


def test_autocast_is_slow_only_on_cpus_without_the_dtypes_instructions():
    import torch as torch_
    from stm_model.runtime.devices import autocast_is_slow
    cpu = torch_.device("cpu")
    assert autocast_is_slow(cpu, "fp16") == (not torch_.ops.mkldnn._is_mkldnn_fp16_supported())
    assert autocast_is_slow(cpu, "bf16") == (not torch_.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not autocast_is_slow(torch_.device("cuda"), "fp16")


def test_the_shipped_trained_model_is_the_default_and_random_weights_need_a_flag(
        tmp_path, video, capsys, monkeypatch):
    """No --checkpoint: the small model trained on real video shipped in the package;
    "small-real", "small" and "small-interactive" name the shipped files; an untrained network
    only with --random-weights (and a warning that it is for training); bad combinations and a
    missing checkpoint are refused before any work."""
    loaded = []
    real_load = checkpoint_module.load_checkpoint
    monkeypatch.setattr("stm_model.commands.models.load_checkpoint",
                        lambda path, device: loaded.append(path) or real_load(path, device))
    for given, expected in ([], "small-real"), (["--checkpoint", "small"], "small"), (
            ["--checkpoint", "small-interactive"], "small-interactive"), (
            ["--checkpoint", "small-real"], "small-real"):
        assert _cli(_segment(video, tmp_path / f"out{len(loaded)}", "--overlay", "none",
                             *given)) == 0
        assert loaded[-1] == checkpoint_module.SHIPPED[expected]
        assert "warning" not in capsys.readouterr().err
    assert _cli(_segment(video, tmp_path / "random", "--overlay", "none", "--random-weights",
                         "--config", "small")) == 0
    assert "untrained network, for training experiments" in capsys.readouterr().err
    count = len(loaded)
    _user_error(capsys, _segment(video, tmp_path / "x", "--checkpoint", "nothing.pt"),
                "--checkpoint", "nothing.pt",
                "small-real, small-real-interactive, small, small-interactive")
    _user_error(capsys, _segment(video, tmp_path / "x", "--config", "small"),
                "--config applies with --random-weights")
    _user_error(capsys, _segment(video, tmp_path / "x", "--random-weights", "--checkpoint",
                                 "small"), "exclude each other")
    assert len(loaded) == count and not (tmp_path / "x").exists()


def test_missing_mask_inputs_name_their_option(tmp_path, video, capsys):
    frames, _ = video
    for option, missing in (("--mask", tmp_path / "nothing.png"),
                            ("--masks", tmp_path / "no_folder")):
        _user_error(capsys, ["segment", str(frames), option, str(missing), "--output",
                             str(tmp_path / "out"), "--quiet"], f"{option} {missing}",
                    "no such")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_checkpoint_is_one_short_line(tmp_path, video, capsys):
    """A PNG given as --checkpoint: one line naming it, without torch.load's paragraph on
    weights_only."""
    png = _box_mask(tmp_path / "not_a_model.png")
    message = _user_error(capsys, _segment(video, tmp_path / "out", "--checkpoint", str(png)),
                          "could not read", "not_a_model.png")
    assert "weights_only" not in message and len(message) < 400, message


def test_a_mask_named_like_no_frame_is_refused_in_the_commands_words(tmp_path, capsys):
    """A masks folder with an extra 00099.png: the one-line error names it and says what to
    do on the command line, not an argument of the Python API (strict=False)."""
    frames = _frames(tmp_path / "frames")
    masks = tmp_path / "masks"
    masks.mkdir()
    _box_mask(masks / "00000.png")
    _box_mask(masks / "00099.png")
    message = _user_error(capsys, ["segment", str(frames), "--masks", str(masks),
                                   "--output", str(tmp_path / "out"), "--quiet"],
                          "00099.png", "rename or remove them")
    assert "strict" not in message


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "cpu:x"])
def test_unknown_device_is_a_user_error(tmp_path, video, capsys, device):
    _user_error(capsys, _segment(video, tmp_path / "out", "--device", device), device)


@pytest.mark.parametrize("option, value", [
    ("--max-frames", "-1"), ("--mem-every", "0"), ("--max-memory-frames", "-2"),
    ("--fps", "-5"), ("--batch-size", "0"), ("--offload-chunk-frames", "0"),
    ("--max-objects", "0")])
def test_negative_or_zero_counts_are_user_errors(tmp_path, video, capsys, option, value):
    _user_error(capsys, _segment(video, tmp_path / "out", option, value), option)


def test_offload_chunk_frames_reaches_the_segmenter(tmp_path, video, capsys):
    assert _cli(_segment(video, tmp_path / "out", "--offload", "--offload-chunk-frames", "1",
                         "--overlay", "none")) == 0


def test_dataset_counts_are_user_errors(tmp_path, capsys):
    for option in ("--workers", "--batch-size"):
        _user_error(capsys, ["segment-dataset", str(tmp_path), "--output", str(tmp_path / "o"),
                             option, "-1"], option)
    _user_error(capsys, ["interactive-eval", str(tmp_path), "--rounds", "0"], "--rounds")


@pytest.fixture
def davis_root(tmp_path):
    frames, labels = synthetic_video(3, size=HW, objects=2)
    write_davis_folder(tmp_path / "davis", frames, labels)
    return tmp_path / "davis"


def test_scribble_files_are_named(davis_root, tmp_path, capsys):
    scribbles = davis_root / "Scribbles" / "synth" / "001.json"
    scribbles.parent.mkdir(parents=True)
    argv = ["interactive-eval", str(davis_root), "--rounds", "1", "--quiet", "--output",
            str(tmp_path / "out")]
    scribbles.write_text("{not json")
    _user_error(capsys, argv, str(scribbles))
    scribbles.write_text(json.dumps({"sequence": "synth", "scribbles": [[]]}))  # 1 of 3 frames
    _user_error(capsys, argv, str(scribbles), "3 frames")
    stroke = {"path": [[0.1, 0.1], [0.5, 0.5]], "object_id": 7}
    scribbles.write_text(json.dumps({"sequence": "synth", "scribbles": [[stroke], [], []]}))
    _user_error(capsys, argv, str(scribbles), "object_id 7")


def test_an_error_during_progress_starts_a_line_of_its_own(davis_root, tmp_path, capsys,
                                                           monkeypatch):
    """An error raised while interactive-eval's progress bar is drawn (a sequence that fails
    to load mid-run) is printed on a line of its own, not at the end of the bar's."""
    def unreadable(*args, **kwargs):
        raise ValueError("a sequence that cannot be read")
    monkeypatch.setattr("stm_model.interactive.robot.load_davis_sequence", unreadable)
    assert _cli(["interactive-eval", str(davis_root), "--rounds", "1", "--output",
                 str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.split("\n")
    errors = [line for line in lines if "stm interactive-eval: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("stm interactive-eval: error:"), lines


def test_line_width_beyond_the_frame_is_a_user_error(davis_root, tmp_path, capsys):
    _user_error(capsys, ["interactive-eval", str(davis_root), "--line-width", "500", "--quiet",
                         "--output", str(tmp_path / "out")], "--line-width")
    _user_error(capsys, ["interactive-eval", str(davis_root), "--line-width", "40", "--size",
                         "32", "--quiet", "--output", str(tmp_path / "out")],
                "--line-width")


def test_masks_with_too_many_objects_are_refused_unless_raised(tmp_path, capsys):
    frames = _frames(tmp_path / "frames", hw=(32, 64), count=1)
    labels = np.repeat(np.arange(40, dtype=np.uint8) + 1, 32).reshape(32, 40)
    labels = np.pad(labels, ((0, 0), (0, 24)))
    mask = tmp_path / "many.png"
    video_io.write_mask(mask, labels)
    argv = ["segment", str(frames), "--mask", str(mask), "--quiet",
            "--overlay", "none", "--output", str(tmp_path / "out")]
    _user_error(capsys, argv, "40 objects", "--max-objects")
    assert _cli(argv + ["--max-objects", "40"]) == 0
    assert "objects: 40" in capsys.readouterr().out


def test_every_mask_is_checked_before_the_first_frame(tmp_path, capsys, monkeypatch):
    """--masks on later frames: a mask of the wrong size or with too many objects in all is
    refused before any frame is segmented, naming the mask and the limit all masks need."""
    frames = _frames(tmp_path / "frames", count=6)
    masks = tmp_path / "masks"
    masks.mkdir()
    _box_mask(masks / "00000.png", ids=(1,))
    _box_mask(masks / "00003.png", ids=(2,))
    _box_mask(masks / "00005.png", ids=(3, 4))
    stepped = []
    real_step = VideoSegmenter.step
    monkeypatch.setattr(VideoSegmenter, "step",
                        lambda self, *a, **k: stepped.append(1) or real_step(self, *a, **k))
    argv = ["segment", str(frames), "--masks", str(masks), "--quiet", "--overlay", "none",
            "--output", str(tmp_path / "out")]
    message = _user_error(capsys, argv + ["--max-objects", "1"], "2 objects (ids 1, 2)",
                          "00003.png", "--max-objects 4")
    assert "--max-objects 2" not in message and not stepped
    wide = np.zeros((HW[0], HW[1] - 1), np.uint8)
    wide[4:12, 4:12] = 2
    video_io.write_mask(masks / "00005.png", wide)
    _user_error(capsys, argv, "00005.png", "47x32")
    assert not stepped and not (tmp_path / "out").exists()


def test_dataset_masks_with_too_many_objects_are_refused(davis_root, tmp_path, capsys):
    _user_error(capsys, ["segment-dataset", str(davis_root), "--output", str(tmp_path / "o"),
                         "--quiet", "--max-objects", "1"],
                "2 objects", "--max-objects")


def test_argparse_errors_are_one_line(capsys):
    _user_error(capsys, ["segment"], "input")
    _user_error(capsys, ["segment", "x", "--overlay", "avi"], "--overlay")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels run on this GPU")
def test_a_backend_that_cannot_run_here_is_refused_before_any_file(tmp_path, video, capsys,
                                                                  monkeypatch):
    """--backend triton on a machine without a GPU (and without the interpreter): one line,
    before the first mask or the run record is written (a rerun needs no --overwrite)."""
    from stm_kernels.backends.triton import calls
    monkeypatch.setattr(calls, "INTERPRETING", False)
    out = tmp_path / "out"
    _user_error(capsys, _segment(video, out, "--backend", "triton"), "backend='triton'",
                "CUDA")
    assert not out.exists()


def test_overwrite_removes_what_runs_wrote_and_keeps_a_hand_made_file(tmp_path, video, capsys):
    """--overwrite deletes the files the earlier run recorded and nothing else: a mask a
    person put into masks/ stays (and a note says so); the refusal names only what exists."""
    out = tmp_path / "out"
    assert _cli(_segment(video, out, "--overlay", "none")) == 0
    Image.fromarray(np.zeros(HW, np.uint8)).save(out / "masks" / "hand.png")
    message = _user_error(capsys, _segment(video, out, "--overlay", "none"), "--overwrite")
    assert "(4 masks)" in message and "overlay" not in message.split("(")[1]
    assert _cli(_segment(video, out, "--overlay", "gif", "--max-frames", "2",
                         "--overwrite")) == 0
    err = capsys.readouterr().err
    assert "kept 1 file" in err and "masks/hand.png" in err
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "00000.png", "00001.png", "hand.png"]
    message = _user_error(capsys, _segment(video, out, "--overlay", "none"), "--overwrite")
    assert "3 masks, overlay.gif" in message


def test_a_frame_corrupt_inside_stops_the_run_naming_resume(tmp_path, video, capsys,
                                                             monkeypatch):
    """A frame whose header and end are fine but whose data cannot be decoded is found when
    it is reached: one line naming it, how many masks are written, and --resume."""
    from stm_model.io import frames as frames_module
    real = frames_module.load_image

    def corrupt_third(path):
        if str(path).endswith("00002.png"):
            raise video_io.FrameReadError(f"cannot decode frame {path}: broken data stream")
        return real(path)
    monkeypatch.setattr(frames_module, "load_image", corrupt_third)
    monkeypatch.setattr(video_io, "load_image", corrupt_third)
    out = tmp_path / "out"
    message = _user_error(capsys, _segment(video, out, "--overlay", "none"), "00002.png",
                          "2 of 3 masks are written", "--resume")
    assert "broken data stream" in message
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == ["00000.png", "00001.png"]
