"""When `stm train` saves checkpoint.pt: on Ctrl-C (the last step completed), every
--save-every steps or duration, and what an older checkpoint's config lacks."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ctrl_c_as_at_a_terminal
import stm_model.training.loop as train_module
from stm_model.training.loop import TrainConfig, _parser, train

COMMAND = ["--model", "small", "--batch-size", "1", "--clip-size", "32", "32", "--clip-len", "2",
           "--max-objects", "1", "--warmup-steps", "1", "--log-every", "1", "--no-progress"]


def _config(argv):
    """TrainConfig of `python -m stm_model.training.loop ARGV`."""
    args = vars(_parser().parse_args(argv))
    args.pop("no_progress")
    return TrainConfig(**args)


def _logged_steps(output):
    path = output / "metrics.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_the_last_step_and_a_rerun_resumes_from_it(tmp_path, monkeypatch, stop):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) to a real training process before its
    first checkpoint is due (200 steps or 10 minutes): it saves the last step completed,
    names it, exits with 130; a rerun goes on from that step."""
    output = tmp_path / "run"
    argv = ["--output", str(output), "--steps", "1000", *COMMAND]
    process = subprocess.Popen([sys.executable, "-m", "stm_model.training.loop", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"),
                               preexec_fn=ctrl_c_as_at_a_terminal)
    try:
        deadline = time.monotonic() + 600
        while _logged_steps(output) < 2:
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no two steps in 10 minutes"
            time.sleep(0.1)
        assert not (output / "checkpoint.pt").exists()
        process.send_signal(stop)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err[-2000:]
    step = torch.load(output / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 2 and step == _logged_steps(output)
    assert err.strip().splitlines()[-1] == (
        f"stm train: interrupted: kept step {step} of 1000 in {output / 'checkpoint.pt'}; run "
        "the same command again to resume")
    assert "Traceback" not in err
    calls, real_loss = [], train_module.clip_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(train_module, "clip_loss", counted)
    rerun = _config(["--output", str(output), "--steps", str(step + 1), *COMMAND])
    with pytest.warns(UserWarning, match=f"steps: 1000 -> {step + 1}"):
        train(rerun, show_progress=False)
    assert len(calls) == 1  # only the step after the kept one
    assert torch.load(output / "checkpoint.pt", weights_only=True)["step"] == step + 1
    assert (output / "model.pt").exists()


def test_ctrl_c_before_the_first_step_ends_keeps_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "clip_loss", interrupted)
    with pytest.raises(train_module.TrainingInterrupted, match="before the first step ended"):
        train(_config(["--output", str(tmp_path), "--steps", "5", *COMMAND]),
              show_progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_save_every_takes_steps_and_a_duration(tmp_path, monkeypatch):
    """--save-every 1s saves after every step that took over a second although 200 steps
    are far; 0s saves by steps only (and at the end); the values parse into the two
    TrainConfig fields."""
    assert (_config([]).save_every, _config([]).save_every_seconds) == (200, 600.0)
    parsed = {text: _config(["--save-every", *text.split()])
              for text in ("50", "90s", "1.5h", "50 10m", "0s")}
    assert {text: (c.save_every, c.save_every_seconds) for text, c in parsed.items()} == {
        "50": (50, 600.0), "90s": (200, 90.0), "1.5h": (200, 5400.0), "50 10m": (50, 600.0),
        "0s": (200, 0.0)}
    for bad in (["10x"], ["-5"], ["5m", "10m"], ["1", "2"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--save-every", *bad])

    saves, real_save, real_loss = [], train_module._save, train_module.clip_loss

    def recorded(model, optimizer, scheduler, step, *args):
        saves.append(step)
        return real_save(model, optimizer, scheduler, step, *args)

    def slow(*args, **kwargs):  # every step takes over a second
        time.sleep(1.1)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(train_module, "_save", recorded)
    monkeypatch.setattr(train_module, "clip_loss", slow)
    train(_config(["--output", str(tmp_path / "timed"), "--steps", "2", "--save-every", "1s",
                   *COMMAND]), show_progress=False)
    assert saves == [1, 2]
    saves.clear()
    train(_config(["--output", str(tmp_path / "steps"), "--steps", "2", "--save-every", "1000",
                   "0s", *COMMAND]), show_progress=False)
    assert saves == [2]

    # a checkpoint saved before save_every_seconds existed resumes without a config warning
    # about it
    path = tmp_path / "steps" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    del payload["train_config"]["save_every_seconds"]
    torch.save(payload, path)
    with pytest.warns(UserWarning) as warned:
        train(_config(["--output", str(tmp_path / "steps"), "--steps", "3", "--save-every",
                       "1000", "0s", *COMMAND]), show_progress=False)
    assert [str(w.message).split(": ", 1)[1] for w in warned] == ["steps: 2 -> 3"]
