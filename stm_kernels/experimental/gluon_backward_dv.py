"""Warp-specialised dV kernel of the memory read's backward for Hopper (sm_90), in Gluon.

Opt-in and experimental, beside the Gluon dK/dQ kernel (gluon_backward.py) and under the same
switch: the backward uses it only when opted in (STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1),
until a GPU run shows it correct and faster than `memory_read_bwd_kernel_dv`
(docs/gluon_backward.md); then "dv" in sm_90's tilings.Architecture.warp_specialized makes it
the default. It compiles for sm_90 without a GPU (tools/tests/test_gluon_compile.py)
and its pipeline runs on CPU under an emulation of the Gluon primitives (tests/gluon_emulation.py,
in tests/kernels/test_gluon_backward_dv.py).

Same contract as `memory_read_bwd_kernel_dv` (backends/triton/kernels/backward.py), without
ragged memories or the rank-1 channel: q (Bq, Ck, HW) with Bq = B or 1, k (B, Ck, N), do
(B, Cv, HW), lse (B, HW) float32 natural log; dv (B, Cv, N) = dO P^T per object is written
whole, P = softmax over the memory positions recomputed from lse.

The forward's pattern with the roles turned round (gluon_forward.py): one CTA per (block of
BLOCK_N memory positions, object) holds its K block; a P^T warpgroup computes S^T = K^T Q_j
and P^T once per query block j, two dV warpgroups accumulate P^T dO_j^T over half the value
channels each (64 x 256 float32 each at Cv = 512: all 512 in one warpgroup would not fit its
registers), and a load warp streams Q and dO through TMA rings. No atomics: deterministic as
the plain kernel is.

Constraints (`unsupported_reason`): CUDA tensors on sm_90, bf16/fp16, all of one dtype; Ck a
power of two in [16, 256]; Cv twice a power of two in [16, 256] (each dV warpgroup's channels
are one TMA box, loaded and stored whole); every tensor TMA-addressable (position stride 1,
other strides and the base on 16 bytes: the launcher's padded q and dO are, a contiguous dv
needs N % 8 == 0 as k does); the shared-memory estimate within the device's limit.
"""
import torch

from ..backends.triton import devices
from ..backends.triton.backward_launcher import backward_operands
from ..backends.triton.tilings import WarpSpecializedDvConfig
from ..torch_common import LOG2E
from .gluon_common import (AVAILABLE, UNAVAILABLE_REASON, KeptGluonLaunch, cdiv, device_reason,
                           nvmma_layouts, rows_2d, tma_reason)

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    from .gluon_common import barrier_ring

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "WarpSpecializedDvConfig", "unsupported_reason",
           "read_unsupported_reason", "shared_memory_bytes", "ws_backward_dv", "prepare"]


def shared_memory_bytes(Ck, Cv, element_size=2, config=None):
    """Estimated shared memory of one program: the K block, the Q and dO rings, the P^T ring
    (and barriers). dV is staged in a dO box, nothing of its own."""
    config = config or WarpSpecializedDvConfig()
    m, n = config.block_m, config.block_n
    tiles = Ck * n + config.num_stages * (Ck + Cv) * m + config.num_p * n * m
    return tiles * element_size + 8 * (4 * config.num_stages + 2 * config.num_p + 1)


# --------------------------------------------------------------------------- kernel

if AVAILABLE:
    LOG2E_C = gl.constexpr(LOG2E)

    @gluon.jit
    def _ws_dv_probability_partition(k_smem, q_smem, p_smem, kv_bar, q_ready, q_empty,
                                     p_ready, p_empty, p_lse, stride_lm, HW, m_blocks,
                                     qk_scale, L2: gl.constexpr, CK: gl.constexpr,
                                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                     NUM_STAGES: gl.constexpr, NUM_P: gl.constexpr):
        # One warpgroup: per query block j, S^T = K^T Q_j (K^T held in registers), P^T =
        # exp2(S^T qk_scale - lse_j), to the P^T ring. Nothing is masked: a row past the
        # memory (TMA-zeroed K; its P^T may overflow) only ever reaches its own dV row, which
        # the TMA store drops; a query past HW has dO = 0 (TMA zeros) and a finite P^T (its
        # Q is zero: S^T is 0, or -|k|^2 for L2, its lse 0), so it adds nothing.
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        kt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout,
                                                      k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, st_layout)  # memory positions
        col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)  # queries
        k_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

        mbarrier.wait(kv_bar, 0)
        b_kt = k_smem.permute((1, 0)).load(kt_layout)  # (BLOCK_N, CK)
        b_ksq = gl.zeros([BLOCK_N], gl.float32, row_layout)
        if L2:
            b_kf = k_smem.load(k_layout).to(gl.float32)
            b_ksq = gl.convert_layout(gl.sum(b_kf * b_kf, axis=0), row_layout)
        st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        for j in range(m_blocks):
            stage = j % NUM_STAGES
            o_m = j * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
            mbarrier.wait(q_ready.index(stage), (j // NUM_STAGES) & 1)
            b_st = warpgroup_mma(b_kt, q_smem.index(stage), st_zero, use_acc=False,
                                 is_async=True)
            b_lse2 = gl.load(p_lse + o_m * stride_lm, mask=o_m < HW, other=0.0) * LOG2E_C
            b_st = warpgroup_mma_wait(num_outstanding=0, deps=(b_st,))
            mbarrier.arrive(q_empty.index(stage), count=1)
            if L2:
                b_st = 2.0 * b_st - b_ksq[:, None]
            b_pt = gl.exp2(b_st * qk_scale - b_lse2[None, :])

            slot = j % NUM_P
            mbarrier.wait(p_empty.index(slot), ((j // NUM_P) & 1) ^ 1)
            p_smem.index(slot).store(b_pt.to(p_smem.dtype))
            fence_async_shared()  # P^T is read by wgmma (async proxy)
            mbarrier.arrive(p_ready.index(slot), count=1)

    @gluon.jit
    def _ws_dv_step(j, acc, do_smem, p_smem, do_ready, do_empty, p_ready, p_empty,
                    HALF: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_P: gl.constexpr,
                    USE_ACC: gl.constexpr):
        # acc (+)= P^T_j dO_j^T over this warpgroup's channels; the stage and slot released
        stage = j % NUM_STAGES
        slot = j % NUM_P
        mbarrier.wait(p_ready.index(slot), (j // NUM_P) & 1)
        mbarrier.wait(do_ready.index(stage), (j // NUM_STAGES) & 1)
        b_do = do_smem.index(stage * 2 + HALF).permute((1, 0))  # (BLOCK_M, CV_BOX)
        acc = warpgroup_mma(p_smem.index(slot), b_do, acc, use_acc=USE_ACC, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(p_empty.index(slot), count=1)
        mbarrier.arrive(do_empty.index(stage), count=1)
        return acc

    @gluon.jit
    def _ws_dv_accumulate_partition(do_smem, p_smem, do_ready, do_empty, p_ready, p_empty,
                                    dv_desc, dv_row, first_n, m_blocks, HALF: gl.constexpr,
                                    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                                    NUM_P: gl.constexpr, MMA_N: gl.constexpr):
        # One warpgroup: dV[its channels, this block] = sum_j (P^T_j dO_j^T)^T over the query
        # blocks, stored through shared memory by TMA (which drops the positions past N).
        CV_BOX: gl.constexpr = do_smem.shape[1]
        dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, MMA_N, 16])

        # the first block outside the loop (m_blocks >= 1): a loop that may run zero times
        # leaves a zero accumulator as the alternative, and its bf16 copy, hoisted, spilled
        acc = gl.zeros([BLOCK_N, CV_BOX], gl.float32, dv_layout)
        acc = _ws_dv_step(0, acc, do_smem, p_smem, do_ready, do_empty, p_ready, p_empty, HALF,
                          NUM_STAGES, NUM_P, False)
        for j in range(1, m_blocks):
            acc = _ws_dv_step(j, acc, do_smem, p_smem, do_ready, do_empty, p_ready, p_empty,
                              HALF, NUM_STAGES, NUM_P, True)

        # The staging tile is this warpgroup's first dO box ((CV_BOX, BLOCK_M = BLOCK_N), the
        # dV box's shape and layout): only this warpgroup reads it, its last product is done
        # and the load warp has no load left. A TMA store instead of per-element stores: their
        # 64-bit addresses beside the accumulator spilled, and dV rows are contiguous along N.
        staging = do_smem.index(HALF)
        staging.permute((1, 0)).store(acc.to(do_smem.dtype))
        fence_async_shared()  # generic writes before the TMA (async proxy) reads them
        tma.async_copy_shared_to_global(dv_desc, [dv_row + HALF * CV_BOX, first_n], staging)
        tma.store_wait(0)

    @gluon.jit
    def _ws_dv_load_partition(k_desc, q_desc, do_desc, k_smem, q_smem, do_smem, kv_bar, q_ready,
                              q_empty, do_ready, do_empty, k_row, q_row, do_row, first_n,
                              m_blocks, CV_BOX: gl.constexpr, BLOCK_M: gl.constexpr,
                              NUM_STAGES: gl.constexpr):
        # One warp: the K block once, then Q_j and dO_j into the rings, Q one block ahead of
        # dO (the P^T warpgroup runs ahead of the dV ones).
        K_BYTES: gl.constexpr = k_smem.shape[0] * k_smem.shape[1] * 2
        Q_BYTES: gl.constexpr = q_smem.shape[1] * q_smem.shape[2] * 2
        DO_BYTES: gl.constexpr = 2 * do_smem.shape[1] * do_smem.shape[2] * 2
        mbarrier.expect(kv_bar, K_BYTES)
        tma.async_copy_global_to_shared(k_desc, [k_row, first_n], kv_bar, k_smem)
        for j in range(m_blocks + 1):
            if j < m_blocks:
                stage = j % NUM_STAGES
                mbarrier.wait(q_empty.index(stage), ((j // NUM_STAGES) & 1) ^ 1)
                mbarrier.expect(q_ready.index(stage), Q_BYTES)
                tma.async_copy_global_to_shared(q_desc, [q_row, j * BLOCK_M],
                                                q_ready.index(stage), q_smem.index(stage))
            if j > 0:
                jd = j - 1
                stage = jd % NUM_STAGES
                mbarrier.wait(do_empty.index(stage), ((jd // NUM_STAGES) & 1) ^ 1)
                bar = do_ready.index(stage)
                mbarrier.expect(bar, DO_BYTES)
                for half in gl.static_range(2):
                    tma.async_copy_global_to_shared(do_desc, [do_row + half * CV_BOX, jd * BLOCK_M],
                                                    bar, do_smem.index(stage * 2 + half))

    @gluon.jit
    def memory_read_ws_bwd_dv_kernel(
        q_desc, k_desc, do_desc, dv_desc, lse, stride_lb, stride_lm, HW, N, qk_scale,
        L2: gl.constexpr, Q_BROADCAST: gl.constexpr, CK: gl.constexpr, CV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        NUM_P: gl.constexpr, P_LAYOUT: gl.constexpr, DV_REGS: gl.constexpr,
        LOAD_REGS: gl.constexpr,
    ):
        i_n = gl.program_id(0)
        i_b = gl.program_id(1)
        first_n = i_n * BLOCK_N
        m_blocks = gl.cdiv(HW, BLOCK_M)
        CV_BOX: gl.constexpr = do_desc.block_type.shape[0]  # CV // 2
        # ptxas needs the kernel-wide register target (128 at 512 threads) to fit any single
        # instruction: the dV product is issued as wgmma of n <= 128 (as gluon_forward's PV)
        MMA_N: gl.constexpr = 128 if CV_BOX > 128 else CV_BOX
        if Q_BROADCAST:
            q_row = i_b * 0
        else:
            q_row = i_b * CK

        dtype: gl.constexpr = k_desc.dtype
        k_smem = gl.allocate_shared_memory(dtype, [CK, BLOCK_N], k_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, CK, BLOCK_M], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2 * NUM_STAGES, CV_BOX, BLOCK_M],
                                            do_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [NUM_P, BLOCK_N, BLOCK_M], P_LAYOUT)

        kv_bar = barrier_ring(1, 1).index(0)
        q_ready = barrier_ring(NUM_STAGES, 1)
        q_empty = barrier_ring(NUM_STAGES, 1)
        do_ready = barrier_ring(NUM_STAGES, 1)
        do_empty = barrier_ring(NUM_STAGES, 2)  # both dV warpgroups release a dO stage
        p_ready = barrier_ring(NUM_P, 1)
        p_empty = barrier_ring(NUM_P, 2)  # and a P^T slot
        # the object folded into the pointers once, before the partitions
        p_lse = lse + i_b * stride_lb

        gl.warp_specialize([
            (_ws_dv_probability_partition,
             (k_smem, q_smem, p_smem, kv_bar, q_ready, q_empty, p_ready, p_empty, p_lse,
              stride_lm, HW, m_blocks, qk_scale, L2, CK, BLOCK_M, BLOCK_N,
              NUM_STAGES, NUM_P)),
            (_ws_dv_accumulate_partition,
             (do_smem, p_smem, do_ready, do_empty, p_ready, p_empty, dv_desc, i_b * CV,
              first_n, m_blocks, 0, BLOCK_N, NUM_STAGES, NUM_P, MMA_N)),
            (_ws_dv_accumulate_partition,
             (do_smem, p_smem, do_ready, do_empty, p_ready, p_empty, dv_desc, i_b * CV,
              first_n, m_blocks, 1, BLOCK_N, NUM_STAGES, NUM_P, MMA_N)),
            (_ws_dv_load_partition,
             (k_desc, q_desc, do_desc, k_smem, q_smem, do_smem, kv_bar, q_ready, q_empty,
              do_ready, do_empty, i_b * CK, q_row, i_b * CV, first_n, m_blocks, CV_BOX,
              BLOCK_M, NUM_STAGES)),
        ], [4, 4, 1], [DV_REGS, DV_REGS, LOAD_REGS])


# --------------------------------------------------------------------------- host side


def _layouts(dtype, Ck, Cv, config):
    """Shared-memory layouts (NVMMA swizzles) of the TMA boxes and the P^T tile; dV's box is a
    dO box (its staging buffer)."""
    m, n = config.block_m, config.block_n
    return nvmma_layouts(dtype, dict(q=[Ck, m], k=[Ck, n], do=[Cv // 2, m], dv=[Cv // 2, n],
                                     p=[n, m]))


def unsupported_reason(q, k, do, dv, config=None):
    """None when ws_backward_dv can run on these (q (Bq, Ck, HW), k (B, Ck, N), do (B, Cv, HW),
    dv (B, Cv, N)); otherwise a short reason (the caller then uses the plain kernel)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    config = config or WarpSpecializedDvConfig()
    tensors = dict(q=q, k=k, do=do, dv=dv)
    reason = device_reason(tensors) or _shape_reason(q, k, do, dv, config)
    if reason is not None:
        return reason
    shared = shared_memory_bytes(k.shape[1], do.shape[1], k.element_size(), config)
    return tma_reason(tensors, shared, devices.describe(k.device).shared_memory)


def read_unsupported_reason(q, k, v, config=None):
    """Why the opted-in kernel would not run in the backward of memory_read(q, k, v) (the
    backward then warns and takes the plain kernel), or None: unsupported_reason on the q and
    dO the backward passes its kernels (backward_launcher.backward_operands: empty, nothing
    copied) and a contiguous dv, as the backward allocates it."""
    q, do = backward_operands(q, k, v)
    return unsupported_reason(q, k, do, torch.empty_like(v, memory_format=torch.contiguous_format),
                              config)


def _shape_reason(q, k, do, dv, config):
    if any(t.dim() != 3 for t in (q, k, do, dv)):
        return "needs (B, C, L) tensors"
    B, Ck, N = k.shape
    Cv, HW = do.shape[1], q.shape[2]
    if (q.shape[1] != Ck or q.shape[0] not in (1, B) or do.shape[0] != B or do.shape[2] != HW
            or tuple(dv.shape) != (B, Cv, N)):
        return "inconsistent shapes"
    if Ck < 16 or Ck > 256 or Ck & (Ck - 1):
        return f"Ck must be a power of two in [16, 256] (got {Ck})"
    half = Cv // 2
    if Cv % 2 or half < 16 or half > 256 or half & (half - 1):
        # each dV warpgroup's channels are one TMA box, a register tile and a TMA store: a
        # power of two, exactly (a wider box would store into the next channels)
        return f"Cv must be twice a power of two in [16, 256] (got {Cv})"
    if HW == 0 or N == 0 or B == 0:
        return "empty tensor"
    if config.block_m != 64 or config.block_n != 64:
        return "block_m and block_n must be 64 (one wgmma M tile; dV staged in a dO box)"
    if config.num_stages < 1 or config.num_p < 1:
        return "num_stages and num_p must be >= 1"
    if config.load_regs < 24 or config.dv_regs > 256 or config.dv_regs % 8 or \
            config.load_regs % 8:
        return "register budgets must be multiples of 8 in [24, 256]"
    return None


def ws_backward_dv(q, k, do, lse, dv, *, scale, l2, config=None):
    """dV into dv (B, Cv, N) from q (Bq, Ck, HW), k (B, Ck, N), do (B, Cv, HW) and lse (B, HW)
    float32 (natural log)."""
    launch = prepare(q, k, do, lse, dv, scale=scale, l2=l2, config=config)
    launch(q, k, do, lse, dv)
    return dv


def prepare(q, k, do, lse, dv, *, scale, l2, config=None):
    """The WsDvLaunch of ws_backward_dv's arguments, checked (ValueError where it cannot run
    them); it launches on any later call's tensors of the same layout."""
    reason = unsupported_reason(q, k, do, dv, config)
    if reason is not None:
        raise ValueError(f"warp-specialised dV unsupported: {reason}")
    config = config or WarpSpecializedDvConfig()
    B, Ck, N = k.shape
    Cv, HW = do.shape[1], q.shape[2]
    if tuple(lse.shape) != (B, HW):
        raise ValueError(f"lse must have shape {(B, HW)}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    if lse.numel() >= 2**31:
        raise ValueError("lse has >= 2**31 elements (32-bit offsets)")
    layouts = _layouts(k.dtype, Ck, Cv, config)
    folded = all(rows_2d(t) is not None for t in (q, k, do, dv))
    fixed = dict(stride_lb=lse.stride(0), stride_lm=lse.stride(1), HW=HW, N=N,
                 qk_scale=float(scale) * LOG2E, num_warps=4,
                 **constexprs(l2, Ck, Cv, config, layouts))
    return WsDvLaunch((cdiv(N, config.block_n), B if folded else 1), layouts, fixed, folded)


def constexprs(l2, Ck, Cv, config, layouts):
    """The kernel's compile-time arguments (also the offline compile's)."""
    return dict(L2=bool(l2), CK=Ck, CV=Cv, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                NUM_STAGES=config.num_stages, NUM_P=config.num_p, P_LAYOUT=layouts["p"][1],
                DV_REGS=config.dv_regs, LOAD_REGS=config.load_regs)


class WsDvLaunch(KeptGluonLaunch):
    """ws_backward_dv planned for one call layout (gluon_common.KeptGluonLaunch). Called with a
    call's tensors of that layout, it writes dV."""
    operands = ("q", "k", "do", "dv")

    def __call__(self, q, k, do, lse, dv):
        if any(t.data_ptr() % 16 for t in (q, k, do, dv)):
            raise ValueError("warp-specialised dV: q, k, dO and dV must start on 16 bytes (TMA)")
        self.launch(memory_read_ws_bwd_dv_kernel, q, (k, do, dv),
                    lambda objects: dict(lse=lse[objects]))
