"""The tilings of the Triton kernels, per GPU architecture: the one place that shows them.

Adding a GPU architecture is one entry of ARCHITECTURES (and, for a new kind of device, a line
of `architecture_of`). Each Architecture holds, per kernel, per precision class and per key
width, the candidate tilings in order of preference; a launch tries them in order, and one that
fails to compile or launch on the device, or spills more than its config allows
(max_local_bytes), falls through to the next (running.py), the last to the torch backend. The
first candidate of every entry is the one the static report (`python -m tools.kernel_report`)
compiles offline for that architecture: no register spills, within its shared memory, no
warpgroup repeating another's dot. Why each table looks the way it does, with the figures, is
in docs/kernels.md; the report itself is in docs/kernel_report.md.

Keys of a table: (kernel, precision class, key width), where
    kernel           "forward", "merge", "prepare" (the backward's first: delta, aligned
                     copies, the zeroed dQ), "dv", "dkdq", "dk" and "dq" (the deterministic
                     backward's dK kernel, i.e. dK+dQ without its dQ atomics, and its dQ
                     kernel), "select" (top-k), "select_merge" (the top-k of its memory
                     splits, decoded), "usage"
    precision class  "16-bit" (fp16, bf16), "tf32" (float32 under matmul precision "high" or
                     "medium": TF32 or an equivalent), "fp32" (float32 under "highest": exact
                     float32, see Architecture.input_precision)
    key width        128 (up to 128 key channels, STM/STCN's 64 or 128), 256 (XMem's
                     augmented channels at Ck = 64: 129), or 257 (XMem's at Ck = 128: 256
                     tiled channels and the last as a rank-1 score term, RANK1_WIDTHS); a
                     257 read without an entry of its own takes the 256 one (key_widths);
                     None in a key matches any precision or width.
Other wider keys (more than 256 channels) have no tiling: the torch backend reads them.
"""
import dataclasses
import os
import types
from collections.abc import Mapping
from typing import Optional, Union

import torch

from .devices import INTERPRETING, KIB, Device

KERNELS = ("forward", "merge", "prepare", "dv", "dkdq", "dk", "dq", "select", "select_merge",
           "usage")
# A kernel with no entry of its own in a table runs its twin's tilings (the same kernel code).
TWINS = {"dk": "dkdq"}
PRECISIONS = ("16-bit", "tf32", "fp32")
WIDTHS = (128, 256)
# Tiling widths whose reads of width + 1 key channels run on them, the last channel as a
# rank-1 score term u_i w_j beside the tiled dot (exact: calls.py): XMem's 2 * 128 + 1 = 257
# channels would otherwise need a 512-wide key tile, which no tiling takes. 129 (XMem at
# Ck = 64) keeps the 256-wide tilings: they meet the targets, and the 128-wide ones, at 255
# registers in many entries, were not searched with the rank-1 term.
RANK1_WIDTHS = (256,)
# The key widths of the tables' keys: the tile widths, and one past each of RANK1_WIDTHS.
KEY_WIDTHS = WIDTHS + tuple(width + 1 for width in RANK1_WIDTHS)
# Why a rank-1 read with the l2 similarity reads with torch: its per-position slot holds |k|^2.
RANK1_L2 = ("the l2 similarity with a key channel past the tile width (257 channels): the "
            "kernels' per-memory-position score term holds |k|^2 there, so the rank-1 last "
            "channel is not built for l2; the torch backend reads it")


# --------------------------------------------------------------------------- configs

# Every config ends with max_local_bytes: None takes the candidate wherever it compiles and
# fits; a number takes it only where the device's own compile uses at most that many bytes of
# local memory per thread (registers spilled: the driver's count, see running.run), and falls
# through to the next candidate otherwise. It is for tables whose GPUs were not compiled for
# when the table was made (generic), where the same tiling spills little on one ISA and much
# on another.

@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiling of `memory_read_fwd_kernel`: block_m query rows per program, block_n memory
    positions per step, block_v value channels per program (None: all; fewer split the values
    over programs, each recomputing q.k). splits=None picks the number of memory splits from
    the device's multiprocessor count. stream_queries loads the query tile in every memory
    step instead of holding it in registers through the loop (where holding it spills;
    kernels/forward.py)."""
    block_m: int = 64
    block_n: int = 64
    block_v: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2
    splits: Optional[int] = None
    stream_queries: bool = False
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Tiling of `memory_read_merge_kernel` (merges the memory splits' partial reads):
    block_m query positions by block_v value channels per program."""
    block_m: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 1
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Tiling of `memory_read_bwd_kernel_prepare` (the backward's delta, aligned copies and
    zeroed dQ): block_m query positions per program, block_c channels per loop step."""
    block_m: int = 32
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 1
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class DvConfig:
    """Tiling of `memory_read_bwd_kernel_dv`: block_n memory rows per program, looping over
    the queries block_m at a time; block_v value channels per program (None: all).
    stream_keys as in DkdqConfig."""
    block_n: int = 64
    block_m: int = 64
    block_v: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 1
    stream_keys: bool = False
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class DkdqConfig:
    """Tiling of `memory_read_bwd_kernel_dkdq`: block_n memory rows per program, looping over
    the queries block_m at a time. dP is reduced over all value channels: block_cv=None holds
    the program's whole V block; a smaller block_cv streams V and dO in chunks of that many
    channels per query block (for V blocks too large for shared memory or registers).
    stream_keys loads the program's key tile in every query step instead of holding it in
    registers through the loop (where holding it spills; kernels/backward.py)."""
    block_n: int = 64
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 1
    block_cv: Optional[int] = None
    stream_keys: bool = False
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class DqConfig:
    """Tiling of `memory_read_bwd_kernel_dq` (deterministic mode only): block_m query rows per
    program, looping over its memory split block_n positions at a time; block_cv=None holds
    the whole dO tile, a smaller block_cv streams dO and V through the dP reduction in chunks.
    splits=None picks the number of memory splits from the device's multiprocessor count.
    stream_queries as in ForwardConfig."""
    block_m: int = 64
    block_n: int = 32
    block_cv: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 2
    splits: Optional[int] = None
    stream_queries: bool = False
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Tiling of `memory_read_topk_kernel`: block_m query rows per program (the memory block is
    max(64, top_k) positions: the running top-k merges with a block's own top-k).
    stream_queries as in ForwardConfig. block_ck=None computes a block's scores over the whole
    key tile; fewer channels sum them over chunks of that many, the query and key tiles loaded
    per chunk (for key tiles larger than shared memory; stream_queries then does not apply)."""
    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 2
    stream_queries: bool = False
    block_ck: Optional[int] = None
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class SelectMergeConfig:
    """Tiling of `memory_read_topk_merge_kernel` (the top-k of the selection's memory splits,
    decoded): block_m query rows per program, each merging one split's keys per step."""
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 1
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class UsageConfig:
    """Tiling of `memory_read_usage_kernel`: block_n memory rows per program, looping over the
    queries block_m at a time. stream_keys as in DkdqConfig."""
    block_n: int = 128
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 2
    stream_keys: bool = False
    max_local_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """The backward kernels' tilings together, for `use_configs` (dk and dq: deterministic
    mode; dk=None: dkdq's)."""
    dv: DvConfig = DvConfig()
    dkdq: DkdqConfig = DkdqConfig()
    dq: DqConfig = DqConfig()
    dk: Optional[DkdqConfig] = None


Config = Union[ForwardConfig, MergeConfig, PrepareConfig, DvConfig, DkdqConfig, DqConfig,
               SelectConfig, SelectMergeConfig, UsageConfig]
CONFIG_CLASSES = dict(forward=ForwardConfig, merge=MergeConfig, prepare=PrepareConfig,
                      dv=DvConfig, dkdq=DkdqConfig, dk=DkdqConfig, dq=DqConfig,
                      select=SelectConfig, select_merge=SelectMergeConfig, usage=UsageConfig)


@dataclasses.dataclass(frozen=True)
class WarpSpecializedConfig:
    """Tiling of the warp-specialised Gluon forward (stm_kernels/experimental/gluon_forward.py,
    opt-in, sm_90 only; never run on a GPU). block_m: query rows per program; block_n: memory
    positions per pipeline step; num_stages: depth of the K and V TMA rings; num_p: depth of the
    P/alpha ring between the softmax and PV warpgroups; pv_regs / load_regs: setmaxnreg targets
    of the PV and load partitions (the softmax partition gets what is left of 128 x 4
    warpgroups).

    value_chunks: programs per query block, each reading ceil(Cv / value_chunks) value
    channels (each recomputes S). split_rows: how the two PV warpgroups share a program's
    work. False (block_m = 64): each takes half of its value channels for all 64 rows. True
    (block_m = 128): each takes 64 of its rows for all of its channels, so one K/V tile serves
    128 query rows, not 64 (less L2 traffic per pair for S repeated per value chunk)."""
    block_m: int = 64
    block_n: int = 64
    num_stages: int = 2
    num_p: int = 2
    pv_regs: int = 168
    load_regs: int = 24
    value_chunks: int = 1
    split_rows: bool = False


@dataclasses.dataclass(frozen=True)
class WarpSpecializedBackwardConfig:
    """Tiling of the warp-specialised Gluon dK/dQ kernel (stm_kernels/experimental/
    gluon_backward.py, opt-in, sm_90 only; never run on a GPU). block_m: query rows per step
    (the wgmma N of S^T, dP^T and dQ^T; the Q and dO ring stages grow with it); block_n: memory
    positions per program (one wgmma M tile); num_stages: depth of the Q and dO TMA rings;
    mma_regs / load_regs: setmaxnreg targets of the second MMA warpgroup and the load warp (the
    first gets what is left of 128 x 4 per thread of a warpgroup). The default step of 32
    queries reads fewer shared-memory bytes per MAC than 16 (wgmma N = 32), which leaves room
    for 2 ring stages; 16 queries with 4 stages is the other candidate tune times."""
    block_m: int = 32
    block_n: int = 64
    num_stages: int = 2
    mma_regs: int = 240
    load_regs: int = 24


@dataclasses.dataclass(frozen=True)
class WarpSpecializedDvConfig:
    """Tiling of the warp-specialised Gluon dV kernel (stm_kernels/experimental/
    gluon_backward_dv.py, opt-in with the dK/dQ one, sm_90 only; never run on a GPU). block_m:
    query rows per step (the wgmma N of S^T, the K of dV's product); block_n: memory positions
    per program (one wgmma M tile); num_stages: depth of the Q and dO TMA rings; num_p: depth
    of the P^T ring between the P^T warpgroup and the two dV warpgroups; dv_regs / load_regs:
    setmaxnreg targets of the dV warpgroups (a 64 x 256 float32 accumulator each) and the load
    warp (the P^T warpgroup gets what is left of 128 x 4 per thread of a warpgroup). The step
    is as long as the memory block (dV is staged in a dO box), which fills the ring's 2
    stages to 192 KiB at Ck 128, Cv 512; 3 P^T slots is the other candidate tune times."""
    block_m: int = 64
    block_n: int = 64
    num_stages: int = 2
    num_p: int = 2
    dv_regs: int = 168
    load_regs: int = 24


# The experimental Gluon kernels (stm_kernels/experimental), by the name an Architecture's
# warp_specialized lists them: the forward, the backward's dV and dK/dQ kernels.
WARP_SPECIALIZED_KERNELS = ("forward", "dv", "dkdq")

# The Gluon forward's other candidate (which one is faster only a GPU run can tell).
ROW_SPLIT_CONFIG = WarpSpecializedConfig(block_m=128, num_stages=3, value_chunks=2,
                                         split_rows=True)


# --------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture's tilings and input precisions.

    fp32_fast: the `input_precision` of tl.dot for float32 under matmul precision "high" or
    "medium" (every other read takes "ieee": input_precision). shared_memory: the per-block
    limit the tilings are sized for (the device's own limit decides at launch). options:
    compile options of every launch there (AMD: the MFMA instruction size).
    warp_specialized: the Gluon kernels (WARP_SPECIALIZED_KERNELS) the architecture runs by
    default, where they take the inputs, once a GPU run has shown them right and faster: a set
    of names, or {name: the fewest memory positions N from which it runs} where a kernel is
    faster only on larger memories (the Gluon forward costs more per program and less per
    memory block than the plain one); the others are opt-in (STM_KERNELS_WARP_SPECIALIZED=1 /
    _BACKWARD=1; =0 turns the defaults off)."""
    name: str
    devices: str
    vendor: str
    shared_memory: int
    fp32_fast: str
    tilings: dict
    options: dict = dataclasses.field(default_factory=dict)
    warp_specialized: Union[frozenset, Mapping[str, int]] = frozenset()

    def __post_init__(self):
        unknown = set(self.warp_specialized) - set(WARP_SPECIALIZED_KERNELS)
        if unknown:  # a misspelt name would leave its kernel opt-in without a word
            raise ValueError(f"{self.name}: warp_specialized names no Gluon kernel: "
                             f"{sorted(unknown)} (the kernels: {WARP_SPECIALIZED_KERNELS})")
        fewest = dict(self.warp_specialized) if isinstance(self.warp_specialized, Mapping) \
            else dict.fromkeys(self.warp_specialized, 1)
        wrong = {name: n for name, n in fewest.items()
                 if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if wrong:
            raise ValueError(f"{self.name}: warp_specialized's memory sizes must be positive "
                             f"integers; got {wrong}")
        object.__setattr__(self, "warp_specialized", types.MappingProxyType(fewest))

    def runs_warp_specialized(self, kernel, N):
        """Whether the Gluon `kernel` runs by default on a memory of N positions."""
        return N >= self.warp_specialized.get(kernel, N + 1)

    def candidates(self, kernel, precision, width):
        """The candidate configs of a kernel for a precision class and key width, in order
        (the most specific table key wins: (kernel, precision, width) for each of
        key_widths(width), then with None for the width, then for both)."""
        for name in (kernel, TWINS.get(kernel)):
            keys = [(name, precision, key_width) for key_width in key_widths(width)]
            for key in keys + [(name, precision, None), (name, None, None)]:
                if key in self.tilings:
                    return self.tilings[key]
        raise KeyError(f"{self.name} has no tiling for {kernel} / {precision} / {width}")

    def input_precision(self, dtype):
        """tl.dot's input_precision for operands of `dtype` under torch's current float32
        matmul precision: fp32_fast for float32 under "high"/"medium", else "ieee" (16-bit
        operands: the tensor cores, where AMD refuses "tf32"; exact float32: AMD's float32
        matrix cores, FMA on NVIDIA's CUDA cores)."""
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return self.fp32_fast
        return "ieee"


def precision_class(dtype):
    """"16-bit", "tf32" or "fp32" (exact) for operands of `dtype` under torch's current float32
    matmul precision."""
    if dtype != torch.float32:
        return "16-bit"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def width_class(block_ck):
    """The key-width class of a power-of-two key tile, or None when no tiling takes it."""
    return next((width for width in WIDTHS if block_ck <= width), None)


def key_widths(width):
    """The table key widths a read of key width `width` looks up, most specific first: a
    rank-1 width (257) its own, then its tiles' (256)."""
    return (width, width - 1) if width - 1 in RANK1_WIDTHS else (width,)


def stated_key(table, name, first, precision, width):
    """The key (name, first, precision, w) of `table` (EXCEPTIONS, ON_TORCH) for the most
    specific w of key_widths(width) that has one, or None."""
    if width is None:
        return (name, first, precision, width) if (name, first, precision, width) in table \
            else None
    return next(((name, first, precision, key_width) for key_width in key_widths(width)
                 if (name, first, precision, key_width) in table), None)


def splits_last_channel(channels):
    """Whether a read of `channels` key channels runs its last channel as a rank-1 score term
    beside a tile of the others (one past a width of RANK1_WIDTHS)."""
    return channels - 1 in RANK1_WIDTHS


# Shorthands for the tables below (positional fields in each class's order).
F, M, P, V, K, Q, S, SM, U = (ForwardConfig, MergeConfig, PrepareConfig, DvConfig,
                              DkdqConfig, DqConfig, SelectConfig, SelectMergeConfig, UsageConfig)

_INTERPRETER = Architecture(
    "interpreter", "Triton's CPU interpreter (tests)", "interpreter", 1 << 30,
    fp32_fast="ieee",
    # One Python step per tile operation: the largest tiles are the fastest there.
    tilings={("forward", None, None): (F(32, 32, None, 4, 1),),
             ("merge", None, None): (M(64, 64, 4, 1),),
             ("prepare", None, None): (P(64, 64, 4, 1),),
             ("dv", None, None): (V(32, 32, None, 4, 1),),
             ("dkdq", None, None): (K(32, 32, 4, 1, None),),
             ("dq", None, None): (Q(32, 32, None, 4, 1),),
             ("select", None, None): (S(16, 4, 1),),
             ("select_merge", None, None): (SM(64, 4, 1),),
             ("usage", None, None): (U(32, 32, 4, 1),)})

# Input precisions: 16-bit operands take "ieee" everywhere (NVIDIA ignores it for them; AMD
# refuses "tf32" on gfx90a and gfx950). Exact float32 ("highest") is "ieee" everywhere: AMD's
# float32 matrix cores, FMA on NVIDIA's CUDA cores (no NVIDIA tensor core takes exact float32;
# "tf32x3" keeps both halves of every operand in registers and spills). TF32 for "high":
# NVIDIA and gfx942 have it; gfx950 has the more accurate "bf16x3" at bf16 rate; gfx90a has
# neither faster than "ieee".
# AMD: 16 x 16 MFMA instructions (as fast as 32 x 32 ones): with the 32-row ones, four
# wavefronts over a 64-row tile, or eight over 128, compute the same scores twice.
AMD_OPTIONS = {"matrix_instr_nonkdim": 16}

# The kernels without a product (the split merges, the backward's prepare kernel): the same
# tiling on every GPU (each table's search derived it), so one entry the tables share.
_NO_DOT_KERNELS = {
    ("merge", None, None): (M(64, 64, 4, 1),),
    ("prepare", None, None): (P(32, 64, 4, 1),),
    ("select_merge", None, None): (SM(16, 4, 1),),
}

# The tables below were derived by `python -m tools.kernel_report.search --arch NAME`
# (Triton 3.8, offline compiles; the first candidate of each entry is the one that met
# the targets, or the nearest when none did: EXCEPTIONS says why).

# Exact float32 on NVIDIA (FMA dots): an FMA dot gives each thread the whole inner dimension of
# the operands its outputs need, so every loop-invariant tile is streamed (loaded in each step)
# and score tiles stay small; a dV program takes every value channel (a value chunk would
# recompute the scores per chunk). Shared by the tables below where the same tiling compiles
# clean: sm_80's, sm_90's (sm_100 too), the 99 KiB ones (sm_120, generic; sm_86 but for its
# selection).
_FP32_FMA_SM_80 = {
    ("forward", "fp32", 128): (F(64, 16, 256, 8, 2, stream_queries=True),
                               F(16, 32, 256, 8, 1, stream_queries=True),),
    ("forward", "fp32", 256): (F(16, 32, 256, 8, 2, stream_queries=True),
                               F(16, 32, 256, 8, 1, stream_queries=True),),
    ("dv", "fp32", None): (V(32, 16, None, 8, 1, stream_keys=True),
                           V(16, 16, None, 4, 1, stream_keys=True),),
    ("dkdq", "fp32", 128): (K(64, 16, 8, 1, 32, stream_keys=True),
                            K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dkdq", "fp32", 256): (K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dk", "fp32", None): (K(64, 16, 8, 1, 32, stream_keys=True),
                           K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dq", "fp32", 128): (Q(32, 16, 32, 4, 1, stream_queries=True),
                          Q(16, 16, 16, 4, 1, stream_queries=True),),
    ("dq", "fp32", 256): (Q(16, 16, 16, 4, 1, stream_queries=True),),
    ("select", "fp32", 128): (S(32, 8, 1, stream_queries=True),
                              S(16, 8, 2, stream_queries=True),),
    ("select", "fp32", 256): (S(16, 8, 2, stream_queries=True),
                              S(16, 8, 1, stream_queries=True),),
    ("usage", "fp32", None): (U(16, 16, 4, 1, stream_keys=True),),
}
_FP32_FMA_SM_90 = {
    **_FP32_FMA_SM_80,
    ("forward", "fp32", 128): (F(16, 64, 256, 8, 1, stream_queries=True),
                               F(16, 32, 256, 8, 2, stream_queries=True),),
    ("dkdq", "fp32", 128): (K(64, 16, 8, 1, 16, stream_keys=True),
                            K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dq", "fp32", 128): (Q(64, 32, 32, 8, 2, stream_queries=True),
                          Q(32, 16, 32, 4, 1, stream_queries=True),),
    ("select", "fp32", 128): (S(16, 8, 2, stream_queries=True),),
    ("select", "fp32", 256): (S(32, 8, 1, stream_queries=True),
                              S(16, 8, 2, stream_queries=True),),
}
_FP32_FMA_99_KIB = {
    **_FP32_FMA_SM_80,
    ("forward", "fp32", 128): (F(16, 16, 256, 4, 2, stream_queries=True),
                               F(16, 16, 256, 4, 1, stream_queries=True),),
    ("forward", "fp32", 256): (F(16, 32, 256, 8, 1, stream_queries=True),
                               F(16, 16, 256, 4, 2, stream_queries=True),),
    ("forward", "fp32", 257): (F(16, 16, 256, 4, 2, stream_queries=True),
                               F(16, 16, 256, 4, 1, stream_queries=True),),
    ("dkdq", "fp32", 128): (K(64, 16, 8, 1, 16, stream_keys=True),
                            K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dkdq", "fp32", 256): (K(16, 16, 8, 1, 16, stream_keys=True),),
    ("dk", "fp32", None): (K(16, 16, 4, 1, 16, stream_keys=True),),
    ("dq", "fp32", 128): (Q(16, 16, 16, 4, 1, stream_queries=True),),
}
_FP32_FMA_SM_86 = {
    **_FP32_FMA_99_KIB,
    ("select", "fp32", 128): (S(16, 8, 2, stream_queries=True),),
    ("select", "fp32", 256): (S(16, 8, 1, stream_queries=True),),
}

_SM_80 = Architecture(
    "sm_80", "A100, A30", "nvidia", 163 * KIB,
    fp32_fast="tf32",
    tilings={
        **_NO_DOT_KERNELS,
        **_FP32_FMA_SM_80,
        ("forward", "16-bit", 128): (F(32, 32, 256, 4, 3), F(32, 32, 256, 4, 2),),
        ("forward", "16-bit", 256): (F(16, 64, 256, 8, 2), F(16, 64, 256, 8, 1),),
        ("forward", "tf32", 128): (F(16, 64, 256, 8, 2), F(16, 64, 256, 8, 1),),
        ("forward", "tf32", 256): (F(16, 64, 256, 8, 2, stream_queries=True),
                                   F(16, 32, 128, 4, 2, stream_queries=True),),
        ("dv", "16-bit", None): (V(128, 32, 128, 8, 2), V(64, 32, 128, 4, 2),),
        ("dv", "16-bit", 257): (V(128, 32, 128, 8, 2, stream_keys=True),
                                V(128, 16, 128, 8, 2, stream_keys=True),),
        ("dv", "tf32", 128): (V(128, 16, 128, 8, 2), V(128, 16, 128, 8, 1),),
        ("dv", "tf32", 256): (V(128, 16, 128, 8, 2, stream_keys=True), V(128, 16, 128, 8, 1),),
        ("dv", "tf32", 257): (V(128, 16, 128, 8, 1, stream_keys=True), V(64, 32, 128, 4, 2),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, 32), K(64, 16, 4, 2, 128),),
        ("dkdq", "tf32", 128): (K(128, 16, 8, 1, 64, stream_keys=True),
                                K(64, 16, 4, 1, 32, stream_keys=True),),
        ("dk", "16-bit", 128): (K(128, 16, 8, 2, 32), K(64, 16, 4, 2, 128),),
        ("dk", "16-bit", 256): (K(16, 16, 2, 1, 16),),
        ("dk", "tf32", None): (K(16, 16, 2, 1, 16, stream_keys=True),),
        ("dq", "16-bit", 128): (Q(128, 32, 64, 8, 3), Q(128, 32, 64, 8, 2),),
        ("dq", "16-bit", 256): (Q(16, 16, 16, 2, 1),),
        ("dq", "tf32", 128): (Q(16, 16, 16, 2, 1),),
        ("dq", "tf32", 256): (Q(16, 32, 32, 4, 1, stream_queries=True), Q(16, 16, 16, 4, 1),),
        ("select", "16-bit", None): (S(16, 2, 1),),
        ("select", "16-bit", 256): (S(16, 4, 1, stream_queries=True), S(16, 2, 1),),
        ("select", "tf32", None): (S(16, 4, 1),),
        ("select", "tf32", 256): (S(16, 8, 2, stream_queries=True),
                                  S(16, 8, 1, stream_queries=True),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 256): (U(128, 32, 8, 2), U(64, 64, 4, 2),),
    })

_SM_86 = Architecture(
    "sm_86", "RTX 30, RTX 40, A10, A40, L4, L40S (sm_86, sm_89)", "nvidia", 99 * KIB,
    fp32_fast="tf32",
    tilings={
        **_NO_DOT_KERNELS,
        **_FP32_FMA_SM_86,
        ("forward", "16-bit", 128): (F(32, 32, 256, 4, 3), F(32, 32, 256, 4, 2),),
        ("forward", "16-bit", 256): (F(16, 64, 256, 8, 2), F(16, 64, 256, 8, 1),),
        ("forward", "tf32", 128): (F(16, 64, 256, 8, 1), F(16, 32, 256, 8, 2),),
        ("forward", "tf32", 256): (F(16, 64, 256, 8, 1, stream_queries=True),
                                   F(16, 32, 256, 4, 1, stream_queries=True),),
        ("dv", "16-bit", None): (V(128, 32, 128, 8, 2), V(64, 32, 128, 4, 2),),
        ("dv", "tf32", 128): (V(128, 16, 128, 8, 2), V(128, 16, 128, 8, 1),),
        ("dv", "tf32", 256): (V(32, 32, 128, 4, 1, stream_keys=True), V(32, 16, 128, 4, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, 32, stream_keys=True),
                                  K(64, 16, 4, 2, 32, stream_keys=True),),
        ("dkdq", "tf32", 128): (K(128, 16, 8, 1, 16, stream_keys=True),
                                K(64, 16, 4, 1, 32, stream_keys=True),),
        ("dk", "16-bit", 128): (K(128, 16, 8, 2, 64), K(128, 16, 8, 2, 32),),
        ("dk", "16-bit", 256): (K(16, 16, 2, 1, 16),),
        ("dk", "tf32", 128): (K(16, 16, 2, 1, 16),),
        ("dk", "tf32", 256): (K(16, 16, 2, 1, 16, stream_keys=True),),
        ("dq", "16-bit", 128): (Q(128, 32, 64, 8, 3), Q(128, 32, 64, 8, 2),),
        ("dq", "16-bit", 256): (Q(16, 16, 16, 2, 1),),
        ("dq", "tf32", 128): (Q(32, 32, 32, 4, 1), Q(32, 32, 16, 2, 1),),
        ("dq", "tf32", 256): (Q(32, 32, 32, 4, 1, stream_queries=True), Q(32, 32, 16, 2, 1),),
        ("select", "16-bit", 128): (S(32, 4, 1), S(16, 4, 1),),
        ("select", "16-bit", 256): (S(16, 4, 1),),
        ("select", "tf32", None): (S(16, 4, 1),),
        ("select", "tf32", 256): (S(16, 8, 2, stream_queries=True),
                                  S(16, 8, 1, stream_queries=True),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 128): (U(128, 32, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(64, 32, 4, 1),),
    })

_SM_90 = Architecture(
    "sm_90", "H100, H200, GH200", "nvidia", 227 * KIB,
    fp32_fast="tf32",
    # none of the Gluon kernels by default until a GPU run shows one faster (bench kernel's
    # candidates triton_ws and triton_ws_bwd, tools.gpu_session.tune); one faster only on
    # larger memories goes in as {name: the fewest memory positions N it runs from}
    warp_specialized=frozenset(),
    tilings={
        **_NO_DOT_KERNELS,
        **_FP32_FMA_SM_90,
        ("forward", "16-bit", 128): (F(128, 64, 256, 8, 3), F(128, 64, 256, 8, 2),),
        ("forward", "16-bit", 256): (F(128, 32, 256, 8, 3), F(128, 32, 256, 8, 2),),
        ("forward", "tf32", 128): (F(128, 32, 256, 8, 3), F(128, 32, 256, 8, 2),),
        ("forward", "tf32", 256): (F(64, 32, 128, 4, 1), F(32, 32, 128, 4, 1),),
        ("dv", "16-bit", None): (V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1),),
        ("dv", "tf32", 128): (V(128, 32, 128, 8, 2), V(128, 16, 128, 8, 2),),
        ("dv", "tf32", 256): (V(128, 16, 128, 8, 2), V(128, 16, 128, 8, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, None), K(128, 16, 8, 1, None),),
        ("dkdq", "16-bit", 256): (K(128, 16, 8, 2, 64), K(128, 16, 8, 1, 64),),
        ("dkdq", "16-bit", 257): (K(128, 16, 8, 1, 64), K(128, 16, 8, 1, 32),),
        ("dkdq", "tf32", 128): (K(128, 16, 8, 1, 64), K(128, 16, 8, 1, 32),),
        # the fallback skips K(64, 16, w4, ...): MISCOMPILED
        ("dk", "tf32", 256): (K(128, 16, 8, 1, 16), K(64, 32, 4, 1, 32),),
        ("dq", "16-bit", 128): (Q(128, 64, 64, 8, 2), Q(128, 32, 64, 8, 3),),
        ("dq", "16-bit", 256): (Q(128, 32, 32, 8, 2), Q(64, 64, 64, 4, 2),),
        ("dq", "16-bit", 257): (Q(64, 16, 32, 4, 1), Q(64, 16, 16, 4, 1),),
        ("dq", "tf32", 128): (Q(128, 32, 32, 8, 2), Q(64, 32, 32, 4, 2),),
        ("dq", "tf32", 256): (Q(64, 16, 32, 4, 1), Q(32, 32, 32, 4, 1),),
        ("select", "16-bit", None): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "tf32", None): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "tf32", 257): (S(16, 8, 2, stream_queries=True),
                                  S(16, 8, 1, stream_queries=True),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 256): (U(128, 32, 8, 2), U(64, 32, 4, 2),),
    })

_SM_100 = Architecture(
    "sm_100", "B200, GB200", "nvidia", 227 * KIB,
    fp32_fast="tf32",
    tilings={
        **_NO_DOT_KERNELS,
        **_FP32_FMA_SM_90,
        ("forward", "16-bit", None): (F(64, 64, 256, 8, 3), F(64, 64, 256, 8, 2),),
        ("forward", "tf32", 128): (F(64, 32, 256, 8, 3), F(64, 32, 256, 8, 2),),
        ("forward", "tf32", 256): (F(64, 16, 256, 8, 2), F(64, 16, 256, 4, 2),),
        ("dv", "16-bit", None): (V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1),),
        ("dv", "tf32", 128): (V(128, 32, 128, 8, 2), V(128, 16, 128, 8, 2),),
        ("dv", "tf32", 256): (V(128, 16, 128, 8, 2), V(128, 16, 128, 8, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, None), K(128, 16, 8, 1, None),),
        ("dkdq", "16-bit", 256): (K(64, 16, 4, 1, 64), K(64, 16, 4, 1, 32),),
        ("dkdq", "tf32", 128): (K(128, 16, 8, 1, 64), K(128, 16, 8, 1, 32),),
        ("dk", "tf32", 256): (K(64, 16, 8, 1, 32),),
        ("dq", "16-bit", 128): (Q(128, 64, 64, 8, 2), Q(128, 32, 64, 8, 3),),
        ("dq", "16-bit", 256): (Q(128, 32, 32, 8, 2), Q(64, 64, 64, 4, 2),),
        ("dq", "tf32", 128): (Q(128, 32, 32, 8, 2), Q(64, 32, 32, 4, 2),),
        ("dq", "tf32", 256): (Q(64, 16, 32, 4, 1), Q(32, 32, 32, 4, 1),),
        ("select", "16-bit", None): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "16-bit", 257): (S(16, 4, 1),),
        ("select", "tf32", None): (S(16, 4, 1),),
        ("select", "tf32", 256): (S(16, 8, 1, stream_queries=True),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 256): (U(128, 32, 8, 2), U(64, 32, 4, 2),),
    })

_SM_120 = Architecture(
    "sm_120", "RTX 50, DGX Spark", "nvidia", 99 * KIB,
    fp32_fast="tf32",
    tilings={
        **_NO_DOT_KERNELS,
        **_FP32_FMA_99_KIB,
        ("forward", "16-bit", 128): (F(32, 32, 256, 4, 3), F(32, 32, 256, 4, 2),),
        ("forward", "16-bit", 256): (F(16, 64, 256, 8, 2), F(16, 64, 256, 8, 1),),
        ("forward", "tf32", 128): (F(16, 64, 256, 8, 1), F(16, 32, 256, 8, 2),),
        ("forward", "tf32", 256): (F(16, 64, 256, 8, 1, stream_queries=True),
                                   F(16, 32, 256, 4, 1, stream_queries=True),),
        ("dv", "16-bit", None): (V(128, 32, 128, 8, 2), V(64, 32, 128, 4, 2),),
        ("dv", "16-bit", 257): (V(128, 16, 128, 8, 2, stream_keys=True),),
        ("dv", "tf32", 128): (V(128, 16, 128, 8, 2, stream_keys=True), V(128, 16, 128, 8, 2),),
        ("dv", "tf32", 256): (V(32, 32, 128, 4, 1, stream_keys=True), V(32, 16, 128, 4, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 1, 64), K(128, 16, 8, 2, 32),),
        ("dkdq", "tf32", 128): (K(128, 16, 8, 3, 16, stream_keys=True),
                                K(128, 16, 8, 2, 32, stream_keys=True),),
        ("dk", "16-bit", 128): (K(128, 16, 8, 1, 64, stream_keys=True),
                                K(128, 16, 8, 2, 32, stream_keys=True),),
        ("dk", "16-bit", 256): (K(16, 16, 2, 1, 16, stream_keys=True),),
        ("dk", "tf32", None): (K(16, 16, 2, 1, 16, stream_keys=True),),
        ("dq", "16-bit", 128): (Q(128, 32, 64, 8, 3), Q(128, 32, 64, 8, 2),),
        ("dq", "16-bit", 256): (Q(16, 16, 16, 2, 1),),
        ("dq", "tf32", 128): (Q(32, 32, 16, 4, 1), Q(32, 32, 16, 2, 1),),
        ("dq", "tf32", 256): (Q(32, 32, 16, 4, 1, stream_queries=True), Q(32, 32, 16, 2, 1),),
        ("dq", "tf32", 257): (Q(16, 32, 32, 4, 1, stream_queries=True), Q(16, 16, 16, 4, 1),),
        ("select", "16-bit", 128): (S(32, 4, 2), S(32, 4, 1),),
        ("select", "16-bit", 256): (S(16, 4, 1),),
        ("select", "tf32", None): (S(16, 4, 1),),
        ("select", "tf32", 256): (S(16, 8, 2, stream_queries=True),
                                  S(16, 8, 1, stream_queries=True),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(64, 32, 4, 1),),
        ("usage", "tf32", 257): (U(64, 32, 4, 1), U(32, 32, 4, 1),),
    })

# Unknown newer NVIDIA GPUs, sized for 99 KiB and compiled as sm_80 and as sm_120: sm_80's
# tilings but for those that need less shared memory here (TF32's forwards and 256-wide dV,
# 256-wide usage) or spill less on sm_120 (streamed keys in dV and the 256-wide dK, the 16-bit
# dK's value chunks of 16), the 256-wide selection, and TF32's fused dK+dQ: sm_80's tiling,
# then sm_120's, each only where the device's compile keeps within _TF32_DKDQ_LOCAL_BYTES of
# local memory (each spills little on its own ISA and more on the other); where neither does,
# dK and dQ run apart (backward_launcher.triton_backward).
# Below the 64 B of spill stores a stated exception may have (stores can exceed the local
# memory they fill: a 64 B frame here held 96 B of them, and the runtime sees only the memory),
# and at what sm_120's tiling uses as sm_120 with the l2 similarity (40 B, with dS scaled for
# the dQ atomics in the kernel).
_TF32_DKDQ_LOCAL_BYTES = 40
_GENERIC = Architecture(
    "generic", "NVIDIA GPUs newer than these tables (sm_110, ...)", "nvidia", 99 * KIB,
    fp32_fast="tf32",
    tilings={
        **_SM_80.tilings,
        **_FP32_FMA_99_KIB,
        ("forward", "tf32", 128): (F(16, 64, 256, 8, 1, stream_queries=True),
                                   F(16, 64, 128, 8, 1),),
        ("forward", "tf32", 256): (F(16, 32, 128, 4, 2, stream_queries=True),),
        ("dv", "16-bit", 257): (V(128, 16, 128, 8, 2, stream_keys=True),),
        ("dv", "tf32", 128): (V(128, 16, 128, 8, 2, stream_keys=True), V(128, 16, 128, 8, 1),),
        ("dv", "tf32", 256): (V(32, 32, 128, 4, 1, stream_keys=True), V(32, 16, 128, 4, 1),),
        ("dv", "tf32", 257): (V(16, 16, 128, 2, 1, stream_keys=True),
                              V(32, 16, 128, 4, 1, stream_keys=True),),
        ("dkdq", "tf32", 128): (
            K(128, 16, 8, 1, 64, stream_keys=True, max_local_bytes=_TF32_DKDQ_LOCAL_BYTES),
            K(128, 16, 8, 3, 16, stream_keys=True, max_local_bytes=_TF32_DKDQ_LOCAL_BYTES),),
        ("dk", "16-bit", 128): (K(128, 16, 8, 2, 16),),
        ("dk", "16-bit", 256): (K(16, 16, 2, 1, 16, stream_keys=True),),
        ("select", "16-bit", 256): (S(16, 4, 1),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(64, 32, 4, 1),),
        ("usage", "tf32", 257): (U(64, 32, 4, 1), U(32, 32, 4, 1),),
    })

_GFX90A = Architecture(
    "gfx90a", "MI210, MI250X", "amd", 64 * KIB, fp32_fast="ieee",
    options=AMD_OPTIONS,
    tilings={
        **_NO_DOT_KERNELS,
        ("forward", "16-bit", 128): (F(128, 32, 256, 8, 2), F(64, 64, 256, 8, 1),),
        ("forward", "16-bit", 256): (F(64, 32, 256, 4, 2), F(64, 32, 256, 4, 1),),
        ("forward", "tf32", 128): (F(64, 16, 256, 4, 2), F(32, 32, 256, 4, 1),),
        ("forward", "tf32", 256): (F(32, 32, 256, 2, 1),),
        ("forward", "fp32", 128): (F(64, 16, 256, 4, 2), F(32, 32, 256, 4, 1),),
        ("forward", "fp32", 256): (F(32, 32, 256, 2, 1),),
        ("dv", "16-bit", 128): (V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1),),
        ("dv", "16-bit", 256): (V(64, 32, 256, 4, 2), V(64, 16, 256, 4, 2),),
        ("dv", "tf32", 128): (V(64, 16, 128, 4, 2), V(64, 16, 128, 8, 1),),
        ("dv", "tf32", 256): (V(32, 16, 128, 2, 1), V(16, 16, 128, 4, 1),),
        ("dv", "fp32", 128): (V(64, 16, 128, 4, 2), V(64, 16, 128, 8, 1),),
        ("dv", "fp32", 256): (V(32, 16, 128, 2, 1), V(16, 16, 128, 4, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, 32), K(64, 16, 4, 2, 128),),
        ("dkdq", "16-bit", 256): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 64),),
        ("dkdq", "tf32", 128): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dkdq", "fp32", 128): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dk", "tf32", 256): (K(32, 16, 2, 1, 32), K(16, 16, 4, 1, 16),),
        ("dk", "fp32", 256): (K(32, 16, 2, 1, 32), K(16, 16, 4, 1, 16),),
        ("dq", "16-bit", None): (Q(64, 32, 32, 4, 1), Q(64, 16, 32, 4, 1),),
        ("dq", "tf32", 128): (Q(64, 32, 32, 4, 1), Q(64, 16, 32, 4, 1),),
        ("dq", "tf32", 256): (Q(32, 16, 16, 2, 1), Q(16, 16, 16, 4, 1),),
        ("dq", "fp32", 128): (Q(64, 32, 32, 4, 1), Q(64, 16, 32, 4, 1),),
        ("dq", "fp32", 256): (Q(32, 16, 16, 2, 1), Q(16, 16, 16, 4, 1),),
        ("select", "16-bit", 128): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "16-bit", 256): (S(64, 4, 1), S(32, 4, 2),),
        ("select", "tf32", 128): (S(64, 4, 1), S(32, 4, 2),),
        ("select", "fp32", 128): (S(64, 4, 1), S(32, 4, 2),),
        ("select", "tf32", 256): (S(64, 4, 1, block_ck=64),),
        ("select", "fp32", 256): (S(64, 4, 1, block_ck=64),),
        ("usage", "16-bit", 128): (U(128, 64, 8, 2), U(64, 64, 4, 2),),
        ("usage", "16-bit", 256): (U(128, 32, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(32, 32, 4, 1),),
        ("usage", "fp32", 128): (U(128, 64, 8, 2), U(64, 64, 4, 2),),
        ("usage", "fp32", 256): (U(64, 32, 4, 2), U(32, 32, 4, 1),),
    })

_GFX942 = Architecture(
    "gfx942", "MI300X, MI325X", "amd", 64 * KIB, fp32_fast="tf32",
    options=AMD_OPTIONS,
    tilings={
        **_NO_DOT_KERNELS,
        ("forward", "16-bit", 128): (F(128, 32, 256, 8, 2), F(64, 64, 256, 8, 1),),
        ("forward", "16-bit", 256): (F(64, 32, 256, 4, 2), F(64, 32, 256, 4, 1),),
        ("forward", "tf32", 128): (F(64, 16, 256, 4, 2), F(64, 32, 256, 4, 1),),
        ("forward", "tf32", 256): (F(64, 32, 256, 4, 1), F(32, 32, 256, 4, 1),),
        ("forward", "fp32", 128): (F(64, 16, 256, 4, 2), F(64, 32, 256, 4, 1),),
        ("forward", "fp32", 256): (F(64, 32, 256, 4, 1), F(32, 32, 256, 4, 1),),
        ("dv", "16-bit", 128): (V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1),),
        ("dv", "16-bit", 256): (V(64, 32, 256, 4, 2), V(64, 16, 256, 4, 2),),
        ("dv", "tf32", 128): (V(128, 16, 128, 8, 1), V(64, 16, 128, 4, 2),),
        ("dv", "tf32", 256): (V(64, 16, 128, 4, 1), V(32, 32, 128, 4, 1),),
        ("dv", "fp32", 128): (V(128, 16, 128, 8, 1), V(64, 16, 128, 4, 2),),
        ("dv", "fp32", 256): (V(64, 16, 128, 4, 1), V(32, 32, 128, 4, 1),),
        ("dkdq", "16-bit", 128): (K(128, 16, 8, 2, 32), K(64, 16, 4, 2, 128),),
        ("dkdq", "16-bit", 256): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 64),),
        ("dkdq", "tf32", 128): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dkdq", "fp32", 128): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dk", "tf32", 256): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dk", "fp32", 256): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dq", "16-bit", None): (Q(64, 32, 32, 4, 1), Q(32, 32, 32, 4, 1),),
        ("dq", "tf32", None): (Q(64, 16, 16, 4, 1), Q(32, 32, 32, 4, 1),),
        ("dq", "fp32", None): (Q(64, 16, 16, 4, 1), Q(32, 32, 32, 4, 1),),
        ("select", "16-bit", 128): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "16-bit", 256): (S(64, 4, 1),),
        ("select", "tf32", 128): (S(64, 4, 1),),
        ("select", "tf32", 256): (S(32, 4, 1),),
        ("select", "fp32", 128): (S(64, 4, 1),),
        ("select", "fp32", 256): (S(32, 4, 1),),
        ("usage", "16-bit", None): (U(128, 64, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 128): (U(128, 32, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(32, 32, 4, 1),),
        ("usage", "fp32", 128): (U(128, 32, 8, 2), U(64, 64, 4, 2),),
        ("usage", "fp32", 256): (U(64, 32, 4, 2), U(32, 32, 4, 1),),
    })

_GFX950 = Architecture(
    "gfx950", "MI350X, MI355X", "amd", 160 * KIB, fp32_fast="bf16x3",
    options=AMD_OPTIONS,
    tilings={
        **_NO_DOT_KERNELS,
        ("forward", "16-bit", 128): (F(128, 32, 256, 8, 3), F(128, 32, 256, 8, 2),),
        ("forward", "16-bit", 256): (F(128, 32, 256, 8, 2), F(64, 64, 256, 8, 1),),
        ("forward", "tf32", 128): (F(64, 32, 256, 4, 2, stream_queries=True),
                                   F(32, 16, 256, 4, 1),),
        ("forward", "tf32", 256): (F(64, 32, 256, 4, 2, stream_queries=True),
                                   F(32, 32, 256, 4, 2),),
        ("forward", "fp32", None): (F(64, 32, 256, 4, 1), F(32, 32, 256, 4, 1),),
        ("dv", "16-bit", 128): (V(128, 32, 256, 8, 2), V(128, 32, 256, 8, 1),),
        ("dv", "16-bit", 256): (V(128, 16, 256, 8, 2), V(64, 16, 256, 4, 2),),
        ("dv", "tf32", 128): (V(128, 32, 128, 8, 2), V(64, 32, 128, 4, 2),),
        ("dv", "tf32", 256): (V(64, 16, 128, 4, 2), V(64, 32, 128, 4, 2),),
        ("dv", "fp32", 128): (V(128, 32, 128, 8, 2), V(128, 16, 128, 8, 2),),
        ("dv", "fp32", 256): (V(64, 16, 128, 4, 2), V(64, 16, 128, 8, 1),),
        ("dkdq", "16-bit", None): (K(64, 16, 4, 2, None), K(64, 16, 4, 2, 128),),
        ("dkdq", "tf32", 128): (K(64, 16, 4, 1, 64), K(64, 16, 4, 1, 32),),
        ("dkdq", "fp32", 128): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dk", "tf32", 256): (K(64, 16, 4, 2, 64), K(32, 16, 4, 1, 32),),
        ("dk", "fp32", 256): (K(64, 16, 4, 1, 32), K(32, 16, 4, 1, 32),),
        ("dq", "16-bit", None): (Q(64, 16, 16, 4, 1), Q(32, 32, 32, 4, 1),),
        ("dq", "tf32", 128): (Q(64, 32, 32, 4, 2), Q(32, 32, 32, 4, 1),),
        ("dq", "tf32", 256): (Q(64, 16, 32, 4, 1), Q(32, 32, 32, 4, 1),),
        ("dq", "fp32", 128): (Q(64, 32, 32, 4, 1), Q(64, 16, 32, 4, 1),),
        ("dq", "fp32", 256): (Q(64, 16, 16, 4, 1), Q(32, 32, 32, 4, 1),),
        ("select", "16-bit", None): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "tf32", 128): (S(64, 4, 2), S(32, 4, 2),),
        ("select", "tf32", 256): (S(32, 4, 1), S(16, 4, 1),),
        ("select", "tf32", 257): (S(16, 4, 1),),
        ("select", "fp32", 128): (S(64, 4, 2), S(64, 4, 1),),
        ("select", "fp32", 256): (S(32, 4, 1), S(16, 4, 1),),
        ("usage", "16-bit", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "16-bit", 256): (U(128, 32, 8, 2), U(64, 32, 4, 2),),
        ("usage", "tf32", 128): (U(128, 64, 8, 2), U(64, 64, 4, 2),),
        ("usage", "tf32", 256): (U(64, 32, 4, 2), U(32, 16, 4, 1),),
        ("usage", "fp32", 128): (U(128, 64, 8, 2), U(128, 32, 8, 2),),
        ("usage", "fp32", 256): (U(64, 32, 4, 1), U(32, 32, 4, 1),),
    })

ARCHITECTURES = {arch.name: arch for arch in (
    _INTERPRETER, _SM_80, _SM_86, _SM_90, _SM_100, _SM_120, _GENERIC, _GFX90A, _GFX942, _GFX950)}
# Why an entry's first tiling misses a target of the static report (a spill, a dot computed by
# several warps, the work ratio), keyed (architecture, kernel, precision class, key width);
# (None, None, None, width) for keys wider than any tiling; a 256-wide entry also explains
# the 257-wide (rank-1) rows of its kernel (key_widths). Each reason is a fact of the
# compiles; docs/kernel_report.md lists each with the rows it explains and their figures.
_TF32_DKDQ_MMA_SYNC = (
    "TF32 operands are 32-bit, twice the registers of a 16-bit tile, and mma.sync takes them "
    "from registers: the fused dK+dQ kernel streams its key tile (loaded in every query step, "
    "not held) and still spills a few bytes at the best tiling tried (sm_80: 4 B with the "
    "dot, 12 B with l2; sm_120: 28 B and 44 B); dK and dQ apart (SEPARATE_DQ) do not spill but "
    "execute 1.49x the useful multiply-adds forward + backward, against 1.2x fused")
_TF32_GENERIC = (
    "unknown NVIDIA GPUs in TF32, compiled as sm_80 and as sm_120 with 99 KiB: no fused dK+dQ "
    "tiling tried compiles without a spill on both (72-100 B in the worse of the two at every "
    "one), so the table tries sm_80's, then sm_120's, each only where the device's compile "
    "uses at most 40 B of local memory per thread: as sm_80 sm_80's is taken (4 B of spill "
    "stores with the dot, 12 B with l2), as sm_120 it uses 64-96 B and sm_120's is taken "
    "(28 B and 40 B); where neither is, dK and dQ run apart (no spill, 1.49x the useful "
    "multiply-adds forward + backward, against 1.2x fused)")
_RANK1_WIDE_SM_90 = (
    "TF32 at 257 key channels on sm_90: 32-bit 256-wide tiles beside the rank-1 channel's "
    "vectors; the 64-row tilings (warpgroup MMA) that do not spill compute a dot on two "
    "warpgroups, and the best of the others spills 56 B (forward, m64 n32 v128) or 4 B (dQ, "
    "m64 n16); 16-row tilings with the query tile streamed spill nothing but run mma.sync "
    "and read 2.7x (forward) and 1.5x (dQ) the L2 bytes per pair")

# Tilings a Triton release compiles wrong for an architecture, keyed by the architecture: (the
# kernels, the config fields that match). No table of that architecture may use a matching
# candidate, first or fallback (tests/kernels/test_triton36_faults.py), and the search
# (tools.kernel_report.search) skips them there; tools.gpu_session.tune still times them
# when asked (--only), to see whether a newer Triton fixed them.
# sm_90: the dK+dQ kernel (and the deterministic dK kernel, the same code) with 64 key rows
# over 16 query rows on 4 warps, under Triton 3.6 on an H100 (bench/NOTES.md, GPU sessions of
# 2026-11-26): K(64, 16, w4, s2, None) and K(64, 16, w4, s1, 64) gave wrong gradients (errors
# 20-343 against 2e-2) with no memcheck error and no shared-memory race, K(64, 16, w4, s2,
# None, stream_keys) an error of 0.067, and K(64, 16, w4, s1, 32) read shared memory out of
# bounds in the compiler's own layout of a tl.dot; the interpreter gives the float64
# gradients at all four. The fault is the compile of that warp layout, so the whole
# geometry is kept out whatever its stages, value chunk and key streaming.
MISCOMPILED = {
    "sm_90": ((("dkdq", "dk"), dict(block_n=64, block_m=16, num_warps=4)),),
}


def miscompiled(architecture_name, kernel, config):
    """Whether `config` of `kernel` matches a tiling MISCOMPILED lists for the architecture."""
    return any(kernel in kernels and all(getattr(config, name, None) == value
                                         for name, value in fields.items())
               for kernels, fields in MISCOMPILED.get(architecture_name, ()))


_MMA_SYNC_TABLES = ("sm_80", "sm_86", "sm_120", "generic")
EXCEPTIONS: dict = {
    **{(name, "dkdq", "tf32", 128): _TF32_DKDQ_MMA_SYNC for name in ("sm_80", "sm_120")},
    ("generic", "dkdq", "tf32", 128): _TF32_GENERIC,
    **{("sm_90", kernel, "tf32", 257): _RANK1_WIDE_SM_90 for kernel in ("forward", "dq")},
}


# Which kernels each read launches: a read the torch backend takes (ON_TORCH) launches none.
READS = {"forward": ("forward", "merge"), "backward": ("prepare", "dv", "dkdq", "dk", "dq"),
         "select": ("select", "select_merge"), "usage": ("usage",)}

# Reads the torch backend computes by design, keyed (architecture, read, precision class, key
# width) with the reason: where no tiling of their kernels runs without spilling hundreds of
# bytes, the torch backend's chunked products are the better path. The other reads of the same
# call still run the kernels. Every read has a tiling that meets the targets or an EXCEPTIONS
# entry today, so it is empty: the place for an architecture where that is not so.
ON_TORCH: dict = {}

# Where the fused dK+dQ kernel cannot hold its dK and dQ accumulators beside a wide key tile
# without spilling or splitting a dot across warps, dK and dQ are computed by two kernels (the
# deterministic backward's "dk" and "dq") in every mode, keyed (architecture, precision class,
# key width). It costs one more S and dP per pair, and spares the dQ atomics.
SEPARATE_DQ = frozenset(
    {(name, precision, 256) for name in _MMA_SYNC_TABLES for precision in ("16-bit", "tf32")}
    | {("sm_90", "tf32", 256), ("sm_100", "tf32", 256)}
    | {(name, precision, 256) for name in ("gfx90a", "gfx942", "gfx950")
       for precision in ("tf32", "fp32")})


# Exact float32 (matmul precision "highest") under backend="auto" on NVIDIA: the kernels' dots
# run as FMA on the CUDA cores, the units cuBLAS's SGEMM runs on, and SGEMM is what the torch
# backend's chunked read (memory bounded too) uses. The static estimate from the compiled loops
# puts the kernels at best level with SGEMM on sm_80 and behind it on sm_90 (docs/kernels.md,
# "Exact float32: which read"), so "auto" reads exact float32 with torch on NVIDIA unless the
# architecture is listed here. The self-test times both; users' reports are what adds one.
# AMD's float32 runs on its matrix cores: always the kernels.
EXACT_FLOAT32_FUSED: frozenset = frozenset()
# Set to "triton" or "torch", it decides every architecture's exact float32 under "auto".
EXACT_FLOAT32_ENV = "STM_KERNELS_EXACT_FLOAT32"


def exact_float32_read(architecture):
    """"triton" or "torch": the read backend="auto" takes for exact float32 operands on the
    architecture ($STM_KERNELS_EXACT_FLOAT32 first, then EXACT_FLOAT32_FUSED)."""
    chosen = os.environ.get(EXACT_FLOAT32_ENV, "").strip().lower()
    if chosen in ("triton", "torch"):
        return chosen
    if chosen:
        raise ValueError(f"${EXACT_FLOAT32_ENV} must be 'triton' or 'torch'; got {chosen!r}")
    if architecture.vendor != "nvidia" or architecture.name in EXACT_FLOAT32_FUSED:
        return "triton"
    return "torch"


def on_torch(architecture, read, precision, width):
    """Why the torch backend computes `read` ("forward", "backward", "select", "usage") of
    this precision class and key width on the architecture by design, or None."""
    key = stated_key(ON_TORCH, architecture.name, read, precision, width)
    return None if key is None else ON_TORCH[key]


def separates_dq(architecture, precision, width):
    """Whether the backward computes dK and dQ with two kernels there (SEPARATE_DQ)."""
    return any((architecture.name, precision, key_width) in SEPARATE_DQ
               for key_width in key_widths(width))


def architecture_of(device: Device) -> tuple[Optional[Architecture], str]:
    """(the Architecture whose tilings a device runs, "") or (None, why the Triton kernels do
    not run there: the torch backend reads instead)."""
    if device.vendor == "interpreter":
        return ARCHITECTURES["interpreter"], ""
    if device.arch in ARCHITECTURES:
        return ARCHITECTURES[device.arch], ""
    capability = device.capability
    if capability is not None:  # NVIDIA
        if capability < (8, 0):
            return None, (f"{device.arch} is below sm_80: the fused kernels need Ampere or "
                          "newer tensor cores")
        if capability[0] == 8:  # sm_89, sm_87 (Orin), ...: by the shared memory they have
            return ARCHITECTURES["sm_80" if device.shared_memory >= 163 * KIB else "sm_86"], ""
        for major, name in ((12, "sm_120"), (10, "sm_100")):
            if capability[0] == major:
                return ARCHITECTURES[name], ""
        return ARCHITECTURES["generic"], ""
    return None, f"no tiling is validated for {device.arch}"


# --------------------------------------------------------------------------- overrides


_override: dict = {}


class use_configs:
    """Context manager forcing kernel configs (tests, tuning): `with use_configs(
    forward=ForwardConfig(...), backward=BackwardConfig(...), select=SelectConfig(...),
    warp_specialized=WarpSpecializedConfig(...)): ...`; also dv=, dkdq=, dk=, dq=, merge=,
    prepare=, usage=, warp_specialized_backward=, warp_specialized_dv=. A forced config is the only
    candidate (the warp-specialised ones apply where those kernels are opted in)."""

    def __init__(self, forward=None, backward=None, warp_specialized=None,
                 warp_specialized_backward=None, warp_specialized_dv=None, **kernels):
        unknown = set(kernels) - set(KERNELS)
        if unknown:
            raise TypeError(f"use_configs: unknown kernels {sorted(unknown)}")
        self.configs = dict(kernels, forward=forward, warp_specialized=warp_specialized,
                            warp_specialized_backward=warp_specialized_backward,
                            warp_specialized_dv=warp_specialized_dv)
        if backward is not None:
            self.configs.update(dv=backward.dv, dkdq=backward.dkdq, dq=backward.dq,
                                dk=backward.dk or backward.dkdq)

    def __enter__(self):
        self.previous = dict(_override)
        _override.update({key: value for key, value in self.configs.items() if value is not None})
        return self

    def __exit__(self, *exc):
        _override.clear()
        _override.update(self.previous)


def candidates(kernel, architecture, precision, width):
    """The configs to try, in order: the one use_configs forces (or forces for its twin),
    else the architecture's."""
    for name in (kernel, TWINS.get(kernel)):
        if name in _override:
            return (_override[name],)
    return architecture.candidates(kernel, precision, width)


def forced_configs():
    """The configs use_configs forces now, as ((kernel, config), ...) sorted by kernel; () when
    none is. Part of a kept launch's layout key: a forced set plans and keeps its own."""
    return tuple(sorted(_override.items())) if _override else ()


def warp_specialized_config():
    """The warp-specialised forward's tiling: the one forced by use_configs, else the
    default (64 query rows, all value channels in one program)."""
    return _override.get("warp_specialized") or WarpSpecializedConfig()


def warp_specialized_backward_config():
    """The warp-specialised dK/dQ kernel's tiling: the one forced by use_configs, else the
    default."""
    return _override.get("warp_specialized_backward") or WarpSpecializedBackwardConfig()


def warp_specialized_dv_config():
    """The warp-specialised dV kernel's tiling: the one forced by use_configs, else the
    default."""
    return _override.get("warp_specialized_dv") or WarpSpecializedDvConfig()


__all__ = ["INTERPRETING", "ARCHITECTURES", "Architecture", "ForwardConfig", "MergeConfig",
           "PrepareConfig",
           "DvConfig", "DkdqConfig", "DqConfig", "SelectConfig", "SelectMergeConfig",
           "UsageConfig", "BackwardConfig",
           "WarpSpecializedConfig", "WarpSpecializedBackwardConfig", "WarpSpecializedDvConfig",
           "WARP_SPECIALIZED_KERNELS",
           "ROW_SPLIT_CONFIG", "warp_specialized_dv_config",
           "ON_TORCH", "SEPARATE_DQ", "on_torch", "warp_specialized_backward_config",
           "EXACT_FLOAT32_FUSED", "EXACT_FLOAT32_ENV", "exact_float32_read",
           "MISCOMPILED", "miscompiled",
           "separates_dq", "architecture_of", "candidates", "forced_configs", "RANK1_WIDTHS",
           "RANK1_L2",
           "KEY_WIDTHS", "key_widths", "stated_key", "splits_last_channel",
           "precision_class", "width_class", "use_configs", "warp_specialized_config"]
