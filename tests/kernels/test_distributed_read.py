"""stm_kernels.distributed: the memory read over a memory sharded across 2 and 3 gloo processes.

Every scenario runs inside one spawned world per world size (CPU, gloo, one thread per
process): each rank builds the whole memory from one seed, keeps its shard, runs the sharded
read and backpropagates the same cotangents as every other rank (a replicated downstream
computation); it checks the merged out/lse, the query gradient and its own shard's gradients
against a float64 single-process read of the shards concatenated in rank order. Each test
below asserts one scenario's outcome on every rank.
"""
import datetime
import functools
import json
import math
import os
import pathlib
import tempfile
import time
import traceback

import pytest
import torch

from bench.common import environment_variable
from helpers import relative_error

WORLD_SIZES = [2, 3]
SHARD_SIZES = [37, 50, 23]  # positions per rank (ragged)
WORLD_TIMEOUT_S = 240


# --------------------------------------------------------------------------- the float64 reference


def reference(q, ks, vs, *, lengths=None, top_k=None, scale=None, similarity="dot",
              cotangents=None):
    """Single-process float64 read over the concatenation (in rank order) of the shards
    ks/vs [(B, C, N_r)] (of their first lengths[r][b] positions for object b), with top_k by
    (score desc, position asc). Returns out, lse, dq, dk [per rank], dv [per rank] and the
    usage [(B, N_r) per rank]."""
    q = q.detach().double().flatten(2).requires_grad_()
    ks = [k.detach().double().flatten(2).requires_grad_() for k in ks]
    vs = [v.detach().double().flatten(2).requires_grad_() for v in vs]
    Bq, Ck, HW = q.shape
    B = ks[0].shape[0]
    scale = 1.0 / math.sqrt(Ck) if scale is None else scale
    outs, lses = [], []
    usage = [torch.zeros(k.shape[0], k.shape[2], dtype=torch.float64) for k in ks]
    for b in range(B):
        counts = [k.shape[2] if lengths is None else int(lengths[r][b]) for r, k in enumerate(ks)]
        key = torch.cat([k[b, :, :n] for k, n in zip(ks, counts, strict=True)], 1)
        value = torch.cat([v[b, :, :n] for v, n in zip(vs, counts, strict=True)], 1)
        query = q[b if Bq > 1 else 0]
        scores = query.T @ key
        if similarity == "l2":
            scores = 2 * scores - (key * key).sum(0)
        scores = scale * scores
        if top_k is not None:
            order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep.scatter_(1, order[:, :top_k], True)
            scores = scores.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(scores, 1)
        probs = torch.exp(scores - lse[:, None])
        outs.append(value @ probs.T)
        lses.append(lse)
        per_position = probs.detach().sum(0)
        start = 0
        for r, n in enumerate(counts):
            usage[r][b, :n] = per_position[start:start + n]
            start += n
    out, lse = torch.stack(outs), torch.stack(lses)
    grad_out, grad_lse = cotangents
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=[k.grad for k in ks],
                dv=[v.grad for v in vs], usage=usage)


# A failed check is recorded, not raised: a rank that left a scenario early would leave the
# others waiting in the scenario's next collective. The worker reports them after the scenario.
FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)


def assert_close(name, actual, expected, bound):
    if tuple(actual.flatten().shape) != tuple(expected.flatten().shape):
        FAILURES.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        return
    error = relative_error(actual.flatten(), expected.flatten())
    check(error <= bound, f"{name}: relative error {error:.2e} > {bound:.0e}")


def make_inputs(world, *, sizes=None, B=2, Bq=2, Ck=12, Cv=20, HW=33, seed=0):
    """Query (Bq, Ck, HW), per-rank key/value shards and cotangents, all float64 and the
    same on every rank."""
    sizes = (sizes or SHARD_SIZES)[:world]
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    ks = [torch.randn(B, Ck, n, generator=generator, dtype=torch.float64) for n in sizes]
    vs = [torch.randn(B, Cv, n, generator=generator, dtype=torch.float64) for n in sizes]
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    return q, ks, vs, cotangents


TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 6e-5)}
TOP_K_FLOAT64 = (1e-10, 1e-10)  # read_selected keeps float64 lse for float64 inputs


def check_read(rank, world, *, dtype=torch.float64, inputs=None, lengths=None, top_k=None,
               similarity="dot", scale=None, usage=False, compare_single=True, **shapes):
    """The sharded read on this rank against the float64 reference (out, lse, dq, own dk/dv,
    own usage) and, without lengths, against one stm_kernels.memory_read on the whole
    memory."""
    from stm_kernels import memory_read as single_read
    from stm_kernels.distributed import memory_read
    q64, ks64, vs64, cotangents = inputs or make_inputs(world, **shapes)
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (q64, ks64[rank],
                                                                          vs64[rank]))
    options = dict(top_k=top_k, similarity=similarity, scale=scale)
    options = {name: value for name, value in options.items() if value is not None}
    results = memory_read(q, k, v, return_lse=True, return_usage=usage,
                          memory_lengths=None if lengths is None else lengths[rank], **options)
    out, lse = results[:2]
    grad_out, grad_lse = (t.to(dtype) for t in cotangents)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    expected = reference(q64, ks64, vs64, lengths=lengths, top_k=top_k, scale=scale,
                         similarity=similarity, cotangents=cotangents)
    forward_bound, grad_bound = TOLERANCES[dtype]
    if top_k is not None and dtype == torch.float64:
        forward_bound, grad_bound = TOP_K_FLOAT64
    check(out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64
                                               else torch.float32), "out/lse dtype")
    assert_close("out", out, expected["out"], forward_bound)
    assert_close("lse", lse, expected["lse"], forward_bound)
    assert_close("dq", q.grad, expected["dq"], grad_bound)
    assert_close(f"dk (rank {rank})", k.grad, expected["dk"][rank], grad_bound)
    assert_close(f"dv (rank {rank})", v.grad, expected["dv"][rank], grad_bound)
    if usage:
        check(results[2].dtype == torch.float32 and not results[2].requires_grad, "usage dtype")
        assert_close(f"usage (rank {rank})", results[2], expected["usage"][rank], 2e-6)
    if compare_single and lengths is None:
        whole = single_read(q64, torch.cat(ks64, 2), torch.cat(vs64, 2), return_lse=True,
                            **options)
        assert_close("out vs one memory_read", out, whole[0], forward_bound)
        assert_close("lse vs one memory_read", lse, whole[1], forward_bound)
    return expected


def needs_topk():
    try:
        from stm_kernels.topk import read_selected, topk_scores  # noqa: F401
    except ImportError:
        raise Skipped("stm_kernels.topk is not available yet") from None


class Skipped(Exception):
    pass


# --------------------------------------------------------------------------- scenarios
# Each runs on every rank of one world; it raises (AssertionError) on a mismatch.


def scenario_dense_float64(rank, world):
    for similarity in ("dot", "l2"):
        check_read(rank, world, similarity=similarity)
        check_read(rank, world, similarity=similarity, Bq=1, B=3, seed=1)


def scenario_dense_float32(rank, world):
    for similarity in ("dot", "l2"):
        check_read(rank, world, dtype=torch.float32, similarity=similarity)


def scenario_layouts_and_scale(rank, world):
    """A (1, Ck, H, W) query shared by B objects, (B, C, T_r, H', W') shards, custom scale."""
    from stm_kernels.distributed import memory_read
    generator = torch.Generator().manual_seed(5)
    frames = [2, 1, 3][:world]
    q = torch.randn(1, 8, 5, 7, generator=generator, dtype=torch.float64)
    ks = [torch.randn(2, 8, t, 3, 4, generator=generator, dtype=torch.float64) for t in frames]
    vs = [torch.randn(2, 10, t, 3, 4, generator=generator, dtype=torch.float64) for t in frames]
    cotangents = (torch.randn(2, 10, 35, generator=generator, dtype=torch.float64),
                  torch.randn(2, 35, generator=generator, dtype=torch.float64))
    query = q.clone().requires_grad_()
    out, lse = memory_read(query, ks[rank], vs[rank], scale=0.3, return_lse=True)
    check(out.shape == (2, 10, 5, 7) and lse.shape == (2, 5, 7), "out/lse shapes")
    expected = reference(q, ks, vs, scale=0.3, cotangents=cotangents)
    assert_close("out", out, expected["out"], 1e-10)
    assert_close("lse", lse, expected["lse"], 1e-10)
    ((out.flatten(2) * cotangents[0]).sum() + (lse.flatten(1) * cotangents[1]).sum()).backward()
    assert_close("dq", query.grad, expected["dq"], 1e-10)


def scenario_memory_lengths(rank, world):
    lengths = [[37, 5], [1, 50], [23, 12]][:world]
    for similarity in ("dot", "l2"):
        check_read(rank, world, lengths=lengths, similarity=similarity)
    check_read(rank, world, lengths=lengths, dtype=torch.float32, usage=True)


def scenario_empty_shard(rank, world):
    """Rank 1 holds no memory (N = 0): it contributes nothing; gradients still flow."""
    sizes = [37, 0, 23]
    check_read(rank, world, sizes=sizes)
    check_read(rank, world, sizes=sizes, dtype=torch.float32, usage=True, similarity="l2")


def scenario_usage(rank, world):
    check_read(rank, world, usage=True)
    check_read(rank, world, usage=True, similarity="l2", Bq=1, seed=2)


def scenario_top_k(rank, world):
    needs_topk()
    for top_k in (1, 7, 45, 500):  # 45 > shards 0 and 2; 500 > the whole memory
        for similarity in ("dot", "l2"):
            check_read(rank, world, top_k=top_k, similarity=similarity, usage=True)
    check_read(rank, world, top_k=6, dtype=torch.float32, Bq=1, seed=3)


def scenario_top_k_concentrated(rank, world):
    """Every query's global top-k lies on rank 0 (its keys are copies of the queries), so the
    other ranks' own top-k candidates are all dropped (their partial lse is -inf)."""
    needs_topk()
    q, ks, vs, cotangents = make_inputs(world, Bq=2, seed=4)
    ks[0][:, :, :q.shape[2]] = 4 * q
    for top_k in (1, 3):
        expected = check_read(rank, world, inputs=(q, ks, vs, cotangents), top_k=top_k,
                              usage=True)
        check(all(u.abs().sum() == 0 for u in expected["usage"][1:]),
              "scenario set-up: the global top-k should lie on rank 0 only")


def scenario_top_k_ties(rank, world):
    """Integer keys (exact scores) with duplicates across shards: ties go to the lower
    position of the concatenated memory, i.e. to the lower rank."""
    needs_topk()
    generator = torch.Generator().manual_seed(6)
    q, ks, vs, cotangents = make_inputs(world, Ck=4, seed=6)
    q = torch.randint(-1, 2, q.shape, generator=generator).double()
    base = torch.randint(-1, 2, ks[0].shape, generator=generator).double()
    ks = [base[:, :, torch.arange(k.shape[2]) % base.shape[2]].clone() for k in ks]
    for top_k in (2, 5, 40):
        check_read(rank, world, inputs=(q, ks, vs, cotangents), top_k=top_k, scale=0.5,
                   usage=True)


def scenario_top_k_lengths(rank, world):
    needs_topk()
    lengths = [[37, 2], [1, 50], [23, 12]][:world]
    for top_k in (3, 30):
        check_read(rank, world, lengths=lengths, top_k=top_k, usage=True)


def scenario_xmem(rank, world):
    """similarity="xmem": each rank's shrinkage shard (B, 1, N_r), the selection replicated;
    against one float64 stm_kernels.memory_read on the whole memory, gradients included."""
    from stm_kernels import memory_read as single_read
    from stm_kernels.distributed import memory_read
    q, ks, vs, (grad_out, grad_lse) = make_inputs(world, Bq=1, seed=7)
    generator = torch.Generator().manual_seed(8)
    shrinkages = [1 + torch.rand(k.shape[0], 1, k.shape[2], generator=generator,
                                 dtype=torch.float64) for k in ks]
    selection = torch.rand(q.shape, generator=generator, dtype=torch.float64)
    for top_k in (None, 9):
        if top_k is not None:
            needs_topk()
        leaves = [t.clone().requires_grad_() for t in (q, ks[rank], vs[rank], shrinkages[rank],
                                                       selection)]
        out, lse, usage = memory_read(*leaves[:3], similarity="xmem", shrinkage=leaves[3],
                                      selection=leaves[4], top_k=top_k, return_lse=True,
                                      return_usage=True)
        ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
        whole = [torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(shrinkages, 2)]
        whole = [t.clone().requires_grad_() for t in [q] + whole + [selection]]
        expected = single_read(*whole[:3], similarity="xmem", shrinkage=whole[3],
                               selection=whole[4], top_k=top_k, return_lse=True,
                               return_usage=True)
        ((expected[0] * grad_out).sum() + (expected[1] * grad_lse).sum()).backward()
        bound = 1e-10 if top_k is None else TOP_K_FLOAT64[0]
        start = sum(k.shape[2] for k in ks[:rank])
        own = slice(start, start + ks[rank].shape[2])
        assert_close("out", out, expected[0], bound)
        assert_close("lse", lse, expected[1], bound)
        assert_close("usage", usage, expected[2][:, own], 2e-6)
        for name, leaf, reference_leaf in zip(("dq", "dk", "dv", "dshrinkage", "dselection"),
                                              leaves, whole, strict=True):
            reference_grad = reference_leaf.grad
            if name in ("dk", "dv", "dshrinkage"):
                reference_grad = reference_grad[:, :, own]
            assert_close(f"{name} (top_k={top_k})", leaf.grad, reference_grad, bound)


def scenario_errors(rank, world):
    """Errors are raised on every rank (no rank left waiting), and the group stays usable."""
    import torch.distributed as dist
    from stm_kernels.distributed import memory_read
    q, ks, vs, _ = make_inputs(world)
    k, v = ks[rank], vs[rank]

    def expect(exception, words, *args, **kwargs):
        try:
            memory_read(*args, **kwargs)
        except exception as error:
            for word in words:
                check(word in str(error), f"{word!r} not in {error}")
        else:
            FAILURES.append(f"no {exception.__name__} for {words}")

    # a query of another shape on rank 1
    query = q[:, :, :30] if rank == 1 else q
    expect(ValueError, ["query_key", "rank 1: (2, 12, 30)"], query, k, v)
    # the same shape, other values
    query = q + 1 if rank == 1 else q
    expect(ValueError, ["query_key differs across ranks"], query, k, v)
    # an invalid shard on rank 1 only: rank 1 gets its own error, the others name rank 1
    value = v[:, :, :-1] if rank == 1 else v
    expect(ValueError, ["memory_value_shard"] + (["on rank 1"] if rank != 1 else []), q, k,
           value)
    # an option that differs
    expect(ValueError, ["scale must be the same on every rank"], q, k, v,
           scale=0.5 if rank == 0 else None)
    # objects that differ
    expect(ValueError, ["memory_key_shard must have the same (B, Ck)"], q[:1],
           k[:1] if rank == 0 else k, v[:1] if rank == 0 else v)
    # memory_lengths out of range on one rank (the op's own check, raised on every rank)
    lengths = [k.shape[2] + 1, 1] if rank == world - 1 else None
    expect(ValueError, ["memory_lengths"], q, k, v, memory_lengths=lengths)
    # no memory anywhere
    expect(ValueError, ["the sharded memory is empty"], q, k[:, :, :0], v[:, :, :0])
    # requires_grad that differs would deadlock the backward: refused
    expect(ValueError, ["query_key.requires_grad"], q.clone().requires_grad_(rank == 0), k, v)
    # the group still works
    flag = torch.ones(1)
    dist.all_reduce(flag)
    check(flag.item() == world, "all_reduce after the errors")
    check_read(rank, world)


def scenario_merge_across_ranks(rank, world):
    """The merge alone, from reads each rank computed itself (chunked), and an empty rank."""
    from stm_kernels import memory_read as single_read
    from stm_kernels.distributed import merge_across_ranks
    sizes = [37, 0, 23]
    q, ks, vs, cotangents = make_inputs(world, sizes=sizes)
    if ks[rank].shape[2]:
        reads = [single_read(q, k, v, return_lse=True)
                 for k, v in zip(ks[rank].split(10, 2), vs[rank].split(10, 2), strict=True)]
        from stm_kernels import merge_reads
        out, lse = merge_reads(*zip(*reads, strict=True))
    else:
        out = torch.zeros(2, 20, 33, dtype=torch.float64)
        lse = torch.full((2, 33), -math.inf, dtype=torch.float64)
    merged, merged_lse = merge_across_ranks(out, lse)
    expected = reference(q, ks, vs, cotangents=cotangents)
    assert_close("out", merged, expected["out"], 1e-10)
    assert_close("lse", merged_lse, expected["lse"], 1e-10)
    try:
        merge_across_ranks(out[:, :, :5] if rank == 0 else out, lse[:, :5] if rank == 0 else lse)
        FAILURES.append("no ValueError for outs of different shapes")
    except ValueError as error:
        check("out must have the same shape" in str(error), str(error))


def scenario_memory_bank(rank, world):
    """MemoryBank(shard_memory=True) against one unsharded bank after every add: round-robin
    slots, storage growth past 16 frames per rank, FIFO eviction, put() on a held frame,
    offload, and the first reads (when some ranks hold no frame yet)."""
    from stm_model import MemoryBank
    generator = torch.Generator().manual_seed(9)
    for options in (dict(), dict(max_frames=7), dict(offload=True, chunk_frames=3)):
        sharded = MemoryBank(2, 4, 6, 2, 3, shard_memory=True, **options)
        single = MemoryBank(2, 4, 6, 2, 3, **options)
        for t in range(80 if not options else 15):
            keys = torch.randn(2, 4, 2, 3, generator=generator)
            values = torch.randn(2, 6, 2, 3, generator=generator)
            permanent = t % 3 != 1
            for bank in (sharded, single):
                bank.add(keys, values, permanent, t)
            if t == 5:  # overwrite a held frame (an interactive round)
                for bank in (sharded, single):
                    bank.put(values[:, :4], keys.repeat(1, 2, 1, 1)[:, :6], 0)
            query = torch.randn(1, 4, 2, 3, generator=generator)
            error = relative_error(sharded.read(query), single.read(query))
            check(error < 1e-6, f"{options} frame {t}: relative error {error:.1e}")
            check(sharded.local_frames == len(range(rank, single.num_frames, world)),
                  f"{options} frame {t}: {sharded.local_frames} local frames")
        if not options:  # the storage grew (16 frames per rank at first)
            check(sharded.capacity >= sharded.local_frames > 16,
                  f"capacity {sharded.capacity}, {sharded.local_frames} local frames")


def scenario_segmenter(rank, world):
    """VideoSegmenter(shard_memory=True): the probabilities of one process (float32
    rounding), with growth, eviction (max_memory_frames) and offload."""
    from helpers import synthetic_video
    from stm_model import VideoSegmenter
    from stm_model.demo import load_small_model
    model = load_small_model()
    frames, labels = synthetic_video(9, size=(48, 64))
    for options in (dict(mem_every=2), dict(mem_every=1, max_memory_frames=4, offload=True,
                                            offload_chunk_frames=1)):
        sharded = VideoSegmenter(model, shard_memory=True, **options)
        single = VideoSegmenter(model, **options)
        for t, frame in enumerate(frames):
            mask = torch.from_numpy(labels[0]) if t == 0 else None
            mask = torch.from_numpy(labels[4]) if t == 4 else mask  # a reset mid-video
            expected = single.step(frame, mask)
            actual = sharded.step(frame, mask)
            error = (actual - expected).abs().max().item()
            check(error < 2e-5, f"frame {t} {options}: max difference {error:.2e}")
        check(sharded.memory_frames == single.memory_frames, "memory frames")
        bank, plain = sharded.banks[0], single.banks[0]
        expected_local = len(range(rank, plain.num_frames, world))
        check(bank.local_frames == expected_local, f"local frames {bank.local_frames} != "
              f"{expected_local}")


SCENARIOS = {name[len("scenario_"):]: function for name, function in globals().items()
             if name.startswith("scenario_")}


# --------------------------------------------------------------------------- the spawned world


def _worker(rank, world, init_file, result_dir):
    import torch.distributed as dist
    from stm_kernels import poison_outputs
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    outcomes = {}
    try:
        with poison_outputs():
            for name, scenario in SCENARIOS.items():
                tick = time.perf_counter()
                FAILURES.clear()
                try:
                    scenario(rank, world)
                    outcome = dict(status="fail", message="\n".join(FAILURES)) if FAILURES \
                        else dict(status="ok")
                except Skipped as skipped:
                    outcome = dict(status="skip", message=str(skipped))
                except BaseException:  # noqa: B902 (reported to the parent)
                    outcome = dict(status="fail", message=traceback.format_exc())
                outcome["seconds"] = time.perf_counter() - tick
                outcomes[name] = outcome
                dist.barrier()  # scenarios start together even after a failure
    finally:
        pathlib.Path(result_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    # Results are written: skip the interpreter's shutdown, where a gloo or autograd worker
    # thread can abort the process ("terminate called without an active exception").
    os._exit(0)


@functools.lru_cache(maxsize=None)
def world_outcomes(world):
    """{scenario: [outcome per rank]} of one spawned gloo world of `world` processes."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "init")
        with environment_variable("OMP_NUM_THREADS", "1"):
            context = mp.start_processes(_worker, args=(world, init_file, directory),
                                         nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + WORLD_TIMEOUT_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"the {world}-process world did not finish in "
                                   f"{WORLD_TIMEOUT_S} s")
        per_rank = [json.loads(pathlib.Path(directory, f"rank{r}.json").read_text())
                    for r in range(world)]
    return {name: [outcomes.get(name, dict(status="fail", message="not run"))
                   for outcomes in per_rank] for name in SCENARIOS}


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sharded_read(scenario, world):
    outcomes = world_outcomes(world)[scenario]
    failures = [f"rank {rank}:\n{outcome['message']}" for rank, outcome in enumerate(outcomes)
                if outcome["status"] == "fail"]
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
    if any(outcome["status"] == "skip" for outcome in outcomes):
        pytest.skip(outcomes[0].get("message", "skipped"))


def test_single_process_without_torch_distributed():
    """Without an initialised process group the sharded read is one process holding the whole
    memory: stm_kernels.memory_read itself (errors included)."""
    from stm_kernels import memory_read as single_read
    from stm_kernels.distributed import memory_read
    q, ks, vs, _ = make_inputs(1)
    out, lse = memory_read(q, ks[0], vs[0], return_lse=True)
    expected_out, expected_lse = single_read(q, ks[0], vs[0], return_lse=True)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    with pytest.raises(ValueError, match="sharded memory is empty"):
        memory_read(q, ks[0][:, :, :0], vs[0][:, :, :0])
    with pytest.raises(ValueError, match="top_k"):
        memory_read(q, ks[0], vs[0], top_k=0)
    with pytest.raises(RuntimeError, match="not initialised"):
        memory_read(q, ks[0], vs[0], group=object())


def test_sharded_read_benchmark_records_and_renders(tmp_path, monkeypatch, capsys):
    """bench/sharded_read.py on tiny sizes: 1 and 2 gloo processes, records, errors, plot."""
    from bench import sharded_read
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    assert sharded_read.main(["--device", "cpu", "--processes", "1", "2", "--frames", "2", "3",
                              "--hw", "16", "--ck", "16", "--cv", "32", "--top-k", "4",
                              "--rounds", "2"]) == 0
    [path] = tmp_path.glob("sharded_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    assert {(r["processes"], r["frames"], r["variant"]) for r in payload["records"]} == {
        (w, f, v) for w in (1, 2) for f in (2, 3) for v in sharded_read.VARIANTS}
    for record in payload["records"]:
        assert record["q20_ms"] <= record["median_ms"] <= record["q80_ms"]
        expected = len(range(0, record["frames"], record["processes"])) * 16
        assert record["shard_positions"] == expected
    for errors in payload["errors"]:
        assert max(value for name, value in errors.items() if " " in name) < 1e-5
    out = capsys.readouterr().out
    assert "| 3 / 48 | 2 | 32 |" in out
    assert sharded_read.summary(payload) in out
