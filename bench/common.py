"""Timing, peak-memory, environment and option helpers shared by the benchmarks."""
import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time

import torch

from stm_kernels.options import DTYPES
from stm_model.runtime.devices import resolve_device

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def build_model(kind, device):
    """(STM in eval mode, its name) for the benchmarks: "small" is the committed small trained
    model (random weights if the file is missing), anything else the official-size network with
    random weights (timing does not depend on them)."""
    from stm_model import STM, STMConfig
    if kind == "small":
        from stm_model.demo import WEIGHTS, load_small_model
        if WEIGHTS.exists():
            return load_small_model(device=device), "small (committed weights)"
        return STM(STMConfig.small()).to(device).eval(), "small (random weights)"
    return STM(STMConfig()).to(device).eval(), "official size (random weights)"


def pick_device(name):
    """torch.device for a --device option (stm_model.runtime.devices.resolve_device)."""
    return resolve_device(name)


def environment(device):
    """Device, library versions and commit, recorded with every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = {}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        # the processor, the flags that decide the read's speed and the threads used: the
        # machines here vary, and figures from two processors are never one ratio
        from stm_kernels.backends import cpu_features
        info = cpu_features.cpu_info()
        cpu = dict(cpu_model=info["model"], cpu_flags=info["flags"],
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        name = (f"{info['model']} ({', '.join(info['flags']) or 'no AVX2'}), "
                f"{cpu['threads']} threads")
    return {
        "device": name,
        **cpu,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit():
    """The commit results come from (HEAD, '-dirty' with uncommitted changes; STM_COMMIT on the
    device machine, whose copy has no .git; 'unknown' outside git)."""
    if os.environ.get("STM_COMMIT"):  # the device machine receives a work tree without .git
        return os.environ["STM_COMMIT"]
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(fn, device, *, reset=(), min_runs=3, budget_s=2.0):
    """Median and 20/80% quantiles of fn's wall time in ms (CUDA events via do_bench on GPU).

    `reset` lists tensors whose .grad is cleared before each run.
    """
    if device.type == "cuda":
        import triton.testing
        median, low, high = triton.testing.do_bench(
            fn, warmup=25, rep=100, grad_to_none=list(reset) or None, quantiles=[0.5, 0.2, 0.8])
        return median, low, high
    times = []
    fn()  # warm-up
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 20):
        for tensor in reset:
            tensor.grad = None
        tick = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tick) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), quantiles[0], quantiles[3]


def kernel_ms(fn, device, *, reset=(), calls=20):
    """The GPU kernels' own time per call of fn in ms (torch.profiler's device time of every
    CUDA kernel over `calls` calls, summed, over calls), beside time_ms's wall time: what the
    call would take with no host work between its kernels. None where the profiler recorded
    no kernel (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            for tensor in reset:
                tensor.grad = None
            fn()
        torch.cuda.synchronize(device)
    total_us = sum(event.self_device_time_total for event in profiler.key_averages()
                   if event.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / calls / 1e3 if total_us else None


def cuda_peak_extra_bytes(fn, device):
    """Peak CUDA memory allocated during one call of fn, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def status_bytes(field):
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes."""
    match = re.search(rf"{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024


def reset_peak_rss():
    """Reset this process's resident-set high-water mark (VmHWM) to its current size."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def cpu_peak_extra_bytes(fn):
    """Resident-set high-water mark during one call of fn, above the resident set before it.

    Linux only (resets the mark through /proc/self/clear_refs). fn is called once first so that
    one-time library allocations are not counted; run it in a process started by
    `run_isolated`, where glibc maps every block of 64 KiB or more afresh and unmaps it when
    freed, so memory kept from the warm-up call cannot hide the measured call's allocations.
    """
    fn()
    reset_peak_rss()
    before = status_bytes("VmRSS")
    fn()
    # the kernel syncs its per-thread RSS counters lazily: for a call that allocates almost
    # nothing the difference can come out a few KiB below zero
    return max(0, status_bytes("VmHWM") - before)


CHILD_OPTION = "--_child"  # hidden: the JSON spec of a process started by run_isolated


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a stage's SIGINT) while an isolated run was going; `result` is what its
    child had measured when it stopped, or None."""

    def __init__(self, result=None):
        super().__init__()
        self.result = result


# Seconds an interrupted child gets to print what it measured (a lent GPU's stage sends KILL
# 20 s after its SIGINT).
INTERRUPT_GRACE_S = 15


def run_isolated(module, spec, timeout=1800, unmap_freed_memory=True):
    """Run `python -m module` in a fresh process on one JSON spec and return what it printed.

    The module's main parses its options with `parse_args_or_run_child`, which hands the spec
    to its child function and prints the JSON of the result as the last line. With
    unmap_freed_memory, glibc maps every block of 64 KiB or more afresh and unmaps it when
    freed (what `cpu_peak_extra_bytes` needs); without it the process keeps glibc's defaults.
    Interrupted (SIGINT reaches the child too: one process group), the child gets
    INTERRUPT_GRACE_S to stop where it is and print its result, raised as Interrupted.result.
    """
    environment = dict(os.environ)
    if unmap_freed_memory:
        environment.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    process = subprocess.Popen([sys.executable, "-m", module, CHILD_OPTION, json.dumps(spec)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, cwd=pathlib.Path(__file__).resolve().parents[1])
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except KeyboardInterrupt:
        try:
            stdout, _ = process.communicate(timeout=INTERRUPT_GRACE_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            process.kill()
            process.communicate()
            raise Interrupted() from None
        raise Interrupted(_last_json(stdout)) from None
    except BaseException:
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(stderr.strip().splitlines()[-1] if stderr.strip()
                           else f"exit code {process.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def _last_json(stdout):
    """The JSON object on the last line of a child's output, or None."""
    lines = (stdout or "").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return result if isinstance(result, dict) else None


def keep_interrupted(name, payload, stop):
    """After an Interrupted run: its child's result (if any) joins payload["records"] and the
    payload is saved as incomplete, so that a cut-off run keeps every record it made."""
    if stop.result is not None:
        payload["records"].append(stop.result)
    path = save_progress(name, payload)
    print(f"interrupted: what was measured is in {path}", file=sys.stderr, flush=True)


def speed_then_peak(module, spec, device, merge, peak_spec=None, timeout=1800):
    """The record of an isolated run of `module` on spec; on a CPU from two fresh processes:
    the speed with glibc's own allocator, then the peak memory from a second run under the
    unmapping allocator (run_isolated's unmap_freed_memory: what an exact resident-set peak
    needs, but each freed block of 64 KiB or more is then mapped and faulted in afresh, which
    slowed Cutie's reads at 480p by about 45%). peak_spec(record) is the second run's spec
    (default: spec; None skips it), merge(record, memory_record) copies its peaks into the
    speed run's record (memory_record None: the second run was interrupted, the peaks are
    unknown; Interrupted is raised again with the speed run's record)."""
    record = run_isolated(module, spec, timeout=timeout, unmap_freed_memory=device.type != "cpu")
    if device.type != "cpu":
        return record
    second = spec if peak_spec is None else peak_spec(record)
    if second is None:
        return record
    try:
        memory = run_isolated(module, second, timeout=timeout)
    except Interrupted:
        merge(record, None)
        raise Interrupted(record) from None
    merge(record, memory)
    return record


def speed_then_peak_over_lengths(module, spec, device, rows, timeout=1800):
    """speed_then_peak for a video benchmark whose record holds rows(record) at lengths: the
    second run covers the lengths the first reached, whatever the clock says this time (no
    time limit), and each row takes its peak (merge_peaks_by_length)."""
    def peak_spec(record):
        lengths = sorted({row["length"] for row in rows(record)})
        return dict(spec, lengths=lengths, time_limit=float("inf")) if lengths else None
    return speed_then_peak(module, spec, device, merge_peaks_by_length(rows), peak_spec,
                           timeout)


def merge_peak(record, memory):
    """A speed_then_peak merge for a record with one peak_mem_bytes (None: unknown)."""
    record["peak_mem_bytes"] = None if memory is None else memory["peak_mem_bytes"]


def mib(value):
    """Bytes as whole MiB for a table, or "-" where unknown (None)."""
    return "-" if value is None else f"{value / 2**20:.0f}"


def merge_peaks_by_length(rows):
    """A speed_then_peak merge for records of rows at video lengths (rows(record): its rows,
    each with "length" and "peak_mem_bytes"): each row takes the second run's peak at its
    length, and the record the second run's status as memory_status."""
    def merge(record, memory):
        peaks = {} if memory is None else {row["length"]: row["peak_mem_bytes"]
                                           for row in rows(memory)}
        for row in rows(record):
            row["peak_mem_bytes"] = peaks.get(row["length"])
        if memory is not None:
            record["memory_status"] = memory["status"]
    return merge


def parse_args_or_run_child(parser, argv, child):
    """parser.parse_args(argv); or, in a process started by `run_isolated`, None once the JSON
    of child(spec) has been printed."""
    parser.add_argument(CHILD_OPTION, dest="child_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_spec is None:
        return args
    print(json.dumps(child(json.loads(args.child_spec))))
    return None


def available_memory_bytes():
    """The memory available to a new allocation without swapping (/proc/meminfo)."""
    text = pathlib.Path("/proc/meminfo").read_text()
    return int(text.split("MemAvailable:")[1].split()[0]) * 1024


def benchmark_parser(doc, prog=None, device_choices=("auto", "cpu", "cuda")):
    """A benchmark's option parser: doc's first paragraph as its description, and --device
    (default auto; device_choices=None takes any name `pick_device` knows, e.g. cuda:1)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=device_choices)
    return parser


# The shape options of the memory-read benchmarks, for add_read_shape_arguments.
_READ_SHAPE_OPTIONS = {"hw": dict(type=int), "objects": dict(type=int), "ck": dict(type=int),
                       "cv": dict(type=int), "top_k": dict(type=int),
                       "dtype": dict(choices=sorted(DTYPES))}


def add_read_shape_arguments(parser, **defaults):
    """Add the read-shape options named by the keywords, in their order, with their values as
    defaults: --hw, --objects, --ck, --cv, --top-k (ints) and --dtype (a name of
    stm_kernels.options.DTYPES). A default of None is the device's, set by
    `apply_device_defaults`."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default,
                            **_READ_SHAPE_OPTIONS[name])


def apply_device_defaults(args, defaults):
    """The torch.device of args.device; each option that defaults[device type] names and that
    was not given (None or 0) takes that default."""
    device = pick_device(args.device)
    for name, value in defaults[device.type].items():
        setattr(args, name, getattr(args, name) or value)
    return device


@contextlib.contextmanager
def torch_setting(get, set_, value):
    """Sets a global torch setting for the block and restores it after: e.g.
    torch_setting(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms,
    True)."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for a block (the Triton backward then
    computes dQ without atomics)."""
    return torch_setting(torch.are_deterministic_algorithms_enabled,
                         torch.use_deterministic_algorithms, True)


def read_inputs(B, HW, N, Ck, Cv, dtype, device, requires_grad=False):
    """(q, k, v, grad) of a memory read, random (seeded): one query frame (1, Ck, HW) shared
    by the B objects, their memories (B, Ck, N) and (B, Cv, N), and an output gradient
    (B, Cv, HW); q, k and v require gradients when asked."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, generator=generator, device=device, dtype=dtype)
                     for shape in ((1, Ck, HW), (B, Ck, N), (B, Cv, N), (B, Cv, HW)))
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), \
        v.requires_grad_(requires_grad), grad


@contextlib.contextmanager
def environment_variable(name, value):
    """os.environ[name] = value for a block, restored after it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def warp_specialized_forward(config):
    """The opt-in warp-specialised Gluon forward under this WarpSpecializedConfig for a block
    (where it cannot run, the launcher warns once and runs the plain forward)."""
    from stm_kernels.backends.triton import launch
    with launch.warp_specialized_forward(), launch.use_configs(warp_specialized=config):
        yield


@contextlib.contextmanager
def warp_specialized_backward(config=None, dv_config=None):
    """The opt-in warp-specialised Gluon dV and dK/dQ kernels for a block, under this
    WarpSpecializedBackwardConfig (dK/dQ) and WarpSpecializedDvConfig (dV), None for a
    default (where one cannot run, the launcher warns once and runs the plain kernel)."""
    from stm_kernels.backends.triton import launch
    with launch.warp_specialized_backward(), \
            launch.use_configs(warp_specialized_backward=config, warp_specialized_dv=dv_config):
        yield


def warp_specialized_backward_reason(q, k, v):
    """Why the opted-in Gluon backward would not run whole in the backward of
    memory_read(q, k, v) under the tilings in force (one of its kernels would warn and take the
    plain one): "the Gluon dK/dQ kernel does not run here: ..." or the dV kernel's; None
    where both run."""
    from stm_kernels import experimental
    reasons = experimental.read_unsupported_reasons(q, k, v)
    for name in ("dK/dQ", "dV"):
        if reasons[name] is not None:
            return f"the Gluon {name} kernel does not run here: {reasons[name]}"
    return None


def subplots(*arguments, **options):
    """matplotlib.pyplot.subplots(...) drawing off screen (the Agg backend): (figure, axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*arguments, **options)


def panels(values, width, height=3.6):
    """A figure of one panel per value, side by side: (figure, [(axis, value)])."""
    figure, axes = subplots(1, len(values), figsize=(width * len(values), height), squeeze=False)
    return figure, list(zip(axes[0], values, strict=True))


def fit_title(figure, margin=0.96):
    """Wrap each line of the figure's title (its suptitle) that is wider than `margin` of the
    figure, at spaces: a long CPU name would otherwise run off both sides."""
    title = figure._suptitle  # matplotlib keeps the suptitle's Text here (None without one)
    if title is None or not title.get_text():
        return
    renderer, limit = figure.canvas.get_renderer(), figure.bbox.width * margin

    def width(text):
        title.set_text(text)
        return title.get_window_extent(renderer).width

    lines = []
    for line in title.get_text().split("\n"):
        wrapped, chars = [line], len(line)
        while chars > 10 and max(map(width, wrapped)) > limit:
            chars -= max(1, chars // 20)
            wrapped = textwrap.wrap(line, chars) or [line]
        lines += wrapped
    title.set_text("\n".join(lines))


def save_figure(figure, results_path, dpi=100, name=None):
    """Save a matplotlib figure as the PNG beside a results file (<stem>_<name>.png with a
    name), its title fitted to its width (fit_title), close it; returns [path]."""
    import matplotlib.pyplot as plt
    fit_title(figure)
    figure.tight_layout()
    results_path = pathlib.Path(results_path)
    target = results_path.with_name(f"{results_path.stem}_{name}.png") if name else \
        results_path.with_suffix(".png")
    figure.savefig(target, dpi=dpi)
    plt.close(figure)
    return [target]


def progress(**options):
    """A progress bar on stderr (tqdm) whose .write() prints lines above it."""
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, file=sys.stderr, **options)


def write_results(name, payload, directory=None):
    """Write payload as <directory>/<name>_<device type>_<UTC date-time>.json and return the
    path; directory defaults to $STM_BENCH_RESULTS or bench/results."""
    directory = pathlib.Path(directory or os.environ.get("STM_BENCH_RESULTS") or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = payload["date"].replace(":", "").replace("-", "")[:15]
    path = directory / f"{name}_{payload['device_type']}_{stamp}.json"
    # Written beside and renamed: a run killed mid-write leaves the previous save whole.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, path)
    return path


def save_progress(name, payload):
    """Write the records so far, marked incomplete, to the file finish_run will complete: a
    run cut off (a time limit on a lent GPU, an error) keeps what it measured."""
    payload["complete"] = False
    return write_results(name, payload)


def finish_run(name, payload, plot, summary):
    """Write a run's results, its plot(s) beside them, and print the path and its table."""
    payload["complete"] = True
    path = write_results(name, payload)
    if plot is not None:
        plot(payload, path)
    print(f"wrote {path}")
    print(summary(payload))
    return path
