"""bench.dataset_throughput on tiny sizes: records, table, plot."""
import json

from bench import dataset_throughput
from helpers import synthetic_video, write_davis_folder


def test_dataset_throughput_records_every_variant_and_renders(tmp_path, monkeypatch, capsys):
    root = tmp_path / "davis"
    for index, frames in enumerate((5, 8, 3)):
        images, labels = synthetic_video(frames, size=(48, 80), seed=30 + index)
        write_davis_folder(root, images, labels, name=f"seq{index}")
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert dataset_throughput.main(["--device", "cpu", "--root", str(root), "--size", "32", "48",
                                    "--stride", "1", "--batch-sizes", "2",
                                    "--repeats", "2"]) == 0
    [path] = (tmp_path / "results").glob("dataset_throughput_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / "results" / (path.stem + ".png")).exists()
    assert [(r["variant"], r["repeat"]) for r in payload["records"]] == [
        (name, repeat) for repeat in (0, 1)
        for name in ("one at a time", "batched K=2")]  # interleaved
    for record in payload["records"]:
        assert record["frames"] == 16 and record["videos"] == 3 and record["fps"] > 0
    steps = {r["variant"]: r["steps"] for r in payload["records"]}
    assert steps == {"one at a time": None, "batched K=2": 8}  # seq2 joins as seq0 ends
    table = capsys.readouterr().out
    assert "| batched K=2 | 3 | 16 | 8 | 2.00 |" in table and "| one at a time | 3 | 16 | 16 |" \
        in table
    assert "3 sequences (3-8 frames each), 48x32" in dataset_throughput.summary(payload)
