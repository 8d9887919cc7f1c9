"""The launchers of the read's family: triton_select (top-k) and triton_usage (XMem's usage).

    triton_select  memory_read_topk_kernel (the top-k positions of every query, per memory
                   split), then memory_read_topk_merge_kernel (the top-k of the splits, decoded)
    triton_usage   memory_read_usage_kernel

A layout's first call plans the launches and keeps them (PreparedSelect, PreparedSingle;
kept_launches.py).
"""
import dataclasses
import functools

import torch

from ..._buffers import device_context, new_buffer
from ...torch_common import LOG2E
from . import running
from .calls import Call, _call, _check_device, _launch_flags, _signature
from .kept_launches import KernelLaunch, _keep_prepared, _layout_key, _run_prepared
from .kernel_arguments import (_alignment, _lengths_argument, _memory_strides, _padded_rows,
                               _query_inputs, _query_strides, _strides)
from .kernels.backward import memory_read_usage_kernel
from .kernels.topk import memory_read_topk_kernel, memory_read_topk_merge_kernel
from .plans import cdiv, forward_plan, select_block_n
from .running import kernels_in_sequence
from .tilings import ForwardConfig


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedSingle:
    """A one-kernel pass (selection, usage) planned for one layout: its launch, and the buffer
    it writes (the kernel argument `output`, of `shape` and `dtype`); inputs(*tensors) makes
    the per-call tensor arguments."""
    call: Call
    launch: KernelLaunch
    output: str
    shape: tuple
    dtype: torch.dtype
    inputs: object

    def __call__(self, *tensors):
        device = tensors[1].device
        result = torch.empty(self.shape, dtype=self.dtype, device=device)
        with device_context(device):
            self.launch(self.call, **{self.output: result}, **self.inputs(*tensors))
        return result


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedSelect:
    """A selection planned for one layout: the top-k kernel's launch over the memory splits
    (writing their packed keys, `keys_shape`) and the launch that merges and decodes them into
    (B, HW, top_k) scores and indices; inputs(*tensors) makes the top-k kernel's per-call
    tensor arguments."""
    call: Call
    selection: KernelLaunch
    merge: KernelLaunch
    keys_shape: tuple
    top_k: int
    inputs: object

    def __call__(self, q, k, lengths):
        keys = torch.empty(self.keys_shape, dtype=torch.int64, device=k.device)
        scores, indices = _select_outputs(keys, self.top_k)
        with device_context(k.device):
            self.selection(self.call, keys=keys, **self.inputs(q, k, lengths))
            self.merge(self.call, keys=keys, scores=scores, indices=indices)
        return scores, indices


def _select_outputs(keys, top_k):
    """The (B, HW, top_k) float32 scores and int64 indices of a selection's packed keys
    (splits, B, HW, TOP_K)."""
    _, B, HW, _ = keys.shape
    return (new_buffer((B, HW, top_k), torch.float32, keys.device),
            new_buffer((B, HW, top_k), torch.int64, keys.device))


def _merge_selection(call, keys, top_k, i64):
    """(scores, indices, the launch) of memory_read_topk_merge_kernel over the selection's
    packed keys: the top_k of its memory splits, decoded."""
    splits, B, HW, top_k_pow2 = keys.shape
    scores, indices = _select_outputs(keys, top_k)

    def launch(config):
        fixed = dict(stride_ks=keys.stride(0), stride_kyb=keys.stride(1),
                     stride_km=keys.stride(2), stride_sb=scores.stride(0),
                     stride_sm=scores.stride(1), stride_ib=indices.stride(0),
                     stride_im=indices.stride(1), HW=HW, SPLITS=splits, top_k=top_k,
                     BLOCK_M=config.block_m, TOP_K=top_k_pow2, I64=i64)
        merge = KernelLaunch(memory_read_topk_merge_kernel, (cdiv(HW, config.block_m), B),
                             config, fixed)
        merge(call, first=True, keys=keys, scores=scores, indices=indices)
        return merge

    merge = running.launch_first_that_runs("select_merge", call,
                                           _signature(call, i64, top_k_pow2), launch)
    return scores, indices, merge


def triton_select(q, k, top_k, scale, l2, lengths=None):
    """(scores (B, HW, top_k) float32 natural units, indices (B, HW, top_k) int64) of the
    top_k memory positions of each query, best first (ties: lower index), -1 / -inf past an
    object's memory: one fused pass over the memory in parallel memory splits
    (memory_read_topk_kernel, kernels/topk.py), then the top_k of the splits' keys, decoded
    (memory_read_topk_merge_kernel). Planned once per layout (_layout_key)."""
    return select_pass(q, k, top_k, scale, l2, lengths)[:2]


def select_pass(q, k, top_k, scale, l2, lengths=None):
    """(scores, indices, the PreparedSelect that computed them) as triton_select: the pass
    kept for the call's layout, or planned on this call and kept."""
    layout = _layout_key(("select", top_k), k, scale, l2, lengths, q, k)
    kept = _run_prepared(layout, q, k, lengths)
    if kept is not None:
        (scores, indices), prepared = kept
        return scores, indices, prepared
    _check_device(q, k)
    call = _call(k, "select", l2)
    B, Ck, N = k.shape
    HW = q.shape[2]
    inputs = functools.partial(_query_inputs, l2=l2, rank1=call.rank1)
    tensors = inputs(q, k, lengths)
    q, ksq, ragged = tensors["q"], tensors["ksq"], lengths is not None
    block_n, top_k_pow2 = select_block_n(top_k)
    flags = _launch_flags(call, (q, k, k), outputs=[])
    align_k = _alignment(k)

    def launch(config):
        plan = forward_plan(ForwardConfig(block_m=config.block_m, block_n=block_n), B, HW, N,
                            16, call.device.multiprocessors)
        shape = (plan.splits, B, HW, top_k_pow2)
        keys = torch.empty(shape, dtype=torch.int64, device=k.device)
        fixed = dict(**_query_strides(q), **_memory_strides("k", k, align_k),
                     stride_sqb=ksq.stride(0), stride_ks=keys.stride(0),
                     stride_kyb=keys.stride(1), stride_km=keys.stride(2), HW=HW, N=N,
                     n_per_split=plan.per_split, qk_scale=scale * LOG2E, L2=l2,
                     BLOCK_M=config.block_m, BLOCK_N=block_n, TOP_K=top_k_pow2,
                     RAGGED=ragged, ALIGN_K=align_k, STREAM_Q=config.stream_queries,
                     CHUNK_CK=min(config.block_ck or flags["BLOCK_CK"], flags["BLOCK_CK"]),
                     **flags)
        selection = KernelLaunch(memory_read_topk_kernel, (plan.m_blocks, B, plan.splits),
                                 config, fixed)
        selection(call, first=True, keys=keys, **tensors)
        scores, indices, merge = _merge_selection(call, keys, top_k, flags["I64"])
        return scores, indices, PreparedSelect(call, selection, merge, shape, top_k, inputs)

    signature = _signature(call, k.dtype, Ck, l2, ragged, top_k_pow2, flags["I64"])
    with device_context(k.device), kernels_in_sequence(call, "selection", signature):
        scores, indices, prepared = running.launch_first_that_runs("select", call, signature,
                                                                   launch)
    _keep_prepared(layout, prepared)
    return scores, indices, prepared


def _usage_inputs(q, k, lse, lengths):
    """The usage kernel's tensor arguments: the query with 16-aligned rows, the keys, the
    read's lse as contiguous float32, the lengths."""
    return dict(q=_padded_rows(q), k=k, lse=lse.float().contiguous(),
                lengths=_lengths_argument(lengths, k)[0])


def triton_usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 memory usage for the read's lse (B, HW) (memory_read_usage_kernel).
    Planned once per layout (_layout_key)."""
    layout = _layout_key("usage", k, scale, l2, lengths, q, k)
    kept = _run_prepared(layout, q, k, lse, lengths)
    if kept is not None:
        return kept[0]
    _check_device(q, k)
    call = _call(k, "usage", l2)
    B, Ck, N = k.shape
    HW = q.shape[2]
    tensors = _usage_inputs(q, k, lse, lengths)
    q, ragged = tensors["q"], lengths is not None
    flags = _launch_flags(call, (q, k, k), outputs=[(1, N)])
    align_k = _alignment(k)

    def launch(config):
        usage = torch.empty((B, N), dtype=torch.float32, device=k.device)
        fixed = dict(**_query_strides(q), **_memory_strides("k", k, align_k),
                     **_strides("l", tensors["lse"], "bm"), stride_ub=usage.stride(0), HW=HW,
                     N=N, qk_scale=scale * LOG2E, L2=l2, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, RAGGED=ragged, ALIGN_K=align_k,
                     STREAM_K=config.stream_keys, VOLATILE_K=call.volatile_keys(l2), **flags)
        counting = KernelLaunch(memory_read_usage_kernel, (cdiv(N, config.block_n), B), config,
                                fixed)
        counting(call, first=True, usage=usage, **tensors)
        return usage, PreparedSingle(call, counting, "usage", (B, N), torch.float32,
                                     _usage_inputs)

    with device_context(k.device):
        usage, prepared = running.launch_first_that_runs(
            "usage", call, _signature(call, k.dtype, Ck, l2, ragged, flags["I64"]), launch)
    _keep_prepared(layout, prepared)
    return usage
