"""tools/gpu_session/gpu_session.sh's time limits, checked on CPU with stand-in commands.

The GPU session gets 15 minutes of device time in calls of at most 10: every stage must stop
its work itself (SIGINT, so pytest still writes its junit XML and the benchmarks their
summary) before the call's limit kills it. `python3` and `nvidia-smi` are replaced by shims on
PATH that record when they were started and interrupted, so no test waits on real work.
"""
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_session" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")

# A python3 that answers the script's version probe and otherwise runs until SIGINT, writing
# one line per run to $SHIM_LOG: its arguments, then "interrupted" or "finished".
PYTHON_SHIM = """#!/usr/bin/env bash
case "$*" in *"import cutie"*) [ -n "${SHIM_NO_CUTIE:-}" ] && exit 1 ;; esac
case "$*" in -c*) echo "torch shim triton shim"; exit 0 ;; esac
sleep "${SHIM_SECONDS:-300}" &
trap 'kill $!; echo "$* | interrupted" >> "$SHIM_LOG"; exit 130' INT
wait $!
echo "$* | finished" >> "$SHIM_LOG"
"""


# An ncu that logs its arguments; a profiling run writes the report named by -o (unless
# $SHIM_NCU_FAILS, as where the counters cannot be read), an --import prints a CSV header.
NCU_SHIM = """#!/usr/bin/env bash
echo "ncu $*" >> "$SHIM_LOG"
case "$*" in *--import*) echo '"ID","Kernel Name"'; exit 0 ;; esac
[ -n "${SHIM_NCU_FAILS:-}" ] && { echo "==ERROR== profiling failed"; exit 1; }
while [ $# -gt 0 ]; do [ "$1" = -o ] && touch "$2.ncu-rep"; shift; done
"""

# A compute-sanitizer that logs the caching switch and its arguments, shell-quoted.
SANITIZER_SHIM = """#!/usr/bin/env bash
echo "caching-off=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} $(printf '%q ' "$@")" >> "$SHIM_LOG"
"""


def _shims(directory):
    for name, text in (("python3", PYTHON_SHIM), ("nvidia-smi", "#!/bin/sh\necho shim GPU\n"),
                       ("ncu", NCU_SHIM), ("compute-sanitizer", SANITIZER_SHIM)):
        path = directory / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_stage(tmp_path, stage, stage_limit, shim_seconds=300, **shim_environment):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _shims(bin_dir)
    log = tmp_path / "shim.log"
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                       OUT=str(tmp_path / "out"), SHIM_LOG=str(log),
                       SHIM_SECONDS=str(shim_seconds), STAGE_LIMIT=str(stage_limit),
                       **shim_environment)
    started = time.monotonic()
    completed = subprocess.run(["bash", str(SCRIPT), stage], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=120)
    lines = log.read_text().splitlines() if log.exists() else []
    return completed, lines, time.monotonic() - started


def test_stage_stops_its_work_inside_stage_limit(tmp_path):
    # STAGE_LIMIT=42: the kernel stage's mark (570 of 600 s) is capped at 42 - 30 = 12 s, so
    # the benchmark gets its SIGINT at 12 s, well before a 42-second call would be killed.
    completed, lines, seconds = _run_stage(tmp_path, "kernel", 42)
    assert lines == ["-m bench kernel | interrupted"], (lines, completed.stdout)
    assert 10 <= seconds < 22, seconds
    assert (tmp_path / "out" / "device.txt").read_text().startswith("shim GPU")


def test_work_that_ends_in_time_is_not_interrupted(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "kernel", 42, shim_seconds=1)
    assert lines == ["-m bench kernel | finished"], (lines, completed.stdout)


def test_stage_skips_work_when_no_time_is_left(tmp_path):
    # STAGE_LIMIT=14: the tune stage's marks (420 and 570 of 600 s) fall at 9 s and at
    # 14 - 30 < 0 s: too little to start either run (`timeout 0` would mean no limit at all).
    completed, lines, seconds = _run_stage(tmp_path, "tune", 14)
    assert lines == [], lines
    assert completed.stdout.count("== no time left for python3 -m tools.gpu_session.tune") == 2
    assert seconds < 10


def test_bad_stage_limit_is_refused(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "kernel", "ten")
    assert completed.returncode == 2
    assert "STAGE_LIMIT must be a number of seconds, got 'ten'" in completed.stdout
    assert lines == []


def test_profile_stage_breakdown_then_ncu_then_summary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # the passes profile_target (a shim here) writes beside its report
    passes = out / "profile_passes_cuda_20261123T100000.json"
    passes.write_text("{}")
    completed, lines, _ = _run_stage(tmp_path, "profile", 600, shim_seconds=0)
    assert len(lines) == 10, (lines, completed.stdout)
    assert lines[0] == "-m tools.gpu_session.profile_target --breakdown --n 16200 | finished"
    assert lines[1] == "-m tools.gpu_session.profile_target --breakdown | finished"
    # the forwards alone at three more memory sizes, then every kernel fitted against N
    assert lines[2] == ("-m tools.gpu_session.profile_target --breakdown --n 3240 32400 64800 "
                        "--passes forward forward (Gluon) | finished")
    assert lines[3] == (f"-m tools.gpu_session.profile_target --fit {out}/kernel_breakdown_*.json"
                        " | finished")
    # ncu at ten memory frames on the forward passes alone, then at the target on every pass
    for (profiled, imported, summarised), name, arguments in (
            (lines[4:7], "profile_16200", ["--n", "16200", "--passes", "forward", "forward",
                                           "(Gluon)"]),
            (lines[7:10], "profile", [])):
        words = profiled.split()
        assert words[0] == "ncu"
        assert words[words.index("python3"):] == [
            "python3", "-m", "tools.gpu_session.profile_target", *arguments]
        # only the cudaProfilerStart/Stop round, and the clocks left as they are (METHOD.md)
        for option in ("--profile-from-start off", "--clock-control none", "--set full",
                       f"-o {out}/{name} "):
            assert option in profiled, option
        assert imported == (f"ncu --import {out}/{name}.ncu-rep --page raw --csv "
                            "--print-units base")
        assert (out / f"{name}_raw.csv").read_text() == '"ID","Kernel Name"\n'
        assert summarised == (f"-m tools.gpu_session.ncu_summary {out}/{name}_raw.csv "
                              f"--passes {passes} | finished")


def test_profile_stage_keeps_the_breakdown_when_ncu_cannot_profile(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "profile", 600, shim_seconds=0,
                                     SHIM_NCU_FAILS="1")
    assert lines[1] == "-m tools.gpu_session.profile_target --breakdown | finished"
    assert len(lines) == 6 and all(line.startswith("ncu ") for line in lines[4:]), lines
    for name in ("profile_16200", "profile"):
        assert f"== no ncu report for {name}: see log.txt" in completed.stdout


def test_sanitize_stage_selects_the_smallest_gluon_cases(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "sanitize", 600)
    assert len(lines) == 2, (lines, completed.stdout)
    commands = [shlex.split(line.split(" ", 1)[1]) for line in lines]
    assert all(line.startswith("caching-off=1 ") for line in lines)
    assert [command[:2] for command in commands] == [["--tool", "memcheck"],
                                                     ["--tool", "synccheck"]]
    # the pytest selection the script passes still names the smallest case of each bf16 tiling
    # of the forward and of the dK/dQ kernel, and of the dV kernel's default
    pytest_args = commands[0][commands[0].index("python3") + 3:]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", *pytest_args], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(ids) == 5 and all("45-111" in i for i in ids), collected.stdout[-2000:]
    assert any(i.endswith("-bf16-rows]") for i in ids)
    backward = [i for i in ids if "test_gluon_backward.py" in i]
    assert len(backward) == 2 and all("-bf16-" in i for i in backward)
    [dv] = [i for i in ids if "test_gluon_backward_dv.py" in i]
    assert dv.endswith("-bf16-default]")


class Parsed(Exception):
    pass


def parsed_options(module, argv, monkeypatch):
    """The options a benchmark's main parses from argv (its parser, nothing run)."""
    from bench import common

    def parse_only(parser, arguments, child):
        raise Parsed(parser.parse_args(arguments))
    monkeypatch.setattr(common, "parse_args_or_run_child", parse_only)
    with pytest.raises(Parsed) as found:
        module.main(argv)
    return found.value.args[0]


def test_first_stage_runs_the_host_path_the_peers_the_long_video_cutie_then_the_gpu_tests(
        tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from bench import integrations, kernel, long_video
    completed, lines, _ = _run_stage(tmp_path, "first", 585, shim_seconds=0)
    assert [line.split(" | ")[1] for line in lines] == ["finished"] * 7, completed.stdout
    host, peers, video, cutie, quantized, new_tests, tests = (line.split(" | ")[0].split()
                                                              for line in lines)
    assert host == ["-m", "bench", "host-path", "--ns", "16200", "1620"]
    assert peers[:3] == ["-m", "bench", "kernel"]
    options = parsed_options(kernel, peers[3:], monkeypatch)
    assert options.sweeps == ["targets"] and options.batches == [1]
    assert options.passes == ["fwd", "fwd+bwd"] and options.warmup
    assert options.providers is None  # every peer (kernel.PROVIDERS)
    # issue 79 item 5: the segmenter eager against graphed (the read in the graphs) with 10,
    # 40 and 200 memory frames: mem_every 5, official size at 480p (GPU defaults)
    options = parsed_options(long_video, video[3:], monkeypatch)
    assert video[:3] == ["-m", "bench", "long-video"]
    assert options.variants == ["fused", "fused-graphs"] and options.mem_every == 5
    assert options.lengths == [50, 200, 1000] and options.time_limit == 60
    assert options.warmup >= long_video.COMPILE_WARMUP_FRAMES
    assert options.model is None and options.size is None
    options = parsed_options(integrations, cutie[3:], monkeypatch)
    assert cutie[:3] == ["-m", "bench", "integrations"]
    assert options.models == ["cutie"] and options.reads == ["original", "fused"]
    assert options.size == [480, 854] and options.time_limit == 25
    # issue 81 item 5: the 8-bit fused forward timed beside bf16 on the GPU
    from bench import quantized_read
    assert quantized[:3] == ["-m", "bench", "quantized-read"]
    options = parsed_options(quantized_read, quantized[3:], monkeypatch)
    assert options.device == "cuda" and options.captures == 0
    assert options.sizes == [16200, 162000] and options.rounds == 3
    # what has never run on a GPU first, in a run of its own (files that exist), then the rest
    first_files = ["tests/kernels/test_fixed_capacity_gpu.py",
                   "tests/inference/test_segmenter_cuda_graphs.py",
                   "tests/kernels/test_prepared_read.py",
                   "tests/kernels/test_prepared_launch_gpu.py",
                   "tests/kernels/test_cuda_graphs.py", "tests/kernels/test_gluon_backward.py",
                   "tests/kernels/test_gluon_backward_dv.py"]
    assert all((ROOT / path).exists() for path in first_files)
    assert new_tests[:3] == ["-m", "pytest", "-v"] and new_tests[-len(first_files):] == first_files
    assert "gpu" in new_tests and f"{tmp_path}/out/gpu_tests_new.xml" in new_tests
    assert tests[:3] == ["-m", "pytest", "-v"] and "gpu" in tests
    assert f"{tmp_path}/out/gpu_tests.xml" in tests
    assert tests[-len(first_files) - 1:] == ["tests"] + [f"--ignore={path}" for path in first_files]


def test_first_stage_says_what_to_carry_where_cutie_is_missing(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "first", 585, shim_seconds=0,
                                     SHIM_NO_CUTIE="1")
    assert len(lines) == 6 and not any("integrations" in line for line in lines), lines
    assert "== no Cutie here: run python -m tools.gpu_session.deps" in completed.stdout


def test_peers_stage_sweeps_the_targets_then_the_scaling(tmp_path, monkeypatch):
    from bench import kernel
    completed, lines, _ = _run_stage(tmp_path, "peers", 585, shim_seconds=0)
    assert len(lines) == 1 and lines[0].endswith(" | finished"), (lines, completed.stdout)
    options = parsed_options(kernel, lines[0].split(" | ")[0].split()[3:], monkeypatch)
    assert options.sweeps == ["targets", "scaling"] and options.batches == [1]
    assert options.warmup and options.providers is None


def test_a_peers_sweep_that_runs_long_is_stopped_and_the_stage_still_ends_in_time(tmp_path):
    # STAGE_LIMIT=60: the host path's mark (70 of 600 s) is 7 s, too little to start it; the
    # targets' (250 of 600 s) is 25 s, so the sweep is interrupted there; the later marks,
    # capped at 60 - 30 = 30 s, leave the rest at most 7 s: no time.
    completed, lines, seconds = _run_stage(tmp_path, "first", 60)
    assert [line.split(" | ")[1] for line in lines] == ["interrupted"], (lines, completed.stdout)
    assert lines[0].startswith("-m bench kernel --sweeps targets --batches 1")
    not_started = [line for line in completed.stdout.splitlines()
                   if line.startswith("== no time left for ")]
    for skipped in ("bench host-path", "bench long-video", "bench integrations",
                    "pytest"):
        assert any(f"python3 -m {skipped}" in line for line in not_started), skipped
    assert 21 <= seconds < 32, seconds


def test_second_stage_runs_the_self_test_cutie_at_1080p_and_the_fused_long_video(
        tmp_path, monkeypatch):
    from bench import integrations, long_video
    completed, lines, _ = _run_stage(tmp_path, "second", 585, shim_seconds=0)
    assert [line.split(" | ")[1] for line in lines] == ["finished"] * 3, completed.stdout
    selftest, cutie, video = (line.split(" | ")[0].split() for line in lines)
    assert selftest == ["-m", "stm_kernels.selftest", "--json", f"{tmp_path}/out/selftest.json"]
    assert cutie[:3] == ["-m", "bench", "integrations"]
    options = parsed_options(integrations, cutie[3:], monkeypatch)
    assert options.models == ["cutie"] and options.reads == ["original", "fused"]
    assert options.size == [1080, 1920]  # `first` ran 480p
    assert video[:3] == ["-m", "bench", "long-video"]
    options = parsed_options(long_video, video[3:], monkeypatch)
    # issue 57 item 7: the fused read toward 10,000 frames, until the stage's SIGINT
    assert options.variants == ["fused"] and options.mem_every == 5
    assert max(options.lengths) == 10000 and options.time_limit is None
    assert options.reserve_memory  # the peak beyond the bank without the doubling copy
    assert options.model is None and options.size is None  # the GPU defaults: official, 480p
    assert long_video.DEFAULTS["cuda"]["model"] == "official"
    assert tuple(long_video.DEFAULTS["cuda"]["size"]) == (480, 854)


def test_graphs_stage_times_the_network_eager_and_as_cuda_graphs(tmp_path, monkeypatch):
    from bench import long_video
    completed, lines, _ = _run_stage(tmp_path, "graphs", 585, shim_seconds=0)
    [(command, outcome)] = [line.split(" | ") for line in lines]
    assert outcome == "finished", completed.stdout
    video = command.split()
    assert video[:3] == ["-m", "bench", "long-video"]
    options = parsed_options(long_video, video[3:], monkeypatch)
    # in one run: the same video and model, the network eager, graphed and channels-last
    assert options.variants == ["fused", "fused-graphs", "fused-channels-last"]
    assert options.mem_every == 5
    assert options.warmup >= long_video.COMPILE_WARMUP_FRAMES  # compiled and recorded first
    assert 3 * options.time_limit + 120 < 570  # every variant inside the call, and a compile
    assert options.model is None and options.size is None  # the GPU defaults: official, 480p


def test_cutie_stage_runs_480p_and_1080p_or_says_what_to_carry(tmp_path):
    completed, lines, _ = _run_stage(tmp_path, "cutie", 585, shim_seconds=0)
    sizes = [line.split("--size ")[1].split(" --")[0] for line in lines]
    assert sizes == ["480 854", "1080 1920"], lines
    (tmp_path / "none").mkdir()
    completed, lines, _ = _run_stage(tmp_path / "none", "cutie", 585, shim_seconds=0,
                                     SHIM_NO_CUTIE="1")
    assert lines == [] and completed.stdout.count("== no Cutie here: run python -m "
                                                  "tools.gpu_session.deps") == 2


def test_deps_copies_cutie_and_its_imports_without_compiled_files(tmp_path):
    pytest.importorskip("cutie.model.cutie")
    from tools.gpu_session import deps
    copied = deps.export(tmp_path / "deps")
    assert [path.name for path in copied] == list(deps.PACKAGES)
    files = [path for path in (tmp_path / "deps").rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in (".so", ".pyc", ".pyd")]
    assert (tmp_path / "deps" / "cutie" / "model" / "cutie.py").exists()
    # only the work tree and the copies on the path: cutie imports from the copy
    script = ("import cutie.model.cutie as c, omegaconf, einops; "
              "print(c.__file__, omegaconf.__file__)")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=f"{ROOT}:{tmp_path / 'deps'}"),
                               cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == [str(tmp_path / "deps" / "cutie" / "model" / "cutie.py"),
                                        str(tmp_path / "deps" / "omegaconf" / "__init__.py")]


def test_suspects_stage_runs_the_wrong_dkdq_tilings_under_memcheck(tmp_path):
    """The labels it passes to tune --only still name the four bf16 dK/dQ candidates."""
    pytest.importorskip("triton")
    import torch

    from tools.gpu_session import tune
    completed, lines, _ = _run_stage(tmp_path, "suspects", 600)
    assert len(lines) == 1, (lines, completed.stdout)
    command = shlex.split(lines[0].split(" ", 1)[1])
    assert lines[0].startswith("caching-off=1 ") and command[:2] == ["--tool", "memcheck"]
    texts = command[command.index("--only") + 1:]
    kept = tune.only_matching(tune.candidates(torch.bfloat16, False), texts)
    assert [label for _, label, _, _ in kept] == [
        "dkdq block_n=64,block_m=16,num_warps=4,num_stages=2,stream_keys=False",
        "dkdq block_n=64,block_m=16,num_warps=4,num_stages=2,stream_keys=True",
        "dkdq block_n=64,block_m=16,num_warps=4,num_stages=1,block_cv=64,stream_keys=False",
        "dkdq block_n=64,block_m=16,num_warps=4,num_stages=1,block_cv=32,stream_keys=False"]
