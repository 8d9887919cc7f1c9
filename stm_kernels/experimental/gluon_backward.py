"""Warp-specialised dK/dQ kernel of the memory read's backward for Hopper (sm_90), in Gluon.

Opt-in and experimental: nothing dispatches here by default. It compiles for sm_90 without a
GPU (tools/tests/test_gluon_compile.py) and its pipeline runs on CPU under an emulation of the
Gluon primitives (tests/gluon_emulation.py, in tests/kernels/test_gluon_backward.py); the
backward uses it only when opted in (STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1), until a GPU run
shows it correct and faster than `memory_read_bwd_kernel_dkdq` (docs/gluon_backward.md); then
"dkdq" in sm_90's tilings.Architecture.warp_specialized makes it the default.

Same contract as `memory_read_bwd_kernel_dkdq` with its dQ atomics (backends/triton/kernels/
backward.py), without ragged memories or the rank-1 channel: q (Bq, Ck, HW) with Bq = B or 1,
k (B, Ck, N), v (B, Cv, N), do (B, Cv, HW), lse and delta (B, HW) float32 (natural-log lse,
delta = rowsum(dO O) - d lse); dk (B, Ck, N) is written, dq (Bq, Ck, HW) float32 (zero on
entry) has the dQ terms added with atomics. Both come out times the score's derivative factor
dq_scale (scale, 2 scale for L2), as the plain kernel's do.

One CTA per (block of BLOCK_N memory positions, object), holding its K and V blocks in shared
memory, with two MMA warpgroups that take the query blocks in turn (ping-pong: one's wgmmas run
while the other does its exponentials and dQ atomics) and a load warp streaming Q and dO through
TMA rings. The partitions and barriers are described in docs/gluon_backward.md.

Constraints (`unsupported_reason`): CUDA tensors on sm_90, bf16/fp16, all of one dtype; Ck a
power of two in [16, 256]; Cv a multiple of 16 (loaded as boxes of the largest power of two
<= 256 dividing it: the boxes are the dP reduction, so none may reach into another object's
channels); every tensor TMA-addressable (position stride 1, other strides and the base 16-byte
aligned: the launcher's padded q and dO are); the shared-memory estimate within 227 KiB.
"""
import torch

from ..backends.triton import devices
from ..backends.triton.backward_launcher import backward_operands
from ..backends.triton.tilings import WarpSpecializedBackwardConfig
from ..torch_common import LOG2E, score_gradient_factor
from .gluon_common import (AVAILABLE, UNAVAILABLE_REASON, KeptGluonLaunch, cdiv, device_reason,
                           nvmma_layouts, rows_2d, tma_reason)

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    from .gluon_common import barrier_ring

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "WarpSpecializedBackwardConfig",
           "unsupported_reason", "read_unsupported_reason", "shared_memory_bytes",
           "ws_backward_dkdq", "prepare"]


def value_box(Cv):
    """Rows of one V / dO TMA box: the largest power of two <= 256 dividing Cv."""
    box = 256
    while Cv % box:
        box //= 2
    return box


def shared_memory_bytes(Ck, Cv, element_size=2, config=None):
    """Estimated shared memory of one program: the K and V blocks, the Q and dO rings, the two
    dS tiles, dK's float32 hand-over (and |k|^2, dS sums, barriers)."""
    config = config or WarpSpecializedBackwardConfig()
    m, n = config.block_m, config.block_n
    tiles = Ck * n + Cv * n + config.num_stages * (Ck * m + Cv * m) + 2 * n * m
    return tiles * element_size + 4 * n * Ck + 4 * 2 * n + 8 * (4 * config.num_stages + 2)


# --------------------------------------------------------------------------- kernel

if AVAILABLE:
    LOG2E_C = gl.constexpr(LOG2E)

    @gluon.jit
    def _opaque_zero(x):
        # 0, from an instruction the compiler cannot fold or move out of x's loop
        return gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [x], dtype=gl.int32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _ws_dkdq_mma_partition(k_smem, v_smem, q_smem, do_smem, ds_smem, dk_smem, dsum_smem,
                               kv_bar, dk_bar, q_ready, q_empty, do_ready, do_empty,
                               p_lse, p_delta, p_dq, p_dk, stride_lm, stride_dqc,
                               stride_dqm, stride_dkc, stride_dkn, first_n, HW, N, m_blocks,
                               qk_scale, dq_scale, PART: gl.constexpr, L2: gl.constexpr,
                               CK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               V_BOXES: gl.constexpr, NUM_STAGES: gl.constexpr):
        # One warpgroup: query blocks PART, PART + 2, ... of this memory block. Per block:
        # S^T = K^T Q and dP^T = V^T dO (async, dP in flight under P^T's exponentials), dS^T,
        # dK += dS^T Q^T (dS^T as the register operand), dS^T to shared memory, dQ^T = K dS^T
        # added into dq with atomics. At the end PART 1 hands its dK (and L2's dS sums) to
        # PART 0 through shared memory, which adds its own and stores dK.
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, CK, 16])
        ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk_layout,
                                                      k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, st_layout)  # memory positions of S^T
        col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)  # queries of S^T and dQ^T
        k_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        dtype: gl.constexpr = ds_smem.dtype

        o_n = gl.arange(0, BLOCK_N, layout=row_layout)
        m_n = first_n + o_n < N  # rows past the memory are TMA zeros: P^T masked to 0 there
        o_c = gl.arange(0, CK, layout=row_layout)  # rows of dQ^T

        mbarrier.wait(kv_bar, 0)
        b_ksq = gl.zeros([BLOCK_N], gl.float32, row_layout)
        if L2:
            b_kf = k_smem.index(0).load(k_layout).to(gl.float32)
            b_ksq = gl.convert_layout(gl.sum(b_kf * b_kf, axis=0), row_layout)
        st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        dqt_zero = gl.zeros([CK, BLOCK_M], gl.float32, st_layout)
        b_dk = gl.zeros([BLOCK_N, CK], gl.float32, dk_layout)
        b_dsum = gl.zeros([BLOCK_N], gl.float32, row_layout)
        for j in range(PART, m_blocks, 2):
            slot = j % NUM_STAGES
            phase = (j // NUM_STAGES) & 1
            o_m = j * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
            m_m = o_m < HW

            # K and V through an index the compiler cannot see is 0: their wgmma descriptors
            # (one 64-bit value per k-step) are formed in the loop instead of being hoisted
            # out of it and held in registers, which spilled
            kv = _opaque_zero(j)
            b_k = k_smem.index(kv)  # (CK, BLOCK_N)
            mbarrier.wait(q_ready.index(slot), phase)
            b_q = q_smem.index(slot)  # (CK, BLOCK_M)
            b_st = warpgroup_mma(b_k.permute((1, 0)), b_q, st_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(slot), phase)
            b_dpt = st_zero
            for box in gl.static_range(V_BOXES):
                b_dpt = warpgroup_mma(v_smem.index(kv * V_BOXES + box).permute((1, 0)),
                                      do_smem.index(slot * V_BOXES + box), b_dpt,
                                      use_acc=box > 0, is_async=True)
            b_st = warpgroup_mma_wait(num_outstanding=V_BOXES, deps=(b_st,))
            # lse and delta loaded where they are used, not before the waits (live across
            # them, they made the second warpgroup spill at block_m = 32); the other
            # warpgroup's MMAs cover the loads' latency
            b_lse2 = gl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0) * LOG2E_C
            if L2:
                b_st = 2.0 * b_st - b_ksq[:, None]
            b_pt = gl.exp2(b_st * qk_scale - b_lse2[None, :])
            b_pt = gl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)
            b_dpt = warpgroup_mma_wait(num_outstanding=0, deps=(b_dpt,))
            mbarrier.arrive(do_empty.index(slot), count=1)
            b_delta = gl.load(p_delta + o_m * stride_lm, mask=m_m, other=0.0)

            # dS^T times the score's derivative factor: dQ's terms, dK and the sums scaled
            b_ds = (b_pt * (b_dpt - b_delta[None, :]) * dq_scale).to(dtype)
            if L2:
                b_dsum += gl.sum(b_ds.to(gl.float32), axis=1)
            b_dk = warpgroup_mma(gl.convert_layout(b_ds, ds_layout),
                                 q_smem.index(slot).permute((1, 0)), b_dk, is_async=True)
            ds_smem.store(b_ds)
            fence_async_shared()  # dS^T is read by wgmma (async proxy)
            b_dqt = warpgroup_mma(b_k, ds_smem, dqt_zero, use_acc=False, is_async=True)
            b_dk, b_dqt = warpgroup_mma_wait(num_outstanding=0, deps=(b_dk, b_dqt))
            mbarrier.arrive(q_empty.index(slot), count=1)
            o_dq = o_c[:, None] * stride_dqc + o_m[None, :] * stride_dqm
            gl.atomic_add(p_dq + o_dq, b_dqt, mask=m_m[None, :], sem="relaxed")

        if PART == 1:
            dk_smem.store(b_dk)
            dsum_smem.store(b_dsum)
            mbarrier.arrive(dk_bar, count=1)
        else:
            mbarrier.wait(dk_bar, 0)
            b_dk += dk_smem.load(dk_layout)
            if L2:
                # dK = dq_scale (dS^T Q^T - k sum_i dS): d/dk of scale (2 q.k - |k|^2)
                b_dsum += dsum_smem.load(row_layout)
                b_kf = k_smem.index(0).permute((1, 0)).load(k_layout).to(gl.float32)
                b_dsum = gl.convert_layout(b_dsum, gl.SliceLayout(1, dk_layout))
                b_dk = b_dk - gl.convert_layout(b_kf, dk_layout) * b_dsum[:, None]
            o_nk = first_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dk_layout))
            o_ck = gl.arange(0, CK, layout=gl.SliceLayout(0, dk_layout))
            gl.store(p_dk + o_ck[None, :] * stride_dkc + o_nk[:, None] * stride_dkn,
                     b_dk.to(p_dk.dtype.element_ty), mask=(o_nk < N)[:, None])

    @gluon.jit
    def _ws_dkdq_load_partition(k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem,
                                kv_bar, q_ready, q_empty, do_ready, do_empty, k_row, v_row,
                                q_row, first_n, m_blocks,
                                BLOCK_M: gl.constexpr, V_BOXES: gl.constexpr,
                                NUM_STAGES: gl.constexpr):
        # One warp: the K and V blocks once, then Q_j and dO_j into NUM_STAGES-deep rings (dO
        # is released when dP^T is done, Q when dK and dQ are).
        CV_BOX: gl.constexpr = v_smem.shape[1]
        KV_BYTES: gl.constexpr = (k_smem.shape[1] + V_BOXES * CV_BOX) * k_smem.shape[2] * 2
        Q_BYTES: gl.constexpr = q_smem.shape[1] * q_smem.shape[2] * 2
        DO_BYTES: gl.constexpr = V_BOXES * CV_BOX * do_smem.shape[2] * 2
        mbarrier.expect(kv_bar, KV_BYTES)
        tma.async_copy_global_to_shared(k_desc, [k_row, first_n], kv_bar, k_smem.index(0))
        for box in gl.static_range(V_BOXES):
            tma.async_copy_global_to_shared(v_desc, [v_row + box * CV_BOX, first_n], kv_bar,
                                            v_smem.index(box))
        for j in range(m_blocks):
            slot = j % NUM_STAGES
            phase = ((j // NUM_STAGES) & 1) ^ 1
            mbarrier.wait(q_empty.index(slot), phase)
            mbarrier.expect(q_ready.index(slot), Q_BYTES)
            tma.async_copy_global_to_shared(q_desc, [q_row, j * BLOCK_M], q_ready.index(slot),
                                            q_smem.index(slot))
            mbarrier.wait(do_empty.index(slot), phase)
            bar = do_ready.index(slot)
            mbarrier.expect(bar, DO_BYTES)
            for box in gl.static_range(V_BOXES):
                tma.async_copy_global_to_shared(do_desc, [v_row + box * CV_BOX, j * BLOCK_M],
                                                bar, do_smem.index(slot * V_BOXES + box))

    @gluon.jit
    def memory_read_ws_bwd_dkdq_kernel(
        q_desc, k_desc, v_desc, do_desc, lse, delta, dq, dk,
        stride_lb, stride_lm, stride_dqb, stride_dqc, stride_dqm,
        stride_dkb, stride_dkc, stride_dkn,
        HW, N, qk_scale, dq_scale,
        L2: gl.constexpr, Q_BROADCAST: gl.constexpr, CK: gl.constexpr, CV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        DS_LAYOUT: gl.constexpr, MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
    ):
        i_n = gl.program_id(0)
        i_b = gl.program_id(1)
        first_n = i_n * BLOCK_N
        m_blocks = gl.cdiv(HW, BLOCK_M)
        CV_BOX: gl.constexpr = v_desc.block_type.shape[0]
        V_BOXES: gl.constexpr = CV // CV_BOX
        if Q_BROADCAST:
            q_row = i_b * 0
        else:
            q_row = i_b * CK

        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [1, CK, BLOCK_N], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_BOXES, CV_BOX, BLOCK_N], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, CK, BLOCK_M], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES * V_BOXES, CV_BOX, BLOCK_M],
                                            do_desc.layout)
        ds0_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], DS_LAYOUT)
        ds1_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], DS_LAYOUT)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        dk_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N, CK], plain)
        dsum_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))

        kv_bar = barrier_ring(1, 1).index(0)
        dk_bar = barrier_ring(1, 1).index(0)
        q_ready = barrier_ring(NUM_STAGES, 1)
        q_empty = barrier_ring(NUM_STAGES, 1)
        do_ready = barrier_ring(NUM_STAGES, 1)
        do_empty = barrier_ring(NUM_STAGES, 1)
        # the object folded into the pointers once, before the partitions
        p_lse = lse + i_b * stride_lb
        p_delta = delta + i_b * stride_lb
        p_dq = dq + i_b * stride_dqb
        p_dk = dk + i_b * stride_dkb

        gl.warp_specialize([
            (_ws_dkdq_mma_partition,
             (k_smem, v_smem, q_smem, do_smem, ds0_smem, dk_smem, dsum_smem, kv_bar, dk_bar,
              q_ready, q_empty, do_ready, do_empty, p_lse, p_delta, p_dq, p_dk, stride_lm,
              stride_dqc, stride_dqm, stride_dkc, stride_dkn, first_n, HW, N, m_blocks,
              qk_scale, dq_scale, 0, L2, CK, BLOCK_M, BLOCK_N, V_BOXES, NUM_STAGES)),
            (_ws_dkdq_mma_partition,
             (k_smem, v_smem, q_smem, do_smem, ds1_smem, dk_smem, dsum_smem, kv_bar, dk_bar,
              q_ready, q_empty, do_ready, do_empty, p_lse, p_delta, p_dq, p_dk, stride_lm,
              stride_dqc, stride_dqm, stride_dkc, stride_dkn, first_n, HW, N, m_blocks,
              qk_scale, dq_scale, 1, L2, CK, BLOCK_M, BLOCK_N, V_BOXES, NUM_STAGES)),
            (_ws_dkdq_load_partition,
             (k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready,
              q_empty, do_ready, do_empty, i_b * CK, i_b * CV, q_row, first_n, m_blocks,
              BLOCK_M, V_BOXES, NUM_STAGES)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])


# --------------------------------------------------------------------------- host side


def _layouts(dtype, Ck, Cv, config):
    """Shared-memory layouts (NVMMA swizzles) of the TMA boxes and the dS^T tile."""
    box, m, n = value_box(Cv), config.block_m, config.block_n
    return nvmma_layouts(dtype, dict(q=[Ck, m], k=[Ck, n], v=[box, n], do=[box, m], ds=[n, m]))


def unsupported_reason(q, k, v, do, config=None):
    """None when ws_backward_dkdq can run on these (q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N),
    do (B, Cv, HW)); otherwise a short reason (the caller then uses the plain kernels)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    config = config or WarpSpecializedBackwardConfig()
    tensors = dict(q=q, k=k, v=v, do=do)
    reason = device_reason(tensors) or _shape_reason(q, k, v, do, config)
    if reason is not None:
        return reason
    shared = shared_memory_bytes(k.shape[1], v.shape[1], k.element_size(), config)
    return tma_reason(tensors, shared, devices.describe(k.device).shared_memory)


def read_unsupported_reason(q, k, v, config=None):
    """Why the opted-in kernel would not run in the backward of memory_read(q, k, v) (the
    backward then warns and takes the plain kernel), or None: unsupported_reason on the q and
    dO the backward passes its kernels (backward_launcher.backward_operands: empty, nothing
    copied)."""
    q, do = backward_operands(q, k, v)
    return unsupported_reason(q, k, v, do, config)


def _shape_reason(q, k, v, do, config):
    if any(t.dim() != 3 for t in (q, k, v, do)):
        return "needs (B, C, L) tensors"
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    if (tuple(v.shape) != (B, Cv, N) or q.shape[1] != Ck or q.shape[0] not in (1, B)
            or tuple(do.shape) != (B, Cv, HW)):
        return "inconsistent shapes"
    if Ck < 16 or Ck > 256 or Ck & (Ck - 1):
        return f"Ck must be a power of two in [16, 256] (got {Ck})"
    if Cv % 16:
        return f"Cv must be a multiple of 16 (got {Cv})"
    if HW == 0 or N == 0 or B == 0:
        return "empty tensor"
    m, n = config.block_m, config.block_n
    if m not in (16, 32, 64) or n != 64:
        return "block_m must be 16, 32 or 64, block_n 64 (one wgmma M tile)"
    if config.num_stages < 2:
        # query block j takes ring slot j % num_stages; a warpgroup waits for block j after
        # consuming block j - 2, which the load warp fetched after block j - num_stages, the
        # slot's previous round: with one stage that round may not have landed, and a wait
        # two rounds ahead of the barrier passes on its phase parity
        return f"num_stages must be at least 2 (got {config.num_stages})"
    if config.load_regs < 24 or config.mma_regs > 256 or config.mma_regs % 8 or \
            config.load_regs % 8:
        return "register budgets must be multiples of 8 in [24, 256]"
    return None


def ws_backward_dkdq(q, k, v, do, lse, delta, dq, dk, *, scale, l2, config=None):
    """dK into dk (B, Ck, N) and dQ's terms added into dq (Bq, Ck, HW) float32, both times the
    score's derivative factor (scale, 2 scale for L2), from lse and delta (B, HW) float32."""
    launch = prepare(q, k, v, do, lse, delta, dq, dk, scale=scale, l2=l2, config=config)
    launch(q, k, v, do, lse, delta, dq, dk)
    return dq, dk


def prepare(q, k, v, do, lse, delta, dq, dk, *, scale, l2, config=None):
    """The WsBackwardLaunch of ws_backward_dkdq's arguments, checked (ValueError where it cannot
    run them); it launches on any later call's tensors of the same layout."""
    reason = unsupported_reason(q, k, v, do, config)
    if reason is not None:
        raise ValueError(f"warp-specialised dK/dQ unsupported: {reason}")
    config = config or WarpSpecializedBackwardConfig()
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    for name, t, shape in (("lse", lse, (B, HW)), ("delta", delta, (B, HW)),
                           ("dq", dq, (q.shape[0], Ck, HW)), ("dk", dk, (B, Ck, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if lse.stride() != delta.stride():
        raise ValueError("lse and delta must have the same strides")
    if dq.dtype != torch.float32 or lse.dtype != torch.float32 or delta.dtype != torch.float32:
        raise ValueError("dq, lse and delta must be float32")
    if dk.dtype != k.dtype:
        raise ValueError(f"dk must be {k.dtype} like k, got {dk.dtype}")
    if max(t.numel() for t in (dq, dk, lse)) >= 2**31:
        raise ValueError("dq, dk or lse has >= 2**31 elements (32-bit offsets)")
    layouts = _layouts(k.dtype, Ck, Cv, config)
    folded = all(rows_2d(t) is not None for t in (q, k, v, do))
    fixed = dict(stride_lb=lse.stride(0), stride_lm=lse.stride(1),
                 stride_dqb=0 if q.shape[0] == 1 else dq.stride(0), stride_dqc=dq.stride(1),
                 stride_dqm=dq.stride(2), stride_dkb=dk.stride(0), stride_dkc=dk.stride(1),
                 stride_dkn=dk.stride(2), HW=HW, N=N, qk_scale=float(scale) * LOG2E,
                 dq_scale=score_gradient_factor(float(scale), l2), num_warps=4,
                 **constexprs(l2, Ck, Cv, config, layouts))
    return WsBackwardLaunch((cdiv(N, config.block_n), B if folded else 1), layouts, fixed,
                            folded)


def constexprs(l2, Ck, Cv, config, layouts):
    """The kernel's compile-time arguments (also the offline compile's)."""
    return dict(L2=bool(l2), CK=Ck, CV=Cv, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                NUM_STAGES=config.num_stages, DS_LAYOUT=layouts["ds"][1],
                MMA_REGS=config.mma_regs, LOAD_REGS=config.load_regs)


class WsBackwardLaunch(KeptGluonLaunch):
    """ws_backward_dkdq planned for one call layout (gluon_common.KeptGluonLaunch). Called
    with a call's tensors of that layout, it writes dK and adds to dQ."""
    operands = ("q", "k", "v", "do")

    def __call__(self, q, k, v, do, lse, delta, dq, dk):
        if any(t.data_ptr() % 16 for t in (q, k, v, do)):
            raise ValueError("warp-specialised dK/dQ: q, k, v and dO must start on 16 bytes "
                             "(TMA)")

        def pointers(objects):
            # a batch-1 query's dq gathers every object's terms
            dq_objects = slice(None) if q.shape[0] == 1 else objects
            return dict(lse=lse[objects], delta=delta[objects], dq=dq[dq_objects],
                        dk=dk[objects])

        self.launch(memory_read_ws_bwd_dkdq_kernel, q, (k, v, do), pointers)
