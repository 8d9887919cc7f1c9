"""Host side of the fused Triton memory read: launch plans, config fallback, launchers.

    triton_forward   memory_read_fwd_kernel over (query block, object x value chunk, memory
                     split), then memory_read_merge_kernel when the memory is split
                     (flash-decoding); or, opted in, the warp-specialised Gluon forward
    triton_backward  delta = rowsum(dO * O) - d lse on the host, then
                     memory_read_bwd_kernel_dv and memory_read_bwd_kernel_dkdq (dQ by atomics;
                     under torch.use_deterministic_algorithms, memory_read_bwd_kernel_dq)

The kernels are in kernels/, their tilings in tilings.py. Kernel arguments are passed by name;
`forward_plan` and `backward_plan` compute the grids (also used by the static work report,
tools/kernel_report, for a pretend device).
"""
import dataclasses
import os
import warnings

import torch
import triton

from ..._buffers import device_context, new_buffer
from .kernels.backward import (memory_read_bwd_kernel_dkdq, memory_read_bwd_kernel_dq,
                         memory_read_bwd_kernel_dv, memory_read_usage_kernel)
from .kernels.common import LOG2E
from .compat import patch_interpreter_index
from .tilings import (INTERPRETING, SELECT_CONFIG, USAGE_CONFIG, BackwardConfig,
                             DkdqConfig, DqConfig, DvConfig, ForwardConfig, candidates,
                             use_configs, warp_specialized_config)
from .kernels.forward import memory_read_fwd_kernel, memory_read_merge_kernel
from .kernels.topk import MIN_KEY, memory_read_topk_kernel

__all__ = ["triton_forward", "triton_backward", "triton_select", "triton_usage", "forward_plan",
           "backward_plan", "dq_plan", "use_configs",
           "ForwardConfig", "BackwardConfig", "DvConfig", "DkdqConfig", "DqConfig", "INTERPRETING"]

WARP_SPECIALIZED_ENV = "STM_KERNELS_WARP_SPECIALIZED"
if INTERPRETING:
    patch_interpreter_index()  # Triton 3.6's interpreter with NumPy >= 2.4 (triton_compat)
_chosen: dict = {}
_warned: set = set()


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    block_v: int
    num_v: int
    m_blocks: int
    splits: int
    per_split: int

    def grid(self, B):
        return (self.m_blocks, B * self.num_v, self.splits)


def value_blocks(Cv, block_v):
    """(BLOCK_V, number of value chunks) for a requested chunk size (None: all channels)."""
    full = max(16, triton.next_power_of_2(Cv))
    block_v = full if block_v is None else min(block_v, full)
    return block_v, triton.cdiv(Cv, block_v)


def memory_splits(requested, programs, n_blocks, sm_count):
    """How many programs share one query block's memory (flash-decoding): enough to fill the
    device when objects x query blocks are too few, each split still several memory blocks."""
    if requested is not None:
        splits = requested
    else:
        splits = min(sm_count // max(programs, 1), n_blocks // 4)
    return max(1, min(splits, n_blocks))


def forward_plan(config, B, HW, N, Cv, sm_count):
    """Value chunks, query blocks and memory splits of a forward launch."""
    block_v, num_v = value_blocks(Cv, config.block_v)
    m_blocks = triton.cdiv(HW, config.block_m)
    n_blocks = triton.cdiv(N, config.block_n)
    splits = memory_splits(config.splits, m_blocks * B * num_v, n_blocks, sm_count)
    # Positions per split: a multiple of block_n; fewer splits when the last would be empty.
    per_split = triton.cdiv(n_blocks, splits) * config.block_n
    return ForwardPlan(block_v, num_v, m_blocks, triton.cdiv(N, per_split), per_split)


def backward_plan(config, B, N, Cv):
    """Grids and value chunking of the dV and dK/dQ kernels."""
    block_v, num_v = value_blocks(Cv, config.dv.block_v)
    return dict(dv_grid=(triton.cdiv(N, config.dv.block_n), B * num_v), dv_block_v=block_v,
                dv_num_v=num_v, dkdq_grid=(triton.cdiv(N, config.dkdq.block_n), B),
                dkdq_block_cv=value_blocks(Cv, config.dkdq.block_cv)[0],
                dkdq_num_cv=value_blocks(Cv, config.dkdq.block_cv)[1])


def dq_plan(config, B, HW, N, Cv, sm_count):
    """Query blocks, memory splits and value chunking of the deterministic dQ kernel (a
    DqConfig): its programs are laid out as the forward's, without value chunks."""
    plan = forward_plan(ForwardConfig(block_m=config.block_m, block_n=config.block_n,
                                      block_v=None, splits=config.splits), B, HW, N, Cv, sm_count)
    block_cv, num_cv = value_blocks(Cv, config.block_cv)
    return dict(grid=(plan.m_blocks, B, plan.splits), splits=plan.splits,
                per_split=plan.per_split, block_cv=block_cv, num_cv=num_cv)


# --------------------------------------------------------------------------- host helpers


def _sm_count(device):
    if device.type != "cuda":
        return 4  # interpreter: a pretend device small enough that the split paths run
    return torch.cuda.get_device_properties(device).multi_processor_count


def _run_first_fitting(kind, key, launch):
    """Launch with the first candidate config that compiles for this device, remembered per key
    (key[0] is the dtype)."""
    options = candidates(kind, key[0].itemsize)
    start = _chosen.get((kind, key, options), 0)
    last_error = None
    for index in range(start, len(options)):
        try:
            result = launch(options[index])
        except triton.runtime.errors.OutOfResources as error:
            last_error = error
            continue
        _chosen[(kind, key, options)] = index
        return result
    raise RuntimeError(f"no {kind} kernel config fits this device for {key}") from last_error


def _dot_precision(dtype):
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


def _tile_span(sizes, strides):
    return sum(triton.next_power_of_2(size) * abs(stride)
               for size, stride in zip(sizes, strides, strict=True))


def _needs_int64(*tensors, outputs=()):
    """Whether in-tile offsets (over the last two dims: channels x positions) of the inputs or
    of contiguous outputs of the given (C, L) shapes can reach 2**31 elements; batch, split and
    block starts always go through int64 scalars."""
    spans = [_tile_span(t.shape[-2:], t.stride()[-2:]) for t in tensors]
    spans += [_tile_span(shape, (shape[1], 1)) for shape in outputs]
    return max(spans) >= 2**31


def _alignment(t):
    """Largest power of two <= 16 dividing the batch and channel strides of a (B, C, N) tensor."""
    align = 16
    while align > 1 and any(stride % align for stride in t.stride()[:2]):
        align //= 2
    return align


def _memory_strides(name, t, align):
    """Keyword strides of a (B, C, N) memory tensor, batch and channel divided by align."""
    return {f"stride_{name}b": t.stride(0) // align, f"stride_{name}c": t.stride(1) // align,
            f"stride_{name}n": t.stride(2)}


def _strides(name, t, suffixes):
    return {f"stride_{name}{suffix}": stride
            for suffix, stride in zip(suffixes, t.stride(), strict=True)}


def _padded_rows(t, compact=False):
    """t (B, C, L) with rows starting on 16-element boundaries: a padded copy unless they
    already do (compact: also exactly round16(L) apart, with no gaps between channels). Used
    for query-sized tensors (q, dO), which the kernels re-read per block."""
    length = t.shape[2]
    padded_length = triton.cdiv(length, 16) * 16
    channel_ok = t.stride(1) == padded_length if compact else t.stride(1) % 16 == 0
    batch_ok = t.shape[0] == 1 or t.stride(0) % 16 == 0
    if t.stride(2) == 1 and channel_ok and batch_ok:
        return t
    padded = torch.empty(t.shape[:2] + (padded_length,), dtype=t.dtype, device=t.device)
    padded = padded[:, :, :length]
    padded.copy_(t)
    return padded


def _check_device(*tensors):
    if tensors[0].device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            f"stm_kernels, to run the kernels on CPU); got tensors on {tensors[0].device}")


def _launch_flags(inputs, outputs):
    """Constexprs shared by the kernels of one call (inputs start with q, k, v; outputs are the
    (C, L) shapes of the contiguous outputs)."""
    k = inputs[1]
    return dict(
        BLOCK_CK=max(16, triton.next_power_of_2(k.shape[1])),
        PRECISION=_dot_precision(k.dtype),
        UPCAST=INTERPRETING and k.dtype == torch.bfloat16,
        I64=_needs_int64(*inputs, outputs=outputs),
    )


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _warp_specialized_forward(q, k, v):
    """The Gluon warp-specialised forward's launcher when opted in and usable, else None."""
    if os.environ.get(WARP_SPECIALIZED_ENV, "0") != "1":
        return None
    try:
        from ...experimental import gluon_forward as gluon
    except ImportError as error:  # pragma: no cover - the module imports on every Triton
        _warn_once(f"{WARP_SPECIALIZED_ENV}=1 ignored: {error}; using the plain Triton forward")
        return None
    reason = gluon.unsupported_reason(q, k, v, warp_specialized_config())
    if reason is not None:
        _warn_once(f"{WARP_SPECIALIZED_ENV}=1 ignored ({reason}); using the plain Triton forward")
        return None
    return gluon


# --------------------------------------------------------------------------- launchers


def _merge_splits(part_out, part_lse, out, lse, block_v, i64):
    HW, Cv, B = out.shape[2], out.shape[1], out.shape[0]
    merge_v = min(block_v, 64)
    memory_read_merge_kernel[(triton.cdiv(HW, 64), triton.cdiv(Cv, merge_v), B)](
        po=part_out, plse=part_lse, o=out, lse=lse,
        **_strides("po", part_out, "sbcm"), **_strides("pl", part_lse, "sbm"),
        **_strides("o", out, "bcm"), **_strides("l", lse, "bm"),
        HW=HW, CV=Cv, SPLITS=part_out.shape[0], BLOCK_M=64, BLOCK_V=merge_v, I64=i64,
        num_warps=4,
    )


def _split_buffers(splits, out, lse):
    if splits == 1:
        return out.unsqueeze(0), lse.unsqueeze(0)
    B, Cv, HW = out.shape
    return (new_buffer((splits, B, Cv, HW), torch.float32, out.device),
            new_buffer((splits, B, HW), torch.float32, out.device))


def _key_norms(k, l2):
    """|k|^2 (B, N) float32 for the L2 similarity, once per call (a per-block reduction in the
    kernels costs block barriers); for "dot", k itself, a pointer the kernels never read."""
    return k.float().square().sum(1) if l2 else k


def _lengths_argument(lengths, k):
    """(pointer argument, RAGGED) for optional per-object memory lengths."""
    if lengths is None:
        return k, False  # never read
    return lengths.to(device=k.device, dtype=torch.int32).contiguous(), True


def triton_forward(q, k, v, scale, l2, lengths=None):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW) float32) for q (Bq, Ck, HW), k (B, Ck, N),
    v (B, Cv, N); q, k, v share one dtype, any strides. lengths: optional (B,) valid memory
    positions per object (validated by the caller)."""
    _check_device(q, k, v)
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    q = _padded_rows(q)
    flags = _launch_flags((q, k, v), outputs=[(Cv, HW)])
    align_k, align_v = _alignment(k), _alignment(v)
    ksq = _key_norms(k, l2)
    lengths, ragged = _lengths_argument(lengths, k)
    arguments = dict(
        q=q, k=k, v=v, ksq=ksq, stride_sqb=ksq.stride(0), lengths=lengths, RAGGED=ragged,
        stride_qb=0 if q.shape[0] == 1 else q.stride(0), stride_qc=q.stride(1),
        stride_qm=q.stride(2), **_memory_strides("k", k, align_k),
        **_memory_strides("v", v, align_v),
        HW=HW, N=N, CK=Ck, CV=Cv, qk_scale=scale * LOG2E, L2=l2,
        ALIGN_K=align_k, ALIGN_V=align_v, **flags)
    gluon = None if ragged else _warp_specialized_forward(q, k, v)

    def launch(config):
        if gluon is not None:  # the Gluon kernel's own query blocks and value chunks
            ws_config = warp_specialized_config()
            chunk = triton.cdiv(Cv, ws_config.value_chunks)
            config = ForwardConfig(
                block_m=ws_config.block_m, block_n=ws_config.block_n,
                block_v=None if ws_config.value_chunks == 1 else triton.next_power_of_2(chunk))
        plan = forward_plan(config, B, HW, N, Cv, _sm_count(device))
        out = new_buffer((B, Cv, HW), v.dtype, device)
        lse = new_buffer((B, HW), torch.float32, device)
        part_out, part_lse = _split_buffers(plan.splits, out, lse)
        if gluon is not None:
            gluon.ws_forward(q, k, v, part_out, part_lse, per_split=plan.per_split,
                             qk_scale=scale * LOG2E, l2=l2, config=ws_config)
        else:
            memory_read_fwd_kernel[plan.grid(B)](
                o=part_out, lse=part_lse, **_strides("o", part_out, "sbcm"),
                **_strides("l", part_lse, "sbm"), n_per_split=plan.per_split,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_V=plan.block_v,
                NUM_V=plan.num_v, num_warps=config.num_warps,
                num_stages=config.num_stages, **arguments)
        if plan.splits > 1:
            _merge_splits(part_out, part_lse, out, lse, plan.block_v, flags["I64"])
        return out, lse

    with device_context(device):
        return _run_first_fitting("forward", (k.dtype, Ck, Cv, l2, gluon is not None), launch)


def _deterministic_dq(config, query, v, ksq, delta, align_v, sm_count):
    """dQ (Bq, Ck, HW) float32, unscaled, without atomics: memory_read_bwd_kernel_dq's
    partials per (memory split, object), summed on the host in a fixed order."""
    k, q = query["k"], query["q"]
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    plan = dq_plan(config, B, HW, N, Cv, sm_count)
    parts = new_buffer((plan["splits"], B, Ck, HW), torch.float32, k.device)
    memory_read_bwd_kernel_dq[plan["grid"]](
        v=v, ksq=ksq, delta=delta, dq_parts=parts, stride_sqb=ksq.stride(0),
        **_memory_strides("v", v, align_v), **_strides("pd", parts, "sbcm"),
        n_per_split=plan["per_split"], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_CV=plan["block_cv"], NUM_CV=plan["num_cv"], ALIGN_V=align_v,
        num_warps=config.num_warps, num_stages=config.num_stages, **query)
    # A batch-1 query's gradient sums over the objects too (an expanded one's does not: its
    # expand's backward sums, as for the atomics path).
    return parts.sum(0) if q.shape[0] == B else parts.sum((0, 1))[None]


def triton_backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths=None):
    """Gradients (dq shaped like q, dk, dv) of the read; probabilities are recomputed from lse.
    With lengths, positions past an object's length get zero dk, dv. dq is accumulated with
    atomics, except under torch.use_deterministic_algorithms(True), where a third kernel
    computes it in a fixed order (bitwise reproducible; about 40% more backward work)."""
    _check_device(q, k, v)
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    # delta_i = sum_c dO_ci O_ci, minus the incoming gradient of lse (d lse / d s = p).
    delta = (grad_out.float() * out.float()).sum(1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta, lse = delta.contiguous(), lse.contiguous()
    q_dtype = q.dtype
    # dQ is accumulated with the query's own (compact, padded) strides, see the dK/dQ kernel.
    q, grad_out = _padded_rows(q, compact=True), _padded_rows(grad_out)
    shared_query = q.shape[0] == 1 or q.stride(0) == 0
    dq_batches = 1 if q.shape[0] == 1 else q.shape[0]
    flags = _launch_flags((q, k, v, grad_out), outputs=[(Ck, N), (Cv, N), (Ck, HW)])
    align_k, align_v = _alignment(k), _alignment(v)
    lengths, ragged = _lengths_argument(lengths, k)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # the dQ kernel's |k|^2 (the dK/dQ kernel computes its own from the block it holds)
    ksq = _key_norms(k, l2) if deterministic else None
    query = dict(q=q, k=k, do=grad_out, lse=lse, lengths=lengths, RAGGED=ragged,
                 stride_qb=0 if shared_query else q.stride(0), stride_qc=q.stride(1),
                 stride_qm=q.stride(2), **_memory_strides("k", k, align_k),
                 **_strides("do", grad_out, "bcm"), **_strides("l", lse, "bm"),
                 HW=HW, N=N, CK=Ck, CV=Cv, qk_scale=scale * LOG2E, L2=l2, ALIGN_K=align_k,
                 **flags)

    def launch(config):
        plan = backward_plan(config, B, N, Cv)
        dv = new_buffer((B, Cv, N), v.dtype, device)
        memory_read_bwd_kernel_dv[plan["dv_grid"]](
            dv=dv, **_strides("dv", dv, "bcn"),
            BLOCK_M=config.dv.block_m, BLOCK_N=config.dv.block_n, BLOCK_V=plan["dv_block_v"],
            NUM_V=plan["dv_num_v"], num_warps=config.dv.num_warps,
            num_stages=config.dv.num_stages, **query)
        dk = new_buffer((B, Ck, N), k.dtype, device)
        if deterministic:  # an unused pointer: ATOMIC_DQ is off, the dQ kernel computes dq
            dq = delta
        else:  # zeroed (atomics add into it), padded like q so that both share their strides
            dq = torch.zeros((dq_batches, Ck, q.stride(1)), dtype=torch.float32, device=device)
            dq = dq[:, :, :HW]
        memory_read_bwd_kernel_dkdq[plan["dkdq_grid"]](
            v=v, delta=delta, dk=dk, dq=dq, **_memory_strides("v", v, align_v),
            **_strides("dk", dk, "bcn"), stride_dqb=0 if dq_batches == 1 else dq.stride(0),
            scale=scale, BLOCK_M=config.dkdq.block_m, BLOCK_N=config.dkdq.block_n,
            BLOCK_CV=plan["dkdq_block_cv"], NUM_CV=plan["dkdq_num_cv"], ALIGN_V=align_v,
            ATOMIC_DQ=not deterministic, num_warps=config.dkdq.num_warps,
            num_stages=config.dkdq.num_stages, **query)
        if deterministic:
            dq = _deterministic_dq(config.dq, query, v, ksq, delta, align_v, _sm_count(device))
        dq = dq.mul_(2.0 * scale if l2 else scale)
        return dq.to(q_dtype), dk, dv

    with device_context(device):
        return _run_first_fitting("backward", (k.dtype, Ck, Cv, l2, deterministic), launch)


# --------------------------------------------------------------------------- top-k and usage

def select_launch(top_k):
    """(block_m, block_n, top_k rounded to a power of two, warps, stages) of the selection."""
    config = SELECT_CONFIG[INTERPRETING]
    top_k_pow2 = triton.next_power_of_2(top_k)
    return (config["block_m"], max(64, top_k_pow2), top_k_pow2, config["num_warps"],
            config["num_stages"])


def triton_select(q, k, top_k, scale, l2, lengths=None):
    """(scores (B, HW, top_k) float32 natural units, indices (B, HW, top_k) int64) of the
    top_k memory positions of each query (ties: lower index), -1 / -inf past an object's
    memory; one fused pass over the memory (kernels/topk.py)."""
    _check_device(q, k)
    B, Ck, N = k.shape
    HW = q.shape[2]
    device = k.device
    q = _padded_rows(q)
    block_m, block_n, top_k_pow2, warps, stages = select_launch(top_k)
    config = ForwardConfig(block_m=block_m, block_n=block_n, block_v=None)
    plan = forward_plan(config, B, HW, N, 16, _sm_count(device))
    flags = _launch_flags((q, k, k), outputs=[])
    align_k = _alignment(k)
    ksq = _key_norms(k, l2)
    lengths_arg, ragged = _lengths_argument(lengths, k)
    keys = torch.empty((plan.splits, B, HW, top_k_pow2), dtype=torch.int64, device=device)
    with device_context(device):
        memory_read_topk_kernel[(plan.m_blocks, B, plan.splits)](
            q=q, k=k, ksq=ksq, lengths=lengths_arg, keys=keys,
            stride_qb=0 if q.shape[0] == 1 else q.stride(0), stride_qc=q.stride(1),
            stride_qm=q.stride(2), **_memory_strides("k", k, align_k), stride_sqb=ksq.stride(0),
            stride_ks=keys.stride(0), stride_kyb=keys.stride(1), stride_km=keys.stride(2),
            HW=HW, N=N, CK=Ck, n_per_split=plan.per_split, qk_scale=scale * LOG2E, L2=l2,
            BLOCK_M=block_m, BLOCK_N=block_n, TOP_K=top_k_pow2, RAGGED=ragged,
            ALIGN_K=align_k, num_warps=warps, num_stages=stages, **flags)
    merged = keys.permute(1, 2, 0, 3).reshape(B, HW, -1)
    best = torch.topk(merged, top_k, dim=-1).values  # distinct keys: score desc, index asc
    return _decoded(best)


def _decoded(keys):
    """(scores in natural units, indices) of packed keys; -inf / -1 for empty ones."""
    high = (keys >> 32).to(torch.int32)
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high)
    scores = bits.view(torch.float32) * (1.0 / LOG2E)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    empty = (keys == MIN_KEY) | torch.isneginf(scores)
    return (scores.masked_fill(empty, float("-inf")), indices.masked_fill(empty, -1))


def triton_usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 memory usage for the read's lse (B, HW) (memory_read_usage_kernel)."""
    _check_device(q, k)
    B, Ck, N = k.shape
    HW = q.shape[2]
    q = _padded_rows(q)
    lse = lse.float().contiguous()
    block_n, block_m, warps = (USAGE_CONFIG[INTERPRETING][key]
                               for key in ("block_n", "block_m", "num_warps"))
    flags = _launch_flags((q, k, k), outputs=[(1, N)])
    align_k = _alignment(k)
    lengths_arg, ragged = _lengths_argument(lengths, k)
    usage = torch.empty((B, N), dtype=torch.float32, device=k.device)
    with device_context(k.device):
        memory_read_usage_kernel[(triton.cdiv(N, block_n), B)](
            q=q, k=k, lse=lse, lengths=lengths_arg, usage=usage,
            stride_qb=0 if q.shape[0] == 1 else q.stride(0), stride_qc=q.stride(1),
            stride_qm=q.stride(2), **_memory_strides("k", k, align_k),
            **_strides("l", lse, "bm"), stride_ub=usage.stride(0), HW=HW, N=N, CK=Ck,
            qk_scale=scale * LOG2E, L2=l2, BLOCK_M=block_m, BLOCK_N=block_n, RAGGED=ragged,
            ALIGN_K=align_k, num_warps=warps, **flags)
    return usage
