"""Small @triton.jit helpers shared by the forward and backward kernels."""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr when compiled for a GPU.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)


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
    if I64:
        return o_row[:, None].to(tl.int64) * stride_row + o_col[None, :].to(tl.int64) * stride_col
    return o_row[:, None] * stride_row + o_col[None, :] * stride_col
