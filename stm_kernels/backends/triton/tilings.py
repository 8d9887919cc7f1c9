"""Tilings of the Triton kernels: one small config class per kernel, the candidate tables the
launchers try in order, and a context manager that forces a config (tests, tuning).

Every GPU default is justified by the static work report (`python -m tools.kernel_report.report`,
compiled for sm_90 at the target shape B=1, HW=1,620, N=162,000, Ck=128, Cv=512; README
"Static work report") and stays until `python -m tools.gpu_session.tune` on an H100 says
otherwise. All
defaults compile without register spills, within 227 KiB of shared memory, and no warpgroup
repeats another's dot:

    forward  128 query rows for 8 warps: 16 rows per warp, so no warpgroup repeats the QK
             product or the softmax (64 rows left both warpgroups computing the same scores);
             the 512 value channels split over 2 programs of 256 (an fp32 accumulator of
             128 x 512 cannot live in registers), which repeats only QK: 768 executed MACs per
             (query, memory) pair for 640 useful, the report's 1.2x target. bf16 takes 64-key
             blocks with 3 stages (255 registers, 176 KiB); fp32 (TF32) operands are twice the
             bytes, so 32-key blocks (208 KiB).
    dV       128 memory rows for 8 warps, 32 queries per step, 256 value channels per program
             (128 in fp32): S recomputed per chunk, dV exact: 768 MACs per pair (1,024 fp32).
    dK + dQ  128 memory rows for 8 warps; S, dP over all 512 value channels (the reduction
             dimension), dK, and dQ added with fp32 atomics: 896 MACs per pair. In bf16 the
             program holds its V block in shared memory (128 KiB; 16 queries per step keep
             the total at 208 KiB); an fp32 V block (256 KiB) cannot fit, so fp32 streams V and
             dO through the dP reduction 64 channels at a time (V re-read from L2 per step; one
             stage: two spill with the L2 similarity).
             Forward + backward: 2,432 executed MACs per pair in bf16 for the 2,240 counted
             (1.09x); 2,688 in fp32 (1.2x).
    dQ       deterministic mode only (torch.use_deterministic_algorithms): the dK/dQ kernel
             drops its dQ dot and atomics (768 MACs per pair) and this kernel recomputes S and
             dP per (128 query rows, memory split): 768 more, no atomics. A whole 128 x 512 dO
             tile would not fit in registers beside the dQ accumulator, so dO and V stream
             through dP in 64-channel chunks (32 in fp32); 64-key blocks halve dO's re-reads
             per key against 32 (246 registers, 80 KiB, no spills; fp32: 32 keys, 223, 120 KiB).
             Backward 2,304 per pair in bf16 (1.44x the counted 1,600).

Overlapping the softmax with the matrix products is out of reach of plain Triton on sm_90:
issuing block j+1's QK product before block j's softmax by hand compiles to the same
schedule (Triton 3.8 waits for a non-accumulator wgmma right after issuing it, before the
exponentials). The warp-specialised Gluon forward (memory_read_gluon) is the way there.
"""
import dataclasses
import os

# Triton decides at decoration time whether kernels are interpreted, so this is read once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiling of `memory_read_fwd_kernel`.

    block_v=None keeps all value channels in one program; a smaller block_v splits them over
    programs (recomputing q.k per chunk). splits=None picks the number of memory splits from
    the device's multiprocessor count."""
    block_m: int = 64
    block_n: int = 64
    block_v: int | None = None
    num_warps: int = 8
    num_stages: int = 2
    splits: int | None = None


@dataclasses.dataclass(frozen=True)
class DvConfig:
    """Tiling of `memory_read_bwd_kernel_dv`: block_n memory rows per program, looping over
    the queries block_m at a time; block_v value channels per program (None: all)."""
    block_n: int = 64
    block_m: int = 64
    block_v: int | None = None
    num_warps: int = 8
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class DkdqConfig:
    """Tiling of `memory_read_bwd_kernel_dkdq`: block_n memory rows per program, looping over
    the queries block_m at a time. dP is reduced over all value channels: block_cv=None holds
    the program's whole V block; a smaller block_cv streams V and dO in chunks of that many
    channels per query block (for V blocks too large for shared memory, as in fp32)."""
    block_n: int = 64
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 1
    block_cv: int | None = None


@dataclasses.dataclass(frozen=True)
class DqConfig:
    """Tiling of `memory_read_bwd_kernel_dq` (deterministic mode only): block_m query rows per
    program, looping over its memory split block_n positions at a time; block_cv=None holds
    the whole dO tile, a smaller block_cv streams dO and V through the dP reduction in chunks.
    splits=None picks the number of memory splits from the device's multiprocessor count."""
    block_m: int = 64
    block_n: int = 32
    block_cv: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """The backward kernels' tilings (dq: used in deterministic mode only)."""
    dv: DvConfig = DvConfig()
    dkdq: DkdqConfig = DkdqConfig()
    dq: DqConfig = DqConfig()


@dataclasses.dataclass(frozen=True)
class WarpSpecializedConfig:
    """Tiling of the warp-specialised Gluon forward (memory_read_gluon, opt-in, sm_90 only;
    not yet run on a GPU). block_m: query rows per program; block_n: memory
    positions per pipeline step; num_stages: depth of the K and V TMA rings; num_p: depth of the
    P/alpha ring between the softmax and PV warpgroups; pv_regs / load_regs: setmaxnreg targets
    of the PV and load partitions (the softmax partition gets what is left of 128 x 4
    warpgroups).

    value_chunks: programs per query block, each reading ceil(Cv / value_chunks) value
    channels (each recomputes S: 1.2x the useful MACs per pair at 2 chunks, Ck = 128,
    Cv = 512). split_rows: how the two PV warpgroups share a program's work. False (the
    default, block_m = 64): each takes half of its value channels for all 64 rows. True
    (block_m = 128): each takes 64 of its rows for all of its channels, so one K/V tile
    serves 128 query rows, not 64: 12 bytes from L2 per (query, memory) pair at Cv = 512 with
    2 chunks, against 20 (bench/NOTES.md, "L2 traffic per pair")."""
    block_m: int = 64
    block_n: int = 64
    num_stages: int = 2
    num_p: int = 2
    pv_regs: int = 168
    load_regs: int = 24
    value_chunks: int = 1
    split_rows: bool = False


# The Gluon forward's other candidate: 1.2x the useful MACs (as the plain forward) for 0.6x the
# default's L2 traffic; which one wins depends on the L2 -> SM bandwidth, which only a GPU run
# (tools.gpu_session.tune times both) can tell. Static report (sm_90, target shape): no
# spills, 210 KiB of
# shared memory with 3 stages (166 KiB with 2, which tools.gpu_session.tune also times).
ROW_SPLIT_CONFIG = WarpSpecializedConfig(block_m=128, num_stages=3, value_chunks=2,
                                         split_rows=True)


# Candidates in order of preference, per element size (2: fp16/bf16; 4: fp32, TF32 or exact);
# a candidate that does not fit the device's shared memory or registers (OutOfResources at
# compile time) falls through to the next one.
GPU_FORWARD = {
    2: (ForwardConfig(block_m=128, block_n=64, block_v=256, num_warps=8, num_stages=3),
        ForwardConfig(block_m=128, block_n=32, block_v=256, num_warps=8, num_stages=2),
        ForwardConfig(block_m=64, block_n=32, block_v=256, num_warps=4, num_stages=2)),
    4: (ForwardConfig(block_m=128, block_n=32, block_v=256, num_warps=8, num_stages=3),
        ForwardConfig(block_m=128, block_n=32, block_v=128, num_warps=8, num_stages=2),
        ForwardConfig(block_m=64, block_n=32, block_v=128, num_warps=4, num_stages=1)),
}
GPU_BACKWARD = {
    2: (BackwardConfig(DvConfig(block_n=128, block_m=32, block_v=256, num_warps=8, num_stages=2),
                       DkdqConfig(block_n=128, block_m=16, num_warps=8, num_stages=2),
                       DqConfig(block_m=128, block_n=64, block_cv=64, num_warps=8,
                                num_stages=2)),
        BackwardConfig(DvConfig(block_n=64, block_m=32, block_v=256, num_warps=4, num_stages=1),
                       DkdqConfig(block_n=64, block_m=16, num_warps=4, num_stages=2,
                                  block_cv=128),
                       DqConfig(block_m=128, block_n=32, block_cv=64, num_warps=8,
                                num_stages=3))),
    4: (BackwardConfig(DvConfig(block_n=128, block_m=32, block_v=128, num_warps=8, num_stages=2),
                       DkdqConfig(block_n=128, block_m=16, num_warps=8, num_stages=1,
                                  block_cv=64),
                       DqConfig(block_m=128, block_n=32, block_cv=32, num_warps=8,
                                num_stages=2)),
        BackwardConfig(DvConfig(block_n=64, block_m=32, block_v=128, num_warps=4, num_stages=1),
                       DkdqConfig(block_n=64, block_m=16, num_warps=4, num_stages=2,
                                  block_cv=64),
                       DqConfig(block_m=64, block_n=32, block_cv=32, num_warps=4,
                                num_stages=1))),
}
# The interpreter runs one Python step per tile operation: large tiles are fastest there.
INTERPRETER_FORWARD = (ForwardConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),)
INTERPRETER_BACKWARD = (BackwardConfig(DvConfig(block_n=32, block_m=32, num_warps=4),
                                       DkdqConfig(block_n=32, block_m=32, num_warps=4),
                                       DqConfig(block_m=32, block_n=32, num_warps=4)),)

# The top-k selection (64 query rows, one warpgroup: with 8 warps the only dot, QK, would be
# computed twice) and the usage kernel (dV's layout: 128 memory rows for 8 warps).
SELECT_CONFIG = {False: dict(block_m=64, num_warps=4, num_stages=2),
                 True: dict(block_m=16, num_warps=4, num_stages=1)}  # by INTERPRETING
USAGE_CONFIG = {False: dict(block_n=128, block_m=64, num_warps=8),
                True: dict(block_n=32, block_m=32, num_warps=4)}

_override = {"forward": None, "backward": None, "warp_specialized": None}


class use_configs:
    """Context manager forcing kernel configs (for tests and tuning): `with use_configs(
    forward=ForwardConfig(...), backward=BackwardConfig(...),
    warp_specialized=WarpSpecializedConfig(...)): ...` (the last one applies where the
    warp-specialised forward is opted in)."""

    def __init__(self, forward=None, backward=None, warp_specialized=None):
        self.configs = {"forward": forward, "backward": backward,
                        "warp_specialized": warp_specialized}

    def __enter__(self):
        self.previous = dict(_override)
        _override.update({key: value for key, value in self.configs.items() if value is not None})
        return self

    def __exit__(self, *exc):
        _override.clear()
        _override.update(self.previous)


def candidates(kind, itemsize):
    """The configs to try, in order, for kind 'forward' or 'backward' and an element size."""
    if _override[kind] is not None:
        return (_override[kind],)
    if INTERPRETING:
        return INTERPRETER_FORWARD if kind == "forward" else INTERPRETER_BACKWARD
    table = GPU_FORWARD if kind == "forward" else GPU_BACKWARD
    return table[min(itemsize, 4)]


def warp_specialized_config():
    """The warp-specialised forward's tiling: the one forced by use_configs, else the
    default (64 query rows, all value channels in one program)."""
    return _override["warp_specialized"] or WarpSpecializedConfig()


def defaults(itemsize):
    """(forward, backward) configs a GPU launch tries first for this element size."""
    return GPU_FORWARD[min(itemsize, 4)][0], GPU_BACKWARD[min(itemsize, 4)][0]
