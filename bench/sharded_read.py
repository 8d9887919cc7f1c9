"""Sharded memory read: one memory spread over 1-3 processes (torch.distributed), read by all.

    python -m bench sharded-read                        # CPU: gloo, 1, 2 and 3 processes
    python -m bench sharded-read --frames 8 32 --processes 1 2

One query frame (HW positions) reads a memory of T frames. With W processes, rank r holds the
frames r, r + W, ... (as MemoryBank(shard_memory=True) stores them) and every rank reads the
whole memory with stm_kernels.distributed.memory_read. Timed per W (rank 0's wall time per
call, each call preceded by a barrier; variants interleaved round by round):
    shard-only      stm_kernels.memory_read over the rank's own shard: the compute alone
    sharded         the sharded read: the shard's read, the check of shapes across ranks (one
                    small all-gather), the all-gather of (out, lse) and the merge
    sharded top-k   the same with top_k (the candidates' all-gather, the global top-k, the
                    read of the selected positions)
    sharded fwd+bwd forward and backward (query and shard gradients; one all-reduce of dQ)
The one-process reference is shard-only with W = 1 (a plain memory_read of the whole memory).
Overhead = sharded - shard-only. Correctness: the relative error of every rank's out and lse
(dense and top-k) against one memory_read of the whole memory in one process.
CPU: gloo, each process runs --threads threads (default 1: W processes use W cores; the
reference runs with as many threads as one process). CUDA: NCCL, rank r on cuda:r, W up to the
number of GPUs. Writes bench/results/sharded_read_<device>_<date>.json and a PNG beside it.
"""
import datetime
import json
import os
import pathlib
import statistics
import tempfile
import time

import torch

from bench import common
from stm_kernels.options import DTYPES
from stm_kernels.selftest import relative_error

VARIANTS = ("shard-only", "sharded", "sharded top-k", "sharded fwd+bwd")
DEFAULTS = {"cuda": dict(hw=1620, frames=(50, 200), dtype="bf16"),
            "cpu": dict(hw=405, frames=(6, 24), dtype="fp32")}


def _inputs(args, frames, device, rank, world):
    """Query (1, Ck, HW), the whole memory (B, C, T, HW) and this rank's frames r, r+W, ..."""
    generator = torch.Generator().manual_seed(frames)
    dtype = DTYPES[args.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)
    q = randn(1, args.ck, args.hw)
    k = randn(args.objects, args.ck, frames, args.hw)
    v = randn(args.objects, args.cv, frames, args.hw)
    mine = torch.arange(rank, frames, world, device=device)
    return q, k, v, k[:, :, mine].flatten(2), v[:, :, mine].flatten(2)


def _calls(args, q, k_shard, v_shard, backend):
    from stm_kernels import memory_read
    from stm_kernels.distributed import memory_read as sharded_read
    q_grad = q.detach().clone().requires_grad_()
    k_grad = k_shard.detach().clone().requires_grad_()
    v_grad = v_shard.detach().clone().requires_grad_()

    def forward_backward():
        q_grad.grad = k_grad.grad = v_grad.grad = None
        out, lse = sharded_read(q_grad, k_grad, v_grad, backend=backend, return_lse=True)
        (out.float().sum() + lse.sum()).backward()

    calls = {
        "shard-only": lambda: memory_read(q, k_shard, v_shard, backend=backend),
        "sharded": lambda: sharded_read(q, k_shard, v_shard, backend=backend),
        "sharded top-k": lambda: sharded_read(q, k_shard, v_shard, backend=backend,
                                              top_k=args.top_k),
        "sharded fwd+bwd": forward_backward,
    }
    return {name: calls[name] for name in VARIANTS}


def _timed(calls, device, rounds):
    """{name: per-call ms} on this rank; every call starts after a barrier."""
    import torch.distributed as dist

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
    for fn in calls.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            synchronize()
            tick = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - tick) * 1e3)
    return times


def _errors(args, q, k, v, k_shard, v_shard, backend):
    """Relative errors of this rank's sharded out/lse (dense and top-k) against one read of
    the whole memory."""
    from stm_kernels import memory_read
    from stm_kernels.distributed import memory_read as sharded_read
    with torch.no_grad():
        whole_k, whole_v = k.flatten(2), v.flatten(2)
        errors = {}
        for name, options in (("dense", {}), ("top-k", dict(top_k=args.top_k))):
            expected = memory_read(q, whole_k, whole_v, backend=backend, return_lse=True,
                                   **options)
            actual = sharded_read(q, k_shard, v_shard, backend=backend, return_lse=True,
                                  **options)
            errors[f"{name} out"] = relative_error(actual[0], expected[0])
            errors[f"{name} lse"] = relative_error(actual[1], expected[1])
    return errors


def _worker(rank, world, init_file, result_dir, args):
    import torch.distributed as dist
    cuda = args.device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=2))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    backend = "triton" if cuda else "torch"
    records, errors = [], []
    try:
        for frames in args.frames:
            q, k, v, k_shard, v_shard = _inputs(args, frames, device, rank, world)
            times = _timed(_calls(args, q, k_shard, v_shard, backend), device, args.rounds)
            medians = {name: statistics.median(values) for name, values in times.items()}
            every_rank = [None] * world
            dist.all_gather_object(every_rank, medians)
            for name, values in times.items():
                quantiles = statistics.quantiles(values, n=5) if len(values) > 1 else values * 4
                records.append(dict(
                    processes=world, frames=frames, positions=frames * args.hw,
                    shard_positions=k_shard.shape[2], variant=name, median_ms=medians[name],
                    q20_ms=quantiles[0], q80_ms=quantiles[3],
                    rank_medians_ms=[m[name] for m in every_rank]))
            found = _errors(args, q, k, v, k_shard, v_shard, backend)
            every_rank = [None] * world
            dist.all_gather_object(every_rank, found)
            errors.append(dict(processes=world, frames=frames, **{
                name: max(e[name] for e in every_rank) for name in found}))
            if rank == 0:
                print(f"{world} processes, {frames:4} frames: " + "  ".join(
                    f"{name} {medians[name]:.2f} ms" for name in VARIANTS), flush=True)
    finally:
        if rank == 0:
            pathlib.Path(result_dir, "rank0.json").write_text(
                json.dumps(dict(records=records, errors=errors)))
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    # Results are written: skip the interpreter's shutdown, where a gloo or autograd worker
    # thread can abort the process ("terminate called without an active exception").
    os._exit(0)


def run_world(args, world):
    """Spawn `world` processes running _worker; rank 0's records and errors."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as directory:
        with common.environment_variable("OMP_NUM_THREADS", str(args.threads)):
            mp.start_processes(_worker, args=(world, os.path.join(directory, "init"), directory,
                                              args),
                               nprocs=world, join=True, start_method="spawn")
        return json.loads(pathlib.Path(directory, "rank0.json").read_text())


def summary(payload):
    """Markdown table: per memory and world size, each variant's time, the overhead, the
    speed-up over one process and the errors."""
    times = {(r["processes"], r["frames"], r["variant"]): r["median_ms"]
             for r in payload["records"]}
    errors = {(e["processes"], e["frames"]): e for e in payload["errors"]}
    rows = ["| memory (frames / positions) | processes | positions per rank | shard-only ms | "
            "sharded ms | overhead ms | sharded top-k ms | sharded fwd+bwd ms | "
            "speed-up vs one process | rel. error out / lse / top-k out |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for frames in sorted({r["frames"] for r in payload["records"]}):
        single = times.get((1, frames, "shard-only"))
        for world in sorted({r["processes"] for r in payload["records"]
                             if r["frames"] == frames}):
            record = next(r for r in payload["records"]
                          if r["processes"] == world and r["frames"] == frames)
            shard, sharded = times[(world, frames, "shard-only")], times[(world, frames,
                                                                          "sharded")]
            error = errors[(world, frames)]
            speed_up = f"{single / sharded:.2f}" if single else "-"
            rows.append(
                f"| {frames} / {record['positions']} | {world} | {record['shard_positions']} | "
                f"{shard:.2f} | {sharded:.2f} | {sharded - shard:+.2f} | "
                f"{times[(world, frames, 'sharded top-k')]:.2f} | "
                f"{times[(world, frames, 'sharded fwd+bwd')]:.2f} | {speed_up} | "
                f"{error['dense out']:.1e} / {error['dense lse']:.1e} / "
                f"{error['top-k out']:.1e} |")
    rows.append(
        f"\n{payload['objects']} object(s), HW = {payload['hw']}, Ck = {payload['ck']}, "
        f"Cv = {payload['cv']}, {payload['dtype']}, top_k = {payload['top_k']}, read backend "
        f"{payload['backend']}, {payload['comm_backend']}; {payload['threads']} thread(s) per "
        f"process on {payload['cpu_count']} cores"
        + (f" (1-minute load average {payload['load_average'][0]:.1f} before the run, "
           f"{payload['load_average'][1]:.1f} after)" if "load_average" in payload else "")
        + ". Rank 0's median per call (each after a "
        "barrier); speed-up = one process's plain memory_read of the whole memory / sharded. "
        "Errors: max over ranks, against that one-process read.")
    return "\n".join(rows)


def plot(payload, path):
    """Time per variant against the number of processes; returns [path]."""
    figure, by_frames = common.panels(sorted({r["frames"] for r in payload["records"]}), 4.8)
    for axis, count in by_frames:
        worlds = sorted({r["processes"] for r in payload["records"] if r["frames"] == count})
        for index, variant in enumerate(VARIANTS):
            values = [next(r["median_ms"] for r in payload["records"] if r["frames"] == count
                           and r["processes"] == w and r["variant"] == variant) for w in worlds]
            axis.plot(worlds, values, marker="o", color=f"C{index}", label=variant)
        single = [r["median_ms"] for r in payload["records"] if r["frames"] == count and
                  r["processes"] == 1 and r["variant"] == "shard-only"]
        if single:
            axis.axhline(single[0], color="gray", linestyle="--", label="one process")
        axis.set_xticks(worlds)
        axis.set_xlabel("processes")
        axis.set_ylabel("ms per read (rank 0)")
        axis.set_title(f"{count} memory frames ({count * payload['hw']} positions)")
        axis.set_ylim(bottom=0)
    by_frames[0][0].legend(fontsize=8)
    figure.suptitle(f"Sharded memory read, {payload['device']} ({payload['comm_backend']})")
    return common.save_figure(figure, path)


def _parse_options(argv):
    """(options with the device's defaults filled in, device); SystemExit when a process would
    hold no memory frame or, on CUDA, have no GPU of its own."""
    parser = common.benchmark_parser(__doc__, device_choices=None)
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help="world sizes (default: 1 2 3 on CPU; 1..GPUs on CUDA)")
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="memory frames of HW positions")
    common.add_read_shape_arguments(parser, hw=None, objects=1, ck=128, cv=512, dtype=None,
                                    top_k=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per variant")
    args = parser.parse_args(argv)
    device = common.apply_device_defaults(args, DEFAULTS)
    args.device_type = device.type
    if args.processes is None:
        args.processes = [1, 2, 3] if device.type == "cpu" else \
            list(range(1, torch.cuda.device_count() + 1))
    if min(args.frames) < max(args.processes):
        raise SystemExit(f"--frames {args.frames}: every process needs at least one frame "
                         f"(--processes {args.processes})")
    if device.type == "cuda" and max(args.processes) > torch.cuda.device_count():
        raise SystemExit(f"NCCL needs one GPU per process: {torch.cuda.device_count()} GPU(s) "
                         f"for --processes {args.processes}")
    return args, device


def main(argv=None):
    """`python -m bench sharded-read`; returns the exit code."""
    args, device = _parse_options(argv)
    records, errors = [], []
    load_before = os.getloadavg()[0]
    for world in args.processes:
        result = run_world(args, world)
        records += result["records"]
        errors += result["errors"]
    payload = common.environment(device)
    payload.update(benchmark="sharded_read", objects=args.objects, hw=args.hw, ck=args.ck,
                   cv=args.cv, dtype=args.dtype, top_k=args.top_k, threads=args.threads,
                   cpu_count=os.cpu_count(), processes=args.processes,
                   backend="triton" if device.type == "cuda" else "torch",
                   comm_backend="nccl" if device.type == "cuda" else "gloo",
                   load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                   records=records, errors=errors)
    common.finish_run("sharded_read", payload, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
