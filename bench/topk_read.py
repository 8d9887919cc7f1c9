"""Top-k reads (STCN, XMem) against STCN's materialised top-k, and the cost of memory usage.

    python -m bench topk-read                     # defaults for the device present
    python -m bench topk-read --ns 32400 162000 --top-k 20

One object, one query frame (HW = 1,620: 480p at stride 16), Ck = 128, Cv = 512, STCN's L2
similarity, k = 20 (STCN's default). Providers, each a forward read:
    topk            memory_read(..., top_k=k): streamed selection + a read of the k selected
                    positions per query (memory O(HW * k) beyond the inputs)
    stcn            STCN's own read, transcribed: the whole (N x HW) affinity, torch.topk over
                    it, softmax of the k values scattered back into a dense affinity, bmm
    plain           memory_read without top-k (the full softmax), for reference
    plain+usage     memory_read(..., return_usage=True): target <= 1.3x plain
Time: CPU medians of interleaved rounds (GPU: CUDA events); peak extra memory of one call (a
fresh process's resident-set high-water mark on CPU; the allocator's peak on GPU). A provider
whose materialised affinity would not fit in free memory is recorded as out of memory.
Each provider's read is first checked against float64 (bench/accuracy.py): one over its
dtype's bound is recorded "wrong" with its error, not timed.
Writes bench/results/topk_read_<device>_<date>.json and a PNG beside it.
"""
import argparse

import torch

from bench import accuracy, common
from stm_kernels import memory_read
from stm_kernels.options import DTYPES

PROVIDERS = ("topk", "stcn", "plain", "plain+usage")
DEFAULTS = {"cuda": dict(ns=(32400, 64800, 162000, 324000), dtype="bf16"),
            "cpu": dict(ns=(32400, 64800, 162000), dtype="fp32")}


def stcn_read(qk, mk, mv, top_k):
    """STCN's memory read (model/network.py get_affinity + softmax_w_top + readout), on
    (B, Ck, N) keys: the whole affinity is built, then only the top-k of each column kept."""
    a_sq = mk.pow(2).sum(1).unsqueeze(2)
    ab = mk.transpose(1, 2) @ qk
    affinity = (2 * ab - a_sq) / (mk.shape[1] ** 0.5)  # (B, N, HW)
    values, indices = torch.topk(affinity, k=top_k, dim=1)
    x_exp = values.exp_()
    x_exp /= torch.sum(x_exp, dim=1, keepdim=True)
    affinity.zero_().scatter_(1, indices, x_exp)
    return torch.bmm(mv, affinity)


def make_inputs(N, args, device):
    """The random (q, k, v) every provider reads at N (seeded: the same for each)."""
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)
    return randn(1, args.ck, args.hw), randn(1, args.ck, N), randn(1, args.cv, N)


def make_call(provider, N, args, device):
    """A zero-argument forward read of the provider on fresh random inputs (make_inputs)."""
    q, k, v = make_inputs(N, args, device)
    if provider == "topk":
        return lambda: memory_read(q, k, v, similarity="l2", top_k=args.top_k)
    if provider == "stcn":
        return lambda: stcn_read(q, k, v, args.top_k)
    if provider == "plain":
        return lambda: memory_read(q, k, v, similarity="l2")
    return lambda: memory_read(q, k, v, similarity="l2", return_usage=True)


def _affinity_bytes(N, args):
    return 2 * N * args.hw * torch.finfo(DTYPES[args.dtype]).bits // 8  # affinity + its copy


def peak_bytes(provider, N, args, device):
    """Peak extra memory of one call of the provider (on CPU in a fresh process)."""
    if device.type == "cuda":
        call = make_call(provider, N, args, device)
        call()
        return common.cuda_peak_extra_bytes(call, device)
    spec = dict(provider=provider, N=N, **{key: getattr(args, key) for key in
                                          ("hw", "ck", "cv", "top_k", "dtype")})
    return common.run_isolated("bench.topk_read", spec)


def run(args, device):
    """Time and measure every provider at each N; returns the records."""
    records = []
    for N in args.ns:
        fits = [p for p in PROVIDERS if p != "stcn" or device.type == "cuda"
                or _affinity_bytes(N, args) < 0.6 * common.available_memory_bytes()]
        for provider in set(PROVIDERS) - set(fits):
            records.append(dict(provider=provider, N=N, status="oom (estimated: the affinity "
                                "would not fit in free memory; not run)"))
        try:
            calls = {provider: make_call(provider, N, args, device) for provider in fits}
            checks = {provider: check(provider, call, N, args, device)
                      for provider, call in calls.items()}
            for provider, (errors, bound, wrong) in checks.items():
                if wrong:  # reported with its error, not timed
                    del calls[provider]
                    fits.remove(provider)
                    records.append(dict(provider=provider, N=N, status=wrong, errors=errors,
                                        error_bound=bound))
                    print(f"N={N:7} {provider:12} {wrong}", flush=True)
            times = _times(calls, device, args.rounds)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if "out of memory" not in str(error).lower():
                raise
            times = {}
        for provider in fits:
            if provider not in times:
                records.append(dict(provider=provider, N=N, status="oom"))
                continue
            median, low, high = times[provider]
            errors, bound, _ = checks[provider]
            record = dict(provider=provider, N=N, status="ok", median_ms=median, q20_ms=low,
                          q80_ms=high, peak_mem_bytes=peak_bytes(provider, N, args, device),
                          errors=errors, error_bound=bound)
            records.append(record)
            print(f"N={N:7} {provider:12} {median:10.2f} ms  peak "
                  f"{record['peak_mem_bytes'] / 2**20:9.1f} MiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def check(provider, call, N, args, device):
    """(errors, bound, "wrong: ..." or None) of one call of the provider against the read in
    float64 (L2 scores; the top-k ones for topk and stcn) at a sample of query positions
    (bench.accuracy); plain+usage's read is checked (its usage sums over every query)."""
    q, k, v = make_inputs(N, args, device)
    out = call()
    out = out[0] if isinstance(out, tuple) else out
    rows = accuracy.sample_rows(args.hw).to(device)
    top_k = args.top_k if provider in ("topk", "stcn") else None
    expected = accuracy.reference_rows(q, k, v, rows, args.ck ** -0.5, similarity="l2",
                                       top_k=top_k)
    return accuracy.check({"out": out[:, :, rows]}, expected, args.dtype)


def _times(calls, device, rounds):
    if device.type == "cuda":
        return {name: common.time_ms(call, device) for name, call in calls.items()}
    from bench.ragged_read import interleaved_times
    return interleaved_times(calls, device, rounds)


def _cell(by_provider, provider, key, scale=1.0):
    """A provider's value of key (divided by scale), or the first word of its status."""
    record = by_provider.get(provider, {})
    if record.get("status") == "ok":
        return f"{record[key] / scale:.1f}"
    return record.get("status", "-").split(" ")[0]


def _ratio(by_provider, a, b, key):
    """a's value of key over b's, when both ran."""
    first, second = by_provider.get(a, {}), by_provider.get(b, {})
    if first.get("status") == "ok" and second.get("status") == "ok":
        return f"{first[key] / max(second[key], 1):.1f}x"
    return "-"


def summary(payload):
    """Markdown table: time and peak memory per provider and N, and the target ratios."""
    rows = ["| N | " + " | ".join(f"{p} ms" for p in PROVIDERS) + " | " +
            " | ".join(f"{p} peak MiB" for p in PROVIDERS) +
            " | stcn / topk time | stcn / topk memory | usage / plain time |",
            "|---|" + "---|" * (2 * len(PROVIDERS) + 3)]
    for N in sorted({r["N"] for r in payload["records"]}):
        by = {r["provider"]: r for r in payload["records"] if r["N"] == N}
        rows.append(f"| {N} | " + " | ".join(_cell(by, p, "median_ms") for p in PROVIDERS) +
                    " | " + " | ".join(_cell(by, p, "peak_mem_bytes", 2**20) for p in PROVIDERS) +
                    f" | {_ratio(by, 'stcn', 'topk', 'median_ms')} | "
                    f"{_ratio(by, 'stcn', 'topk', 'peak_mem_bytes')} | "
                    f"{_ratio(by, 'plain+usage', 'plain', 'median_ms')} |")
    rows.append(f"\nOne object, HW = {payload['hw']}, Ck = {payload['ck']}, Cv = {payload['cv']}, "
                f"k = {payload['top_k']}, L2 similarity, {payload['dtype']}. Targets: at N = "
                "162,000 topk >= 2x faster than stcn with >= 10x less extra memory; usage <= "
                "1.3x plain.")
    return "\n".join(rows)


def plot(payload, path):
    """Time and peak memory against N per provider; returns [path]."""
    figure, (left, right) = common.subplots(1, 2, figsize=(10, 3.8))
    for provider in PROVIDERS:
        points = sorted((r["N"], r["median_ms"], r["peak_mem_bytes"] / 2**20)
                        for r in payload["records"]
                        if r["provider"] == provider and r.get("status") == "ok")
        if points:
            ns, times, peaks = zip(*points, strict=True)
            left.plot(ns, times, marker="o", label=provider)
            right.plot(ns, peaks, marker="o", label=provider)
    for axis, label in ((left, "ms per read"), (right, "peak extra MiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("memory positions N")
        axis.set_ylabel(label)
    left.legend()
    figure.suptitle(f"Top-k reads (k = {payload['top_k']}), {payload['device']}")
    return common.save_figure(figure, path)


def _cpu_memory_child(spec):
    args = argparse.Namespace(**{key: spec[key] for key in ("hw", "ck", "cv", "top_k", "dtype")})
    call = make_call(spec["provider"], spec["N"], args, torch.device("cpu"))
    return common.cpu_peak_extra_bytes(call)


def main(argv=None):
    """`python -m bench topk-read`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, device_choices=None)
    parser.add_argument("--ns", type=int, nargs="+", default=None)
    common.add_read_shape_arguments(parser, hw=1620, ck=128, cv=512, top_k=20, dtype=None)
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved timing rounds")
    args = common.parse_args_or_run_child(parser, argv, _cpu_memory_child)
    if args is None:
        return 0
    device = common.apply_device_defaults(args, DEFAULTS)
    payload = common.environment(device)
    payload.update(benchmark="topk_read", hw=args.hw, ck=args.ck, cv=args.cv, top_k=args.top_k,
                   dtype=args.dtype, records=run(args, device))
    common.finish_run("topk_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
