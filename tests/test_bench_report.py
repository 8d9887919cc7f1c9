"""The README's benchmark tables come from the committed result files, unedited."""
import json

from bench import report


def test_readme_tables_match_the_committed_results():
    assert report.main(["--check"]) == 0, "run python -m bench.report"


def test_render_picks_the_newest_file_per_device(tmp_path):
    base = {"benchmark": "memory_read", "device": "Test GPU", "device_type": "cuda",
            "torch": "2", "triton": "3", "commit": "abcdef1234567890", "HW": 4, "Ck": 2,
            "Cv": 2, "matmul_tflops": {"bf16": 100.0}}
    record = {"provider": "triton", "pass": "fwd", "dtype": "bf16", "B": 1, "HW": 4, "N": 8,
              "Ck": 2, "Cv": 2, "status": "ok", "median_ms": 2.0, "tflops": 50.0,
              "peak_mem_bytes": 2**20}
    naive = dict(record, provider="naive", median_ms=8.0)
    old = dict(base, date="2026-01-01T00:00:00+00:00", records=[record])
    new = dict(base, date="2026-02-01T00:00:00+00:00", records=[record, naive])
    (tmp_path / "memory_read_cuda_20260101T000000.json").write_text(json.dumps(old))
    (tmp_path / "memory_read_cuda_20260201T000000.json").write_text(json.dumps(new))
    text = report.rewrite("a\n<!-- bench:memory_read -->\nstale\n<!-- /bench:memory_read -->\n",
                          tmp_path)
    assert "stale" not in text and "2026-02-01" in text and "Test GPU" in text
    assert ("| scaling | fwd | bf16 | 1 | 4 | 2 | 2 | 8 | 2.000 | 50.00 | 50% | 1.0 | n/a | "
            "4.00x | n/a | 1.0x |") in text
    assert report.render("training", tmp_path).startswith("_No `training` results")
