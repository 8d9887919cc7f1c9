"""Pieces shared by the PyTorch paths of the read family (backends/pytorch.py, topk, merge,
distributed): the accumulation dtype, the memory chunking and the scores of a chunk."""
import contextlib
import functools

import torch

# Score elements (B x HW x chunk) per memory chunk: 4M floats = 16 MB, a few of them alive.
CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(dtype):
    """The dtype sums, softmax statistics and log-sum-exps are kept in for inputs of `dtype`:
    float64 for float64, float32 for everything else (fp16/bf16 products accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_length(B, HW, N):
    """Memory positions per chunk so that a chunk's scores (B, HW, n) hold CHUNK_ELEMENTS."""
    return max(1, min(N, CHUNK_ELEMENTS // max(B * HW, 1)))


# The read's softmax weights are powers of two: scores scaled by LOG2E and exp2, which torch's
# CPU runs several times faster than exp, whose slow path (below -87 in float32: denormal or
# zero results) a trained model's peaked scores take for most weights (docs/op.md).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The smallest exponent of 2 whose power is a normal number: arguments below it are raised to
# it (denormal and zero results take a slower path of exp2 as well).
EXP2_FLOOR = {torch.float32: -126.0, torch.float64: -1022.0}


def _flushing_denormals():
    """Whether this thread's float operations flush denormal numbers to zero (the state torch's
    set_flush_denormal sets, which it cannot read back)."""
    return bool(torch.full((1,), 2.0 ** -126).mul_(0.5) == 0)


@contextlib.contextmanager
def denormals_flushed():
    """Denormal inputs and results of this thread's float operations read as zero inside (the
    thread's setting restored after; nothing changes on a CPU that cannot flush them): exp's
    denormal and zero results then take its fast path, not its much slower one."""
    flushing = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not flushing:
            torch.set_flush_denormal(False)


def floored_for_exp2_(shifted):
    """shifted (base-2 scores minus an offset of their row) raised to EXP2_FLOOR in place on a
    CPU: a weight of 2^EXP2_FLOOR instead of a smaller one moves a row's sum (at least 1 or its
    offset's share) by at most N 2^EXP2_FLOOR of it. Other devices and dtypes as they are."""
    floor = EXP2_FLOOR.get(shifted.dtype)
    if floor is not None and shifted.device.type == "cpu":
        shifted.clamp_(min=floor)
    return shifted


def exp2_shifted_(shifted):
    """2^shifted in place (floored_for_exp2_ first): the weights of base-2 scores minus an
    offset of their row."""
    return floored_for_exp2_(shifted).exp2_()


def score_gradient_factor(scale, l2):
    """d score / d (q.k) per unit of dS: scale for the dot similarity's scale q.k, 2 scale for
    l2's scale (2 q.k - |k|^2). The backward kernels take dS times it, so that dQ and dK come
    out scaled."""
    return scale * (2.0 if l2 else 1.0)


def chunk_scores(q_rows, k_chunk, scale, l2):
    """Scaled scores (B, HW, n) for q_rows (Bq, HW, Ck) already multiplied by scale and a
    memory chunk k_chunk (B, Ck, n); l2: the L2 similarity (2 q·k - |k|², scaled)."""
    scores = torch.matmul(q_rows, k_chunk)
    if l2:
        scores = scores.mul_(2).sub_(k_chunk.square().sum(1, keepdim=True).mul_(scale))
    return scores


def without_autocast(function):
    """Run a backend function with autocast off: it picks its own accumulation dtype, and an
    autocast region around the op (mixed-precision inference) must not recast its products.
    Where no autocast is on (or for meta tensors, which autocast never casts and
    torch.autocast refuses as a device) the function runs as it is: entering an autocast
    region costs microseconds a call."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        device = args[0].device.type
        if device == "meta" or not torch._C._is_any_autocast_enabled():
            return function(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return function(*args, **kwargs)
    return wrapper
