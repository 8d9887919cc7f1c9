"""`python -m bench integrations`: Cutie and STCN on a ping-ponged video, their read and the
fused one, each in its own process (tiny sizes on CPU)."""
import json

import pytest

pytest.importorskip("cutie")
pytest.importorskip("stcnbuf")

from bench import integrations  # noqa: E402
from helpers import synthetic_video, write_davis_folder  # noqa: E402


def test_both_models_both_reads_record_fps_memory_and_render(tmp_path, monkeypatch, capsys):
    # 96x160: 60 memory positions per frame, more than Cutie's top 30 (fewer make it raise)
    frames, labels = synthetic_video(4, size=(96, 160), seed=3)
    write_davis_folder(tmp_path / "davis", frames, labels)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert integrations.main(["--device", "cpu", "--source", str(tmp_path / "davis"),
                              "--sequence", "synth", "--lengths", "3", "7", "--size", "96",
                              "160", "--mem-every", "2"]) == 0
    [path] = (tmp_path / "results").glob("integrations_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["complete"] and (tmp_path / "results" / (path.stem + ".png")).exists()
    records = {(r["model"], r["read"]): r for r in payload["records"]}
    assert set(records) == {(m, r) for m in ("cutie", "stcn") for r in ("original", "fused")}
    for record in records.values():
        assert record["status"] == "ok", record["status"]
        assert [c["length"] for c in record["checkpoints"]] == [3, 7]
        assert [c["memory_frames"] for c in record["checkpoints"]] == [2, 4]
        assert all(c["fps"] > 0 and c["peak_mem_bytes"] >= 0 for c in record["checkpoints"])
        # on a CPU the peaks come from a second run, with freed blocks unmapped
        assert record["memory_status"] == "ok"
    # the video ping-pongs: 7 frames from a 4-frame sequence
    assert "| stcn | fused | 7 | 4 |" in capsys.readouterr().out


def test_a_run_past_its_time_limit_says_where_it_stopped(tmp_path, monkeypatch):
    frames, labels = synthetic_video(3, size=(96, 160), seed=3)
    write_davis_folder(tmp_path / "davis", frames, labels)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert integrations.main(["--device", "cpu", "--source", str(tmp_path / "davis"),
                              "--sequence", "synth", "--models", "cutie", "--reads", "fused",
                              "--lengths", "1000", "--size", "96", "160",
                              "--time-limit", "0"]) == 0
    [path] = (tmp_path / "results").glob("integrations_cpu_*.json")
    [record] = json.loads(path.read_text())["records"]
    assert record["status"].startswith("time limit (0 s) at frame 1")
    assert record["checkpoints"] == [] and record["last"]["length"] == 1
    # the memory run segments the frames the speed run reached, with no clock of its own
    assert record["last"]["peak_mem_bytes"] >= 0 and record["memory_status"] == "ok"
