"""The CPU read against the best CPU peers, in one interleaved run, quiet or with a competitor.

    python -m bench cpu-read                          # N = 16,200 to 162,000, quiet machine
    python -m bench cpu-read --busy                   # the same with a process spinning on one core
    python -m bench cpu-read --ns 16200 --rounds 3    # quick

One object, one 480p query frame (HW = 1,620 at stride 16), Ck = 128, Cv = 512, float32, a
forward read. Providers, timed round-robin (one call each per round, so that load from other
processes hits every one alike):
    stm        memory_read(backend="torch"): the library's CPU read (row blocks on worker threads)
    sdpa       torch.nn.functional.scaled_dot_product_attention with the full 512-wide value
    official   the official read (materialises the N x HW affinity)
    flex       FlexAttention compiled (torch.compile of flex_attention; skipped with its error
               where it does not compile here)
    products   the read's two matrix products alone (scores, then scores x values, over memory
               chunks of the CPU read's length, no softmax): the least time any read built on
               torch's BLAS needs, so best peer / products is the most speed-up one could show
    sgemm      a 2048^3 float32 matrix product: the machine's float32 rate in the same rounds
Records per N: median, 20% and 80% ms per provider, GFLOP/s (2 HW N (Ck + Cv) for the reads and
the products), the stm read's speed over the best peer, the products' (the ceiling), and the
read's rate as a share of the sgemm rate, the torch
thread count, and whether a competing process ran. Writes bench/results/cpu_read_cpu_<date>.json
and a PNG beside it.
"""
import argparse
import contextlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import common
from stm_kernels import memory_read
from stm_kernels.backends.pytorch import CPU_CHUNK

PEERS = ("sdpa", "official", "flex")
PROVIDERS = ("stm",) + PEERS + ("products", "sgemm")
SGEMM_SIZE = 2048


def read_flops(N, hw, ck, cv):
    """Multiply-adds of one read, counted twice: the scores and the weighted values."""
    return 2.0 * hw * N * (ck + cv)


def make_calls(N, args):
    """{provider: zero-argument call}, and {provider: why it cannot run} for the rest."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.ck, args.hw, generator=generator)
    k = torch.randn(1, args.ck, N, generator=generator)
    v = torch.randn(1, args.cv, N, generator=generator)
    # SDPA and FlexAttention take (B, heads, L, C), contiguous
    q4, k4, v4 = (t.transpose(1, 2).unsqueeze(1).contiguous() for t in (q, k, v))
    a = torch.randn(SGEMM_SIZE, SGEMM_SIZE, generator=generator)
    b = torch.randn(SGEMM_SIZE, SGEMM_SIZE, generator=generator)
    calls = {"stm": lambda: memory_read(q, k, v, backend="torch"),
             "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4),
             "official": lambda: memory_read(q, k, v, backend="naive"),
             "products": lambda: _products(q, k, v),
             "sgemm": lambda: torch.mm(a, b)}
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
    return calls, {name: why for name, why in skipped.items() if name in args.providers}


def _products(q, k, v):
    """The read's two products for one object, without the softmax in between: (HW, Cv)."""
    rows = q[0].T.contiguous()  # (HW, Ck)
    out = torch.zeros((rows.shape[0], v.shape[1]))
    for start in range(0, k.shape[2], CPU_CHUNK):
        scores = rows @ k[0, :, start:start + CPU_CHUNK]
        out.addmm_(scores, v[0, :, start:start + CPU_CHUNK].T)
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
            calls, skipped = make_calls(N, args)
            times = interleaved_times(calls, device, args.rounds)
            for provider in args.providers:
                if provider in skipped:
                    records.append(dict(provider=provider, N=N, status=skipped[provider]))
                    continue
                median, low, high = times[provider]
                flops = 2.0 * SGEMM_SIZE ** 3 if provider == "sgemm" else \
                    read_flops(N, args.hw, args.ck, args.cv)
                records.append(dict(provider=provider, N=N, status="ok", median_ms=median,
                                    q20_ms=low, q80_ms=high,
                                    gflops=flops / (median * 1e-3) / 1e9))
                print(f"N={N:7} {provider:9} {median:10.2f} ms  "
                      f"{records[-1]['gflops']:7.1f} GFLOP/s", flush=True)
    return records


def comparison(records, N):
    """{best_peer, stm_vs_best_peer, products_vs_best_peer (the ceiling of stm_vs_best_peer for
    a read on torch's BLAS), stm_of_sgemm} at N (None where not measured)."""
    ok = {r["provider"]: r for r in records if r["N"] == N and r.get("status") == "ok"}
    peers = {name: ok[name]["median_ms"] for name in PEERS if name in ok}
    best = min(peers, key=peers.get) if peers else None
    stm, products = ok.get("stm"), ok.get("products")
    return dict(best_peer=best,
                stm_vs_best_peer=peers[best] / stm["median_ms"] if stm and best else None,
                products_vs_best_peer=peers[best] / products["median_ms"]
                if products and best else None,
                stm_of_sgemm=stm["gflops"] / ok["sgemm"]["gflops"]
                if stm and "sgemm" in ok else None)


def summary(payload):
    """Markdown table: ms per provider and N, the best peer, stm's speed-up and sgemm share."""
    providers = payload["providers"]
    rows = ["| N | " + " | ".join(f"{p} ms" for p in providers) +
            " | best peer | stm vs best peer | products vs best peer | stm GFLOP/s of sgemm |",
            "|---|" + "---|" * (len(providers) + 4)]
    for N in sorted({r["N"] for r in payload["records"]}):
        by = {r["provider"]: r for r in payload["records"] if r["N"] == N}
        cells = [f"{by[p]['median_ms']:.1f}" if by.get(p, {}).get("status") == "ok"
                 else by.get(p, {}).get("status", "-").split(":")[0] for p in providers]
        found = comparison(payload["records"], N)
        speed, ceiling = found["stm_vs_best_peer"], found["products_vs_best_peer"]
        share = found["stm_of_sgemm"]
        rows.append(f"| {N} | " + " | ".join(cells) + f" | {found['best_peer'] or '-'} | "
                    f"{'-' if speed is None else f'{speed:.2f}x'} | "
                    f"{'-' if ceiling is None else f'{ceiling:.2f}x'} | "
                    f"{'-' if share is None else f'{share:.0%}'} |")
    rows.append(f"\nOne object, HW = {payload['hw']}, Ck = {payload['ck']}, Cv = "
                f"{payload['cv']}, float32 forward, {payload['threads']} torch threads, "
                f"{payload['rounds']} interleaved rounds"
                f"{', one core kept busy by another process' if payload['busy'] else ''}. "
                "Targets: stm >= 1.5x the best peer and >= 85% of the sgemm rate.")
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
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--busy", action="store_true",
                        help="keep one core busy with another process during the run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = common.environment(torch.device("cpu"))
    payload.update(benchmark="cpu_read", hw=args.hw, ck=args.ck, cv=args.cv,
                   rounds=args.rounds, busy=args.busy, threads=torch.get_num_threads(),
                   providers=list(args.providers), records=run(args))
    common.finish_run("cpu_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
