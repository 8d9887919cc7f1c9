"""`bench long-video --memory-dtype ... --max-memory-bytes B`: each memory dtype keeps the
memory frames that fit in one bank budget, and the table compares them."""
import json

import pytest

from bench import long_video


def _frame_bytes(config, positions, dtype):
    """A memory frame's bytes for one object, written out: 16-bit keys and values, or 8-bit
    ones with a float32 scale per key channel and per value position."""
    channels = config.key_dim + config.value_dim
    if dtype == "bf16":
        return 2 * channels * positions
    return channels * positions + 4 * (config.key_dim + positions)


def test_a_bank_budget_keeps_the_frames_each_memory_dtype_fits(tmp_path, monkeypatch, capsys):
    from stm_model import STMConfig
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    config = STMConfig.small()
    positions = 3 * 4  # 48 x 64 frames at stride 16
    budget = 4 * _frame_bytes(config, positions, "bf16") + 100  # bf16: 4 frames
    assert long_video.main(["--device", "cpu", "--lengths", "5", "21", "--size", "48", "64",
                            "--variants", "fused", "--source", "synthetic", "--mem-every", "2",
                            "--memory-dtype", "bf16", "int8",
                            "--max-memory-bytes", str(budget)]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["max_memory_bytes"] == budget and payload["dtypes"] == ["bf16", "int8"]
    bf16, int8 = payload["records"]
    assert (bf16["memory_dtype"], int8["memory_dtype"]) == ("bf16", "int8")
    for record in (bf16, int8):
        frame_bytes = _frame_bytes(config, positions, record["memory_dtype"])
        assert record["memory_frame_bytes"] == frame_bytes
        assert record["budget_frames"] == budget // frame_bytes
        end = record["checkpoints"][-1]
        # frames 0 and 2 and the previous one, 3; then the budget full (the last frame a
        # temporary one: odd), the oldest evicted
        assert [c["memory_frames"] for c in record["checkpoints"]] == [
            3, record["budget_frames"]]
        assert end["memory_held_bytes"] == record["budget_frames"] * frame_bytes <= budget
        assert record["chunk_copy_bytes"] == \
            (config.key_dim + config.value_dim) * 1024 * 6
    assert bf16["budget_frames"] == 4 and int8["budget_frames"] == 7
    table = capsys.readouterr().out
    assert "| fused bf16 | torch | 21 | 4 |" in table and "| fused int8 | torch | 21 | 7 |" in table
    assert f"| fused int8 | {_frame_bytes(config, positions, 'int8'):,} | 7 | 1.75 | 7 |" in table


@pytest.mark.parametrize("arguments, message", [
    (["--variants", "fused-fp16", "--memory-dtype", "int8"],
     "the variants fused-fp16 set their own memory dtype"),
    (["--max-memory-bytes", "1000", "--reserve-memory"], "give one"),
    (["--max-memory-bytes", "0"], "must be a positive number of bytes"),
])
def test_bad_budget_arguments_are_one_line_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        long_video.main(["--device", "cpu", "--source", "synthetic", *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_budget_below_two_memory_frames_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    with pytest.raises(Exception, match="holds 1 memory frames"):
        long_video.run_variant(dict(
            device="cpu", variant="fused", memory_dtype="int8", model="small", size=[48, 64],
            lengths=[2], source="synthetic", sequence=None, mem_every=1,
            max_memory_bytes=4000))
