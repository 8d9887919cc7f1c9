"""Small @triton.jit helpers shared by the forward, top-k and backward kernels."""
import triton
import triton.language as tl

from ....torch_common import LN2, LOG2E

# Globals read inside @triton.jit functions must be constexpr when compiled for a GPU.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: bf16 tl.dot is wrong in the CPU interpreter, so it computes in fp32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def aligned_stride(stride_div_align, ALIGN: tl.constexpr):
    # Memory strides arrive divided by ALIGN (the largest power of two <= 16 dividing them):
    # multiplying back tells the compiler that channel rows start on ALIGN-element
    # boundaries, which enables vectorised cp.async loads even for N = 1,620 * T.
    return stride_div_align * ALIGN


@triton.jit
def tile_offsets(o_row, o_col, stride_row, stride_col, I64: tl.constexpr):
    # [len(o_row), len(o_col)] element offsets relative to a scalar int64 base pointer. Kept
    # int32 (fewer registers than a loop-carried pointer tensor) unless the host found that a
    # tile can span 2**31 elements (a channel stride of a bank with millions of positions).
    # One return: Triton 3.6 type-checks both returns of a constexpr branch (int64 vs int32).
    if I64:
        offsets = (o_row[:, None].to(tl.int64) * stride_row
                   + o_col[None, :].to(tl.int64) * stride_col)
    else:
        offsets = o_row[:, None] * stride_row + o_col[None, :] * stride_col
    return offsets


@triton.jit
def query_tile(b_q, p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64: tl.constexpr,
               STREAM_Q: tl.constexpr):
    # The query tile of one memory step: the one held through the loop (b_q), or loaded in
    # the step (STREAM_Q: not live in registers across the loop; see kernels/forward.py).
    if STREAM_Q:
        return query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64)
    return b_q


@triton.jit
def query_block(p_q, o_m, o_c, m_m, m_c, stride_qm, stride_qc, I64: tl.constexpr):
    # The query tile [BLOCK_M, BLOCK_CK] at p_q (its first position), zero past HW and CK.
    return tl.load(p_q + tile_offsets(o_m, o_c, stride_qm, stride_qc, I64),
                   mask=m_m[:, None] & m_c[None, :], other=0.0)


@triton.jit
def split_bounds(lengths, i_b, i_s, n_per_split, N, BLOCK_N: tl.constexpr, RAGGED: tl.constexpr):
    # (n_lo, n_hi, n_full_end) of memory split i_s of object i_b: its positions [n_lo, n_hi)
    # (empty past a ragged object's length), of which [n_lo, n_full_end) are whole blocks.
    n_end = N
    if RAGGED:
        n_end = tl.minimum(tl.load(lengths + i_b).to(tl.int32), N)
    n_lo = i_s * n_per_split
    n_hi = tl.maximum(tl.minimum(n_lo + n_per_split, n_end), n_lo)
    return n_lo, n_hi, n_lo + (n_hi - n_lo) // BLOCK_N * BLOCK_N


@triton.jit
def rank1_offsets(o_pos, channel, stride_chan, stride_pos, RANK1: tl.constexpr,
                  I64: tl.constexpr):
    # Offsets of positions o_pos of the rank-1 channel `channel` (RANK1; else o_pos, unread).
    o_r = o_pos
    if RANK1:
        if I64:
            o_r = channel.to(tl.int64) * stride_chan + o_pos.to(tl.int64) * stride_pos
        else:
            o_r = channel * stride_chan + o_pos * stride_pos
    return o_r


@triton.jit
def query_term(p_q, o_u, m_m, RANK1: tl.constexpr, MASK_M: tl.constexpr,
               BLOCK_M: tl.constexpr):
    # u [BLOCK_M] float32: the query's rank-1 channel at p_q + o_u (rank1_offsets) for RANK1,
    # 0 past m_m (MASK_M); zeros, never read, otherwise.
    b_u = tl.zeros([BLOCK_M], dtype=tl.float32)
    if RANK1:
        if MASK_M:
            b_u = tl.load(p_q + o_u, mask=m_m, other=0.0).to(tl.float32)
        else:
            b_u = tl.load(p_q + o_u).to(tl.float32)
    return b_u


@triton.jit
def memory_term(p_ksq, m_n, USED: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    # The per-memory-position score term [BLOCK_N] float32 of one memory block (|k|^2 for L2,
    # the keys' rank-1 channel w for RANK1; zeros when USED is False), 0 past m_n.
    b_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    if USED:
        if MASK_N:
            b_w = tl.load(p_ksq + tl.arange(0, BLOCK_N), mask=m_n, other=0.0)
        else:
            b_w = tl.load(p_ksq + tl.arange(0, BLOCK_N))
    return b_w


@triton.jit
def key_tile(p_k, o_k, m_k_chan, m_n, MASK_N: tl.constexpr):
    # The key tile [BLOCK_CK, BLOCK_N] of one memory block; m_n: its valid positions (None for
    # a whole block, MASK_N False). Only the last block of a split is masked along N: a mask
    # whose bound is not a multiple of 16 would stop vectorised (cp.async) loads in every block.
    if MASK_N:
        return tl.load(p_k + o_k, mask=m_k_chan & m_n[None, :], other=0.0)
    return tl.load(p_k + o_k, mask=m_k_chan, other=0.0)


@triton.jit
def tile_scores(b_q, b_k, b_u, p_ksq, m_n, qk_scale, L2: tl.constexpr, RANK1: tl.constexpr,
                BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    # (base-2 scores [BLOCK_M, BLOCK_N] of a query tile against a key tile, -inf past m_n; the
    # per-memory-position term b_w [BLOCK_N] they used). b_w (memory_term) is loaded after the
    # dot, so it is not live across it (before it, sm_90's TF32 l2 forward spilled): L2
    # subtracts |k|^2 (from the host: a reduction over channels here costs block barriers);
    # RANK1 adds u_i w_j, the product of the channel past the tile (query b_u [BLOCK_M], keys
    # b_w), which is exact: one channel's share of q.k is always an outer product.
    return scores_of_dot(dot(b_q, b_k, PRECISION, UPCAST), b_u, p_ksq, m_n, qk_scale, L2, RANK1,
                         BLOCK_N, MASK_N)


@triton.jit
def scores_of_dot(b_s, b_u, p_ksq, m_n, qk_scale, L2: tl.constexpr, RANK1: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    # (tile_scores of the dot q.k b_s [BLOCK_M, BLOCK_N], however it was computed; b_w).
    b_w = memory_term(p_ksq, m_n, L2 or RANK1, BLOCK_N, MASK_N)
    if L2:
        b_s = 2.0 * b_s - b_w[None, :]
    if RANK1:
        b_s = b_s + b_u[:, None] * b_w[None, :]
    b_s = b_s * qk_scale
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    return b_s, b_w



@triton.jit
def block_scores(b_q, b_u, p_k, p_ksq, o_k, m_k_chan, m_n, qk_scale, L2: tl.constexpr,
                 RANK1: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Base-2 scores [BLOCK_M, BLOCK_N] of one memory block (key_tile, then tile_scores).
    b_k = key_tile(p_k, o_k, m_k_chan, m_n, MASK_N)
    b_s, _ = tile_scores(b_q, b_k, b_u, p_ksq, m_n, qk_scale, L2, RANK1, BLOCK_N, MASK_N,
                         PRECISION, UPCAST)
    return b_s
