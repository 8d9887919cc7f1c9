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

memory_read_fwd_kernel_8bit reads an 8-bit memory (stm_kernels.QuantizedMemory): k and/or v
int8 or float8 e4m3 codes, each with float32 scales per channel (k_scale (B, Ck, 1), v_scale
(B, Cv, 1)) or per memory position ((B, 1, N)); a part that is not 8-bit is in the query's
dtype. Its tiles are loaded in 8 bits and converted in registers to the query's dtype, which
is exact (an int8 code or an e4m3 value is representable in fp16, bf16 and fp32); no widened
copy of the memory exists anywhere. The scales are not multiplied into the tiles but into the
operand or result they factor out of, which is exact in real arithmetic and rounds no 8-bit
element: a key scale per channel s_c into the query (q_i.(k_j * s) = (q_i * s).k_j; by the
host, once per call: a query tile scaled in registers stays in registers through the loop as
wgmma's operand, where a loaded one is held in shared memory, and sm_90 spilled), a key scale
per position s_j into the scores' columns (s_j q_i.k_j, before |k_j|^2 is subtracted), a value
scale per position s_j into p's columns before the PV product (sum_j (p_ij s_j) v_j), a value
scale per channel s_c into the accumulator's columns at the end (s_c sum_j p_ij v_cj). The
softmax's sum and the lse use the unscaled p.

Keys with a scale per channel and frame (k_scale (B, Ck, G), each scale over k_group
consecutive positions: a memory bank's frames) factor out of neither the query nor the
scores' columns, as a tile's positions may lie in two frames: the key tile is converted to
float32, multiplied by its positions' frames' channel scales and rounded once to the query's
dtype, all in registers, each element's scale gathered from its position's frame (the one
or two frames' scales of a tile stay in L1). Loading a tile's two frames' scale vectors and
selecting per column instead held more registers: it spilled on sm_80 (docs/op.md).
"""
import triton
import triton.language as tl

from .common import (LN2_C, LOG2E_C, aligned_stride, block_scores, dot, key_tile, query_block,
                     query_term, query_tile, rank1_offsets, scores_of_dot, split_bounds,
                     tile_offsets)


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
def _scale_vector(p_s, o_s, m_s, USED: tl.constexpr, MASKED: tl.constexpr, SIZE: tl.constexpr):
    # A vector [SIZE] of float32 scales at p_s + o_s (0 past m_s when MASKED); ones, never
    # read, when not USED.
    b_scale = tl.full([SIZE], 1.0, tl.float32)
    if USED:
        if MASKED:
            b_scale = tl.load(p_s + o_s, mask=m_s, other=0.0)
        else:
            b_scale = tl.load(p_s + o_s)
    return b_scale


@triton.jit
def _converted(b_codes, dtype: tl.constexpr, UPCAST: tl.constexpr, E4M3_BITS: tl.constexpr):
    # 8-bit codes (or a tile already in dtype) in the dot's operand dtype: exact. UPCAST (the
    # interpreter's bf16, whose dot runs in fp32): float32, as the interpreter converts int8
    # to bf16 wrongly. E4M3_BITS (GPUs without fp8 types, before sm_89): e4m3 codes passed as
    # int8, decoded by integer operations, their sign, exponent and mantissa shifted into
    # fp16's fields, which read as 2^-8 times the value (subnormal codes too; the NaN codes,
    # which QuantizedMemory.quantize never writes, read as 480).
    b_wide = b_codes
    if E4M3_BITS:
        b_bits = b_codes.to(tl.int16) * 128
        b_wide = (b_bits & -16512).to(tl.float16, bitcast=True) * 256.0  # 0xBF80 as int16
    if UPCAST:
        return b_wide.to(tl.float32)
    return b_wide.to(dtype)


@triton.jit
def _frame_scales(p_kf, o_kfc, m_c, n0, o_n, N, k_group, stride_ksn):
    # [BLOCK_CK, BLOCK_N] float32: for key positions n0 + o_n (n0 absolute), the channel
    # scales of each one's frame (k_group positions per frame; p_kf the object's scales,
    # o_kfc the channels' offsets), gathered (cached: a tile reads one or two frames' scales).
    b_frame = tl.minimum(n0 + o_n, N - 1) // k_group
    return tl.load(p_kf + o_kfc[:, None] + b_frame[None, :] * stride_ksn, mask=m_c[:, None],
                   other=0.0)


@triton.jit
def _quantized_step(b_q, b_max, b_sum, b_acc, p_k, o_k, m_k_chan, p_ks, o_ks, p_ksq,
                    p_v, o_v, m_v_chan, p_vs, o_vs, m_n, qk_scale,
                    p_kf, o_kfc, m_c, n0, o_n, N, k_group, stride_ksn,
                    K_AXIS: tl.constexpr, V_AXIS: tl.constexpr, L2: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, K_E4M3_BITS: tl.constexpr,
                    V_E4M3_BITS: tl.constexpr):
    # One memory block of the 8-bit read: its key and value tiles loaded in their storage
    # dtype and converted to the query's (exact for int8 and e4m3 codes), the per-position
    # scales applied to the scores' columns (keys) and to p's columns (values); keys with
    # scales per channel and frame (K_AXIS 3) dequantised in registers (module docstring).
    b_k = key_tile(p_k, o_k, m_k_chan, m_n, MASK_N)
    if K_AXIS == 3:
        b_kd = _converted(b_k, tl.float32, False, K_E4M3_BITS) * _frame_scales(
            p_kf, o_kfc, m_c, n0, o_n, N, k_group, stride_ksn)
        if not UPCAST:
            b_kd = b_kd.to(b_q.dtype)
    else:
        b_kd = _converted(b_k, b_q.dtype, UPCAST, K_E4M3_BITS)
    b_s = dot(b_q, b_kd, PRECISION, UPCAST)
    if K_AXIS == 2:
        b_s = b_s * _scale_vector(p_ks, o_ks, m_n, True, MASK_N, BLOCK_N)[None, :]
    b_s, _ = scores_of_dot(b_s, 0.0, p_ksq, m_n, qk_scale, L2, False, BLOCK_N, MASK_N)
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_max - b_max_new)
    b_p = tl.exp2(b_s - b_max_new[:, None])
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    if MASK_N:
        b_v = tl.load(p_v + o_v, mask=m_n[:, None] & m_v_chan, other=0.0)
    else:
        b_v = tl.load(p_v + o_v, mask=m_v_chan, other=0.0)
    if V_AXIS == 2:
        b_p = b_p * _scale_vector(p_vs, o_vs, m_n, True, MASK_N, BLOCK_N)[None, :]
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_q.dtype),
                                           _converted(b_v, b_q.dtype, UPCAST, V_E4M3_BITS),
                                           PRECISION, UPCAST)
    return b_max_new, b_sum, b_acc


@triton.jit
def memory_read_fwd_kernel_8bit(
    q, k, k_scale, ksq, v, v_scale, o, lse, lengths,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn, stride_ksb, stride_ksc, stride_ksn, stride_sqb,
    stride_vb, stride_vc, stride_vn, stride_vsb, stride_vsc, stride_vsn,
    stride_os, stride_ob, stride_oc, stride_om,
    stride_ls, stride_lb, stride_lm,
    HW, N, CK, CV, n_per_split, qk_scale, k_group,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, RAGGED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr,
    ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr, STREAM_Q: tl.constexpr,
    K_AXIS: tl.constexpr, V_AXIS: tl.constexpr, K_E4M3_BITS: tl.constexpr,
    V_E4M3_BITS: tl.constexpr,
):
    # memory_read_fwd_kernel for an 8-bit memory (module docstring). K_AXIS: 0 for keys in
    # the query's dtype or 8-bit keys whose channel scales the host folded into q, 2 for a
    # scale per position, 3 per channel and frame (k_scale (B, Ck, G), k_group positions per
    # frame); V_AXIS: 0 for values in the query's dtype, 1 for 8-bit values with a scale per
    # channel, 2 per position.
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
    n_lo, n_hi, n_full_end = split_bounds(lengths, i_b, i_s, n_per_split, N, BLOCK_N, RAGGED)
    p_k = k + aligned_stride(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_v = (v + aligned_stride(i_b * stride_vb, ALIGN_V) + n_lo.to(tl.int64) * stride_vn
           + first_v * stride_vc)
    p_ks = k_scale + i_b * stride_ksb + n_lo.to(tl.int64) * stride_ksn  # K_AXIS 2 only
    p_kf = k_scale + i_b * stride_ksb  # K_AXIS 3 only
    o_kfc = o_c * stride_ksc
    p_vs = v_scale + i_b * stride_vsb + n_lo.to(tl.int64) * stride_vsn  # V_AXIS 2 only
    p_ksq = ksq + i_b * stride_sqb + n_lo  # (B, N) float32, for L2 only
    o_k = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [BLOCK_CK, BLOCK_N]
    o_vt = tile_offsets(o_n, o_v, stride_vn, stride_vc, I64)  # [BLOCK_N, BLOCK_V]
    o_ks = o_n * stride_ksn
    o_vs = o_n * stride_vsn
    m_k_chan = m_c[:, None]
    m_v_chan = m_v[None, :]

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for n0 in range(n_lo, n_full_end, BLOCK_N):
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_max, b_sum, b_acc = _quantized_step(
            b_qs, b_max, b_sum, b_acc, p_k, o_k, m_k_chan, p_ks, o_ks, p_ksq, p_v, o_vt,
            m_v_chan, p_vs, o_vs, None, qk_scale, p_kf, o_kfc, m_c, n0, o_n, N, k_group,
            stride_ksn, K_AXIS, V_AXIS, L2, BLOCK_N, False, PRECISION, UPCAST, K_E4M3_BITS,
            V_E4M3_BITS)
        p_k += BLOCK_N * stride_kn
        p_ks += BLOCK_N * stride_ksn
        p_ksq += BLOCK_N
        p_v += BLOCK_N * stride_vn
        p_vs += BLOCK_N * stride_vsn
    if n_full_end < n_hi:
        m_n = (n_full_end + o_n) < n_hi
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_max, b_sum, b_acc = _quantized_step(
            b_qs, b_max, b_sum, b_acc, p_k, o_k, m_k_chan, p_ks, o_ks, p_ksq, p_v, o_vt,
            m_v_chan, p_vs, o_vs, m_n, qk_scale, p_kf, o_kfc, m_c, n_full_end, o_n, N, k_group,
            stride_ksn, K_AXIS, V_AXIS, L2, BLOCK_N, True, PRECISION, UPCAST, K_E4M3_BITS,
            V_E4M3_BITS)

    # the values' channel scales: sum_j p_ij (v_cj * s_c) = s_c * sum_j p_ij v_cj
    b_vscale = _scale_vector(v_scale + i_b * stride_vsb, (first_v + o_v) * stride_vsc, m_v,
                             V_AXIS == 1, True, BLOCK_V)
    b_o = b_acc * (b_vscale[None, :] / tl.where(b_sum > 0, b_sum, 1.0)[:, None])
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
