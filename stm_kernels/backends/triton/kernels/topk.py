"""Fused streaming top-k selection: the k best memory positions of every query, in one pass over
the memory, without storing any score.

Each score is packed with its memory index into one int64 key that orders by score and then by
the lower index (high 32 bits: the float's bits made monotone as a signed integer; low 32 bits:
0xFFFFFFFF - index). A program keeps its query rows' running top-k keys [BLOCK_M, TOP_K] in
registers; per memory block it takes the block's top-k keys (tl.topk, a bitonic sort) and
merges them with the running ones (the top-k of both, joined). Memory splits run in parallel
(flash-decoding style); memory_read_topk_merge_kernel merges their keys and decodes them.
Scores are in base 2 (scale folded with log2(e)), as in the forward kernel. STREAM_Q as in
the forward kernel: the query tile is loaded in every memory step rather than held.
CHUNK_CK < BLOCK_CK: the score dot runs over CHUNK_CK key channels at a time, the query and key
tiles loaded per chunk, so shared memory holds one chunk of the memory block's keys (a block
of max(64, top_k) positions of 256 float32 channels is 64 KiB).
"""
import triton
import triton.language as tl

from .common import (LN2_C, aligned_stride, block_scores, dot, key_tile, query_block,
                     query_term, query_tile, rank1_offsets, scores_of_dot, split_bounds,
                     tile_offsets)

MIN_KEY = -(2**63)
# Globals read inside @triton.jit functions must be constexpr when compiled for a GPU.
MIN_KEY_C = tl.constexpr(MIN_KEY)


@triton.jit
def _monotone(b_bits):
    # A float32's bits (int32) to an int32 in the floats' order: a negative float's magnitude
    # bits flipped. Its own inverse, so it also turns such an int32 back into the float's bits.
    return tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)


@triton.jit
def _packed(b_s, o_index):
    # [BLOCK_M, BLOCK_N] int64 keys of scores b_s (float32) at memory positions o_index (int32).
    b_mono = _monotone(b_s.to(tl.int32, bitcast=True))
    b_low = (0xFFFFFFFF - o_index.to(tl.int64))[None, :]
    return (b_mono.to(tl.int64) << 32) | b_low


@triton.jit
def _top_of_both(b_best, b_other, BLOCK_M: tl.constexpr, TOP_K: tl.constexpr):
    # The TOP_K largest of two [BLOCK_M, TOP_K] sets of keys.
    return tl.topk(tl.reshape(tl.join(b_best, b_other), [BLOCK_M, 2 * TOP_K]), TOP_K)


@triton.jit
def _merged(b_best, b_key, BLOCK_M: tl.constexpr, TOP_K: tl.constexpr):
    # The TOP_K largest of the running keys and one block's keys.
    return _top_of_both(b_best, tl.topk(b_key, TOP_K), BLOCK_M, TOP_K)


@triton.jit
def _chunked_dot(p_q, p_k, o_m, o_n, m_m, m_n, CK, stride_qm, stride_qc, stride_kc, stride_kn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_CK: tl.constexpr,
                 MASK_N: tl.constexpr, I64: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    # q.k [BLOCK_M, BLOCK_N] float32 of the query rows at p_q against the memory block at p_k,
    # summed over the CK key channels CHUNK_CK at a time, both tiles loaded per chunk: shared
    # memory holds one chunk's operands, not a whole key tile (for a tile too large for it).
    # The trip count is a runtime one: a constant one is unrolled, and the unrolled chunks'
    # tiles are live at once. m_n: the block's valid positions (MASK_N; None otherwise).
    o_c = tl.arange(0, CHUNK_CK)
    o_k = tile_offsets(o_c, o_n, stride_kc, stride_kn, I64)  # [CHUNK_CK, BLOCK_N]
    b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first_c in range(0, CK, CHUNK_CK):
        m_c = (first_c + o_c) < CK
        b_q = query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64)
        b_k = key_tile(p_k, o_k, m_c[:, None], m_n, MASK_N)
        b_s += dot(b_q, b_k, PRECISION, UPCAST)
        p_q += stride_qc.to(tl.int64) * CHUNK_CK
        p_k += stride_kc.to(tl.int64) * CHUNK_CK
    return b_s


@triton.jit
def _block_scores(b_q, b_u, p_q, p_k, p_ksq, o_m, o_c, o_n, o_k, m_m, m_c, m_k_chan, m_n, CK,
                  stride_qm, stride_qc, stride_kc, stride_kn, qk_scale, L2: tl.constexpr,
                  RANK1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_CK: tl.constexpr, CHUNK_CK: tl.constexpr, MASK_N: tl.constexpr,
                  I64: tl.constexpr, STREAM_Q: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    # Base-2 scores [BLOCK_M, BLOCK_N] of one memory block: over the whole key tile (the query
    # tile held in b_q or streamed), or CHUNK_CK key channels at a time.
    if CHUNK_CK < BLOCK_CK:
        b_s = _chunked_dot(p_q, p_k, o_m, o_n, m_m, m_n, CK, stride_qm, stride_qc, stride_kc,
                           stride_kn, BLOCK_M, BLOCK_N, CHUNK_CK, MASK_N, I64, PRECISION, UPCAST)
        b_s, _ = scores_of_dot(b_s, b_u, p_ksq, m_n, qk_scale, L2, RANK1, BLOCK_N, MASK_N)
        return b_s
    b_qs = query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64, STREAM_Q)
    return block_scores(b_qs, b_u, p_k, p_ksq, o_k, m_k_chan, m_n, qk_scale, L2, RANK1, BLOCK_N,
                        MASK_N, PRECISION, UPCAST)


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
    CHUNK_CK: tl.constexpr,
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

    # Chunked scores take the last, partial block in the loop, masking every block: one
    # chunk loop in the kernel, not a second one after it.
    CHUNKED: tl.constexpr = CHUNK_CK < BLOCK_CK
    loop_end = n_full_end
    if CHUNKED:
        loop_end = n_hi
    b_best = tl.full([BLOCK_M, TOP_K], MIN_KEY_C, tl.int64)
    for n_start in range(n_lo, loop_end, BLOCK_N):
        m_n = (n_start + o_n) < n_hi  # read only when CHUNKED
        b_s = _block_scores(b_q, b_u, p_q, p_k, p_ksq, o_m, o_c, o_n, o_k, m_m, m_c, m_k_chan,
                            m_n, CK, stride_qm, stride_qc, stride_kc, stride_kn, qk_scale, L2,
                            RANK1, BLOCK_M, BLOCK_N, BLOCK_CK, CHUNK_CK, CHUNKED, I64,
                            STREAM_Q, PRECISION, UPCAST)
        b_best = _merged(b_best, _packed(b_s, n_start + o_n), BLOCK_M, TOP_K)
        p_k += BLOCK_N * stride_kn
        p_ksq += BLOCK_N
    if not CHUNKED and n_full_end < n_hi:
        m_n = (n_full_end + o_n) < n_hi
        b_s = _block_scores(b_q, b_u, p_q, p_k, p_ksq, o_m, o_c, o_n, o_k, m_m, m_c, m_k_chan,
                            m_n, CK, stride_qm, stride_qc, stride_kc, stride_kn, qk_scale, L2,
                            RANK1, BLOCK_M, BLOCK_N, BLOCK_CK, CHUNK_CK, True, I64, STREAM_Q,
                            PRECISION, UPCAST)  # -inf past the split: never better
        b_best = _merged(b_best, _packed(b_s, n_full_end + o_n), BLOCK_M, TOP_K)

    p_keys = keys + i_s.to(tl.int64) * stride_ks + i_b * stride_kyb + first_m * stride_km
    tl.store(p_keys + o_m[:, None] * stride_km + o_t[None, :], b_best, mask=m_m[:, None])


@triton.jit
def memory_read_topk_merge_kernel(
    keys, scores, indices,
    stride_ks, stride_kyb, stride_km,
    stride_sb, stride_sm, stride_ib, stride_im,
    HW, SPLITS, top_k,
    BLOCK_M: tl.constexpr, TOP_K: tl.constexpr, I64: tl.constexpr,
):
    # One program per (query block, object): the top_k best of the memory splits' keys
    # (S, B, HW, TOP_K) int64, best first, decoded to scores in natural units and memory
    # indices; an unfilled slot (MIN_KEY, whose high half decodes to NaN) or a position past
    # the memory (a -inf score) gives -inf and -1.
    i_m = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_m = tl.arange(0, BLOCK_M)
    o_t = tl.arange(0, TOP_K)
    first_m = (i_m * BLOCK_M).to(tl.int64)
    m_m = (i_m * BLOCK_M + o_m) < HW

    p_keys = keys + i_b * stride_kyb + first_m * stride_km
    o_keys = tile_offsets(o_m, o_t, stride_km, 1, I64)  # [BLOCK_M, TOP_K]
    b_best = tl.full([BLOCK_M, TOP_K], MIN_KEY_C, tl.int64)
    for _ in range(SPLITS):
        b_split = tl.load(p_keys + o_keys, mask=m_m[:, None], other=MIN_KEY_C)
        b_best = _top_of_both(b_best, b_split, BLOCK_M, TOP_K)
        p_keys += stride_ks

    b_bits = _monotone((b_best >> 32).to(tl.int32))
    b_score = b_bits.to(tl.float32, bitcast=True) * LN2_C  # base 2 -> natural units
    b_filled = b_score > float("-inf")  # False for NaN and -inf alike
    b_index = ~b_best & 0xFFFFFFFF  # the low half holds 0xFFFFFFFF - index
    m_out = m_m[:, None] & (o_t < top_k)[None, :]
    p_scores = scores + i_b * stride_sb + first_m * stride_sm
    tl.store(p_scores + tile_offsets(o_m, o_t, stride_sm, 1, I64),
             tl.where(b_filled, b_score, float("-inf")), mask=m_out)
    p_indices = indices + i_b * stride_ib + first_m * stride_im
    tl.store(p_indices + tile_offsets(o_m, o_t, stride_im, 1, I64),
             tl.where(b_filled, b_index, -1), mask=m_out)
