"""The benchmark suite: one entry point, a sub-command per benchmark.

    python -m bench all                 # every benchmark for the device present, then the tables
    python -m bench kernel [...]        # the memory read: fused vs torch vs naive vs SDPA
    python -m bench long-video [...]    # end-to-end inference against video length
    python -m bench training [...]      # training memory and step time against clip length
    python -m bench held-out [...]      # accuracy of the small trained model
    python -m bench interactive [...]   # one interactive round against annotated frames
    python -m bench interactive-eval    # robot-user rounds on DAVIS-2016 val: J&F, AUC
    python -m bench ragged-read [...]   # ragged memories in one read vs padded / per video
    python -m bench dataset-throughput  # a dataset batched K videos at a time vs one at a time
    python -m bench topk-read [...]     # top-k read vs STCN's materialised top-k; usage cost
    python -m bench cpu-read [...]      # the CPU read vs SDPA, the official read, FlexAttention
    python -m bench sharded-read [...]  # one memory sharded over 1-3 processes
    python -m bench annotate [...]      # the browser page of `stm annotate`: frame switches
    python -m bench davis-test [...]    # a checkpoint on the DAVIS-2016 test sequences: J&F, fps
    python -m bench multi-object [...]  # touching objects composited from the test sequences
    python -m bench memory-dtype [...]  # the memory stored in fp32 / bf16 / fp16: J&F, fps, bytes
    python -m bench network-dtype [...] # the network in fp32 vs bf16 autocast: J&F, fps
    python -m bench integrations [...]  # Cutie and STCN on a long video: their read vs fused
    python -m bench deploy [...]        # the ONNX runner vs torch: fps, J&F, peak memory
    python -m bench host-path [...]     # the read's host time per layer, kernels dropped on a CPU
    python -m bench quantized-read      # an 8-bit memory: the scale axes' error on real memories
    python -m bench render FILE.json    # plots and markdown table of any results file
    python -m bench report [--check|--prune]   # README and docs tables from the newest results
    pytest bench/ --benchmark-only      # micro benchmarks of the CPU paths (pytest-benchmark)

Every run writes bench/results/<name>_<device>_<date>.json (device, torch, Triton, commit,
date, raw medians and spreads) and its plot(s) beside it. `python -m bench <cmd> --help` lists
each benchmark's options.
"""
import json
import pathlib
import sys

from bench import (annotate, cpu_read, dataset_throughput, davis_test, deploy, held_out,
                   host_path, integrations, interactive, interactive_eval, kernel, long_video,
                   memory_dtype, multi_object, network_dtype, quantized_read, ragged_read,
                   report, sharded_read, topk_read, training)

BENCHMARKS = {  # sub-command: module (its results are bench/results/<module name>_*.json)
    "kernel": kernel,
    "long-video": long_video,
    "training": training,
    "held-out": held_out,
    "interactive": interactive,
    "interactive-eval": interactive_eval,
    "integrations": integrations,
    "ragged-read": ragged_read,
    "dataset-throughput": dataset_throughput,
    "topk-read": topk_read,
    "cpu-read": cpu_read,
    "sharded-read": sharded_read,
    "annotate": annotate,
    "davis-test": davis_test,
    "multi-object": multi_object,
    "deploy": deploy,
    "memory-dtype": memory_dtype,
    "network-dtype": network_dtype,
    "host-path": host_path,
    "quantized-read": quantized_read,
}


def render(path):
    """Re-render the plots of a results file beside it and print its markdown table."""
    path = pathlib.Path(path)
    payload = json.loads(path.read_text())
    name = report.benchmark_of(payload)
    if name not in report.RENDERERS:
        raise SystemExit(f"{path}: unknown benchmark {name!r} (expected one of "
                         f"{sorted(report.RENDERERS)})")
    plot, summary = report.RENDERERS[name]
    for written in (plot(payload, path) or []) if plot else []:
        print(f"wrote {written}")
    print(summary(payload))
    return 0


def main(argv=None):
    """`python -m bench COMMAND ...`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in BENCHMARKS:
        return BENCHMARKS[command].main(rest) or 0
    if command == "render":
        if len(rest) != 1:
            raise SystemExit("usage: python -m bench render RESULTS.json")
        return render(rest[0])
    if command == "report":
        return report.main(rest)
    if command == "all":
        if rest:
            raise SystemExit("python -m bench all takes no options (it runs every benchmark "
                             "with the defaults for the device present)")
        for name in ("kernel", "ragged-read", "topk-read", "sharded-read", "long-video",
                     "dataset-throughput", "training", "held-out", "interactive",
                     "interactive-eval"):
            print(f"\n=== python -m bench {name}", flush=True)
            BENCHMARKS[name].main([])
        return report.main([])
    raise SystemExit(f"unknown command {command!r}; one of all, {', '.join(BENCHMARKS)}, "
                     "render, report")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a benchmark saves what it measured before this (its message)
        print("python -m bench: interrupted", file=sys.stderr)
        sys.exit(130)
