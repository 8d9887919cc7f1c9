"""Render the benchmark tables of README.md and docs/performance.md from the committed results.

    python -m bench.report            # rewrite the marked sections of both
    python -m bench.report --check    # exit 1 if either is not what the results give
    python -m bench.report --prune    # drop results a newer one replaces, then rewrite

Each holds `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->` blocks; each is replaced by the
table of the newest bench/results/NAME_<device>_<date>.json per device, with the device,
library versions, commit and date of the run that produced it. Nothing in those blocks is
typed by hand. `<!-- bench:NAME field=value -->` keeps only the results whose field has that
value (the README's tables show the default model; docs/performance.md every model).

It also draws the README's GPU plot, docs/images/gpu_read.png (bench.kernel.read_plot: time
against memory frames for the fused read, its best peer and the naive read), from the newest
GPU kernel run whose scaling sweep measured the target shape at three or more memory sizes
(else the newest with three or more in any sweep, else the newest with any:
bench.kernel.read_plot_run); the PNG's "Source" text names that file, and --check fails when it
names another.
"""
import argparse
import json
import pathlib
import re
import sys

from bench import (annotate, cpu_read, dataset_throughput, davis_test, deploy, held_out,
                   host_path, integrations, interactive, interactive_eval, kernel, long_video,
                   memory_dtype, multi_object, ragged_read, sharded_read, topk_read, training)
from bench.common import RESULTS
from tools.gpu_session import ncu_summary, profile_target

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GPU_PLOT = ROOT / "docs" / "images" / "gpu_read.png"
# The pages whose `bench:` blocks are generated: the README's headline, the performance page.
DOCUMENTS = (README, ROOT / "docs" / "performance.md")
# results "benchmark" field: (plot(payload, path) -> written paths, or None; summary(payload)
# -> markdown table). `python -m bench render` uses both, the `bench:` blocks the summary.
RENDERERS = {
    "kernel": (kernel.plot, kernel.summary),
    "long_video": (long_video.plot, long_video.summary),
    "training": (training.plot, training.summary),
    "held_out": (None, held_out.summary),
    "interactive": (interactive.plot, interactive.summary),
    "interactive_eval": (interactive_eval.plot, interactive_eval.summary),
    "ragged_read": (ragged_read.plot, ragged_read.summary),
    "dataset_throughput": (dataset_throughput.plot, dataset_throughput.summary),
    "topk_read": (topk_read.plot, topk_read.summary),
    "cpu_read": (cpu_read.plot, cpu_read.summary),
    "sharded_read": (sharded_read.plot, sharded_read.summary),
    "annotate": (annotate.plot, annotate.summary),
    "davis_test": (davis_test.plot, davis_test.summary),
    "multi_object": (multi_object.plot, multi_object.summary),
    "deploy": (deploy.plot, deploy.summary),
    "memory_dtype": (memory_dtype.plot, memory_dtype.summary),
    "integrations": (integrations.plot, integrations.summary),
    "kernel_breakdown": (profile_target.plot, profile_target.summary),
    "ncu": (None, ncu_summary.summary),
    "host_path": (None, host_path.summary),
}
# Earlier names of a benchmark, as committed result files still record them in their
# "benchmark" field: `python -m bench kernel` wrote "memory_read" before it was named "kernel".
ALIASES = {"memory_read": "kernel"}


def benchmark_of(payload):
    """The benchmark a results payload belongs to (its "benchmark" field, aliases resolved)."""
    name = payload.get("benchmark")
    return ALIASES.get(name, name)


_BLOCK = re.compile(r"(<!-- bench:(\w+)((?: [\w-]+=[^\s>]+)*) -->\n).*?(<!-- /bench:\2 -->)",
                    re.DOTALL)


def result_key(payload):
    """What a newer result replaces an older one for: (device type, frame size, longest video,
    busy, GPU, sweeps, scope, CPU flags) (the frame size and video length for benchmarks run
    at several; busy for a run made beside a competing process on purpose, which does not
    replace a quiet one; the GPU's name, as an H100 run says nothing of an H200; the (sweep,
    dtype) pairs of a benchmark with sweeps, as a run of one sweep does not replace a run of
    another; the scope of a run narrowed on purpose (its dtype and query size, the candidates
    picked with --only, a run under compute-sanitizer), as a check of three tilings does not
    replace a tuning; the CPU's flags, as an AVX2 run says nothing of an AVX-512 one; the
    shape of a run at one shape (the profiles at N = 16,200 and 162,000); cut off, as a run
    stopped by its time limit does not replace a whole one; the memory sizes its records
    cover, as a quick check at one N does not replace a sweep; the checkpoint of a model's
    benchmark, as the interactive model's scores do not replace the default model's; the keys'
    scale of a CPU read run on peaked scores; a long video with its memory reserved up front,
    as it measures the read's working memory, not the bank's growth; the dtypes and sequences
    of a run on real video, as three sequences' 8-bit memories do not replace ten sequences'
    16-bit ones)."""
    if payload.get("selftest"):  # the self-test's report: device "cuda", the GPU in "name"
        gpu = payload.get("name") if payload.get("device") != "cpu" else None
    else:
        gpu = payload.get("device") if payload.get("device_type") not in (None, "cpu") else None
    records = payload.get("records")
    sweeps = tuple(sorted({(r["sweep"], str(r.get("dtype"))) for r in records
                           if isinstance(r, dict) and "sweep" in r})) \
        if isinstance(records, list) else ()
    shape = payload.get("shape") if isinstance(payload.get("shape"), dict) else {}
    memory_sizes = tuple(sorted({r["N"] for r in records if isinstance(r, dict) and "N" in r})) \
        if isinstance(records, list) else ()
    scope = (str(payload.get("dtype")), payload.get("HW"), tuple(payload.get("only") or ()),
             payload.get("sanitizer"), tuple(sorted((k, str(v)) for k, v in shape.items())),
             payload.get("complete") is False, memory_sizes, payload.get("checkpoint"),
             payload.get("key_scale", 1.0), bool(payload.get("reserve_memory")),
             *(json.dumps(payload.get(name), sort_keys=True, default=str)
               for name in ("dtypes", "sequences")))
    cpu = tuple(payload.get("cpu_flags") or ())
    return (payload.get("device_type"), tuple(payload.get("size") or ()),
            max(payload.get("lengths") or [0]), bool(payload.get("busy")), gpu, sweeps, scope,
            cpu)


def newest_results(name, directory=RESULTS):
    """{result_key: payload} of the newest result file of a benchmark per device type and, for
    benchmarks run at several frame sizes or video lengths, per size and longest video."""
    newest = {}
    for path in sorted(directory.glob(f"{name}_*.json")):
        payload = json.loads(path.read_text())
        if benchmark_of(payload) != name:  # kernel_* also finds kernel_work_*, for example
            continue
        payload["_file"] = path.name
        newest[result_key(payload)] = payload  # sorted by date: the last one wins
    return newest


def superseded(directory=RESULTS):
    """The result files (and the plots beside them) that a newer result of the same benchmark
    and key replaces; older results stay in git history."""
    paths = sorted(pathlib.Path(directory).glob("*.json"))
    newest = {}
    for path in paths:  # file names end in the run's date, so sorted is oldest first
        payload = json.loads(path.read_text())
        newest[(benchmark_of(payload), result_key(payload))] = path
    kept = set(newest.values())
    old = [path for path in paths if path not in kept]
    plots = [plot for path in old for plot in sorted(path.parent.glob(f"{path.stem}*.png"))]
    return sorted(old + plots)


def render(name, directory=RESULTS, only=None):
    """The markdown of one `bench:` block: the newest results of benchmark `name` per device
    (only: {field: value} the results must match, as strings)."""
    results = {key: payload for key, payload in newest_results(name, directory).items()
               if all(str(payload.get(field)) == value for field, value in (only or {}).items())}
    if not results:
        wanted = "".join(f" with {field} {value}" for field, value in (only or {}).items())
        return f"_No `{name}` results{wanted} committed yet._\n"
    parts = []
    for key in sorted(results, key=lambda k: (k[0] != "cuda", k[1], k[2])):
        payload = results[key]
        cut_off = ""
        if payload.get("complete") is False:  # saved as it went, never finished
            cut_off = " · **incomplete: the run was cut off**"
        parts.append(f"{payload['device']} · torch {payload['torch']} · triton "
                     f"{payload['triton']} · commit {payload['commit'][:12]} · "
                     f"{payload['date'][:10]} · `bench/results/{payload['_file']}`{cut_off}\n\n"
                     f"{RENDERERS[name][1](payload)}\n")
    return "\n".join(parts)


def rewrite(text, directory=RESULTS):
    """text with every `<!-- bench:NAME [field=value ...] -->` block replaced by
    render(NAME, only={field: value})."""
    def block(match):
        only = dict(pair.split("=", 1) for pair in match.group(3).split())
        return match.group(1) + render(match.group(2), directory, only) + match.group(4)
    return _BLOCK.sub(block, text)


def kernel_runs(directory=RESULTS):
    """Every kernel benchmark result in the directory (payloads, "_file" set)."""
    runs = []
    for path in sorted(pathlib.Path(directory).glob("kernel_*.json")):
        payload = json.loads(path.read_text())
        if benchmark_of(payload) == "kernel":
            payload["_file"] = path.name
            runs.append(payload)
    return runs


def plot_source(path):
    """The "Source" text of a PNG written by read_plot (None without one, or no file)."""
    try:
        from PIL import Image
        with Image.open(path) as image:
            return image.text.get("Source")
    except (OSError, ImportError):
        return None


def gpu_plot(directory=RESULTS, target=GPU_PLOT, check=False):
    """Draw the README's GPU plot from the run kernel.read_plot_run picks (check: only say
    whether the one there names it). Returns (the run's file name or None, up to date)."""
    run = kernel.read_plot_run(kernel_runs(directory))
    if run is None:
        return None, True
    if check:
        return run["_file"], plot_source(target) == run["_file"]
    kernel.read_plot(run, target, source=run["_file"])
    return run["_file"], True


def main(argv=None):
    """`python -m bench report [--check]`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--prune", action="store_true",
                        help="delete the results a newer one of the same benchmark and device "
                             "replaces (git keeps them), then rewrite")
    args = parser.parse_args(argv)
    if args.prune:
        for path in superseded():
            path.unlink()
            print(f"removed {path.relative_to(RESULTS.parent.parent)}")
    stale = []
    for document in DOCUMENTS:
        current = document.read_text()
        updated = rewrite(current)
        if updated == current:
            continue
        stale.append(document)
        if not args.check:
            document.write_text(updated)
            print(f"updated the benchmark blocks of {document.relative_to(ROOT)}")
    source, current = gpu_plot(check=args.check)
    if not current:
        stale.append(GPU_PLOT)
    elif source and not args.check:
        print(f"drew {GPU_PLOT.relative_to(ROOT)} from bench/results/{source}")
    if args.check and stale:
        print(f"benchmark tables are stale in {', '.join(str(d.relative_to(ROOT)) for d in stale)}"
              ": run python -m bench report")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
