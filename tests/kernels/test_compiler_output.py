"""Compiler output kept off stderr (backends/triton/compiler_output.py), and what a user of a GPU
newer than the installed Triton sees: one warning line, found by compiling for such a GPU
offline with the real compiler."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from stm_kernels.backends.triton import compiler_output

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_what_is_written_to_descriptor_2_is_captured_and_can_be_replayed(capfd):
    capfd.readouterr()
    with compiler_output.captured() as output:
        os.write(2, b"llvm says\npython: x.cpp:1: f: Assertion `no' failed.\n")
    assert capfd.readouterr().err == ""
    assert output.text == "llvm says\npython: x.cpp:1: f: Assertion `no' failed.\n"
    assert output.diagnostic() == "Assertion `no' failed."
    output.replay()
    assert capfd.readouterr().err == output.text


def test_disabled_capture_leaves_stderr_alone(capfd):
    capfd.readouterr()
    with compiler_output.captured(enabled=False) as output:
        os.write(2, b"straight through\n")
    assert capfd.readouterr().err == "straight through\n" and output.text == ""


def test_the_diagnostic_prefers_an_assertion_then_an_error_and_the_log_keeps_everything():
    output = compiler_output.Output()
    output.text = "module {\n}\nk.py:50:1: error: Failures in a pass pipeline\nno marks here\n"
    assert output.diagnostic() == "error: Failures in a pass pipeline"
    output.text = "nothing to say\n"
    assert output.diagnostic() == ""
    path = pathlib.Path(output.save("test_compile"))
    try:
        assert path.read_text().endswith("nothing to say\n") and str(os.getpid()) in path.name
    finally:
        path.unlink()
    output.text = "  \n"
    assert output.save("test_compile") is None  # nothing worth a file


def test_a_gpu_newer_than_triton_knows_prints_one_warning_and_nothing_else():
    """Compute capability 13.0, compiled offline by the installed Triton (which asserts in its
    MMA pass and prints the module, some 500 lines, per candidate): stderr holds the one
    FallbackWarning (and Python's echo of the line that warned), naming the assertion and the
    log with the full output; the first read compiles every candidate, later reads none."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = textwrap.dedent("""
        import torch
        from tools.kernel_report.compile import KIB, Target, compiling_for
        from stm_kernels.backends import pytorch, triton as fused
        pytorch.forward = lambda *args: "torch"  # the torch read itself cannot run on meta
        future = Target("sm_130", "NVIDIA future GPU", "cuda", 130, 32, 99 * KIB, 100,
                        runtime_arch="sm_130")
        q = torch.empty(1, 64, 400, dtype=torch.float16, device="meta")
        k = torch.empty(1, 64, 4000, dtype=torch.float16, device="meta")
        with compiling_for(future) as launches:
            reads = [fused.forward(q, k, k, 0.125, False) for _ in range(3)]
        print(reads.count("torch"), len(launches), sum(bool(r.error) for r in launches))
    """)
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    reads, compiled, failed = map(int, completed.stdout.split())
    assert reads == 3 and compiled == failed and compiled >= 1
    lines = completed.stderr.splitlines()
    warning = [line for line in lines if "FallbackWarning" in line]
    assert len(warning) == 1, completed.stderr[-3000:]
    others = [line for line in lines if line not in warning and not line.startswith("  ")]
    assert others == [], others[:20]  # only the warning and Python's echo of its source line
    assert len(lines) <= 2
    assert "the Triton forward kernel cannot run on NVIDIA future GPU" in warning[0]
    assert "computeCapability not supported" in warning[0]
    log = pathlib.Path(warning[0].split("(compiler output: ")[1].split(")")[0])
    try:
        assert log.read_text().count("tt.func public @memory_read_fwd_kernel") == compiled
    finally:
        log.unlink()
