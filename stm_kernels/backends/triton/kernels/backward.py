"""Backward kernels of the fused memory read.

    memory_read_bwd_kernel_prepare  one pass over the queries before the others: delta, the
                                 copies of dO and q with 16-aligned rows that the other
                                 kernels read (where the caller's are not), and the zeroed
                                 dQ buffer of the atomics, one launch instead of a torch
                                 operation (and a launch) each.

The next two kernels own a block of memory positions and loop over all queries, recomputing
the probabilities from the saved log-sum-exp; tiles are transposed (memory positions as rows):

    memory_read_bwd_kernel_dv    dV = P^T dO, one program per (memory block, object x value
                                 chunk); S^T = K Q is recomputed per value chunk.
    memory_read_bwd_kernel_dkdq  dP^T = V dO^T over all value channels, dS^T = P^T (dP^T - delta),
                                 dK = dS^T Q^T, and dQ^T = K^T dS^T added into an fp32 buffer
                                 with atomics (as FlashAttention-2/3 do), so no pass over the
                                 queries recomputes S and dP a second time.
    memory_read_bwd_kernel_dq    deterministic mode only: dQ per (query block, memory split)
                                 without atomics (S and dP recomputed once more); the dK/dQ
                                 kernel then runs with ATOMIC_DQ off.

STREAM_K (the dV and dK/dQ kernels): the program's key tile is loaded inside the loop, for
every query step (in dK/dQ once more, transposed, for dQ), instead of being held in registers
through it: where TF32, wide keys or the l2 similarity leave no room for it beside the
accumulators (mma.sync takes operands from registers), a read per step is cheaper than a
spill. With the dQ atomics in the loop the tile is read again from L1/L2 in every step;
without them (dV, dK in the deterministic mode, the usage) Triton may hoist the load and keep
the tile in shared memory instead. With FMA dots (exact float32 on NVIDIA) and the l2
similarity it hoists it into registers and spills; there the launcher sets VOLATILE_K, and the
load stays in the loop (read again from L2 in every step).
STREAM_Q (the dQ kernel): likewise its query tile, loaded in every memory step beside the
dQ accumulator it would otherwise share the registers with (see kernels/forward.py).

Layout as in kernels/forward.py; do (B, Cv, HW), delta (B, HW) = rowsum(dO * O) - d lse, lse
(B, HW) natural log; dq (Bq, Ck, HW) float32, zero on entry, the kernels' dQ terms added times
the score's derivative factor dq_scale (torch_common.score_gradient_factor: scale, 2 scale for
L2; the launcher only casts dq, no pass of its own to scale it); lengths (B,) int32 for
ragged memories (RAGGED): positions past an object's length are never read and get zero dK,
dV. With atomics dQ sums in a run-dependent order: not bitwise reproducible; the
deterministic mode is.

RANK1 (see kernels/forward.py): channel CK of q and k is the rank-1 score term u_i w_j. Its
gradients are du_i = sum_j dS_ij w_j (a row sum beside dQ: added with the dQ atomics, or
summed by the dQ kernel) and dw_j = sum_i dS_ij u_i (a column sum beside dK, in the dK/dQ
kernel), stored as channel CK of dq and dk. The memory-block kernels load w from the block
they hold, as they compute |k|^2 for L2; the dQ kernel reads it from ksq, as the forward.
"""
import triton
import triton.language as tl

from .common import (LOG2E_C, aligned_stride, dot, key_tile, query_block, query_term,
                     query_tile, rank1_offsets, split_bounds, tile_offsets, tile_scores)


@triton.jit
def _copy_block(src, dst, o_c, o_m, m_m, C, stride_sc, stride_sm, stride_dc, stride_dm,
                BLOCK_C: tl.constexpr, I64: tl.constexpr):
    # Copies channels [0, C) of one block of positions (offsets o_m, mask m_m) from src to dst.
    o_s = tile_offsets(o_c, o_m, stride_sc, stride_sm, I64)
    o_d = tile_offsets(o_c, o_m, stride_dc, stride_dm, I64)
    for c in range(0, C, BLOCK_C):
        m_cm = ((c + o_c) < C)[:, None] & m_m[None, :]
        c64 = tl.cast(c, tl.int64)  # the step's channel offsets as int64 scalars, whatever I64 says
        tl.store(dst + c64 * stride_dc + o_d, tl.load(src + c64 * stride_sc + o_s, mask=m_cm),
                 mask=m_cm)


@triton.jit
def memory_read_bwd_kernel_prepare(
    do, o, dlse, delta, do_copy, q, q_copy, dq,
    stride_dob, stride_doc, stride_dom,
    stride_ob, stride_oc, stride_om,
    stride_glb, stride_glm,
    stride_db, stride_dm,
    stride_cb, stride_cc, stride_cm,
    stride_qb, stride_qc, stride_qm,
    stride_pb, stride_pc, stride_pm,
    stride_dqb, stride_dqc, stride_dqm,
    HW, CV, QC, BQ,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GRAD_LSE: tl.constexpr,
    COPY_DO: tl.constexpr, COPY_Q: tl.constexpr, ZERO_DQ: tl.constexpr, I64: tl.constexpr,
):
    # One program per (block of BLOCK_M queries, object): delta = rowsum(dO * O) (minus the
    # incoming gradient of lse: GRAD_LSE) in float32; COPY_DO: dO into do_copy; and for the
    # query's own objects (BQ: 1 for a query shared by all), COPY_Q: q's QC channels into
    # q_copy, ZERO_DQ: zeros into dq's QC channels (the dK/dQ kernel's atomics add into them).
    i_m = tl.program_id(0)
    i_b = tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_C)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW

    p_do = do + i_b64 * stride_dob + first_m * stride_dom
    p_o = o + i_b64 * stride_ob + first_m * stride_om
    p_c = do_copy + i_b64 * stride_cb + first_m * stride_cm
    o_do = tile_offsets(o_c, o_m, stride_doc, stride_dom, I64)
    o_o = tile_offsets(o_c, o_m, stride_oc, stride_om, I64)
    o_cp = tile_offsets(o_c, o_m, stride_cc, stride_cm, I64)
    b_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, CV, BLOCK_C):
        m_cm = ((c + o_c) < CV)[:, None] & m_m[None, :]
        c64 = tl.cast(c, tl.int64)  # as in _copy_block
        b_do = tl.load(p_do + c64 * stride_doc + o_do, mask=m_cm, other=0.0)
        b_o = tl.load(p_o + c64 * stride_oc + o_o, mask=m_cm, other=0.0)
        b_delta += tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), axis=0)
        if COPY_DO:
            tl.store(p_c + c64 * stride_cc + o_cp, b_do, mask=m_cm)
    if GRAD_LSE:
        b_delta -= tl.load(dlse + i_b64 * stride_glb + (first_m + o_m) * stride_glm, mask=m_m,
                           other=0.0)
    tl.store(delta + i_b64 * stride_db + (first_m + o_m) * stride_dm, b_delta, mask=m_m)

    if i_b < BQ:
        if COPY_Q:
            _copy_block(q + i_b64 * stride_qb + first_m * stride_qm,
                        q_copy + i_b64 * stride_pb + first_m * stride_pm, o_c, o_m, m_m, QC,
                        stride_qc, stride_qm, stride_pc, stride_pm, BLOCK_C, I64)
        if ZERO_DQ:
            p_dq = dq + i_b64 * stride_dqb + first_m * stride_dqm
            o_dq = tile_offsets(o_c, o_m, stride_dqc, stride_dqm, I64)
            for c in range(0, QC, BLOCK_C):
                tl.store(p_dq + tl.cast(c, tl.int64) * stride_dqc + o_dq,
                         tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32),
                         mask=((c + o_c) < QC)[:, None] & m_m[None, :])


@triton.jit
def _probabilities_t(b_k, b_w, b_q, b_u, b_lse2, m_n, m_m, qk_scale, L2: tl.constexpr,
                     RANK1: tl.constexpr, MASK_M: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    # P^T [BLOCK_N, BLOCK_M] from K [BLOCK_N, BLOCK_CK], Q [BLOCK_CK, BLOCK_M], base-2 lse,
    # with the per-memory-position term b_w [BLOCK_N] as in common.tile_scores (|k|^2 for L2;
    # for RANK1 the keys' rank-1 channel, times the queries' b_u [BLOCK_M]).
    # Rows past the memory (loaded as k = 0) are zeroed: exp2(0 - lse) can overflow fp16 when
    # the lse is very negative (L2 scores), and inf * 0 would reach dQ as NaN.
    b_st = dot(b_k, b_q, PRECISION, UPCAST)
    if L2:
        b_st = 2.0 * b_st - b_w[:, None]
    if RANK1:
        b_st = b_st + b_w[:, None] * b_u[None, :]
    b_pt = tl.exp2(b_st * qk_scale - b_lse2[None, :])
    if MASK_M:
        b_pt = tl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)
    else:
        b_pt = tl.where(m_n[:, None], b_pt, 0.0)
    return b_pt


@triton.jit
def _memory_end(lengths, i_b, i_n, N, HW, BLOCK_N: tl.constexpr, RAGGED: tl.constexpr):
    # (valid memory positions of object i_b, queries to loop over): a memory block wholly
    # past a ragged object's length skips the loop and stores zero gradients.
    n_end = N
    hw_end = HW
    if RAGGED:
        n_end = tl.minimum(tl.load(lengths + i_b).to(tl.int32), N)
        hw_end = tl.where(i_n * BLOCK_N < n_end, HW, 0)
    return n_end, hw_end


@triton.jit
def _key_block(k, lengths, i_b, i_n, N, HW, CK, o_n, o_c, m_c, stride_kb, stride_kn, stride_kc,
               L2: tl.constexpr, RANK1: tl.constexpr, BLOCK_N: tl.constexpr,
               RAGGED: tl.constexpr, I64: tl.constexpr, ALIGN_K: tl.constexpr):
    # This program's memory block of object i_b: (p_k its first position, o_k and m_k the
    # offsets and mask of its tile, K [BLOCK_N, BLOCK_CK], its per-position score term w
    # [BLOCK_N] in fp32 (|k|^2 for L2, the rank-1 channel for RANK1, else 0), m_n its valid
    # positions, hw_end the queries to loop over). Positions past the object's memory are
    # never read.
    n_end, hw_end = _memory_end(lengths, i_b, i_n, N, HW, BLOCK_N, RAGGED)
    m_n = (i_n * BLOCK_N + o_n) < n_end
    p_k = k + aligned_stride(i_b * stride_kb, ALIGN_K) + (i_n * BLOCK_N).to(tl.int64) * stride_kn
    o_k = tile_offsets(o_n, o_c, stride_kn, stride_kc, I64)  # [BLOCK_N, BLOCK_CK]
    m_k = m_n[:, None] & m_c[None, :]
    b_k = tl.load(p_k + o_k, mask=m_k, other=0.0)
    b_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    if L2:
        b_kf = b_k.to(tl.float32)
        b_w = tl.sum(b_kf * b_kf, 1)
    if RANK1:
        b_w = tl.load(p_k + rank1_offsets(o_n, CK, stride_kc, stride_kn, RANK1, I64), mask=m_n,
                      other=0.0).to(tl.float32)
    return p_k, o_k, m_k, b_k, b_w, m_n, hw_end


@triton.jit
def _dv_step(b_k, b_w, b_dv, p_q, p_do, p_lse, o_q, o_u, o_do, o_m, m_q_chan, m_do_chan, m_n,
             m_m, stride_lm, qk_scale, p_k, o_k, m_k, L2: tl.constexpr, RANK1: tl.constexpr,
             BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, STREAM_K: tl.constexpr,
             VOLATILE_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One query block's contribution to this memory block's dV chunk. Only the last query
    # block is masked along HW (see common.block_scores). STREAM_K: the key tile is loaded
    # here rather than held in b_k.
    if STREAM_K:  # [BLOCK_N, BLOCK_CK]; volatile: see the module's docstring
        b_k = tl.load(p_k + o_k, mask=m_k, other=0.0, volatile=VOLATILE_K)
    if MASK_M:
        b_q = tl.load(p_q + o_q, mask=m_q_chan & m_m[None, :], other=0.0)  # [BLOCK_CK, BLOCK_M]
        b_lse2 = tl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0) * LOG2E_C
        b_do = tl.load(p_do + o_do, mask=m_do_chan & m_m[None, :], other=0.0)  # [BLOCK_V, BLOCK_M]
    else:
        b_q = tl.load(p_q + o_q, mask=m_q_chan, other=0.0)
        b_lse2 = tl.load(p_lse + o_m * stride_lm) * LOG2E_C
        b_do = tl.load(p_do + o_do, mask=m_do_chan, other=0.0)
    b_u = query_term(p_q, o_u, m_m, RANK1, MASK_M, BLOCK_M)
    b_pt = _probabilities_t(b_k, b_w, b_q, b_u, b_lse2, m_n, m_m, qk_scale, L2, RANK1, MASK_M,
                            PRECISION, UPCAST)
    return b_dv + dot(b_pt.to(b_do.dtype), tl.trans(b_do), PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]


@triton.jit
def memory_read_bwd_kernel_dv(
    q, k, do, lse, dv, lengths,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_dob, stride_doc, stride_dom,
    stride_lb, stride_lm,
    stride_dvb, stride_dvc, stride_dvn,
    HW, N, CK, CV, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, RAGGED: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, I64: tl.constexpr, ALIGN_K: tl.constexpr, RANK1: tl.constexpr,
    STREAM_K: tl.constexpr, VOLATILE_K: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bv = tl.program_id(1)
    i_b = (i_bv // NUM_V).to(tl.int64)
    i_v = i_bv % NUM_V

    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CK)
    o_v = tl.arange(0, BLOCK_V)
    o_m = tl.arange(0, BLOCK_M)
    first_n = (i_n * BLOCK_N).to(tl.int64)
    first_v = (i_v * BLOCK_V).to(tl.int64)
    m_c = o_c < CK
    m_v = (i_v * BLOCK_V + o_v) < CV
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    p_k, o_k, m_k, b_k, b_w, m_n, hw_end = _key_block(  # b_k [BLOCK_N, BLOCK_CK]
        k, lengths, i_b, i_n, N, HW, CK, o_n, o_c, m_c, stride_kb, stride_kn, stride_kc, L2,
        RANK1, BLOCK_N, RAGGED, I64, ALIGN_K)

    p_q = q + i_b * stride_qb
    o_u = rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64)  # [BLOCK_M]
    p_do = do + i_b * stride_dob + first_v * stride_doc
    p_lse = lse + i_b * stride_lb
    o_q = tile_offsets(o_c, o_m, stride_qc, stride_qm, I64)  # [BLOCK_CK, BLOCK_M]
    o_do = tile_offsets(o_v, o_m, stride_doc, stride_dom, I64)  # [BLOCK_V, BLOCK_M]
    m_q_chan = m_c[:, None]
    m_do_chan = m_v[:, None]

    b_dv = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    full_m_end = hw_end // BLOCK_M * BLOCK_M
    for _ in range(0, full_m_end, BLOCK_M):
        b_dv = _dv_step(b_k, b_w, b_dv, p_q, p_do, p_lse, o_q, o_u, o_do, o_m, m_q_chan,
                        m_do_chan, m_n, None, stride_lm, qk_scale, p_k, o_k, m_k, L2, RANK1,
                        BLOCK_M, False, STREAM_K, VOLATILE_K, PRECISION,
                        UPCAST)
        p_q += BLOCK_M * stride_qm
        p_do += BLOCK_M * stride_dom
        p_lse += BLOCK_M * stride_lm
    if full_m_end < hw_end:
        m_m = (full_m_end + o_m) < hw_end
        b_dv = _dv_step(b_k, b_w, b_dv, p_q, p_do, p_lse, o_q, o_u, o_do, o_m, m_q_chan,
                        m_do_chan, m_n, m_m, stride_lm, qk_scale, p_k, o_k, m_k, L2, RANK1,
                        BLOCK_M, True, STREAM_K, VOLATILE_K, PRECISION,
                        UPCAST)

    b_dv = tl.where(m_n[:, None], b_dv, 0.0)  # padded positions get zero gradient
    p_dv = dv + i_b * stride_dvb + first_n * stride_dvn + first_v * stride_dvc
    tl.store(p_dv + tile_offsets(o_n, o_v, stride_dvn, stride_dvc, I64),
             b_dv.to(p_dv.dtype.element_ty), mask=((first_n + o_n) < N)[:, None] & m_v[None, :])


@triton.jit
def _dp_t(b_v, p_v, p_do, o_vt, o_do, o_cv, m_n, m_m, stride_vc, stride_doc, CV,
          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CV: tl.constexpr,
          NUM_CV: tl.constexpr, MASK_M: tl.constexpr, PRECISION: tl.constexpr,
          UPCAST: tl.constexpr):
    # dP^T = V dO^T [BLOCK_N, BLOCK_M], reduced over all value channels: from the V block the
    # program holds (NUM_CV == 1), or streaming V and dO in NUM_CV chunks of BLOCK_CV channels
    # (when a whole V block does not fit in shared memory, e.g. in fp32).
    if NUM_CV == 1:
        m_do = (o_cv < CV)[:, None]
        if MASK_M:
            m_do = m_do & m_m[None, :]
        b_do = tl.load(p_do + o_do, mask=m_do, other=0.0)  # [BLOCK_CV, BLOCK_M]
        return dot(b_v, b_do, PRECISION, UPCAST)
    b_dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i_c in range(NUM_CV):  # a loop, not unrolled: the pipeliner streams its loads
        m_chan = (i_c * BLOCK_CV + o_cv) < CV
        m_do = m_chan[:, None]
        if MASK_M:
            m_do = m_do & m_m[None, :]
        # [BLOCK_N, BLOCK_CV]
        b_vc = tl.load(p_v + o_vt, mask=m_n[:, None] & m_chan[None, :], other=0.0)
        b_doc = tl.load(p_do + o_do, mask=m_do, other=0.0)  # [BLOCK_CV, BLOCK_M]
        b_dpt += dot(b_vc, b_doc, PRECISION, UPCAST)
        p_v += stride_vc.to(tl.int64) * BLOCK_CV
        p_do += stride_doc.to(tl.int64) * BLOCK_CV
    return b_dpt


@triton.jit
def _dkdq_step(b_k, b_w, b_v, b_dk, b_dsum, p_q, p_v, p_do, p_lse, p_delta, p_dq, o_q, o_u,
               o_vt, o_do, o_m, o_cv, m_q_chan, m_n, m_m, stride_lm, stride_vc, stride_doc, CV,
               qk_scale, dq_scale, p_k, o_k, o_kt, m_k, L2: tl.constexpr, RANK1: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CV: tl.constexpr,
               NUM_CV: tl.constexpr, MASK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               STREAM_K: tl.constexpr, VOLATILE_K: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    # One query block: dK of this memory block accumulates, dQ of the query block is added
    # (ATOMIC_DQ; otherwise memory_read_bwd_kernel_dq computes dQ in a fixed order); with
    # the atomics both from dS times dq_scale, the score's derivative factor. b_dsum
    # [BLOCK_N] accumulates sum_i dS_ij (L2) or sum_i dS_ij u_i (RANK1: dw). STREAM_K: the key
    # tile is loaded here (at o_k, and transposed at o_kt for dQ) rather than held in b_k.
    if STREAM_K:  # [BLOCK_N, BLOCK_CK]; volatile: see the module's docstring
        b_k = tl.load(p_k + o_k, mask=m_k, other=0.0, volatile=VOLATILE_K)
    if MASK_M:
        b_q = tl.load(p_q + o_q, mask=m_q_chan & m_m[None, :], other=0.0)  # [BLOCK_CK, BLOCK_M]
        b_lse2 = tl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0) * LOG2E_C
        b_delta = tl.load(p_delta + o_m * stride_lm, mask=m_m, other=0.0)
    else:
        b_q = tl.load(p_q + o_q, mask=m_q_chan, other=0.0)
        b_lse2 = tl.load(p_lse + o_m * stride_lm) * LOG2E_C
        b_delta = tl.load(p_delta + o_m * stride_lm)
    b_u = query_term(p_q, o_u, m_m, RANK1, MASK_M, BLOCK_M)
    b_pt = _probabilities_t(b_k, b_w, b_q, b_u, b_lse2, m_n, m_m, qk_scale, L2, RANK1, MASK_M,
                            PRECISION, UPCAST)
    b_dpt = _dp_t(b_v, p_v, p_do, o_vt, o_do, o_cv, m_n, m_m, stride_vc, stride_doc, CV, BLOCK_N,
                  BLOCK_M, BLOCK_CV, NUM_CV, MASK_M, PRECISION, UPCAST)
    # dS^T [BLOCK_N, BLOCK_M]; with the dQ atomics times the score's derivative factor, so
    # that dQ's terms, dK and the sums come out scaled (a product on dQ's terms instead cost
    # gfx90a's rank-1 fp16 compile a spill); dK alone is scaled once at the end (a product
    # here cost sm_90's rank-1 TF32 compile one)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    if ATOMIC_DQ:
        b_dst = b_dst * dq_scale
    b_dst = b_dst.to(b_q.dtype)
    b_dk += dot(b_dst, tl.trans(b_q), PRECISION, UPCAST)  # [BLOCK_N, BLOCK_CK]
    # the sums beside dK and dQ take dS as their dots do (no float32 copy of it kept alive)
    if L2:
        b_dsum += tl.sum(b_dst.to(tl.float32), 1)
    if RANK1:
        b_dsum += tl.sum(b_dst.to(tl.float32) * b_u[None, :], 1)
    if ATOMIC_DQ:
        if STREAM_K:
            b_kt = tl.load(p_k + o_kt, mask=m_q_chan & m_n[None, :], other=0.0)  # [CK, N]
        else:
            b_kt = tl.trans(b_k)
        b_dqt = dot(b_kt, b_dst, PRECISION, UPCAST)  # [BLOCK_CK, BLOCK_M]
        if MASK_M:
            tl.atomic_add(p_dq + o_q, b_dqt, mask=m_q_chan & m_m[None, :], sem="relaxed")
        else:
            tl.atomic_add(p_dq + o_q, b_dqt, mask=m_q_chan, sem="relaxed")
        if RANK1:  # du, the rank-1 channel of dQ (dq shares q's strides)
            b_du = tl.sum(b_dst.to(tl.float32) * b_w[:, None], 0)  # [BLOCK_M]
            if MASK_M:
                tl.atomic_add(p_dq + o_u, b_du, mask=m_m, sem="relaxed")
            else:
                tl.atomic_add(p_dq + o_u, b_du, sem="relaxed")
    return b_dk, b_dsum


@triton.jit
def memory_read_bwd_kernel_dkdq(
    q, k, v, do, lse, delta, dk, dq, lengths,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_dob, stride_doc, stride_dom,
    stride_lb, stride_lm,
    stride_dkb, stride_dkc, stride_dkn,
    stride_dqb,
    HW, N, CK, CV, dq_scale, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_CV: tl.constexpr, NUM_CV: tl.constexpr, RAGGED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr, ALIGN_K: tl.constexpr,
    ALIGN_V: tl.constexpr, ATOMIC_DQ: tl.constexpr, RANK1: tl.constexpr,
    STREAM_K: tl.constexpr, VOLATILE_K: tl.constexpr,
):
    # One program per (memory block, object). dq shares q's channel and position strides
    # (the launcher allocates it so); stride_dqb is 0 for a broadcast query, so every object
    # adds into the one query's gradient. NUM_CV == 1: the program holds its whole V block.
    # ATOMIC_DQ False: dK only (deterministic mode; dq is not touched).
    i_n = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)

    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_m = tl.arange(0, BLOCK_M)
    first_n = (i_n * BLOCK_N).to(tl.int64)
    m_c = o_c < CK
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    stride_vc = aligned_stride(stride_vc, ALIGN_V)
    p_k, o_k, m_k, b_k, b_w, m_n, hw_end = _key_block(  # b_k [BLOCK_N, BLOCK_CK]
        k, lengths, i_b, i_n, N, HW, CK, o_n, o_c, m_c, stride_kb, stride_kn, stride_kc, L2,
        RANK1, BLOCK_N, RAGGED, I64, ALIGN_K)

    p_v = v + aligned_stride(i_b * stride_vb, ALIGN_V) + first_n * stride_vn
    o_vt = tile_offsets(o_n, o_cv, stride_vn, stride_vc, I64)  # [BLOCK_N, BLOCK_CV]
    b_v = tl.zeros([BLOCK_N, BLOCK_CV], dtype=v.dtype.element_ty)
    if NUM_CV == 1:
        b_v = tl.load(p_v + o_vt, mask=m_n[:, None] & (o_cv < CV)[None, :], other=0.0)

    p_q = q + i_b * stride_qb
    p_dq = dq + i_b * stride_dqb
    p_do = do + i_b * stride_dob
    p_lse = lse + i_b * stride_lb
    p_delta = delta + i_b * stride_lb
    o_q = tile_offsets(o_c, o_m, stride_qc, stride_qm, I64)  # [BLOCK_CK, BLOCK_M]
    o_u = rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64)  # [BLOCK_M]
    o_do = tile_offsets(o_cv, o_m, stride_doc, stride_dom, I64)  # [BLOCK_CV, BLOCK_M]
    m_q_chan = m_c[:, None]

    o_kt = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [BLOCK_CK, BLOCK_N]
    b_dk = tl.zeros([BLOCK_N, BLOCK_CK], dtype=tl.float32)
    b_dsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    full_m_end = hw_end // BLOCK_M * BLOCK_M
    for _ in range(0, full_m_end, BLOCK_M):
        b_dk, b_dsum = _dkdq_step(b_k, b_w, b_v, b_dk, b_dsum, p_q, p_v, p_do, p_lse, p_delta,
                                  p_dq, o_q, o_u, o_vt, o_do, o_m, o_cv, m_q_chan, m_n, None,
                                  stride_lm, stride_vc, stride_doc, CV, qk_scale, dq_scale, p_k,
                                  o_k, o_kt, m_k, L2, RANK1, BLOCK_N, BLOCK_M, BLOCK_CV, NUM_CV,
                                  False, ATOMIC_DQ, STREAM_K, VOLATILE_K, PRECISION, UPCAST)
        p_q += BLOCK_M * stride_qm
        p_dq += BLOCK_M * stride_qm
        p_do += BLOCK_M * stride_dom
        p_lse += BLOCK_M * stride_lm
        p_delta += BLOCK_M * stride_lm
    if full_m_end < hw_end:
        m_m = (full_m_end + o_m) < hw_end
        b_dk, b_dsum = _dkdq_step(b_k, b_w, b_v, b_dk, b_dsum, p_q, p_v, p_do, p_lse, p_delta,
                                  p_dq, o_q, o_u, o_vt, o_do, o_m, o_cv, m_q_chan, m_n, m_m,
                                  stride_lm, stride_vc, stride_doc, CV, qk_scale, dq_scale, p_k,
                                  o_k, o_kt, m_k, L2, RANK1, BLOCK_N, BLOCK_M, BLOCK_CV, NUM_CV,
                                  True, ATOMIC_DQ, STREAM_K, VOLATILE_K, PRECISION, UPCAST)

    # dK = dq_scale (dS^T Q - [L2] k sum_i dS): d/dk of scale (2 q.k - |k|^2) is 2 scale
    # (q - k); dS came times dq_scale already where the dQ atomics ran
    if L2:  # k is loaded again rather than kept in fp32 registers
        b_kf = tl.load(p_k + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_dk = b_dk - b_kf * b_dsum[:, None]
    if not ATOMIC_DQ:
        b_dk = b_dk * dq_scale
        b_dsum = b_dsum * dq_scale
    b_dk = tl.where(m_n[:, None], b_dk, 0.0)  # padded positions get zero gradient
    p_dk = dk + i_b * stride_dkb + first_n * stride_dkn
    tl.store(p_dk + tile_offsets(o_n, o_c, stride_dkn, stride_dkc, I64),
             b_dk.to(p_dk.dtype.element_ty), mask=((first_n + o_n) < N)[:, None] & m_c[None, :])
    if RANK1:  # dw, the rank-1 channel of dK
        b_dw = tl.where(m_n, b_dsum, 0.0)
        tl.store(p_dk + rank1_offsets(o_n, CK, stride_dkc, stride_dkn, RANK1, I64),
                 b_dw.to(p_dk.dtype.element_ty), mask=(first_n + o_n) < N)


@triton.jit
def _dq_step(b_q, b_u, b_do, b_lse2, b_delta, b_dq, b_du, p_q, p_k, p_ksq, p_v, p_do, o_m, o_c,
             o_k, o_v, o_do, o_cv, m_c, m_k_chan, m_n, m_m, stride_qm, stride_qc, stride_vc,
             stride_doc, CV, qk_scale, L2: tl.constexpr, RANK1: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr,
             NUM_CV: tl.constexpr, MASK_N: tl.constexpr, I64: tl.constexpr,
             STREAM_Q: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One memory block's contribution to the query block's dQ [BLOCK_M, BLOCK_CK] and, RANK1,
    # to du [BLOCK_M], the rank-1 channel's. STREAM_Q: the query tile is loaded here.
    b_k = key_tile(p_k, o_k, m_k_chan, m_n, MASK_N)  # [BLOCK_CK, BLOCK_N]
    b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
    b_s, b_w = tile_scores(b_qs, b_k, b_u, p_ksq, m_n, qk_scale, L2, RANK1, BLOCK_N, MASK_N,
                           PRECISION, UPCAST)
    b_p = tl.exp2(b_s - b_lse2[:, None])  # 0 past the memory (scores -inf there)
    if NUM_CV == 1:  # the program holds its whole dO tile
        if MASK_N:
            b_v = tl.load(p_v + o_v, mask=(o_cv < CV)[:, None] & m_n[None, :], other=0.0)
        else:
            b_v = tl.load(p_v + o_v, mask=(o_cv < CV)[:, None], other=0.0)  # [BLOCK_CV, BLOCK_N]
        b_dp = dot(b_do, b_v, PRECISION, UPCAST)
    else:  # dP = dO V reduced over value chunks, dO re-read per memory block
        b_dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i_c in range(NUM_CV):
            m_chan = (i_c * BLOCK_CV + o_cv) < CV
            b_doc = tl.load(p_do + o_do, mask=m_m[:, None] & m_chan[None, :], other=0.0)
            if MASK_N:
                b_vc = tl.load(p_v + o_v, mask=m_chan[:, None] & m_n[None, :], other=0.0)
            else:
                b_vc = tl.load(p_v + o_v, mask=m_chan[:, None], other=0.0)
            b_dp += dot(b_doc, b_vc, PRECISION, UPCAST)
            p_v += stride_vc.to(tl.int64) * BLOCK_CV
            p_do += stride_doc.to(tl.int64) * BLOCK_CV
    b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
    if RANK1:
        b_du += tl.sum(b_ds * b_w[None, :], 1)
    return b_dq + dot(b_ds.to(b_k.dtype), tl.trans(b_k), PRECISION, UPCAST), b_du


@triton.jit
def memory_read_bwd_kernel_dq(
    q, k, ksq, v, do, lse, delta, dq_parts, lengths,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn, stride_sqb,
    stride_vb, stride_vc, stride_vn,
    stride_dob, stride_doc, stride_dom,
    stride_lb, stride_lm,
    stride_pds, stride_pdb, stride_pdc, stride_pdm,
    HW, N, CK, CV, n_per_split, dq_scale, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_CV: tl.constexpr, NUM_CV: tl.constexpr, RAGGED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr, ALIGN_K: tl.constexpr,
    ALIGN_V: tl.constexpr, RANK1: tl.constexpr, STREAM_Q: tl.constexpr,
):
    # Deterministic dQ: one program per (query block, object, memory split) recomputes P and
    # dP over its split's memory in order and stores its partial dQ (fp32, times the score's
    # derivative factor, as the dK/dQ kernel's atomics add theirs) into dq_parts (S, B, CK,
    # HW); the host sums the partials in a fixed order. No atomics, so the gradient is
    # bitwise reproducible (torch.use_deterministic_algorithms).
    i_m = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    stride_vc = aligned_stride(stride_vc, ALIGN_V)

    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_n = tl.arange(0, BLOCK_N)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_c = o_c < CK

    p_q = q + i_b * stride_qb + first_m * stride_qm
    b_q = tl.zeros([BLOCK_M, BLOCK_CK], dtype=q.dtype.element_ty)  # STREAM_Q: never read
    if not STREAM_Q:
        b_q = query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64)
    b_u = query_term(p_q, rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64), m_m,
                     RANK1, True, BLOCK_M)  # [BLOCK_M]
    p_do = do + i_b * stride_dob + first_m * stride_dom
    o_do = tile_offsets(o_m, o_cv, stride_dom, stride_doc, I64)  # [BLOCK_M, BLOCK_CV]
    b_do = tl.zeros([BLOCK_M, BLOCK_CV], dtype=do.dtype.element_ty)
    if NUM_CV == 1:
        b_do = tl.load(p_do + o_do, mask=m_m[:, None] & (o_cv < CV)[None, :], other=0.0)
    p_lse = lse + i_b * stride_lb + first_m * stride_lm
    b_lse2 = tl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0) * LOG2E_C
    p_delta = delta + i_b * stride_lb + first_m * stride_lm
    b_delta = tl.load(p_delta + o_m * stride_lm, mask=m_m, other=0.0)

    n_lo, n_hi, n_full_end = split_bounds(lengths, i_b, i_s, n_per_split, N, BLOCK_N, RAGGED)
    p_k = k + aligned_stride(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_v = v + aligned_stride(i_b * stride_vb, ALIGN_V) + n_lo.to(tl.int64) * stride_vn
    p_ksq = ksq + i_b * stride_sqb + n_lo  # (B, N) float32, for L2 and RANK1 only
    o_k = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [BLOCK_CK, BLOCK_N]
    o_v = tile_offsets(o_cv, o_n, stride_vc, stride_vn, I64)  # [BLOCK_CV, BLOCK_N]
    m_k_chan = m_c[:, None]

    b_dq = tl.zeros([BLOCK_M, BLOCK_CK], dtype=tl.float32)
    b_du = tl.zeros([BLOCK_M], dtype=tl.float32)
    for _ in range(n_lo, n_full_end, BLOCK_N):
        b_dq, b_du = _dq_step(b_q, b_u, b_do, b_lse2, b_delta, b_dq, b_du, p_q, p_k, p_ksq, p_v,
                              p_do, o_m, o_c, o_k, o_v, o_do, o_cv, m_c, m_k_chan, None, m_m,
                              stride_qm, stride_qc, stride_vc, stride_doc, CV, qk_scale, L2,
                              RANK1, BLOCK_M, BLOCK_N, BLOCK_CV, NUM_CV, False, I64, STREAM_Q,
                              PRECISION, UPCAST)
        p_k += BLOCK_N * stride_kn
        p_ksq += BLOCK_N
        p_v += BLOCK_N * stride_vn
    if n_full_end < n_hi:
        m_n = (n_full_end + o_n) < n_hi
        b_dq, b_du = _dq_step(b_q, b_u, b_do, b_lse2, b_delta, b_dq, b_du, p_q, p_k, p_ksq, p_v,
                              p_do, o_m, o_c, o_k, o_v, o_do, o_cv, m_c, m_k_chan, m_n, m_m,
                              stride_qm, stride_qc, stride_vc, stride_doc, CV, qk_scale, L2,
                              RANK1, BLOCK_M, BLOCK_N, BLOCK_CV, NUM_CV, True, I64, STREAM_Q,
                              PRECISION, UPCAST)

    p_part = dq_parts + i_s.to(tl.int64) * stride_pds + i_b * stride_pdb + first_m * stride_pdm
    tl.store(p_part + tile_offsets(o_m, o_c, stride_pdm, stride_pdc, I64), b_dq * dq_scale,
             mask=m_m[:, None] & m_c[None, :])
    if RANK1:
        tl.store(p_part + rank1_offsets(o_m, CK, stride_pdc, stride_pdm, RANK1, I64),
                 b_du * dq_scale, mask=m_m)


@triton.jit
def memory_read_usage_kernel(
    q, k, lse, lengths, usage,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_lb, stride_lm,
    stride_ub,
    HW, N, CK, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    RAGGED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr,
    ALIGN_K: tl.constexpr, RANK1: tl.constexpr, STREAM_K: tl.constexpr,
    VOLATILE_K: tl.constexpr,
):
    # Memory usage (XMem): one program per (memory block, object) sums the probabilities
    # exp2(S^T * c - lse) of its positions over all queries, as the dV kernel recomputes them.
    # STREAM_K as in the dV kernel.
    i_n = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CK)
    o_m = tl.arange(0, BLOCK_M)
    first_n = (i_n * BLOCK_N).to(tl.int64)
    m_c = o_c < CK
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    p_k, o_k, m_k, b_k, b_w, m_n, hw_end = _key_block(  # b_k [BLOCK_N, BLOCK_CK]
        k, lengths, i_b, i_n, N, HW, CK, o_n, o_c, m_c, stride_kb, stride_kn, stride_kc, L2,
        RANK1, BLOCK_N, RAGGED, I64, ALIGN_K)
    p_q = q + i_b * stride_qb
    p_lse = lse + i_b * stride_lb
    o_q = tile_offsets(o_c, o_m, stride_qc, stride_qm, I64)  # [BLOCK_CK, BLOCK_M]
    o_u = rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64)  # [BLOCK_M]
    m_q_chan = m_c[:, None]

    b_usage = tl.zeros([BLOCK_N], dtype=tl.float32)
    for first_m in range(0, hw_end, BLOCK_M):
        m_m = (first_m + o_m) < hw_end
        b_q = tl.load(p_q + o_q, mask=m_q_chan & m_m[None, :], other=0.0)
        b_lse2 = tl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0) * LOG2E_C
        b_u = query_term(p_q, o_u, m_m, RANK1, True, BLOCK_M)
        if STREAM_K:
            b_k = tl.load(p_k + o_k, mask=m_k, other=0.0, volatile=VOLATILE_K)
        b_pt = _probabilities_t(b_k, b_w, b_q, b_u, b_lse2, m_n, m_m, qk_scale, L2, RANK1, True,
                                PRECISION, UPCAST)  # [BLOCK_N, BLOCK_M]
        b_usage += tl.sum(b_pt, 1)
        p_q += BLOCK_M * stride_qm
        p_lse += BLOCK_M * stride_lm
    tl.store(usage + i_b * stride_ub + first_n + o_n, b_usage, mask=(first_n + o_n) < N)
