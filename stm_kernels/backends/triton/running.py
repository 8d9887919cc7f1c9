"""Where a kernel is launched, and the fallback from tiling to tiling.

    run                     the one place a kernel is compiled and first launched, with its
                            config's warps and stages and the architecture's compile options
    recording               within the block every launch goes to an executor instead (the
                            offline tools compile each launch for a device that is not there,
                            with tensors on the "meta" device; kept launches go through it too)
    launch_first_that_runs  the device's candidate tilings (tilings.py) in order: a candidate
                            that fails to compile or launch, or that uses more local memory than
                            its config allows (max_local_bytes), falls through to the next; the
                            choice is remembered per device, kernel and call signature
    kernels_in_sequence     a pass of several kernels is unavailable once one of them is
    KernelUnavailable       no candidate runs: the backend (backends/triton/__init__.py) reads
                            with torch instead
    chosen_configs, compiled_resources   what this process ran (the self-test's record)
    warn_once, one_line     the fallback's one-line warnings

The launchers call run and launch_first_that_runs through this module (running.run,
running.launch_first_that_runs), so that a tool or a test that replaces one does it here, in
one place.
"""
import contextlib
import os
import warnings

import torch

from . import compat, compiler_output, tilings
from .compat import patch_interpreter_index
from .devices import INTERPRETING

# Set to 1, a kernel that fails raises its own error instead of falling through (debugging).
NO_FALLBACK_ENV = "STM_KERNELS_NO_FALLBACK"
if INTERPRETING:
    patch_interpreter_index()  # Triton 3.6's interpreter with NumPy >= 2.4 (compat.py)
# The remembered choices: a candidate's index per (device, kernel, signature, candidates), the
# reason none runs, and the passes unavailable as a whole (kernels_in_sequence).
_chosen: dict = {}
_warned: set = set()


class KernelUnavailable(RuntimeError):
    """No candidate tiling of `kernel` compiles or launches on `device`; `reason` is the last
    failure, in one line."""

    def __init__(self, kernel, device, reason):
        super().__init__(f"{kernel} kernel unavailable on {device}: {reason}")
        self.kernel, self.device, self.reason = kernel, device, reason


_executor = None


class LocalMemoryExceeded(RuntimeError):
    """A candidate's compile for the device uses more local memory per thread than its
    config's max_local_bytes: the launch falls through to the next candidate."""


def run(kernel, grid, arguments, config, call, check_local=True):
    """Launch kernel[grid](**arguments) with the config's warps and stages and the call's
    architecture's compile options (or hand it all to the recording executor); returns what
    Triton's launch returns (the compiled kernel; None in the interpreter or when recording).
    A config with max_local_bytes is compiled first and not launched (LocalMemoryExceeded)
    where it uses more local memory than that; check_local=False skips that check (a kept
    launch, whose first call made it)."""
    options = dict(call.architecture.options, num_warps=config.num_warps,
                   num_stages=config.num_stages)
    if _executor is not None:
        return _executor(kernel, grid, arguments, config, options)
    if check_local and config.max_local_bytes is not None:
        used = local_memory_bytes(kernel, grid, arguments, options)
        if used is not None and used > config.max_local_bytes:
            raise LocalMemoryExceeded(
                f"{kernel.__name__} uses {used} B of local memory per thread on "
                f"{call.device} (spilled registers), more than its tiling's "
                f"{config.max_local_bytes} B")
    compiled = kernel[grid](**arguments, **options)
    _note_resources(call, kernel, config, compat.compiled_resources(compiled))
    return compiled


def local_memory_bytes(kernel, grid, arguments, options):
    """Bytes of local memory per thread of kernel(**arguments) compiled for the current
    device (compiled, not launched; the launch that follows reuses the compile), or None
    where that is not known (the interpreter compiles nothing)."""
    if INTERPRETING:
        return None
    return compat.local_memory_bytes(kernel.warmup(grid=grid, **arguments, **options))


_resources: dict = {}


def _note_resources(call, kernel, config, found):
    """Keep the registers and local memory of a launched compile, per device, kernel, config
    and the table row it came from (precision and key-width class: one config serves several
    rows, and its compiles for each differ); the most seen where the similarities' compiles of
    one row differ."""
    if found is None:
        return
    key = (call.device, kernel.__name__, config, call.precision_class, call.width)
    seen = _resources.get(key, (0, 0))
    _resources[key] = (max(seen[0], found[0]), max(seen[1], found[1]))


def compiled_resources():
    """{(device, kernel function name, config, precision class, key width class): (registers,
    local bytes per thread)} of the compiled kernels this process launched, as the driver
    reports them (the self-test's record; empty where nothing was compiled, as in the
    interpreter)."""
    return {(str(device), kernel, config, precision, width): found
            for (device, kernel, config, precision, width), found in _resources.items()}


@contextlib.contextmanager
def recording(executor):
    """Within the block every launch calls executor(kernel, grid, arguments, config, options)
    instead of running (options: num_warps, num_stages and the architecture's own); an
    exception it raises falls through to the next candidate as a failed compile would."""
    global _executor
    previous, _executor = _executor, executor
    try:
        yield
    finally:
        _executor = previous


def one_line(error):
    """`Type: first line of the message` (at most 300 characters) of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _falls_through(error):
    """Whether a failed launch tries the next candidate: any failure to compile or launch,
    but not the caller running out of device memory."""
    if os.environ.get(NO_FALLBACK_ENV, "0") == "1":
        return False
    return not isinstance(error, torch.cuda.OutOfMemoryError)


def launch_first_that_runs(kernel, call, signature, launch):
    """launch(config) with the first candidate config of `kernel` that runs on the call's
    device; the index is remembered per (device, kernel, signature). KernelUnavailable when
    none does (remembered too: later calls fail at once). Until a choice is remembered, what
    the compiler writes to stderr is captured (compiler_output): replayed after an attempt
    that runs, kept in a log file named in the reason after one that fails."""
    options = tilings.candidates(kernel, call.architecture, call.precision_class, call.width)
    memo = (call.device, kernel, signature, options)
    start = _chosen.get(memo, 0)
    reason = _chosen.get((memo, "reason"), f"no tiling of it fits {call.architecture.name} "
                                           f"({call.precision_class}, keys up to {call.width})")
    compiles = memo not in _chosen  # later calls reuse the compiles of the remembered choice
    for index in range(start, len(options)):
        with compiler_output.captured(compiles) as output:
            try:
                result = launch(options[index])
            except Exception as error:
                failed = error
            else:
                failed = None
        if failed is None:
            output.replay()
            _chosen[memo] = index
            return result
        if isinstance(failed, KernelUnavailable) or not _falls_through(failed):
            output.replay()  # a kernel launched inside this one (the split merge) has none
            raise failed
        reason = _failure_reason(failed, output, kernel)
    _chosen[memo], _chosen[(memo, "reason")] = len(options), reason
    raise KernelUnavailable(kernel, call.device, reason)


def _failure_reason(error, output, kernel):
    """One line: the error, the compiler's own diagnostic where it printed one (an
    assertion says more than "PassManager::run failed"), and where its full output went."""
    reason = one_line(error)
    diagnostic = output.diagnostic()
    if diagnostic and diagnostic not in reason:
        reason += f" [{diagnostic}]"
    log = output.save(f"{kernel}_compile")
    return reason + (f" (compiler output: {log})" if log else "")


@contextlib.contextmanager
def kernels_in_sequence(call, pass_name, signature):
    """A pass whose kernels run one after another (the forward and its split merge; dV, then
    dK/dQ or dK and dQ): once one of them is unavailable for (device, signature), so is the
    pass, remembered like a failed candidate, so that later calls fall back at once instead
    of launching the kernels before it again."""
    memo = (call.device, pass_name, signature)
    if memo in _chosen:
        raise KernelUnavailable(*_chosen[memo])
    try:
        yield
    except KernelUnavailable as unavailable:
        _chosen[memo] = (unavailable.kernel, unavailable.device, unavailable.reason)
        raise


def chosen_configs():
    """{(device, kernel): config} of the configs the launches of this process ran with (the
    self-test's record)."""
    chosen = {}
    for memo, index in _chosen.items():
        if len(memo) == 4 and index < len(memo[3]):
            chosen[(str(memo[0]), memo[1])] = memo[3][index]
    return chosen


def warn_once(message, category=RuntimeWarning):
    """warnings.warn(message) the first time this process sees it."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, category, stacklevel=3)


@contextlib.contextmanager
def flag_within_block(namespace, name, value):
    """Within the block the module flag namespace[name] (namespace: the module's globals()) is
    `value`; the value before is restored after it (the switches: warp_specialized_forward,
    warp_specialized_backward, binding_every_launch, planning_every_call)."""
    previous = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = previous
