"""`stm segment` on a long video: the summary's memory bank lines, the bench that records its
resident set and bank against frames."""
import json
import re

import numpy as np

from helpers import write_frames
from stm_model import io as video_io
from stm_model.cli import main
from stm_model.network.stm import STMConfig


def _summary(text):
    """{name: value} of the summary lines `name: value` a run printed."""
    return dict(re.findall(r"^\s*([a-z ()]+ ?(?:MiB)?): (\S+)$", text, re.MULTILINE))


def test_the_bank_line_reports_the_frames_held_and_the_capacity_its_own_line(tmp_path, capsys):
    """--max-memory-frames 400 sets 400 frames' storage aside up front: "memory bank MiB" is
    what the frames held take (memory frames x a frame's keys and values), "memory capacity
    MiB" the 400 frames set aside."""
    labels = write_frames(tmp_path / "frames", 8, (64, 96), objects=2)
    video_io.write_mask(tmp_path / "mask.png", labels[0])
    assert main(["segment", str(tmp_path / "frames"), "--mask", str(tmp_path / "mask.png"),
                 "--output", str(tmp_path / "out"), "--random-weights", "--config", "small",
                 "--memory-dtype", "fp32", "--max-memory-frames", "400", "--overlay", "none",
                 "--quiet"]) == 0
    summary = _summary(capsys.readouterr().out)
    config = STMConfig.small()
    objects = len(set(np.unique(labels[0])) - {0})
    frame_bytes = objects * (config.key_dim + config.value_dim) * (64 // 16) * (96 // 16) * 4
    frames = int(summary["memory frames"])
    assert frames == 3  # frames 0 and 5 kept, and frame 7's previous one
    assert float(summary["memory bank MiB"]) == round(frames * frame_bytes / 2**20, 2)
    assert float(summary["memory capacity MiB"]) == round(400 * frame_bytes / 2**20, 2)


def test_bench_long_video_records_the_commands_resident_set_and_bank(tmp_path, monkeypatch,
                                                                     capsys):
    """`python -m bench long-video --command 240p`: `stm segment` on a synthetic video in a
    fresh process, its resident set and bank recorded after every frame, in the JSON and its
    plot."""
    from bench import long_video
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert long_video.main(["--device", "cpu", "--command", "240p", "--lengths", "4"]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    payload = json.loads(path.read_text())
    [record] = payload["records"]
    assert payload["command"] == "stm segment" and record["status"] == "ok"
    assert record["frames"] == 4 and record["frame_index"] == [1, 2, 3, 4]
    assert all(rss > 100 * 2**20 for rss in record["rss_bytes"])  # a process with torch
    # frame 0 memorised at step 2, then frame t - 1 beside it as the temporary one
    one = record["bank_bytes"][1]
    assert one > 0 and record["bank_bytes"] == [0, one, 2 * one, 2 * one]
    assert record["capacity_bytes"][-1] == 16 * one  # the bank's first 16 frames
    assert record["growth"] is None  # shorter than the 100 frames growth is counted from
    assert path.with_suffix(".png").is_file()
    assert "| 426x240 | this | 4 | 2 |" in capsys.readouterr().out


def test_the_resident_set_grows_with_the_memory_bank(tmp_path, monkeypatch):
    """`stm segment` (its defaults: bf16 memory on a CPU with bf16 dot products) on 250 frames
    at 240p, in a fresh process: from frame 100 on its resident set grows by the bank's growth
    and at most 40 MiB more. A read that handed oneDNN a new matmul shape per memory length
    grew it by about 1 MiB a frame (oneDNN's and PyTorch's caches keep 1,024 primitives each)."""
    from bench import long_video
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert long_video.main(["--device", "cpu", "--command", "240p", "--lengths", "250"]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    [record] = json.loads(path.read_text())["records"]
    growth = record["growth"]
    assert record["status"] == "ok" and (growth["start"], growth["end"]) == (100, 250)
    assert growth["bank"] > 0
    assert growth["beyond_bank"] < 40 * 2**20, {key: value / 2**20 for key, value in
                                                growth.items() if key in ("rss", "bank")}
