"""The CPU read against the best CPU peers, in one interleaved run, quiet or with a competitor.

    python -m bench cpu-read                          # N = 16,200 to 162,000, quiet machine
    python -m bench cpu-read --busy                   # the same with a process spinning on one core
    python -m bench cpu-read --ns 16200 --rounds 3    # quick
    python -m bench cpu-read --dtype bf16             # bf16 inputs: the bf16 products' read
    python -m bench cpu-read --key-scale 20           # scores spanning hundreds, as a trained
                                                      # model's do (random keys: a few units)

One object, one 480p query frame (HW = 1,620 at stride 16), Ck = 128, Cv = 512, a forward read
on float32 inputs, or with --dtype bf16 on bf16 ones. Providers, timed round-robin (one call
each per round, so that load from other processes hits every one alike):
    stm        memory_read(backend="torch"): the library's CPU read (row blocks on worker threads)
    sdpa       torch.nn.functional.scaled_dot_product_attention with the full 512-wide value
    sdpa_split SDPA with the value split into chunks as wide as the key (Cv = 512, Ck = 128:
               four calls on the same q and k, outputs concatenated; QK^T recomputed per chunk,
               as FlashAttention-style kernels that take a value only as wide as the key need)
    official   the official read (materialises the N x HW affinity)
    flex       FlexAttention compiled (torch.compile of flex_attention; skipped with its error
               where it does not compile here)
    products   the read's two matrix products alone (scores, then scores x values, over memory
               chunks of the CPU read's length, no softmax): the least time any read built on
               torch's BLAS needs, so best peer / products is the most speed-up one could show
    sgemm      a 2048^3 float32 matrix product: the machine's float32 rate in the same rounds
With --dtype bf16 every provider above takes bf16 inputs (sgemm stays float32), and three more
are timed: stm_fp32 and sdpa_fp32, the read and SDPA on the same inputs in float32 (the read's
own float32 speed, and SDPA where it is fastest), and bgemm, a 2048^3 bf16 product (the
machine's bf16 rate). The best peer is then the fastest bf16 one (sdpa_fp32 has a column of its
own). On a CPU without bf16 dot products (stm_kernels.backends.cpu_features)
the bf16 figures are oneDNN's emulation: the run says so and makes no speed claim.
Before any timing each provider that reads (READS) is checked against the read in float64 at
a sample of query positions (bench/accuracy.py, the self-test's bound of its inputs' dtype):
one over it is recorded "wrong" with its error and is not timed.
Records per N: median, 20% and 80% ms per provider, GFLOP/s (2 HW N (Ck + Cv) for the reads and
the products), the stm read's speed over the best peer, the products' (the ceiling), the read's
time over the products' (how far it is from the ceiling), and the read's rate as a share of
the sgemm rate (bgemm with --dtype bf16); with bf16 also its speed
over its float32 read and its relative error against it; the torch thread count, the
processor (model, flags), and whether a competing process ran. Writes
bench/results/cpu_read_cpu_<date>.json and a PNG beside it.
"""
import argparse
import contextlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import accuracy, common
from stm_kernels import memory_read
from stm_kernels.backends import cpu_features
from stm_kernels.backends.pytorch import CPU_CHUNK

PEERS = ("sdpa", "sdpa_split", "official", "flex", "sdpa_fp32")
PROVIDERS = ("stm",) + PEERS[:4] + ("products", "sgemm")
BF16_PROVIDERS = ("stm", "stm_fp32") + PEERS + ("products", "sgemm", "bgemm")
# peers on other inputs than the read's (bf16 runs): a column of their own, not a best peer
OWN_COLUMN_PEERS = ("sdpa_fp32",)
SGEMM_SIZE = 2048


def read_flops(N, hw, ck, cv):
    """Multiply-adds of one read, counted twice: the scores and the weighted values."""
    return 2.0 * hw * N * (ck + cv)


def make_calls(N, args):
    """{provider: zero-argument call}, and {provider: why it cannot run} for the rest."""
    generator = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(1, channels, length, generator=generator)
                     for channels, length in ((args.ck, args.hw), (args.ck, N), (args.cv, N)))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    k32 = k32 * args.key_scale
    q, k, v = (t.to(dtype) for t in (q32, k32, v32))

    def rows(*tensors):  # SDPA and FlexAttention take (B, heads, L, C), contiguous
        return [t.transpose(1, 2).unsqueeze(1).contiguous() for t in tensors]
    q4, k4, v4 = rows(q, k, v)
    a = torch.randn(SGEMM_SIZE, SGEMM_SIZE, generator=generator)
    b = torch.randn(SGEMM_SIZE, SGEMM_SIZE, generator=generator)
    value_chunks = [chunk.contiguous() for chunk in v4.split(args.ck, dim=-1)]
    calls = {"stm": lambda: memory_read(q, k, v, backend="torch"),
             "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4),
             "sdpa_split": lambda: torch.cat([F.scaled_dot_product_attention(q4, k4, chunk)
                                              for chunk in value_chunks], dim=-1),
             "official": lambda: memory_read(q, k, v, backend="naive"),
             "products": lambda: _products(q, k, v),
             "sgemm": lambda: torch.mm(a, b)}
    if args.dtype == "bf16":
        q4_32, k4_32, v4_32 = rows(q32, k32, v32)
        a16, b16 = a.to(dtype), b.to(dtype)
        calls.update(stm_fp32=lambda: memory_read(q32, k32, v32, backend="torch"),
                     sdpa_fp32=lambda: F.scaled_dot_product_attention(q4_32, k4_32, v4_32),
                     bgemm=lambda: torch.mm(a16, b16))
    skipped = {}
    if "official" in args.providers and \
            4 * N * args.hw * 2 > 0.6 * common.available_memory_bytes():
        skipped["official"] = "oom (estimated: the affinity would not fit in free memory)"
    if "flex" in args.providers:
        try:
            calls["flex"] = _compiled_flex(q4, k4, v4)
        except Exception as error:  # noqa: BLE001 - the reason is the record
            skipped["flex"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    calls = {name: call for name, call in calls.items()
             if name in args.providers and name not in skipped}
    checks = {}
    for name in [name for name in calls if name in READS]:  # checked before any timing
        inputs = (q32, k32, v32) if name.endswith("_fp32") or args.dtype == "fp32" else \
            (q, k, v)
        checks[name] = check_read(name, calls[name], inputs, "fp32" if inputs[0] is q32
                                  else args.dtype)
        if checks[name][2]:  # wrong: reported with its error, not timed
            skipped[name] = checks[name][2]
            del calls[name]
    skipped = {name: why for name, why in skipped.items() if name in args.providers}
    return calls, skipped, checks


# The providers that read (the rest time matrix products): each checked against float64.
READS = ("stm", "stm_fp32", "sdpa", "sdpa_split", "sdpa_fp32", "official", "flex")


def check_read(name, call, inputs, dtype_name):
    """(errors, bound, "wrong: ..." or None) of one call of provider `name` against the read in
    float64 on `inputs` (q, k, v), at a sample of query positions (bench.accuracy)."""
    q, k, v = inputs
    out = call()
    if out.dim() == 4:  # SDPA's and FlexAttention's (B, heads, HW, Cv)
        out = out.squeeze(1).transpose(1, 2)
    rows = accuracy.sample_rows(q.shape[2])
    expected = accuracy.reference_rows(q, k, v, rows, q.shape[1] ** -0.5)
    return accuracy.check({"out": out[:, :, rows]}, expected, dtype_name)


def _products(q, k, v):
    """The read's two products for one object, without the softmax in between, in the inputs'
    dtype (a bf16 product's output added to a float32 sum, as the bf16 read does): (HW, Cv)."""
    rows = q[0].T.contiguous()  # (HW, Ck)
    out = torch.zeros((rows.shape[0], v.shape[1]))
    for start in range(0, k.shape[2], CPU_CHUNK):
        scores = rows @ k[0, :, start:start + CPU_CHUNK]
        out.add_(scores @ v[0, :, start:start + CPU_CHUNK].T)
    return out


def _compiled_flex(q4, k4, v4):
    """FlexAttention compiled for these inputs, run once (the compile) before it is timed."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def call():
        with torch.no_grad():
            return compiled(q4, k4, v4)
    call()
    return call


@contextlib.contextmanager
def competing_process(enabled):
    """Within the block, with enabled, another process keeps one core busy (a busy loop)."""
    if not enabled:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it start spinning before the first timing
    try:
        yield
    finally:
        process.kill()
        process.wait()


def run(args):
    """The records of every provider at each N (one interleaved run per N)."""
    from bench.ragged_read import interleaved_times
    records = []
    device = torch.device("cpu")
    with torch.no_grad(), competing_process(args.busy):
        for N in args.ns:
            calls, skipped, checks = make_calls(N, args)
            if "stm" in calls and "stm_fp32" in calls:  # the bf16 read's error, once per N
                error = _relative_error(calls["stm"](), calls["stm_fp32"]())
                records.append(dict(provider="stm", N=N, status="accuracy",
                                    relative_error_vs_fp32=error))
                print(f"N={N:7} bf16 read vs float32 read: relative error {error:.1e}")
            times = interleaved_times(calls, device, args.rounds)
            for provider in args.providers:
                checked = dict(zip(("errors", "error_bound"), checks[provider][:2], strict=True)) \
                    if provider in checks else {}
                if provider in skipped:
                    records.append(dict(provider=provider, N=N, status=skipped[provider],
                                        **checked))
                    print(f"N={N:7} {provider:9} {skipped[provider]}", flush=True)
                    continue
                median, low, high = times[provider]
                flops = 2.0 * SGEMM_SIZE ** 3 if provider in ("sgemm", "bgemm") else \
                    read_flops(N, args.hw, args.ck, args.cv)
                records.append(dict(provider=provider, N=N, status="ok", median_ms=median,
                                    q20_ms=low, q80_ms=high,
                                    gflops=flops / (median * 1e-3) / 1e9, **checked))
                print(f"N={N:7} {provider:9} {median:10.2f} ms  "
                      f"{records[-1]['gflops']:7.1f} GFLOP/s", flush=True)
    return records


def _relative_error(output, reference):
    """|output - reference| / |reference| (Frobenius norms, in float64)."""
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm())


def comparison(records, N):
    """{best_peer (the fastest peer on the read's own inputs), stm_vs_best_peer,
    products_vs_best_peer (the ceiling of stm_vs_best_peer for a read on torch's BLAS),
    stm_over_products (the read's time over its two products' alone: 1 is the ceiling),
    stm_of_gemm (of bgemm's rate where timed, else sgemm's),
    stm_vs_fp32 (the bf16 read's speed over its float32 read), stm_vs_sdpa_fp32 (over SDPA on
    float32 inputs), relative_error_vs_fp32} at N
    (None where not measured)."""
    ok = {r["provider"]: r for r in records if r["N"] == N and r.get("status") == "ok"}
    peers = {name: ok[name]["median_ms"] for name in PEERS
             if name in ok and name not in OWN_COLUMN_PEERS}
    best = min(peers, key=peers.get) if peers else None
    stm, products = ok.get("stm"), ok.get("products")
    gemm = ok.get("bgemm") or ok.get("sgemm")
    error = next((r["relative_error_vs_fp32"] for r in records
                  if r["N"] == N and r.get("status") == "accuracy"), None)
    return dict(best_peer=best,
                stm_vs_best_peer=peers[best] / stm["median_ms"] if stm and best else None,
                products_vs_best_peer=peers[best] / products["median_ms"]
                if products and best else None,
                stm_over_products=stm["median_ms"] / products["median_ms"]
                if stm and products else None,
                stm_of_gemm=stm["gflops"] / gemm["gflops"] if stm and gemm else None,
                stm_vs_fp32=ok["stm_fp32"]["median_ms"] / stm["median_ms"]
                if stm and "stm_fp32" in ok else None,
                stm_vs_sdpa_fp32=ok["sdpa_fp32"]["median_ms"] / stm["median_ms"]
                if stm and "sdpa_fp32" in ok else None,
                relative_error_vs_fp32=error)


def _keys(key_scale):
    """How a run's keys were drawn, where not unit normals."""
    return "" if key_scale == 1.0 else f", keys {key_scale:g}x unit normals (peaked scores)"


def summary(payload):
    """Markdown table: ms per provider and N, the best peer, stm's speed-up and sgemm share."""
    providers = payload["providers"]
    bf16 = payload.get("dtype") == "bf16"
    gemm = "bgemm" if bf16 else "sgemm"
    extra = " | stm vs sdpa_fp32 | stm vs stm_fp32 | error vs fp32" if bf16 else ""
    rows = ["| N | " + " | ".join(f"{p} ms" for p in providers) +
            f" | best peer | stm vs best peer | products vs best peer | stm / products | "
            f"stm GFLOP/s of {gemm}{extra} |", "|---|" + "---|" * (len(providers) + 5 + 3 * bf16)]
    for N in sorted({r["N"] for r in payload["records"]}):
        by = {r["provider"]: r for r in payload["records"] if r["N"] == N
              and r.get("status") != "accuracy"}
        cells = [f"{by[p]['median_ms']:.1f}" if by.get(p, {}).get("status") == "ok"
                 else by.get(p, {}).get("status", "-").split(":")[0] for p in providers]
        found = comparison(payload["records"], N)
        speed, ceiling = found["stm_vs_best_peer"], found["products_vs_best_peer"]
        over = found["stm_over_products"]
        share = found["stm_of_gemm"]
        tail = ""
        if bf16:
            own, error = found["stm_vs_fp32"], found["relative_error_vs_fp32"]
            sdpa = found["stm_vs_sdpa_fp32"]
            tail = (f" | {'-' if sdpa is None else f'{sdpa:.2f}x'}"
                    f" | {'-' if own is None else f'{own:.2f}x'} | "
                    f"{'-' if error is None else f'{error:.1e}'}")
        rows.append(f"| {N} | " + " | ".join(cells) + f" | {found['best_peer'] or '-'} | "
                    f"{'-' if speed is None else f'{speed:.2f}x'} | "
                    f"{'-' if ceiling is None else f'{ceiling:.2f}x'} | "
                    f"{'-' if over is None else f'{over:.2f}x'} | "
                    f"{'-' if share is None else f'{share:.0%}'}{tail} |")
    inputs = "bf16 inputs (stm_fp32, sdpa_fp32: float32)" if bf16 else "float32"
    rows.append(f"\nOne object, HW = {payload['hw']}, Ck = {payload['ck']}, Cv = "
                f"{payload['cv']}, {inputs} forward, {payload['threads']} torch threads, "
                f"{payload['rounds']} interleaved rounds"
                f"{', one core kept busy by another process' if payload['busy'] else ''}"
                f"{_keys(payload.get('key_scale', 1.0))}. ")
    if bf16 and not payload.get("bf16_dot_products"):
        rows[-1] += ("This CPU has no bf16 dot products: its bf16 figures are oneDNN's "
                     "emulation in float32, and no speed claim is made from them.")
    elif bf16:
        rows[-1] += ("Targets: stm >= 1.3x the best bf16 peer, its time <= 1.3x the two "
                     "products', relative error <= 1e-2.")
    else:
        rows[-1] += "Targets: stm >= 1.5x the best peer and >= 85% of the sgemm rate."
    return "\n".join(rows)


def plot(payload, path):
    """GFLOP/s against N per provider (sgemm as a line); returns [path]."""
    figure, axis = common.subplots(1, 1, figsize=(6.5, 3.8))
    for provider in payload["providers"]:
        points = sorted((r["N"], r["gflops"]) for r in payload["records"]
                        if r["provider"] == provider and r.get("status") == "ok")
        if points:
            ns, rates = zip(*points, strict=True)
            style = dict(linestyle="--", color="gray") if provider == "sgemm" else \
                dict(marker="o")
            axis.plot(ns, rates, label=provider, **style)
    axis.set_xscale("log")
    axis.set_xlabel("memory positions N")
    axis.set_ylabel("GFLOP/s")
    axis.legend()
    busy = " (one core busy)" if payload["busy"] else ""
    figure.suptitle(f"CPU read vs peers, {payload['device']}{busy}")
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m bench cpu-read`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench cpu-read",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[16200, 64800, 162000])
    common.add_read_shape_arguments(parser, hw=1620, ck=128, cv=512)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the inputs' dtype (default fp32; bf16 adds the float32 read and "
                             "SDPA as references)")
    parser.add_argument("--providers", nargs="+", choices=BF16_PROVIDERS,
                        help="default: every provider of the dtype")
    parser.add_argument("--busy", action="store_true",
                        help="keep one core busy with another process during the run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--key-scale", type=float, default=1.0,
                        help="multiply the random keys by this (default 1: scores of a few "
                             "units; 20: spanning hundreds, as a trained STM's do, where most "
                             "softmax weights underflow float32)")
    args = parser.parse_args(argv)
    allowed = BF16_PROVIDERS if args.dtype == "bf16" else PROVIDERS
    args.providers = args.providers or list(allowed)
    if set(args.providers) - set(allowed):
        parser.error(f"--providers {' '.join(sorted(set(args.providers) - set(allowed)))} "
                     f"need --dtype bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = common.environment(torch.device("cpu"))
    payload.update(benchmark="cpu_read", hw=args.hw, ck=args.ck, cv=args.cv, dtype=args.dtype,
                   bf16_dot_products=cpu_features.bf16_dot_products(),
                   rounds=args.rounds, busy=args.busy, threads=torch.get_num_threads(),
                   key_scale=args.key_scale,
                   providers=list(args.providers), records=run(args))
    common.finish_run("cpu_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
