"""The profile stage's tools on CPU: tools.gpu_session.profile_target's passes (run in the Triton
interpreter at a tiny shape) and kernel-time table, and tools.gpu_session.ncu_summary on
handmade ncu CSV
exports in both of ncu's layouts (the real ones come from the GPU machine)."""
import csv
import io
import json
import types

import pytest
import torch

from bench import common
from tools.gpu_session import ncu_summary, profile_target

# Launch order of one profiled round: forward (+ merge), forward+backward, the Gluon forward at
# its default tiling and with the row split (+ merge each).
ORDER = ["memory_read_fwd_kernel", "memory_read_merge_kernel", "memory_read_fwd_kernel",
         "memory_read_merge_kernel", "memory_read_bwd_kernel_dv", "memory_read_bwd_kernel_dkdq",
         "memory_read_ws_fwd_kernel", "memory_read_merge_kernel", "memory_read_ws_fwd_kernel",
         "memory_read_merge_kernel"]
SHAPE = dict(B=1, HW=10, N=100, Ck=128, Cv=512, dtype="bf16")
PASSES = [
    dict(name="forward", lead_kernel="memory_read_fwd_kernel", static_row=None, skipped=None),
    dict(name="forward+backward", lead_kernel="memory_read_fwd_kernel", static_row=None,
         skipped=None),
    dict(name="forward (Gluon)", lead_kernel="memory_read_ws_fwd_kernel",
         static_row="fwd_ws (opt-in)", skipped=None),
    dict(name="forward (Gluon, split rows)", lead_kernel="memory_read_ws_fwd_kernel",
         static_row="fwd_ws rows (opt-in)", skipped=None),
]
STATIC = dict(commit="abc", reports=[
    dict(dtype="fp32", similarity="dot", rows=[dict(kernel="fwd", l2_load_bytes_per_pair=99.0,
                                                    l2_atomic_bytes_per_pair=0.0)]),
    dict(dtype="bf16", similarity="dot", rows=[
        dict(kernel="fwd", l2_load_bytes_per_pair=12.0, l2_atomic_bytes_per_pair=0.0),
        dict(kernel="bwd_dv", l2_load_bytes_per_pair=12.0625, l2_atomic_bytes_per_pair=0.0),
        dict(kernel="bwd_dkdq", l2_load_bytes_per_pair=10.0625, l2_atomic_bytes_per_pair=4.0),
        dict(kernel="merge", l2_load_bytes_per_pair=None, l2_atomic_bytes_per_pair=None),
        dict(kernel="fwd_ws (opt-in)", l2_load_bytes_per_pair=20.0,
             l2_atomic_bytes_per_pair=0.0),
        dict(kernel="fwd_ws rows (opt-in)", l2_load_bytes_per_pair=12.0,
             l2_atomic_bytes_per_pair=0.0)])])


def _metrics(i):
    """Metrics of kernel i: (name, unit, value text), values distinct per kernel."""
    return [("gpu__time_duration.sum", "nsecond", f"{(i + 1) * 1000:,}"),
            ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "%", f"{50 + i}.5"),
            ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed", "%",
             f"{40 + i}"),
            ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "%", "61.25"),
            ("lts__t_bytes.sum", "Mbyte", f"{(i + 1) * 2.5}"),
            ("dram__bytes_read.sum", "byte", "1,000,000"),
            ("dram__bytes_write.sum", "Kbyte", "500"),
            ("sm__warps_active.avg.pct_of_peak_sustained_active", "%", "12.4"),
            ("launch__registers_per_thread", "register/thread", "168"),
            ("launch__shared_mem_per_block_static", "byte", "0"),
            ("launch__shared_mem_per_block_dynamic", "Kbyte", "200"),
            ("smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "0.5"),
            ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "",
             f"{i + 2}"),
            ("smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio", "",
             "1.5"),
            ("smsp__average_warps_issue_stalled_not_issued_per_issue_active.ratio", "", "99"),
            ("smsp__pcsamp_warps_issue_stalled_wait", "", "7")]


def _write(rows):
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def raw_page(order=ORDER):
    """ncu --page raw --csv: ==PROF== lines, a header, a units row, one row per kernel."""
    names = [name for name, _, _ in _metrics(0)]
    units = [unit for _, unit, _ in _metrics(0)]
    rows = [["ID", "Process ID", "Kernel Name"] + names, ["", "", ""] + units]
    rows += [[str(i), "42", name] + [value for _, _, value in _metrics(i)]
             for i, name in enumerate(order)]
    return "==PROF== Connected to process 42\n" + _write(rows)


def long_form(order=ORDER):
    rows = [["ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]]
    rows += [[str(i), name, "s", metric, unit, value]
             for i, name in enumerate(order) for metric, unit, value in _metrics(i)]
    return _write(rows)


# --------------------------------------------------------------------------- ncu_summary


def test_raw_page_summary_per_kernel():
    rows = ncu_summary.summarise(raw_page(), dict(passes=PASSES, shape=SHAPE), STATIC)
    assert [row["kernel"] for row in rows] == ORDER
    assert [row["pass"] for row in rows] == [
        "forward", "forward", "forward+backward", "forward+backward", "forward+backward",
        "forward+backward", "forward (Gluon)", "forward (Gluon)",
        "forward (Gluon, split rows)", "forward (Gluon, split rows)"]
    dv = rows[4]
    assert dv["duration_us"] == 5.0  # "5,000" nsecond
    assert dv["sm_throughput_pct"] == 54.5 and dv["tensor_pipe_pct"] == 44
    assert dv["l2_bytes"] == pytest.approx(12.5e6)  # 12.5 Mbyte
    assert dv["l2_tbps"] == pytest.approx(12.5e6 / 5e-6 / 1e12, rel=1e-3)
    assert dv["dram_bytes"] == pytest.approx(1.5e6)  # read (byte) + write (Kbyte)
    assert dv["shared_bytes"] == pytest.approx(200e3)
    assert dv["registers"] == 168 and dv["occupancy_pct"] == 12.4
    # the largest stalls of the Warp State family, "not_issued" left out, largest first
    assert list(dv["stalls"]["reasons"].items())[:2] == [("long_scoreboard", 6.0),
                                                         ("math_pipe_throttle", 1.5)]
    assert "not_issued" not in dv["stalls"]["reasons"]
    # static prediction: bytes per pair (loads + atomics) x B x HW x N
    pairs = SHAPE["B"] * SHAPE["HW"] * SHAPE["N"]
    assert rows[0]["static_row"] == "fwd" and rows[0]["static_l2_bytes"] == 12 * pairs
    assert rows[5]["static_l2_bytes"] == pytest.approx(14.0625 * pairs)
    assert rows[6]["static_row"] == "fwd_ws (opt-in)" and rows[6]["static_l2_bytes"] == 20 * pairs
    assert rows[8]["static_row"] == "fwd_ws rows (opt-in)"
    assert rows[8]["l2_measured_over_static"] == round(22.5e6 / (12 * pairs), 3)
    assert "static_l2_bytes" not in rows[1]  # merge: no main loop in the report


def test_long_export_gives_the_same_summary():
    manifest = dict(passes=PASSES, shape=SHAPE)
    assert ncu_summary.summarise(long_form(), manifest, STATIC) == \
        ncu_summary.summarise(raw_page(), manifest, STATIC)


def test_skipped_pass_and_missing_metrics():
    # The default Gluon tiling did not run: the only Gluon kernel is the row split's.
    passes = [dict(run, skipped="needs sm_90") if run["name"] == "forward (Gluon)" else run
              for run in PASSES]
    order = ORDER[:6] + ["memory_read_ws_fwd_kernel"]
    text = raw_page(order)
    rows = ncu_summary.summarise(text, dict(passes=passes, shape=SHAPE), STATIC)
    assert rows[-1]["pass"] == "forward (Gluon, split rows)"
    assert rows[-1]["static_row"] == "fwd_ws rows (opt-in)"
    # a report without the L2 bytes falls back to sectors; one without either reports None
    kernel = dict(id="0", name="k", metrics={"lts__t_sectors.sum": ("1,000", "sector"),
                                             "gpu__time_duration.sum": ("2", "usecond")})
    row = ncu_summary.summarise_kernel(kernel)
    assert row["l2_bytes"] == 32000 and row["l2_tbps"] == pytest.approx(0.016)
    assert row["dram_bytes"] is None and row["dram_tbps"] is None
    assert row["tensor_pipe_pct"] is None and row["stalls"] is None
    # unknown unit: not guessed
    kernel["metrics"]["gpu__time_duration.sum"] = ("2", "fortnight")
    assert ncu_summary.summarise_kernel(kernel)["duration_us"] is None
    # sampled stalls when the Warp State family is absent
    kernel["metrics"].update({"smsp__pcsamp_warps_issue_stalled_barrier": ("30", ""),
                              "smsp__pcsamp_warps_issue_stalled_wait": ("70", ""),
                              "smsp__pcsamp_warps_issue_stalled_wait_not_issued": ("99", "")})
    assert ncu_summary.stalls(kernel["metrics"])["reasons"] == {"wait": 70.0, "barrier": 30.0}


def test_without_manifest_units_row_or_header():
    rows = ncu_summary.summarise(raw_page())
    assert all(row["pass"] is None and "static_l2_bytes" not in row for row in rows)
    # no units row: values in ncu's base units (nanoseconds, bytes), as --print-units base
    lines = raw_page().splitlines()
    no_units = ncu_summary.summarise("\n".join(lines[:2] + lines[3:]))
    assert [row["duration_us"] for row in no_units] == [row["duration_us"] for row in rows]
    assert no_units[4]["l2_bytes"] == 12.5 and no_units[4]["dram_bytes"] == 1e6 + 500
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu_summary.read_ncu_csv("==PROF== nothing was profiled\n")


def test_cli_writes_results_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    (tmp_path / "raw.csv").write_text(raw_page())
    manifest = dict(device="H100 (test)", device_type="cuda", torch="t", triton="3.6",
                    commit="c0ffee", date="2026-11-23T10:00:00+00:00", shape=SHAPE,
                    passes=PASSES)
    (tmp_path / "passes.json").write_text(json.dumps(manifest))
    (tmp_path / "static.json").write_text(json.dumps(STATIC))
    ncu_summary.main([str(tmp_path / "raw.csv"), "--passes", str(tmp_path / "passes.json"),
                      "--static", str(tmp_path / "static.json")])
    payload = json.loads((tmp_path / "ncu_cuda_20261123T100000.json").read_text())
    assert payload["device"] == "H100 (test)" and payload["static_report"] == "abc"
    assert len(payload["kernels"]) == len(ORDER)
    table = capsys.readouterr().out
    assert "| forward+backward | memory_read_bwd_kernel_dv | 5.0 | 54 | 44 |" in table
    assert "long_scoreboard 6" in table
    from bench.__main__ import render
    render(tmp_path / "ncu_cuda_20261123T100000.json")  # `python -m bench render FILE`
    assert capsys.readouterr().out.strip() == table.strip().split("\n", 1)[1]
    with pytest.raises(SystemExit, match="no such file"):
        ncu_summary.main([str(tmp_path / "missing.csv")])
    (tmp_path / "empty.csv").write_text("==PROF== Disconnected\n")
    with pytest.raises(SystemExit, match="empty.csv: no ncu CSV header"):
        ncu_summary.main([str(tmp_path / "empty.csv")])


# --------------------------------------------------------------------------- profile_target


def test_passes_run_in_the_interpreter_and_gluon_is_skipped_without_sm90():
    pytest.importorskip("triton")
    q, k, v, grad = common.read_inputs(2, 20, 70, 16, 24, torch.float32, "cpu",
                                       requires_grad=True)
    runs = profile_target.passes(q, k, v, grad)
    assert [run["name"] for run in runs] == [
        "forward", "forward+backward", "forward (Gluon)", "forward (Gluon, split rows)",
        "forward+backward (Gluon dV, dK/dQ)"]
    assert [run["name"] for run in runs] == list(profile_target.PASS_NAMES)  # --passes' choices
    assert [run["flops"] for run in runs] == [2.0 * 2 * 20 * 70 * 40 * f
                                              for f in (1, 3.5, 1, 1, 3.5)]
    for run in runs[:2]:
        assert run["skipped"] is None
        run["run"]()
        run["run"]()  # twice: gradients are reset, not accumulated
    assert k.grad is not None and torch.isfinite(k.grad).all()
    once = k.grad.clone()
    runs[1]["run"]()
    assert torch.equal(k.grad, once)
    for run in runs[2:4]:
        assert run["skipped"] and run["lead_kernel"] == profile_target.WARP_SPECIALIZED_KERNEL
    assert runs[4]["skipped"] and runs[4]["lead_kernel"] == profile_target.FORWARD_KERNEL
    described = profile_target._describe(runs)
    assert "run" not in described[0] and json.dumps(described)


def test_kernel_times_per_round():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, device_type, count, us):
        return types.SimpleNamespace(key=key, device_type=device_type, count=count,
                                     self_device_time_total=us)
    table = profile_target.kernel_times([
        event("memory_read_fwd_kernel", cuda, 4, 4000.0),
        event("memory_read_merge_kernel", cuda, 4, 200.0),
        event("aten::empty", cpu, 12, 0.0),
        event("memory_read_fwd_kernel", cuda, 4, 1000.0)], rounds=4)
    assert table == {"memory_read_fwd_kernel": dict(calls=2.0, us=1250.0),
                     "memory_read_merge_kernel": dict(calls=1.0, us=50.0)}
    assert list(table) == ["memory_read_fwd_kernel", "memory_read_merge_kernel"]


def test_breakdown_table_and_plot(tmp_path):
    payload = dict(device="H100 (test)", shape=SHAPE, records=[
        dict(name="forward", skipped=None, median_ms=1.2, tflops=500.0, kernel_ms=1.1,
             kernels={"memory_read_fwd_kernel": dict(calls=1.0, us=1000.0),
                      "memory_read_merge_kernel": dict(calls=1.0, us=100.0)}),
        dict(name="forward+backward", skipped=None, median_ms=4.0, tflops=450.0,
             kernel_ms=0.0, kernels={}),
        dict(name="forward (Gluon)", skipped="needs sm_90")])
    table = profile_target.summary(payload)
    assert "| forward | memory_read_fwd_kernel | 1 | 1000.0 | 91% | 1.200 | 500 |" in table
    assert "| forward (Gluon) | skipped: needs sm_90 |" in table
    assert "| forward+backward | no kernel events recorded | | | | 4.000 | 450 |" in table
    written = profile_target.plot(payload, tmp_path / "breakdown.json")
    assert written[0].name == "breakdown.png" and written[0].stat().st_size > 0
    from bench.__main__ import render
    path = tmp_path / "kernel_breakdown_cuda_20261123T100000.json"
    path.write_text(json.dumps(dict(payload, benchmark="kernel_breakdown")))
    render(path)  # `python -m bench render FILE`: the same chart beside it
    assert path.with_suffix(".png").stat().st_size > 0


def test_profile_target_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile_target.main(["--breakdown"])


@pytest.mark.filterwarnings("ignore:CUDA is not available, disabling CUDA profiling")
def test_breakdown_records_on_cpu(monkeypatch):
    """The breakdown's bookkeeping on CPU (the profiler sees no device kernels here, so the
    table is empty and the pass is timed alone); a skipped pass is recorded, not run."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    q, k, v, grad = common.read_inputs(1, 20, 70, 16, 24, torch.float32, "cpu",
                                       requires_grad=True)
    runs = profile_target.passes(q, k, v, grad)
    records = list(profile_target.breakdown([runs[0], runs[2]], torch.device("cpu"),
                                            rounds=2))
    assert records[0]["name"] == "forward" and records[0]["kernels"] == {}
    assert records[0]["median_ms"] > 0
    assert records[0]["tflops"] == round(runs[0]["flops"] / (records[0]["median_ms"] * 1e-3)
                                         / 1e12, 1)
    assert records[1]["skipped"] and "median_ms" not in records[1]
    assert "| forward | no kernel events recorded |" in profile_target.summary(
        dict(records=records))


def test_profile_target_runs_only_the_passes_named(tmp_path, monkeypatch, capsys):
    """--passes: the passes file lists only the named passes, and only they run between
    cudaProfilerStart and Stop (on CPU here, in the interpreter, at a tiny shape)."""
    pytest.importorskip("triton")
    with pytest.raises(SystemExit):
        profile_target.main(["--passes", "backward"])  # not a pass's name
    assert "invalid choice: 'backward'" in capsys.readouterr().err
    reads = common.read_inputs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "no GPU (test)")
    profiled = []
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: profiled.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: profiled.append("stop"))
    monkeypatch.setattr(common, "read_inputs", lambda *args, **kwargs: reads(
        1, 20, 70, 16, 24, torch.float32, "cpu", requires_grad=True))
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    profile_target.main(["--n", "16200", "--passes", "forward", "forward (Gluon)"])
    [written] = tmp_path.glob("profile_passes_*.json")
    passes = json.loads(written.read_text())["passes"]
    assert [entry["name"] for entry in passes] == ["forward", "forward (Gluon)"]
    assert passes[1]["skipped"]  # no sm_90 here: recorded, not run
    assert profiled == ["start", "stop"]
    assert "profiled: forward\n" in capsys.readouterr().out


def _breakdown_payload(device, N, kernels, HW=1620, skipped=None):
    """A kernel breakdown at memory size N: a forward pass with {kernel: us}."""
    return dict(benchmark="kernel_breakdown", device=device,
                shape=dict(SHAPE, HW=HW, N=N), records=[
                    dict(name="forward", lead_kernel="memory_read_fwd_kernel", skipped=skipped,
                         kernels={name: dict(calls=1.0, us=us) for name, us in kernels.items()})])


def test_fixed_costs_fit_each_kernel_against_the_memory_size():
    frames = (2, 10, 20, 100)
    payloads = [_breakdown_payload("H100", 1620 * f, {
        "memory_read_fwd_kernel": 27.5 + 6.5 * f, "memory_read_merge_kernel": 6.0,
        "void at::native::elementwise_kernel": 3.0}) for f in frames]
    payloads.append(_breakdown_payload("H200", 1620 * 10, {"memory_read_fwd_kernel": 80.0}))
    payloads.append(_breakdown_payload("H100", 1620 * 10, {"memory_read_fwd_kernel": 90.0},
                                       HW=405))
    payloads.append(_breakdown_payload("H100", 1620 * 5, {}, skipped="needs sm_90"))
    rows = profile_target.fixed_costs(payloads)
    # one GPU and query shape, our kernels only; one memory size is not a line
    assert [(row["device"], row["HW"], row["kernel"]) for row in rows] == [
        ("H100", 1620, "memory_read_fwd_kernel"), ("H100", 1620, "memory_read_merge_kernel")]
    forward, merge = rows
    assert forward["ns"] == [1620 * f for f in frames]
    assert forward["us"] == [27.5 + 6.5 * f for f in frames]
    assert forward["fixed_us"] == pytest.approx(27.5) and forward["frame_us"] == pytest.approx(6.5)
    assert forward["worst_residual"] == 0.0
    assert (merge["fixed_us"], merge["frame_us"]) == (pytest.approx(6.0), 0.0)
    # a point off the line: its distance from the fit, as a share of its time
    payloads[0]["records"][0]["kernels"]["memory_read_fwd_kernel"]["us"] += 10.0
    forward = profile_target.fixed_costs(payloads)[0]
    assert forward["fixed_us"] > 27.5 and forward["frame_us"] < 6.5
    assert 0.1 < forward["worst_residual"] < 10.0 / 50.5
    table = profile_target.fixed_cost_table(rows)
    assert ("| H100 | 1 | 1620 | forward | memory_read_fwd_kernel | 3,240, 16,200, 32,400, "
            "162,000 | 27.5 | 6.50 | 0.0% |") in table
    assert profile_target.fixed_cost_table([]).startswith("no kernel measured at two")


def test_fit_reads_breakdown_files(tmp_path, capsys):
    paths = []
    for frames in (10, 100):
        path = tmp_path / f"kernel_breakdown_cuda_{frames}.json"
        path.write_text(json.dumps(_breakdown_payload(
            "H100", 1620 * frames, {"memory_read_fwd_kernel": 27.5 + 6.5 * frames})))
        paths.append(str(path))
    profile_target.main(["--fit", *paths])
    out = capsys.readouterr().out
    assert "| forward | memory_read_fwd_kernel | 16,200, 162,000 | 27.5 | 6.50 |" in out
    plot = tmp_path / "kernel_breakdown_cuda_100_fit.png"  # beside the last file
    assert f"plot: {plot}" in out and plot.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="no breakdown file .*kernel_breakdown_\\*.json"):
        profile_target.main(["--fit", str(tmp_path / "kernel_breakdown_*.json")])


def test_fit_plot_draws_a_panel_per_pass_with_points_and_lines(tmp_path, monkeypatch):
    payloads = [_breakdown_payload("H100", 1620 * f, {
        "memory_read_fwd_kernel": 27.5 + 6.5 * f, "memory_read_merge_kernel": 6.0})
        for f in (2, 10, 100)]
    rows = profile_target.fixed_costs(payloads)
    figures = []
    monkeypatch.setattr(common, "save_figure", lambda figure, path: figures.append(
        (figure, path)) or [path])
    assert profile_target.fit_plot(rows, tmp_path / "fit.png") == [tmp_path / "fit.png"]
    (figure, _), = figures
    (axis,) = figure.axes
    lines = axis.get_lines()  # per kernel: its points, then its line
    assert [list(line.get_ydata()) for line in lines[::2]] == [row["us"] for row in rows]
    assert list(lines[1].get_xdata()) == [0.0, 100.0]
    assert list(lines[1].get_ydata()) == pytest.approx([27.5, 27.5 + 650.0])
    assert "fwd_kernel: 27.5 + 6.50/frame us" in [text.get_text() for text in
                                                   axis.get_legend().get_texts()]
    assert profile_target.fit_plot([], tmp_path / "none.png") == []


def test_breakdown_at_several_memory_sizes_writes_a_file_each_then_fits(
        tmp_path, monkeypatch, capsys):
    """--breakdown --n A B: a file per memory size, named by distinct dates, then the fit (on
    CPU: the passes measured by a stand-in, the dates by a clock that does not move)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "read_inputs", lambda B, HW, N, *args, **kwargs: (
        torch.zeros(1, 1, N),) * 4)
    monkeypatch.setattr(common, "environment", lambda device: dict(
        device="H100 (test)", device_type="cuda", date=next(dates)))
    dates = iter(["2026-11-28T10:00:00+00:00", "2026-11-28T10:00:00+00:00",
                  "2026-11-28T10:00:01+00:00"])
    monkeypatch.setattr(profile_target.time, "sleep", lambda seconds: None)

    def measured(runs, device, rounds):
        N = runs[0]["flops"] / (2.0 * 1620 * 640)
        yield dict(name="forward", lead_kernel="memory_read_fwd_kernel", skipped=None,
                   kernels={"memory_read_fwd_kernel": dict(calls=1.0, us=27.5 + 6.5 * N / 1620)},
                   kernel_ms=0.0, median_ms=1.0, q20_ms=1.0, q80_ms=1.0, tflops=1.0)
    monkeypatch.setattr(profile_target, "breakdown", measured)
    monkeypatch.setattr(profile_target, "passes", lambda q, k, v, grad: [dict(
        name="forward", run=None, flops=2.0 * 1620 * q.shape[2] * 640, lead_kernel="x",
        static_row=None, skipped=None)])
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    profile_target.main(["--breakdown", "--n", "16200", "162000", "--passes", "forward"])
    written = sorted(tmp_path.glob("kernel_breakdown_*.json"))
    assert [path.name for path in written] == ["kernel_breakdown_cuda_20261128T100000.json",
                                               "kernel_breakdown_cuda_20261128T100001.json"]
    assert [json.loads(path.read_text())["shape"]["N"] for path in written] == [16200, 162000]
    out = capsys.readouterr().out
    assert "| 16,200, 162,000 | 27.5 | 6.50 | 0.0% |" in out
    plot = tmp_path / "kernel_breakdown_cuda_20261128T100001_fit.png"  # beside the last file
    assert f"plot: {plot}" in out and plot.is_file()
    with pytest.raises(SystemExit, match="several --n need --breakdown"):
        profile_target.main(["--n", "16200", "162000"])
