"""Forward kernels of the fused memory read: the online-softmax read and the split merge.

Layout (channel-first, as STM stores it; any strides):
    q   (Bq, Ck, HW)   query key, Bq = B or 1 (stride 0 broadcasts it over objects)
    k   (B,  Ck, N)    memory key
    ksq (B, N)         the per-memory-position score term in float32: |k|^2 (similarity
                       "l2"), or the keys' rank-1 channel (RANK1); unread otherwise
    lengths (B,)       valid memory positions per object (ragged memories only), int32
    v   (B,  Cv, N)    memory value
    o   (S, B, Cv, HW) read-out of each memory split s (the final output when S = 1)
    lse (S, B, HW)     natural-log log-sum-exp of the scores, float32

Scores are kept in base 2 inside the kernels (scale folded with log2(e)); lse is stored in
natural log. Offsets that can pass 2**31 (object, channel and position strides) are int64.

RANK1: q and k have CK + 1 channels; the first CK form the tiled dot, and channel CK adds
u_i w_j to the scores (u its query row, w = ksq its key row): a key width one past a tile
width (XMem's 2 * 128 + 1) runs on that width's tiles instead of a tile twice as wide.

STREAM_Q: the query tile is loaded inside the loop, for every memory step, instead of once
before it and held in registers as the dot's operand: with 16 query rows per program and
mma.sync (operands in registers) every warp would hold the whole tile, 128 registers per thread
at 256 TF32 key channels. Streamed, it is not live in registers across the loop (Triton may
hoist the load again, and then keeps the tile in shared memory, read into registers per step).
"""
import triton
import triton.language as tl

from .common import (LN2_C, LOG2E_C, aligned_stride, block_scores, dot, query_block,
                     query_term, query_tile, rank1_offsets, split_bounds, tile_offsets)


@triton.jit
def _softmax_and_values(b_s, b_max, b_sum, b_acc, p_v, o_v, m_v_chan, m_n,
                        MASK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One online-softmax step: rescale the running sum and accumulator, add this block.
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))  # [BLOCK_M]
    b_alpha = tl.exp2(b_max - b_max_new)
    b_p = tl.exp2(b_s - b_max_new[:, None])  # [BLOCK_M, BLOCK_N]
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    if MASK_N:
        b_v = tl.load(p_v + o_v, mask=m_n[:, None] & m_v_chan, other=0.0)  # [BLOCK_N, BLOCK_V]
    else:
        b_v = tl.load(p_v + o_v, mask=m_v_chan, other=0.0)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, PRECISION, UPCAST)
    return b_max_new, b_sum, b_acc


@triton.jit
def memory_read_fwd_kernel(
    q, k, ksq, v, o, lse, lengths,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn, stride_sqb,
    stride_vb, stride_vc, stride_vn,
    stride_os, stride_ob, stride_oc, stride_om,
    stride_ls, stride_lb, stride_lm,
    HW, N, CK, CV, n_per_split, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, RAGGED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr,
    ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr, RANK1: tl.constexpr, STREAM_Q: tl.constexpr,
):
    # One program per (query block, object x value chunk, memory split). RAGGED: object b's
    # memory is its first lengths[b] positions; a split past it reads nothing and writes an
    # empty partial read (out 0, lse -inf), which the merge weighs by zero.
    i_m = tl.program_id(0)
    i_bv = tl.program_id(1)
    i_s = tl.program_id(2)
    i_b = (i_bv // NUM_V).to(tl.int64)
    i_v = i_bv % NUM_V
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    stride_vc = aligned_stride(stride_vc, ALIGN_V)

    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CK)
    o_v = tl.arange(0, BLOCK_V)
    o_n = tl.arange(0, BLOCK_N)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    first_v = (i_v * BLOCK_V).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_c = o_c < CK
    m_v = (i_v * BLOCK_V + o_v) < CV

    p_q = q + i_b * stride_qb + first_m * stride_qm
    b_q = query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64)  # [BLOCK_M, BLOCK_CK]
    b_u = query_term(p_q, rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64), m_m,
                     RANK1, True, BLOCK_M)  # [BLOCK_M]
    n_lo, n_hi, n_full_end = split_bounds(lengths, i_b, i_s, n_per_split, N, BLOCK_N, RAGGED)
    # Scalar int64 pointers advance through memory; the in-tile offsets stay loop-invariant.
    p_k = k + aligned_stride(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_v = (v + aligned_stride(i_b * stride_vb, ALIGN_V) + n_lo.to(tl.int64) * stride_vn
           + first_v * stride_vc)
    p_ksq = ksq + i_b * stride_sqb + n_lo  # (B, N) float32, for L2 and RANK1 only
    o_k = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [BLOCK_CK, BLOCK_N]
    o_vt = tile_offsets(o_n, o_v, stride_vn, stride_vc, I64)  # [BLOCK_N, BLOCK_V]
    m_k_chan = m_c[:, None]
    m_v_chan = m_v[None, :]

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for _ in range(n_lo, n_full_end, BLOCK_N):
        # whole blocks: no mask along N (None)
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_s = block_scores(b_qs, b_u, p_k, p_ksq, o_k, m_k_chan, None, qk_scale, L2, RANK1,
                           BLOCK_N, False, PRECISION, UPCAST)
        b_max, b_sum, b_acc = _softmax_and_values(b_s, b_max, b_sum, b_acc, p_v, o_vt, m_v_chan,
                                                  None, False, PRECISION, UPCAST)
        p_k += BLOCK_N * stride_kn
        p_ksq += BLOCK_N
        p_v += BLOCK_N * stride_vn
    if n_full_end < n_hi:
        m_n = (n_full_end + o_n) < n_hi
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_s = block_scores(b_qs, b_u, p_k, p_ksq, o_k, m_k_chan, m_n, qk_scale, L2, RANK1,
                           BLOCK_N, True, PRECISION, UPCAST)
        b_max, b_sum, b_acc = _softmax_and_values(b_s, b_max, b_sum, b_acc, p_v, o_vt, m_v_chan,
                                                  m_n, True, PRECISION, UPCAST)

    b_o = b_acc / tl.where(b_sum > 0, b_sum, 1.0)[:, None]  # [BLOCK_M, BLOCK_V]; 0 if empty
    p_o = (o + i_s.to(tl.int64) * stride_os + i_b * stride_ob + first_m * stride_om
           + first_v * stride_oc)
    tl.store(p_o + tile_offsets(o_m, o_v, stride_om, stride_oc, I64), b_o.to(p_o.dtype.element_ty),
             mask=m_m[:, None] & m_v[None, :])
    if i_v == 0:
        p_lse = lse + i_s.to(tl.int64) * stride_ls + i_b * stride_lb + first_m * stride_lm
        tl.store(p_lse + o_m * stride_lm, (b_max + tl.log2(b_sum)) * LN2_C, mask=m_m)


@triton.jit
def memory_read_merge_kernel(
    po, plse, o, lse,
    stride_pos, stride_pob, stride_poc, stride_pom,
    stride_pls, stride_plb, stride_plm,
    stride_ob, stride_oc, stride_om,
    stride_lb, stride_lm,
    HW, CV, SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, I64: tl.constexpr,
):
    # Merges the memory splits' partial reads by their log-sum-exp (flash-decoding).
    i_m = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_m = tl.arange(0, BLOCK_M)
    o_v = tl.arange(0, BLOCK_V)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    first_v = (i_v * BLOCK_V).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_vm = ((i_v * BLOCK_V + o_v) < CV)[:, None] & m_m[None, :]  # [BLOCK_V, BLOCK_M]

    p_plse = plse + i_b * stride_plb + first_m * stride_plm + o_m * stride_plm
    p_po = po + i_b * stride_pob + first_m * stride_pom + first_v * stride_poc
    o_po = tile_offsets(o_v, o_m, stride_poc, stride_pom, I64)  # [BLOCK_V, BLOCK_M]
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for i_s in range(SPLITS):
        b_max = tl.maximum(b_max, tl.load(p_plse + i_s * stride_pls, mask=m_m, other=0.0))
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
    for i_s in range(SPLITS):
        b_w = tl.exp2((tl.load(p_plse + i_s * stride_pls, mask=m_m, other=0.0) - b_max) * LOG2E_C)
        b_sum += b_w
        b_po = tl.load(p_po + i_s * stride_pos + o_po, mask=m_vm, other=0.0)
        b_acc += b_w[None, :] * b_po

    p_o = o + i_b * stride_ob + first_m * stride_om + first_v * stride_oc
    tl.store(p_o + tile_offsets(o_v, o_m, stride_oc, stride_om, I64),
             (b_acc / b_sum[None, :]).to(p_o.dtype.element_ty), mask=m_vm)
    if i_v == 0:
        tl.store(lse + i_b * stride_lb + first_m * stride_lm + o_m * stride_lm,
                 b_max + tl.log(b_sum), mask=m_m)
