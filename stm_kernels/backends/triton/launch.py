"""Host side of the fused Triton memory read: plans, tilings, launches.

    triton_forward   memory_read_fwd_kernel over (query block, object x value chunk, memory
                     split), then memory_read_merge_kernel when the memory is split
                     (flash-decoding); or, opted in, the warp-specialised Gluon forward
    triton_backward  memory_read_bwd_kernel_prepare (delta = rowsum(dO * O) - d lse, aligned
                     copies of dO and q, the zeroed dQ), then
                     memory_read_bwd_kernel_dv and memory_read_bwd_kernel_dkdq (dQ by atomics;
                     under torch.use_deterministic_algorithms, and where dK+dQ does not fit
                     the device, memory_read_bwd_kernel_dq)
    triton_select    memory_read_topk_kernel (top-k positions of every query), then
                     memory_read_topk_merge_kernel (the top-k of its memory splits, decoded)
    triton_usage     memory_read_usage_kernel (XMem's memory usage)

A memory whose key channels are one past a tiling width (tilings.splits_last_channel: XMem's
2 * 128 + 1 = 257) runs on tiles of that width: the kernels take its first channels as the
tiled dot (CK) and the last as a rank-1 score term u_i w_j (RANK1), exact for any input; its
gradients come back as the last channel of dq and dk. Its key width class is 257 (the tables'
own entries for it, else the 256-wide ones).

Every kernel is launched through `launch_first_that_runs`: the device's candidate tilings
(tilings.py) in order, a candidate that fails to compile or launch, or that uses more local
memory than its config allows (max_local_bytes), falling through to the next; the choice is
remembered per device, kernel and call signature. When none runs it raises KernelUnavailable,
and the backend (backends/triton/__init__.py) reads with torch instead; only the fused dK+dQ
has a kernel path before that: dK and dQ by two kernels. A pass's launches, each with its
chosen config and fixed arguments, are kept per call layout (PreparedForward,
PreparedBackward, PreparedSelect, PreparedSingle for the usage; _layout_key): a repeated call
only allocates its outputs and launches, each kernel's compile called directly
(direct_launch.py) without Triton's binder.
`run` is the one place a kernel is compiled and first launched: the offline tools replace it
(`recording`) to compile every launch for a device that is not there, with tensors on the
"meta" device; while they do, kept launches go through it too.

The kernels are in kernels/, their tilings in tilings.py, devices in devices.py. Kernel
arguments are passed by name.
"""
import dataclasses
import functools

import torch

from ..._buffers import device_context, new_buffer
from ...torch_common import LOG2E, score_gradient_factor
from . import running, tilings
from .calls import Call, _call, _check_device, _launch_flags, _signature
from .calls import exact_float32_on_torch, unsupported_reason  # noqa: F401
from .gluon_opt_in import (WARP_SPECIALIZED_BACKWARD_ENV, WARP_SPECIALIZED_ENV, _gluon_wanted,
                           _run_or_warn, _usable_gluon, _warp_specialized_forward,
                           backward_switch, forward_switch)
from .gluon_opt_in import (warp_specialized_backward, warp_specialized_backward_opted_in,  # noqa: F401
                           warp_specialized_forward, warp_specialized_opted_in)
from .kernel_arguments import (_aligned_length, _alignment, _lengths_argument, _memory_strides,
                               _memory_term, _padded_buffer, _padded_rows, _query_inputs,
                               _query_strides, _rows_aligned, _strides)
from .kernels.backward import (memory_read_bwd_kernel_dkdq, memory_read_bwd_kernel_dq,
                               memory_read_bwd_kernel_dv, memory_read_bwd_kernel_prepare,
                               memory_read_usage_kernel)
from .kernels.forward import memory_read_fwd_kernel, memory_read_merge_kernel
from .kernels.topk import memory_read_topk_kernel, memory_read_topk_merge_kernel
from .plans import (cdiv, dq_plan, forward_plan, select_block_n, value_blocks,
                    warp_specialized_forward_plan)
from .kept_launches import KernelLaunch, _keep_prepared, _layout_key, _run_prepared
from .kept_launches import (binding_every_launch, forget_choices,  # noqa: F401
                            planning_every_call)
from .running import KernelUnavailable, kernels_in_sequence
from .running import (NO_FALLBACK_ENV, chosen_configs, compiled_resources,  # noqa: F401
                      recording)
from .tilings import (BackwardConfig, DkdqConfig, DqConfig, DvConfig, ForwardConfig,  # noqa: F401
                      use_configs, warp_specialized_backward_config, warp_specialized_config,
                      warp_specialized_dv_config)


# --------------------------------------------------------------------------- host helpers


@dataclasses.dataclass(eq=False)
class GluonDvLaunch:
    """The Gluon dV kernel's planned launch (gluon_backward_dv.WsDvLaunch) in a
    PreparedBackward's dv place, called as the plain kernel's KernelLaunch is."""
    launch: object

    def __call__(self, call, first=False, *, q, k, do, lse, dv, **_):
        self.launch(q, k, do, lse, dv)


@dataclasses.dataclass(eq=False)
class GluonDkdqLaunch:
    """The Gluon dK/dQ kernel's planned launch (gluon_backward.WsBackwardLaunch) in a
    PreparedBackward's dkdq place, called as the plain kernel's KernelLaunch is."""
    launch: object

    def __call__(self, call, first=False, *, q, k, v, do, lse, delta, dk, dq, **_):
        self.launch(q, k, v, do, lse, delta, dq, dk)


def _gluon_dv(call, inputs, v, scale, l2, asked):
    """(dv, GluonDvLaunch) of the Gluon dV kernel, run once; None where it cannot run (with a
    warning where it was asked for)."""
    q, k, do = inputs["q"], inputs["k"], inputs["do"]
    dv = new_buffer(tuple(v.shape), v.dtype, v.device)
    config = warp_specialized_dv_config()
    gluon = _usable_gluon(call, WARP_SPECIALIZED_BACKWARD_ENV, "gluon_backward_dv", "dV kernel",
                          lambda gluon: gluon.unsupported_reason(q, k, do, dv, config), asked)
    if gluon is None:
        return None

    def run():
        ws = gluon.prepare(q, k, do, inputs["lse"], dv, scale=scale, l2=l2, config=config)
        ws(q, k, do, inputs["lse"], dv)
        return dv, GluonDvLaunch(ws)
    return _run_or_warn(WARP_SPECIALIZED_BACKWARD_ENV, "dV kernel", call, run, asked)


def _gluon_dkdq(call, inputs, v, delta, dq, scale, l2, asked):
    """(dk, dq, GluonDkdqLaunch) of the Gluon dK/dQ kernel, run once, adding into dq (the
    zeroed float32 buffer of the atomics); None where it cannot run (with a warning where it
    was asked for)."""
    q, k, do = inputs["q"], inputs["k"], inputs["do"]
    config = warp_specialized_backward_config()
    gluon = _usable_gluon(call, WARP_SPECIALIZED_BACKWARD_ENV, "gluon_backward",
                          "dK/dQ kernel",
                          lambda gluon: gluon.unsupported_reason(q, k, v, do, config), asked)
    if gluon is None:
        return None

    def run():
        dk = new_buffer(tuple(k.shape), k.dtype, k.device)
        ws = gluon.prepare(q, k, v, do, inputs["lse"], delta, dq, dk, scale=scale, l2=l2,
                           config=config)
        ws(q, k, v, do, inputs["lse"], delta, dq, dk)
        return dk, dq, GluonDkdqLaunch(ws)
    return _run_or_warn(WARP_SPECIALIZED_BACKWARD_ENV, "dK/dQ kernel", call, run, asked)


# --------------------------------------------------------------------------- forward


def _forward_inputs(q, k, v, l2, rank1, lengths, pad_query):
    """The forward kernel's tensor arguments: _query_inputs and the values."""
    return dict(_query_inputs(q, k, lengths, l2, rank1, pad_query), v=v)


def _forward_pads_query(call):
    """Whether a forward of `call` gets its query with 16-aligned rows (a copy where they are
    not): with 32-bit operands, and where one of its candidate tilings streams the query tile
    (re-read in every memory step). A 16-bit query tile that a program loads once is read as
    it is: unaligned, its loads of one tile cost less than the copy's launch (a 32-bit one
    made the TF32 tilings of sm_86 and sm_89 spill, compiled offline)."""
    return call.precision_class != "16-bit" or any(
        config.stream_queries for config in tilings.candidates(
            "forward", call.architecture, call.precision_class, call.width))


def _forward_outputs(splits, B, Cv, HW, dtype, device):
    """(out, lse, the splits' partial out, partial lse) buffers of a forward."""
    out = new_buffer((B, Cv, HW), dtype, device)
    lse = new_buffer((B, HW), torch.float32, device)
    return (out, lse) + _split_buffers(splits, out, lse)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedForward:
    """A forward planned for one layout: its kernel launches, each with its chosen config.
    forward is the plain kernel's launch, or the opted-in Gluon forward's (gluon_forward.
    WsLaunch, which takes the tensors as they are: it pads the query and streams the keys'
    norms itself)."""
    call: Call
    l2: bool
    outputs: tuple  # (splits, B, Cv, HW, dtype)
    forward: object  # KernelLaunch, or the Gluon forward's WsLaunch
    merge: KernelLaunch | None  # None: one split, nothing to merge
    pad_query: bool = True  # the plain kernel's query with 16-aligned rows (_forward_pads_query)

    def __call__(self, q, k, v, lengths):
        out, lse, part_out, part_lse = _forward_outputs(*self.outputs, k.device)
        with device_context(k.device):
            if isinstance(self.forward, KernelLaunch):
                self.forward(self.call, o=part_out, lse=part_lse,
                             **_forward_inputs(q, k, v, self.l2, self.call.rank1, lengths,
                                               self.pad_query))
            else:
                self.forward(q, k, v, part_out, part_lse)
            if self.merge is not None:
                self.merge(self.call, po=part_out, plse=part_lse, o=out, lse=lse)
        return out, lse


def _split_buffers(splits, out, lse):
    if splits == 1:
        return out.unsqueeze(0), lse.unsqueeze(0)
    B, Cv, HW = out.shape
    return (new_buffer((splits, B, Cv, HW), torch.float32, out.device),
            new_buffer((splits, B, HW), torch.float32, out.device))


def _merge_splits(call, part_out, part_lse, out, lse, i64):
    """out, lse from the memory splits' partial reads (memory_read_merge_kernel); returns the
    launch it ran."""
    B, Cv, HW = out.shape

    def launch(config):
        fixed = dict(**_strides("po", part_out, "sbcm"), **_strides("pl", part_lse, "sbm"),
                     **_strides("o", out, "bcm"), **_strides("l", lse, "bm"), HW=HW, CV=Cv,
                     SPLITS=part_out.shape[0], BLOCK_M=config.block_m, BLOCK_V=config.block_v,
                     I64=i64)
        merge = KernelLaunch(memory_read_merge_kernel,
                             (cdiv(HW, config.block_m), cdiv(Cv, config.block_v), B), config, fixed)
        merge(call, first=True, po=part_out, plse=part_lse, o=out, lse=lse)
        return merge

    return running.launch_first_that_runs("merge", call, _signature(call, out.dtype, i64),
                                          launch)


def triton_forward(q, k, v, scale, l2, lengths=None):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW) float32) for q (Bq, Ck, HW), k (B, Ck, N),
    v (B, Cv, N); q, k, v share one dtype, any strides. lengths: optional (B,) valid memory
    positions per object (validated by the caller). Planned once per layout (_layout_key)."""
    _check_device(q, k, v)
    call = _call(k, "forward", l2)
    layout = _layout_key(("forward", forward_switch()), call, scale, l2, lengths, q, k, v)
    result = _run_prepared(layout, q, k, v, lengths)
    if result is not None:
        return result
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    pad_query = _forward_pads_query(call)
    inputs = _forward_inputs(q, k, v, l2, call.rank1, lengths, pad_query)
    q, ksq, ragged = inputs["q"], inputs["ksq"], lengths is not None
    flags = _launch_flags(call, (q, k, v), outputs=[(Cv, HW)])
    align_k, align_v = _alignment(k), _alignment(v)
    arguments = dict(
        stride_sqb=ksq.stride(0), RAGGED=ragged,
        **_query_strides(q), **_memory_strides("k", k, align_k),
        **_memory_strides("v", v, align_v),
        HW=HW, N=N, CV=Cv, qk_scale=scale * LOG2E, L2=l2,
        ALIGN_K=align_k, ALIGN_V=align_v, **flags)
    gluon, asked = (None, False) if ragged or call.rank1 else \
        _warp_specialized_forward(call, q, k, v)

    def launch(config):
        plan = forward_plan(config, B, HW, N, Cv, call.device.multiprocessors)
        outputs = (plan.splits, B, Cv, HW, v.dtype)
        out, lse, part_out, part_lse = _forward_outputs(*outputs, device)
        fixed = dict(**_strides("o", part_out, "sbcm"), **_strides("l", part_lse, "sbm"),
                     n_per_split=plan.per_split, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_V=plan.block_v, NUM_V=plan.num_v,
                     STREAM_Q=config.stream_queries, **arguments)
        forward = KernelLaunch(memory_read_fwd_kernel, plan.grid(B), config, fixed)
        forward(call, first=True, o=part_out, lse=part_lse, **inputs)
        merge = None
        if plan.splits > 1:
            merge = _merge_splits(call, part_out, part_lse, out, lse, flags["I64"])
        return out, lse, PreparedForward(call, l2, outputs, forward, merge, pad_query)

    signature = _signature(call, k.dtype, Ck, Cv, l2, ragged, flags["I64"])
    with device_context(device), kernels_in_sequence(call, "forward pass", signature):
        planned = None
        if gluon is not None:
            planned = _run_or_warn(WARP_SPECIALIZED_ENV, "forward", call, lambda: _gluon_forward(
                gluon, call, q, k, v, scale, l2, flags["I64"]), asked)
        if planned is None:
            planned = running.launch_first_that_runs("forward", call, signature, launch)
    out, lse, prepared = planned
    _keep_prepared(layout, prepared)
    return out, lse


def _gluon_forward(gluon, call, q, k, v, scale, l2, i64):
    """(out, lse, PreparedForward) of the opt-in warp-specialised forward: its own query
    blocks and value chunks, then the plain merge."""
    B, _, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    ws_config = warp_specialized_config()
    plan = warp_specialized_forward_plan(ws_config, B, HW, N, Cv, call.device.multiprocessors)
    outputs = (plan.splits, B, Cv, HW, v.dtype)
    out, lse, part_out, part_lse = _forward_outputs(*outputs, k.device)
    forward = gluon.prepare(q, k, v, part_out, part_lse, per_split=plan.per_split,
                            qk_scale=scale * LOG2E, l2=l2, config=ws_config)
    forward(q, k, v, part_out, part_lse)
    merge = None
    if plan.splits > 1:
        merge = _merge_splits(call, part_out, part_lse, out, lse, i64)
    return out, lse, PreparedForward(call, l2, outputs, forward, merge)


# --------------------------------------------------------------------------- backward


def _prepare_tensors(grad_out, grad_lse, q, out, atomic_dq):
    """The prepare kernel's tensor arguments (memory_read_bwd_kernel_prepare) with the buffers
    it fills: delta (B, HW) float32; dO and q with 16-aligned rows (q compact: dQ accumulates
    with its strides), the caller's own where they already are (then only read); with
    atomic_dq the float32 dQ buffer it zeroes. An argument a call does not use (no incoming
    gradient of lse, no dQ buffer) points at delta."""
    B, _, HW = grad_out.shape
    delta = new_buffer((B, HW), torch.float32, grad_out.device)
    q_rows = q if _rows_aligned(q, compact=True) else _padded_buffer(q)
    return dict(do=grad_out, o=out, dlse=delta if grad_lse is None else grad_lse, delta=delta,
                do_copy=grad_out if _rows_aligned(grad_out) else _padded_buffer(grad_out),
                q=q, q_copy=q_rows,
                dq=_padded_buffer(q_rows, torch.float32) if atomic_dq else delta)


def _backward_inputs(filled, k, lse, lengths):
    """(the tensors every backward kernel reads, delta, dQ's zeroed buffer or None) from the
    prepare kernel's tensors (_prepare_tensors), once it has run."""
    inputs = dict(q=filled["q_copy"], k=k, do=filled["do_copy"], lse=lse.contiguous(),
                  lengths=_lengths_argument(lengths, k)[0])
    dq = filled["dq"]
    return inputs, filled["delta"], None if dq is filled["delta"] else dq


def _prepare_backward(call, grad_out, grad_lse, q, out, atomic_dq, i64):
    """(the prepare kernel's tensors, its KernelLaunch), run once."""
    filled = _prepare_tensors(grad_out, grad_lse, q, out, atomic_dq)
    B, Cv, HW = grad_out.shape
    flags = dict(GRAD_LSE=grad_lse is not None, COPY_DO=filled["do_copy"] is not grad_out,
                 COPY_Q=filled["q_copy"] is not q, ZERO_DQ=atomic_dq, I64=i64)

    def launch(config):
        fixed = dict(**_strides("do", grad_out, "bcm"), **_strides("o", out, "bcm"),
                     **_strides("gl", filled["dlse"], "bm"),
                     **_strides("d", filled["delta"], "bm"),
                     **_strides("c", filled["do_copy"], "bcm"), **_strides("q", q, "bcm"),
                     **_strides("p", filled["q_copy"], "bcm"),
                     **(_strides("dq", filled["dq"], "bcm") if atomic_dq else
                        dict(stride_dqb=0, stride_dqc=0, stride_dqm=0)),  # dq unused
                     HW=HW, CV=Cv, QC=q.shape[1], BQ=q.shape[0], BLOCK_M=config.block_m,
                     BLOCK_C=config.block_c, **flags)
        prepare = KernelLaunch(memory_read_bwd_kernel_prepare, (cdiv(HW, config.block_m), B),
                               config, fixed)
        prepare(call, first=True, **filled)
        return prepare

    prepare = running.launch_first_that_runs("prepare", call,
                                             _signature(call, grad_out.dtype, i64), launch)
    return filled, prepare


def backward_operands(q, k, v):
    """Empty (q, dO) laid out as the backward passes them to its kernels (_prepare_tensors'
    padding), for a kernel's layout check; nothing of q is read."""
    q = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    do = torch.empty((k.shape[0], v.shape[1], q.shape[2]), dtype=v.dtype, device=v.device)
    return _padded_rows(q, compact=True), _padded_rows(do)


def _summed_dq(parts, q):
    """dQ from the dQ kernel's partials (splits, B, Ck, HW), summed in a fixed order. A batch-1
    query's gradient sums over the objects too (an expanded one's does not: its expand's
    backward sums, as for the atomics path)."""
    return parts.sum(0) if q.shape[0] == parts.shape[1] else parts.sum((0, 1))[None]


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedBackward:
    """A backward planned for one layout: its kernel launches, each with its chosen config.
    dq is None where the dK/dQ kernel accumulates dQ by atomics (into the buffer the prepare
    kernel zeroes); else dkdq computes dK alone and dq is the deterministic dQ kernel's launch,
    writing partials of shape dq_parts."""
    call: Call
    l2: bool
    prepare: KernelLaunch
    dv: KernelLaunch
    dkdq: KernelLaunch
    dq: KernelLaunch | None = None
    dq_parts: tuple | None = None

    def __call__(self, grad_out, grad_lse, q, k, v, out, lse, lengths):
        # a dQ buffer wherever the prepare kernel was planned to zero one (for the atomics)
        filled = _prepare_tensors(grad_out, grad_lse, q, out, self.prepare.fixed["ZERO_DQ"])
        B, Ck, N = k.shape
        dv = new_buffer((B, v.shape[1], N), v.dtype, k.device)
        dk = new_buffer((B, Ck, N), k.dtype, k.device)
        with device_context(k.device):
            self.prepare(self.call, **filled)
            inputs, delta, dq = _backward_inputs(filled, k, lse, lengths)
            self.dv(self.call, dv=dv, **inputs)
            if self.dq is None:
                self.dkdq(self.call, v=v, delta=delta, dk=dk, dq=dq, **inputs)
            else:
                self.dkdq(self.call, v=v, delta=delta, dk=dk, dq=delta, **inputs)
                parts = new_buffer(self.dq_parts, torch.float32, k.device)
                self.dq(self.call, v=v, delta=delta, dq_parts=parts,
                        ksq=_memory_term(k, self.l2, self.call.rank1), **inputs)
                dq = _summed_dq(parts, inputs["q"])
        return dq.to(q.dtype), dk, dv


def _dq_without_atomics(call, inputs, shared, v, ksq, delta, align_v, dq_scale):
    """(dQ (Bq, Ck, HW) float32, the launch that ran, its partials' shape):
    memory_read_bwd_kernel_dq's partials per (memory split, object), summed on the host in a
    fixed order (_summed_dq). shared: the arguments all backward kernels take."""
    k, q = inputs["k"], inputs["q"]
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]

    def launch(config):
        plan = dq_plan(config, B, HW, N, Cv, call.device.multiprocessors)
        parts = new_buffer((plan["splits"], B, Ck, HW), torch.float32, k.device)
        fixed = dict(stride_sqb=ksq.stride(0), dq_scale=dq_scale,
                     **_memory_strides("v", v, align_v),
                     **_strides("pd", parts, "sbcm"), n_per_split=plan["per_split"],
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                     BLOCK_CV=plan["block_cv"], NUM_CV=plan["num_cv"], ALIGN_V=align_v,
                     STREAM_Q=config.stream_queries, **shared)
        dq = KernelLaunch(memory_read_bwd_kernel_dq, plan["grid"], config, fixed)
        dq(call, first=True, v=v, ksq=ksq, delta=delta, dq_parts=parts, **inputs)
        return parts, dq

    parts, dq = running.launch_first_that_runs("dq", call, _signature(
        call, k.dtype, Ck, Cv, shared["L2"], shared["RAGGED"], shared["I64"]), launch)
    return _summed_dq(parts, q), dq, tuple(parts.shape)


def triton_backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths=None):
    """Gradients (dq shaped like q, dk, dv) of the read; probabilities are recomputed from lse.
    A first kernel (memory_read_bwd_kernel_prepare) makes what the others read besides the
    inputs: delta, dO and q with aligned rows, the zeroed dQ accumulator. With lengths,
    positions past an object's length get zero dk, dv. dq is accumulated with atomics, except
    under torch.use_deterministic_algorithms(True), where a third kernel computes it in a
    fixed order (bitwise reproducible; about 40% more backward work). Where the fused dK/dQ
    kernel does not fit the device (tilings.SEPARATE_DQ), or none of its candidates runs
    there, dK and dQ take those two kernels in every mode. Planned once per layout
    (_layout_key)."""
    _check_device(q, k, v)
    call = _call(k, "backward", l2)
    deterministic = torch.are_deterministic_algorithms_enabled()
    layout = _layout_key(("backward", deterministic, grad_lse is None, backward_switch()),
                         call, scale, l2, lengths, q, k, v, grad_out, out,
                         *(() if grad_lse is None else (grad_lse,)))
    result = _run_prepared(layout, grad_out, grad_lse, q, k, v, out, lse, lengths)
    if result is not None:
        return result
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    ragged = lengths is not None
    padded = _aligned_length(HW)
    flags = _launch_flags(call, (q, k, v, grad_out, out),
                          outputs=[(Ck, N), (Cv, N), (Ck, padded), (Cv, padded)])
    align_k, align_v = _alignment(k), _alignment(v)
    # dK and dQ by two kernels (no atomics): deterministic, or where dK+dQ does not fit
    separate_dq = deterministic or tilings.separates_dq(
        call.architecture, call.precision_class, call.width)
    signature = _signature(call, k.dtype, Ck, Cv, l2, ragged, flags["I64"])
    # the prepare kernel first: the others read its delta, aligned copies and zeroed dQ
    with device_context(device), kernels_in_sequence(call, "backward pass", signature):
        filled, prepare = _prepare_backward(call, grad_out, grad_lse, q, out, not separate_dq,
                                            flags["I64"])
    inputs, delta, atomic_dq_buffer = _backward_inputs(filled, k, lse, lengths)
    q, grad_out = inputs["q"], inputs["do"]
    shared = dict(RAGGED=ragged, **_query_strides(q), **_memory_strides("k", k, align_k),
                  **_strides("do", grad_out, "bcm"), **_strides("l", inputs["lse"], "bm"),
                  HW=HW, N=N, CV=Cv, qk_scale=scale * LOG2E, L2=l2, ALIGN_K=align_k, **flags)

    def launch_dv(config):
        block_v, num_v = value_blocks(Cv, config.block_v)
        dv = new_buffer((B, Cv, N), v.dtype, device)
        fixed = dict(**_strides("dv", dv, "bcn"), BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_V=block_v, NUM_V=num_v,
                     STREAM_K=config.stream_keys, VOLATILE_K=call.volatile_keys(l2), **shared)
        launch = KernelLaunch(memory_read_bwd_kernel_dv, (cdiv(N, config.block_n), B * num_v),
                              config, fixed)
        launch(call, first=True, dv=dv, **inputs)
        return dv, launch

    def launch_dkdq(config, atomic_dq):
        block_cv, num_cv = value_blocks(Cv, config.block_cv)
        dk = new_buffer((B, Ck, N), k.dtype, device)
        # an unused pointer where the dQ kernel computes dq
        dq = atomic_dq_buffer if atomic_dq else delta
        fixed = dict(**_memory_strides("v", v, align_v), **_strides("dk", dk, "bcn"),
                     stride_dqb=0 if q.shape[0] == 1 else dq.stride(0),
                     dq_scale=score_gradient_factor(scale, l2),
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_CV=block_cv,
                     NUM_CV=num_cv, ALIGN_V=align_v, ATOMIC_DQ=atomic_dq,
                     STREAM_K=config.stream_keys,
                     VOLATILE_K=call.volatile_keys(l2) and not atomic_dq, **shared)
        launch = KernelLaunch(memory_read_bwd_kernel_dkdq, (cdiv(N, config.block_n), B), config,
                              fixed)
        launch(call, first=True, v=v, delta=delta, dk=dk, dq=dq, **inputs)
        return dk, dq, launch

    # the Gluon kernels (_gluon_wanted): neither takes ragged memories or the rank-1 channel;
    # dK/dQ's atomics are not deterministic, the dV kernel has none
    plain_only = ragged or call.rank1
    (dv_wanted, dv_asked), (dkdq_wanted, dkdq_asked) = (
        _gluon_wanted(call, "dv", N), _gluon_wanted(call, "dkdq", N))
    with device_context(device), kernels_in_sequence(call, "backward pass", signature):
        gluon_dv = _gluon_dv(call, inputs, v, scale, l2, dv_asked) \
            if dv_wanted and not plain_only else None
        if gluon_dv is not None:
            dv, dv_launch = gluon_dv
        else:
            dv, dv_launch = running.launch_first_that_runs("dv", call, signature, launch_dv)
        gluon_dkdq = None
        if dkdq_wanted and not (plain_only or separate_dq):
            gluon_dkdq = _gluon_dkdq(call, inputs, v, delta, atomic_dq_buffer, scale, l2,
                                     dkdq_asked)
            if gluon_dkdq is None:  # zeroed again in case it failed after adding into dQ
                atomic_dq_buffer.zero_()
        if gluon_dkdq is not None:
            dk, dq, gluon_launch = gluon_dkdq
            kept = PreparedBackward(call, l2, prepare, dv_launch, gluon_launch)
        if not separate_dq and gluon_dkdq is None:
            try:
                dk, dq, dkdq_launch = running.launch_first_that_runs(
                    "dkdq", call, signature, lambda config: launch_dkdq(config, True))
                kept = PreparedBackward(call, l2, prepare, dv_launch, dkdq_launch)
            except KernelUnavailable:  # no fused tiling runs here: dK and dQ apart (the
                separate_dq = True     # prepare kernel still zeroes the unused dQ buffer)
        if separate_dq:
            dk, _, dk_launch = running.launch_first_that_runs(
                "dk", call, signature, lambda config: launch_dkdq(config, False))
            # the dQ kernel's |k|^2 or rank-1 channel (the dK/dQ kernel loads its own from the
            # block it holds)
            dq, dq_launch, dq_parts = _dq_without_atomics(
                call, inputs, shared, v, _memory_term(k, l2, call.rank1), delta, align_v,
                score_gradient_factor(scale, l2))
            kept = PreparedBackward(call, l2, prepare, dv_launch, dk_launch, dq_launch,
                                    dq_parts)
    _keep_prepared(layout, kept)
    return dq.to(q.dtype), dk, dv


# --------------------------------------------------------------------------- top-k and usage


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
    _check_device(q, k)
    call = _call(k, "select", l2)
    layout = _layout_key(("select", top_k), call, scale, l2, lengths, q, k)
    selected = _run_prepared(layout, q, k, lengths)
    if selected is not None:
        return selected
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
    return scores, indices


def _usage_inputs(q, k, lse, lengths):
    """The usage kernel's tensor arguments: the query with 16-aligned rows, the keys, the
    read's lse as contiguous float32, the lengths."""
    return dict(q=_padded_rows(q), k=k, lse=lse.float().contiguous(),
                lengths=_lengths_argument(lengths, k)[0])


def triton_usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 memory usage for the read's lse (B, HW) (memory_read_usage_kernel).
    Planned once per layout (_layout_key)."""
    _check_device(q, k)
    call = _call(k, "usage", l2)
    layout = _layout_key("usage", call, scale, l2, lengths, q, k)
    usage = _run_prepared(layout, q, k, lse, lengths)
    if usage is not None:
        return usage
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
