"""The benchmark suite's entry point, sweeps and renderers (tiny sizes on CPU)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bench import __main__ as suite
from bench import interactive, interactive_eval, kernel, long_video
from helpers import synthetic_video, write_davis_folder


def test_kernel_sweep_runs_records_and_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert suite.main(["kernel", "--device", "cpu", "--hw", "16", "--ns", "64", "256",
                       "--batches", "2", "--providers", "torch", "naive",
                       "--passes", "fwd", "bwd", "--sweeps", "scaling"]) == 0
    [path] = tmp_path.glob("kernel_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "kernel"
    assert payload["matmul_tflops"]["fp32"] > 0 and payload["commit"]
    records = payload["records"]
    assert {(r["provider"], r["pass"], r["N"]) for r in records} == {
        (p, s, n) for p in ("torch", "naive") for s in ("fwd", "bwd") for n in (64, 256)}
    for r in records:
        assert r["status"] == "ok" and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["peak_mem_bytes"] >= 0 and r["tflops"] > 0
    assert {p.name for p in tmp_path.glob("*.png")} == {
        path.stem + "_roofline.png", path.stem + "_memory.png"}
    capsys.readouterr()
    assert suite.main(["render", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| scaling | bwd | fp32 | 2 | 16 | 128 | 512 | 256 |" in table
    assert "| torch | fwd | fp32 | 2 | 256 | - | reached the end of the sweep |" in table


def test_a_kernel_run_without_the_scaling_sweep_writes_its_results_and_no_plot(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert suite.main(["kernel", "--device", "cpu", "--hw", "16", "--shapes-n", "64",
                       "--providers", "torch", "--passes", "fwd", "--sweeps", "shapes",
                       "--full"]) == 0
    [path] = tmp_path.glob("kernel_cpu_*.json")
    records = json.loads(path.read_text())["records"]
    assert {(r["sweep"], r["Ck"], r["Cv"]) for r in records} == {
        ("shapes", ck, cv) for ck in (64, 128) for cv in (256, 512)}
    assert not list(tmp_path.glob("*.png"))
    assert "no scaling sweep in this run" in capsys.readouterr().err


def test_kernel_sweeps_run_the_target_points_first():
    """A GPU run cut off by its time limit keeps the op's target points: they come first,
    whatever order --sweeps names them in."""
    import argparse

    import torch
    expected_ns = {("cuda", False): {16200, 32400, 64800, 162000}, ("cpu", True): {162000},
                   ("cpu", False): {16200}}  # a CPU's default is the quick form
    for (device, full), ns in expected_ns.items():
        args = argparse.Namespace(sweeps=["scaling", "shapes", "targets"], hw=None,
                                  providers=None, passes=None, dtypes=None, batches=None,
                                  ns=None, shapes_n=None, quick=False, full=full)
        _, series = kernel.plan(torch.device(device), args)
        sweeps = [entry[0] for entry in series]
        assert sweeps == sorted(sweeps, key=["targets", "scaling", "shapes"].index), device
        targets = [entry for entry in series if entry[0] == "targets"]
        assert {(entry[4], entry[5], entry[6], entry[7]) for entry in targets} == {
            (1, 1620, 128, 512)}
        assert {N for entry in targets for N in entry[8]} == ns, (device, full)


def test_out_of_memory_and_time_cap_are_reported():
    ok = dict(sweep="scaling", provider="naive", dtype="bf16", B=8, HW=4, Ck=128, Cv=512,
              status="ok", median_ms=1.0, tflops=1.0, peak_mem_bytes=1)
    payload = {"records": [dict(ok, **{"pass": "fwd"}, N=10), dict(ok, **{"pass": "fwd"}, N=20),
                           dict(ok, **{"pass": "fwd"}, N=40, status="oom"),
                           dict(ok, **{"pass": "bwd"}, N=10,
                                status="not run (a call at the previous N took over 4 s)")]}
    limits = kernel.out_of_memory_points(payload)
    assert limits[("naive", "fwd", "bf16", 8)] == (20, 40, "oom")
    assert limits[("naive", "bwd", "bf16", 8)][:2] == (None, 10)


def test_suite_rejects_unknown_commands_and_files(tmp_path):
    with pytest.raises(SystemExit, match="unknown command"):
        suite.main(["kernels"])
    stray = tmp_path / "x.json"
    stray.write_text(json.dumps({"benchmark": "nope"}))
    with pytest.raises(SystemExit, match="unknown benchmark"):
        suite.main(["render", str(stray)])
    help_text = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "python -m bench all" in help_text


def test_ping_pong_walks_the_clip_forwards_and_backwards():
    assert [long_video.ping_pong(t, 4) for t in range(9)] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert long_video.ping_pong(5, 1) == 0


def test_long_video_records_fps_memory_and_read_times(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert long_video.main(["--device", "cpu", "--lengths", "6", "12", "--size", "48", "64",
                            "--variants", "fused", "naive", "fused-channels-last", "--source",
                            "synthetic", "--mem-every", "3"]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    for record in payload["records"]:
        assert record["status"] == "ok" and len(record["frame_ms"]) == 12
        assert [c["length"] for c in record["checkpoints"]] == [6, 12]
        assert [c["memory_frames"] for c in record["checkpoints"]] == [3, 5]  # 0,3 + prev; 0..9
        assert all(0 < r <= f for r, f in zip(record["read_ms"][1:], record["frame_ms"][1:],
                                                 strict=True))
        assert record["read_ms"][0] == 0  # the first frame has no memory to read
    assert [r["read_backend"] for r in payload["records"]] == ["torch", "naive", "torch"]
    assert "| fused | torch | 12 | 5 |" in capsys.readouterr().out


def test_long_video_times_the_reads_kept_eager_between_cuda_graphs():
    """fused-graphs asks for CUDA graphs, which hold the read too (not timed one by one);
    with offloaded memory the read stays eager between them (timed); a read inside one
    compiled graph is not timed."""
    assert long_video.read_timed(long_video.VARIANTS["fused"])
    assert not long_video.read_timed(long_video.VARIANTS["fused-graphs"])
    assert long_video.read_timed(dict(long_video.VARIANTS["fused-graphs"], offload=True))
    assert not long_video.read_timed(long_video.VARIANTS["fused-compile"])
    assert not long_video.read_timed(dict(compile={"mode": "max-autotune-no-cudagraphs"}))


def test_long_video_can_reserve_the_memory_up_front(tmp_path, monkeypatch, capsys):
    """--reserve-memory: the bank holds the longest length's memory frames from the first
    frame (no doubling copy), evicts nothing, and the run is a result of its own."""
    from bench import report
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    arguments = ["--device", "cpu", "--lengths", "6", "60", "--size", "32", "48", "--variants",
                 "fused", "--source", "synthetic", "--mem-every", "3"]
    assert long_video.main(arguments + ["--reserve-memory"]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    reserved = json.loads(path.read_text())
    path.unlink()
    assert long_video.main(arguments) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    growing = json.loads(path.read_text())
    assert reserved["reserve_memory"] and not growing["reserve_memory"]
    assert long_video.reserved_frames(reserved) == 60 // 3 + 2
    [held], [grown] = reserved["records"], growing["records"]
    frames = [c["memory_frames"] for c in held["checkpoints"]]
    assert frames == [c["memory_frames"] for c in grown["checkpoints"]]  # nothing evicted
    assert frames[-1] > 16  # past the growing bank's first 16 slots
    # the reserved bank's bytes never change; the growing one's double past its 16 slots
    held_bytes = [c["memory_bytes"] for c in held["checkpoints"]]
    grown_bytes = [c["memory_bytes"] for c in grown["checkpoints"]]
    assert held_bytes[0] == held_bytes[-1] == grown_bytes[-1] == 2 * grown_bytes[0]
    assert report.result_key(reserved) != report.result_key(growing)
    assert "the memory bank allocated up front for the longest length" in \
        long_video.summary(reserved)


def test_long_video_table_shows_the_peak_beyond_the_memory_bank():
    """Issue 57 item 7's memory goal read off the table: the peak less the bank, per length
    ("-" for an offloaded bank, whose bytes are not on the device the peak measures)."""
    def checkpoint(length, peak_mib, memory_mib):
        return dict(length=length, memory_frames=length // 5, fps=40.0, fps_last_100=40.0,
                    peak_mem_bytes=peak_mib * 2**20, memory_bytes=memory_mib * 2**20)
    records = [dict(variant=variant, read_backend="triton", status="ok", read_timed=True,
                    checkpoints=[checkpoint(100, 300 + growth, 20),
                                 checkpoint(1000, 500 + 10 * growth, 200)],
                    frame_index=list(range(1000)), frame_ms=[25.0] * 1000, read_ms=[5.0] * 1000)
               for variant, growth in (("fused", 0), ("naive", 90), ("fused-offload", 0))]
    table = long_video.summary(dict(video="v", size=[480, 854], model_name="official",
                                    mem_every=5, records=records))
    assert "| fused | triton | 100 | 20 | 40.0 | 40.0 | 300 | 20 | 280 | 5.00 | 20.00 |" in table
    assert "| fused | triton | 1000 | 200 | 40.0 | 40.0 | 500 | 200 | 300 |" in table
    assert "| naive | triton | 1000 | 200 | 40.0 | 40.0 | 1400 | 200 | 1200 |" in table
    assert "| fused-offload | triton | 1000 | 200 | 40.0 | 40.0 | 500 | 200 | - |" in table


def test_long_video_stops_a_variant_at_its_time_limit(tmp_path, monkeypatch, capsys):
    """--time-limit (a lent GPU's 10-minute call): the variant stops after the frame that
    crossed it, recorded with a checkpoint there; the file is complete. The limit is 1 ns: the
    first frame (a mask merged, nothing read) can take under a millisecond."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert long_video.main(["--device", "cpu", "--lengths", "2", "400", "--size", "32", "48",
                            "--variants", "fused", "--source", "synthetic", "--mem-every", "3",
                            "--time-limit", "1e-9"]) == 0
    [path] = tmp_path.glob("long_video_cpu_*.json")
    payload = json.loads(path.read_text())
    [record] = payload["records"]
    assert payload["complete"] and payload["time_limit"] == 1e-9
    assert record["status"] == "time limit (1e-09 s) at frame 1"
    assert [c["length"] for c in record["checkpoints"]] == [1] and len(record["frame_ms"]) == 1
    assert "| fused | torch | time limit (1e-09 s) at frame 1 |" in capsys.readouterr().out


def test_interactive_round_timing_records_and_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert interactive.main(["--device", "cpu", "--frames", "10", "--size", "48", "64",
                             "--memory-frames", "1", "3", "--repeats", "2", "--source",
                             "synthetic", "--batch-size", "4"]) == 0
    [path] = tmp_path.glob("interactive_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    assert [r["read_backend"] for r in payload["records"]] == ["torch", "naive"]
    for record in payload["records"]:
        assert sorted(record["rounds"]) == ["1", "3"] and record["first_round_s"] > 0
        assert all(len(r["times_s"]) == 2 and r["median_s"] > 0
                   for r in record["rounds"].values())
    assert "| fused | torch |" in capsys.readouterr().out


def test_interactive_eval_benchmark_on_a_davis_folder(tmp_path, monkeypatch, capsys):
    frames, labels = synthetic_video(6, size=(64, 96), seed=2)
    write_davis_folder(tmp_path / "davis", frames, labels)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert interactive_eval.main(["--device", "cpu", "--root", str(tmp_path / "davis"),
                                  "--rounds", "2", "--size", "32", "48"]) == 0
    [path] = (tmp_path / "results").glob("interactive_eval_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / "results" / (path.stem + ".png")).exists()
    assert 1 <= len(payload["sequences"]["synth"]["rounds"]) <= 2
    assert "| synth | 2 | 6 |" in capsys.readouterr().out


def test_davis_test_benchmark_scores_with_stm_eval_and_plots_the_curve(tmp_path, monkeypatch,
                                                                       capsys):
    """The benchmark's J&F per sequence is what `stm eval --davis2016` gives for the masks of
    `stm segment` with the same model; the run's metrics.csv becomes the training curve."""
    from bench import davis_test
    from stm_model.cli import main as stm
    frames, labels = synthetic_video(6, size=(64, 96), seed=2)
    write_davis_folder(tmp_path / "davis", frames, labels)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,loss\n20,0.5\n40,0.3\n")
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert davis_test.main(["--checkpoint", "small", "--davis", str(tmp_path / "davis"),
                            "--sequences", "synth", "--run", str(tmp_path / "run"),
                            "--static-steps", "20"]) == 0
    [path] = (tmp_path / "results").glob("davis_test_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / "results" / (path.stem + ".png")).exists()
    assert payload["training"] == [{"step": 20, "loss": 0.5}, {"step": 40, "loss": 0.3}]
    [record] = payload["records"]
    assert record["frames"] == 6 and record["fps"] > 0
    assert "| synth | 6 |" in capsys.readouterr().out
    assert stm(["segment", str(tmp_path / "davis" / "JPEGImages" / "480p" / "synth"),
                "--mask", str(tmp_path / "davis" / "Annotations" / "480p" / "synth" /
                              "00000.png"), "--checkpoint", "small", "--output",
                str(tmp_path / "seg"), "--overlay", "none", "--quiet",
                "--amp", "fp32"]) == 0  # the benchmark's network: float32 (Python's default)
    (tmp_path / "eval").mkdir()
    (tmp_path / "seg" / "masks").rename(tmp_path / "eval" / "synth")
    assert stm(["eval", str(tmp_path / "eval"), str(tmp_path / "davis" / "Annotations" / "480p"),
                "--davis2016"]) == 0
    row = (tmp_path / "eval" / "global_results.csv").read_text().splitlines()[1].split(",")
    assert abs(float(row[0]) - payload["J&F"]) < 1e-9


def test_memory_dtype_benchmark_scores_each_dtype_and_compares_its_masks(tmp_path, monkeypatch,
                                                                         capsys):
    """Per dtype: J&F, fps and the memory per frame (float32 four bytes a channel-position,
    bf16 and fp16 two); the masks' IoU with the first dtype's for the others."""
    from bench import memory_dtype
    frames, labels = synthetic_video(6, size=(64, 96), seed=2)
    write_davis_folder(tmp_path / "davis", frames, labels)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    with pytest.raises(SystemExit):  # each dtype once
        memory_dtype.main(["--davis", str(tmp_path / "davis"), "--dtypes", "fp32", "fp32"])
    assert memory_dtype.main(["--checkpoint", "small", "--davis", str(tmp_path / "davis"),
                              "--sequences", "synth", "--dtypes", "fp32", "bf16", "fp16"]) == 0
    [path] = (tmp_path / "results").glob("memory_dtype_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / "results" / (path.stem + ".png")).exists()
    results = payload["results"]
    assert results["fp32"]["memory_bytes_per_frame"] == \
        2 * results["bf16"]["memory_bytes_per_frame"] == \
        2 * results["fp16"]["memory_bytes_per_frame"] > 0
    assert "iou_with_first" not in results["fp32"]["records"][0]
    for dtype in ("bf16", "fp16"):
        [record] = results[dtype]["records"]
        assert 0 <= record["iou_with_first"]["min"] <= record["iou_with_first"]["mean"] <= 1
        assert record["frames"] == 6 and record["fps"] > 0 and 0 <= record["J&F"] <= 1
    table = capsys.readouterr().out
    assert "| fp32 |" in table and "| bf16 |" in table and "| - | - |" in table


def test_mask_iou_per_object():
    from bench.memory_dtype import mask_iou
    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 0], [2, 2, 2]])
    assert mask_iou(a, b) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert mask_iou(a, np.zeros_like(a)) == 0.0


def test_ragged_read_benchmark_records_and_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert suite.main(["ragged-read", "--device", "cpu", "--frames", "1", "2", "--hw", "16",
                       "--ck", "16", "--cv", "32", "--rounds", "3"]) == 0
    [path] = tmp_path.glob("ragged_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    assert {(r["variant"], r["frames"]) for r in payload["records"]} == {
        (variant, frames) for variant in ("ragged", "padded", "per-video", "equal-work")
        for frames in (1, 2)}
    for record in payload["records"]:
        assert record["lengths"] == [16 * record["frames"] * m for m in (1, 2, 3, 4)]
        assert record["q20_ms"] <= record["median_ms"] <= record["q80_ms"]
        # each variant checked against float64 of the memory it reads before it was timed
        assert record["status"] == "ok" and 0 <= record["errors"]["out"] < 2e-5
    assert "| 2 | 32, 64, 96, 128 |" in capsys.readouterr().out


def test_a_ragged_read_off_float64_is_reported_wrong_and_not_timed(tmp_path, monkeypatch):
    """A ragged read that reads past an object's length (here the lengths ignored) is off the
    float64 read of each object's own memory: recorded wrong, not timed."""
    from bench import ragged_read
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    real = ragged_read.calls
    monkeypatch.setattr(ragged_read, "calls", lambda variant, q, k, v, lengths, backend: real(
        "padded" if variant == "ragged" else variant, q, k, v, lengths, backend))
    assert suite.main(["ragged-read", "--device", "cpu", "--frames", "1", "--hw", "16",
                       "--ck", "16", "--cv", "32", "--rounds", "2"]) == 0
    [path] = tmp_path.glob("ragged_read_cpu_*.json")
    records = {r["variant"]: r for r in json.loads(path.read_text())["records"]}
    assert records["ragged"]["status"].startswith("wrong: out off float64")
    assert "median_ms" not in records["ragged"]
    assert all(records[v]["status"] == "ok" for v in ("padded", "per-video", "equal-work"))


def test_topk_read_benchmark_records_and_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert suite.main(["topk-read", "--device", "cpu", "--ns", "300", "600", "--hw", "20",
                       "--ck", "16", "--cv", "32", "--top-k", "5", "--rounds", "2"]) == 0
    [path] = tmp_path.glob("topk_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    assert {(r["provider"], r["N"]) for r in payload["records"]} == {
        (p, n) for p in ("topk", "stcn", "plain", "plain+usage") for n in (300, 600)}
    for record in payload["records"]:
        assert record["status"] == "ok" and record["peak_mem_bytes"] >= 0
        assert record["q20_ms"] <= record["median_ms"] <= record["q80_ms"]
        assert 0 <= record["errors"]["out"] < 2e-5  # checked against float64 first
    assert "| 600 |" in capsys.readouterr().out


def test_a_top_k_read_off_float64_is_reported_wrong_and_not_timed(tmp_path, monkeypatch):
    """STCN's transcribed read with one position too many kept is off the float64 top-k read:
    recorded wrong, not timed; the others are timed."""
    from bench import topk_read
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    real = topk_read.stcn_read
    monkeypatch.setattr(topk_read, "stcn_read", lambda q, k, v, top_k: real(q, k, v, top_k + 1))
    assert suite.main(["topk-read", "--device", "cpu", "--ns", "300", "--hw", "20", "--ck",
                       "16", "--cv", "32", "--top-k", "5", "--rounds", "2"]) == 0
    [path] = tmp_path.glob("topk_read_cpu_*.json")
    records = {r["provider"]: r for r in json.loads(path.read_text())["records"]}
    assert records["stcn"]["status"].startswith("wrong: out off float64")
    assert all(records[p]["status"] == "ok" for p in ("topk", "plain", "plain+usage"))


def test_a_run_cut_off_keeps_its_records_marked_incomplete(tmp_path, monkeypatch):
    """Each point is saved as it is measured (a lent GPU's time limit can kill a run): the
    file holds the points so far, marked incomplete, and the README header says so."""
    from bench import report
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    real_point = kernel.run_point
    calls = []

    def cut_off_after_one(*arguments, **keywords):
        if calls:
            raise KeyboardInterrupt  # what a time limit's signal looks like to the run
        calls.append(arguments)
        return real_point(*arguments, **keywords)
    monkeypatch.setattr(kernel, "run_point", cut_off_after_one)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["kernel", "--device", "cpu", "--hw", "16", "--ns", "64", "256",
                    "--batches", "1", "--providers", "torch", "--passes", "fwd",
                    "--sweeps", "scaling"])
    [path] = tmp_path.glob("kernel_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["complete"] is False and len(payload["records"]) == 1
    assert payload["records"][0]["N"] == 64 and payload["records"][0]["status"] == "ok"
    assert "incomplete: the run was cut off" in report.render("kernel", tmp_path)
    monkeypatch.setattr(kernel, "run_point", real_point)
    assert suite.main(["kernel", "--device", "cpu", "--hw", "16", "--ns", "64",
                       "--batches", "1", "--providers", "torch", "--passes", "fwd",
                       "--sweeps", "scaling"]) == 0
    finished = max(tmp_path.glob("kernel_cpu_*.json"))
    assert json.loads(finished.read_text())["complete"] is True


def test_multi_object_benchmark_composites_touching_objects_and_scores_each(
        tmp_path, monkeypatch, capsys):
    """Two one-object sequences make a clip whose first frame has both objects touching; each
    object is scored as `stm eval` (DAVIS-2017 protocol) scores it, the clip by their mean."""
    from bench import multi_object
    from scipy import ndimage
    from stm_model import io as video_io
    for name, seed in (("a", 2), ("b", 5)):
        frames, labels = synthetic_video(6, size=(64, 96), seed=seed, objects=1)
        write_davis_folder(tmp_path / "davis", frames, labels, name=name)
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    assert multi_object.main(["--checkpoint", "small", "--davis", str(tmp_path / "davis"),
                              "--clips", "a+b", "--write-root", str(tmp_path / "clips")]) == 0
    first = video_io.read_mask(tmp_path / "clips" / "Annotations" / "480p" / "a+b" / "00000.png")
    assert set(np.unique(first)) == {0, 1, 2}
    assert (ndimage.binary_dilation(first == 2, iterations=2) & (first == 1)).any()
    [path] = (tmp_path / "results").glob("multi_object_cpu_*.json")
    assert path.with_suffix(".png").exists()
    assert path.with_name(path.stem + "_clips.png").exists()
    payload = json.loads(path.read_text())
    [record] = payload["records"]
    assert [obj["id"] for obj in record["objects"]] == [1, 2]
    assert record["J&F"] == pytest.approx(np.mean([obj["J&F"] for obj in record["objects"]]))
    assert "| a+b | 6 |" in capsys.readouterr().out
    from stm_model.cli import main as stm
    (tmp_path / "eval").mkdir()
    assert stm(["segment", str(tmp_path / "clips" / "JPEGImages" / "480p" / "a+b"), "--mask",
                str(tmp_path / "clips" / "Annotations" / "480p" / "a+b" / "00000.png"),
                "--checkpoint", "small", "--output", str(tmp_path / "seg"), "--overlay", "none",
                "--quiet", "--amp", "fp32"]) == 0  # the benchmark's float32 network
    (tmp_path / "seg" / "masks").rename(tmp_path / "eval" / "a+b")
    assert stm(["eval", str(tmp_path / "eval"),
                str(tmp_path / "clips" / "Annotations" / "480p")]) == 0
    row = (tmp_path / "eval" / "global_results.csv").read_text().splitlines()[1].split(",")
    assert float(row[0]) == pytest.approx(payload["J&F"], abs=1e-3)  # the CSV's 3 decimals
    with pytest.raises(SystemExit):
        multi_object.main(["--davis", str(tmp_path / "davis"), "--clips", "a"])


def test_deploy_benchmark_times_every_runtime_and_measures_memory_per_size(
        tmp_path, monkeypatch, capsys):
    """A synthetic clip (no DAVIS root given): fps of torch and both ONNX reads, and each
    runtime's memory and step peak in fresh processes at two memory sizes; the whole read's
    step grows with the memory, the chunk read's does not by as much."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bench import deploy
    from stm_model.export import to_onnx
    to_onnx("small", tmp_path / "onnx")
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(deploy, "FRAME_SIZE", (96, 128))
    assert deploy.main(["--checkpoint", "small", "--export", str(tmp_path / "onnx"),
                        "--davis", str(tmp_path / "none"), "--frames", "3",
                        "--memory-frames", "2", "40"]) == 0
    [path] = (tmp_path / "results").glob("deploy_cpu_*.json")
    assert path.with_suffix(".png").exists()
    payload = json.loads(path.read_text())
    assert [r["runtime"] for r in payload["speed"]] == list(deploy.RUNTIMES)
    assert all(r["fps"] > 0 and len(r["fps_runs"]) == 2 for r in payload["speed"])
    memory = {(r["runtime"], r["memory_frames"]): r for r in payload["memory"]}
    assert all(r["status"] == "ok" for r in memory.values()), memory
    assert memory[("onnx_chunk", 40)]["memory_bytes"] > 10 * memory[("onnx_chunk", 2)][
        "memory_bytes"]
    assert set(deploy.peak_ratios(payload)) == {2, 40}
    out = capsys.readouterr().out
    assert "| onnx_chunk |" in out and "| 40 |" in out
