"""An 8-bit memory (stm_kernels.QuantizedMemory): which scale axes keep the read's error lowest
on real memories, and the 8-bit torch read's time and peak memory against the bf16 read.

    python -m bench quantized-read                       # small-real, three training sequences
    python -m bench quantized-read --sequences camel cows --captures 3 --sizes 16200

Errors: small-real's VideoSegmenter (mem_every 5, float32 memory) runs over DAVIS-2016
training sequences (never the reserved test sequences); at `--captures` frames spread over each
sequence its memory bank's keys and values and the frame's query key are taken, as the bank
reads them. Each memory is stored as bf16, and as int8 and fp8 with keys and values scaled per
channel or per position, and read in float64 (the memory's own rounding, nothing of the
read's arithmetic); the error is the normalised RMS error (stm_kernels.selftest.relative_error)
of out against the float64 read of the float32 memory, mean and largest over the captures.
A last column reads each 8-bit memory as the torch backend does for the float32 network
(float32 query, chunks dequantised on the fly).

Speed: the torch backend's read of one object at the official sizes (HW 1,620, Ck 128, Cv
512) at each of --sizes memory positions, bf16 (query and memory) against the 8-bit memories
read with a bf16 query, interleaved rounds in one process (each variant's median). Peak: the
resident-set peak of one read above its inputs, in a fresh process per variant
(bench.common.cpu_peak_extra_bytes). Writes bench/results/quantized_read_<device>_<date>.json.

On CUDA (--device cuda) the speed runs read with the fused kernels (backend "triton": the
plain bf16 forward against memory_read_fwd_kernel_8bit), each round one do_bench median per
variant (CUDA events), the variants interleaved, each checked first against the float64 read
of its own stored memory; the kernels' own time (torch.profiler) beside it; the peak is the
CUDA memory allocated by one read above its inputs, in this process:

    python -m bench quantized-read --device cuda --captures 0 --sizes 16200 64800 162000

fp8 products (--fp8-products): whether the fused read of an fp8 memory could multiply in fp8
(sm_89 / sm_90 tensor cores) instead of bf16, emulated in float64 with each operand's
rounding applied (no GPU): synthetic memories (Gaussian, keys and values with uneven channel
and position magnitudes, Ck 128, Cv 512, HW 512, N 8,192) at three softmax sharpnesses, keys
per channel and values per position in fp8; the query folded with the keys' channel scales and
rounded to bf16, then per query row to e4m3 (QK in fp8), p times the values' position scales
to e4m3 after a factor 448 / max scale (PV in fp8). Errors against the float64 read of the
dequantised fp8 memory (the products' own), and against the float32 memory (with the
storage's).

Products (--products, CPU): what an 8-bit memory could save in the torch read's inner loop, on
the CPU at hand. One block of the read (ROW_BLOCK query rows, CPU_CHUNK memory positions, Ck
128, Cv 512) on one thread, interleaved rounds: the bf16 products the read runs (QK through
addmm, PV through mm, oneDNN), int8 QK through torch._int_mm (VNNI / AMX-INT8) with and without
the pass that brings its int32 scores to the bf16 products the softmax takes, PV through
torch's int8 weight-only product (_weight_int8pack_mm: bf16 p, int8 values), the
dequantisation of one key and one value chunk to bf16 (quantized._dequantized), and the two
bounds of a chunk's making: a bf16 value chunk copied (the bf16 read's) and an int8 one widened
to bf16 with no scale (the least an 8-bit chunk can cost, whatever is done with its scales).
"""
import argparse
import functools
import statistics
import sys
import time

import torch

from bench import common
from bench.davis_test import TEST_SEQUENCES, TRAINING_SEQUENCES, add_arguments

FORMATS = ("int8", "fp8")
AXES = ("channel", "position")
SIZES = (16_200, 64_800)
SPEED_VARIANTS = ("bf16", "int8", "fp8")


def capture_memories(model, args, internal_size):
    """[(sequence, frame, q (1, Ck, HW), k (n, Ck, N), v (n, Cv, N), positions per frame)]
    float32: the memory bank of each sequence at its capture frames, with the frame's query key
    (what the bank reads)."""
    from stm_model import VideoSegmenter
    from stm_model import io as video_io
    captured = []
    for name in args.sequences:
        frames = list(video_io.FrameReader(args.davis / "JPEGImages" / "480p" / name))
        mask = torch.from_numpy(video_io.read_mask(
            args.davis / "Annotations" / "480p" / name / "00000.png"))
        # the capture frames, spread over the sequence (not the first: its memory is empty)
        wanted = {round(len(frames) * (i + 1) / (args.captures + 1)) for i in
                  range(args.captures)}
        segmenter = VideoSegmenter(model, mem_every=args.mem_every,
                                   max_internal_size=internal_size)
        taken = []
        for index, frame in enumerate(frames):
            if index in wanted:
                for bank in segmenter.banks:
                    _record_next_read(bank, taken, (name, index))
            with torch.no_grad():
                segmenter.step(frame.tensor, mask=mask if index == 0 else None)
            if index >= max(wanted):
                break
        captured += taken
        print(f"{name}: {len(taken)} memories captured (frames {sorted(wanted)})", flush=True)
    return captured


def _record_next_read(bank, taken, label):
    """The bank's next read appends (sequence, frame, q, k, v) to taken, then reads as before."""
    read = bank.read

    def recording(query_key, **options):
        keys, values = bank.memory_views()
        taken.append((*label, query_key.detach().float().flatten(2).clone(),
                      keys.float().clone(), values.float().clone(),
                      bank.size[0] * bank.size[1]))
        bank.read = read
        return read(query_key, **options)
    bank.read = recording


# Scale axes: "channel" (one scale per channel over the whole memory), "channel/frame" (one per
# channel and memory frame: what a bank quantising each frame as it is added stores, a list of
# per-frame chunks), "position" (one per memory position).
VARIANT_AXES = ("channel", "channel/frame", "position")


def storage_variants():
    """[(name, key format, key axis, value format, value axis)]: bf16; every 8-bit format and
    pair of axes; then each format on the keys alone and on the values alone (the other in
    float32), which says which of the two carries the error."""
    variants = [("bf16", "bf16", None, "bf16", None)]
    for fmt in FORMATS:
        for key_axis in VARIANT_AXES:
            for value_axis in AXES:
                variants.append((f"{fmt} K/{key_axis} V/{value_axis}", fmt, key_axis, fmt,
                                 value_axis))
    for fmt in FORMATS:
        for axis in VARIANT_AXES:
            variants.append((f"{fmt} K/{axis}, V fp32", fmt, axis, "fp32", None))
        for axis in AXES:
            variants.append((f"K fp32, {fmt} V/{axis}", "fp32", None, fmt, axis))
    return variants


def stored(memory, fmt, axis, frame_positions=None):
    """memory as stored: a float32 or bf16 tensor, a QuantizedMemory, or ("channel/frame") a
    list of one QuantizedMemory per memory frame of frame_positions positions."""
    from stm_kernels import QuantizedMemory
    if fmt == "fp32":
        return memory
    if fmt == "bf16":
        return memory.to(torch.bfloat16)
    if axis == "channel/frame":
        return [QuantizedMemory.quantize(frame, fmt, axis="channel")
                for frame in memory.split(frame_positions, dim=2)]
    return QuantizedMemory.quantize(memory, fmt, axis=axis)


def as_frames(memory, frame_positions):
    """A stored memory (a tensor or a QuantizedMemory) as per-frame chunks of the same values
    (a read takes keys and values chunk for chunk)."""
    from stm_kernels import QuantizedMemory
    if isinstance(memory, list):
        return memory
    if isinstance(memory, torch.Tensor):
        return list(memory.split(frame_positions, dim=2))
    N = memory.shape[2]
    return [QuantizedMemory(memory.data[:, :, start:start + frame_positions],
                            memory.scale if memory.axis == "channel" else
                            memory.scale[:, :, start:start + frame_positions])
            for start in range(0, N, frame_positions)]


def widened(memory):
    """A stored memory as float64 (dequantised; chunks concatenated)."""
    if isinstance(memory, list):
        return torch.cat([widened(chunk) for chunk in memory], 2)
    if isinstance(memory, torch.Tensor):
        return memory.double()
    return memory.dequantize(torch.float64)


def measure_errors(captured, similarity):
    """{variant: {"mean", "max", "torch_mean", "torch_max", "errors"}}: out's relative error
    against the float64 read of the float32 memory, for the float64 read of the stored memory
    and (8-bit) the torch backend's read with a float32 query."""
    from stm_kernels import memory_read
    from stm_kernels.selftest import relative_error
    results = {name: {"errors": [], "torch_errors": []} for name, *_ in storage_variants()}
    with torch.no_grad():
        for _, _, q, k, v, frame_positions in captured:
            reference = memory_read(q.double(), k.double(), v.double(), similarity=similarity,
                                    backend="torch")
            for name, key_format, key_axis, value_format, value_axis in storage_variants():
                key = stored(k, key_format, key_axis, frame_positions)
                value = stored(v, value_format, value_axis, frame_positions)
                out = memory_read(q.double(), widened(key), widened(value),
                                  similarity=similarity, backend="torch")
                results[name]["errors"].append(relative_error(out, reference))
                if "fp32" not in (key_format, value_format) and key_format != "bf16":
                    if isinstance(key, list) or isinstance(value, list):
                        key, value = as_frames(key, frame_positions), as_frames(
                            value, frame_positions)
                    read = memory_read(q, key, value, similarity=similarity, backend="torch")
                    results[name]["torch_errors"].append(relative_error(read, reference))
    for result in results.values():
        for key in ("errors", "torch_errors"):
            values = result[key]
            prefix = "" if key == "errors" else "torch_"
            result[prefix + "mean"] = statistics.fmean(values) if values else None
            result[prefix + "max"] = max(values) if values else None
    return results


def speed_inputs(N, variant, key_axis, value_axis, seed=0, device="cpu"):
    """(q, k, v) of one object at the official sizes for a speed variant, on device: bf16
    tensors, or a bf16 query and an 8-bit memory."""
    from stm_kernels import QuantizedMemory
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 128, 1620, generator=generator)
    k = torch.randn(1, 128, N, generator=generator)
    v = torch.randn(1, 512, N, generator=generator)
    if variant == "bf16":
        return tuple(t.bfloat16().to(device) for t in (q, k, v))
    k, v = stored(k, variant, key_axis), stored(v, variant, value_axis)
    return (q.bfloat16().to(device), QuantizedMemory(k.data.to(device), k.scale.to(device)),
            QuantizedMemory(v.data.to(device), v.scale.to(device)))


def _checked_on_cuda(inputs, backend):
    """The relative error of each variant's read against the float64 read of its own stored
    memory (a fused read's correctness on the GPU, before it is timed)."""
    from stm_kernels import memory_read
    from stm_kernels.selftest import relative_error
    errors = {}
    for name, (q, k, v) in inputs.items():
        with torch.no_grad():
            out = memory_read(q, k, v, backend=backend)
            reference = memory_read(q.double(), widened(k), widened(v), backend="torch")
        errors[name] = relative_error(out, reference)
    return errors


def measure_speed(sizes, rounds, key_axis, value_axis, device=None):
    """{N: {variant: {"median_ms", "times_ms"}}}: interleaved rounds of each variant's read
    (torch backend on the CPU, wall time; fused on CUDA: do_bench medians, with the kernels'
    own time and each variant's error against float64)."""
    from stm_kernels import memory_read
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    backend = "triton" if cuda else "torch"
    results = {}
    for N in sizes:
        inputs = {name: speed_inputs(N, name, key_axis, value_axis, device=device)
                  for name in SPEED_VARIANTS}
        reads = {name: functools.partial(memory_read, *inputs[name], backend=backend)
                 for name in SPEED_VARIANTS}
        errors = _checked_on_cuda(inputs, backend) if cuda else {}
        times = {name: [] for name in SPEED_VARIANTS}
        with torch.no_grad():
            for name in SPEED_VARIANTS:  # warm-up
                reads[name]()
            for _ in range(rounds):
                for name in SPEED_VARIANTS:
                    if cuda:
                        times[name].append(common.time_ms(reads[name], device)[0])
                        continue
                    start = time.perf_counter()
                    reads[name]()
                    times[name].append((time.perf_counter() - start) * 1e3)
            results[N] = {name: {"median_ms": statistics.median(t), "times_ms": t}
                          for name, t in times.items()}
            for name in SPEED_VARIANTS if cuda else ():
                results[N][name].update(
                    error=errors[name], kernel_ms=common.kernel_ms(reads[name], device),
                    peak_bytes=common.cuda_peak_extra_bytes(reads[name], device))
        print(f"N={N}: " + ", ".join(f"{name} {statistics.median(t):.3f} ms"
                                     for name, t in times.items()), flush=True)
    return results


FP8_SHARPNESS = (1.0, 4.0, 8.0)  # the scores' scale, in units of 1/sqrt(Ck)
FP8_PRODUCTS = (("bf16 x bf16 (the kernel)", False, False), ("fp8 QK, bf16 PV", True, False),
                ("bf16 QK, fp8 PV", False, True), ("fp8 QK, fp8 PV", True, True))


def _emulated_read(q, keys, values, scale, fp8_qk, fp8_pv):
    """out (Cv, HW) float64 of the 8-bit read of one object as the fused kernel computes it
    (keys per channel folded into the bf16 query, values per position into p), with QK and/or
    PV in fp8 (see the module docstring); q (Ck, HW) bf16-valued float64."""
    def e4m3(x):
        return x.to(torch.float8_e4m3fn).to(torch.float64)

    def bf16(x):
        return x.to(torch.bfloat16).to(torch.float64)
    k, v = keys.data[0].to(torch.float64), values.data[0].to(torch.float64)
    folded = bf16(q * keys.scale[0].double())
    if fp8_qk:
        row = folded.abs().amax(0, keepdim=True) / 448
        scores = row.T * (e4m3(folded / row).T @ k)
    else:
        scores = folded.T @ k
    scores = scores * scale
    p = torch.exp(scores - scores.amax(1, keepdim=True))
    weighted = p * values.scale[0].double()
    if fp8_pv:
        factor = 448 / values.scale.double().amax()
        out = (e4m3(weighted * factor) @ v.T) / factor
    else:
        out = bf16(weighted) @ v.T
    return (out / p.sum(1, keepdim=True)).T


def fp8_product_errors(Ck=128, Cv=512, HW=512, N=8192, seed=0):
    """{sharpness: {"memory": the fp8 memory's error, variant: [error against the
    dequantised memory's float64 read, against the float32 memory's]}} (module docstring)."""
    from stm_kernels import QuantizedMemory
    from stm_kernels.selftest import relative_error
    from stm_kernels.backends.naive import naive_memory_read
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for sharpness in FP8_SHARPNESS:
        def normal(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)
        q = normal(1, Ck, HW).bfloat16().double()
        k = normal(1, Ck, N) * torch.rand(1, Ck, 1, generator=generator,
                                          dtype=torch.float64).add(0.2)
        v = normal(1, Cv, N) * torch.rand(1, 1, N, generator=generator,
                                          dtype=torch.float64).add(0.2)
        scale = sharpness / Ck ** 0.5
        keys = QuantizedMemory.quantize(k, "fp8", "channel")
        values = QuantizedMemory.quantize(v, "fp8", "position")
        exact = naive_memory_read(q, keys.dequantize(torch.float64),
                                  values.dequantize(torch.float64), scale, False)[0][0]
        full = naive_memory_read(q, k, v, scale, False)[0][0]
        result = {"memory": relative_error(exact, full)}
        for name, fp8_qk, fp8_pv in FP8_PRODUCTS:
            out = _emulated_read(q[0], keys, values, scale, fp8_qk, fp8_pv)
            result[name] = [relative_error(out, exact), relative_error(out, full)]
        results[str(sharpness)] = result
        print(f"sharpness {sharpness}: the fp8 memory {result['memory']:.2e}; " + "; ".join(
            f"{name} {result[name][0]:.2e} ({result[name][1]:.2e})"
            for name, *_ in FP8_PRODUCTS), flush=True)
    return results


def product_ops(seed=0):
    """{name: (call, multiply-adds or None)} of one row block of the CPU read
    (pytorch.ROW_BLOCK x CPU_CHUNK, Ck 128, Cv 512): its bf16 products and their 8-bit
    alternatives (module docstring, "Products")."""
    from stm_kernels.backends import pytorch
    from stm_kernels.quantized import _dequantized
    rows, L, Ck, Cv = pytorch.ROW_BLOCK, pytorch.CPU_CHUNK, 128, 512
    generator = torch.Generator().manual_seed(seed)

    def codes(*shape):
        return torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)
    q8, k8, v8, p8 = codes(rows, Ck), codes(Ck, L), codes(Cv, L), codes(rows, L)
    q, k, v = q8.bfloat16(), k8.bfloat16(), v8.bfloat16()
    p = torch.rand(rows, L, generator=generator).bfloat16()
    unused = torch.zeros((1, 1), dtype=torch.bfloat16).expand(rows, L)
    row_scale = torch.rand(rows, 1, generator=generator)
    scores = torch._int_mm(q8, k8)
    products = torch.empty((rows, L), dtype=torch.bfloat16)
    value_scales = torch.rand(Cv, generator=generator).bfloat16()
    channel_scale = torch.rand(Ck, 1, generator=generator)
    position_scale = torch.rand(1, L, generator=generator)
    value_chunk = torch.empty((Cv, L), dtype=torch.bfloat16)
    qk, pv = rows * Ck * L, rows * L * Cv
    ops = {
        "QK bf16 (addmm, as the read)": (lambda: torch.addmm(unused, q, k, beta=0), qk),
        "QK int8 (torch._int_mm)": (lambda: torch._int_mm(q8, k8), qk),
        # widened, scaled and rounded in three passes: torch.mul(int32, float32, out=bf16)
        # takes torch's mixed-dtype loop, 1-12x slower from run to run
        "int32 scores to bf16 products (row scale)": (
            lambda: products.copy_(scores.float().mul_(row_scale)), None),
        "PV bf16 (mm, as the read)": (lambda: torch.mm(p, v.T), pv),
        "PV int8 values (torch._weight_int8pack_mm)": (
            lambda: torch.ops.aten._weight_int8pack_mm(p, v8, value_scales), pv),
        "PV int8 x int8 (torch._int_mm, p in 8 bits)": (lambda: torch._int_mm(p8, v8.T), pv),
        "dequantise a key chunk (per channel)": (
            lambda: _dequantized(k8, channel_scale, torch.bfloat16), None),
        "dequantise a value chunk (per position)": (
            lambda: _dequantized(v8, position_scale, torch.bfloat16), None),
        # what a chunk costs the bf16 read, and the least it can cost an 8-bit one (widened
        # with no scale at all): their difference bounds what folding the scales away can give
        "copy a bf16 value chunk (as the bf16 read)": (lambda: value_chunk.copy_(v), None),
        "widen an int8 value chunk to bf16 (no scale)": (lambda: value_chunk.copy_(v8), None),
    }
    if L % 16:  # torch 2.14's weight-only kernel crashes (SIGSEGV) on other lengths
        del ops["PV int8 values (torch._weight_int8pack_mm)"]
    return ops


def measure_products(rounds, repeats=20):
    """{name: {"median_ms", "gflops" (None for a pass that is not a product)}} of product_ops
    on one thread, `rounds` interleaved rounds of `repeats` calls each, in product_ops' order;
    an op this torch refuses is reported with its error instead ({"error": its first line})."""
    ops, refused = product_ops(), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (call, _) in ops.items():
            try:
                call()
            except (RuntimeError, NotImplementedError) as error:
                refused[name] = {"error": str(error).splitlines()[0]}
        runs = {name: op for name, op in ops.items() if name not in refused}
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (call, _) in runs.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                times[name].append((time.perf_counter() - start) / repeats * 1e3)
    finally:
        torch.set_num_threads(threads)
    results = {}
    for name, (_, work) in ops.items():
        if name in refused:
            results[name] = refused[name]
            continue
        median = statistics.median(times[name])
        results[name] = {"median_ms": median,
                         "gflops": None if work is None else 2 * work / median / 1e6}
    return results


def peak_child(spec):
    """The resident-set peak (bytes) of one read above its inputs, in this fresh process."""
    from stm_kernels import memory_read
    q, k, v = speed_inputs(spec["N"], spec["variant"], spec["key_axis"], spec["value_axis"])
    torch.set_num_threads(spec["threads"])

    def read():
        with torch.no_grad():
            memory_read(q, k, v, backend="torch")
    return {"peak_mem_bytes": common.cpu_peak_extra_bytes(read)}


def measure_peaks(sizes, key_axis, value_axis):
    """{N: {variant: bytes}} from a fresh process per variant and size."""
    peaks = {}
    for N in sizes:
        peaks[N] = {}
        for name in SPEED_VARIANTS:
            spec = dict(N=N, variant=name, key_axis=key_axis, value_axis=value_axis,
                        threads=torch.get_num_threads())
            peaks[N][name] = common.run_isolated("bench.quantized_read", spec)["peak_mem_bytes"]
        print(f"N={N} peak above the inputs: " + ", ".join(
            f"{name} {common.mib(b)} MiB" for name, b in peaks[N].items()), flush=True)
    return peaks


def summary(payload):
    """Markdown: the error table, then speed and peak per memory size."""
    parts = []
    if payload.get("errors"):
        captures = payload["captures"]
        rows = ["| memory | bytes per element, K / V | out's error: mean | largest | torch read "
                "(fp32 query): mean | largest |", "|---|---|---|---|---|---|"]
        for name, result in payload["errors"].items():
            size = ("2 / 2" if name == "bf16" else "4 / 1" if name.startswith("K fp32") else
                    "1 / 4" if name.endswith("V fp32") else "1 / 1")
            torch_cells = ("- | -" if result["torch_mean"] is None else
                           f"{result['torch_mean']:.2e} | {result['torch_max']:.2e}")
            rows.append(f"| {name} | {size} | {result['mean']:.2e} | {result['max']:.2e} | "
                        f"{torch_cells} |")
        parts.append(f"`{payload['checkpoint']}` (Ck {payload['key_dim']}, Cv "
                     f"{payload['value_dim']}, similarity {payload['similarity']}), "
                     f"{len(captures)} memories of {', '.join(payload['sequences'])} "
                     f"({min(c['positions'] for c in captures):,}-"
                     f"{max(c['positions'] for c in captures):,} positions), against the "
                     f"float64 read of the float32 memory:\n\n" + "\n".join(rows))
    if payload.get("fp8_products"):
        rows = ["| scores' scale | the fp8 memory | " + " | ".join(
            name for name, *_ in FP8_PRODUCTS) + " |", "|---" * (len(FP8_PRODUCTS) + 2) + "|"]
        for sharpness, result in payload["fp8_products"].items():
            rows.append(f"| {sharpness} / sqrt(Ck) | {result['memory']:.2e} | " + " | ".join(
                f"{result[name][0]:.2e} ({result[name][1]:.2e})" for name, *_ in FP8_PRODUCTS)
                + " |")
        parts.append("fp8 products, emulated (keys per channel, values per position in fp8; "
                     "each cell: out's error against the float64 read of the dequantised fp8 "
                     "memory, and in brackets against the float32 memory):\n\n"
                     + "\n".join(rows))
    if payload.get("products"):
        rows = ["| one row block, one thread | ms | GFLOP/s |", "|---|---|---|"]
        for name, result in payload["products"].items():
            if "error" in result:
                rows.append(f"| {name} | refused: {result['error']} | |")
                continue
            rate = "" if result["gflops"] is None else f"{result['gflops']:.0f}"
            rows.append(f"| {name} | {result['median_ms']:.3f} | {rate} |")
        parts.append(f"The CPU read's products and their 8-bit alternatives ({payload['rounds']} "
                     f"interleaved rounds, medians; {payload['device']}):\n\n" + "\n".join(rows))
    if payload.get("speed"):
        rows = ["| N | " + " | ".join(f"{v} ms" for v in SPEED_VARIANTS) +
                " | 8-bit / bf16 time | peak above inputs, MiB: " +
                " / ".join(SPEED_VARIANTS) + " |", "|---" * (len(SPEED_VARIANTS) + 3) + "|"]
        for N, result in payload["speed"].items():
            base = result["bf16"]["median_ms"]
            ratios = ", ".join(f"{v} {result[v]['median_ms'] / base:.2f}x"
                               for v in SPEED_VARIANTS[1:])
            peaks = payload.get("peaks", {}).get(N, {})
            rows.append(f"| {int(N):,} | " + " | ".join(
                f"{result[v]['median_ms']:.0f}" for v in SPEED_VARIANTS) + f" | {ratios} | " +
                " / ".join(common.mib(peaks.get(v)) for v in SPEED_VARIANTS) + " |")
        parts.append(f"The torch read, one object, HW 1,620, Ck 128, Cv 512, bf16 query; 8-bit "
                     f"keys per {payload['key_axis']}, values per {payload['value_axis']}; "
                     f"{payload['rounds']} interleaved rounds, medians; {payload['device']}:"
                     "\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def main(argv=None):
    """`python -m bench quantized-read`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench quantized-read",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser, TRAINING_SEQUENCES[1:4] + TRAINING_SEQUENCES[8:9],
                  "training sequences whose memories are taken (never a test sequence)")
    parser.add_argument("--captures", type=int, default=3,
                        help="memories taken per sequence, spread over it")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES),
                        help="memory positions of the speed and peak runs (none: skip them)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--key-axis", choices=AXES, default="channel",
                        help="the 8-bit keys' scale axis in the speed and peak runs")
    parser.add_argument("--value-axis", choices=AXES, default="position",
                        help="the 8-bit values' scale axis in the speed and peak runs")
    parser.add_argument("--no-peaks", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--fp8-products", action="store_true",
                        help="the emulated error of fp8 products in the fused read (no GPU)")
    parser.add_argument("--products", action="store_true",
                        help="time the CPU read's products against their 8-bit alternatives")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the speed runs on the fused kernels (backend triton), "
                             "their peaks in this process")
    args = common.parse_args_or_run_child(parser, argv, peak_child)
    if args is None:
        return 0
    reserved = sorted(set(args.sequences) & set(TEST_SEQUENCES))
    if reserved:
        parser.error(f"--sequences: {', '.join(reserved)} reserved test sequence(s); choose "
                     "training sequences")
    device = torch.device(args.device)
    payload = common.environment(device)
    payload.update(benchmark="quantized_read", checkpoint=args.checkpoint,
                   sequences=args.sequences, mem_every=args.mem_every, rounds=args.rounds,
                   key_axis=args.key_axis, value_axis=args.value_axis)
    if args.sequences and args.captures > 0:
        from bench.davis_test import load_model
        _, model, internal = load_model(args)
        model = model.to("cpu")
        captured = capture_memories(model, args, internal)
        payload.update(internal_size=internal, key_dim=model.config.key_dim,
                       value_dim=model.config.value_dim, similarity=model.config.similarity,
                       captures=[dict(sequence=s, frame=f, positions=k.shape[2],
                                      objects=k.shape[0]) for s, f, _, k, _, _ in captured])
        payload["errors"] = measure_errors(captured, model.config.similarity)
        print(summary({**payload, "speed": None}), flush=True)
    if args.fp8_products:
        payload["fp8_products"] = fp8_product_errors()
    if args.products:
        if device.type != "cpu":
            parser.error("--products: times the CPU read's products; run it with --device cpu")
        payload["products"] = measure_products(args.rounds)
    if args.sizes:
        payload["speed"] = {str(N): r for N, r in measure_speed(
            args.sizes, args.rounds, args.key_axis, args.value_axis, device).items()}
        if not args.no_peaks and device.type == "cpu":
            payload["peaks"] = {str(N): r for N, r in measure_peaks(
                args.sizes, args.key_axis, args.value_axis).items()}
    common.finish_run("quantized_read", payload, None, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
