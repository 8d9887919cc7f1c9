"""The forward's launcher: triton_forward.

memory_read_fwd_kernel over (query block, object x value chunk, memory split), then
memory_read_merge_kernel when the memory is split (flash-decoding); or, opted in
(gluon_opt_in.py), the warp-specialised Gluon forward (_gluon_forward) before the same merge.
A layout's first call plans the launches and keeps them (PreparedForward, kept_launches.py).

quantized_forward: memory_read_fwd_kernel_8bit (an 8-bit memory, inference only) on the same
tilings, plans and merge; kept as PreparedQuantizedForward.
"""
import dataclasses

import torch

from ..._buffers import device_context, new_buffer
from ...torch_common import LOG2E
from . import running, tilings
from .calls import Call, _call, _check_device, _launch_flags, _signature
from .devices import INTERPRETING
from .gluon_opt_in import (WARP_SPECIALIZED_ENV, _run_or_warn, _warp_specialized_forward,
                           forward_switch)
from .kept_launches import KernelLaunch, _keep_prepared, _layout_key, _run_prepared
from .kernel_arguments import (_alignment, _lengths_argument, _memory_strides, _memory_term,
                               _padded_rows, _quantized_memory_term, _query_inputs,
                               _query_strides, _scale_strides, _strides)
from .kernels.forward import (memory_read_fwd_kernel, memory_read_fwd_kernel_8bit,
                              memory_read_merge_kernel)
from .plans import cdiv, forward_plan, warp_specialized_forward_plan
from .running import KernelUnavailable, kernels_in_sequence
from .tilings import warp_specialized_config


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
        device = k.device
        out, lse, part_out, part_lse = _forward_outputs(*self.outputs, device)
        forward, call = self.forward, self.call
        with device_context(device):
            if isinstance(forward, KernelLaunch):
                forward.again(call, dict(
                    q=_padded_rows(q) if self.pad_query else q, k=k,
                    ksq=_memory_term(k, self.l2, call.rank1),
                    lengths=k if lengths is None else _lengths_argument(lengths, k)[0],
                    v=v, o=part_out, lse=part_lse))
            else:
                forward(q, k, v, part_out, part_lse)
            if self.merge is not None:
                self.merge.again(call, dict(po=part_out, plse=part_lse, o=out, lse=lse))
        return out, lse


def _planned_forward(kernel, call, config, sizes, dtype, arguments, inputs, i64):
    """(out, lse, the outputs' layout, the kernel's KernelLaunch, the merge's or None) of a
    layout's first forward with `config`: `kernel` (the plain or the 8-bit forward) planned
    by forward_plan for sizes (B, HW, N, Cv), launched on `inputs` with the layout's
    `arguments` into out in `dtype`, then the splits merged."""
    B, HW, N, Cv = sizes
    plan = forward_plan(config, B, HW, N, Cv, call.device.multiprocessors)
    outputs = (plan.splits, B, Cv, HW, dtype)
    out, lse, part_out, part_lse = _forward_outputs(*outputs, inputs["k"].device)
    fixed = dict(**_strides("o", part_out, "sbcm"), **_strides("l", part_lse, "sbm"),
                 n_per_split=plan.per_split, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                 BLOCK_V=plan.block_v, NUM_V=plan.num_v, STREAM_Q=config.stream_queries,
                 **arguments)
    forward = KernelLaunch(kernel, plan.grid(B), config, fixed)
    forward(call, first=True, o=part_out, lse=part_lse, **inputs)
    merge = _merge_splits(call, part_out, part_lse, out, lse, i64) if plan.splits > 1 else None
    return out, lse, outputs, forward, merge


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
    return forward_pass(q, k, v, scale, l2, lengths)[:2]


def forward_pass(q, k, v, scale, l2, lengths=None):
    """(out, lse, the PreparedForward that computed them) as triton_forward: the pass kept for
    the call's layout, or planned on this call and kept."""
    layout = _layout_key(("forward", forward_switch()), k, scale, l2, lengths, q, k, v)
    kept = _run_prepared(layout, q, k, v, lengths)
    if kept is not None:
        (out, lse), prepared = kept
        return out, lse, prepared
    _check_device(q, k, v)
    call = _call(k, "forward", l2)
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
        out, lse, outputs, forward, merge = _planned_forward(
            memory_read_fwd_kernel, call, config, (B, HW, N, Cv), v.dtype, arguments, inputs,
            flags["I64"])
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
    return out, lse, prepared


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


# QuantizedMemory's scale axis -> the 8-bit kernel's K_AXIS / V_AXIS (None: not 8-bit)
SCALE_AXES = {None: 0, "channel": 1, "position": 2, "channel_frame": 3}


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedQuantizedForward:
    """An 8-bit forward planned for one layout (PreparedForward's, for quantized_forward's
    tensors)."""
    call: Call
    l2: bool
    outputs: tuple  # (splits, B, Cv, HW, dtype)
    forward: KernelLaunch
    merge: KernelLaunch | None
    pad_query: bool
    key_axis: int
    decode: bool  # e4m3 codes as int8 (_decodes_fp8)

    def __call__(self, q, k, k_scale, v, v_scale, lengths):
        out, lse, part_out, part_lse = _forward_outputs(*self.outputs, k.device)
        with device_context(k.device):
            q = _key_scaled_query(q, k_scale, self.key_axis)
            self.forward.again(self.call, dict(
                q=_padded_rows(q) if self.pad_query else q, o=part_out, lse=part_lse,
                **_memory_inputs(k, k_scale, self.key_axis, v, v_scale, self.l2, lengths,
                                 self.decode)))
            if self.merge is not None:
                self.merge.again(self.call, dict(po=part_out, plse=part_lse, o=out, lse=lse))
        return out, lse


def _decodes_fp8(device):
    """Whether the 8-bit kernel gets e4m3 codes as int8 and decodes them with integer
    operations on `device` (its K_E4M3_BITS, V_E4M3_BITS): everywhere but NVIDIA's sm_89 and
    later (fp8 types in hardware; Triton refuses them before) and the interpreter."""
    if device.vendor == "interpreter":
        return False
    return not (device.vendor == "nvidia" and device.arch.startswith("sm_")
                and device.arch[3:].isdigit() and int(device.arch[3:]) >= 89)


def _codes(t, decode):
    """An 8-bit memory tensor as the kernel takes it: e4m3 codes viewed as int8 where the
    kernel decodes them (decode), else t."""
    return t.view(torch.int8) if decode and t.dtype == torch.float8_e4m3fn else t


def _memory_inputs(k, k_scale, key_axis, v, v_scale, l2, lengths, decode):
    """The 8-bit kernel's memory arguments: k, v as _codes; k_scale, v_scale (the data itself
    where there is none, never read); ksq; lengths. The pointers it never reads are the key
    codes' (a pointer type every GPU takes: sm_80 refuses an e4m3 one)."""
    k_codes, v_codes = _codes(k, decode), _codes(v, decode)
    group = k.shape[2] // k_scale.shape[2] if key_axis == 3 else 1  # positions per frame
    ksq = _quantized_memory_term(k, k_scale if key_axis else None, l2, group) if l2 \
        else k_codes
    return dict(k=k_codes, k_scale=k_codes if k_scale is k else k_scale, ksq=ksq,
                v=v_codes, v_scale=v_codes if v_scale is v else v_scale,
                lengths=k_codes if lengths is None else _lengths_argument(lengths, k)[0])


def _key_scaled_query(q, k_scale, key_axis):
    """q (Bq, Ck, HW) with the keys' channel scales k_scale (B, Ck, 1) folded in (key_axis 1:
    (B, Ck, HW), computed in float32 and rounded once to q's dtype), else q."""
    if key_axis != 1:
        return q
    return (q.to(torch.float32) * k_scale).to(q.dtype)


def quantized_forward(q, k, k_scale, k_axis, v, v_scale, v_axis, scale, l2, lengths=None):
    """(out (B, Cv, HW) in q's dtype, lse (B, HW) float32) of the read of an 8-bit memory
    (inference only; memory_read_fwd_kernel_8bit): k (B, Ck, N) and v (B, Cv, N) are int8 or
    float8_e4m3fn codes with float32 scales k_scale, v_scale ((B, C, 1) for axis "channel",
    (B, 1, N) for "position"; keys also (B, Ck, G) for "channel_frame", each scale over N / G
    consecutive positions, G dividing N), or tensors of q's dtype (scale and axis None). Any
    strides; lengths as triton_forward's. Planned once per layout, on the forward's tilings
    for q's precision."""
    key_axis, value_axis = SCALE_AXES[k_axis], SCALE_AXES[v_axis]
    if value_axis == 3:
        raise ValueError("the 8-bit kernel reads values with scales per channel or per "
                         "position, not per channel and frame")
    k_group = k.shape[2] // k_scale.shape[2] if key_axis == 3 else 1
    k_scale = k if k_scale is None else k_scale  # a pointer the kernel never reads
    v_scale = v if v_scale is None else v_scale
    # the read runs in q's dtype, on its precision's tilings
    layout = _layout_key(("forward 8-bit", key_axis, value_axis), q, scale, l2, lengths, q,
                         k, k_scale, v, v_scale)
    kept = _run_prepared(layout, q, k, k_scale, v, v_scale, lengths)
    if kept is not None:
        return kept[0]
    _check_device(q, k, v)
    call = _call(q, "forward", l2)
    if call.rank1:
        raise KernelUnavailable("forward", call.device, (
            f"an 8-bit memory of {q.shape[1]} key channels (one past a tile width) needs the "
            "rank-1 score term, which the 8-bit kernel does not have"))
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    pad_query = _forward_pads_query(call)
    decode = _decodes_fp8(call.device)
    flags = _launch_flags(call, (q, k, v), outputs=[(Cv, HW)])
    del flags["RANK1"]
    flags["UPCAST"] = INTERPRETING and q.dtype == torch.bfloat16
    q = _key_scaled_query(q, k_scale, key_axis)
    inputs = dict(q=_padded_rows(q) if pad_query else q,
                  **_memory_inputs(k, k_scale, key_axis, v, v_scale, l2, lengths, decode))
    align_k, align_v = _alignment(k), _alignment(v)
    arguments = dict(
        stride_sqb=inputs["ksq"].stride(0), RAGGED=lengths is not None,
        **_query_strides(inputs["q"]),
        **_memory_strides("k", k, align_k), **_memory_strides("v", v, align_v),
        **_scale_strides("ks", k_scale, key_axis), **_scale_strides("vs", v_scale, value_axis),
        HW=HW, N=N, CV=Cv, qk_scale=scale * LOG2E, k_group=k_group, L2=l2, ALIGN_K=align_k,
        ALIGN_V=align_v,
        K_AXIS=0 if key_axis == 1 else key_axis, V_AXIS=value_axis,
        K_E4M3_BITS=inputs["k"] is not k, V_E4M3_BITS=inputs["v"] is not v, **flags)

    def launch(config):
        out, lse, outputs, forward, merge = _planned_forward(
            memory_read_fwd_kernel_8bit, call, config, (B, HW, N, Cv), q.dtype, arguments,
            inputs, flags["I64"])
        return out, lse, PreparedQuantizedForward(call, l2, outputs, forward, merge, pad_query,
                                                  key_axis, decode)

    signature = _signature(call, "8-bit", k.dtype, v.dtype, key_axis, value_axis, Ck, Cv, l2,
                           lengths is not None, flags["I64"])
    with device_context(device), kernels_in_sequence(call, "8-bit forward pass", signature):
        out, lse, prepared = running.launch_first_that_runs("forward", call, signature, launch)
    _keep_prepared(layout, prepared)
    return out, lse
