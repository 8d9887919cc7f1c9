"""Failing safe: every way the Triton kernels can fail to run ends in the torch backend's result
and one warning naming the device, the kernel and the reason, never in a Triton traceback.

Failures are forced here: compile errors and resource exhaustion injected at the launchers' one
launch point (running.run), devices described as something they are not (devices.pretend: an
sm_75, a ROCm GPU, an unknown AMD architecture), fake CUDA device properties for the device
reader, and a PyTorch without Triton. The kernels themselves run in the interpreter.
"""
import dataclasses
import os
import pathlib
import warnings

import pytest
import torch

from helpers import (check_read, per_object_reference, ragged_case, ragged_read_with_grads,
                     random_inputs, read_with_grads, reference_with_grads)
from reference import reference_read, reference_usage
from stm_kernels import FallbackWarning, backends, memory_read, memory_usage
from stm_kernels.backends.triton import (backward_launcher, calls, devices, gluon_opt_in,
                                         kept_launches, running, tilings)
from stm_kernels.backends.triton.devices import KIB, Device

pytestmark = pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1")

SM75 = Device("Tesla T4", "nvidia", "sm_75", 64 * KIB, 40)
SM80 = Device("NVIDIA A100-SXM4-80GB", "nvidia", "sm_80", 163 * KIB, 108)
MI300X = Device("AMD Instinct MI300X", "amd", "gfx942", 64 * KIB, 304)
RDNA3 = Device("AMD Radeon RX 7900 XTX", "amd", "gfx1100", 64 * KIB, 48)


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    """Each test starts with no remembered choice and no warning given yet."""
    monkeypatch.setattr(running, "_chosen", {})
    monkeypatch.setattr(kept_launches, "_prepared", {})
    monkeypatch.setattr(running, "_warned", set())


def _inputs(seed=0):
    return random_inputs(2, 1, 16, 24, 30, 70, torch.float32, "cpu", seed=seed)


def _expected(q, k, v, **options):
    """out (B, Cv, HW) of the float64 read written out in plain torch (tests/reference.py)."""
    return reference_read(q, k, v, **options)[0]


class Injected(Exception):
    """Stands for a CompilationError, OutOfResources or driver error at launch."""


def failing(kernels, failures=None, error=Injected):
    """A running.run that raises `error` for the kernels named (their first `failures`
    launches, or always) and runs the others."""
    real = running.run
    counts = {}

    def run(kernel, grid, arguments, config, call, **options):
        name = kernel.__name__
        if any(name.endswith(suffix) for suffix in kernels):
            counts[name] = counts.get(name, 0) + 1
            if failures is None or counts[name] <= failures:
                raise error(f"injected failure of {name} with {config}")
        return real(kernel, grid, arguments, config, call, **options)

    return run, counts


def interpreter_tilings(monkeypatch, entries):
    """The interpreter's tilings table with `entries` replacing its own, for the test."""
    interpreter = tilings.ARCHITECTURES["interpreter"]
    monkeypatch.setitem(tilings.ARCHITECTURES, "interpreter", dataclasses.replace(
        interpreter, tilings={**interpreter.tilings, **entries}))


def _fallback_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]


def test_a_config_that_fails_falls_through_to_the_next_and_is_remembered(monkeypatch):
    """Two forward candidates: the first fails to compile, the second runs, silently; the
    choice is remembered, so the next call does not try the failing one again."""
    first, second = tilings.ForwardConfig(32, 32, None, 4, 1), tilings.ForwardConfig(16, 16,
                                                                                   None, 4, 1)
    interpreter_tilings(monkeypatch, {("forward", None, None): (first, second)})
    tried = []
    real = running.run

    def run(kernel, grid, arguments, config, call, **options):
        if kernel.__name__ == "memory_read_fwd_kernel":
            tried.append(config)
            if config == first:
                raise Injected("does not compile")
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: a fallback between tilings is quiet
        out = memory_read(q, k, v, backend="triton")
        memory_read(q, k, v, backend="triton")
    assert tried == [first, second, second]
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)
    (device, kernel), config = next(iter(running.chosen_configs().items()))
    assert (kernel, config) == ("forward", second) and "interpreter" in device


def test_a_config_over_its_local_memory_budget_falls_through_to_the_next(monkeypatch):
    """A candidate with max_local_bytes is compiled and read before it is launched: where its
    compile for the device uses more local memory (spilled registers) than that, the next
    candidate runs, silently, and the choice is remembered; within the budget it runs. The
    launch kept for the layout does not compile and read it again."""
    budget = 32
    first = tilings.ForwardConfig(32, 32, None, 4, 1, max_local_bytes=budget)
    second = tilings.ForwardConfig(16, 16, None, 4, 1, max_local_bytes=budget)
    interpreter_tilings(monkeypatch, {("forward", None, None): (first, second)})
    checked = []

    def local_memory_bytes(kernel, grid, arguments, options):  # what the GPU's compile says
        checked.append(arguments["BLOCK_M"])
        return 2 * budget if arguments["BLOCK_M"] == 32 else budget

    monkeypatch.setattr(running, "local_memory_bytes", local_memory_bytes)
    launched = []
    real = running.run

    def run(kernel, grid, arguments, config, call, **options):
        result = real(kernel, grid, arguments, config, call, **options)
        launched.append(config)
        return result

    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback between tilings is quiet
        out = memory_read(q, k, v, backend="triton")
        memory_read(q, k, v, backend="triton")
    assert checked == [32, 16] and launched == [second, second]
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)
    assert list(running.chosen_configs().values()) == [second]


def test_the_local_memory_a_launch_checks_is_the_compiled_kernels(monkeypatch):
    """On a GPU, running.local_memory_bytes compiles the kernel for the launch's arguments and
    options (JITFunction.warmup, not launched) and reads the driver's count of it (compat)."""
    warmed = []

    class Compiled:
        n_spills = 9  # 4-byte words, as Triton keeps the driver's local size

        def _init_handles(self):
            warmed.append("loaded")

    class Kernel:
        def warmup(self, grid, **arguments):
            warmed.append((grid, arguments))
            return Compiled()

    monkeypatch.setattr(running, "INTERPRETING", False)
    assert running.local_memory_bytes(Kernel(), (3, 1), dict(x=1), dict(num_warps=4)) == 36
    assert warmed == [((3, 1), dict(x=1, num_warps=4)), "loaded"]
    monkeypatch.setattr(running, "INTERPRETING", True)
    assert running.local_memory_bytes(Kernel(), (3, 1), {}, {}) is None  # compiles nothing


@pytest.mark.parametrize("failure", ["local memory", "compile error"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_where_no_fused_dk_dq_tiling_runs_dk_and_dq_run_apart(monkeypatch, failure,
                                                              deterministic):
    """When every dK+dQ candidate fails on the device (over its local memory budget, or not
    compiling), the backward computes dK and dQ with two kernels, with no warning (no read
    goes to torch), its gradients matching the float64 reference on a ragged memory."""
    fused = (tilings.DkdqConfig(32, 32, 4, 1, None, max_local_bytes=32),
             tilings.DkdqConfig(16, 16, 4, 1, None, max_local_bytes=32))
    apart = tilings.DkdqConfig(16, 32, 4, 1, None)
    interpreter_tilings(monkeypatch, {("dkdq", None, None): fused, ("dk", None, None): (apart,)})
    monkeypatch.setattr(running, "local_memory_bytes",
                        lambda *args: 64 if failure == "local memory" else 0)
    launched = []
    real = running.run

    def run(kernel, grid, arguments, config, call, **options):
        if failure == "compile error" and config in fused:
            raise Injected("does not compile")
        result = real(kernel, grid, arguments, config, call, **options)
        launched.append((kernel.__name__, arguments.get("ATOMIC_DQ"), config))
        return result

    monkeypatch.setattr(running, "run", run)
    q, k, v, lengths, cotangents = ragged_case("cpu", seed=8, cotangent_seed=9)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results = ragged_read_with_grads(q, k, v, lengths, cotangents, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    check_read(results, per_object_reference(q, k, v, lengths, cotangents), torch.float32)
    backward = [(name, atomic, config) for name, atomic, config in launched
                if name != "memory_read_fwd_kernel"]
    assert [name for name, _, _ in backward] == [
        "memory_read_bwd_kernel_prepare", "memory_read_bwd_kernel_dv",
        "memory_read_bwd_kernel_dkdq", "memory_read_bwd_kernel_dq"]
    assert backward[2][1:] == (False, apart)  # dK without the dQ atomics, the dk tiling
    # the kept backward (its prepare kernel planned for the atomics when the fused dK/dQ
    # kernel failed) gives the same gradients
    launched.clear()
    try:
        torch.use_deterministic_algorithms(deterministic)
        again = ragged_read_with_grads(q, k, v, lengths, cotangents, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    kept = [prepared for prepared in kept_launches._prepared.values()
            if isinstance(prepared, backward_launcher.PreparedBackward)]
    assert len(kept) == 1 and kept[0].dq is not None and \
        kept[0].prepare.fixed["ZERO_DQ"] != deterministic
    for first, second in zip(results, again, strict=True):
        torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("kernel, call", [
    ("fwd_kernel", "forward"), ("merge_kernel", "forward"), ("prepare", "backward"),
    ("dv", "backward"), ("dkdq", "backward"), ("topk_kernel", "select"),
    ("topk_merge_kernel", "select"), ("usage_kernel", "usage")])
def test_every_kernel_falls_back_to_torch_with_one_warning(monkeypatch, kernel, call):
    run, counts = failing([kernel])
    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs(seed=3)
    if kernel == "merge_kernel":  # a memory split in 3, so that the merge runs
        monkeypatch.setitem(tilings._override, "forward", tilings.ForwardConfig(16, 16, None,
                                                                                 4, 1, splits=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if call in ("forward", "backward"):
            results = read_with_grads(q, k, v, backend="triton")
            check_read(results, reference_with_grads(q, k, v), torch.float32)
        elif call == "select":
            out = memory_read(q, k, v, backend="triton", top_k=5)
            assert torch.allclose(out.double(), _expected(q, k, v, top_k=5), atol=1e-5)
        else:
            out, lse = memory_read(q, k, v, backend="triton", return_lse=True)
            usage = memory_usage(q, k, lse, backend="triton")
            assert torch.allclose(usage.double(), reference_usage(q, k, lse), atol=1e-5)
        memory_read(q, k, v, backend="triton", top_k=5 if call == "select" else None)
    messages = _fallback_warnings(caught)
    assert len(messages) == 1, messages  # once per process, however many reads
    # the dK+dQ kernel's code fails fused, then as the dK kernel beside the dQ kernel
    name = {"fwd_kernel": "forward", "merge_kernel": "merge", "topk_kernel": "select",
            "topk_merge_kernel": "select_merge", "usage_kernel": "usage",
            "dkdq": "dk"}.get(kernel, kernel)
    assert f"the Triton {name} kernel cannot run on Triton interpreter (CPU)" in messages[0]
    assert "Injected: injected failure" in messages[0] and "\n" not in messages[0]
    # the failure is remembered: never tried again
    assert sum(counts.values()) == (2 if kernel == "dkdq" else 1)


def counting_launches(monkeypatch, failing_kernels):
    """running.run made to fail for `failing_kernels` (name suffixes), counting every launch
    by kernel name; returns the counts."""
    run, _ = failing(failing_kernels)
    launched = {}

    def counted(kernel, grid, arguments, config, call, **options):
        launched[kernel.__name__] = launched.get(kernel.__name__, 0) + 1
        return run(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", counted)
    return launched


def test_a_failed_merge_is_remembered_and_the_forward_not_launched_again(monkeypatch):
    """The split forward's merge has no tiling that runs: the first read launches the forward
    kernel, fails on the merge and reads with torch; later reads fall back at once."""
    launched = counting_launches(monkeypatch, ["merge_kernel"])
    monkeypatch.setitem(tilings._override, "forward",
                        tilings.ForwardConfig(16, 16, None, 4, 1, splits=3))
    q, k, v = _inputs(seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [memory_read(q, k, v, backend="triton") for _ in range(3)]
    assert launched == {"memory_read_fwd_kernel": 1, "memory_read_merge_kernel": 1}
    assert len(_fallback_warnings(caught)) == 1
    for out in outs:
        assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)


def test_a_failed_dk_kernel_is_remembered_and_dv_not_launched_again(monkeypatch):
    """The backward's dV runs, then neither dK/dQ nor dK does: later backward passes fall back
    at once instead of launching dV again."""
    launched = counting_launches(monkeypatch, ["dkdq"])
    q, k, v = _inputs(seed=9)
    expected = reference_with_grads(q, k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            check_read(read_with_grads(q, k, v, backend="triton"), expected, torch.float32)
    assert launched["memory_read_bwd_kernel_dv"] == 1
    assert launched["memory_read_bwd_kernel_dkdq"] == 2  # fused, then as the dK kernel: once
    assert launched["memory_read_fwd_kernel"] == 3  # the forward is not part of the pair
    assert [m for m in _fallback_warnings(caught) if "dk kernel" in m] == \
        _fallback_warnings(caught)[:1]


def test_compiler_output_of_a_failed_candidate_stays_off_stderr(monkeypatch, capfd):
    """What a failing compile writes to descriptor 2 (as Triton's MLIR passes do: an assertion,
    then the module) is kept in a log file that the one-line warning names, with the
    assertion; what a candidate that runs writes still reaches stderr."""
    first, second = tilings.ForwardConfig(32, 32, None, 4, 1), tilings.ForwardConfig(16, 16,
                                                                                   None, 4, 1)
    interpreter_tilings(monkeypatch, {("forward", None, None): (first, second)})
    real = running.run
    dump = "".join(f"  %{i} = arith.constant {i} : i32\n" for i in range(400))
    failing_configs = {first}

    def run(kernel, grid, arguments, config, call, **options):
        if kernel.__name__ == "memory_read_fwd_kernel":
            if config in failing_configs:
                os.write(2, f"python: Pass.cpp:62: Assertion `unsupported' failed.\n"
                            f"module {{\n{dump}}}\n".encode())
                raise RuntimeError("PassManager::run failed")
            os.write(2, b"a note from a compile that works\n")
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs(seed=10)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first candidate's failure is quiet
        memory_read(q, k, v, backend="triton")
        memory_read(q, k, v, backend="triton")  # remembered: not captured, nor compiled again
    assert capfd.readouterr().err == "a note from a compile that works\n" * 2

    failing_configs.add(second)  # now no candidate compiles: the torch read, one line
    kept_launches.forget_choices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = memory_read(q, k, v, backend="triton")
    assert capfd.readouterr().err == ""
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)
    (message,) = _fallback_warnings(caught)
    assert "RuntimeError: PassManager::run failed [Assertion `unsupported' failed.] " \
           "(compiler output: " in message and "\n" not in message
    log = pathlib.Path(message.split("(compiler output: ")[1].split(")")[0])
    assert log.read_text().count(dump) >= 2  # both candidates' output
    log.unlink()


def test_device_memory_exhaustion_is_not_a_fallback(monkeypatch):
    """Running out of device memory is the caller's to handle, not a reason to switch."""
    run, _ = failing(["fwd_kernel"], error=torch.cuda.OutOfMemoryError)
    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        memory_read(q, k, v, backend="triton")


def test_no_fallback_mode_raises_the_kernels_own_error(monkeypatch):
    run, _ = failing(["fwd_kernel"])
    monkeypatch.setattr(running, "run", run)
    monkeypatch.setenv(running.NO_FALLBACK_ENV, "1")
    with pytest.raises(Injected):
        memory_read(*_inputs(), backend="triton")


def test_devices_below_sm80_read_with_torch_and_one_warning():
    q, k, v = _inputs(seed=5)
    with devices.pretend(SM75), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = read_with_grads(q, k, v, backend="triton")
        memory_read(q, k, v, backend="triton", top_k=4)
    check_read(results, reference_with_grads(q, k, v), torch.float32)
    messages = _fallback_warnings(caught)
    assert messages[0].startswith("stm_kernels: the Triton forward kernel cannot run on Tesla "
                                  "T4 (sm_75): sm_75 is below sm_80")
    assert len(messages) == 3  # forward, backward, select: one each


def test_an_unknown_amd_architecture_reads_with_torch():
    q, k, v = _inputs(seed=6)
    with devices.pretend(RDNA3), pytest.warns(FallbackWarning,
                                              match="no tiling is validated for gfx1100"):
        out = memory_read(q, k, v, backend="triton")
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)


def test_keys_wider_than_the_tilings_read_with_torch():
    q, k, v = random_inputs(1, 1, 300, 8, 10, 20, torch.float32, "cpu", seed=7)
    with pytest.warns(FallbackWarning, match="300 key channels .* more than the kernels' "
                                             "tilings take"):
        out = memory_read(q, k, v, backend="triton")
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)


def test_architectures_are_chosen_from_what_the_device_reports():
    def arch(device):
        architecture, reason = tilings.architecture_of(device)
        return architecture.name if architecture else reason

    assert arch(SM80) == "sm_80"
    assert arch(MI300X) == "gfx942"
    assert arch(Device("L4", "nvidia", "sm_89", 99 * KIB, 58)) == "sm_86"
    assert arch(Device("Jetson AGX Orin", "nvidia", "sm_87", 163 * KIB, 16)) == "sm_80"
    assert arch(Device("RTX 5090", "nvidia", "sm_120", 99 * KIB, 170)) == "sm_120"
    assert arch(Device("DGX Spark", "nvidia", "sm_121", 99 * KIB, 48)) == "sm_120"
    assert arch(Device("B200", "nvidia", "sm_100", 227 * KIB, 148)) == "sm_100"
    assert arch(Device("Thor", "nvidia", "sm_110", 227 * KIB, 20)) == "generic"
    assert "below sm_80" in arch(SM75)
    assert "gfx1100" in arch(RDNA3)


def test_input_precision_follows_the_vendor_and_torchs_matmul_precision():
    sm80, gfx90a = tilings.ARCHITECTURES["sm_80"], tilings.ARCHITECTURES["gfx90a"]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert sm80.input_precision(torch.float32) == "ieee"  # FMA on the CUDA cores
        assert gfx90a.input_precision(torch.float32) == "ieee"  # AMD's float32 matrix cores
        torch.set_float32_matmul_precision("high")
        assert sm80.input_precision(torch.float32) == "tf32"
        assert tilings.ARCHITECTURES["gfx950"].input_precision(torch.float32) == "bf16x3"
        assert tilings.precision_class(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    for architecture in tilings.ARCHITECTURES.values():  # AMD refuses tf32 for 16-bit operands
        assert architecture.input_precision(torch.bfloat16) == "ieee"


def test_exact_float32_on_nvidia_runs_the_kernels_with_fma_dots():
    """Exact float32 ("highest") runs the kernels on NVIDIA too, with "ieee" dots (FMA on
    the CUDA cores, tiled not to spill: docs/kernels.md), with no warning, the exact result."""
    q, k, v = _inputs(seed=8)
    previous = torch.get_float32_matmul_precision()
    try:
        with devices.pretend(SM80), warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            torch.set_float32_matmul_precision("highest")
            call, reason = calls._plan_call(k)
            assert reason is None and call.architecture.name == "sm_80"
            assert (call.input_precision, call.precision_class) == ("ieee", "fp32")
            out = memory_read(q, k, v, backend="triton")
            torch.set_float32_matmul_precision("high")
            assert calls._plan_call(k)[0].input_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)


def test_every_architecture_has_every_kernel_precision_and_width():
    """Every kernel a read launches has configs of its kernel's class, in every precision and
    key width (257, the rank-1 one, included), but where the torch backend takes the read by
    design (tilings.ON_TORCH, with its reason) and the fused dK+dQ kernel where dK and dQ run
    apart (SEPARATE_DQ)."""
    read_of = {kernel: read for read, kernels in tilings.READS.items() for kernel in kernels}
    assert set(read_of) == set(tilings.KERNELS)
    for architecture in tilings.ARCHITECTURES.values():
        for kernel in tilings.KERNELS:
            for precision in tilings.PRECISIONS:
                for width in tilings.KEY_WIDTHS:
                    where = (architecture.name, kernel, precision, width)
                    if tilings.on_torch(architecture, read_of[kernel], precision, width) or (
                            kernel == "dkdq" and tilings.separates_dq(architecture, precision,
                                                                      width)):
                        continue
                    options = architecture.candidates(kernel, precision, width)
                    assert options, where
                    assert all(isinstance(config, tilings.CONFIG_CLASSES[kernel])
                               for config in options), where
    for (name, read, precision, width), reason in tilings.ON_TORCH.items():
        assert name in tilings.ARCHITECTURES and read in tilings.READS and reason, name
        assert width in tilings.KEY_WIDTHS, name
        assert precision != "16-bit", "fp16 and bf16 always run the kernels"
    assert all(name in tilings.ARCHITECTURES for name, _, _ in tilings.SEPARATE_DQ)


def _as_interpreter(monkeypatch, on_torch=(), separate_dq=()):
    """Make the interpreter's table take the given reads with torch and dK, dQ apart."""
    monkeypatch.setattr(tilings, "ON_TORCH", {("interpreter", read, "tf32", 128): f"no {read}"
                                              for read in on_torch})
    monkeypatch.setattr(tilings, "SEPARATE_DQ", frozenset(
        ("interpreter", precision, 128) for precision in separate_dq))


def test_a_read_on_torch_by_design_launches_no_kernel_and_warns_once(monkeypatch):
    """ON_TORCH sends one read of a call to the torch backend before any of its kernels is
    launched (no wasted dV before a dK+dQ that cannot run); the call's other reads still run
    the kernels; the warning gives the table's reason."""
    _as_interpreter(monkeypatch, on_torch=("backward",))
    launched = []
    real = running.run

    def run(kernel, grid, arguments, config, call, **options):
        launched.append(kernel.__name__)
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", run)
    q, k, v = _inputs(seed=4)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the "tf32" class of the interpreter's table
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = read_with_grads(q, k, v, backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    check_read(results, reference_with_grads(q, k, v), torch.float32)
    assert launched == ["memory_read_fwd_kernel"], launched
    messages = _fallback_warnings(caught)
    assert len(messages) == 1 and "the Triton backward kernel cannot run" in messages[0] \
        and "no backward" in messages[0], messages


@pytest.mark.parametrize("deterministic", [False, True])
def test_where_dk_dq_do_not_fit_together_they_run_as_two_kernels(monkeypatch, deterministic):
    """SEPARATE_DQ: the backward launches dV, dK (no dQ atomics) and the dQ kernel in every
    mode, and its gradients match the float64 reference, ragged memories included."""
    _as_interpreter(monkeypatch, separate_dq=("tf32",))
    launched = []
    real = running.run

    def run(kernel, grid, arguments, config, call, **options):
        launched.append((kernel.__name__, arguments.get("ATOMIC_DQ")))
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", run)
    q, k, v, lengths, cotangents = ragged_case("cpu", seed=5, cotangent_seed=6)
    previous = torch.get_float32_matmul_precision()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_float32_matmul_precision("high")
    torch.use_deterministic_algorithms(deterministic)
    try:
        results = ragged_read_with_grads(q, k, v, lengths, cotangents, backend="triton",
                                         similarity="l2")
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.use_deterministic_algorithms(previous_deterministic)
    check_read(results, per_object_reference(q, k, v, lengths, cotangents, similarity="l2"),
               torch.float32)
    assert ("memory_read_bwd_kernel_dkdq", False) in launched
    assert ("memory_read_bwd_kernel_dq", None) in launched
    assert ("memory_read_bwd_kernel_dkdq", True) not in launched


class FakeProperties:
    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("hip, properties, expected", [
    (None, dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                shared_memory_per_block_optin=232448, shared_memory_per_block=49152,
                gcnArchName="NVIDIA H100"),
     Device("NVIDIA H100 80GB HBM3", "nvidia", "sm_90", 232448, 132)),
    ("6.2", dict(name="AMD Instinct MI250X", major=9, minor=0, multi_processor_count=110,
                 shared_memory_per_block_optin=0, shared_memory_per_block=65536,
                 gcnArchName="gfx90a:sramecc+:xnack-"),
     Device("AMD Instinct MI250X", "amd", "gfx90a", 65536, 110))],
    ids=["cuda", "rocm"])
def test_devices_are_read_off_their_properties(monkeypatch, hip, properties, expected):
    """The multiprocessor count and shared memory come from the device, and a ROCm GPU that
    reports capability (9, 0) is a gfx90a, not an H100: no sm_90 kernel (nor the Gluon
    forward) is ever chosen for it."""
    monkeypatch.setattr(devices, "_described", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: FakeProperties(**properties))
    monkeypatch.setattr(torch.version, "hip", hip)
    device = devices.describe(torch.device("cuda", 0))
    assert device == expected
    assert tilings.architecture_of(device)[0].name == expected.arch


def test_the_gluon_forward_is_never_chosen_off_sm90(monkeypatch):
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "1")
    from stm_kernels.experimental import gluon_forward
    monkeypatch.setattr(gluon_forward, "unsupported_reason", lambda *args: None)
    call = calls.Call(MI300X, tilings.ARCHITECTURES["gfx942"], "ieee", "16-bit", 128)
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match=r"runs on sm_90 only, not AMD Instinct MI300X"):
        assert gluon_opt_in._warp_specialized_forward(call, q, k, v) == (None, True)


def test_without_triton_the_triton_backend_reads_with_torch(monkeypatch):
    monkeypatch.setattr(backends, "triton", None)
    q, k, v = _inputs()
    with pytest.warns(FallbackWarning, match="needs the triton package"):
        out = memory_read(q, k, v, backend="triton")
    assert torch.allclose(out.double(), _expected(q, k, v), atol=1e-5)
    assert backends.resolve("auto", k) == "torch"


def test_the_deterministic_dk_kernel_runs_its_twins_tilings_where_it_has_none():
    """"dk" (dK+dQ without the dQ atomics) has entries of its own where its search differed;
    elsewhere it runs dkdq's, and a config forced for dkdq is forced for it too."""
    sm_90, sm_86 = tilings.ARCHITECTURES["sm_90"], tilings.ARCHITECTURES["sm_86"]
    assert sm_90.candidates("dk", "16-bit", 128) == sm_90.candidates("dkdq", "16-bit", 128)
    assert sm_86.candidates("dk", "16-bit", 128) != sm_86.candidates("dkdq", "16-bit", 128)
    forced, own = tilings.DkdqConfig(16, 16, 2, 1, 16), tilings.DkdqConfig(32, 16, 2, 1, 32)
    with tilings.use_configs(dkdq=forced):
        assert tilings.candidates("dk", sm_90, "16-bit", 128) == (forced,)
    with tilings.use_configs(backward=tilings.BackwardConfig(dkdq=forced, dk=own)):
        assert tilings.candidates("dk", sm_90, "16-bit", 128) == (own,)
        assert tilings.candidates("dkdq", sm_90, "16-bit", 128) == (forced,)
