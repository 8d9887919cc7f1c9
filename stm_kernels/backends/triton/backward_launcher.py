"""The backward's launcher: triton_backward.

memory_read_bwd_kernel_prepare (delta = rowsum(dO * O) - d lse, aligned copies of dO and q, the
zeroed dQ), then memory_read_bwd_kernel_dv and memory_read_bwd_kernel_dkdq (dQ by atomics;
under torch.use_deterministic_algorithms, and where dK+dQ does not fit the device,
memory_read_bwd_kernel_dq); or, opted in (gluon_opt_in.py), the warp-specialised Gluon dV and
dK/dQ kernels (_gluon_dv, _gluon_dkdq). A layout's first call plans the launches and keeps
them (PreparedBackward, kept_launches.py).
"""
import dataclasses

import torch

from ..._buffers import device_context, new_buffer
from ...torch_common import LOG2E, score_gradient_factor
from . import running, tilings
from .calls import Call, _call, _check_device, _launch_flags, _signature
from .gluon_opt_in import (WARP_SPECIALIZED_BACKWARD_ENV, _gluon_wanted, _run_or_warn,
                           _usable_gluon, backward_switch)
from .kept_launches import KernelLaunch, _keep_prepared, _layout_key, _run_prepared
from .kernel_arguments import (_aligned_length, _alignment, _lengths_argument, _memory_strides,
                               _memory_term, _padded_buffer, _padded_rows, _query_strides,
                               _rows_aligned, _strides)
from .kernels.backward import (memory_read_bwd_kernel_dkdq, memory_read_bwd_kernel_dq,
                               memory_read_bwd_kernel_dv, memory_read_bwd_kernel_prepare)
from .plans import cdiv, dq_plan, value_blocks
from .running import KernelUnavailable, kernels_in_sequence
from .tilings import warp_specialized_backward_config, warp_specialized_dv_config


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
    writing partials of shape dq_parts. A call of the layout it was planned for makes the
    buffers the planning call made (the prepare kernel's flags say which: the layout fixes
    them) and launches the kept launches on them."""
    call: Call
    l2: bool
    prepare: KernelLaunch
    dv: KernelLaunch
    dkdq: KernelLaunch
    dq: KernelLaunch | None = None
    dq_parts: tuple | None = None
    # whether only plain kernels read the copies of dO and q (no Gluon launch, whose TMA
    # descriptors take the tensors' shapes): each copy is then its whole padded allocation
    plain: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        object.__setattr__(self, "plain", all(isinstance(launch, KernelLaunch) for launch in (
            self.dv, self.dkdq, self.dq) if launch is not None))

    def __call__(self, grad_out, grad_lse, q, k, v, out, lse, lengths):
        flags, device, plain = self.prepare.fixed, k.device, self.plain
        B, Ck, N = k.shape
        # _prepare_tensors' buffers, its checks of the rows' alignment read off the flags
        delta = new_buffer((B, grad_out.shape[2]), torch.float32, device)
        do = _rows_buffer(grad_out, plain) if flags["COPY_DO"] else grad_out
        q_rows = _rows_buffer(q, plain) if flags["COPY_Q"] else q
        # a dQ buffer wherever the prepare kernel was planned to zero one (for the atomics)
        dq = _padded_buffer(q, torch.float32) if flags["ZERO_DQ"] else delta
        dv = new_buffer((B, v.shape[1], N), v.dtype, device)
        dk = new_buffer((B, Ck, N), k.dtype, device)
        call = self.call
        inputs = dict(q=q_rows, k=k, do=do, lse=lse.contiguous(),
                      lengths=k if lengths is None else _lengths_argument(lengths, k)[0])
        with device_context(device):
            self.prepare.again(call, dict(
                do=grad_out, o=out, dlse=delta if grad_lse is None else grad_lse, delta=delta,
                do_copy=do, q=q, q_copy=q_rows, dq=dq))
            self.dv.again(call, dict(inputs, dv=dv))
            if self.dq is None:
                self.dkdq.again(call, dict(inputs, v=v, delta=delta, dk=dk, dq=dq))
            else:
                self.dkdq.again(call, dict(inputs, v=v, delta=delta, dk=dk, dq=delta))
                parts = new_buffer(self.dq_parts, torch.float32, device)
                self.dq.again(call, dict(inputs, v=v, delta=delta, dq_parts=parts,
                                         ksq=_memory_term(k, self.l2, call.rank1)))
                dq = _summed_dq(parts, q)
        return dq.to(q.dtype), dk, dv


def _rows_buffer(t, whole):
    """_padded_buffer(t) for the prepare kernel's copy of t (B, C, L) (the Gluon launches'
    TMA descriptors take its shape); where `whole`, the whole (B, C, round16(L)) buffer
    instead: the plain kernels read a copy by the strides of their plan and never past L in
    a row."""
    if not whole:
        return _padded_buffer(t)
    return new_buffer(t.shape[:2] + (_aligned_length(t.shape[2]),), t.dtype, t.device)


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


@dataclasses.dataclass(eq=False)
class GluonDvLaunch:
    """The Gluon dV kernel's planned launch (gluon_backward_dv.WsDvLaunch) in a
    PreparedBackward's dv place, called as the plain kernel's KernelLaunch is."""
    launch: object

    def __call__(self, call, first=False, *, q, k, do, lse, dv, **_):
        self.launch(q, k, do, lse, dv)

    def again(self, call, tensors):
        self(call, **tensors)


@dataclasses.dataclass(eq=False)
class GluonDkdqLaunch:
    """The Gluon dK/dQ kernel's planned launch (gluon_backward.WsBackwardLaunch) in a
    PreparedBackward's dkdq place, called as the plain kernel's KernelLaunch is."""
    launch: object

    def __call__(self, call, first=False, *, q, k, v, do, lse, delta, dk, dq, **_):
        self.launch(q, k, v, do, lse, delta, dq, dk)

    def again(self, call, tensors):
        self(call, **tensors)


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
    return backward_pass(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths)[:3]


def backward_pass(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths=None):
    """(dq, dk, dv, the PreparedBackward that computed them) as triton_backward: the pass
    kept for the call's layout, or planned on this call and kept."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    layout = _layout_key(("backward", deterministic, grad_lse is None, backward_switch()),
                         k, scale, l2, lengths, q, k, v, grad_out, out,
                         *(() if grad_lse is None else (grad_lse,)))
    kept = _run_prepared(layout, grad_out, grad_lse, q, k, v, out, lse, lengths)
    if kept is not None:
        (dq, dk, dv), prepared = kept
        return dq, dk, dv, prepared
    _check_device(q, k, v)
    call = _call(k, "backward", l2)
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
    return dq.to(q.dtype), dk, dv, kept
