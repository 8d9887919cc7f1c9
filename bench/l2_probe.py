"""L2 -> SM read bandwidth of the device, measured the way the memory read uses the L2.

The fused forward streams each memory split's K and V through every query block's program at
the same time: many programs re-reading one region that the L2 holds. The static work report
(tools.kernel_report.report) gives the L2 bytes per (query, memory) pair of each kernel and the
bandwidth its speed target would need; this probe gives the bandwidth there is, in the same
run as the kernel benchmark (`python -m bench kernel` records it as "l2_read").

Every program sums a buffer that fits in the L2 (8 MiB by default: the H100 has 50 MB) several
times over, starting at a block of its own so that the programs spread over the L2's slices.
A plain streaming kernel, not a tuned one: read the figure as a lower bound of the L2's
bandwidth for this access pattern, and ncu's L2 throughput of the kernels themselves
(`bash tools/gpu_session/gpu_session.sh profile`) as the direct reading.
"""
import torch
import triton
import triton.language as tl

from bench import common


@triton.jit
def l2_read_kernel(x, sums, n_blocks, passes, BLOCK: tl.constexpr):
    """Program p adds up blocks p, p+1, ... (wrapping) of x, passes x n_blocks blocks."""
    i_p = tl.program_id(0)
    o_x = tl.arange(0, BLOCK)
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(passes * n_blocks):
        block = (i_p + i) % n_blocks
        b_acc += tl.load(x + block.to(tl.int64) * BLOCK + o_x).to(tl.float32)
    tl.store(sums + i_p, tl.sum(b_acc, axis=0))


def read_sums(x, programs, passes, block=8192):
    """Launch the probe: x is a 1-D tensor of a multiple of `block` elements; returns the
    (programs,) float32 sums (each passes x x.sum(), up to rounding)."""
    if x.dim() != 1 or x.numel() == 0 or x.numel() % block:
        raise ValueError(f"x must be 1-D with a positive multiple of {block} elements, "
                         f"got shape {tuple(x.shape)}")
    if programs < 1 or passes < 1:
        raise ValueError(f"programs and passes must be >= 1, got {programs} and {passes}")
    sums = torch.empty(programs, dtype=torch.float32, device=x.device)
    l2_read_kernel[(programs,)](x, sums, x.numel() // block, passes, BLOCK=block,
                                num_warps=8)
    return sums


def measure(device, *, buffer_mib=8, programs_per_sm=4, passes=4, dtype=torch.bfloat16):
    """{"tbps", "median_ms", "bytes", "buffer_mib", "programs", "passes"}: bytes the programs
    read from the L2 per second (TB/s), from the median of timed launches (CUDA events)."""
    element = torch.finfo(dtype).bits // 8
    x = torch.randn(buffer_mib * 2**20 // element, device=device).to(dtype)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    programs = programs_per_sm * sm_count
    read_sums(x, programs, 1)  # compile, and bring x into the L2
    median, _, _ = common.time_ms(lambda: read_sums(x, programs, passes), device)
    total = programs * passes * x.numel() * element
    return dict(tbps=total / (median * 1e-3) / 1e12, median_ms=median, bytes=total,
                buffer_mib=buffer_mib, programs=programs, passes=passes,
                note="lower bound of the L2 -> SM read bandwidth: every program re-reads one "
                     "L2-resident buffer, as the query blocks of one memory split do")
