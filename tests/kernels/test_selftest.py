"""The self-test users run on their own machine (python -m stm_kernels.selftest, stm selftest):
on the CPU (torch backend) and in the Triton interpreter (the kernels), its report, and its
exit status when a result is wrong or a read crashes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from stm_kernels import selftest
from stm_kernels.backends.triton import calls, devices, launch, running, tilings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_cpu_self_test_passes_and_writes_its_report(tmp_path):
    """Without TRITON_INTERPRET the CPU runs the torch backend, in float32 and float64."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report_path = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, "-m", "stm_kernels.selftest", "--json", str(report_path)], cwd=ROOT,
        env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["backend"] == "torch"
    quantized = [check for check in report["checks"]
                 if check["feature"] in selftest.QUANTIZED_FEATURES]
    plain = [check for check in report["checks"] if check not in quantized]
    assert {check["dtype"] for check in plain} == {"fp32", "fp64"}
    assert {check["similarity"] for check in plain} == set(selftest.SIMILARITIES)
    assert {check["feature"] for check in plain} == set(selftest.FEATURES)
    # the 8-bit reads: both formats, dot and l2, and the CPU's bf16 readers too
    assert {check["dtype"] for check in quantized} == {"fp32", "fp64", "bf16"}
    assert {check["similarity"] for check in quantized} == {"dot", "l2"}
    assert {check["feature"] for check in quantized} == {"int8 read", "fp8 read"}
    assert all(set(check["errors"]) == {"out", "lse"} for check in quantized)
    assert all(check["passed"] and check["errors"] for check in report["checks"])
    assert report["torch"] == torch.__version__ and "timings" not in report  # no GPU: no timing
    assert f"{len(report['checks'])} of {len(report['checks'])} checks passed" in \
        completed.stdout


@pytest.mark.parametrize("feature", ["int8 read", "fp8 read"])
def test_an_8bit_check_reads_a_banks_memory_against_its_dequantised_read(feature, monkeypatch):
    """An 8-bit check quantises the memory as a memory bank does (keys per channel and frame of
    HW positions, values per position) and compares the read with the float64 read of that
    same dequantised memory: exact to float64's rounding on the torch backend, and a read off
    by 1e-3 fails it."""
    shape = dict(B=3, Ck=16, Cv=48, HW=60, N=300)
    inputs = selftest._inputs(shape, "dot", seed=5)
    keys, values = selftest._quantized(inputs, selftest.QUANTIZED_FEATURES[feature], frame=60)
    assert (keys.axis, values.axis) == ("channel_frame", "position")
    assert keys.scale.shape == (3, 16, 5, 1) and keys.format == feature.split()[0]
    check = selftest.run_check(selftest.Check(feature, "fp64", "l2", shape),
                               torch.device("cpu"), "torch", seed=5)
    assert check.passed and max(check.errors.values()) < 1e-13, check.errors
    real = selftest.memory_read

    def off(q, k, v, backend=None, **options):
        out, lse = real(q, k, v, backend=backend, **options)
        return (out * 1.001, lse) if backend == "torch" else (out, lse)
    monkeypatch.setattr(selftest, "memory_read", off)
    wrong = selftest.run_check(selftest.Check(feature, "fp64", "l2", shape),
                               torch.device("cpu"), "torch", seed=5)
    assert not wrong.passed and wrong.errors["out"] > 5e-4 and wrong.errors["lse"] < 1e-13


def test_the_cpu_self_tests_bf16_8bit_checks_reach_the_bf16_readers(monkeypatch):
    """The CPU plan's bf16 8-bit checks are at a size the CPU reads in row blocks, so that on a
    CPU with bf16 products (forced on here) they run its bf16 readers, and pass."""
    from stm_kernels.backends import pytorch
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1")
    calls = []
    monkeypatch.setattr(pytorch, "_bf16_softmax", lambda *a, f=pytorch._bf16_softmax:
                        calls.append(1) or f(*a))
    if selftest.triton_backend is not None:  # the torch backend's plan, not the interpreter's
        monkeypatch.setattr(selftest.triton_backend, "INTERPRETING", False)
    checks = [check for check in selftest.plan_checks(torch.device("cpu"))
              if check.dtype == "bf16"]
    assert {check.feature for check in checks} == set(selftest.QUANTIZED_FEATURES)
    for check in checks:
        count = len(calls)
        assert selftest.run_check(check, torch.device("cpu"), "torch", seed=2).passed, check
        assert len(calls) > count, check


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("similarity", selftest.SIMILARITIES)
def test_top_k_checks_hold_at_16_bit_precision(dtype, similarity):
    """A GPU's 16-bit top-k checks, on the CPU's torch backend at the GPU's check shape: a
    correct read passes (on random inputs rounding flipped near-ties and failed every one, as
    on an H200), and a read off by one selected position still fails."""
    shape = dict(B=3, Ck=64, Cv=96, HW=200, N=1000)
    inputs = selftest._inputs(shape, similarity, seed=3, exact_scores=True)
    for name, tensor in inputs.items():  # what scores is exact in bf16 (the values need not be)
        assert name == "v" or torch.equal(tensor.to(torch.bfloat16).double(), tensor), name
    check = selftest.run_check(selftest.Check("top_k", dtype, similarity, shape),
                               torch.device("cpu"), "torch", seed=3)
    assert check.passed, check.errors
    wrong = selftest.Check("top_k", dtype, similarity, shape)
    with _read_with_top_k(6):
        assert not selftest.run_check(wrong, torch.device("cpu"), "torch", seed=3).passed


class _read_with_top_k:
    """Within it, the self-test's top-k reads on the torch backend keep `top_k` positions."""

    def __init__(self, top_k):
        self.top_k, self.original = top_k, selftest.memory_read

    def __enter__(self):
        def read(*args, backend=None, **options):
            if backend == "torch" and "top_k" in options:
                options["top_k"] = self.top_k
            return self.original(*args, backend=backend, **options)
        selftest.memory_read = read

    def __exit__(self, *exc):
        selftest.memory_read = self.original


@pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_the_interpreted_self_test_runs_every_kernel(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert selftest.main(["--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["backend"] == "triton" and report["passed"]
    kernels = {name.split(" on ")[0] for name in report["configs"]}
    assert kernels == set(tilings.KERNELS)
    assert report["warnings"] == []  # no fallback to torch (the 8-bit reads' kernel included)
    assert {check["feature"] for check in report["checks"]} == \
        set(selftest.FEATURES) | set(selftest.QUANTIZED_FEATURES)
    assert report["compiled"] == []  # the interpreter compiles nothing


def test_the_self_test_records_what_the_driver_says_of_each_compiled_kernel(monkeypatch):
    """Every launch keeps the registers and local memory (spilled registers) of its compiled
    kernel, the most seen per device, kernel and config; the self-test's JSON lists them and
    its summary names the kernels that spill. (A stand-in for a GPU's compiled kernel.)"""
    from stm_kernels.backends.triton.devices import KIB, Device
    monkeypatch.setattr(running, "_resources", {})

    class Compiled:  # what kernel[grid](...) returns on a GPU, loaded by the launch
        def __init__(self, registers, words):
            self.n_regs, self.n_spills = registers, words

    class Kernel:
        __name__ = "memory_read_fwd_kernel"

        def __init__(self, compiled):
            self.compiled = compiled

        def __getitem__(self, grid):
            return lambda **arguments: self.compiled

    device = Device("NVIDIA GB300", "nvidia", "sm_103", 227 * KIB, 160)
    call = calls.Call(device, tilings.ARCHITECTURES["generic"], "tf32", "tf32", 128)
    config = tilings.ForwardConfig(16, 64, 256, 8, 1)
    running.run(Kernel(Compiled(200, 0)), (1,), {}, config, call)
    running.run(Kernel(Compiled(180, 6)), (1,), {}, config, call)  # another dtype's compile
    running.run(Kernel(None), (1,), {}, config, call)  # the interpreter compiles nothing
    # the same config from another table row (16-bit, 256 key channels) is a compile apart
    wide = calls.Call(device, tilings.ARCHITECTURES["generic"], "tf32", "16-bit", 256)
    running.run(Kernel(Compiled(255, 100)), (1,), {}, config, wide)
    item, other = selftest.compiled_kernels()
    assert (item["kernel"], item["registers"], item["local_bytes"]) == \
        ("memory_read_fwd_kernel", 200, 24)
    assert (item["precision"], item["width"], other["precision"], other["width"]) == \
        ("tf32", 128, "16-bit", 256)
    assert (other["registers"], other["local_bytes"]) == (255, 400)
    assert "GB300" in item["device"] and item["config"]["block_n"] == 64
    assert selftest.spill_summary([item]) == ("local memory (spilled registers) per thread of "
                                              "the 1 compiled kernels: memory_read_fwd_kernel "
                                              "24 B (tf32 128: m16 n64 w8 s1)")
    assert selftest.spill_summary([dict(item, local_bytes=0)]).endswith(": none")


@pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_a_wrong_result_or_a_crash_fails_the_self_test(tmp_path, monkeypatch, capsys):
    real = launch.triton_forward

    def off_by_a_little(q, k, v, scale, l2, lengths=None):
        out, lse = real(q, k, v, scale, l2, lengths)
        return out * 1.001, lse

    monkeypatch.setattr(launch, "triton_forward", off_by_a_little)
    monkeypatch.setattr(selftest, "FEATURES", ("read",))
    monkeypatch.setattr(selftest, "SIMILARITIES", ("dot",))
    monkeypatch.setattr(selftest, "QUANTIZED_FEATURES", {})
    assert selftest.main(["--json", str(tmp_path / "wrong.json")]) == 1
    output = capsys.readouterr().out
    assert "read          fp32  dot" in output and "FAILED" in output
    assert "0 of 1 checks passed" in output

    # the 8-bit kernel's result off as little fails its check, the plain read's passing
    real_8bit = launch.triton_quantized_forward

    def off_8bit(*arguments):
        out, lse = real_8bit(*arguments)
        return out * 1.001, lse

    monkeypatch.setattr(launch, "triton_forward", real)
    monkeypatch.setattr(launch, "triton_quantized_forward", off_8bit)
    monkeypatch.setattr(selftest, "QUANTIZED_FEATURES", {"int8 read": "int8"})
    monkeypatch.setattr(selftest, "QUANTIZED_SIMILARITIES", ("dot",))
    assert selftest.main(["--json", str(tmp_path / "wrong_8bit.json")]) == 1
    checks = json.loads((tmp_path / "wrong_8bit.json").read_text())["checks"]
    assert [(c["feature"], c["passed"]) for c in checks] == [("read", True), ("int8 read", False)]
    assert capsys.readouterr().out.count("FAILED") == 2  # its progress line and its table row
    monkeypatch.setattr(selftest, "QUANTIZED_FEATURES", {})

    def crash(*args):
        raise RuntimeError("a driver error")

    monkeypatch.setattr(launch, "triton_forward", crash)
    assert selftest.main(["--json", str(tmp_path / "crash.json")]) == 1
    report = json.loads((tmp_path / "crash.json").read_text())
    assert report["checks"][0]["failure"] == "RuntimeError: a driver error"


def _ended_at_the_third_check(monkeypatch, exception):
    """run_check replaced by one that raises `exception` on the third check; returns the list
    the checks are appended to as they start."""
    real = selftest.run_check
    calls = []

    def ended_at_the_third(check, device, backend, seed):
        calls.append(check)
        if len(calls) == 3:
            raise exception
        return real(check, device, backend, seed)

    monkeypatch.setattr(selftest, "run_check", ended_at_the_third)
    monkeypatch.setattr(selftest, "FEATURES", ("read",))
    return calls


def _assert_report_of_the_first_two(path, calls):
    report = json.loads(path.read_text())
    assert report["complete"] is False and report["passed"] is False
    assert [(c["feature"], c["dtype"], c["similarity"]) for c in report["checks"]] == [
        (c.feature, c.dtype, c.similarity) for c in calls[:2]]
    assert all(c["passed"] and c["errors"] for c in report["checks"])


def test_an_interrupted_self_test_writes_the_checks_that_ran(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGINT from a time limit) after two checks: the report holds those two,
    marked incomplete and not passed, and the exit status is 130."""
    calls = _ended_at_the_third_check(monkeypatch, KeyboardInterrupt)
    path = tmp_path / "cut.json"
    assert selftest.main(["--device", "cpu", "--json", str(path)]) == 130
    _assert_report_of_the_first_two(path, calls)
    output = capsys.readouterr().out
    assert "interrupted after 2 of" in output and "2 of 2 checks passed" in output


def test_a_self_test_killed_outright_leaves_the_report_of_the_checks_before(tmp_path,
                                                                            monkeypatch):
    """A run that never gets to handle its end (SIGKILL 20 s after a SIGINT that arrived inside
    a compile) still leaves a report: it is saved after every check, incomplete until the end."""
    class Killed(BaseException):
        pass

    calls = _ended_at_the_third_check(monkeypatch, Killed)
    path = tmp_path / "killed.json"
    with pytest.raises(Killed):
        selftest.main(["--device", "cpu", "--json", str(path)])
    _assert_report_of_the_first_two(path, calls)
    assert not (tmp_path / "killed.json.part").exists()


def test_stm_selftest_is_the_same_command(tmp_path, monkeypatch):
    from stm_model import cli
    monkeypatch.setattr(selftest, "FEATURES", ("read",))
    monkeypatch.setattr(selftest, "SIMILARITIES", ("l2",))
    assert cli.main(["selftest", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["checks"][0]["similarity"] == "l2"
    assert cli.main(["selftest", "--device", "cuda:7"]) == (2 if not torch.cuda.is_available()
                                                            else 0)


def _exact_rows(fused_ms, torch_ms, official_ms=50.0):
    rows = []
    for (pass_, N), fused in fused_ms.items():
        for provider, ms in (("fused", fused), ("torch", torch_ms[pass_, N]),
                             ("official", official_ms)):
            rows.append(dict(provider=provider, pass_=pass_, N=N, dtype="fp32", ms=ms))
    return rows


def test_the_exact_float32_verdict_compares_the_fused_and_the_torch_read():
    """Fused slower everywhere: torch is fastest, and auto taking torch agrees (no request);
    faster everywhere: auto's torch disagrees and the line asks for the report; mixed: no
    verdict; an official read that is fastest does not count (its memory is not bounded)."""
    slower = _exact_rows({("fwd", 16200): 2.0, ("fwd+bwd", 16200): 8.0},
                         {("fwd", 16200): 1.5, ("fwd+bwd", 16200): 6.0}, official_ms=0.1)
    verdict = selftest.exact_float32_verdict(slower, "torch")
    assert verdict == dict(fused_vs_torch=[0.75, 0.75], fastest="torch", auto="torch",
                           agrees=True)
    assert selftest.exact_float32_line(verdict) == (
        "exact float32: the fused read is 0.75x the speed of the torch read (cuBLAS) here; "
        "backend='auto' reads with torch")
    faster = _exact_rows({("fwd", 16200): 1.0, ("fwd+bwd", 162000): 5.0},
                         {("fwd", 16200): 1.2, ("fwd+bwd", 162000): 7.5})
    verdict = selftest.exact_float32_verdict(faster, "torch")
    assert verdict["fastest"] == "triton" and verdict["agrees"] is False
    assert verdict["fused_vs_torch"] == pytest.approx([1.2, 1.5])
    assert selftest.exact_float32_line(verdict).endswith(
        "1.20-1.50x the speed of the torch read (cuBLAS) here; backend='auto' reads with "
        "torch: the timings say otherwise, please attach the report to an issue (or set "
        "STM_KERNELS_EXACT_FLOAT32=triton)")
    mixed = _exact_rows({("fwd", 16200): 1.0, ("fwd+bwd", 16200): 9.0},
                        {("fwd", 16200): 1.2, ("fwd+bwd", 16200): 7.5})
    assert selftest.exact_float32_verdict(mixed, "triton")["agrees"] is None
    failed = [dict(provider="torch", pass_=row["pass_"], N=row["N"], error="out of memory")
              if row["provider"] == "torch" else row for row in slower]
    assert selftest.exact_float32_verdict(failed, "torch")["fastest"] is None


@pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_the_exact_float32_timings_run_every_read_in_float32_highest(monkeypatch):
    """The timing loop itself (on the CPU: the interpreter's kernels, tiny sizes): every
    provider and pass once per size, in exact float32 whatever the precision was, restored."""
    monkeypatch.setattr(selftest, "TARGET", dict(B=1, HW=16, Ck=16, Cv=8))
    seen = []
    real = selftest.memory_read

    def read(q, k, v, backend):
        seen.append((backend, torch.get_float32_matmul_precision(), q.dtype))
        return real(q, k, v, backend=backend)

    monkeypatch.setattr(selftest, "memory_read", read)
    monkeypatch.setattr(selftest, "_time_ms", lambda fn, device, repeats=10: fn() or 1.0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        rows = selftest.exact_float32_timings(torch.device("cpu"), sizes=(40,))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert [(r["provider"], r["pass_"], r["ms"]) for r in rows] == [
        (provider, pass_, 1.0) for provider in ("fused", "torch", "official")
        for pass_ in ("fwd", "fwd+bwd")]
    assert {entry for entry in seen} == {(backend, "highest", torch.float32)
                                         for backend in ("triton", "torch", "naive")}


# --------------------------------------------------------------------------- --experimental


def test_experimental_plans_the_gluon_read_on_a_gpu_only(monkeypatch):
    """--experimental adds the read with the Gluon kernels on a GPU: bf16 and fp16, dot and
    l2, a small shape the Gluon kernels take (Cv twice a power of two, N % 8 == 0) and the
    target unless quick; nothing on a CPU, and nothing without the option."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cuda = torch.device("cuda")
    plain = selftest.plan_checks(cuda)
    assert not [c for c in plain if c.feature == selftest.GLUON_FEATURE]
    for quick, shapes in ((False, 2), (True, 1)):
        checks = selftest.plan_checks(cuda, quick=quick, experimental=True)
        gluon = [c for c in checks if c.feature == selftest.GLUON_FEATURE]
        assert checks[:len(checks) - len(gluon)] == selftest.plan_checks(cuda, quick=quick)
        assert len(gluon) == shapes * 2 * 2
        assert {(c.dtype, c.similarity) for c in gluon} == {
            (dtype, similarity) for dtype in ("fp16", "bf16") for similarity in ("dot", "l2")}
        for check in gluon:
            assert (check.shape["Cv"] // 2) & (check.shape["Cv"] // 2 - 1) == 0
            assert check.shape["N"] % 8 == 0
    assert not [c for c in selftest.plan_checks(torch.device("cpu"), experimental=True)
                if c.feature == selftest.GLUON_FEATURE]


@pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_a_gluon_check_says_which_kernels_ran_and_checks_the_read(monkeypatch):
    """A "gluon read" check runs the read and its gradients opted into the Gluon kernels and
    records, per kernel, why the plain one ran instead (on CPU tensors, every kernel: they
    need CUDA); the numbers are checked against float64 as for every read."""
    monkeypatch.setattr(running, "_warned", set())
    shape = dict(B=2, Ck=16, Cv=32, HW=30, N=304)
    check = selftest.Check(selftest.GLUON_FEATURE, "fp16", "l2", shape)
    with pytest.warns(RuntimeWarning, match="WARP_SPECIALIZED"):
        selftest.run_check(check, torch.device("cpu"), "triton", seed=2)
    assert check.passed, (check.errors, check.failure)
    assert set(check.errors) == {"out", "lse", "dq", "dk", "dv"}
    assert check.gluon == {"forward": "needs CUDA tensors", "dV": "needs CUDA tensors",
                           "dK/dQ": "needs CUDA tensors"}
    assert "(Gluon none; plain forward: needs CUDA tensors; plain dV: " in \
        selftest.table([check])


def test_the_gluon_note_names_what_ran_and_what_did_not():
    assert selftest.gluon_note({"forward": None, "dV": None, "dK/dQ": None}) == \
        "Gluon forward, dV, dK/dQ"
    assert selftest.gluon_note({"forward": None, "dV": "Cv must be twice a power of two",
                                "dK/dQ": None}) == \
        "Gluon forward, dK/dQ; plain dV: Cv must be twice a power of two"


def test_the_timing_table_fits_the_gluon_provider():
    report = dict(matmul_tflops_bf16=700.0, timings=[
        dict(provider="fused", pass_="fwd", N=16200, ms=0.1, tflops=336.0),
        dict(provider="fused (Gluon)", pass_="fwd", N=16200, ms=0.09, tflops=373.0),
        dict(provider="fused (Gluon)", pass_="fwd+bwd", N=162000, error="out of memory")])
    lines = selftest.timing_table(report).splitlines()
    assert lines[1].startswith("provider      pass")
    assert lines[3].startswith("fused (Gluon) fwd") and "53%" in lines[3]
    assert lines[4].endswith("out of memory")


def test_experimental_on_a_cpu_says_it_checks_nothing_there(tmp_path, capsys):
    assert selftest.main(["--device", "cpu", "--experimental", "--no-timing", "--quick",
                          "--json", str(tmp_path / "report.json")]) == 0
    assert "--experimental: the Gluon kernels run on sm_90 GPUs only" in capsys.readouterr().out
