"""Reading a compiled kernel's work off Triton's own output (PTX, TTGIR, ptxas), no GPU needed.

    main_loop(ptx)              the body of the loop that issues the most matrix instructions
    mma_census(ptx_lines)       matrix instructions by shape: [{"instruction", "shape", "types",
                                "count", ...}]
    loop_dots(ttgir)            the dots inside scf.for loops, with their warp layouts, the
                                factor by which warps repeat each other's work, and how often
                                loops nested in the main loop repeat them
    inner_trip_counts(ttgir)    constant trip counts of the loops nested in the main loop
    executed_macs(census, num_warps)   multiply-adds one loop iteration issues, all warps
    loop_memory(ttgir)          global-memory bytes one iteration of the runtime loops asks of
                                the L2 (loads, TMA copies, atomics), all warps together
    blocks_per_sm(...)          co-resident blocks on an H100 SM (registers, shared memory, warps)

How duplication is read: Blackwell's tcgen05 MMA is issued once per block (no duplication); on
Hopper, a warpgroup's MMA covers 64 rows (16 per warp) and the
instruction's N columns (Ampere's mma.sync 16 x 8 per warp, AMD's MFMA its instruction's M x N
per wavefront); a dot whose layout has more warps along a dimension than the tile has rows (or
columns) for makes several warps compute the same elements. The PTX confirms it:
one thread's wgmma stream, times the warpgroups, is the block's executed work.
"""
import math
import re

_OPCODE = re.compile(r"\s*(?:@!?%?\w+\s+)?([a-z][\w.:]*)")  # optional predicate, opcode
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.(\w+)\.(\w+)\.(\w+)")
_MMA_SYNC = re.compile(r"mma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.\w+\.\w+\.(\w+)\.(\w+)")
_MMA_LAYOUT = re.compile(r"^#(\w+) = #ttg\.(nvidia_mma|amd_mfma)<\{version(?:Major)? = (\d+).*?"
                         r"warpsPerCTA = \[(\d+), (\d+)\].*?instrShape = \[([\d, ]+)\]")
# A 2-D blocked layout (the FMA dot's, where no matrix instruction takes the operands).
_BLOCKED_LAYOUT = re.compile(r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[(\d+), (\d+)\], "
                             r"threadsPerWarp = \[(\d+), (\d+)\], warpsPerCTA = \[(\d+), (\d+)\]")
_MEMORY_OP = re.compile(r"\b(ttg\.async_copy_global_to_local|tt\.load|tt\.descriptor_load|"
                        r"ttng\.async_tma_copy_global_to_local|tt\.atomic_rmw|tt\.atomic_cas)\b")
_POINTER_TENSOR = re.compile(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>")
_TMA_DESTINATION = re.compile(r"-> !ttg\.memdesc<([\dx]+)x(\w+),")
_DESCRIPTOR_RESULT = re.compile(r"-> tensor<([\dx]+)x(\w+),")
ELEMENT_BYTES = dict(i1=1, i8=1, f8E4M3FN=1, bf16=2, f16=2, i16=2, f32=4, i32=4, f64=8, i64=8)
_DOT = re.compile(r"(?:ttng\.warp_group_dot|tt\.dot) .*?: (\S+?)<(\d+)x(\d+)x(\w+)"
                  r".*-> tensor<(\d+)x(\d+)xf32, #(\w+)>")
# Blackwell's tcgen05 MMA (sm_100): operands A (M x K) and B (K x N) in shared or tensor memory,
# issued once per block by one thread, so no warp repeats another's work.
_TCGEN05_DOT = re.compile(r"ttng\.tc_gen5_mma .*?: !ttg\.memdesc<(\d+)x(\d+)x\w+[^>]*>, "
                          r"!ttg\.memdesc<(\d+)x(\d+)x\w+")

# H100 SXM (sm_90): per-SM limits used for occupancy.
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
BLOCK_RESERVED_SHARED = 1024
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32


def _loops(lines):
    """(start, end) line ranges of the loops: a label and a later branch back to it."""
    labels, loops = {}, []
    for index, line in enumerate(lines):
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = index
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], index))
    return loops


def main_loop(ptx, inner_trip_counts=()):
    """Lines of the loop that issues the most MMA instructions (the outermost of equals), with
    the loops nested in it repeated by their trip counts (inner_trip_counts, in order: the
    PTX does not say how often a loop runs; the TTGIR does, see inner_trip_counts)."""
    lines = ptx.splitlines()
    loops = _loops(lines)
    best, best_key = None, None
    for start, end in loops:
        key = (sum(entry["count"] for entry in mma_census(lines[start:end + 1])), end - start)
        if key[0] and (best_key is None or key > best_key):
            best, best_key = (start, end), key
    if best is None:
        return []
    start, end = best
    nested = [(s, e) for s, e in loops if start < s and e < end]
    top = [(s, e) for s, e in nested if not any(a < s and e < b for a, b in nested)]
    body = lines[start:end + 1]
    for (s, e), trips in zip(sorted(top), inner_trip_counts, strict=False):
        body += lines[s:e + 1] * (trips - 1)
    return body


def _regions(ttgir):
    """Walk the TTGIR: yield (line, enclosing regions, region the line opens or None) per line;
    a region is ("main", 1) for a loop with runtime bounds, ("inner", None) for one nested in
    such a loop (its trip count is the caller's: inner_trips), ("for", trips) for a loop with a
    constant trip count, ("other", 1) for anything else (functions, ifs, reductions)."""
    constants, regions = {}, []
    for line in ttgir.splitlines():
        stripped = line.strip()
        constant = re.match(r"(%\w+) = arith\.constant (-?\d+) : i(32|64)", stripped)
        if constant:
            constants[constant.group(1)] = int(constant.group(2))
        if stripped.startswith("}"):
            if regions:
                regions.pop()
            if stripped.endswith("{"):  # "} else {"
                regions.append(("other", 1))
            continue
        opened = None
        if stripped.endswith("{"):
            opened = ("other", 1)
            loop = re.search(r"scf\.for %\S+ = (%\w+) to (%\w+) step (%\w+)", stripped)
            if loop:
                lower, upper, step = (constants.get(name) for name in loop.groups())
                if None not in (lower, upper, step):
                    opened = ("for", max(0, -(-(upper - lower) // step)))
                elif any(kind == "main" for kind, _ in regions):
                    opened = ("inner", None)
                else:
                    opened = ("main", 1)
        yield stripped, tuple(regions), opened
        if opened:
            regions.append(opened)


def inner_trip_counts(ttgir):
    """Constant trip counts of the loops directly inside the first loop with runtime bounds
    (the main loop), in order of appearance."""
    trips, main_depth = [], None
    for _, regions, opened in _regions(ttgir):
        if main_depth is None:
            if opened == ("main", 1):
                main_depth = len(regions)
            continue
        if len(regions) <= main_depth:
            break  # left the main loop
        if regions[-1][0] == "main" and opened and opened[0] == "for":
            trips.append(opened[1])
    return trips


def mma_census(lines):
    """Matrix instructions among lines, grouped by shape and operand types."""
    counts = {}
    for line in lines:
        match = _WGMMA.search(line)
        if match:
            m, n, k, _, a_type, _ = match.groups()
            key = ("wgmma", int(m), int(n), int(k), a_type)
        else:
            match = _MMA_SYNC.search(line)
            if not match:
                continue
            m, n, k, a_type, _ = match.groups()
            key = ("mma.sync", int(m), int(n), int(k), a_type)
        counts[key] = counts.get(key, 0) + 1
    return [dict(instruction=kind, shape=f"m{m}n{n}k{k}", types=a_type, m=m, n=n, k=k,
                 count=count) for (kind, m, n, k, a_type), count in sorted(counts.items())]


def executed_macs(census, num_warps):
    """Multiply-adds issued by all warps of a block for one pass over the census' lines: a
    wgmma is issued by each warpgroup, an mma.sync by each warp."""
    total = 0
    for entry in census:
        issuers = num_warps // 4 if entry["instruction"] == "wgmma" else num_warps
        total += entry["count"] * entry["m"] * entry["n"] * entry["k"] * issuers
    return total


def exp2_while_mma_pending(lines):
    """exp2 instructions of one loop iteration issued while a wgmma group is still pending (the
    softmax overlapping the tensor cores); the body is walked twice so that groups committed
    at the end of an iteration count for the next one."""
    pending, overlapped = 0, 0
    for walk in range(2):
        for line in lines:
            if "wgmma.commit_group" in line:
                pending += 1
            wait = re.search(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", line)
            if wait:
                pending = min(pending, int(wait.group(1)))
            if "ex2.approx" in line and pending and walk == 1:
                overlapped += 1
    return overlapped


def count(lines, *opcodes):
    """PTX instructions in lines whose opcode is one of `opcodes` or extends one by dotted
    modifiers ("atom" counts atom.global.add.f32). Matching opcodes, not substrings: "red.global"
    is also a substring of every cp.async.*.shared.global."""
    total = 0
    for line in lines:
        match = _OPCODE.match(line)
        if match:
            total += any(match.group(1) == opcode or match.group(1).startswith(opcode + ".")
                         for opcode in opcodes)
    return total


def loop_dots(ttgir, inner_trips=1):
    """Dots inside loops with runtime bounds (main loops; loops with a constant trip count nested
    in them repeat their dots, and runtime loops nested in them inner_trips times): M, N, K,
    warp layout, duplication factor, executed MACs."""
    layouts = {}
    for line in ttgir.splitlines():
        match = _MMA_LAYOUT.match(line.strip())
        if match:
            name, kind, major, warps_m, warps_n, instr = match.groups()
            layouts[name] = dict(vendor="amd" if kind == "amd_mfma" else "nvidia",
                                 version=int(major), warps=(int(warps_m), int(warps_n)),
                                 instr=tuple(int(x) for x in instr.split(",")))
        match = _BLOCKED_LAYOUT.match(line.strip())
        if match:
            name, *sizes = match.groups()
            per_thread, lanes, warps = (tuple(int(x) for x in sizes[i:i + 2])
                                        for i in (0, 2, 4))
            layouts[name] = dict(vendor="fma", version=0, warps=warps, instr=None,
                                 cover=tuple(per_thread[i] * lanes[i] * warps[i]
                                             for i in (0, 1)))
    dots = []
    for stripped, regions, _ in _regions(ttgir):
        repeats = _main_loop_repeats(regions, inner_trips)
        if repeats is None:
            continue
        tcgen05 = _TCGEN05_DOT.search(stripped)
        if tcgen05:
            M, K, _, N = (int(x) for x in tcgen05.groups())
            dots.append(dict(m=M, n=N, k=K, layout="tcgen05", fma=False, warps=None, instr=None,
                             duplication=1, repeats=repeats, useful_macs=M * N * K * repeats,
                             executed_macs=M * N * K * repeats))
            continue
        match = _DOT.search(stripped)
        if not match:
            continue
        _, _, a_cols, _, m, n, layout_name = match.groups()
        layout = layouts.get(layout_name)
        M, N, K = int(m), int(n), int(a_cols)
        duplication = _duplication(M, N, layout) if layout else 1
        dots.append(dict(m=M, n=N, k=K, layout=layout_name,
                         fma=bool(layout) and layout["vendor"] == "fma",
                         warps=list(layout["warps"]) if layout else None,
                         instr=list(layout["instr"]) if layout and layout["instr"] else None,
                         duplication=duplication, repeats=repeats,
                         useful_macs=M * N * K * repeats,
                         executed_macs=M * N * K * duplication * repeats))
    return dots


def _main_loop_repeats(regions, inner_trips):
    """How often a line inside these enclosing regions runs per iteration of the main loop (the
    product of the trip counts around it: constant ones, inner_trips for a runtime loop nested
    in the main loop), or None outside any main loop."""
    if not any(kind == "main" for kind, _ in regions):
        return None
    return math.prod(inner_trips if trips is None else trips for _, trips in regions)


def loop_memory(ttgir, inner_trips=1):
    """Bytes of global memory that one iteration of the loops with runtime bounds reads
    (`load_bytes`: loads, cp.async and TMA copies, by their tensor or box shapes) and updates
    with atomics (`atomic_bytes`), all warps of the block together; loops with a constant trip
    count nested in them repeat theirs, runtime loops nested in them inner_trips times. These
    are the logical tile bytes the kernel asks for (served by the L2, which keeps K and V for
    the blocks streaming them together), not per-thread instructions, so masked or replicated
    lanes do not inflate them. A kernel whose partitions run separate loops (warp
    specialisation) sums them: its loads sit in one."""
    load, atomic = 0, 0
    for stripped, regions, _ in _regions(ttgir):
        operation = _MEMORY_OP.search(stripped)
        repeats = _main_loop_repeats(regions, inner_trips)
        if not operation or repeats is None:
            continue
        name = operation.group(1)
        if name == "ttng.async_tma_copy_global_to_local":
            shape = _TMA_DESTINATION.search(stripped)
        elif name == "tt.descriptor_load":
            shape = _DESCRIPTOR_RESULT.search(stripped)
        else:
            shape = _POINTER_TENSOR.search(stripped)
        if not shape:
            continue  # a scalar access: negligible beside the tiles
        size = math.prod(int(d) for d in shape.group(1).split("x")) * ELEMENT_BYTES[
            shape.group(2)] * repeats
        if name.startswith("tt.atomic"):
            atomic += size
        else:
            load += size
    return dict(load_bytes=load, atomic_bytes=atomic)


def _duplication(M, N, layout):
    """How many warps compute each element of an M x N dot: a warp's MMA tile is 16 rows
    (NVIDIA; a Hopper warpgroup's 64 rows are 4 warps of 16) by the instruction's N (Hopper) or
    8 (Ampere mma.sync), or the MFMA instruction's M x N (AMD); an FMA dot's blocked layout
    covers its own rows x columns, and lanes past the tile repeat the elements inside it."""
    if layout["vendor"] == "fma":
        cover_m, cover_n = layout["cover"]
        return max(1, cover_m // M) * max(1, cover_n // N)
    warps_m, warps_n = layout["warps"]
    if layout["vendor"] == "amd":
        rows_per_warp, cols_per_warp = layout["instr"][:2]
    else:
        rows_per_warp = 16
        cols_per_warp = layout["instr"][1] if layout["version"] == 3 else 8
    return (max(1, warps_m * rows_per_warp // M)) * (max(1, warps_n * cols_per_warp // N))


def blocks_per_sm(registers, shared_bytes, num_warps):
    """Co-resident blocks per H100 SM: registers are allocated per warp in units of 256."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED_BYTES // (shared_bytes + BLOCK_RESERVED_SHARED)
    by_warps = SM_MAX_WARPS // num_warps
    return max(0, min(by_registers, by_shared, by_warps, SM_MAX_BLOCKS))
