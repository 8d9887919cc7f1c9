"""Warp-specialised forward of the memory read for Hopper (sm_90), written in Gluon.

Opt-in and experimental: nothing dispatches here by default. It compiles for sm_90 without a
GPU (tools/tests/test_gluon_compile.py checks the PTX and ptxas' resource report) and stays
opt-in until a GPU run shows it correct (tests marked `gpu` in
tests/kernels/test_gluon_forward.py) and faster than `memory_read_fwd_kernel` (bench.kernel);
then "forward" in sm_90's tilings.Architecture.warp_specialized makes it the default.

Same contract as `memory_read_fwd_kernel` (stm_kernels/backends/triton/kernels/forward.py):
q (Bq, Ck, HW) with Bq = B or 1 (or a stride-0 batch), k (B, Ck, N), v (B, Cv, N); the program
(query block i_m, object i_b, memory split i_s) reads memory positions
[i_s*per_split, min((i_s+1)*per_split, N)) and writes part_out[i_s, i_b, :, m-range]
(out = acc / rowsum) and part_lse[i_s, i_b, m-range] (natural log). Scores are kept in base 2
(qk_scale = scale * log2(e)). With value_chunks > 1 (WarpSpecializedConfig) grid axis 0 also
runs over value chunks: each program writes ceil(Cv / value_chunks) of the channels, and the
first chunk the lse.

One CTA per program, four warpgroups: a softmax partition computes S = Q K once per block and
the online softmax, two PV partitions accumulate P V over half the value channels each (or,
with the row split, over 64 rows each), a load warp streams K and V with TMA through mbarrier
rings. The partitions, barriers, register and shared-memory budgets are described in
docs/gluon_forward.md.

Constraints (`unsupported_reason`): CUDA tensors, bf16/fp16, q/k/v of one dtype; k and v with
position stride 1, other strides a multiple of 16 bytes (N % 8 == 0 for contiguous tensors)
and 16-byte-aligned bases (TMA); Ck a power of two in [16, 256]; Cv >= 16 with at most 256
channels per PV warpgroup (ceil(Cv/2) by default, so Cv <= 512; ceil(Cv/value_chunks) with
split_rows), loaded as a box of the next power of two rows (rows past a warpgroup's channels
are loaded but never stored); the shared-memory estimate must fit 227 KiB. The query is copied
to 16-byte-aligned rows when it is not (it is small). The object dimension is folded into the
TMA rows when k/v's batch stride is C * channel stride (contiguous tensors, slices along N);
otherwise the kernel is launched once per object.
"""
import torch

from ..backends.triton import devices
from ..torch_common import LN2
# Re-exported: the tilings belong with the others, the kernel's users look for them here.
from ..backends.triton.tilings import ROW_SPLIT_CONFIG, WarpSpecializedConfig  # noqa: F401
from .gluon_common import (AVAILABLE, SM90_SHARED_MEMORY, UNAVAILABLE_REASON, KeptGluonLaunch,
                           cdiv, device_reason, nvmma_layouts, rows_2d, tma_strides_ok)

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    from .gluon_common import barrier_ring


def _shapes(Cv, config):
    """(channels per PV warpgroup, rows of its V TMA box = next power of two, V boxes per
    stage: 2 when the PV warpgroups split the channels, 1 when they split the rows)."""
    chunk = cdiv(Cv, config.value_chunks)
    channels = chunk if config.split_rows else cdiv(chunk, 2)
    return channels, 1 << max(channels - 1, 0).bit_length(), 1 if config.split_rows else 2


def shared_memory_bytes(Ck, Cv, element_size=2, config=None):
    """Estimated shared memory of one program (the buffers above; barriers and scratch aside)."""
    config = config or WarpSpecializedConfig()
    _, box, boxes = _shapes(Cv, config)
    m, n = config.block_m, config.block_n
    tiles = Ck * m + config.num_stages * (Ck * n + boxes * box * n) + config.num_p * m * n
    vectors = 4 * (config.num_p + 1) * m  # alpha ring and l, fp32
    barriers = 8 * (4 * config.num_stages + 2 * config.num_p + 2)
    return tiles * element_size + vectors + barriers


# --------------------------------------------------------------------------- kernel

if AVAILABLE:
    LN2_C = gl.constexpr(LN2)

    @gluon.jit
    def _ws_softmax_partition(q_smem, k_smem, p_smem, alpha_smem, l_smem,
                              q_bar, k_ready, k_empty, p_ready, p_empty, o_bar,
                              lse, stride_ls, stride_lb, stride_lm, i_s, i_b, i_c, first_m, HW,
                              n_lo, n_hi, n_blocks, qk_scale,
                              L2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              CK: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_P: gl.constexpr):
        # One warpgroup: S = Q K once per block, online softmax, P and alpha to the PV warps.
        # 64 rows: Q in registers (32 per thread); 128 rows (two wgmma M tiles): Q stays the
        # shared-memory operand, since S alone then takes 64 registers per thread.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        k_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

        mbarrier.wait(q_bar, 0)
        if BLOCK_M <= 64:
            b_q = q_smem.permute((1, 0)).load(q_layout)  # (BLOCK_M, CK), kept in registers
        else:
            b_q = q_smem.permute((1, 0))
        b_max = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        b_sum = gl.zeros([BLOCK_M], gl.float32, row_layout)
        b_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o_n = gl.arange(0, BLOCK_N, layout=col_layout)
        for j in range(n_blocks):
            stage = j % NUM_STAGES
            mbarrier.wait(k_ready.index(stage), (j // NUM_STAGES) & 1)
            b_k = k_smem.index(stage)  # (CK, BLOCK_N)
            b_s = warpgroup_mma(b_q, b_k, b_zero, use_acc=False, is_async=True)
            if L2:
                # |k_j|^2 in fp32 from the same tile, while the wgmma runs.
                b_kf = b_k.load(k_layout).to(gl.float32)
                b_ksq = gl.convert_layout(gl.sum(b_kf * b_kf, axis=0), col_layout)
            b_s = warpgroup_mma_wait(num_outstanding=0, deps=(b_s,))
            if L2:
                fence_async_shared()  # generic reads of the tile before the next TMA write
            mbarrier.arrive(k_empty.index(stage), count=1)

            if L2:
                b_s = (2.0 * b_s - b_ksq[None, :]) * qk_scale
            else:
                b_s = b_s * qk_scale
            b_s = gl.where((n_lo + j * BLOCK_N + o_n < n_hi)[None, :], b_s, float("-inf"))
            b_max_new = gl.maximum(b_max, gl.max(b_s, axis=1))
            b_alpha = gl.exp2(b_max - b_max_new)
            b_p = gl.exp2(b_s - b_max_new[:, None])
            b_sum = b_sum * b_alpha + gl.sum(b_p, axis=1)
            b_max = b_max_new

            slot = j % NUM_P
            mbarrier.wait(p_empty.index(slot), ((j // NUM_P) & 1) ^ 1)
            p_smem.index(slot).store(b_p.to(p_smem.dtype))
            alpha_smem.index(slot).store(b_alpha)
            fence_async_shared()  # P is read by wgmma (async proxy)
            mbarrier.arrive(p_ready.index(slot), count=1)

        l_smem.store(b_sum)
        mbarrier.arrive(o_bar, count=1)
        o_m = first_m + gl.arange(0, BLOCK_M, layout=row_layout)
        p_lse = lse + i_s.to(gl.int64) * stride_ls + i_b.to(gl.int64) * stride_lb
        # Every value chunk computes the same lse: the first one stores it.
        gl.store(p_lse + o_m * stride_lm, (b_max + gl.log2(b_sum)) * LN2_C,
                 mask=(o_m < HW) & (i_c == 0))

    @gluon.jit
    def _ws_pv_partition(v_smem, p_smem, alpha_smem, l_smem, v_ready, v_empty, p_ready, p_empty,
                         o_bar, o, stride_os, stride_ob, stride_oc, stride_om, i_s, i_b, first_m,
                         c_lo, c_hi, HW, n_blocks, HALF: gl.constexpr, SPLIT_ROWS: gl.constexpr,
                         PV_CH: gl.constexpr, EVEN_CHUNKS: gl.constexpr, BLOCK_M: gl.constexpr,
                         NUM_STAGES: gl.constexpr, NUM_P: gl.constexpr, MMA_N: gl.constexpr):
        # One warpgroup: acc = acc * alpha + P V over its rows and value channels: rows
        # [HALF*PV_M, +PV_M) and channels [c_lo, c_hi) when the two split the rows; all rows
        # and channels [c_lo + HALF*PV_CH, +PV_CH) when they split the channels.
        CV_BOX: gl.constexpr = v_smem.shape[1]
        PV_M: gl.constexpr = BLOCK_M // 2 if SPLIT_ROWS else BLOCK_M
        ROW0: gl.constexpr = HALF * PV_M if SPLIT_ROWS else 0
        V_BOXES: gl.constexpr = 1 if SPLIT_ROWS else 2
        V_BOX: gl.constexpr = 0 if SPLIT_ROWS else HALF
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, MMA_N, 16])
        row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, o_layout)

        acc = gl.zeros([PV_M, CV_BOX], gl.float32, o_layout)
        for j in range(n_blocks):
            stage = j % NUM_STAGES
            slot = j % NUM_P
            mbarrier.wait(p_ready.index(slot), (j // NUM_P) & 1)
            b_alpha = alpha_smem.index(slot).slice(ROW0, PV_M).load(row_layout)
            acc = acc * b_alpha[:, None]
            mbarrier.wait(v_ready.index(stage), (j // NUM_STAGES) & 1)
            b_v = v_smem.index(stage * V_BOXES + V_BOX).permute((1, 0))  # (BLOCK_N, CV_BOX)
            b_p = p_smem.index(slot).slice(ROW0, PV_M)  # (PV_M, BLOCK_N)
            acc = warpgroup_mma(b_p, b_v, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(p_empty.index(slot), count=1)
            mbarrier.arrive(v_empty.index(stage), count=1)

        mbarrier.wait(o_bar, 0)
        b_l = l_smem.slice(ROW0, PV_M).load(row_layout)
        b_o = acc / b_l[:, None]
        o_m = first_m + ROW0 + gl.arange(0, PV_M, layout=row_layout)
        o_c = gl.arange(0, CV_BOX, layout=col_layout)
        # The channel offset goes into the scalar base and the column mask is a constant
        # unless the last value chunk is short: per-column runtime masks and offsets beside
        # the 128-register accumulator spill (260 B with split_rows).
        c_start = c_lo + V_BOX * PV_CH
        mask = (o_m < HW)[:, None] & (o_c < PV_CH)[None, :]
        if not EVEN_CHUNKS:
            mask = mask & (c_start + o_c < c_hi)[None, :]
        p_o = (o + i_s.to(gl.int64) * stride_os + i_b.to(gl.int64) * stride_ob
               + c_start.to(gl.int64) * stride_oc)
        gl.store(p_o + o_c[None, :] * stride_oc + o_m[:, None] * stride_om,
                 b_o.to(o.dtype.element_ty), mask=mask)

    @gluon.jit
    def _ws_load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                           q_bar, k_ready, k_empty, v_ready, v_empty,
                           q_row, k_row, v_row, first_m, n_lo, n_blocks,
                           PV_CH: gl.constexpr, V_BOXES: gl.constexpr, BLOCK_N: gl.constexpr,
                           NUM_STAGES: gl.constexpr):
        # One warp: TMA loads into the rings; K runs one block ahead of V (V_BOXES boxes of
        # PV_CH channels from row v_row per stage).
        Q_BYTES: gl.constexpr = q_smem.shape[0] * q_smem.shape[1] * 2
        K_BYTES: gl.constexpr = k_smem.shape[1] * k_smem.shape[2] * 2
        V_BYTES: gl.constexpr = V_BOXES * v_smem.shape[1] * v_smem.shape[2] * 2
        mbarrier.expect(q_bar, Q_BYTES)
        tma.async_copy_global_to_shared(q_desc, [q_row, first_m], q_bar, q_smem)
        for j in range(n_blocks + 1):
            if j < n_blocks:
                stage = j % NUM_STAGES
                mbarrier.wait(k_empty.index(stage), ((j // NUM_STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(stage), K_BYTES)
                tma.async_copy_global_to_shared(k_desc, [k_row, n_lo + j * BLOCK_N],
                                                k_ready.index(stage), k_smem.index(stage))
            if j > 0:
                jv = j - 1
                stage = jv % NUM_STAGES
                mbarrier.wait(v_empty.index(stage), ((jv // NUM_STAGES) & 1) ^ 1)
                bar = v_ready.index(stage)
                mbarrier.expect(bar, V_BYTES)
                for box in gl.static_range(V_BOXES):
                    tma.async_copy_global_to_shared(
                        v_desc, [v_row + box * PV_CH, n_lo + jv * BLOCK_N], bar,
                        v_smem.index(stage * V_BOXES + box))

    @gluon.jit
    def memory_read_ws_fwd_kernel(
        q_desc, k_desc, v_desc, o, lse,
        stride_os, stride_ob, stride_oc, stride_om,
        stride_ls, stride_lb, stride_lm,
        HW, N, n_per_split, qk_scale,
        L2: gl.constexpr, Q_BROADCAST: gl.constexpr, CK: gl.constexpr, CV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        NUM_P: gl.constexpr, P_LAYOUT: gl.constexpr, PV_REGS: gl.constexpr,
        LOAD_REGS: gl.constexpr, VALUE_CHUNKS: gl.constexpr, SPLIT_ROWS: gl.constexpr,
    ):
        # Axis 0: query block x value chunk (the chunks of a block side by side, sharing Q
        # and K in L2).
        i_m = gl.program_id(0) // VALUE_CHUNKS
        i_c = gl.program_id(0) % VALUE_CHUNKS
        i_b = gl.program_id(1)
        i_s = gl.program_id(2)
        first_m = i_m * BLOCK_M
        n_lo = i_s * n_per_split
        n_hi = gl.minimum(n_lo + n_per_split, N)
        n_blocks = gl.cdiv(n_hi - n_lo, BLOCK_N)
        CHUNK: gl.constexpr = (CV + VALUE_CHUNKS - 1) // VALUE_CHUNKS
        PV_CH: gl.constexpr = CHUNK if SPLIT_ROWS else (CHUNK + 1) // 2
        V_BOXES: gl.constexpr = 1 if SPLIT_ROWS else 2
        # Every chunk (every PV warpgroup's share of one) is whole: no runtime channel mask.
        EVEN_CHUNKS: gl.constexpr = CV % VALUE_CHUNKS == 0 and (SPLIT_ROWS or CHUNK % 2 == 0)
        c_lo = i_c * CHUNK
        c_hi = gl.minimum(c_lo + CHUNK, CV)
        CV_BOX: gl.constexpr = v_desc.block_type.shape[0]
        # ptxas needs the kernel-wide register target (128 at 512 threads) to fit any single
        # instruction: an m64n256k16 wgmma with fp32 accumulators needs 154, so the PV product
        # is issued as n <= 128 instructions (setmaxnreg still gives the partition its budget).
        MMA_N: gl.constexpr = 128 if CV_BOX > 128 else CV_BOX
        if Q_BROADCAST:
            q_row = i_b * 0
        else:
            q_row = i_b * CK
        k_row = i_b * CK
        v_row = i_b * CV + c_lo

        dtype: gl.constexpr = k_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [CK, BLOCK_M], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, CK, BLOCK_N], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_BOXES * NUM_STAGES, CV_BOX, BLOCK_N],
                                           v_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [NUM_P, BLOCK_M, BLOCK_N], P_LAYOUT)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        alpha_smem = gl.allocate_shared_memory(gl.float32, [NUM_P, BLOCK_M], vec_layout)
        l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], vec_layout)

        q_bar = barrier_ring(1, 1).index(0)
        o_bar = barrier_ring(1, 1).index(0)
        k_ready = barrier_ring(NUM_STAGES, 1)
        k_empty = barrier_ring(NUM_STAGES, 1)
        v_ready = barrier_ring(NUM_STAGES, 1)
        v_empty = barrier_ring(NUM_STAGES, 2)  # both PV warpgroups release a V stage
        p_ready = barrier_ring(NUM_P, 1)
        p_empty = barrier_ring(NUM_P, 2)

        gl.warp_specialize([
            (_ws_softmax_partition,
             (q_smem, k_smem, p_smem, alpha_smem, l_smem, q_bar, k_ready, k_empty, p_ready,
              p_empty, o_bar, lse, stride_ls, stride_lb, stride_lm, i_s, i_b, i_c, first_m, HW,
              n_lo, n_hi, n_blocks, qk_scale, L2, BLOCK_M, BLOCK_N, CK, NUM_STAGES, NUM_P)),
            (_ws_pv_partition,
             (v_smem, p_smem, alpha_smem, l_smem, v_ready, v_empty, p_ready, p_empty, o_bar, o,
              stride_os, stride_ob, stride_oc, stride_om, i_s, i_b, first_m, c_lo, c_hi, HW,
              n_blocks, 0, SPLIT_ROWS, PV_CH, EVEN_CHUNKS, BLOCK_M, NUM_STAGES, NUM_P,
              MMA_N)),
            (_ws_pv_partition,
             (v_smem, p_smem, alpha_smem, l_smem, v_ready, v_empty, p_ready, p_empty, o_bar, o,
              stride_os, stride_ob, stride_oc, stride_om, i_s, i_b, first_m, c_lo, c_hi, HW,
              n_blocks, 1, SPLIT_ROWS, PV_CH, EVEN_CHUNKS, BLOCK_M, NUM_STAGES, NUM_P,
              MMA_N)),
            (_ws_load_partition,
             (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
              v_empty, q_row, k_row, v_row, first_m, n_lo, n_blocks, PV_CH, V_BOXES, BLOCK_N,
              NUM_STAGES)),
        ], [4, 4, 1], [PV_REGS, PV_REGS, LOAD_REGS])


# --------------------------------------------------------------------------- host side

def _layouts(dtype, Ck, Cv, config):
    """Shared-memory layouts of the TMA boxes and the P tile (NVMMA swizzles)."""
    _, box, _ = _shapes(Cv, config)
    m, n = config.block_m, config.block_n
    return nvmma_layouts(dtype, dict(q=[Ck, m], k=[Ck, n], v=[box, n], p=[m, n]))


def unsupported_reason(q, k, v, config=None):
    """None when ws_forward can run on these (q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N));
    otherwise a short reason (the caller then uses the plain Triton kernel)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    config = config or WarpSpecializedConfig()
    reason = device_reason(dict(q=q, k=k, v=v))
    if reason is not None:
        return reason
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "needs (B, C, L) tensors"
    B, Ck, N = k.shape
    Cv = v.shape[1]
    if v.shape[0] != B or v.shape[2] != N or q.shape[1] != Ck or q.shape[0] not in (1, B):
        return "inconsistent shapes"
    if Ck < 16 or Ck > 256 or Ck & (Ck - 1):
        return f"Ck must be a power of two in [16, 256] (got {Ck})"
    reason = _config_reason(config)
    if reason is not None:
        return reason
    channels, _, _ = _shapes(Cv, config)
    if Cv < 16 or channels > 256:
        return (f"Cv must be >= 16 and give each PV warpgroup <= 256 channels (got {Cv}: "
                f"{channels} at value_chunks={config.value_chunks}, "
                f"split_rows={config.split_rows})")
    if q.shape[2] == 0 or N == 0 or B == 0:
        return "empty tensor"
    for name, t in (("k", k), ("v", v)):
        if not tma_strides_ok(t):
            return (f"{name} is not TMA-addressable: needs position stride 1, other strides and "
                    f"the base 16-byte aligned (N % 8 == 0 when contiguous); got strides "
                    f"{tuple(t.stride())}")
    if max(k.shape[1], v.shape[1]) * max(k.stride(1), v.stride(1)) >= 2**31:
        return "a channel plane of k or v spans >= 2**31 elements"
    if q.shape[2] * max(abs(s) for s in q.stride()) >= 2**31:
        return "q too large"
    smem = shared_memory_bytes(Ck, Cv, k.element_size(), config)
    limit = devices.describe(k.device).shared_memory if k.is_cuda else SM90_SHARED_MEMORY
    if smem + 1024 > limit:  # + barriers, scheduling state, l2 scratch
        return f"needs ~{smem} bytes of shared memory (> {limit // 1024} KiB) at this config"
    return None


def _config_reason(config):
    if config.block_m != (128 if config.split_rows else 64):
        return ("block_m must be 64 (one wgmma M tile per PV warpgroup), or 128 with "
                "split_rows (64 rows per PV warpgroup)")
    if config.value_chunks < 1:
        return "value_chunks must be >= 1"
    if config.block_n not in (16, 32, 64, 128):
        return "block_n must be 16, 32, 64 or 128"
    if config.num_stages < 1 or config.num_p < 1:
        return "num_stages and num_p must be >= 1"
    if config.load_regs < 24 or config.pv_regs > 256 or config.pv_regs % 8 or config.load_regs % 8:
        return "register budgets must be multiples of 8 in [24, 256]"
    return None


def _aligned_query(q):
    """q (Bq, Ck, HW) with 16-byte aligned rows and a foldable object dimension (a padded copy
    otherwise; q is query-sized)."""
    if tma_strides_ok(q) and rows_2d(q) is not None:
        return q
    Bq, Ck, HW = q.shape
    width = cdiv(HW, 8) * 8
    padded = torch.empty((Bq, Ck, width), dtype=q.dtype, device=q.device)[:, :, :HW]
    padded.copy_(q)
    return padded


def ws_forward(q, k, v, part_out, part_lse, *, per_split, qk_scale, l2, config=None):
    """Run the warp-specialised forward: grid (cdiv(HW, block_m), B, splits), splits =
    part_out.shape[0]. part_out (splits, B, Cv, HW) and part_lse (splits, B, HW) as
    memory_read_fwd_kernel writes them (out in v's dtype and lse when splits == 1, fp32 partials
    otherwise). per_split: memory positions per split; qk_scale = scale * log2(e)."""
    launch = prepare(q, k, v, part_out, part_lse, per_split=per_split, qk_scale=qk_scale, l2=l2,
                     config=config)
    launch(q, k, v, part_out, part_lse)
    return part_out, part_lse


def prepare(q, k, v, part_out, part_lse, *, per_split, qk_scale, l2, config=None):
    """The WsLaunch of ws_forward's arguments, checked (ValueError where ws_forward cannot run
    them); it launches on any later call's tensors of the same layout."""
    reason = unsupported_reason(q, k, v, config)
    if reason is not None:
        raise ValueError(f"warp-specialised forward unsupported: {reason}")
    config = config or WarpSpecializedConfig()
    B, Ck, N = k.shape
    Cv, HW = v.shape[1], q.shape[2]
    splits = part_out.shape[0]
    if tuple(part_out.shape) != (splits, B, Cv, HW) or tuple(part_lse.shape) != (splits, B, HW):
        raise ValueError(f"part_out {tuple(part_out.shape)} / part_lse {tuple(part_lse.shape)} "
                         f"do not match (splits, B, Cv, HW) = ({splits}, {B}, {Cv}, {HW})")
    if splits * per_split < N or (splits - 1) * per_split >= N:
        raise ValueError(f"{splits} splits of {per_split} positions do not cover N = {N} exactly")
    layouts = _layouts(k.dtype, Ck, Cv, config)
    folded = rows_2d(k) is not None and rows_2d(v) is not None
    # an object's slice of the outputs has their strides: one set for every launch
    fixed = dict(stride_os=part_out.stride(0), stride_ob=part_out.stride(1),
                 stride_oc=part_out.stride(2), stride_om=part_out.stride(3),
                 stride_ls=part_lse.stride(0), stride_lb=part_lse.stride(1),
                 stride_lm=part_lse.stride(2), HW=HW, N=N, n_per_split=per_split,
                 qk_scale=float(qk_scale), num_warps=4,
                 **_constexprs(l2, Ck, Cv, config, layouts))
    grid = (cdiv(HW, config.block_m) * config.value_chunks, B if folded else 1, splits)
    return WsLaunch(grid, layouts, fixed, folded)


class WsLaunch(KeptGluonLaunch):
    """ws_forward planned for one call layout (shapes, strides, dtype, scale, similarity,
    config; gluon_common.KeptGluonLaunch). Called with a call's tensors of that layout, it
    writes the memory splits' partial reads (k and v must still start on 16 bytes: a ValueError
    otherwise, as TMA requires)."""
    operands = ("q", "k", "v")

    def __call__(self, q, k, v, part_out, part_lse):
        if k.data_ptr() % 16 or v.data_ptr() % 16:
            raise ValueError("warp-specialised forward: k and v must start on 16 bytes (TMA)")
        broadcast = q.shape[0] == 1 or q.stride(0) == 0
        self.launch(memory_read_ws_fwd_kernel, _aligned_query(q[:1] if broadcast else q),
                    (k, v), lambda objects: dict(o=part_out[:, objects],
                                                 lse=part_lse[:, objects]))


def _constexprs(l2, Ck, Cv, config, layouts):
    return dict(L2=bool(l2), CK=Ck, CV=Cv, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                NUM_STAGES=config.num_stages, NUM_P=config.num_p, P_LAYOUT=layouts["p"][1],
                PV_REGS=config.pv_regs, LOAD_REGS=config.load_regs,
                VALUE_CHUNKS=config.value_chunks, SPLIT_ROWS=bool(config.split_rows))

