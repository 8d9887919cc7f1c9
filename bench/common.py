"""Timing, peak-memory and environment helpers shared by the benchmarks."""
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from stm_model.devices import resolve_device

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
    """torch.device for a --device option (stm_model.devices.resolve_device)."""
    return resolve_device(name)


def environment(device):
    """Device, library versions and commit, recorded with every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _commit():
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


def run_isolated(module, arguments, timeout=1800):
    """Run `python -m module *arguments` and parse the JSON it prints last."""
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    completed = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True,
                               text=True, timeout=timeout, env=environment,
                               cwd=pathlib.Path(__file__).resolve().parents[1])
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr.strip().splitlines()[-1] if completed.stderr
                           else f"exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def save_figure(figure, results_path, dpi=100):
    """Save a matplotlib figure as the PNG beside a results file, close it; returns [path]."""
    import matplotlib.pyplot as plt
    figure.tight_layout()
    target = pathlib.Path(results_path).with_suffix(".png")
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
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def finish_run(name, payload, plot, summary):
    """Write a run's results, its plot(s) beside them, and print the path and its table."""
    path = write_results(name, payload)
    if plot is not None:
        plot(payload, path)
    print(f"wrote {path}")
    print(summary(payload))
    return path
