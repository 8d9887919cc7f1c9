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
Writes bench/results/topk_read_<device>_<date>.json and a PNG beside it.
"""
import argparse
import json
import pathlib

import torch

from bench import common
from stm_kernels import memory_read
from stm_kernels.checks import DTYPES

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


def make_call(provider, N, args, device):
    """A zero-argument forward read of the provider on fresh random inputs."""
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)
    q, k, v = randn(1, args.ck, args.hw), randn(1, args.ck, N), randn(1, args.cv, N)
    if provider == "topk":
        return lambda: memory_read(q, k, v, similarity="l2", top_k=args.top_k)
    if provider == "stcn":
        return lambda: stcn_read(q, k, v, args.top_k)
    if provider == "plain":
        return lambda: memory_read(q, k, v, similarity="l2")
    return lambda: memory_read(q, k, v, similarity="l2", return_usage=True)


def _affinity_bytes(N, args):
    return 2 * N * args.hw * torch.finfo(DTYPES[args.dtype]).bits // 8  # affinity + its copy


def _available_bytes():
    text = pathlib.Path("/proc/meminfo").read_text()
    return int(text.split("MemAvailable:")[1].split()[0]) * 1024


def peak_bytes(provider, N, args, device):
    if device.type == "cuda":
        call = make_call(provider, N, args, device)
        call()
        return common.cuda_peak_extra_bytes(call, device)
    spec = dict(provider=provider, N=N, **{key: getattr(args, key) for key in
                                          ("hw", "ck", "cv", "top_k", "dtype")})
    return common.run_isolated("bench.topk_read", ["--_measure-cpu-memory", json.dumps(spec)])


def run(args, device):
    records = []
    for N in args.ns:
        fits = [p for p in PROVIDERS if p != "stcn" or device.type == "cuda"
                or _affinity_bytes(N, args) < 0.6 * _available_bytes()]
        for provider in set(PROVIDERS) - set(fits):
            records.append(dict(provider=provider, N=N, status="oom (estimated: the affinity "
                                "would not fit in free memory; not run)"))
        try:
            calls = {provider: make_call(provider, N, args, device) for provider in fits}
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
            record = dict(provider=provider, N=N, status="ok", median_ms=median, q20_ms=low,
                          q80_ms=high, peak_mem_bytes=peak_bytes(provider, N, args, device))
            records.append(record)
            print(f"N={N:7} {provider:12} {median:10.2f} ms  peak "
                  f"{record['peak_mem_bytes'] / 2**20:9.1f} MiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _times(calls, device, rounds):
    if device.type == "cuda":
        return {name: common.time_ms(call, device) for name, call in calls.items()}
    from bench.ragged_read import interleaved_times
    return interleaved_times(calls, device, rounds)


def summary(payload):
    rows = ["| N | " + " | ".join(f"{p} ms" for p in PROVIDERS) + " | " +
            " | ".join(f"{p} peak MiB" for p in PROVIDERS) +
            " | stcn / topk time | stcn / topk memory | usage / plain time |",
            "|---|" + "---|" * (2 * len(PROVIDERS) + 3)]
    for N in sorted({r["N"] for r in payload["records"]}):
        by = {r["provider"]: r for r in payload["records"] if r["N"] == N}

        def cell(provider, key, scale=1.0, digits=1):
            record = by.get(provider, {})
            return f"{record[key] / scale:.{digits}f}" if record.get("status") == "ok" else \
                record.get("status", "-").split(" ")[0]

        def ratio(a, b, key):
            if by.get(a, {}).get("status") == "ok" and by.get(b, {}).get("status") == "ok":
                return f"{by[a][key] / max(by[b][key], 1):.1f}x"
            return "-"
        rows.append(f"| {N} | " + " | ".join(cell(p, "median_ms") for p in PROVIDERS) + " | " +
                    " | ".join(cell(p, "peak_mem_bytes", 2**20) for p in PROVIDERS) +
                    f" | {ratio('stcn', 'topk', 'median_ms')} | "
                    f"{ratio('stcn', 'topk', 'peak_mem_bytes')} | "
                    f"{ratio('plain+usage', 'plain', 'median_ms')} |")
    rows.append(f"\nOne object, HW = {payload['hw']}, Ck = {payload['ck']}, Cv = {payload['cv']}, "
                f"k = {payload['top_k']}, L2 similarity, {payload['dtype']}. Targets: at N = "
                "162,000 topk >= 2x faster than stcn with >= 10x less extra memory; usage <= "
                "1.3x plain.")
    return "\n".join(rows)


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for provider in PROVIDERS:
        points = sorted((r["N"], r["median_ms"], r["peak_mem_bytes"] / 2**20)
                        for r in payload["records"]
                        if r["provider"] == provider and r.get("status") == "ok")
        if points:
            ns, times, peaks = zip(*points)
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


def _cpu_memory_child(spec_json):
    spec = json.loads(spec_json)
    args = argparse.Namespace(**{key: spec[key] for key in ("hw", "ck", "cv", "top_k", "dtype")})
    call = make_call(spec["provider"], spec["N"], args, torch.device("cpu"))
    print(json.dumps(common.cpu_peak_extra_bytes(call)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ns", type=int, nargs="+", default=None)
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--ck", type=int, default=128)
    parser.add_argument("--cv", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved timing rounds")
    parser.add_argument("--_measure-cpu-memory", dest="measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        _cpu_memory_child(args.measure)
        return 0
    device = common.pick_device(args.device)
    args.ns = args.ns or DEFAULTS[device.type]["ns"]
    args.dtype = args.dtype or DEFAULTS[device.type]["dtype"]
    payload = common.environment(device)
    payload.update(benchmark="topk_read", hw=args.hw, ck=args.ck, cv=args.cv, top_k=args.top_k,
                   dtype=args.dtype, records=run(args, device))
    common.finish_run("topk_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
