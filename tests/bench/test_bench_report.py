"""The benchmark tables (README.md, docs/performance.md) come from the committed result files,
unedited; the plots' titles fit their figures."""
import json

from bench import __main__ as suite
from bench import report


def test_readme_and_docs_tables_match_the_committed_results():
    assert report.main(["--check"]) == 0, "run python -m bench.report"


def test_render_picks_the_newest_file_per_device(tmp_path):
    base = {"benchmark": "kernel", "device": "Test GPU", "device_type": "cuda",
            "torch": "2", "triton": "3", "commit": "abcdef1234567890", "HW": 4, "Ck": 2,
            "Cv": 2, "matmul_tflops": {"bf16": 100.0}}
    record = {"provider": "triton", "pass": "fwd", "dtype": "bf16", "B": 1, "HW": 4, "N": 8,
              "Ck": 2, "Cv": 2, "status": "ok", "median_ms": 2.0, "tflops": 50.0,
              "peak_mem_bytes": 2**20}
    naive = dict(record, provider="naive", median_ms=8.0)
    old = dict(base, date="2026-01-01T00:00:00+00:00", records=[record])
    new = dict(base, date="2026-02-01T00:00:00+00:00", records=[record, naive])
    (tmp_path / "kernel_cuda_20260101T000000.json").write_text(json.dumps(old))
    (tmp_path / "kernel_cuda_20260201T000000.json").write_text(json.dumps(new))
    text = report.rewrite("a\n<!-- bench:kernel -->\nstale\n<!-- /bench:kernel -->\n",
                          tmp_path)
    assert "stale" not in text and "2026-02-01" in text and "Test GPU" in text
    assert ("| scaling | fwd | bf16 | 1 | 4 | 2 | 2 | 8 | 2.000 | 50.00 | 50% | 1.0 | - | naive | "
            "**4.00x** | 4.00x | 1.0x |") in text
    assert report.render("training", tmp_path).startswith("_No `training` results")


def test_results_of_the_old_kernel_name_are_read_as_kernel(tmp_path, capsys):
    """Committed kernel results record "benchmark": "memory_read" (the name before "kernel");
    kernel_work_* files share the file prefix but are another benchmark."""
    path = report.RESULTS / "kernel_cpu_20261122T122706.json"
    assert json.loads(path.read_text())["benchmark"] == "memory_read"
    (tmp_path / path.name).write_text(path.read_text())
    work = sorted(report.RESULTS.glob("kernel_work_*.json"))[-1]
    (tmp_path / work.name).write_text(work.read_text())
    assert [p["_file"] for p in report.newest_results("kernel", tmp_path).values()] == [path.name]
    assert suite.render(tmp_path / path.name) == 0
    assert "| targets | fwd | fp32 | 1 | 1620 | 128 | 512 | 162000 |" in capsys.readouterr().out


def test_committed_results_hold_the_newest_per_benchmark_and_device():
    """bench/results keeps one result per benchmark, device (and size or video length where a
    benchmark runs several): `python -m bench.report --prune` drops the rest (git keeps them)."""
    assert report.superseded() == [], "run python -m bench.report --prune"


def test_superseded_names_the_older_result_of_a_key_and_its_plots(tmp_path):
    base = {"benchmark": "training", "device_type": "cpu", "size": [240, 432]}
    for stamp in ("20260101T000000", "20260201T000000"):
        (tmp_path / f"training_cpu_{stamp}.json").write_text(json.dumps(base))
        (tmp_path / f"training_cpu_{stamp}.png").write_bytes(b"")
    other_size = dict(base, size=[480, 864])
    (tmp_path / "training_cpu_20250101T000000.json").write_text(json.dumps(other_size))
    busy = dict(base, busy=True)  # beside a competing process on purpose: kept beside quiet
    (tmp_path / "training_cpu_20260301T000000.json").write_text(json.dumps(busy))
    assert [path.name for path in report.superseded(tmp_path)] == [
        "training_cpu_20260101T000000.json", "training_cpu_20260101T000000.png"]


def test_a_gpu_result_replaces_the_same_gpus_run_of_the_same_sweeps_only(tmp_path):
    """An H100 run says nothing of an H200, and a kernel run of the float32 shapes sweep says
    nothing of a bf16 targets run: both stay; a newer run of the same sweeps replaces the older."""
    def write(stamp, device, sweeps):
        records = [{"sweep": sweep, "dtype": dtype} for sweep, dtype in sweeps]
        payload = {"benchmark": "kernel", "device_type": "cuda", "device": device,
                   "records": records}
        (tmp_path / f"kernel_cuda_{stamp}.json").write_text(json.dumps(payload))
    write("20260101T000000", "NVIDIA H200", [("targets", "bf16"), ("scaling", "bf16")])
    write("20260102T000000", "NVIDIA H100", [("targets", "bf16"), ("scaling", "bf16")])
    write("20260103T000000", "NVIDIA H100", [("shapes", "fp32")])
    assert report.superseded(tmp_path) == []
    for stamp, name in (("20260101T0000", "NVIDIA H200"), ("20260102T0000", "NVIDIA H100")):
        (tmp_path / f"selftest_cuda_sm90_{stamp}.json").write_text(json.dumps(
            {"selftest": 1, "device": "cuda", "name": name}))
    assert report.superseded(tmp_path) == []
    write("20260104T000000", "NVIDIA H100", [("shapes", "fp32")])
    assert [path.name for path in report.superseded(tmp_path)] == [
        "kernel_cuda_20260103T000000.json"]


def test_a_narrowed_tune_run_does_not_replace_a_full_one(tmp_path):
    """A check of three tilings (--only, under compute-sanitizer) or a float32 tune says nothing
    of the bf16 tuning over every candidate: all stay; a newer full bf16 tuning replaces it."""
    def write(stamp, **scope):
        payload = dict({"benchmark": "tune", "device_type": "cuda", "device": "NVIDIA H100",
                        "dtype": "bf16", "HW": 1620, "records": []}, **scope)
        (tmp_path / f"tune_cuda_{stamp}.json").write_text(json.dumps(payload))
    write("20260101T000000")
    write("20260102T000000", only=["dkdq block_n=64"], sanitizer="memcheck")
    write("20260103T000000", only=["dkdq block_n=64"], sanitizer="racecheck", HW=540)
    write("20260104T000000", dtype="fp32")
    assert report.superseded(tmp_path) == []
    write("20260105T000000")
    assert [path.name for path in report.superseded(tmp_path)] == [
        "tune_cuda_20260101T000000.json"]


def test_a_cpu_result_replaces_the_same_processors_run_only(tmp_path):
    """An AVX2 run says nothing of an AVX-512 one with bf16 dot products: both stay, each
    named by its processor; a newer run on the same kind of processor replaces the older."""
    def write(stamp, flags):
        payload = {"benchmark": "cpu_read", "device_type": "cpu", "cpu_flags": flags}
        (tmp_path / f"cpu_read_cpu_{stamp}.json").write_text(json.dumps(payload))
    write("20260101T000000", ["avx2"])
    write("20260201T000000", ["avx2", "avx512f", "avx512_bf16"])
    write("20260301T000000", ["avx2"])
    assert [path.name for path in report.superseded(tmp_path)] == [
        "cpu_read_cpu_20260101T000000.json"]


def test_profiles_at_two_shapes_both_stay_and_a_cut_off_run_replaces_no_whole_one(tmp_path):
    """The kernel breakdowns at N = 16,200 and 162,000 answer two questions: both stay. A
    self-test stopped after 25 of its 68 checks does not replace the last whole one; the next
    whole one does."""
    def write(benchmark, stamp, **fields):
        payload = dict({"benchmark": benchmark, "device_type": "cuda", "device": "NVIDIA H100"},
                       **fields)
        (tmp_path / f"{benchmark}_cuda_{stamp}.json").write_text(json.dumps(payload))
    write("kernel_breakdown", "20260101T000000", shape=dict(N=16200, HW=1620))
    write("kernel_breakdown", "20260101T000100", shape=dict(N=162000, HW=1620))
    write("selftest", "20260101T000000", selftest=True, name="NVIDIA H100", complete=True)
    write("selftest", "20260102T000000", selftest=True, name="NVIDIA H100", complete=False)
    assert report.superseded(tmp_path) == []
    write("kernel_breakdown", "20260103T000000", shape=dict(N=16200, HW=1620))
    write("selftest", "20260103T000000", selftest=True, name="NVIDIA H100", complete=True)
    assert [path.name for path in report.superseded(tmp_path)] == [
        "kernel_breakdown_cuda_20260101T000000.json", "selftest_cuda_20260101T000000.json"]


def test_a_run_at_fewer_memory_sizes_does_not_replace_a_whole_sweep(tmp_path):
    """`bench cpu-read --ns 16200` (a quick check) leaves the last run of 16,200 to 162,000 in
    place; the next run of the whole sweep replaces it."""
    def write(stamp, ns):
        payload = {"benchmark": "cpu_read", "device_type": "cpu", "cpu_flags": ["avx2"],
                   "records": [{"provider": "stm", "N": n, "median_ms": 1.0} for n in ns]}
        (tmp_path / f"cpu_read_cpu_{stamp}.json").write_text(json.dumps(payload))
    write("20260101T000000", [16200, 64800, 162000])
    write("20260102T000000", [16200])
    assert report.superseded(tmp_path) == []
    write("20260103T000000", [16200, 64800, 162000])
    assert [path.name for path in report.superseded(tmp_path)] == [
        "cpu_read_cpu_20260101T000000.json"]


def test_each_checkpoint_keeps_its_result_and_a_block_can_pick_one(tmp_path):
    """The interactive model's multi-object scores do not replace the default model's; the
    README's block shows the default model's only (`checkpoint=small-real`)."""
    path = sorted(report.RESULTS.glob("multi_object_cpu_*.json"))[0]
    default = json.loads(path.read_text())
    base = dict(default, checkpoint="small-real", date="2026-01-01T00:00:00+00:00")
    (tmp_path / "multi_object_cpu_20260101T000000.json").write_text(json.dumps(base))
    other = dict(base, checkpoint="small-real-interactive", date="2026-02-01T00:00:00+00:00")
    (tmp_path / "multi_object_cpu_20260201T000000.json").write_text(json.dumps(other))
    assert len(report.newest_results("multi_object", tmp_path)) == 2
    assert report.superseded(tmp_path) == []
    every = report.rewrite("<!-- bench:multi_object -->\n<!-- /bench:multi_object -->", tmp_path)
    assert "`small-real` at" in every and "`small-real-interactive` at" in every
    picked = report.rewrite("<!-- bench:multi_object checkpoint=small-real -->\nstale\n"
                            "<!-- /bench:multi_object -->", tmp_path)
    assert "`small-real` at" in picked and "interactive" not in picked and "stale" not in picked
    assert picked.startswith("<!-- bench:multi_object checkpoint=small-real -->\n")
    none = report.rewrite("<!-- bench:multi_object checkpoint=official -->\n"
                          "<!-- /bench:multi_object -->", tmp_path)
    assert "_No `multi_object` results with checkpoint official committed yet._" in none


def test_a_long_title_is_wrapped_to_the_figure_width():
    """A long CPU name in a plot's title (an Intel Xeon with its flags) ran off both sides of
    the cpu-read plot: save_figure wraps it at spaces to the figure's width."""
    from bench import common
    long = ("CPU read vs peers, Intel(R) Xeon(R) Platinum 8480+ (avx2, avx512f, avx512_bf16, "
            "amx_bf16), 2 threads")
    for text, lines in ((long, 2), ("short title", 1), (f"{long}\nsecond line", 3)):
        figure, _ = common.subplots(1, 1, figsize=(6.5, 3.8))
        title = figure.suptitle(text)
        renderer = figure.canvas.get_renderer()
        common.fit_title(figure)
        assert title.get_window_extent(renderer).width <= figure.bbox.width * 0.96
        assert title.get_text().count("\n") + 1 == lines
        assert title.get_text().split() == text.split()  # every word, in order
