"""Kernel benchmark of the space-time memory read: fused Triton vs chunked torch vs the naive
(official) read vs PyTorch SDPA, forward and forward+backward, over memory sizes N.

    python -m bench.memory_read                 # default sweep for the device present
    python -m bench.memory_read --quick         # a few points (smoke run)
    python -m bench.memory_read --plot FILE.json  # re-render the plot of a results file

Writes bench/results/memory_read_<device>_<date>.json (device, versions, commit, matmul rate per
dtype, one record per provider/pass/dtype/B/N) and a PNG beside it. FLOPs per call: forward
2*B*HW*N*(Ck+Cv); forward+backward 3.5x that (the backward counted as 2.5x the forward).
"""
import argparse
import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

from bench import common
from stm_kernels import memory_read

PROVIDERS = ("triton", "torch", "naive", "sdpa")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FRAMES_GPU = (1, 4, 10, 20, 40, 100, 200, 321)  # memory frames of 30x54 = 1,620 positions
BACKWARD_FLOP_FACTOR = 2.5


def flops(pass_, B, HW, N, Ck, Cv):
    forward = 2.0 * B * HW * N * (Ck + Cv)
    return forward * (1 + BACKWARD_FLOP_FACTOR) if pass_ == "fwd+bwd" else forward


def make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device):
    """Random inputs in the provider's layout and a zero-argument call; the STM query is shared
    by the B objects. SDPA gets its preferred (B, 1, L, C) contiguous layout, prepared here."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q, k, v = randn(1, Ck, HW), randn(B, Ck, N), randn(B, Cv, N)
    scale = 1.0 / math.sqrt(Ck)
    if provider == "sdpa":
        q = q.transpose(1, 2).unsqueeze(1).expand(B, 1, HW, Ck).contiguous()
        k, v = k.transpose(1, 2).unsqueeze(1).contiguous(), v.transpose(1, 2).unsqueeze(1).contiguous()

        def read():
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        def read():
            return memory_read(q, k, v, scale=scale, backend=provider)
    tensors = (q, k, v)
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return read()
        return call, ()
    for tensor in tensors:
        tensor.requires_grad_()
    grad = randn(B, Cv, HW) if provider != "sdpa" else randn(B, 1, HW, Cv)

    def call():
        read().backward(grad)
    return call, tensors


def sdpa_backend(dtype, B, HW, N, Ck, Cv, device):
    """Name of the kernel SDPA dispatches to for these shapes (torch._fused_sdp_choice)."""
    try:
        shape_q, shape_kv = (B, 1, HW, Ck), (B, 1, N, Ck)
        q = torch.empty(shape_q, device=device, dtype=dtype)
        k = torch.empty(shape_kv, device=device, dtype=dtype)
        v = torch.empty((B, 1, N, Cv), device=device, dtype=dtype)
        return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except Exception as error:  # private API: record rather than fail the benchmark
        return f"unknown ({type(error).__name__})"


def matmul_tflops(dtype_name, device):
    """Rate of a large square matmul on random data (the device's practical ceiling)."""
    size = 8192 if device.type == "cuda" else 2048
    dtype = DTYPES[dtype_name.split("-")[0]]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    median, _, _ = common.time_ms(lambda: a @ b, device)
    return 2.0 * size ** 3 / (median * 1e-3) / 1e12


def measure_memory(spec, device):
    """Peak extra memory of one call; on CPU in a fresh process (resident-set high-water mark)."""
    if device.type == "cuda":
        call, _ = make_inputs(**spec, device=device)
        call()
        return common.cuda_peak_extra_bytes(call, device)
    return common.run_isolated("bench.memory_read", ["--_measure-cpu-memory", json.dumps(spec)])


def _cpu_memory_child(spec_json):
    spec = json.loads(spec_json)
    spec["dtype"] = DTYPES[spec["dtype"]]
    call, _ = make_inputs(**spec, device=torch.device("cpu"))
    print(json.dumps(common.cpu_peak_extra_bytes(call)))


def _available_cpu_bytes():
    text = pathlib.Path("/proc/meminfo").read_text()
    return int(text.split("MemAvailable:")[1].split()[0]) * 1024


def naive_bytes_estimate(pass_, B, HW, N, dtype):
    """The official read holds the affinity and the probabilities (twice more for backward)."""
    element = torch.finfo(dtype).bits // 8
    return (2 if pass_ == "fwd" else 4) * B * HW * N * element


def run_point(provider, pass_, dtype_name, B, HW, N, Ck, Cv, device):
    dtype = DTYPES[dtype_name]
    record = dict(provider=provider, **{"pass": pass_}, dtype=dtype_name, B=B, HW=HW, N=N,
                  Ck=Ck, Cv=Cv)
    spec = dict(provider=provider, pass_=pass_, dtype=dtype_name, B=B, HW=HW, N=N, Ck=Ck, Cv=Cv)
    if provider == "sdpa":
        record["sdpa_backend"] = sdpa_backend(dtype, B, HW, N, Ck, Cv, device)
    if device.type == "cpu" and provider in ("naive", "sdpa") and \
            naive_bytes_estimate(pass_, B, HW, N, dtype) > 0.6 * _available_cpu_bytes():
        return {**record, "status": "oom (skipped: the affinity would not fit in free memory)"}
    try:
        call, reset = make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device)
        median, low, high = common.time_ms(call, device, reset=reset)
        del call, reset
        peak = measure_memory({**spec, "dtype": dtype_name if device.type == "cpu" else dtype},
                              device)
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "oom"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**record, "status": "ok", "median_ms": median, "q20_ms": low, "q80_ms": high,
            "tflops": flops(pass_, B, HW, N, Ck, Cv) / (median * 1e-3) / 1e12,
            "peak_mem_bytes": peak}


def default_sweep(device, quick):
    """(providers, dtypes, batches, Ns(pass, B)) for the device; the CPU sweep is smaller."""
    if device.type == "cuda":
        Ns = [1620 * t for t in (FRAMES_GPU if not quick else (1, 40))]
        return list(PROVIDERS), ["bf16"], [1, 4], lambda pass_, B: Ns
    providers = ["torch", "naive", "sdpa"]
    if quick:
        return providers, ["fp32"], [1], lambda pass_, B: [1620, 16200] if pass_ == "fwd" else [1620]
    # N = 162,000 (100 memory frames), B = 1, forward is the CPU target point.
    return providers, ["fp32"], [1, 4], lambda pass_, B: (
        [1620, 16200, 162000] if (pass_, B) == ("fwd", 1) else [1620, 16200])


def run(args):
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    providers, dtypes, batches, memory_sizes = default_sweep(device, args.quick)
    providers = args.providers or providers
    dtypes = args.dtypes or dtypes
    batches = args.batches or batches
    if args.ns:
        memory_sizes = lambda pass_, B: args.ns  # noqa: E731
    passes = args.passes or list(PASSES)
    if device.type == "cpu" and "triton" in providers:
        print("note: triton on CPU runs in the interpreter; its times mean nothing", file=sys.stderr)

    payload = common.environment(device)
    payload.update(benchmark="memory_read", HW=args.hw, Ck=args.ck, Cv=args.cv,
                   flops_note="fwd: 2*B*HW*N*(Ck+Cv); fwd+bwd: 3.5x fwd",
                   peak_mem_note=("extra bytes above the inputs during one call: CUDA allocator "
                                  "peak on GPU; on CPU the resident-set high-water mark of a "
                                  "process after one warm-up call, glibc mapping blocks >= 64 KiB afresh"),
                   matmul_tflops={}, records=[])
    matmul_dtypes = ["bf16", "fp32-tf32", "fp32"] if device.type == "cuda" else ["fp32"]
    for name in matmul_dtypes:
        precision = "high" if name == "fp32-tf32" else "highest"
        with _matmul_precision(precision):
            payload["matmul_tflops"][name] = matmul_tflops(name, device)
        print(f"matmul {name}: {payload['matmul_tflops'][name]:.2f} TFLOP/s", flush=True)

    for dtype_name in dtypes:
        for pass_ in passes:
            for B in batches:
                for provider in providers:
                    for N in memory_sizes(pass_, B):
                        record = run_point(provider, pass_, dtype_name, B, args.hw, N, args.ck,
                                           args.cv, device)
                        payload["records"].append(record)
                        print(format_record(record), flush=True)
                        if record["status"] != "ok":
                            break  # larger N will not fit either
    path = common.write_results("memory_read", payload)
    plot(payload, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    print(summary(payload))
    return path


class _matmul_precision:
    def __init__(self, precision):
        self.precision = precision

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous)


def format_record(record):
    head = (f"{record['provider']:>6} {record['pass']:>7} {record['dtype']} B={record['B']} "
            f"N={record['N']:>7}")
    if record["status"] != "ok":
        return f"{head}  {record['status']}"
    extra = f"  [{record['sdpa_backend']}]" if "sdpa_backend" in record else ""
    return (f"{head}  {record['median_ms']:9.3f} ms  {record['tflops']:7.2f} TFLOP/s  "
            f"{record['peak_mem_bytes'] / 2**20:9.1f} MiB{extra}")


def summary(payload):
    """Markdown table: each provider's time and memory, with speed-ups against naive and SDPA."""
    ok = [r for r in payload["records"] if r["status"] == "ok"]
    index = {(r["provider"], r["pass"], r["dtype"], r["B"], r["N"]): r for r in ok}
    fastest = "triton" if payload["device_type"] == "cuda" else "torch"
    rows = ["| pass | dtype | B | N | provider | ms | TFLOP/s | % matmul | peak MiB | "
            "vs naive | vs sdpa |", "|---" * 11 + "|"]
    for r in ok:
        if r["provider"] != fastest:
            continue
        matmul = payload["matmul_tflops"].get(r["dtype"]) or payload["matmul_tflops"].get("fp32")
        cells = [r["pass"], r["dtype"], r["B"], r["N"], r["provider"], f"{r['median_ms']:.3f}",
                 f"{r['tflops']:.2f}", f"{100 * r['tflops'] / matmul:.0f}%",
                 f"{r['peak_mem_bytes'] / 2**20:.1f}"]
        for other in ("naive", "sdpa"):
            base = index.get((other, r["pass"], r["dtype"], r["B"], r["N"]))
            cells.append(f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "n/a")
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def plot(payload, path):
    """TFLOP/s and peak memory against N, one column per B, one line per provider and pass."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no plot", file=sys.stderr)
        return None
    records = [r for r in payload["records"] if r["status"] == "ok"]
    batches = sorted({r["B"] for r in records}) or [1]
    figure, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    styles = {"fwd": "-", "fwd+bwd": "--"}
    for column, B in enumerate(batches):
        top, bottom = axes[0][column], axes[1][column]
        for key in sorted({(r["provider"], r["pass"], r["dtype"]) for r in records}):
            series = sorted((r for r in records if (r["provider"], r["pass"], r["dtype"]) == key
                             and r["B"] == B), key=lambda r: r["N"])
            if not series:
                continue
            label = " ".join(key)
            Ns = [r["N"] for r in series]
            top.plot(Ns, [r["tflops"] for r in series], styles[key[1]], marker="o", label=label)
            bottom.plot(Ns, [r["peak_mem_bytes"] / 2**20 for r in series], styles[key[1]],
                        marker="o", label=label)
        for name, rate in payload["matmul_tflops"].items():
            top.axhline(rate, color="grey", linestyle=":", linewidth=1)
            top.annotate(f"matmul {name}", (0.01, rate), xycoords=("axes fraction", "data"),
                         fontsize=7, color="grey", va="bottom")
        top.set(xscale="log", title=f"B={B}, HW={payload['HW']}, Ck={payload['Ck']}, "
                f"Cv={payload['Cv']}", ylabel="TFLOP/s")
        bottom.set(xscale="log", yscale="log", xlabel="memory positions N",
                   ylabel="peak extra memory (MiB)")
        top.legend(fontsize=7)
    figure.suptitle(f"memory_read on {payload['device']} (torch {payload['torch']}, "
                    f"triton {payload['triton']}, {payload['date'][:10]})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS)
    parser.add_argument("--passes", nargs="+", choices=PASSES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--ns", nargs="+", type=int, help="memory sizes N (all passes)")
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--ck", type=int, default=128)
    parser.add_argument("--cv", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a few points only")
    parser.add_argument("--plot", metavar="RESULTS_JSON", help="only re-render a results file's plot")
    parser.add_argument("--_measure-cpu-memory", dest="measure_cpu_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_cpu_memory:
        return _cpu_memory_child(args.measure_cpu_memory)
    if args.plot:
        path = pathlib.Path(args.plot)
        payload = json.loads(path.read_text())
        print(plot(payload, path.with_suffix(".png")))
        print(summary(payload))
        return None
    return run(args)


if __name__ == "__main__":
    main()
