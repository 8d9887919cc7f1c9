"""Fused Triton kernels for the space-time memory read, and their host-side launchers.

Layout (channel-first, as STM stores it; any strides):
    q   (Bq, Ck, HW)   query key, Bq = B or 1 (stride 0 broadcasts it over objects)
    k   (B,  Ck, N)    memory key
    v   (B,  Cv, N)    memory value
    o   (B,  Cv, HW)   read-out
    lse (B,  HW)       natural-log log-sum-exp of the scores, float32

Kernels (flash-attention style; the N x HW affinity never reaches device memory):
    memory_read_fwd_kernel      online softmax over memory blocks, one program per
                                (query block, object x value chunk, memory split)
    memory_read_merge_kernel    merges memory splits by their log-sum-exp (flash-decoding)
    memory_read_bwd_kernel_dkv  dK, dV over memory blocks, looping over all queries
    memory_read_bwd_kernel_dq   dQ over query blocks, optionally split over memory

Scores are kept in base 2 inside the kernels (scale folded with log2(e)); lse is stored in
natural log. All offsets that can pass 2**31 (object, channel and position strides) are int64.
"""
import contextlib
import dataclasses
import os

import torch
import triton
import triton.language as tl

from ._buffers import new_buffer

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr when compiled for a GPU.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)

# Triton decides at decoration time whether kernels are interpreted, so this is read once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: bf16 tl.dot is wrong in the CPU interpreter, so it computes in fp32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _unaligned(stride, ALIGN: tl.constexpr):
    # Strides of the memory tensors arrive divided by ALIGN (the largest power of two <= 16
    # dividing them): multiplying back tells the compiler that channel rows start on
    # ALIGN-element boundaries, which enables vectorised cp.async loads even for N = 1620*T.
    return stride * ALIGN


@triton.jit
def _tile(o_r, o_c, stride_r, stride_c, I64: tl.constexpr):
    # Element offsets of a tile relative to a scalar int64 base pointer. Kept int32 (fewer
    # registers than a loop-carried pointer tensor) unless the host found that a tile can span
    # 2**31 elements (a channel stride of a memory bank with millions of positions).
    if I64:
        return o_r[:, None].to(tl.int64) * stride_r + o_c[None, :].to(tl.int64) * stride_c
    return o_r[:, None] * stride_r + o_c[None, :] * stride_c


@triton.jit
def _fwd_step(b_q, b_max, b_sum, b_acc, p_k, p_v, o_k, o_vn, m_kc, m_vv, m_n, qk_scale,
              L2: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    # One memory block of the online softmax. Only the last block of a split is masked along
    # N: a mask there whose bound is not a multiple of 16 would stop vectorised (cp.async)
    # loads in every block.
    if MASK_N:
        b_k = tl.load(p_k + o_k, mask=m_kc & m_n[None, :], other=0.0)
    else:
        b_k = tl.load(p_k + o_k, mask=m_kc, other=0.0)
    b_s = _dot(b_q, b_k, PRECISION, UPCAST)
    if L2:
        b_kf = b_k.to(tl.float32)
        b_s = 2.0 * b_s - tl.sum(b_kf * b_kf, 0)[None, :]
    b_s = b_s * qk_scale
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_max - b_max_new)
    b_p = tl.exp2(b_s - b_max_new[:, None])
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    if MASK_N:
        b_v = tl.load(p_v + o_vn, mask=m_n[:, None] & m_vv, other=0.0)
    else:
        b_v = tl.load(p_v + o_vn, mask=m_vv, other=0.0)
    b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, PRECISION, UPCAST)
    return b_max_new, b_sum, b_acc


@triton.jit
def memory_read_fwd_kernel(
    q, k, v, o, lse,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_os, stride_ob, stride_oc, stride_om,
    stride_ls, stride_lb, stride_lm,
    HW, N, CK, CV, n_per_split, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    I64: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bv = tl.program_id(1)
    i_s = tl.program_id(2)
    i_b = (i_bv // NUM_V).to(tl.int64)
    i_v = i_bv % NUM_V
    stride_kc = _unaligned(stride_kc, ALIGN_K)
    stride_vc = _unaligned(stride_vc, ALIGN_V)

    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CK)
    o_v = tl.arange(0, BLOCK_V)
    o_n = tl.arange(0, BLOCK_N)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_c = o_c < CK
    m_v = (i_v * BLOCK_V + o_v) < CV
    m0 = (i_m * BLOCK_M).to(tl.int64)
    v0 = (i_v * BLOCK_V).to(tl.int64)

    p_q = q + i_b * stride_qb + m0 * stride_qm
    b_q = tl.load(p_q + _tile(o_m, o_c, stride_qm, stride_qc, I64), mask=m_m[:, None] & m_c[None, :], other=0.0)

    n_lo = i_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    n_full = n_lo + (n_hi - n_lo) // BLOCK_N * BLOCK_N
    # Scalar int64 pointers advance through memory; the in-tile offsets stay loop-invariant.
    p_k = k + _unaligned(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_v = v + _unaligned(i_b * stride_vb, ALIGN_V) + n_lo.to(tl.int64) * stride_vn + v0 * stride_vc
    o_k = _tile(o_c, o_n, stride_kc, stride_kn, I64)
    o_vn = _tile(o_n, o_v, stride_vn, stride_vc, I64)
    m_kc = m_c[:, None]
    m_vv = m_v[None, :]

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for n_start in range(n_lo, n_full, BLOCK_N):
        b_max, b_sum, b_acc = _fwd_step(b_q, b_max, b_sum, b_acc, p_k, p_v, o_k, o_vn, m_kc, m_vv,
                                        o_n, qk_scale, L2, False, PRECISION, UPCAST)
        p_k += BLOCK_N * stride_kn
        p_v += BLOCK_N * stride_vn
    if n_full < n_hi:
        m_n = (n_full + o_n) < n_hi
        b_max, b_sum, b_acc = _fwd_step(b_q, b_max, b_sum, b_acc, p_k, p_v, o_k, o_vn, m_kc, m_vv,
                                        m_n, qk_scale, L2, True, PRECISION, UPCAST)

    b_o = b_acc / b_sum[:, None]
    p_o = o + i_s.to(tl.int64) * stride_os + i_b * stride_ob + m0 * stride_om + v0 * stride_oc
    tl.store(p_o + _tile(o_m, o_v, stride_om, stride_oc, I64), b_o.to(p_o.dtype.element_ty),
             mask=m_m[:, None] & m_v[None, :])
    if i_v == 0:
        p_lse = lse + i_s.to(tl.int64) * stride_ls + i_b * stride_lb + m0 * stride_lm
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
    i_m = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_m = tl.arange(0, BLOCK_M)
    o_v = tl.arange(0, BLOCK_V)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_vm = ((i_v * BLOCK_V + o_v) < CV)[:, None] & m_m[None, :]
    m0 = (i_m * BLOCK_M).to(tl.int64)
    v0 = (i_v * BLOCK_V).to(tl.int64)

    p_plse = plse + i_b * stride_plb + m0 * stride_plm + o_m * stride_plm
    p_po = po + i_b * stride_pob + m0 * stride_pom + v0 * stride_poc
    o_po = _tile(o_v, o_m, stride_poc, stride_pom, I64)
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

    p_o = o + i_b * stride_ob + m0 * stride_om + v0 * stride_oc
    tl.store(p_o + _tile(o_v, o_m, stride_oc, stride_om, I64), (b_acc / b_sum[None, :]).to(p_o.dtype.element_ty), mask=m_vm)
    if i_v == 0:
        tl.store(lse + i_b * stride_lb + m0 * stride_lm + o_m * stride_lm, b_max + tl.log(b_sum), mask=m_m)


@triton.jit
def _dkv_step(b_k, b_v, b_ksq, b_dk, b_dv, b_dsum, p_q, p_do, p_lse, p_delta, o_q, o_do, o_m,
              stride_lm, m_qc, m_dov, m_m, delta_weight, qk_scale,
              L2: tl.constexpr, MASK_M: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    # One query block's contribution to dK, dV of this memory block (transposed: positions as
    # rows). Only the last query block is masked along HW (see _fwd_step).
    if MASK_M:
        b_q = tl.load(p_q + o_q, mask=m_qc & m_m[None, :], other=0.0)
        b_lse = tl.load(p_lse + o_m * stride_lm, mask=m_m, other=0.0)
        b_do = tl.load(p_do + o_do, mask=m_dov & m_m[None, :], other=0.0)
        b_delta = tl.load(p_delta + o_m * stride_lm, mask=m_m, other=0.0)
    else:
        b_q = tl.load(p_q + o_q, mask=m_qc, other=0.0)
        b_lse = tl.load(p_lse + o_m * stride_lm)
        b_do = tl.load(p_do + o_do, mask=m_dov, other=0.0)
        b_delta = tl.load(p_delta + o_m * stride_lm)
    b_st = _dot(b_k, b_q, PRECISION, UPCAST)
    if L2:
        b_st = 2.0 * b_st - b_ksq[:, None]
    b_pt = tl.exp2(b_st * qk_scale - b_lse[None, :] * LOG2E_C)
    if MASK_M:
        b_pt = tl.where(m_m[None, :], b_pt, 0.0)
    b_dv += _dot(b_pt.to(b_do.dtype), tl.trans(b_do), PRECISION, UPCAST)
    b_dpt = _dot(b_v, b_do, PRECISION, UPCAST)
    b_dst = b_pt * (b_dpt - b_delta[None, :] * delta_weight)
    b_dk += _dot(b_dst.to(b_q.dtype), tl.trans(b_q), PRECISION, UPCAST)
    if L2:
        b_dsum += tl.sum(b_dst, 1)
    return b_dk, b_dv, b_dsum


@triton.jit
def memory_read_bwd_kernel_dkv(
    q, k, v, do, lse, delta, dk, dv,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_dob, stride_doc, stride_dom,
    stride_lb, stride_lm,
    stride_dks, stride_dkb, stride_dkc, stride_dkn,
    stride_dvb, stride_dvc, stride_dvn,
    HW, N, CK, CV, scale, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    I64: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr,
):
    # One program per (memory block, object x value chunk), looping over all queries. With
    # NUM_V > 1 each program owns a chunk of value channels: dV is exact per chunk, dK a partial
    # sum (dS is linear in dP; chunk 0 alone adds the -delta term) reduced on the host.
    i_n = tl.program_id(0)
    i_bv = tl.program_id(1)
    i_b = (i_bv // NUM_V).to(tl.int64)
    i_v = i_bv % NUM_V

    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CK)
    o_v = tl.arange(0, BLOCK_V)
    o_m = tl.arange(0, BLOCK_M)
    m_n = (i_n * BLOCK_N + o_n) < N
    m_c = o_c < CK
    m_v = (i_v * BLOCK_V + o_v) < CV
    n0 = (i_n * BLOCK_N).to(tl.int64)
    v0 = (i_v * BLOCK_V).to(tl.int64)
    stride_kc = _unaligned(stride_kc, ALIGN_K)
    stride_vc = _unaligned(stride_vc, ALIGN_V)

    p_k = k + _unaligned(i_b * stride_kb, ALIGN_K) + n0 * stride_kn
    b_k = tl.load(p_k + _tile(o_n, o_c, stride_kn, stride_kc, I64), mask=m_n[:, None] & m_c[None, :], other=0.0)
    p_v = v + _unaligned(i_b * stride_vb, ALIGN_V) + n0 * stride_vn + v0 * stride_vc
    b_v = tl.load(p_v + _tile(o_n, o_v, stride_vn, stride_vc, I64), mask=m_n[:, None] & m_v[None, :], other=0.0)
    b_kf = b_k.to(tl.float32)
    b_ksq = tl.sum(b_kf * b_kf, 1)
    delta_weight = (i_v == 0).to(tl.float32)

    p_q = q + i_b * stride_qb
    p_do = do + i_b * stride_dob + v0 * stride_doc
    p_lse = lse + i_b * stride_lb
    p_delta = delta + i_b * stride_lb
    o_q = _tile(o_c, o_m, stride_qc, stride_qm, I64)
    o_do = _tile(o_v, o_m, stride_doc, stride_dom, I64)
    m_qc = m_c[:, None]
    m_dov = m_v[:, None]

    b_dk = tl.zeros([BLOCK_N, BLOCK_CK], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    b_dsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_full = HW // BLOCK_M * BLOCK_M
    for m_start in range(0, m_full, BLOCK_M):
        b_dk, b_dv, b_dsum = _dkv_step(b_k, b_v, b_ksq, b_dk, b_dv, b_dsum, p_q, p_do, p_lse,
                                       p_delta, o_q, o_do, o_m, stride_lm, m_qc, m_dov, o_m,
                                       delta_weight, qk_scale, L2, False, PRECISION, UPCAST)
        p_q += BLOCK_M * stride_qm
        p_do += BLOCK_M * stride_dom
        p_lse += BLOCK_M * stride_lm
        p_delta += BLOCK_M * stride_lm
    if m_full < HW:
        m_m = (m_full + o_m) < HW
        b_dk, b_dv, b_dsum = _dkv_step(b_k, b_v, b_ksq, b_dk, b_dv, b_dsum, p_q, p_do, p_lse,
                                       p_delta, o_q, o_do, o_m, stride_lm, m_qc, m_dov, m_m,
                                       delta_weight, qk_scale, L2, True, PRECISION, UPCAST)

    if L2:
        b_dk = scale * (2.0 * b_dk - 2.0 * b_kf * b_dsum[:, None])
    else:
        b_dk = scale * b_dk
    p_dv = dv + i_b * stride_dvb + n0 * stride_dvn + v0 * stride_dvc
    tl.store(p_dv + _tile(o_n, o_v, stride_dvn, stride_dvc, I64), b_dv.to(p_dv.dtype.element_ty),
             mask=m_n[:, None] & m_v[None, :])
    p_dk = dk + i_v.to(tl.int64) * stride_dks + i_b * stride_dkb + n0 * stride_dkn
    tl.store(p_dk + _tile(o_n, o_c, stride_dkn, stride_dkc, I64), b_dk.to(p_dk.dtype.element_ty),
             mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _dq_step(b_q, b_do, b_lse2, b_delta, b_dq, p_k, p_v, o_k, o_vn, m_kc, m_vc, m_n, qk_scale,
             L2: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    # One memory block's contribution to dQ (see _fwd_step for the masking).
    if MASK_N:
        b_k = tl.load(p_k + o_k, mask=m_kc & m_n[None, :], other=0.0)
        b_v = tl.load(p_v + o_vn, mask=m_vc & m_n[None, :], other=0.0)
    else:
        b_k = tl.load(p_k + o_k, mask=m_kc, other=0.0)
        b_v = tl.load(p_v + o_vn, mask=m_vc, other=0.0)
    b_s = _dot(b_q, b_k, PRECISION, UPCAST)
    if L2:
        b_kf = b_k.to(tl.float32)
        b_s = 2.0 * b_s - tl.sum(b_kf * b_kf, 0)[None, :]
    b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])
    if MASK_N:
        b_p = tl.where(m_n[None, :], b_p, 0.0)
    b_dp = _dot(b_do, b_v, PRECISION, UPCAST)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + _dot(b_ds.to(b_k.dtype), tl.trans(b_k), PRECISION, UPCAST)


@triton.jit
def memory_read_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_dob, stride_doc, stride_dom,
    stride_lb, stride_lm,
    stride_dqs, stride_dqb, stride_dqc, stride_dqm,
    HW, N, CK, CV, n_per_split, scale, qk_scale,
    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CK: tl.constexpr,
    BLOCK_V: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, I64: tl.constexpr,
    ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr,
):
    # One program per (query block, object, memory split); partial dQ of each split is written
    # in fp32 and summed on the host (over splits, and over objects for a broadcast query).
    i_m = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    stride_kc = _unaligned(stride_kc, ALIGN_K)
    stride_vc = _unaligned(stride_vc, ALIGN_V)

    o_m = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CK)
    o_v = tl.arange(0, BLOCK_V)
    o_n = tl.arange(0, BLOCK_N)
    m_m = (i_m * BLOCK_M + o_m) < HW
    m_c = o_c < CK
    m_v = o_v < CV
    m0 = (i_m * BLOCK_M).to(tl.int64)

    p_q = q + i_b * stride_qb + m0 * stride_qm
    b_q = tl.load(p_q + _tile(o_m, o_c, stride_qm, stride_qc, I64), mask=m_m[:, None] & m_c[None, :], other=0.0)
    p_do = do + i_b * stride_dob + m0 * stride_dom
    b_do = tl.load(p_do + _tile(o_m, o_v, stride_dom, stride_doc, I64), mask=m_m[:, None] & m_v[None, :], other=0.0)
    b_lse2 = tl.load(lse + i_b * stride_lb + (m0 + o_m) * stride_lm, mask=m_m, other=0.0) * LOG2E_C
    b_delta = tl.load(delta + i_b * stride_lb + (m0 + o_m) * stride_lm, mask=m_m, other=0.0)

    n_lo = i_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    n_full = n_lo + (n_hi - n_lo) // BLOCK_N * BLOCK_N
    p_k = k + _unaligned(i_b * stride_kb, ALIGN_K) + n_lo.to(tl.int64) * stride_kn
    p_v = v + _unaligned(i_b * stride_vb, ALIGN_V) + n_lo.to(tl.int64) * stride_vn
    o_k = _tile(o_c, o_n, stride_kc, stride_kn, I64)
    o_vn = _tile(o_v, o_n, stride_vc, stride_vn, I64)
    m_kc = m_c[:, None]
    m_vc = m_v[:, None]

    b_dq = tl.zeros([BLOCK_M, BLOCK_CK], dtype=tl.float32)
    for n_start in range(n_lo, n_full, BLOCK_N):
        b_dq = _dq_step(b_q, b_do, b_lse2, b_delta, b_dq, p_k, p_v, o_k, o_vn, m_kc, m_vc, o_n,
                        qk_scale, L2, False, PRECISION, UPCAST)
        p_k += BLOCK_N * stride_kn
        p_v += BLOCK_N * stride_vn
    if n_full < n_hi:
        m_n = (n_full + o_n) < n_hi
        b_dq = _dq_step(b_q, b_do, b_lse2, b_delta, b_dq, p_k, p_v, o_k, o_vn, m_kc, m_vc, m_n,
                        qk_scale, L2, True, PRECISION, UPCAST)

    b_dq = b_dq * (2.0 * scale if L2 else scale)
    p_dq = dq + i_s.to(tl.int64) * stride_dqs + i_b * stride_dqb + m0 * stride_dqm
    tl.store(p_dq + _tile(o_m, o_c, stride_dqm, stride_dqc, I64), b_dq, mask=m_m[:, None] & m_c[None, :])


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiling of the forward kernel. block_v=None keeps all value channels in one program;
    a smaller block_v splits them across programs (recomputing q.k per chunk). splits=None
    picks the number of memory splits from the device's multiprocessor count."""
    block_m: int = 64
    block_n: int = 64
    block_v: int | None = None
    num_warps: int = 8
    num_stages: int = 2
    splits: int | None = None


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiling of the two backward kernels (dkv: over memory blocks; dq: over query blocks)."""
    dkv_block_m: int = 64
    dkv_block_n: int = 64
    dkv_block_v: int | None = None
    dkv_warps: int = 8
    dkv_stages: int = 1
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 1
    dq_splits: int | None = None


# Candidates in order of preference, per element size; a candidate that does not fit the
# device's shared memory (OutOfResources at compile time) falls through to the next one. Chosen
# from `python -m bench.kernel_resources` (sm_90, Ck=128, Cv=512: no register spills, cp.async
# pipelining, <= 227 KiB shared memory), not yet from timings on a GPU.
_GPU_FORWARD = {
    2: (ForwardConfig(64, 32, 512, 8, 3), ForwardConfig(64, 64, 256, 8, 2),
        ForwardConfig(128, 64, 128, 8, 2), ForwardConfig(32, 32, 128, 4, 1)),
    4: (ForwardConfig(128, 64, 128, 8, 2), ForwardConfig(128, 32, 256, 8, 2),
        ForwardConfig(32, 32, 128, 4, 1)),
}
_GPU_BACKWARD = {
    2: (BackwardConfig(64, 64, 128, 8, 2, 64, 32, 8, 2),
        BackwardConfig(64, 64, 64, 8, 2, 64, 16, 8, 2),
        BackwardConfig(32, 32, 64, 4, 1, 32, 16, 4, 1)),
    4: (BackwardConfig(64, 64, 64, 8, 1, 64, 16, 8, 1),
        BackwardConfig(32, 32, 64, 4, 1, 32, 16, 4, 1)),
}
# The interpreter runs one Python step per tile operation: large tiles are fastest there.
_INTERPRETER_FORWARD = (ForwardConfig(32, 32, None, 4, 1),)
_INTERPRETER_BACKWARD = (BackwardConfig(32, 32, None, 4, 1, 32, 32, 4, 1),)

_override = {"forward": None, "backward": None}
_chosen = {}


class use_configs:
    """Context manager forcing kernel configs (for tests and tuning): `with use_configs(
    forward=ForwardConfig(...), backward=BackwardConfig(...)): ...`."""

    def __init__(self, forward=None, backward=None):
        self.configs = {"forward": forward, "backward": backward}

    def __enter__(self):
        self.previous = dict(_override)
        _override.update({key: value for key, value in self.configs.items() if value is not None})
        return self

    def __exit__(self, *exc):
        _override.clear()
        _override.update(self.previous)


def _candidates(kind, dtype):
    if _override[kind] is not None:
        return (_override[kind],)
    if INTERPRETING:
        return _INTERPRETER_FORWARD if kind == "forward" else _INTERPRETER_BACKWARD
    table = _GPU_FORWARD if kind == "forward" else _GPU_BACKWARD
    return table[min(dtype.itemsize, 4)]


def _run_first_fitting(kind, key, launch):
    """Launch with the first candidate config that compiles for this device, remembered per key
    (key[0] is the dtype)."""
    candidates = _candidates(kind, key[0])
    start = _chosen.get((kind, key, candidates), 0)
    last_error = None
    for index in range(start, len(candidates)):
        try:
            result = launch(candidates[index])
        except triton.runtime.errors.OutOfResources as error:
            last_error = error
            continue
        _chosen[(kind, key, candidates)] = index
        return result
    raise RuntimeError(f"no {kind} kernel config fits this device for {key}") from last_error


def _sm_count(device):
    if device.type != "cuda":
        return 4  # interpreter: a pretend device small enough that the split paths run
    return torch.cuda.get_device_properties(device).multi_processor_count


def _memory_splits(requested, programs, n_blocks, device):
    """How many programs share one query block's memory (flash-decoding): enough to fill the
    device when objects x query blocks are too few, each split still several memory blocks."""
    if requested is not None:
        splits = requested
    else:
        splits = _sm_count(device) // max(programs, 1)
        splits = min(splits, n_blocks // 4)
    return max(1, min(splits, n_blocks))


def _split_length(N, block_n, splits):
    """Memory positions per split (a multiple of block_n) and the resulting number of splits."""
    n_blocks = triton.cdiv(N, block_n)
    per_split = triton.cdiv(n_blocks, splits) * block_n
    return per_split, triton.cdiv(N, per_split)


def _dot_precision(dtype):
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


def _tile_span(sizes, strides):
    return sum(triton.next_power_of_2(size) * abs(stride) for size, stride in zip(sizes, strides))


def _needs_int64(*tensors, outputs=()):
    """Whether in-tile offsets (over the last two dims: channels x positions) of the inputs or
    of contiguous outputs of the given (C, L) shapes can reach 2**31 elements; batch, split and
    block starts always go through int64 scalars."""
    spans = [_tile_span(t.shape[-2:], t.stride()[-2:]) for t in tensors]
    spans += [_tile_span(shape, (shape[1], 1)) for shape in outputs]
    return max(spans) >= 2**31


def _alignment(t):
    """Largest power of two <= 16 dividing the batch and channel strides of a (B, C, N) tensor."""
    align = 16
    while align > 1 and any(stride % align for stride in t.stride()[:2]):
        align //= 2
    return align


def _memory_strides(t, align):
    """(batch, channel, position) strides with batch and channel divided by align (_unaligned)."""
    return t.stride(0) // align, t.stride(1) // align, t.stride(2)


def _padded_rows(t):
    """t (B, C, L) with rows starting on 16-element boundaries: a padded copy unless they
    already do. Used for query-sized tensors (q, dO), which the backward re-reads per block."""
    if t.stride(2) == 1 and t.stride(1) % 16 == 0 and (t.shape[0] == 1 or t.stride(0) % 16 == 0):
        return t
    length = t.shape[2]
    padded = torch.empty(t.shape[:2] + (triton.cdiv(length, 16) * 16,), dtype=t.dtype, device=t.device)
    padded = padded[:, :, :length]
    padded.copy_(t)
    return padded


def _check_device(*tensors):
    if tensors[0].device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            f"stm_kernels, to run the kernels on CPU); got tensors on {tensors[0].device}")


# --------------------------------------------------------------------------- launchers


def _launch_flags(inputs, outputs):
    """Constexprs shared by the kernels of one call (inputs start with q, k, v; outputs are the
    (C, L) shapes of the contiguous outputs)."""
    _, k, v = inputs[:3]
    return dict(
        BLOCK_CK=max(16, triton.next_power_of_2(k.shape[1])),
        PRECISION=_dot_precision(k.dtype),
        UPCAST=INTERPRETING and k.dtype == torch.bfloat16,
        I64=_needs_int64(*inputs, outputs=outputs),
        ALIGN_K=_alignment(k), ALIGN_V=_alignment(v),
    )


def _value_blocks(Cv, block_v):
    """(BLOCK_V, number of value chunks) for a requested chunk size (None: all channels)."""
    full = max(16, triton.next_power_of_2(Cv))
    block_v = full if block_v is None else min(block_v, full)
    return block_v, triton.cdiv(Cv, block_v)


def triton_forward(q, k, v, scale, l2):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW) float32) for q (Bq, Ck, HW), k (B, Ck, N),
    v (B, Cv, N); q, k, v share one dtype, any strides."""
    _check_device(q, k, v)
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    q = _padded_rows(q)
    stride_qb = 0 if q.shape[0] == 1 else q.stride(0)
    flags = _launch_flags((q, k, v), outputs=[(Cv, HW)])
    k_strides = _memory_strides(k, flags["ALIGN_K"])
    v_strides = _memory_strides(v, flags["ALIGN_V"])

    def launch(config):
        block_v, num_v = _value_blocks(Cv, config.block_v)
        m_blocks = triton.cdiv(HW, config.block_m)
        n_blocks = triton.cdiv(N, config.block_n)
        splits = _memory_splits(config.splits, m_blocks * B * num_v, n_blocks, device)
        per_split, splits = _split_length(N, config.block_n, splits)
        out = new_buffer((B, Cv, HW), v.dtype, device)
        lse = new_buffer((B, HW), torch.float32, device)
        if splits == 1:
            part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
        else:
            part_out = new_buffer((splits, B, Cv, HW), torch.float32, device)
            part_lse = new_buffer((splits, B, HW), torch.float32, device)
        memory_read_fwd_kernel[(m_blocks, B * num_v, splits)](
            q, k, v, part_out, part_lse,
            stride_qb, q.stride(1), q.stride(2), *k_strides, *v_strides,
            *part_out.stride(), *part_lse.stride(),
            HW, N, Ck, Cv, per_split, scale * LOG2E,
            L2=l2, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_V=block_v,
            NUM_V=num_v, num_warps=config.num_warps, num_stages=config.num_stages, **flags,
        )
        if splits > 1:
            merge_v = min(block_v, 64)
            memory_read_merge_kernel[(triton.cdiv(HW, 64), triton.cdiv(Cv, merge_v), B)](
                part_out, part_lse, out, lse,
                *part_out.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
                HW, Cv, splits, BLOCK_M=64, BLOCK_V=merge_v, I64=flags["I64"], num_warps=4,
            )
        return out, lse

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _run_first_fitting("forward", (k.dtype, Ck, Cv, l2), launch)


def triton_backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2):
    """Gradients (dq shaped like q, dk, dv) of the read; probabilities are recomputed from lse."""
    _check_device(q, k, v)
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    device = k.device
    broadcast = q.shape[0] == 1 and B > 1
    # delta_i = sum_c dO_ci O_ci, minus the incoming gradient of lse (d lse / d s = p).
    delta = (grad_out.float() * out.float()).sum(1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta, lse = delta.contiguous(), lse.contiguous()
    q_dtype = q.dtype
    q, grad_out = _padded_rows(q), _padded_rows(grad_out)
    stride_qb = 0 if q.shape[0] == 1 else q.stride(0)
    flags = _launch_flags((q, k, v, grad_out), outputs=[(Ck, N), (Cv, N), (Ck, HW)])
    k_strides = _memory_strides(k, flags["ALIGN_K"])
    v_strides = _memory_strides(v, flags["ALIGN_V"])
    inputs = (q, k, v, grad_out, lse, delta)
    input_strides = (stride_qb, q.stride(1), q.stride(2), *k_strides, *v_strides,
                     *grad_out.stride(), *lse.stride())

    def launch(config):
        block_v, num_v = _value_blocks(Cv, config.dkv_block_v)
        dv = new_buffer((B, Cv, N), v.dtype, device)
        if num_v == 1:
            dk = new_buffer((B, Ck, N), k.dtype, device)
            dk_parts = dk.unsqueeze(0)
        else:
            dk_parts = new_buffer((num_v, B, Ck, N), torch.float32, device)
        memory_read_bwd_kernel_dkv[(triton.cdiv(N, config.dkv_block_n), B * num_v)](
            *inputs, dk_parts, dv, *input_strides, *dk_parts.stride(), *dv.stride(),
            HW, N, Ck, Cv, scale, scale * LOG2E,
            L2=l2, BLOCK_M=config.dkv_block_m, BLOCK_N=config.dkv_block_n, BLOCK_V=block_v,
            NUM_V=num_v, num_warps=config.dkv_warps, num_stages=config.dkv_stages, **flags,
        )
        if num_v > 1:
            dk = dk_parts.sum(0).to(k.dtype)

        m_blocks = triton.cdiv(HW, config.dq_block_m)
        n_blocks = triton.cdiv(N, config.dq_block_n)
        splits = _memory_splits(config.dq_splits, m_blocks * B, n_blocks, device)
        per_split, splits = _split_length(N, config.dq_block_n, splits)
        dq_parts = new_buffer((splits, B, Ck, HW), torch.float32, device)
        memory_read_bwd_kernel_dq[(m_blocks, B, splits)](
            *inputs, dq_parts, *input_strides, *dq_parts.stride(),
            HW, N, Ck, Cv, per_split, scale, scale * LOG2E,
            L2=l2, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n,
            BLOCK_V=_value_blocks(Cv, None)[0],
            num_warps=config.dq_warps, num_stages=config.dq_stages, **flags,
        )
        dq = dq_parts.sum((0, 1) if broadcast else 0)
        return (dq.unsqueeze(0) if broadcast else dq).to(q_dtype), dk, dv

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _run_first_fitting("backward", (k.dtype, Ck, Cv, l2), launch)
