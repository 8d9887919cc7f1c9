"""Fused streaming top-k selection: the k best memory positions of every query, in one pass over
the memory, without storing any score.

Each score is packed with its memory index into one int64 key that orders by score and then by
the lower index (high 32 bits: the float's bits made monotone as a signed integer; low 32 bits:
0xFFFFFFFF - index). A program keeps its query rows' running top-k keys [BLOCK_M, TOP_K] in
registers; per memory block it takes the block's top-k keys (tl.topk, a bitonic sort) and
merges them with the running ones (the top-k of both, joined). Memory splits run in parallel
(flash-decoding style); the launcher merges their keys with torch.topk and decodes them.
Scores are in base 2 (scale folded with log2(e)), as in the forward kernel. STREAM_Q as in
the forward kernel: the query tile is loaded in every memory step rather than held.
"""
import triton
import triton.language as tl

from .common import (aligned_stride, block_scores, query_block, query_term, query_tile,
                     rank1_offsets, split_bounds, tile_offsets)

MIN_KEY = -(2**63)
# Globals read inside @triton.jit functions must be constexpr when compiled for a GPU.
MIN_KEY_C = tl.constexpr(MIN_KEY)


@triton.jit
def _packed(b_s, o_index):
    # [BLOCK_M, BLOCK_N] int64 keys of scores b_s (float32) at memory positions o_index (int32).
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_mono = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)
    b_low = (0xFFFFFFFF - o_index.to(tl.int64))[None, :]
    return (b_mono.to(tl.int64) << 32) | b_low


@triton.jit
def _merged(b_best, b_key, BLOCK_M: tl.constexpr, TOP_K: tl.constexpr):
    # The TOP_K largest of the running keys and one block's keys.
    b_top = tl.topk(b_key, TOP_K)  # [BLOCK_M, TOP_K]
    b_both = tl.reshape(tl.join(b_best, b_top), [BLOCK_M, 2 * TOP_K])
    return tl.topk(b_both, TOP_K)


@triton.jit
def memory_read_topk_kernel(
    q, k, ksq, lengths, keys,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn, stride_sqb,
    stride_ks, stride_kyb, stride_km,
    HW, N, CK, n_per_split, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    TOP_K: tl.constexpr, RAGGED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    I64: tl.constexpr, ALIGN_K: tl.constexpr, RANK1: tl.constexpr, STREAM_Q: tl.constexpr,
):
    # One program per (query block, object, memory split); keys (S, B, HW, TOP_K) int64.
    # ksq and RANK1 as in the forward kernel (kernels/forward.py).
    i_m = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    stride_kc = aligned_stride(stride_kc, ALIGN_K)
    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CK)
    o_n = tl.arange(0, BLOCK_N)
    o_t = tl.arange(0, TOP_K)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_c = o_c < CK

    p_q = q + i_b * stride_qb + first_m * stride_qm
    b_q = query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64)  # [BLOCK_M, BLOCK_CK]
    b_u = query_term(p_q, rank1_offsets(o_m, CK, stride_qc, stride_qm, RANK1, I64), m_m,
                     RANK1, True, BLOCK_M)  # [BLOCK_M]
    n_lo, n_hi, n_full_end = split_bounds(lengths, i_b, i_s, n_per_split, N, BLOCK_N, RAGGED)
    p_k = k + aligned_stride(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_ksq = ksq + i_b * stride_sqb + n_lo
    o_k = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [BLOCK_CK, BLOCK_N]
    m_k_chan = m_c[:, None]

    b_best = tl.full([BLOCK_M, TOP_K], MIN_KEY_C, tl.int64)
    for n_start in range(n_lo, n_full_end, BLOCK_N):
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_s = block_scores(b_qs, b_u, p_k, p_ksq, o_k, m_k_chan, None, qk_scale, L2, RANK1,
                           BLOCK_N, False, PRECISION, UPCAST)
        b_best = _merged(b_best, _packed(b_s, n_start + o_n), BLOCK_M, TOP_K)
        p_k += BLOCK_N * stride_kn
        p_ksq += BLOCK_N
    if n_full_end < n_hi:
        m_n = (n_full_end + o_n) < n_hi
        b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
        b_s = block_scores(b_qs, b_u, p_k, p_ksq, o_k, m_k_chan, m_n, qk_scale, L2, RANK1,
                           BLOCK_N, True, PRECISION, UPCAST)  # -inf past the split: never better
        b_best = _merged(b_best, _packed(b_s, n_full_end + o_n), BLOCK_M, TOP_K)

    p_keys = keys + i_s.to(tl.int64) * stride_ks + i_b * stride_kyb + first_m * stride_km
    tl.store(p_keys + o_m[:, None] * stride_km + o_t[None, :], b_best, mask=m_m[:, None])
