"""Self-test of the fused read on this machine: correct against float64, and how fast.

    python -m stm_kernels.selftest                  # the GPU if there is one, else the CPU
    python -m stm_kernels.selftest --json my.json   # where to write the report
    stm selftest                                    # the same, from the command line tool

On the device it checks memory_read against a float64 reference computed on the CPU with the
official (naive) read: forward, backward (gradients of the query, keys and values, through the
output and the log-sum-exp; also under torch.use_deterministic_algorithms), ragged memory
lengths, top-k, usage, for the dot, l2 and xmem similarities, in each dtype the device supports
(float32 both exact and with TF32); and the read of an 8-bit memory (int8 and fp8, as a memory
bank stores it: keys scaled per channel and frame, values per position; 16-bit queries on a
GPU, float32, float64 and bf16 on a CPU, bf16 at a size its bf16 readers take; dot and l2,
ragged lengths) against the float64 read of its dequantised memory. On a GPU it then times the
fused read against the official read, PyTorch's SDPA and the same run's bf16 matrix-multiply
rate, at a few sizes including the target shape (one 480p frame, HW = 1,620, against 100 memory
frames, N = 162,000, Ck = 128, Cv = 512), and in exact float32 the fused read against the torch
backend's chunked read and the official read, saying whether backend="auto"'s choice for exact
float32 is the faster one on this GPU. It prints a table, writes one JSON file (device,
versions, the tilings chosen, the registers and local memory of each compiled kernel, warnings,
errors, timings) to attach to a bug or performance report, and exits with status 1 if any
result is wrong.

On a CPU the reads run on the torch backend; with TRITON_INTERPRET=1 set, on the Triton kernels
in Triton's interpreter (small sizes only, and no bfloat16: the interpreter's bf16 dot is
wrong). About a minute on a GPU.

--experimental adds the opt-in warp-specialised Gluon kernels (stm_kernels/experimental: the
forward, dV and dK/dQ kernels, sm_90 only, bf16 and fp16): the read and its gradients with them
opted in (the "gluon read" checks, which record per kernel whether it ran or why not) and
their timings beside the default kernels'. They have not run on a GPU before; a report from an
H100 or H200 says whether they are right and faster.
"""
import contextlib
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Optional

import torch

from . import FallbackWarning, QuantizedMemory, __version__, memory_read, memory_usage
from .experimental import read_unsupported_reasons
from .selftest_options import DESCRIPTION, add_arguments
from .backends import triton as triton_backend

# Normalised RMS error bounds against float64, per dtype (gradients: GRADIENT_FACTOR times).
BOUNDS = {"fp64": 1e-12, "fp32": 2e-5, "tf32": 5e-3, "fp16": 4e-3, "bf16": 3e-2}
GRADIENT_FACTOR = 3
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16}
SIMILARITIES = ("dot", "l2", "xmem")
FEATURES = ("read", "deterministic", "ragged", "top_k", "usage")
# The read and its gradients with the opt-in Gluon kernels (--experimental).
GLUON_FEATURE = "gluon read"
# The read of an 8-bit memory (inference only: out and lse) as a memory bank stores it: keys
# with a scale per channel and frame (frames of HW positions), values one per position.
QUANTIZED_FEATURES = {"int8 read": "int8", "fp8 read": "fp8"}
QUANTIZED_SIMILARITIES = ("dot", "l2")  # an 8-bit memory is not read with xmem
GLUON_SIMILARITIES = ("dot", "l2")  # the Gluon kernels read neither xmem nor the rank-1 term
TARGET = dict(B=1, HW=1620, Ck=128, Cv=512)
TIMED_N = (16200, 162000)


@dataclasses.dataclass
class Check:
    """One correctness check: a feature of the read in one dtype and similarity."""
    feature: str
    dtype: str
    similarity: str
    shape: dict
    errors: dict = dataclasses.field(default_factory=dict)
    bound: float = 0.0
    passed: bool = False
    failure: Optional[str] = None
    # GLUON_FEATURE: {Gluon kernel: None where it ran, else why the plain one ran instead}
    gluon: Optional[dict] = None


# --------------------------------------------------------------------------- inputs


def _random(shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _grid(shape, generator, low, high, step):
    """Random multiples of `step` in [low, high]: exact in every dtype the self-test runs."""
    count = round((high - low) / step) + 1
    return low + step * torch.randint(count, shape, generator=generator).double()


def _inputs(shape, similarity, seed, exact_scores=False):
    """float64 CPU inputs of one check: q, k, v and the xmem shrinkage and selection.

    exact_scores: keys, queries, shrinkage and selection on a coarse grid, so that every
    similarity score is exact in bf16, fp16 and TF32 too. A top-k selection is discontinuous:
    rounded random inputs flip near-ties between the k-th and the next position, which changes
    outputs by far more than any bound, whatever the kernel; on the grid the kernel and the
    float64 reference rank the same scores (ties: lower index). That needs Ck a power of 4:
    the scale 1/sqrt(Ck) is then a power of two, exact wherever a backend applies it."""
    generator = torch.Generator().manual_seed(seed)
    B, Ck, Cv, HW, N = (shape[key] for key in ("B", "Ck", "Cv", "HW", "N"))
    if exact_scores and math.log(Ck, 4) != round(math.log(Ck, 4)):
        raise ValueError(f"exact scores need Ck a power of 4 (16, 64, 256), got Ck={Ck}")
    if exact_scores:
        inputs = dict(q=_grid((1, Ck, HW), generator, -2, 2, 1),
                      k=_grid((B, Ck, N), generator, -2, 2, 1))
    else:
        inputs = dict(q=_random((1, Ck, HW), generator), k=_random((B, Ck, N), generator))
    inputs["v"] = _random((B, Cv, N), generator)
    if similarity == "xmem" and exact_scores:
        inputs["shrinkage"] = _grid((B, 1, N), generator, 1, 2, 0.25)
        inputs["selection"] = _grid((1, Ck, HW), generator, 0.25, 1, 0.25)
    elif similarity == "xmem":
        inputs["shrinkage"] = 1 + _random((B, 1, N), generator).abs()
        inputs["selection"] = torch.rand((1, Ck, HW), generator=generator, dtype=torch.float64)
    return inputs


def _read(inputs, feature, similarity, backend, lengths, grad_seed):
    """The feature's outputs {name: tensor}, gradients included (through random cotangents
    of out and lse)."""
    tensors = {name: tensor.detach().requires_grad_() for name, tensor in inputs.items()}
    extra = {key: tensors[key] for key in ("shrinkage", "selection") if key in tensors}
    options = dict(similarity=similarity, backend=backend, **extra)
    if feature == "ragged":
        options["memory_lengths"] = lengths
    if feature == "top_k":
        options["top_k"] = 7
    if feature == "usage":
        out, lse, usage = memory_read(tensors["q"], tensors["k"], tensors["v"], return_lse=True,
                                      return_usage=True, **options)
        alone = memory_usage(tensors["q"], tensors["k"], lse, similarity=similarity,
                             backend=backend, **extra)
        return dict(out=out, usage=usage, usage_of_lse=alone)
    out, lse = memory_read(tensors["q"], tensors["k"], tensors["v"], return_lse=True, **options)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    loss = (out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()
    loss.backward()
    results = dict(out=out, lse=lse)
    results.update({f"d{name}": tensor.grad for name, tensor in tensors.items()})
    return results


def _quantized(inputs, fmt, frame):
    """(keys, values): the float64 CPU inputs' memory in 8 bits (fmt "int8" or "fp8"), keys
    scaled per channel and frame of `frame` positions, values per position."""
    frames = inputs["k"].shape[2] // frame
    keys, values = (inputs[name].unflatten(2, (frames, frame)) for name in ("k", "v"))
    return (QuantizedMemory.quantize(keys, fmt, axis="channel_frame"),
            QuantizedMemory.quantize(values, fmt, axis="position"))


def _quantized_read(q, memory, similarity, backend, lengths):
    """{out, lse} of the read of an 8-bit memory (keys, values) on q's device; the naive
    backend reads the memory dequantised in q's dtype (float64: the reference)."""
    keys, values = (QuantizedMemory(part.data.to(q.device), part.scale.to(q.device))
                    for part in memory)
    with torch.no_grad():
        out, lse = memory_read(q, keys, values, similarity=similarity, backend=backend,
                               memory_lengths=lengths, return_lse=True)
    return dict(out=out, lse=lse)


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 on the CPU (tensors on any device, or
    arrays); inf when actual has a NaN or an Inf. The benchmarks' and the tests' measure too."""
    actual, expected = (torch.as_tensor(x).detach().double().cpu() for x in (actual, expected))
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run_check(check, device, backend, seed):
    """Fill in a Check's errors and verdict: the read on the device against float64 naive."""
    inputs = _inputs(check.shape, check.similarity, seed,
                     exact_scores=check.feature == "top_k")
    N, B = check.shape["N"], check.shape["B"]
    lengths = [N] + [max(1, (N * (b + 1)) // (B + 2)) for b in range(B - 1)]
    dtype = DTYPES[check.dtype]
    precision = "high" if check.dtype == "tf32" else "highest"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        on_device = {name: tensor.to(device, dtype) for name, tensor in inputs.items()}
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(check.feature == "deterministic")
        gluon = check.feature == GLUON_FEATURE
        feature = "read" if gluon else check.feature
        if gluon:
            check.gluon = read_unsupported_reasons(on_device["q"], on_device["k"], on_device["v"])
        fmt = QUANTIZED_FEATURES.get(check.feature)
        memory = None if fmt is None else _quantized(inputs, fmt, check.shape["HW"])
        memory_lengths = torch.tensor(lengths, device=device)

        def read(tensors, backend):
            # an 8-bit memory's reference is the float64 read of its dequantised memory
            if memory is not None:
                return _quantized_read(tensors["q"], memory, check.similarity, backend,
                                       memory_lengths)
            return _read(tensors, feature, check.similarity, backend, memory_lengths, seed + 1)
        try:
            with gluon_opted_in() if gluon else contextlib.nullcontext():
                actual = read(on_device, backend)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        # float64 on the device itself (a GPU's float64 is slow but ample for these sizes)
        expected = read({name: tensor.to(device) for name, tensor in inputs.items()}, "naive")
    except Exception as error:  # a crash is a failed check, reported with the others
        check.failure = "".join(traceback.format_exception_only(type(error), error)).strip()
        return check
    finally:
        torch.set_float32_matmul_precision(previous)
    check.bound = BOUNDS[check.dtype]
    check.passed = True
    for name, reference in expected.items():
        check.errors[name] = relative_error(actual[name], reference)
        bound = check.bound * (1 if name in ("out", "lse", "usage", "usage_of_lse")
                               else GRADIENT_FACTOR)
        check.passed &= check.errors[name] <= bound
    return check


@contextlib.contextmanager
def gluon_opted_in():
    """Within the block the reads opt into every Gluon kernel (forward, dV, dK/dQ), as
    STM_KERNELS_WARP_SPECIALIZED=1 and STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1 do."""
    from .backends.triton import launch
    with launch.warp_specialized_forward(), launch.warp_specialized_backward():
        yield


# --------------------------------------------------------------------------- plan


def plan_checks(device, quick=False, experimental=False):
    """The Checks to run on this device: every feature x similarity in each dtype it runs;
    experimental: also the read with the Gluon kernels (GPU only; bf16 and fp16, the dot and
    l2 similarities, a small shape the Gluon kernels take and, unless quick, the target)."""
    interpreting = triton_backend is not None and triton_backend.INTERPRETING
    if device.type == "cuda":
        dtypes = ["fp32", "tf32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        small = dict(B=3, Ck=64, Cv=96, HW=200, N=1000)
        target = dict(B=2, Ck=128, Cv=512, HW=1620, N=16200)
        checks = [Check(feature, dtype, similarity, small) for dtype in dtypes
                  for similarity in SIMILARITIES for feature in FEATURES]
        if not quick:  # one 480p query frame against ten memory frames, both similarities
            checks += [Check("read", dtype, similarity, target) for dtype in dtypes
                       for similarity in ("dot", "l2")]
        # the fused 8-bit read, with the 16-bit queries it is for
        checks += [Check(feature, dtype, similarity, shape)
                   for shape in [small] + ([] if quick else [target])
                   for dtype in dtypes if dtype in ("fp16", "bf16")
                   for similarity in QUANTIZED_SIMILARITIES for feature in QUANTIZED_FEATURES]
        if experimental:  # Cv twice a power of two, N % 8 == 0: what the Gluon kernels take
            shapes = [dict(B=3, Ck=64, Cv=128, HW=200, N=1000)] + ([] if quick else [target])
            checks += [Check(GLUON_FEATURE, dtype, similarity, shape) for shape in shapes
                       for dtype in dtypes if dtype in ("fp16", "bf16")
                       for similarity in GLUON_SIMILARITIES]
        return checks
    if interpreting:
        dtypes = ["fp32"]  # the interpreter's bf16 dot is wrong
        shape = dict(B=2, Ck=16, Cv=24, HW=30, N=300)  # memory split in 2: merged
        quantized = [("fp32", shape)]
    else:
        dtypes = ["fp32", "fp64"]
        shape = dict(B=3, Ck=16, Cv=48, HW=60, N=300)
        # bf16 at a size the CPU reads in row blocks: its bf16 readers
        quantized = [(dtype, shape) for dtype in dtypes] + \
            [("bf16", dict(B=2, Ck=64, Cv=128, HW=256, N=4096))]
    return [Check(feature, dtype, similarity, shape) for dtype in dtypes
            for similarity in SIMILARITIES for feature in FEATURES] + \
        [Check(feature, dtype, similarity, quantized_shape)
         for dtype, quantized_shape in quantized
         for similarity in QUANTIZED_SIMILARITIES for feature in QUANTIZED_FEATURES]


def backend_for(device):
    """The backend the self-test exercises: the kernels on a GPU, in every dtype (exact float32
    included, which backend="auto" may read with torch), or torch where they do not run (with
    its warning in the report); the kernels under the interpreter, torch on a CPU."""
    if device.type == "cuda":
        return "triton"
    interpreting = triton_backend is not None and triton_backend.INTERPRETING
    return "triton" if interpreting else "torch"


# --------------------------------------------------------------------------- timing


def _time_ms(fn, device, repeats=10):
    """Median wall time of fn in milliseconds (CUDA events on a GPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tick) * 1e3)
    return statistics.median(times)


def matmul_tflops(device, dtype=torch.bfloat16, size=4096):
    """The device's dense matrix-multiply rate in TFLOP/s, measured now."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / (_time_ms(lambda: a @ b, device) * 1e-3) / 1e12


def timings(device, sizes=TIMED_N, dtype=torch.bfloat16, providers=None):
    """Rows {provider, pass_, N, ms, tflops}: each of providers(q, k, v) -> {provider: (call,
    its input tensors)} (default: the fused read, the official read and SDPA) at the target
    shape for each N (a provider that runs out of memory gets an error)."""
    providers = providers or _providers
    B, HW, Ck, Cv = (TARGET[key] for key in ("B", "HW", "Ck", "Cv"))
    rows = []
    for N in sizes:
        q = torch.randn(1, Ck, HW, device=device, dtype=dtype)
        k = torch.randn(B, Ck, N, device=device, dtype=dtype)
        v = torch.randn(B, Cv, N, device=device, dtype=dtype)
        grad = torch.randn(B, Cv, HW, device=device, dtype=dtype)
        for provider, (call, tensors) in providers(q, k, v).items():
            for pass_ in ("fwd", "fwd+bwd"):
                flops = 2.0 * B * HW * N * (Ck + Cv) * (1 if pass_ == "fwd" else 3.5)
                row = dict(provider=provider, pass_=pass_, N=N, dtype=str(dtype))
                try:
                    row["ms"] = _time_ms(_timed(call, pass_, tensors, grad, provider), device)
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                rows.append(row)
    return rows


EXACT_FLOAT32_PROVIDERS = {"fused": "triton", "torch": "torch", "official": "naive"}


def exact_float32_timings(device, sizes=TIMED_N):
    """`timings` in exact float32 (matmul precision "highest"): the fused kernels (CUDA-core
    FMA on NVIDIA), the torch backend's chunked read (cuBLAS SGEMM) and the official read;
    what decides backend="auto"'s choice."""
    def providers(q, k, v):
        return {provider: (lambda backend=backend: memory_read(q, k, v, backend=backend),
                           (q, k, v)) for provider, backend in EXACT_FLOAT32_PROVIDERS.items()}
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        return timings(device, sizes, torch.float32, providers)
    finally:
        torch.set_float32_matmul_precision(previous)


def exact_float32_verdict(rows, auto_reads_with):
    """What the timings say of exact float32: {"fused_vs_torch": [lowest, highest] speed-up of
    the fused read over the torch read across passes and sizes (above 1: fused faster),
    "fastest": "triton", "torch" or "mixed", "auto": what backend="auto" takes here,
    "agrees": whether that is the fastest (None where mixed or not measured)}."""
    times = {(row["provider"], row["pass_"], row["N"]): row["ms"] for row in rows
             if "ms" in row}
    ratios = [times[("torch", pass_, N)] / ms for (provider, pass_, N), ms in times.items()
              if provider == "fused" and ("torch", pass_, N) in times]
    if not ratios:
        return dict(fused_vs_torch=None, fastest=None, auto=auto_reads_with, agrees=None)
    fastest = ("triton" if min(ratios) > 1 else "torch" if max(ratios) < 1 else "mixed")
    return dict(fused_vs_torch=[min(ratios), max(ratios)], fastest=fastest,
                auto=auto_reads_with, agrees=None if fastest == "mixed" else
                fastest == auto_reads_with)


def exact_float32_line(verdict):
    """One line for the console on the exact float32 timings."""
    if verdict["fastest"] is None:
        return "exact float32: not timed (no run of both the fused and the torch read)"
    low, high = verdict["fused_vs_torch"]
    spread = f"{low:.2f}x" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}x"
    line = (f"exact float32: the fused read is {spread} the speed of the torch read (cuBLAS) "
            f"here; backend='auto' reads with {verdict['auto']}")
    if verdict["agrees"] is False:
        line += (": the timings say otherwise, please attach the report to an issue (or set "
                 f"STM_KERNELS_EXACT_FLOAT32={verdict['fastest']})")
    return line


def _gluon_providers(q, k, v):
    """{"fused (Gluon)": the fused read}, for timing within gluon_opted_in()."""
    return {"fused (Gluon)": (lambda: memory_read(q, k, v, backend="triton"), (q, k, v))}


def _providers(q, k, v):
    """{provider: (call, its input tensors)}; SDPA gets its own (B, 1, L, C) layout."""
    import torch.nn.functional as F
    sdpa = [t.transpose(1, 2).unsqueeze(1).contiguous() for t in (q, k, v)]
    return {"fused": (lambda: memory_read(q, k, v, backend="triton"), (q, k, v)),
            "official": (lambda: memory_read(q, k, v, backend="naive"), (q, k, v)),
            "sdpa": (lambda: F.scaled_dot_product_attention(*sdpa), sdpa)}


def _timed(call, pass_, tensors, grad, provider):
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                call()
        return forward
    for tensor in tensors:
        tensor.requires_grad_()
    grad = grad if provider != "sdpa" else grad.transpose(1, 2).unsqueeze(1)

    def forward_backward():
        for tensor in tensors:
            tensor.grad = None
        call().backward(grad)
    return forward_backward


# --------------------------------------------------------------------------- report


def device_report(device):
    """What the report says of the device and the versions."""
    report = dict(torch=torch.__version__, stm_kernels=__version__,
                  python=platform.python_version(), platform=platform.platform(),
                  device=str(device))
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    if device.type == "cuda":
        from .backends.triton import devices, tilings
        described = devices.describe(device)
        architecture, reason = tilings.architecture_of(described)
        report.update(name=described.name, vendor=described.vendor, arch=described.arch,
                      shared_memory=described.shared_memory,
                      multiprocessors=described.multiprocessors,
                      cuda=torch.version.cuda, hip=torch.version.hip,
                      tilings=architecture.name if architecture else None,
                      unsupported=reason or None)
    return report


def chosen_configs():
    """{kernel: config fields} of the tilings the Triton launches of this process used."""
    if triton_backend is None:
        return {}
    from .backends.triton import launch
    return {f"{kernel} on {device}": dataclasses.asdict(config)
            for (device, kernel), config in launch.chosen_configs().items()}


def compiled_kernels():
    """[{kernel, device, config, registers, local_bytes}] of the kernels this process compiled
    and launched, as the driver reports them: local memory per thread is where registers
    spill, which the static report (docs/kernel_report.md) says each tiling does not, or
    by how much."""
    if triton_backend is None:
        return []
    from .backends.triton import launch
    return [dict(kernel=kernel, device=device, config=dataclasses.asdict(config),
                 precision=precision, width=width, registers=registers, local_bytes=local)
            for (device, kernel, config, precision, width), (registers, local)
            in launch.compiled_resources().items()]


def _config_label(config):
    """A tiling in a few characters: "m64 n32 w4 s2" (block rows and positions, warps, stages)."""
    names = {"block_m": "m", "block_n": "n", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short}{config[key]}" for key, short in names.items() if key in config)


def spill_summary(compiled):
    """One line on the local memory of the compiled kernels ("" when none was compiled)."""
    if not compiled:
        return ""
    spilling = [f"{item['kernel']} {item['local_bytes']} B ({item['precision']} "
                f"{item['width']}: {_config_label(item['config'])})"
                for item in compiled if item["local_bytes"]]
    return (f"local memory (spilled registers) per thread of the {len(compiled)} compiled "
            f"kernels: {', '.join(spilling) if spilling else 'none'}")


def gluon_note(gluon):
    """What a "gluon read" check ran, in a few words: "Gluon forward, dV, dK/dQ", or with the
    kernels that took the plain one instead and why ("; plain forward: needs ...")."""
    ran = [kernel for kernel, reason in gluon.items() if reason is None]
    note = "Gluon " + (", ".join(ran) if ran else "none")
    return note + "".join(f"; plain {kernel}: {reason}" for kernel, reason in gluon.items()
                          if reason is not None)


def table(checks):
    """The checks as text, one line each."""
    lines = [f"{'feature':13s} {'dtype':5s} {'similarity':10s} {'max error':>10s} "
             f"{'bound':>8s}  result"]
    for check in checks:
        worst = max(check.errors.values()) if check.errors else math.nan
        verdict = "ok" if check.passed else f"FAILED {check.failure or ''}".strip()
        if check.gluon is not None:
            verdict += f" ({gluon_note(check.gluon)})"
        lines.append(f"{check.feature:13s} {check.dtype:5s} {check.similarity:10s} "
                     f"{worst:10.2e} {check.bound:8.0e}  {verdict}")
    return "\n".join(lines)


def run(device, quick=False, timing=True, progress=print, save=None, experimental=False):
    """The self-test's report (a dict) for a torch.device (experimental: with the Gluon
    kernels' checks and timings, plan_checks).

    An interruption (Ctrl-C, or SIGINT from a time limit) ends the run early, and the report
    keeps what was done: the checks that ran and the timings that finished, with
    complete=False (a report is what a user attaches to a bug; a cut-off run should still
    have one). save(report), when given, is called with the report so far after every check
    and timing, so that even a run killed outright leaves one.

    Returns (report, the checks that ran)."""
    backend = backend_for(device)
    planned = plan_checks(device, quick, experimental)
    checks = []
    interrupted = False

    def report_so_far(caught, complete):
        return dict(selftest=1, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), backend=backend, **device_report(device),
            checks=[dataclasses.asdict(check) for check in checks],
            configs=chosen_configs(), compiled=compiled_kernels(),
            warnings=sorted({str(w.message) for w in caught
                             if issubclass(w.category, FallbackWarning)
                             or str(w.message).lower().startswith("stm_kernels")}),
            passed=len(checks) == len(planned) and all(check.passed for check in checks),
            complete=complete)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        try:
            for index, check in enumerate(planned):
                run_check(check, device, backend, seed=index)
                checks.append(check)
                progress(f"[{index + 1}/{len(planned)}] {check.feature} {check.dtype} "
                         f"{check.similarity}: {'ok' if check.passed else 'FAILED'}")
                if save is not None:
                    save(report_so_far(caught, complete=False))
        except KeyboardInterrupt:
            interrupted = True
            progress(f"interrupted after {len(checks)} of {len(planned)} checks")
    timed = timing and device.type == "cuda" and not interrupted
    report = report_so_far(caught, complete=not interrupted and not timed)
    if timed:
        progress("timing ...")  # the last check's save already holds the report so far
        try:
            report["matmul_tflops_bf16"] = matmul_tflops(device)
            report["timings"] = timings(device, TIMED_N[:1] if quick else TIMED_N)
            if experimental:
                with gluon_opted_in():
                    report["timings"] += timings(device, TIMED_N[:1] if quick else TIMED_N,
                                                 providers=_gluon_providers)
            if save is not None:
                save(report)
            exact = exact_float32_timings(device, TIMED_N[:1] if quick else TIMED_N)
            report["exact_float32"] = dict(timings=exact, **exact_float32_verdict(
                exact, auto_exact_float32(device)))
            report["complete"] = True
        except KeyboardInterrupt:
            progress("interrupted while timing: the report keeps the timings that finished")
    return report, checks


def auto_exact_float32(device):
    """"triton" or "torch": what backend="auto" reads exact float32 with on the device."""
    if triton_backend is None:
        return "torch"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        from .backends import resolve
        return resolve("auto", torch.empty(0, device=device))
    finally:
        torch.set_float32_matmul_precision(previous)


def timing_table(report):
    if "timings" not in report:
        return ""
    rate = report["matmul_tflops_bf16"]
    width = max(9, *(len(row["provider"]) for row in report["timings"]))
    lines = [f"bf16 matmul: {rate:.0f} TFLOP/s this run", f"{'provider':{width}s} {'pass':8s} "
             f"{'N':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'of matmul':>9s}"]
    for row in report["timings"]:
        if "error" in row:
            lines.append(f"{row['provider']:{width}s} {row['pass_']:8s} {row['N']:7d} "
                         f"{row['error']}")
            continue
        lines.append(f"{row['provider']:{width}s} {row['pass_']:8s} {row['N']:7d} "
                     f"{row['ms']:9.3f} {row['tflops']:8.1f} {row['tflops'] / rate:9.0%}")
    return "\n".join(lines)


def run_arguments(args):
    """Run the self-test for parsed arguments; returns the exit status (1: a wrong result)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    print(f"stm_kernels {__version__} self-test on {device} (backend {backend_for(device)})")
    experimental = getattr(args, "experimental", False)
    if experimental and device.type != "cuda":
        print("--experimental: the Gluon kernels run on sm_90 GPUs only; not checked here")
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = args.json or f"stm_selftest_{device.type}_{stamp}.json"

    def save(report):  # whole or not at all: a kill mid-write keeps the previous report
        with open(f"{path}.part", "w") as file:
            json.dump(report, file, indent=1)
        os.replace(f"{path}.part", path)
    report, checks = run(device, quick=args.quick, timing=not args.no_timing, save=save,
                         experimental=experimental)
    print(table(checks))
    if report.get("timings"):
        print(timing_table(report))
    if report.get("exact_float32"):
        print(exact_float32_line(report["exact_float32"]))
    if report["compiled"]:
        print(spill_summary(report["compiled"]))
    for message in report["warnings"]:
        print(f"warning: {message}")
    save(report)
    failed = sum(not check.passed for check in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks passed; report written to {path}"
          + ("" if not failed else " (attach it to a bug report: see README)"))
    if not report["complete"]:
        print("the self-test was interrupted: the report holds what ran before it stopped")
        return 1 if failed else 130  # 130: the shell's status for a run ended by SIGINT
    return 1 if failed else 0


def main(argv=None):
    """`python -m stm_kernels.selftest`; returns the exit status (1: a wrong result)."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m stm_kernels.selftest",
                                                   description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run_arguments(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
