"""Kernel benchmark of the space-time memory read: fused Triton vs chunked torch vs the naive
(official) read vs PyTorch SDPA, forward / backward / forward+backward, over memory sizes N.

    python -m bench kernel                     # the three sweeps for the device present
    python -m bench kernel --quick             # a few points (smoke run)
    python -m bench render FILE.json           # re-render a results file's plots and table

Three sweeps, one results file, run in this order (a run cut off by a time limit keeps the
target points):
- "targets": the op's target points, one 480p query frame (HW = 1,620), B=1: N = 64,800 and
  162,000, forward and forward+backward on GPU; N = 162,000 forward on CPU;
- "scaling": Ck=128, Cv=512, the main dtype (bf16 on GPU, fp32 on CPU), B in {1, 4, 8}, every
  pass, N grown until the provider runs out of memory (or past the time cap per call);
- "shapes": N fixed, B=4, Ck in {64, 128} x Cv in {256, 512} x dtypes (fp32 with TF32, fp16,
  bf16 on GPU; fp32 on CPU).
Each record has the median and 20/80% quantiles of the call time, TFLOP/s, the fraction of the
same run's matmul rate for that dtype, and the peak extra memory of one call. FLOPs per call:
forward 2*B*HW*N*(Ck+Cv); backward 2.5x that; forward+backward 3.5x.

Writes bench/results/kernel_<device>_<date>.json and two PNGs beside it: the roofline
(fraction of the matmul rate against N) and the memory plot (peak memory against N, with the
point where each provider ran out of memory).
"""
import math
import sys

import torch
import torch.nn.functional as F

from bench import common
from stm_kernels import memory_read, options

PROVIDERS = ("triton", "torch", "naive", "sdpa")
PASSES = ("fwd", "bwd", "fwd+bwd")
# "fp32-tf32": float32 tensors with torch.set_float32_matmul_precision("high") (TF32 cores)
DTYPES = {**options.DTYPES, "fp32-tf32": torch.float32}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FRAME_POSITIONS = {"cuda": 1620, "cpu": 405}  # a 480p frame (30x54) / a 240x432 frame (15x27)
SCALING_FRAMES = {"cuda": (1, 4, 10, 20, 40, 100, 200, 400, 800, 1600),
                  "cpu": (1, 4, 16, 64, 256)}
SHAPES_FRAMES = {"cuda": 40, "cpu": 16}


def flops(pass_, B, HW, N, Ck, Cv):
    """Floating-point operations of one call of the pass (see the module docstring)."""
    return 2.0 * B * HW * N * (Ck + Cv) * FLOP_FACTOR[pass_]


def make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device):
    """Random inputs in the provider's layout and a zero-argument call of the pass; returns
    (call, tensors whose .grad is cleared between calls). The STM query is shared by the B
    objects; SDPA gets its preferred (B, 1, L, C) contiguous layout, prepared here. The "bwd"
    call backpropagates through a forward done once here (graph retained)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q, k, v = randn(1, Ck, HW), randn(B, Ck, N), randn(B, Cv, N)
    scale = 1.0 / math.sqrt(Ck)
    if provider == "sdpa":
        q = q.transpose(1, 2).unsqueeze(1).expand(B, 1, HW, Ck).contiguous()
        k = k.transpose(1, 2).unsqueeze(1).contiguous()
        v = v.transpose(1, 2).unsqueeze(1).contiguous()

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
    if pass_ == "bwd":
        out = read()

        def call():
            out.backward(grad, retain_graph=True)
        return call, tensors

    def call():
        read().backward(grad)
    return call, tensors


def sdpa_backend(dtype, B, HW, N, Ck, Cv, device):
    """Name of the kernel SDPA dispatches to for these shapes (torch._fused_sdp_choice)."""
    try:
        q = torch.empty((B, 1, HW, Ck), device=device, dtype=dtype)
        k = torch.empty((B, 1, N, Ck), device=device, dtype=dtype)
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
    with _precision(dtype_name):
        median, _, _ = common.time_ms(lambda: a @ b, device)
    return 2.0 * size ** 3 / (median * 1e-3) / 1e12


def measure_memory(spec, device):
    """Peak extra memory of one call; on CPU in a fresh process (resident-set high-water mark)."""
    if device.type == "cuda":
        call, _ = make_inputs(**{**spec, "dtype": DTYPES[spec["dtype"]]}, device=device)
        call()
        return common.cuda_peak_extra_bytes(call, device)
    return common.run_isolated("bench.kernel", spec)


def _cpu_memory_child(spec):
    call, _ = make_inputs(**{**spec, "dtype": DTYPES[spec["dtype"]]}, device=torch.device("cpu"))
    return common.cpu_peak_extra_bytes(call)


def naive_bytes_estimate(pass_, B, HW, N, dtype):
    """The official read holds the affinity and the probabilities (twice more for backward)."""
    element = torch.finfo(dtype).bits // 8
    return (2 if pass_ == "fwd" else 4) * B * HW * N * element


def _precision(dtype_name):
    return common.torch_setting(torch.get_float32_matmul_precision,
                                torch.set_float32_matmul_precision,
                                "high" if dtype_name == "fp32-tf32" else "highest")


def run_point(provider, pass_, dtype_name, B, HW, N, Ck, Cv, device, sweep):
    """The record of one (provider, pass, dtype, shape) point: timing and peak memory, or
    the reason it did not run (out of memory, measured or estimated)."""
    dtype = DTYPES[dtype_name]
    record = dict(sweep=sweep, provider=provider, **{"pass": pass_}, dtype=dtype_name, B=B,
                  HW=HW, N=N, Ck=Ck, Cv=Cv)
    spec = dict(provider=provider, pass_=pass_, dtype=dtype_name, B=B, HW=HW, N=N, Ck=Ck, Cv=Cv)
    if provider == "sdpa":
        record["sdpa_backend"] = sdpa_backend(dtype, B, HW, N, Ck, Cv, device)
    if device.type == "cpu" and provider in ("naive", "sdpa") and \
            naive_bytes_estimate(pass_, B, HW, N, dtype) > 0.6 * common.available_memory_bytes():
        return {**record, "status": "oom (estimated: the affinity would not fit in free memory; "
                                    "not run)"}
    try:
        with _precision(dtype_name):
            call, reset = make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device)
            median, low, high = common.time_ms(call, device, reset=reset)
            del call, reset
            peak = measure_memory(spec, device)
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "oom"}
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        return {**record, "status": "oom"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**record, "status": "ok", "median_ms": median, "q20_ms": low, "q80_ms": high,
            "tflops": flops(pass_, B, HW, N, Ck, Cv) / (median * 1e-3) / 1e12,
            "peak_mem_bytes": peak}


def plan(device, args):
    """The (sweep, provider, pass, dtype, B, HW, Ck, Cv, [N...]) series to run, in order."""
    kind = device.type
    hw = args.hw or FRAME_POSITIONS[kind]
    providers = args.providers or (
        list(PROVIDERS) if kind == "cuda" else ["torch", "naive", "sdpa"])
    passes = args.passes or list(PASSES)
    main_dtype = "bf16" if kind == "cuda" else "fp32"
    shape_dtypes = args.dtypes or (["fp32-tf32", "fp16", "bf16"] if kind == "cuda" else ["fp32"])
    batches = args.batches or ([1, 4, 8] if kind == "cuda" else [1])
    frames = SCALING_FRAMES[kind] if not args.quick else SCALING_FRAMES[kind][:2]
    ns = args.ns or [hw * t for t in frames]
    series = []
    # The target points first: a run cut off by a time limit (a lent GPU's) keeps them.
    if "targets" in args.sweeps:  # one 480p query frame (HW = 1,620)
        target_passes = ["fwd", "fwd+bwd"] if kind == "cuda" else ["fwd"]
        target_ns = [64800, 162000] if kind == "cuda" else [162000]
        for pass_ in target_passes:
            for provider in providers:
                series.append(("targets", provider, pass_, main_dtype, 1, 1620, 128, 512,
                               target_ns))
    if "scaling" in args.sweeps:
        for pass_ in passes:
            for B in batches if not args.quick else batches[:1]:
                for provider in providers:
                    series.append(("scaling", provider, pass_, main_dtype, B, hw, 128, 512,
                                   ns))
    if "shapes" in args.sweeps:
        n = args.shapes_n or hw * SHAPES_FRAMES[kind]
        shapes = [(64, 256), (64, 512), (128, 256), (128, 512)]
        for dtype_name in shape_dtypes if not args.quick else shape_dtypes[:1]:
            for pass_ in passes:
                for ck, cv in shapes if not args.quick else shapes[-1:]:
                    for provider in providers:
                        series.append(("shapes", provider, pass_, dtype_name, 4, hw, ck, cv,
                                       [n]))
    return hw, series


def run(args):
    """Run the planned sweeps and write the results; returns their path."""
    device = common.pick_device(args.device)
    hw, series = plan(device, args)
    if device.type == "cpu" and any(s[1] == "triton" for s in series):
        print("note: triton on CPU runs in the interpreter; its times mean nothing",
              file=sys.stderr)
    payload = common.environment(device)
    max_call_s = args.max_call_s or (20.0 if device.type == "cuda" else 1.5)
    payload.update(benchmark="kernel", HW=hw, max_call_s=max_call_s,
                   flops_note="fwd: 2*B*HW*N*(Ck+Cv); bwd: 2.5x fwd; fwd+bwd: 3.5x fwd",
                   peak_mem_note=("extra bytes above the inputs during one call: CUDA allocator "
                                  "peak on GPU; on CPU the resident-set high-water mark of a "
                                  "process after one warm-up call, glibc mapping blocks >= 64 KiB "
                                  "afresh"), matmul_tflops={}, records=[])
    if device.type == "cuda":
        matmul_names = ["bf16", "fp16", "fp32-tf32", "fp32"]
    else:
        matmul_names = ["fp32"]
    for name in matmul_names:
        payload["matmul_tflops"][name] = matmul_tflops(name, device)
        print(f"matmul {name}: {payload['matmul_tflops'][name]:.2f} TFLOP/s", flush=True)
    if device.type == "cuda":  # the L2 bandwidth the kernels' L2 traffic meets (bench.l2_probe)
        from bench import l2_probe
        payload["l2_read"] = l2_probe.measure(device)
        print(f"L2 read probe: {payload['l2_read']['tbps']:.2f} TB/s", flush=True)
    with common.progress(total=sum(len(s[-1]) for s in series), unit="point") as bar:
        for sweep, provider, pass_, dtype_name, B, hw_, ck, cv, ns in series:
            for index, N in enumerate(ns):
                record = run_point(provider, pass_, dtype_name, B, hw_, N, ck, cv, device, sweep)
                payload["records"].append(record)
                common.save_progress("kernel", payload)
                bar.write(format_record(record))
                bar.update(1)
                if record["status"] != "ok":
                    bar.update(len(ns) - index - 1)
                    break  # a larger N will not fit either
                if record["median_ms"] > max_call_s * 1e3 and index + 1 < len(ns):
                    payload["records"].append(dict(
                        {k: record[k] for k in ("sweep", "provider", "pass", "dtype", "B", "HW",
                                                "Ck", "Cv")}, N=ns[index + 1],
                        status=f"not run (a call at the previous N took over {max_call_s:g} s)"))
                    bar.update(len(ns) - index - 1)
                    break
    return common.finish_run("kernel", payload, plot, summary)


def format_record(record):
    """One record as a line of progress output."""
    head = (f"{record.get('sweep', ''):>7} {record['provider']:>6} {record['pass']:>7} "
            f"{record['dtype']} B={record['B']} Ck={record['Ck']} Cv={record['Cv']} "
            f"N={record['N']:>7}")
    if record["status"] != "ok":
        return f"{head}  {record['status']}"
    extra = f"  [{record['sdpa_backend']}]" if "sdpa_backend" in record else ""
    return (f"{head}  {record['median_ms']:9.3f} ms  {record['tflops']:7.2f} TFLOP/s  "
            f"{record['peak_mem_bytes'] / 2**20:9.1f} MiB{extra}")


def _fused(payload):
    return "triton" if payload["device_type"] == "cuda" else "torch"


def _fraction(payload, record):
    rates = payload["matmul_tflops"]
    rate = rates.get(record["dtype"]) or rates.get("fp32")
    return record["tflops"] / rate if rate else float("nan")


def summary(payload):
    """Markdown: the fused provider's time, TFLOP/s, % of matmul and memory with speed-ups
    against naive and SDPA; then the N at which each provider ran out of memory."""
    records = payload["records"]
    ok = [r for r in records if r["status"] == "ok"]
    key = ("sweep", "pass", "dtype", "B", "HW", "N", "Ck", "Cv")
    index = {(r["provider"],) + tuple(r.get(k, "scaling") for k in key): r for r in ok}
    fused = _fused(payload)
    rows = ["| sweep | pass | dtype | B | HW | Ck | Cv | N | ms | TFLOP/s | % matmul | peak MiB | "
            "vs torch | vs naive | vs sdpa | naive peak / peak |", "|---" * 16 + "|"]
    for r in ok:
        if r["provider"] != fused:
            continue
        cells = [r.get("sweep", "scaling"), r["pass"], r["dtype"], r["B"], r["HW"], r["Ck"],
                 r["Cv"],
                 r["N"], f"{r['median_ms']:.3f}", f"{r['tflops']:.2f}",
                 f"{100 * _fraction(payload, r):.0f}%", f"{r['peak_mem_bytes'] / 2**20:.1f}"]
        for other in ("torch", "naive", "sdpa"):
            base = None if other == fused else \
                index.get((other,) + tuple(r.get(k, "scaling") for k in key))
            cells.append(f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "n/a")
        naive = index.get(("naive",) + tuple(r.get(k, "scaling") for k in key))
        cells.append(f"{naive['peak_mem_bytes'] / max(r['peak_mem_bytes'], 1):.1f}x"
                     if naive and fused != "naive" else "n/a")
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    if "l2_read" in payload:
        probe = payload["l2_read"]
        rows += ["", f"L2 read probe (bench.l2_probe, a lower bound): {probe['tbps']:.2f} TB/s "
                     f"({probe['programs']} programs re-reading {probe['buffer_mib']} MiB)."]
    limits = out_of_memory_points(payload)
    if limits:
        rows += ["", "Largest N that ran and what stopped the sweep (scaling sweep):", "",
                 "| provider | pass | dtype | B | largest N run | stopped at N | why |",
                 "|---|---|---|---|---|---|---|"]
        for (provider, pass_, dtype, B), (largest, stop, why) in limits.items():
            rows.append(f"| {provider} | {pass_} | {dtype} | {B} | {largest or 'none'} | "
                        f"{stop or '-'} | {why} |")
    return "\n".join(rows)


def out_of_memory_points(payload):
    """{(provider, pass, dtype, B): (largest N that ran, N where the sweep stopped, why)}."""
    limits = {}
    for r in payload["records"]:
        if r.get("sweep", "scaling") != "scaling":
            continue
        key = (r["provider"], r["pass"], r["dtype"], r["B"])
        largest, stop, why = limits.get(key, (None, None, "reached the end of the sweep"))
        if r["status"] == "ok":
            largest = max(largest or 0, r["N"])
        elif stop is None:
            stop, why = r["N"], r["status"]
        limits[key] = (largest, stop, why)
    return limits


def plot(payload, path):
    """Roofline (fraction of the matmul rate vs N) and memory (peak vs N) PNGs; returns paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no plot", file=sys.stderr)
        return []
    records = [r for r in payload["records"] if r.get("sweep", "scaling") == "scaling"]
    if not records:  # the plots are of the scaling sweep; the others are tables only
        print("no scaling sweep in this run: no plot (the table has the results)",
              file=sys.stderr)
        return []
    batches = sorted({r["B"] for r in records}) or [1]
    passes = [p for p in PASSES if any(r["pass"] == p for r in records)]
    title = (f"memory_read on {payload['device']} (torch {payload['torch']}, triton "
             f"{payload['triton']}, {payload['date'][:10]}), HW={payload['HW']}, Ck=128, Cv=512")
    colours = dict(zip(PROVIDERS, ("C0", "C1", "C3", "C2"), strict=True))
    written = []
    for name, value, ylabel, log_y in (
            ("roofline", lambda r: 100 * _fraction(payload, r), "% of the same-run matmul rate",
             False),
            ("memory", lambda r: r["peak_mem_bytes"] / 2**20, "peak extra memory (MiB)", True)):
        figure, axes = common.subplots(len(passes), len(batches), squeeze=False,
                                       figsize=(max(4.5 * len(batches), 9), 3.4 * len(passes)))
        for row, pass_ in enumerate(passes):
            for column, B in enumerate(batches):
                axis = axes[row][column]
                positive = False
                for provider in PROVIDERS:
                    series = sorted((r for r in records if r["provider"] == provider and
                                     r["pass"] == pass_ and r["B"] == B), key=lambda r: r["N"])
                    ok = [r for r in series if r["status"] == "ok"]
                    if not series:
                        continue
                    if ok:
                        values = [value(r) for r in ok]
                        positive = positive or max(values) > 0
                        axis.plot([r["N"] for r in ok], values, marker="o",
                                  color=colours[provider], label=f"{provider} {ok[0]['dtype']}")
                    stopped = [r for r in series if r["status"].startswith("oom")]
                    if stopped and ok:
                        axis.plot([stopped[0]["N"]], [value(ok[-1])], marker="x",
                                  markersize=10, color=colours[provider], linestyle="none")
                axis.set(xscale="log", title=f"{pass_}, B={B}", xlabel="memory positions N")
                if log_y and positive:  # a log axis needs a positive value to show
                    axis.set_yscale("log")
                else:
                    axis.set_ylim(bottom=0)
                if column == 0:
                    axis.set_ylabel(ylabel)
                axis.legend(fontsize=7)
        caption = ("x: the N at which the provider ran out of memory" if name == "memory"
                   else "TFLOP/s as a fraction of a large square matmul in the same run")
        figure.suptitle(f"{title}\n{caption}", fontsize=9)
        written += common.save_figure(figure, path, name=name)
    return written


def main(argv=None):
    """`python -m bench kernel`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench kernel")
    parser.add_argument("--sweeps", nargs="+", default=["scaling", "shapes", "targets"],
                        choices=["scaling", "shapes", "targets"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS)
    parser.add_argument("--passes", nargs="+", choices=PASSES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="dtypes of the shapes sweep")
    parser.add_argument("--batches", nargs="+", type=int, help="B of the scaling sweep")
    parser.add_argument("--ns", nargs="+", type=int, help="memory sizes N of the scaling sweep")
    parser.add_argument("--shapes-n", type=int, help="memory size N of the shapes sweep")
    parser.add_argument("--hw", type=int, help="query positions (default: one frame)")
    parser.add_argument("--max-call-s", type=float,
                        help="stop growing N for a provider once one call takes longer "
                             "(default: 20 s on GPU, 1.5 s on CPU)")
    parser.add_argument("--quick", action="store_true", help="a few points only")
    args = common.parse_args_or_run_child(parser, argv, _cpu_memory_child)
    if args is not None:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
