"""How a launch covers its work: query blocks, value chunks and memory splits, and the grid
they make.

    forward_plan                   the forward's value chunks, query blocks and memory splits
                                   (flash-decoding: memory_splits)
    dq_plan                        the deterministic dQ kernel's, laid out as the forward's
    warp_specialized_forward_plan  the Gluon forward's (its offline compile's too)
    select_block_n                 the selection's memory block and top_k width
    cdiv, next_power_of_2          the host's own integer helpers
"""
import dataclasses

from .tilings import ForwardConfig


# Host code's own integer helpers: triton.cdiv and triton.next_power_of_2 are
# constexpr_functions, whose call wrapper costs microseconds, and a launch makes dozens.
def cdiv(a, b):
    """ceil(a / b) of two positive Python ints."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    block_v: int
    num_v: int
    m_blocks: int
    splits: int
    per_split: int

    def grid(self, B):
        return (self.m_blocks, B * self.num_v, self.splits)


def value_blocks(Cv, block_v):
    """(BLOCK_V, number of value chunks) for a requested chunk size (None: all channels)."""
    full = max(16, next_power_of_2(Cv))
    block_v = full if block_v is None else min(block_v, full)
    return block_v, cdiv(Cv, block_v)


def memory_splits(requested, programs, n_blocks, multiprocessors):
    """How many programs share one query block's memory (flash-decoding): enough to fill the
    device when objects x query blocks are too few, each split still several memory blocks."""
    if requested is not None:
        splits = requested
    else:
        splits = min(multiprocessors // max(programs, 1), n_blocks // 4)
    return max(1, min(splits, n_blocks))


def forward_plan(config, B, HW, N, Cv, multiprocessors):
    """Value chunks, query blocks and memory splits of a forward launch."""
    block_v, num_v = value_blocks(Cv, config.block_v)
    m_blocks = cdiv(HW, config.block_m)
    n_blocks = cdiv(N, config.block_n)
    splits = memory_splits(config.splits, m_blocks * B * num_v, n_blocks, multiprocessors)
    # Positions per split: a multiple of block_n; fewer splits when the last would be empty.
    per_split = cdiv(n_blocks, splits) * config.block_n
    return ForwardPlan(block_v, num_v, m_blocks, cdiv(N, per_split), per_split)


def dq_plan(config, B, HW, N, Cv, multiprocessors):
    """Query blocks, memory splits and value chunking of the deterministic dQ kernel (a
    DqConfig): its programs are laid out as the forward's, without value chunks."""
    plan = forward_plan(ForwardConfig(block_m=config.block_m, block_n=config.block_n,
                                      block_v=None, splits=config.splits), B, HW, N, Cv,
                        multiprocessors)
    block_cv, num_cv = value_blocks(Cv, config.block_cv)
    return dict(grid=(plan.m_blocks, B, plan.splits), splits=plan.splits,
                per_split=plan.per_split, block_cv=block_cv, num_cv=num_cv)


def warp_specialized_forward_plan(ws_config, B, HW, N, Cv, multiprocessors):
    """The Gluon forward's ForwardPlan: its query blocks and value chunks, memory splits
    picked as for the plain forward (also the offline compile's)."""
    chunk = cdiv(Cv, ws_config.value_chunks)
    return forward_plan(ForwardConfig(
        block_m=ws_config.block_m, block_n=ws_config.block_n,
        block_v=None if ws_config.value_chunks == 1 else next_power_of_2(chunk)),
        B, HW, N, Cv, multiprocessors)


def select_block_n(top_k):
    """(memory positions per block, top_k rounded up to a power of two) of the selection."""
    top_k_pow2 = next_power_of_2(top_k)
    return max(64, top_k_pow2), top_k_pow2
