"""The memory read over a memory sharded across processes (torch.distributed).

    from stm_kernels.distributed import memory_read
    # every rank: the same query; its own shard of the memory (positions of its own)
    out, lse = memory_read(query_key, memory_key_shard, memory_value_shard, return_lse=True)

The result equals one `stm_kernels.memory_read` over the shards concatenated in rank order
(rank 0's positions first), on every rank. Each rank reads its shard with
`stm_kernels.memory_read(..., return_lse=True)`; the partial reads (out, lse) are all-gathered
and merged exactly by their log-sum-exp (the math of `stm_kernels.merge_reads`). With top_k,
the softmax runs over each query's top_k largest scores of the whole memory (not per shard):
each rank's top_k candidates are all-gathered, every rank picks the global top_k and reads the
ones that lie in its shard (`stm_kernels.topk.read_selected`), and those reads are merged.

Collectives per call: one small all-gather of shapes and options (inputs are checked across
ranks, and an error on any rank is raised on every rank instead of leaving the others waiting),
one all-gather of the partial reads (out, lse), with top_k one more of the candidates. The
backward all-reduces the query's gradient when the query requires one.

Gradient convention (as tensor parallelism): the downstream computation is replicated, i.e.
every rank uses the merged result the same way (same loss, same gradient of the result). Then
each rank gets the gradient of its own shard (memory_key_shard, memory_value_shard) and the
full gradient of the query (the sum over ranks of the shards' contributions, all-reduced), the
gradients of one single-process read. Every rank must call backward (it is collective).

`merge_across_ranks(out, lse)` is the merge alone, for a rank that computes its partial read
itself (e.g. a memory offloaded to CPU and read chunk by chunk).
"""
import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from .options import SIMILARITIES, Backend, Similarity
from .memory_read import Lengths, Memory
from .memory_read import memory_read as _shard_read
from .merge import merge_reads
from .torch_common import accumulation_dtype

# relative tolerance of the query fingerprint (sum and sum of squares) across ranks
_QUERY_TOLERANCE = 1e-3
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def memory_read(query_key: torch.Tensor, memory_key_shard: torch.Tensor,
                memory_value_shard: torch.Tensor, group: Optional[dist.ProcessGroup] = None, *,
                scale: Optional[float] = None, similarity: Similarity = "dot",
                backend: Backend = "auto", return_lse: bool = False,
                memory_lengths: Optional[Lengths] = None, top_k: Optional[int] = None,
                return_usage: bool = False, shrinkage: Optional[Memory] = None,
                selection: Optional[torch.Tensor] = None, check_query: bool = True
                ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Space-time memory read over a memory sharded across the ranks of a process group.

    Every rank of `group` calls it with the same query (and options) and its own shard of the
    memory; every rank gets the read over the whole memory: equal (to float rounding) to one
    `stm_kernels.memory_read` over the shards concatenated along N in rank order.

    Args:
        query_key: (B or 1, Ck, HW) or (B or 1, Ck, H, W), the same on every rank.
        memory_key_shard: this rank's memory keys, (B, Ck, N_r) or (B, Ck, T_r, H', W'). The
            number of positions N_r may differ between ranks and may be 0 on some ranks (an
            empty shard contributes nothing); the whole memory must hold at least one position.
        memory_value_shard: this rank's values, (B, Cv, *M) with memory_key_shard's layout *M.
        group: the process group (default: the default group). Without an initialised
            torch.distributed (and group=None) this is a single process holding the whole
            memory.
        scale, similarity, backend: as `stm_kernels.memory_read` (backend applies to the
            rank's own read).
        return_lse: also return the log-sum-exp of the scores over the whole memory (B, *Q).
        memory_lengths: this rank's (B,) lengths in [1, N_r] (`stm_kernels.memory_read`'s
            ragged memories, per shard; None or zeros on an empty shard): object b reads the
            first memory_lengths[b] positions of each rank's shard, i.e. the concatenation of
            those prefixes in rank order.
        top_k: softmax over each query's top_k largest scores of the whole memory (ties go to
            the lower position in the concatenated memory), as `memory_read(..., top_k=...)`.
        return_usage: also return this rank's shard usage (B, N_r) float32: per memory
            position, the sum over queries of its probability under the global softmax (not
            differentiable).
        shrinkage: the memory-side term of similarity="xmem", this rank's shard of it.
        selection: the query-side term of similarity="xmem", the same on every rank.
        check_query: compare a fingerprint of query_key across ranks (its sum and sum of
            squares, to a relative 1e-3) and raise ValueError when the ranks' queries differ.

    Returns:
        out (B, Cv, *Q) in the memory's dtype; then lse (B, *Q) float32 (float64 for float64
        memories) if return_lse; then this rank's usage (B, N_r) if return_usage. The same out
        and lse on every rank.

    Gradients: with a replicated downstream computation (every rank computes the same loss
    from the result), each rank gets its own shard's gradients and the whole query gradient
    (all-reduced in backward: every rank must backpropagate). Raises ValueError/TypeError on
    every rank when one rank's input is invalid or the ranks' inputs disagree.
    """
    comm = _Comm(group)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or
                              top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
    options = _read_options(scale, similarity, shrinkage)
    usage_options = dict(options, selection=selection, backend=backend)
    # 1. this rank's part (its read, or its top-k candidates); an error is held back and
    #    raised on every rank after the all-gather of shapes, so that no rank waits forever
    shard: Any = None  # set inside the try: an error on this rank is raised on every rank
    selected: Any = None
    local: Any = None
    error, q, selection_r = None, None, selection
    try:
        shard = _Shard.checked(query_key, memory_key_shard, memory_value_shard, selection)
        q, selection_r = comm.replicated(shard.q, selection)
        if selection is not None:
            options["selection"] = selection_r
        if shard.n == 0:
            if memory_lengths is not None and torch.as_tensor(memory_lengths).any():
                raise ValueError("memory_lengths must be None (or zeros) on a rank whose "
                                 "memory shard is empty")
        elif top_k is None:
            local = _shard_read(q, shard.k, shard.v, backend=backend, return_lse=True,
                                memory_lengths=memory_lengths, **options)
        else:
            from .topk import topk_scores
            local = topk_scores(shard.q.detach(), shard.k.detach(), top_k, backend=backend,
                                memory_lengths=memory_lengths, **_detached(options))
    except (ValueError, TypeError, RuntimeError) as caught:
        error = caught
    # 2. shapes and options agree across ranks (one small all-gather)
    meta = comm.check_inputs(shard, error, query_key=query_key, scale=scale,
                             similarity=similarity, top_k=top_k, return_usage=return_usage,
                             shrinkage=shrinkage, selection=selection, check_query=check_query,
                             comm=comm)
    # 3. with top_k: the global top-k (one all-gather of the candidates), read on this shard
    B, Cv, HW = meta.batch, meta.value_dim, meta.query_positions
    error, selected = None, None
    try:
        if top_k is not None:
            selected = _global_top_k(comm, meta, local, shard, top_k)
        if shard.n == 0:
            local = _empty_read(q, shard, selection_r, B, HW)
        elif top_k is not None:
            from .topk import read_selected
            local = read_selected(q, shard.k, shard.v, selected.local_indices, return_lse=True,
                                  **options)
        out_r, lse_r = local
    except (ValueError, TypeError, RuntimeError) as caught:
        error = caught
        out_r = shard.v.new_zeros((B, Cv, HW))
        lse_r = torch.zeros((B, HW), dtype=accumulation_dtype(shard.v.dtype),
                            device=shard.v.device)
    # 4. the exact merge of every rank's (out, lse) (one all-gather)
    out, lse = comm.merge(out_r, lse_r, error)
    results = [out.to(shard.v.dtype).unflatten(2, shard.query_spatial)]
    if return_lse:
        results.append(lse.unflatten(1, shard.query_spatial))
    if return_usage:
        results.append(_usage(shard, lse.detach(), selected, usage_options, memory_lengths))
    return results[0] if len(results) == 1 else tuple(results)


def merge_across_ranks(out: torch.Tensor, lse: torch.Tensor,
                       group: Optional[dist.ProcessGroup] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every rank's partial read of one query into the read over all ranks' memories.

    Args:
        out: this rank's read (B, Cv, *Q) over its own memory, as `stm_kernels.memory_read`
            returns it; a rank without memory passes zeros.
        lse: its log-sum-exp (B, *Q) (`return_lse=True`); -inf on a rank without memory.
        group: the process group (default: the default group).

    Returns:
        (out, lse) over all ranks' memories, on every rank: out in out's dtype, lse float32
        (float64 for float64). Differentiable with the module's convention (a replicated
        downstream computation): the gradient reaching each rank's (out, lse) is the gradient
        of the merged result for its own partial read. A tensor replicated on every rank that
        fed the partial reads (the query) must have its gradient all-reduced by the caller.
    """
    comm = _Comm(group)
    error, row = None, [math.nan] * 10
    if not isinstance(out, torch.Tensor) or not isinstance(lse, torch.Tensor) or \
            not 3 <= out.dim() <= 8 or lse.shape != out.shape[:1] + out.shape[2:] or \
            not out.is_floating_point() or not lse.is_floating_point():
        error = ValueError(
            "merge_across_ranks expects a float out (B, Cv, *Q) and lse (B, *Q); got "
            f"{_shape_of(out)} and {_shape_of(lse)}")
    else:
        try:
            comm.device_for(out.device)
            row = [0.0, out.dim()] + list(out.shape) + [-1] * (8 - out.dim())
        except ValueError as caught:
            error = caught
    rows = comm.gather_rows(row, error)
    if len({tuple(r) for r in rows[:, 1:].tolist()}) > 1:
        raise ValueError("out must have the same shape on every rank; got " + ", ".join(
            f"rank {r}: {tuple(int(d) for d in rows[r, 2:2 + int(rows[r, 1])])}"
            for r in range(len(rows))))
    spatial = out.shape[2:]
    merged, merged_lse = comm.merge(out.flatten(2), lse.flatten(1), None)
    return merged.to(out.dtype).unflatten(2, spatial), merged_lse.unflatten(1, spatial)


# --------------------------------------------------------------------------- the rank's shard


class _Shard:
    """This rank's inputs as q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N) views."""

    @classmethod
    def checked(cls, query_key, memory_key, memory_value, selection):
        for name, tensor in (("query_key", query_key), ("memory_key_shard", memory_key),
                             ("memory_value_shard", memory_value)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 "
                                f"tensor; got {tensor.dtype}")
        if query_key.dim() not in (3, 4):
            raise ValueError("query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W);"
                             f" got shape {tuple(query_key.shape)}")
        if memory_key.dim() not in (3, 5) or memory_value.dim() != memory_key.dim() or \
                memory_value.shape[0] != memory_key.shape[0] or \
                memory_value.shape[2:] != memory_key.shape[2:]:
            raise ValueError(
                "memory_key_shard and memory_value_shard must have shapes (B, Ck, N) and "
                "(B, Cv, N) (or (B, C, T, H, W) with one layout); got "
                f"{tuple(memory_key.shape)} and {tuple(memory_value.shape)}")
        B, Ck = memory_key.shape[:2]
        if query_key.shape[0] not in (1, B) or query_key.shape[1] != Ck:
            raise ValueError(f"query_key must have shape (B={B} or 1, Ck={Ck}, ...) to match "
                             f"memory_key_shard {tuple(memory_key.shape)}; got shape "
                             f"{tuple(query_key.shape)}")
        if selection is not None and not isinstance(selection, torch.Tensor):
            raise TypeError(f"selection must be a torch.Tensor; got {type(selection).__name__}")
        if selection is not None and selection.device != query_key.device:
            raise ValueError(f"selection must be on query_key's device ({query_key.device}); "
                             f"got {selection.device}")
        shard = cls()
        shard.query_key = query_key
        shard.query_spatial = query_key.shape[2:]
        shard.q = query_key.flatten(2)
        shard.k, shard.v = memory_key.flatten(2), memory_value.flatten(2)
        shard.n = shard.k.shape[2]
        return shard


def _read_options(scale, similarity, shrinkage):
    """The options every per-shard call takes (selection is added once replicated)."""
    options = dict(scale=scale, similarity=similarity)
    if shrinkage is not None:
        options["shrinkage"] = shrinkage
    return options


def _detached(options):
    return {name: value.detach() if isinstance(value, torch.Tensor) else value
            for name, value in options.items()}


def _shape_of(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class _EmptyShard(torch.autograd.Function):
    """The read of an empty shard: out 0, lse -inf; zero gradients (so that the query's
    replicated-gradient all-reduce still runs on this rank)."""

    @staticmethod
    def forward(ctx, q, k, v, B, HW, *extra):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in (q, k, v) + extra]
        out = v.new_zeros((B, v.shape[1], HW))
        lse = torch.full((B, HW), -math.inf, dtype=accumulation_dtype(v.dtype), device=v.device)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        grads = [torch.zeros(shape, dtype=dtype, device=device)
                 for shape, dtype, device in ctx.shapes]
        return (*grads[:3], None, None, *grads[3:])


def _empty_read(q, shard, selection, B, HW):
    extra = (selection,) if isinstance(selection, torch.Tensor) else ()
    return _EmptyShard.apply(q, shard.k, shard.v, B, HW, *extra)


# --------------------------------------------------------------------------- collectives


class _Comm:
    """The process group, its rank and size, and the device its collectives run on."""

    def __init__(self, group):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.device = torch.device("cpu")  # where small bookkeeping collectives run
        if not self.active:
            if group is not None:
                raise RuntimeError("a process group was given but torch.distributed is not "
                                   "initialised (dist.init_process_group)")
            self.rank, self.world, self.backend = 0, 1, ""
            return
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the given process group")
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        if "gloo" not in self.backend and "nccl" in self.backend:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def device_for(self, device):
        """Where a collective on tensors of `device` runs: CUDA tensors stay on CUDA under
        NCCL; gloo communicates through CPU. ValueError for CPU tensors on an NCCL-only
        group."""
        if not self.active or (device.type == "cuda" and "nccl" in self.backend):
            return device
        if "gloo" in self.backend:
            return torch.device("cpu")
        if "nccl" in self.backend:
            raise ValueError(f"the process group's backend ({self.backend}) cannot communicate "
                             f"{device.type} tensors: use a gloo group for CPU memories")
        return device

    def all_gather(self, tensor):
        """(world, *shape): every rank's tensor, stacked in rank order (no gradient)."""
        tensor = tensor.detach()
        if self.world == 1:
            return tensor.unsqueeze(0).clone()
        comm = tensor.to(self.device_for(tensor.device)).contiguous()
        parts = [torch.empty_like(comm) for _ in range(self.world)]
        dist.all_gather(parts, comm, group=self.group)
        return torch.stack(parts).to(tensor.device)

    def all_reduce_(self, tensor):
        """Sum over ranks, in place."""
        if self.world == 1:
            return tensor
        comm = tensor.to(self.device_for(tensor.device))
        dist.all_reduce(comm, group=self.group)
        return tensor if comm is tensor else tensor.copy_(comm)

    def gather_rows(self, values, error):
        """All-gather one row of floats per rank (values[0] is overwritten by the error flag)
        as a (world, len) float64 CPU tensor; raise on every rank if any rank had an error."""
        values = [float(error is not None)] + [float(v) for v in values[1:]]
        rows = self.all_gather(torch.tensor(values, dtype=torch.float64,
                                            device=self.device)).cpu()
        self.raise_if_any(error, rows[:, 0].tolist())
        return rows

    def raise_if_any(self, error, flags):
        """Raise on every rank when any rank's flag is set (the failing ranks' messages travel
        by all_gather_object, only on this path)."""
        failed = [rank for rank, flag in enumerate(flags) if flag]
        if not failed:
            return
        report = None if error is None else (type(error).__name__, str(error))
        if self.world == 1:
            reports = [report]
        else:
            reports = [None] * self.world
            dist.all_gather_object(reports, report, group=self.group)
        if error is not None:
            raise error
        kind, message = reports[failed[0]]
        exception = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
        raise exception(f"stm_kernels.distributed: on rank {failed[0]}: {message}")

    def replicated(self, q, selection):
        """q (and selection) as inputs replicated on every rank: identity forward, gradient
        all-reduced (summed over ranks) in backward."""
        tensors = [t for t in (q, selection) if isinstance(t, torch.Tensor)]
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return q, selection
        outputs = _Replicated.apply(self, *tensors)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return outputs[0], (outputs[1] if len(outputs) > 1 else selection)

    def check_inputs(self, shard, error, **options):
        """All-gather every rank's shapes and options; raise on every rank when a rank
        failed or the ranks disagree. Returns the agreed shapes (a _Meta)."""
        try:
            row = _Meta.row(shard, error, **options)
        except (ValueError, TypeError, RuntimeError) as caught:  # e.g. an unsupported device
            error = error or caught
            row = [math.nan] * len(_Meta.FIELDS)
        rows = self.gather_rows(row, error)
        return _Meta.agreed(rows, self.rank, options["check_query"])

    def merge(self, out, lse, error):
        """Every rank's (out (B, Cv, HW), lse (B, HW)) all-gathered in one tensor and merged;
        an error on any rank (flagged in the same tensor) is raised on every rank."""
        dtype = accumulation_dtype(out.dtype)
        status = torch.full((1,), float(error is not None), dtype=dtype, device=out.device)
        packed = torch.cat([out.to(dtype).flatten(), lse.to(dtype).flatten(), status])
        gathered = _GatherFromRanks.apply(packed, self)
        self.raise_if_any(error, gathered[:, -1].tolist())
        sizes = (out.numel(), lse.numel())
        outs = gathered[:, :sizes[0]].unflatten(1, out.shape)
        lses = gathered[:, sizes[0]:sizes[0] + sizes[1]].unflatten(1, lse.shape)
        return merge_reads(outs.unbind(0), lses.unbind(0))


class _GatherFromRanks(torch.autograd.Function):
    """All-gather (world, *shape); backward: this rank's slice of the gradient (the merged
    result is used alike on every rank, so every rank holds the same gradient)."""

    @staticmethod
    def forward(ctx, tensor, comm):
        ctx.rank = comm.rank
        return comm.all_gather(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


class _Replicated(torch.autograd.Function):
    """Identity forward; backward: the gradients summed over ranks (one all-reduce)."""

    @staticmethod
    def forward(ctx, comm, *tensors):
        ctx.comm = comm
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        outputs = tuple(t.view_as(t) for t in tensors)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx, *grads):
        acc = torch.float64 if any(dtype == torch.float64 for _, dtype, _ in ctx.shapes) \
            else torch.float32
        device = ctx.shapes[0][2]
        flat = torch.cat([
            (g if g is not None else torch.zeros(shape, device=device)).to(device, acc)
            .flatten() for g, (shape, _, _) in zip(grads, ctx.shapes, strict=True)])
        ctx.comm.all_reduce_(flat)
        results, start = [None], 0
        for shape, dtype, tensor_device in ctx.shapes:
            size = math.prod(shape)
            results.append(flat[start:start + size].view(shape).to(tensor_device, dtype))
            start += size
        return tuple(results)


class _Meta:
    """Per-rank shapes and options as one row of floats (all-gathered), and their check."""
    FIELDS = ("error", "query_dim", "q0", "q1", "q2", "q3", "requires_grad", "batch",
              "key_dim", "value_dim", "positions", "dtype", "q_sum", "q_sumsq", "q_numel",
              "scale", "similarity", "top_k", "return_usage", "shrinkage", "selection",
              "device_ok")

    @classmethod
    def row(cls, shard, error, *, query_key, scale, similarity, top_k, return_usage,
            shrinkage, selection, check_query, comm):
        values = dict.fromkeys(cls.FIELDS, math.nan)
        values.update(scale=-1.0 if scale is None else float(scale),
                      similarity=float(SIMILARITIES.index(similarity)),
                      top_k=-1.0 if top_k is None else float(top_k),
                      return_usage=float(bool(return_usage)),
                      shrinkage=float(shrinkage is not None),
                      selection=float(selection is not None))
        if shard is not None:
            comm.device_for(shard.v.device)  # raises for a device the group cannot serve
            shape = list(query_key.shape) + [-1] * (4 - query_key.dim())
            values.update(
                query_dim=query_key.dim(), q0=shape[0], q1=shape[1], q2=shape[2], q3=shape[3],
                batch=shard.k.shape[0], key_dim=shard.k.shape[1], value_dim=shard.v.shape[1],
                positions=shard.n, dtype=_DTYPES.index(shard.v.dtype),
                requires_grad=torch.is_grad_enabled() and (
                    query_key.requires_grad or getattr(selection, "requires_grad", False)),
                q_numel=query_key.numel())
            if check_query:
                q = query_key.detach().to(torch.float64)
                values["q_sum"], values["q_sumsq"] = torch.stack([q.sum(), (q * q).sum()]).tolist()
        return [values[name] for name in cls.FIELDS]

    @classmethod
    def agreed(cls, rows, rank, check_query):
        table = {name: rows[:, i].tolist() for i, name in enumerate(cls.FIELDS)}
        ranks = range(len(rows))

        def differs(*names):
            return len({tuple(table[n][r] for n in names) for r in ranks}) > 1

        def per_rank(describe):
            return ", ".join(f"rank {r}: {describe(r)}" for r in ranks)

        if differs("query_dim", "q0", "q1", "q2", "q3"):
            raise ValueError("query_key must be the same on every rank; got shapes " + per_rank(
                lambda r: tuple(int(table[f"q{i}"][r]) for i in range(int(table["query_dim"][r])))))
        if differs("batch", "key_dim"):
            raise ValueError("memory_key_shard must have the same (B, Ck) on every rank; got " +
                             per_rank(lambda r: (int(table["batch"][r]), int(table["key_dim"][r]))))
        if differs("value_dim"):
            raise ValueError("memory_value_shard must have the same Cv on every rank; got " +
                             per_rank(lambda r: int(table["value_dim"][r])))
        if differs("dtype"):
            raise TypeError("the memory shards must have one dtype on every rank; got " +
                            per_rank(lambda r: _DTYPES[int(table["dtype"][r])]))
        for name, argument in (("scale", "scale"), ("similarity", "similarity"),
                               ("top_k", "top_k"), ("return_usage", "return_usage"),
                               ("shrinkage", "shrinkage (given or None)"),
                               ("selection", "selection (given or None)"),
                               ("requires_grad", "query_key.requires_grad")):
            if differs(name):
                raise ValueError(f"{argument} must be the same on every rank; got " +
                                 per_rank(lambda r, name=name: f"{table[name][r]:g}"))
        if sum(table["positions"]) < 1:
            raise ValueError("the sharded memory is empty: memory_key_shard has N = 0 positions "
                             "on every rank; at least one rank must hold memory")
        if check_query:
            sums, squares = table["q_sum"], table["q_sumsq"]
            top = max(abs(s) for s in squares)
            bound = _QUERY_TOLERANCE * top + 1e-30
            sum_bound = _QUERY_TOLERANCE * math.sqrt(table["q_numel"][0] * top) + 1e-30
            if any(abs(s - squares[0]) > bound for s in squares) or \
                    any(abs(s - sums[0]) > sum_bound for s in sums):
                raise ValueError(
                    "query_key differs across ranks (every rank must pass the same query; "
                    "check_query=False skips this check): sum / sum of squares " +
                    per_rank(lambda r: f"{sums[r]:.6g} / {squares[r]:.6g}"))
        meta = cls()
        meta.batch, meta.value_dim = int(table["batch"][0]), int(table["value_dim"][0])
        meta.query_positions = math.prod(
            int(table[f"q{i}"][0]) for i in range(2, int(table["query_dim"][0])))
        meta.positions = [int(n) for n in table["positions"]]
        meta.offset = sum(meta.positions[:rank])
        return meta


# --------------------------------------------------------------------------- top-k


class _Selected:
    """This rank's part of every query's global top-k: scores (B, HW, w), mine (B, HW, w) and
    local indices (B, HW, w), -1 where the slot is another rank's or unused; w <= k is the
    most picks any query has on this rank."""


def _global_top_k(comm, meta, local, shard, top_k):
    """Pick each query's global top_k among every rank's candidates (local: this rank's
    (scores, indices) from topk_scores, None for an empty shard)."""
    B, HW, n = meta.batch, meta.query_positions, shard.n
    width = min(top_k, max(meta.positions))  # candidates per rank (padded)
    candidates = torch.full((B, HW, width, 2), -math.inf, dtype=torch.float64,
                            device=shard.k.device)
    candidates[..., 1] = -1
    if n:
        scores, indices = local
        count = scores.shape[-1]
        valid = indices >= 0
        candidates[..., :count, 0] = torch.where(valid, scores.double(), -math.inf)
        candidates[..., :count, 1] = torch.where(valid, (indices + meta.offset).double(), -1.0)
    gathered = comm.all_gather(candidates)  # (W, B, HW, width, 2), rank order
    gathered = gathered.permute(1, 2, 0, 3, 4).reshape(B, HW, -1, 2)
    k = min(top_k, sum(meta.positions))
    # stable descending sort: equal scores stay in rank order, i.e. by global position
    order = torch.sort(gathered[..., 0], dim=-1, descending=True, stable=True).indices[..., :k]
    chosen = gathered.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, 2))
    positions = chosen[..., 1].long()
    local_indices = positions - meta.offset
    mine = (positions >= 0) & (local_indices >= 0) & (local_indices < n)
    # keep only as many slots as the query holding most of this shard's picks needs (about
    # k / world_size): this rank's read of the selected positions shrinks with the world size
    width = max(1, int(mine.sum(-1).max())) if mine.numel() else 1
    if width < mine.shape[-1]:
        kept = torch.sort(mine.to(torch.uint8), dim=-1, descending=True,
                          stable=True).indices[..., :width]
        mine, local_indices = mine.gather(-1, kept), local_indices.gather(-1, kept)
        chosen = chosen.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, 2))
    selected = _Selected()
    selected.scores = chosen[..., 0]
    selected.mine = mine
    selected.local_indices = torch.where(mine, local_indices, -1)
    return selected


# --------------------------------------------------------------------------- usage


def _usage(shard, lse, selected, options, memory_lengths):
    """This rank's (B, N_r) usage under the global lse."""
    B = lse.shape[0]
    device = shard.k.device
    if shard.n == 0:
        return torch.zeros((B, 0), dtype=torch.float32, device=device)
    lse = lse.flatten(1)
    if selected is None:
        import stm_kernels
        return stm_kernels.memory_usage(shard.q.detach(), shard.k.detach(), lse,
                                        memory_lengths=memory_lengths, **_detached(options))
    probs = torch.where(selected.mine, torch.exp(selected.scores - lse.double().unsqueeze(-1)),
                        0.0)
    usage = torch.zeros((B, shard.n), dtype=torch.float64, device=device)
    usage.scatter_add_(1, selected.local_indices.clamp_min(0).flatten(1), probs.flatten(1))
    return usage.float()
