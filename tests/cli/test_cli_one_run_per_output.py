"""One run per output folder, for every command that writes one: two real `stm` processes
started together into one folder (one runs, the other is refused at start in one line naming
it), a folder held by a live run refused by each command before it changes anything there (and
never with --overwrite offered), a lock left by a SIGKILLed run taken over.

Tiny synthetic frames and the shipped small model (no ../shared needed)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import synthetic_video, write_davis_folder
from stm_model import io as video_io
from stm_model.cli import main
from stm_model.io.files import WRITTEN
from stm_model.io.run_lock import LOCK_FILE, read_lock

HW = (32, 48)
FRAMES = 10
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1")  # two runs on a small machine

def _frames(folder, count=FRAMES):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(count):
        Image.fromarray(rng.integers(0, 256, HW + (3,), dtype=np.uint8)).save(
            folder / f"{t:05d}.png")
    return folder


def _mask(path, ids):
    """A palette mask with one 8x8 box per id."""
    labels = np.zeros(HW, dtype=np.uint8)
    for i, object_id in enumerate(ids):
        labels[4:12, 2 + 10 * i:10 + 10 * i] = object_id
    video_io.write_mask(path, labels)
    return path


def _stm(*argv):
    return subprocess.Popen([sys.executable, "-m", "stm_model", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENVIRONMENT)


def _error_lines(err):
    """stderr's lines but the notes and warnings (the shipped model's, --amp's)."""
    return [line for line in err.splitlines() if line.strip() and "warning:" not in line
            and not line.startswith("note: ")]


def _snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _pause_the_lock_holder_until_the_other_ends(output, processes):
    """SIGSTOP the process that took output's lock until the other one exits, so that the
    other meets a live run however slowly it starts (a loaded machine may start it after a
    ten-frame run has ended: then it would find finished results, not a live run)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pid = (read_lock(output) or {}).get("pid")
        holder = next((p for p in processes if p.pid == pid), None)
        if holder is not None:
            break
        if all(p.poll() is not None for p in processes):
            return  # both ended before the lock was seen: the asserts say what happened
        time.sleep(0.005)
    else:
        pytest.fail("neither run took the output folder's lock in 300 s")
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        other = next(p for p in processes if p is not holder)
        other.wait(timeout=300)
    finally:
        os.kill(holder.pid, signal.SIGCONT)


@pytest.fixture
def video(tmp_path):
    """(frames folder, mask of object 1, mask of objects 1 and 2)."""
    return (_frames(tmp_path / "frames"), _mask(tmp_path / "a.png", (1,)),
            _mask(tmp_path / "b.png", (1, 2)))


def test_two_runs_started_together_into_one_folder_do_not_mix(video, tmp_path):
    """Both started at once: one writes every mask, the other is refused at start, in one
    line naming the live run's pid and command, without --overwrite offered."""
    frames, mask_a, mask_b = video
    output = tmp_path / "out"
    runs = {mask: _stm("segment", frames, "--mask", mask, "--output", output, "--device", "cpu",
                       "--overlay", "none", "--quiet") for mask in (mask_a, mask_b)}
    _pause_the_lock_holder_until_the_other_ends(output, list(runs.values()))
    results = {mask: (process, *process.communicate(timeout=600))
               for mask, process in runs.items()}
    codes = sorted(process.returncode for process, _, _ in results.values())
    assert codes == [0, 2], {m: r[2][-2000:] for m, r in results.items()}
    winner_mask, (winner, _, _) = next((m, r) for m, r in results.items() if r[0].returncode == 0)
    _, _, err = next(r for r in results.values() if r[0].returncode == 2)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stm segment: error: ")
    assert f"pid {winner.pid}" in lines[0] and "stm segment" in lines[0][20:], lines[0]
    assert "--overwrite" not in lines[0]
    names = [f"{t:05d}.png" for t in range(FRAMES)]
    assert sorted(path.name for path in (output / "masks").iterdir()) == names
    first = video_io.read_mask(winner_mask)
    assert np.array_equal(video_io.read_mask(output / "masks" / names[0]), first)
    ids = set(np.unique(first).tolist())
    for name in names:
        assert set(np.unique(video_io.read_mask(output / "masks" / name)).tolist()) <= ids
    record = json.loads((output / "segment_run.json").read_text())
    assert record["mask"] == str(winner_mask.resolve())
    listed = (output / WRITTEN).read_text().splitlines()
    assert sorted(listed) == [f"masks/{name}" for name in names]  # each once
    assert not (output / LOCK_FILE).exists()


def _inputs(tmp_path, video):
    """{command: argv without --output} of every command that writes an output folder."""
    frames, mask_a, _ = video
    images, labels = synthetic_video(3, size=HW)
    root = tmp_path / "davis"
    write_davis_folder(root, images, labels)
    scribbles = tmp_path / "r1.json"
    scribbles.write_text(json.dumps({"scribbles": [[] for _ in range(FRAMES)],
                                     "sequence": "frames"}))
    return {
        "segment": ["segment", frames, "--mask", mask_a],
        "segment --overwrite": ["segment", frames, "--mask", mask_a, "--overwrite"],
        "segment --resume": ["segment", frames, "--mask", mask_a, "--resume"],
        "segment DAVIS_ROOT": ["segment", root],
        "segment-dataset": ["segment-dataset", root],
        "interactive": ["interactive", frames, "--scribbles", scribbles],
        "interactive-eval": ["interactive-eval", root, "--rounds", "1"],
        "annotate": ["annotate", frames, "--port", "0"],
        "train": ["train", "--steps", "1"],
    }


@pytest.mark.parametrize("command", [
    "segment", "segment --overwrite", "segment --resume", "segment DAVIS_ROOT",
    "segment-dataset", "interactive", "interactive-eval", "annotate", "train"])
def test_a_folder_a_live_run_holds_is_refused_before_anything_is_touched(
        video, tmp_path, holder, capsys, command):
    """Every command that writes an output folder: while another run holds it, the command
    fails at start, in one line naming that run, and leaves the folder as it was (an earlier
    run's masks too, with --overwrite); it never offers --overwrite against a live run."""
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)  # an earlier run's results, now being replaced
    _mask(output / "masks" / "00000.png", (1,))
    (output / WRITTEN).write_text("masks/00000.png\n")
    process = holder(output, "stm segment-dataset")
    before = _snapshot(output)
    argv = [str(part) for part in _inputs(tmp_path, video)[command]]
    assert main([*argv, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"pid {process.pid}" in lines[0] and "stm segment-dataset" in lines[0], lines[0]
    assert "in use by another run" in lines[0] and "--overwrite" not in lines[0]
    assert _snapshot(output) == before


def test_a_lock_left_by_a_killed_run_is_taken_over(video, tmp_path, capsys):
    """A run SIGKILLed while it writes leaves its lock file; the next run into the folder
    (here --resume) takes it over, finishes, and removes it."""
    frames, mask_a = _frames(tmp_path / "short", count=3), video[1]
    output = tmp_path / "out"
    argv = ["segment", frames, "--mask", mask_a, "--output", output, "--device", "cpu",
            "--overlay", "none", "--quiet"]
    process = _stm(*argv)
    try:
        while (read_lock(output) or {}).get("pid") != process.pid:
            assert process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert read_lock(output)["pid"] == process.pid  # left behind: its flock went with it
    assert main([*map(str, argv), "--resume"]) == 0, capsys.readouterr().err
    assert not (output / LOCK_FILE).exists()
    assert sorted(path.name for path in (output / "masks").iterdir()) == [
        f"{t:05d}.png" for t in range(3)]


def test_the_lock_file_is_no_earlier_result(video, tmp_path, capsys):
    """A stale lock file alone is not an earlier run's results (no --overwrite asked)."""
    frames, mask_a, _ = video
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_FILE).write_text(json.dumps({"pid": 1, "command": "stm segment"}))
    assert main(["segment", str(frames), "--mask", str(mask_a), "--output", str(output),
                 "--max-frames", "2", "--overlay", "none", "--quiet"]) == 0, \
        capsys.readouterr().err
    assert sorted(os.listdir(output)) == [WRITTEN, "masks", "segment_run.json"]
