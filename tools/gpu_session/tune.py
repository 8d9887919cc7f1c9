"""Time the Triton kernels under each candidate tiling and report the fastest (GPU).

    python -m tools.gpu_session.tune                               # bf16, target shapes, full sweep
    python -m tools.gpu_session.tune --quick                       # the defaults and a few others
    python -m tools.gpu_session.tune --baseline .baseline/7acb609  # and an earlier commit's kernels
    python -m tools.gpu_session.tune --only "dkdq block_n=64"      # those candidates alone

Per shape it times, the device's own tilings first (tilings.py, its architecture's table), then
the candidates of the offline search (tools/kernel_report/search.py): the forward under each
forward candidate; the backward with each dV candidate (dK/dQ at its default) and each dK/dQ
candidate (dV at its default); the backward under torch.use_deterministic_algorithms with
each dQ candidate (the dQ kernel instead of the atomics); the opt-in warp-specialised Gluon
forward where it can run, at its default tiling and with the row split
(triton_configs.ROW_SPLIT_CONFIG), and the opt-in Gluon backward (dV and dK/dQ kernels;
forward + backward) at their defaults, with dK/dQ at 16 query rows per step, and with dV's
deeper P^T ring; and, with --baseline (an export of an earlier commit,
`python -m tools.gpu_session.baseline export REV`), that library's forward and
forward+backward at its own defaults. Every timed call is first checked against the torch
backend on the same inputs (normalised error bound per dtype): a tiling that fails to compile,
runs out of resources or computes a wrong result is recorded as such. TFLOP/s count forward
2*B*HW*N*(Ck+Cv) and backward 2.5x that. Writes bench/results/tune_<device>_<date>.json; copy
the winners into stm_kernels/backends/triton/tilings.py with the run that justifies them. The
file names the run's scope (dtype, HW, --only, and the compute-sanitizer tool from
STM_SANITIZER, whose timings mean nothing), so that a narrowed run never replaces a full one.
"""
import argparse
import contextlib
import dataclasses
import itertools
import os
import sys

import torch

from bench import common
from tools.gpu_session import baseline
from tools.kernel_report.search import CANDIDATES
from stm_kernels import memory_read
from stm_kernels.backends.triton import launch as launchers
from stm_kernels.backends.triton import tilings as triton_configs
from stm_kernels.options import DTYPES
from stm_kernels.selftest import relative_error

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}


def _reference(q, k, v, grad):
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out = memory_read(q, k, v, backend="torch")
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def time_forward(read, q, k, v, device, reference):
    """Error against the reference and timing of the forward read(q, k, v)."""
    out = read(q, k, v)
    error = relative_error(out, reference[0])
    median, low, high = common.time_ms(lambda: read(q, k, v), device)
    return dict(error=error, median_ms=median, q20_ms=low, q80_ms=high)


def time_forward_backward(read, q, k, v, grad, device, reference):
    """Largest gradient error against the reference and timing of forward + backward."""
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    read(q, k, v).backward(grad)
    error = max(relative_error(g, r)
                for g, r in zip((q.grad, k.grad, v.grad), reference[1:], strict=True))

    def step():
        read(q, k, v).backward(grad)
    median, low, high = common.time_ms(step, device, reset=(q, k, v))
    return dict(error=error, median_ms=median, q20_ms=low, q80_ms=high)


def _triton_read(q, k, v):
    return memory_read(q, k, v, backend="triton")


def defaults(dtype, device):
    """{kernel: the first config} of the device's architecture for dtype (keys up to 128
    channels, torch's current float32 matmul precision)."""
    from stm_kernels.backends.triton import devices
    architecture, reason = triton_configs.architecture_of(devices.describe(device))
    if architecture is None:
        raise SystemExit(f"the Triton kernels do not run on {device}: {reason}")
    precision = triton_configs.precision_class(dtype)
    return {kernel: architecture.candidates(kernel, precision, 128)[0]
            for kernel in triton_configs.KERNELS}


def candidates(dtype, quick, device=None):
    """[(kind, label, context manager factory, pass)] to time for this dtype on the device
    (None: the CPU, i.e. the interpreter's tilings)."""
    chosen = defaults(dtype, device or torch.device("cpu"))
    size = min(dtype.itemsize, 4)

    def with_default_first(kernel):
        return [chosen[kernel]] + [c for c in CANDIDATES[(kernel, size)] if c != chosen[kernel]]

    forwards, dvs, dkdqs, dqs = (with_default_first(kernel)
                                 for kernel in ("forward", "dv", "dkdq", "dq"))
    default_backward = triton_configs.BackwardConfig(chosen["dv"], chosen["dkdq"], chosen["dq"])
    if quick:
        forwards, dvs, dkdqs, dqs = forwards[:3], dvs[:2], dkdqs[:2], dqs[:1]

    def backward_with(**config):
        return lambda: launchers.use_configs(
            backward=dataclasses.replace(default_backward, **config))
    forward_runs = [("forward", _label(c), lambda c=c: launchers.use_configs(forward=c), "fwd")
                    for c in forwards]
    dv_runs = [("backward", "dv " + _label(c), backward_with(dv=c), "fwd+bwd") for c in dvs]
    # The defaults first (the forward, then the backward: dv's default is the default
    # backward), so that a run cut off by a time limit has them.
    runs = forward_runs[:1] + dv_runs[:1] + forward_runs[1:] + dv_runs[1:]
    runs += [("backward", "dkdq " + _label(c), backward_with(dkdq=c), "fwd+bwd")
             for c in dkdqs[1:]]
    runs += [("backward", "deterministic dq " + _label(c),
              lambda c=c: _deterministic(backward_with(dq=c)), "fwd+bwd") for c in dqs]
    if dtype != torch.float32:  # last: never run on a GPU, it may crash the CUDA context
        for label, config in _gluon_configs(quick):
            runs.append(("forward", label,
                         lambda c=config: common.warp_specialized_forward(c), "fwd"))
        for label, config, dv_config in _gluon_backward_configs(quick):
            runs.append(("backward", label, lambda c=config, d=dv_config:
                         common.warp_specialized_backward(c, d), "fwd+bwd"))
    return runs


def only_matching(runs, texts):
    """The runs whose label holds one of texts (all of them for None); SystemExit naming the
    labels there are when none does."""
    if not texts:
        return runs
    kept = [run for run in runs if any(text in run[1] for text in texts)]
    if not kept:
        raise SystemExit("--only matches no candidate; the labels are:\n" +
                         "\n".join(run[1] for run in runs))
    return kept


def _gluon_configs(quick):
    """(label, WarpSpecializedConfig) of the Gluon forward to time: the default (64 rows, 20 B
    from L2 per pair) and the row split (128 rows, 12 B per pair, 1.2x the MACs), whose 2-stage
    ring trades depth for shared memory."""
    configs = [triton_configs.WarpSpecializedConfig(), triton_configs.ROW_SPLIT_CONFIG,
               dataclasses.replace(triton_configs.ROW_SPLIT_CONFIG, num_stages=2)]
    return [("warp-specialized (Gluon) " + _label(c), c) for c in configs[:2 if quick else 3]]


def _gluon_backward_configs(quick):
    """(label, WarpSpecializedBackwardConfig, WarpSpecializedDvConfig) of the Gluon backward
    to time: both kernels' defaults; dK/dQ at 16 query rows with 4 stages (wgmma N = 16: more
    shared-memory bytes per MAC, a deeper ring); dV with 3 P^T slots (the P^T warpgroup
    further ahead of the dV ones). All compile without spills."""
    dkdq, dv = triton_configs.WarpSpecializedBackwardConfig, triton_configs.WarpSpecializedDvConfig
    configs = [(dkdq(), dv()), (dkdq(block_m=16, num_stages=4), dv()), (dkdq(), dv(num_p=3))]
    return [(f"warp-specialized backward (Gluon) dkdq {_label(c)}; dv {_label(d)}", c, d)
            for c, d in configs[:1 if quick else 3]]


@contextlib.contextmanager
def _deterministic(configs):
    """torch.use_deterministic_algorithms (the dQ kernel instead of the dK/dQ kernel's
    atomics) under the configs context."""
    with configs(), common.deterministic_algorithms():
        yield


def _label(config):
    return ",".join(f"{name}={getattr(config, name)}" for name in config.__dataclass_fields__
                    if getattr(config, name) is not None)


def _attempt(fn, *arguments):
    try:
        return fn(*arguments)
    except Exception as error:  # out of resources, compile errors: a result, not a crash
        message = str(error).strip().splitlines()
        return dict(error_type=type(error).__name__, message=message[0][:200] if message else "")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure(read, label, context, pass_, inputs, device, reference):
    """The timing and error of one candidate on inputs (q, k, v, grad)."""
    q, k, v, grad = inputs
    with context():
        if label.startswith("warp-specialized backward"):
            reason = common.warp_specialized_backward_reason(q, k, v)
            if reason is not None:  # the launcher would run a plain kernel instead
                raise RuntimeError(reason)
        elif label.startswith("warp-specialized"):
            from stm_kernels.experimental import gluon_forward as memory_read_gluon
            reason = memory_read_gluon.unsupported_reason(
                q, k, v, triton_configs.warp_specialized_config())
            if reason is not None:  # the launcher would run the plain kernel instead
                raise RuntimeError(reason)
        if pass_ == "fwd":
            return time_forward(read, q, k, v, device, reference)
        return time_forward_backward(read, q, k, v, grad, device, reference)


def _flops(pass_, B, HW, N, Ck, Cv):
    return 2.0 * B * HW * N * (Ck + Cv) * (1.0 if pass_ == "fwd" else 3.5)


def main(argv=None):
    """`python -m tools.gpu_session.tune`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--ns", nargs="+", type=int, default=[64800, 162000])
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--ck", type=int, default=128)
    parser.add_argument("--cv", type=int, default=512)
    parser.add_argument("--quick", action="store_true",
                        help="the defaults and a few more candidates")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="time only the candidates whose label holds one of these texts "
                             "(e.g. 'dkdq block_n=64,block_m=16,num_warps=4,num_stages=2,"
                             "stream_keys=False')")
    parser.add_argument("--baseline", default=None,
                        help="an exported earlier stm_kernels "
                             "(python -m tools.gpu_session.baseline export)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not triton_configs.INTERPRETING:
        sys.exit("needs a GPU (or TRITON_INTERPRET=1 for a slow logic check)")
    dtype = DTYPES[args.dtype]
    runs = only_matching(candidates(dtype, args.quick, device), args.only)
    if args.baseline:
        old = baseline.load(args.baseline)
        label = f"baseline {baseline.revision(args.baseline)}"

        def old_read(q, k, v):
            return old.memory_read(q, k, v, backend="triton")
        # Old vs new right after the new defaults: the comparison a cut-off run keeps.
        runs[2:2] = [("baseline", label, contextlib.nullcontext, "fwd"),
                     ("baseline", label, contextlib.nullcontext, "fwd+bwd")]
    payload = common.environment(device)
    payload.update(benchmark="tune", dtype=args.dtype, HW=args.hw, Ck=args.ck, Cv=args.cv,
                   only=args.only, sanitizer=os.environ.get("STM_SANITIZER"),
                   baseline=args.baseline and baseline.revision(args.baseline), records=[])
    for B, N in itertools.product(args.batches, args.ns):
        inputs = common.read_inputs(B, args.hw, N, args.ck, args.cv, dtype, device)
        reference = _reference(*inputs)
        for kind, label, context, pass_ in runs:
            read = old_read if kind == "baseline" else _triton_read
            record = dict(kind=kind, config=label, pass_=pass_, B=B, N=N)
            record.update(_attempt(_measure, read, label, context, pass_, inputs, device,
                                   reference))
            if "median_ms" in record:
                record["tflops"] = _flops(pass_, B, args.hw, N, args.ck, args.cv) / (
                    record["median_ms"] * 1e-3) / 1e12
            _report(record, dtype, payload)
            common.save_progress("tune", payload)
    common.finish_run("tune", payload, None, summary)
    return 0


def summary(payload):
    """The fastest correct config per pass and shape."""
    lines = []
    for kind in ("forward", "backward"):
        shapes = sorted({(r["B"], r["N"]) for r in payload["records"] if r["kind"] == kind})
        for B, N in shapes:
            good = [r for r in payload["records"] if r["kind"] == kind and r["B"] == B and
                    r["N"] == N and r.get("ok")]
            if good:
                best = min(good, key=lambda r: r["median_ms"])
                lines.append(f"best {kind:8} B={B} N={N}: {best['median_ms']:.3f} ms "
                             f"({best['tflops']:.0f} TFLOP/s) {best['config']}")
    return "\n".join(lines)


def _report(record, dtype, payload):
    record["ok"] = "median_ms" in record and record["error"] < TOLERANCE[dtype]
    payload["records"].append(record)
    head = (f"{record['kind']:8} {record['pass_']:7} B={record['B']} N={record['N']} "
            f"[{record['config']}]")
    if "median_ms" in record:
        print(f"{head} {record['median_ms']:8.3f} ms {record['tflops']:6.1f} TFLOP/s "
              f"err {record['error']:.1e}{'' if record['ok'] else '  WRONG'}", flush=True)
    else:
        print(f"{head} {record['error_type']}: {record['message']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
