"""stm segment --resume: an interrupted run continues from the masks it wrote."""
import json
import re

import numpy as np
import pytest
import tqdm

from helpers import write_late_object_clip
from stm_model import io as video_io
from stm_model.cli import main
from stm_model.inference.video_segmenter import VideoSegmenter

FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Frames, masks (frame 0 holds object 1, frame 4 brings object 2) and later_masks
    (helpers.write_late_object_clip)."""
    return write_late_object_clip(tmp_path_factory.mktemp("clip"), FRAMES)


def _segment(clip, output, *extra, masks="masks"):
    return main(["segment", str(clip / "frames"), "--masks", str(clip / masks), "--output",
                 str(output), "--mem-every", "3", "--quiet", *extra])


def _masks(output):
    return {p.name: video_io.read_mask(p) for p in sorted((output / "masks").glob("*.png"))}


def _interrupted(clip, output, monkeypatch, capsys, after, *extra, masks="masks"):
    """Run, with Ctrl-C arriving as mask number `after` + 1 is written; returns stderr."""
    real, written = video_io.write_mask, []

    def write_then_stop(path, labels):
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, labels)
    monkeypatch.setattr(video_io, "write_mask", write_then_stop)
    assert _segment(clip, output, *extra, masks=masks) == 130
    monkeypatch.setattr(video_io, "write_mask", real)
    return capsys.readouterr().err


@pytest.mark.parametrize("masks, extra, after", [
    ("masks", (), 6), ("masks", (), 1),
    ("later_masks", ("--both-directions",), 5),     # in the forward pass
    ("later_masks", ("--both-directions",), 10)])   # in the backward pass
def test_resume_continues_an_interrupted_run(clip, tmp_path, monkeypatch, capsys, masks, extra,
                                             after):
    """Ctrl-C after some masks; the same command with --resume keeps them (untouched),
    rebuilds the memory from them and writes the rest and the overlay; the masks match an
    uninterrupted run's."""
    full = tmp_path / "full"
    assert _segment(clip, full, "--overlay", "none", *extra, masks=masks) == 0
    output = tmp_path / "out"
    err = _interrupted(clip, output, monkeypatch, capsys, after, "--overlay", "png", *extra,
                       masks=masks)
    assert f"wrote {after} of {FRAMES} masks" in err and "with --resume to continue" in err
    kept = {p: p.stat().st_mtime_ns for p in (output / "masks").glob("*.png")}
    assert len(kept) == after
    # the same command again without --resume is refused, pointing to it
    _error(capsys, _segment(clip, output, *extra, masks=masks), "--resume to continue")
    assert _segment(clip, output, "--overlay", "png", "--resume", *extra, masks=masks) == 0
    captured = capsys.readouterr()
    assert f"resuming: {after} of {FRAMES} masks" in captured.err
    assert f"kept (resumed): {after}" in captured.out
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # kept, not rewritten
    resumed, expected = _masks(output), _masks(full)
    assert resumed.keys() == expected.keys() and len(resumed) == FRAMES
    agreement = np.mean([(resumed[name] == expected[name]).mean() for name in expected])
    assert agreement > 0.99, agreement
    assert len(list((output / "overlay").glob("*.png"))) == FRAMES
    # resuming a finished run writes nothing new and says so
    assert _segment(clip, output, "--overlay", "none", "--resume", *extra, masks=masks) == 0
    err = capsys.readouterr().err
    assert f"resuming: {FRAMES} of {FRAMES} masks" in err and "the run was complete" in err


def _error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_resume_refuses_what_it_cannot_continue(clip, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    _interrupted(clip, output, monkeypatch, capsys, 5, "--overlay", "none")
    _error(capsys, _segment(clip, output, "--resume", "--overwrite"),
           "--resume and --overwrite exclude each other")
    message = _error(capsys, _segment(clip, output, "--resume", "--mem-every", "4"),
                     "was made with other settings", "--mem-every 3 then, 4 now")
    assert "memory_dtype" not in message  # the option that changed, not every option
    _error(capsys, _segment(clip, output, "--resume", "--max-frames", "8"), "max_frames")
    _error(capsys, _segment(clip, output, "--resume", "--random-weights"),
           "--resume needs a checkpoint")
    cut = output / "masks" / "00003.png"
    cut.write_bytes(cut.read_bytes()[:-20])  # no IEND: a copy that stopped
    _error(capsys, _segment(clip, output, "--resume"), "00003.png", "remove")
    cut.unlink()
    foreign = np.zeros((64, 96), np.uint8)
    foreign[:8, :8] = 7
    video_io.write_mask(output / "masks" / "00002.png", foreign)
    _error(capsys, _segment(clip, output, "--resume"), "00002.png", "object ids [7]")
    (output / "segment_run.json").unlink()
    _error(capsys, _segment(clip, output, "--resume"), "no record of the run")


def test_a_record_without_amp_is_a_float32_run_resumed_with_amp_fp32(clip, tmp_path,
                                                                     monkeypatch, capsys):
    """A run record whose --amp is null (written when no --amp meant no autocast) is a float32
    run: --resume with the default --amp auto is refused naming --amp fp32, which resumes it."""
    output = tmp_path / "out"
    _interrupted(clip, output, monkeypatch, capsys, 5, "--overlay", "none", "--amp", "fp32")
    path = output / "segment_run.json"
    record = json.loads(path.read_text())
    assert record["options"]["amp_dtype"] == "fp32"
    record["options"]["amp_dtype"] = None
    path.write_text(json.dumps(record))
    _error(capsys, _segment(clip, output, "--overlay", "none", "--resume"),
           "was made with other settings", "--amp 'fp32' then, 'auto' now")
    assert _segment(clip, output, "--overlay", "none", "--resume", "--amp", "fp32") == 0
    assert len(_masks(output)) == FRAMES


def test_resume_without_an_earlier_run_starts_from_the_first_frame(clip, tmp_path, capsys):
    output = tmp_path / "new"
    assert _segment(clip, output, "--overlay", "none", "--resume") == 0
    assert len(_masks(output)) == FRAMES
    assert "resuming" not in capsys.readouterr().err


# a bar's counts and times as tqdm draws them: "12/12 [00:01<00:00, 9.87frame/s]"
_BAR = re.compile(r"(\d+)/(\d+) \[(\d+):(\d+)<(?:(\d+):(\d+)|\?)")


def _drawn(err, description):
    """(done, total, elapsed s, remaining s or None) of every drawing of the bar `description`
    in a run's stderr."""
    drawings = []
    for line in re.split(r"[\r\n]", err):
        if line.startswith(description) and (found := _BAR.search(line)):
            done, total, minutes, seconds, left_minutes, left_seconds = found.groups()
            remaining = None if left_minutes is None else int(left_minutes) * 60 + int(
                left_seconds)
            drawings.append((int(done), int(total), int(minutes) * 60 + int(seconds),
                             remaining))
    return drawings


def test_resume_shows_the_memory_rebuilt_and_times_only_the_frames_segmented(
        clip, tmp_path, monkeypatch, capsys):
    """A resumed run's replay of the kept masks has a bar of its own, counting them; the
    segmenting bar's clock starts after it: its elapsed time, rate and ETA are those of the
    frames segmented only. The bars run on a clock of the test's: 10 s a frame replayed, 0.1 s
    a frame segmented."""
    output = tmp_path / "out"
    _interrupted(clip, output, monkeypatch, capsys, 8, "--overlay", "none")
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    replay, step = VideoSegmenter.replay, VideoSegmenter.step

    def slow_replay(*args, **kwargs):
        clock[0] += 10
        return replay(*args, **kwargs)

    def quick_step(*args, **kwargs):
        clock[0] += 0.1
        return step(*args, **kwargs)
    monkeypatch.setattr(VideoSegmenter, "replay", slow_replay)
    monkeypatch.setattr(VideoSegmenter, "step", quick_step)
    assert main(["segment", str(clip / "frames"), "--masks", str(clip / "masks"), "--output",
                 str(output), "--mem-every", "3", "--overlay", "none", "--resume"]) == 0
    err = capsys.readouterr().err
    assert _drawn(err, "rebuilding the memory")[-1] == (8, 8, 80, 0)
    segmented = [drawing for drawing in _drawn(err, "segmenting frames") if drawing[0] > 8]
    assert segmented and segmented[-1][:2] == (FRAMES, FRAMES)
    # 4 frames in 0.4 s: a clock that ran during the replay would say 80 s, and an ETA of
    # 20 s and more a frame left
    assert all(elapsed == 0 and left in (None, 0) for _, _, elapsed, left in segmented), \
        segmented
    assert err.rindex("rebuilding the memory") < err.index("segmenting frames")  # one after
    # the other
