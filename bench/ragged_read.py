"""Ragged memories in one launch: the read of B objects whose memories have different lengths.

    python -m bench ragged-read                 # defaults for the device present
    python -m bench ragged-read --frames 4 8    # shortest memory in frames (4:1 spread above it)

B = 4 objects (e.g. four videos) with memories of L, 2L, 3L and 4L positions (a 4:1 spread)
stored in one padded (B, C, 4L) memory, read by one query frame. Variants, all exact:
    ragged      memory_read(..., memory_lengths=lengths): one call over the padded memory
    padded      the same memory read without lengths: every object over all 4L positions
                (what a batch costs without ragged support; it also reads the padding)
    per-video   B separate calls, each over its own slice
    equal-work  B objects of the mean length 2.5L each: the time a read proportional to the
                sum of the lengths should take (target: ragged within 10% of it)
Fused read: triton on a GPU (bf16, 480p query: HW = 1,620), torch on CPU (fp32, HW = 405).
Each variant is first checked against the read in float64 of the memory it reads
(bench/accuracy.py): one over its dtype's bound is recorded "wrong" with its error, not timed.
Writes bench/results/ragged_read_<device>_<date>.json and a PNG beside it.
"""

import torch

from bench import accuracy, common
from stm_kernels import memory_read
from stm_kernels.options import DTYPES

VARIANTS = ("ragged", "padded", "per-video", "equal-work")
DEFAULTS = {"cuda": dict(hw=1620, frames=(4, 25), dtype="bf16"),
            "cpu": dict(hw=405, frames=(4, 16), dtype="fp32")}


def calls(variant, q, k, v, lengths, backend):
    """A zero-argument call of the variant over a padded memory k, v (B, C, N_max)."""
    if variant == "ragged":
        tensor_lengths = torch.tensor(lengths, device=k.device)
        return lambda: memory_read(q, k, v, memory_lengths=tensor_lengths, backend=backend)
    if variant == "padded":
        return lambda: memory_read(q, k, v, backend=backend)
    if variant == "per-video":
        slices = [(k[b:b + 1, :, :n], v[b:b + 1, :, :n]) for b, n in enumerate(lengths)]
        return lambda: [memory_read(q, k_b, v_b, backend=backend) for k_b, v_b in slices]
    mean = sum(lengths) // len(lengths)
    k_even, v_even = k[:, :, :mean], v[:, :, :mean]
    return lambda: memory_read(q, k_even, v_even, backend=backend)


def run(args, device):
    """Time every variant at each --frames; returns the records."""
    dtype = DTYPES[args.dtype]
    backend = "triton" if device.type == "cuda" else "torch"
    records = []
    generator = torch.Generator(device=device).manual_seed(0)
    for frames in args.frames:
        shortest = frames * args.hw
        lengths = [shortest * m for m in range(1, args.objects + 1)]
        n_max = lengths[-1]

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype)
        q, k, v = randn(1, args.ck, args.hw), randn(args.objects, args.ck, n_max), randn(
            args.objects, args.cv, n_max)
        variants = {variant: calls(variant, q, k, v, lengths, backend) for variant in VARIANTS}
        checks = {variant: check(variant, call, q, k, v, lengths, args.dtype)
                  for variant, call in variants.items()}
        for variant, (errors, bound, wrong) in checks.items():
            if wrong:  # reported with its error, not timed
                del variants[variant]
                records.append(dict(variant=variant, frames=frames, lengths=lengths,
                                    n_max=n_max, sum_lengths=sum(lengths), status=wrong,
                                    errors=errors, error_bound=bound))
                print(f"{frames:3} frames  {variant:10} {wrong}", flush=True)
        timings = interleaved_times(variants, device, args.rounds)
        for variant, (median, low, high) in timings.items():
            errors, bound, _ = checks[variant]
            records.append(dict(variant=variant, frames=frames, lengths=lengths, n_max=n_max,
                                sum_lengths=sum(lengths), status="ok", median_ms=median,
                                q20_ms=low, q80_ms=high, errors=errors, error_bound=bound))
            print(f"{frames:3} frames  {variant:10} {median:9.3f} ms", flush=True)
    return records


def check(variant, call, q, k, v, lengths, dtype_name):
    """(errors, bound, "wrong: ..." or None) of one call of the variant against the read in
    float64 of the memory it reads (each object's own length for ragged and per-video, the
    whole padded memory for padded, the mean length for equal-work), at a sample of query
    positions (bench.accuracy)."""
    out = call()
    if variant == "per-video":
        out = torch.cat(out)
    spans = {"ragged": lengths, "per-video": lengths, "padded": [k.shape[2]] * len(lengths),
             "equal-work": [sum(lengths) // len(lengths)] * len(lengths)}[variant]
    rows = accuracy.sample_rows(q.shape[2]).to(q.device)
    expected = torch.cat([accuracy.reference_rows(q, k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                  rows, q.shape[1] ** -0.5)["out"]
                          for b, n in enumerate(spans)])
    return accuracy.check({"out": out[:, :, rows]}, {"out": expected}, dtype_name)


def interleaved_times(functions, device, rounds):
    """{name: (median, 20%, 80%) ms}: on a GPU each function by itself (CUDA events); on a CPU
    round-robin over the functions, one call each per round, so that load from other processes
    hits every variant alike."""
    if device.type == "cuda":
        return {name: common.time_ms(fn, device) for name, fn in functions.items()}
    import statistics
    import time
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in functions.items():
            tick = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - tick) * 1e3)
    result = {}
    for name, values in times.items():
        quantiles = statistics.quantiles(values, n=5)
        result[name] = (statistics.median(values), quantiles[0], quantiles[3])
    return result


def summary(payload):
    """Markdown table: each variant's time per shortest memory, and the two ratios."""
    rows = ["| shortest memory (frames) | lengths (positions) | " + " | ".join(
        f"{variant} ms" for variant in VARIANTS) + " | ragged / equal-work | padded / ragged |",
        "|---|---|" + "---|" * (len(VARIANTS) + 2)]
    for frames in sorted({r["frames"] for r in payload["records"]}):
        times = {r["variant"]: r["median_ms"] for r in payload["records"]
                 if r["frames"] == frames and r.get("status", "ok") == "ok"}
        lengths = next(r["lengths"] for r in payload["records"] if r["frames"] == frames)

        def ratio(a, b, times=times):
            return f"{times[a] / times[b]:.2f}" if a in times and b in times else "-"
        rows.append(f"| {frames} | {', '.join(map(str, lengths))} | " + " | ".join(
            f"{times[variant]:.2f}" if variant in times else "wrong" for variant in VARIANTS) +
            f" | {ratio('ragged', 'equal-work')} | {ratio('padded', 'ragged')} |")
    rows.append(f"\n{payload['objects']} objects, HW = {payload['hw']}, Ck = {payload['ck']}, "
                f"Cv = {payload['cv']}, {payload['dtype']}, backend {payload['backend']}. Target: "
                "ragged within 10% of equal-work (time proportional to the sum of the lengths).")
    return "\n".join(rows)


def plot(payload, path):
    """Time per variant, one panel per shortest memory; returns [path]."""
    figure, by_frames = common.panels(sorted({r["frames"] for r in payload["records"]}), 4.5)
    for axis, count in by_frames:
        times = [next((r["median_ms"] for r in payload["records"] if r["frames"] == count and
                       r["variant"] == variant and r.get("status", "ok") == "ok"), 0)
                 for variant in VARIANTS]  # 0: wrong, not timed
        axis.bar(VARIANTS, times, color=["C0", "C3", "C2", "C7"])
        axis.set_title(f"shortest memory {count} frames (4:1 spread)")
        axis.set_ylabel("ms per read")
    figure.suptitle(f"Ragged memories, {payload['device']}")
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m bench ragged-read`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, device_choices=None)
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="shortest memory in frames of HW positions")
    common.add_read_shape_arguments(parser, hw=None, objects=4, ck=128, cv=512, dtype=None)
    parser.add_argument("--rounds", type=int, default=9, help="CPU: interleaved timing rounds")
    args = parser.parse_args(argv)
    device = common.apply_device_defaults(args, DEFAULTS)
    payload = common.environment(device)
    payload.update(benchmark="ragged_read", objects=args.objects, hw=args.hw, ck=args.ck,
                   cv=args.cv, dtype=args.dtype,
                   backend="triton" if device.type == "cuda" else "torch",
                   records=run(args, device))
    common.finish_run("ragged_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
