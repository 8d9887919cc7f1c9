"""`python -m bench network-dtype`: the network in float32 and under bf16 autocast on a real
DAVIS sequence, interleaved, scored and compared mask by mask."""
import json

import pytest

from bench import network_dtype
from helpers import SHARED

DAVIS = SHARED / "data" / "davis2016-val"


@pytest.mark.skipif(not DAVIS.exists(), reason="../shared/data is absent")
def test_both_modes_segment_score_and_compare_each_sequence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    segmented = []
    real = network_dtype.segment_sequence

    def recorded(model, frames_dir, *arguments, amp_dtype=None, **options):
        segmented.append((frames_dir.name, amp_dtype))
        return real(model, frames_dir, *arguments, amp_dtype=amp_dtype, **options)
    monkeypatch.setattr(network_dtype, "segment_sequence", recorded)
    assert network_dtype.main(["--davis", str(DAVIS), "--sequences", "blackswan", "car-shadow",
                               "--rounds", "2", "--max-frames", "8"]) == 0
    # ABBA: the modes' order swapped every sequence and round
    assert segmented == [("blackswan", None), ("blackswan", "bf16"),
                         ("car-shadow", "bf16"), ("car-shadow", None),
                         ("blackswan", None), ("blackswan", "bf16"),
                         ("car-shadow", "bf16"), ("car-shadow", None)]
    [path] = tmp_path.glob("network_dtype_cpu_*.json")
    payload = json.loads(path.read_text())
    fp32, amp = payload["results"]["fp32"], payload["results"]["bf16-autocast"]
    assert [r["sequence"] for r in fp32["records"]] == ["blackswan", "car-shadow"]
    for plain, other in zip(fp32["records"], amp["records"], strict=True):
        assert plain["frames"] == other["frames"] == 8 and plain["fps"] > 0
        # bf16 rounding moves a few boundary pixels, not the objects
        assert other["iou_with_fp32"]["mean"] > 0.9 and abs(plain["J&F"] - other["J&F"]) < 0.05
    assert 0.7 < fp32["J&F"] <= 1  # small-real's first frames of these two
    assert (tmp_path / (path.stem + ".png")).exists()
    assert "| **all** | " in capsys.readouterr().out
