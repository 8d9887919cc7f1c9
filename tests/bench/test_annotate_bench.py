"""`python -m bench annotate` at a tiny size: it records load, switch and round times and plots
them (skipped without a headless Chromium, as the browser tests)."""
import json

import pytest

from bench import annotate
from tools import headless_chromium


def test_the_annotate_benchmark_records_and_renders(tmp_path, monkeypatch, capsys):
    why = headless_chromium.missing()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert annotate.main(["--frames", "6", "--size", "48", "64", "--switches", "5"]) == 0
    [path] = tmp_path.glob("annotate_cpu_*.json")
    payload = json.loads(path.read_text())
    record = payload["records"][0]
    assert payload["complete"] and payload["frames"] == 6 and record["load_s"] > 0
    for stage in ("before_round", "after_round"):
        assert record[stage]["page"]["count"] == record[stage]["driver"]["count"] == 5
        assert 0 < record[stage]["page"]["median_ms"] <= record[stage]["page"]["max_ms"]
    assert 0 < record["round_server_s"] <= record["round_s"]
    assert path.with_suffix(".png").is_file()
    assert "| switch after round, page |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="at most --frames - 1"):
        annotate.main(["--frames", "6", "--switches", "6"])
