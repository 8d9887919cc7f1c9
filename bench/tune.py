"""Time the Triton kernels under each candidate tiling and report the fastest (GPU).

    python -m bench.tune                     # bf16, STM shapes, forward and backward sweeps
    python -m bench.tune --dtype fp16 --ns 64800 162000

Each tiling is first checked against the torch backend on the same inputs (normalised error
bound per dtype); a tiling that fails to compile, runs out of shared memory or computes a wrong
result is recorded as such. Writes bench/results/tune_<device>_<date>.json; copy the winners
into the candidate tables of stm_kernels/memory_read_triton.py.
"""
import argparse
import itertools
import math
import sys

import torch

from bench import common
from bench.kernel_resources import DKV_SWEEP, DQ_SWEEP, FORWARD_SWEEP
from stm_kernels import memory_read
from stm_kernels import memory_read_triton as kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}


def _inputs(B, HW, N, Ck, Cv, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, Ck, HW, generator=generator, device=device, dtype=dtype)
    k = torch.randn(B, Ck, N, generator=generator, device=device, dtype=dtype)
    v = torch.randn(B, Cv, N, generator=generator, device=device, dtype=dtype)
    grad = torch.randn(B, Cv, HW, generator=generator, device=device, dtype=dtype)
    return q, k, v, grad


def _error(actual, expected):
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def _reference(q, k, v, grad):
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out = memory_read(q, k, v, backend="torch")
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def time_forward(config, q, k, v, device, reference):
    with kernels.use_configs(forward=config):
        out = memory_read(q, k, v, backend="triton")
        error = _error(out, reference[0])
        median, low, high = common.time_ms(lambda: memory_read(q, k, v, backend="triton"), device)
    return dict(error=error, median_ms=median, q20_ms=low, q80_ms=high)


def time_backward(config, q, k, v, grad, device, reference):
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    with kernels.use_configs(backward=config):
        out = memory_read(q, k, v, backend="triton")
        out.backward(grad)
        error = max(_error(g, r) for g, r in zip((q.grad, k.grad, v.grad), reference[1:]))

        def step():
            memory_read(q, k, v, backend="triton").backward(grad)
        median, low, high = common.time_ms(step, device, reset=(q, k, v))
    return dict(error=error, median_ms=median, q20_ms=low, q80_ms=high)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--ns", nargs="+", type=int, default=[64800, 162000])
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--ck", type=int, default=128)
    parser.add_argument("--cv", type=int, default=512)
    parser.add_argument("--splits", nargs="+", type=int, default=[None],
                        help="forced memory splits to try (default: the heuristic)")
    parser.add_argument("--quick", action="store_true", help="two tilings of each kind only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not kernels.INTERPRETING:
        sys.exit("needs a GPU (or TRITON_INTERPRET=1 for a slow logic check)")
    dtype = DTYPES[args.dtype]
    forward_sweep = FORWARD_SWEEP[:2] if args.quick else FORWARD_SWEEP
    # dK/dV and dQ are separate kernels: vary one while the other keeps its default tiling.
    default = kernels._GPU_BACKWARD[min(dtype.itemsize, 4)][0]
    default_dkv = (default.dkv_block_m, default.dkv_block_n, default.dkv_block_v,
                   default.dkv_warps, default.dkv_stages)
    default_dq = (default.dq_block_m, default.dq_block_n, default.dq_warps, default.dq_stages)
    dkv_sweep = DKV_SWEEP[:2] if args.quick else DKV_SWEEP
    dq_sweep = DQ_SWEEP[:2] if args.quick else DQ_SWEEP
    backward_sweep = ([(dkv, default_dq) for dkv in dkv_sweep] +
                      [(default_dkv, dq) for dq in dq_sweep if dq != default_dq])
    payload = common.environment(device)
    payload.update(benchmark="tune", dtype=args.dtype, HW=args.hw, Ck=args.ck, Cv=args.cv,
                   records=[])
    for B, N in itertools.product(args.batches, args.ns):
        q, k, v, grad = _inputs(B, args.hw, N, args.ck, args.cv, dtype, device)
        reference = _reference(q, k, v, grad)
        shape = dict(B=B, N=N)
        for (block_m, block_n, block_v, warps, stages), splits in itertools.product(
                forward_sweep, args.splits):
            config = kernels.ForwardConfig(block_m, block_n, block_v, warps, stages, splits)
            record = dict(kind="forward", config=vars_of(config), **shape)
            record.update(_attempt(time_forward, config, q, k, v, device, reference))
            _report(record, dtype, payload)
        for dkv, dq in backward_sweep:
            config = kernels.BackwardConfig(*dkv, *dq)
            record = dict(kind="backward", config=vars_of(config), **shape)
            record.update(_attempt(time_backward, config, q, k, v, grad, device, reference))
            _report(record, dtype, payload)
    path = common.write_results("tune", payload)
    print(f"\nwrote {path}")
    for kind in ("forward", "backward"):
        for B, N in itertools.product(args.batches, args.ns):
            good = [r for r in payload["records"] if r["kind"] == kind and r["B"] == B and
                    r["N"] == N and r.get("ok")]
            if good:
                best = min(good, key=lambda r: r["median_ms"])
                print(f"best {kind:8} B={B} N={N}: {best['median_ms']:.3f} ms {best['config']}")


def vars_of(config):
    return {field: getattr(config, field) for field in config.__dataclass_fields__}


def _attempt(fn, config, *arguments):
    try:
        return fn(config, *arguments)
    except Exception as error:  # out of resources, compile errors: a result, not a crash
        message = str(error).strip().splitlines()
        return dict(error_type=type(error).__name__, message=message[0][:200] if message else "")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _report(record, dtype, payload):
    record["ok"] = "median_ms" in record and record["error"] < TOLERANCE[dtype]
    payload["records"].append(record)
    config = ",".join(str(value) for value in record["config"].values())
    if "median_ms" in record:
        print(f"{record['kind']:8} B={record['B']} N={record['N']} [{config}] "
              f"{record['median_ms']:8.3f} ms  err {record['error']:.1e}"
              f"{'' if record['ok'] else '  WRONG'}", flush=True)
    else:
        print(f"{record['kind']:8} B={record['B']} N={record['N']} [{config}] "
              f"{record['error_type']}: {record['message']}", flush=True)


if __name__ == "__main__":
    main()
