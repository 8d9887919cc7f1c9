"""The runtime's own launches compiled for a GPU that is not there.

    with compiling_for(TARGETS["sm_80"]) as launches:
        launch.triton_forward(q, k, v, scale, l2)     # tensors on the "meta" device
    launches  ->  [Launch(kernel="forward", config=..., compiled=Resources(...) or error=...)]

`compiling_for(target)` pretends the target's device (stm_kernels' devices.pretend: its
architecture, shared memory and multiprocessors) and replaces the launchers' one launch point
(launch.recording) with an offline compile: a candidate whose compile fails, whose shared
memory exceeds the target's limit or whose local memory (ptxas' stack frame) exceeds its
config's max_local_bytes raises as it would at the first launch on that GPU, so the runtime's
own fallback picks the next candidate. What is recorded is exactly what the runtime
would launch there: grid, arguments, constexprs and the chosen config.

Registers and spills come from the compiler itself: ptxas' own log of the compile Triton runs
(NVIDIA), or the AMDGPU backend's kernel metadata (VGPRs, AGPRs, spill counts and scratch).
"""
import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import re
from typing import Optional

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.errors import OutOfResources

from stm_kernels.backends.triton import devices, launch
from stm_kernels.backends.triton.devices import KIB

TORCH_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for: Triton's GPUTarget and the Device the runtime is told it is
    (architecture name, shared memory per block, multiprocessors)."""
    name: str
    gpus: str
    backend: str
    arch: object
    warp_size: int
    shared_memory: int
    multiprocessors: int
    runtime_arch: Optional[str] = None  # the Device's arch when it differs (generic tables)

    @property
    def compiled_as(self):
        """The target whose compiles this one's are (generic@sm_80 compiles as sm_80)."""
        return self.name.split("@")[-1]

    @property
    def gpu_target(self):
        return GPUTarget(self.backend, self.arch, self.warp_size)

    @property
    def device(self):
        vendor = "nvidia" if self.backend == "cuda" else "amd"
        arch = self.runtime_arch or (f"sm_{self.arch}" if vendor == "nvidia" else self.arch)
        return devices.Device(f"{self.gpus} (offline)", vendor, arch, self.shared_memory,
                              self.multiprocessors)


# Shared memory: each GPU's per-block opt-in limit; multiprocessors: one GPU of the family.
TARGETS = {target.name: target for target in (
    Target("sm_80", "A100, A30", "cuda", 80, 32, 163 * KIB, 108),
    Target("sm_86", "RTX 30, A10, A40", "cuda", 86, 32, 99 * KIB, 84),
    Target("sm_89", "RTX 40, L4, L40S", "cuda", 89, 32, 99 * KIB, 58),
    Target("sm_90", "H100, H200", "cuda", 90, 32, 227 * KIB, 132),
    Target("sm_100", "B200, GB200", "cuda", 100, 32, 227 * KIB, 148),
    Target("sm_120", "RTX 50", "cuda", 120, 32, 99 * KIB, 170),
    Target("gfx90a", "MI210, MI250X", "hip", "gfx90a", 64, 64 * KIB, 104),
    Target("gfx942", "MI300X, MI325X", "hip", "gfx942", 64, 64 * KIB, 304),
    Target("gfx950", "MI350X, MI355X", "hip", "gfx950", 64, 160 * KIB, 256),
    # The generic table (unknown newer NVIDIA GPUs) checked where it must hold: the smallest
    # shared memory of the architectures it stands in for, on the oldest and the newest ISA.
    Target("generic@sm_80", "unknown NVIDIA (as sm_80, 99 KiB)", "cuda", 80, 32, 99 * KIB, 108,
           runtime_arch="sm_110"),
    Target("generic@sm_120", "unknown NVIDIA (as sm_120)", "cuda", 120, 32, 99 * KIB, 170,
           runtime_arch="sm_110"),
)}


@dataclasses.dataclass
class Launch:
    """One recorded launch: the runtime's kernel name ("forward", "dv", ...), the config, the
    grid and its compile (compiled: Resources) or why it failed (error)."""
    kernel: str
    config: object
    grid: tuple
    arguments: dict
    num_warps: int
    num_stages: int
    compiled: Optional["Resources"] = None
    error: Optional[str] = None


@dataclasses.dataclass
class Resources:
    """What the compiler says of one compiled kernel. spill_bytes: the bytes its spill
    instructions store (ptxas' "spill stores"; AMD: spilled registers or scratch);
    local_bytes: the local memory per thread they use (ptxas' stack frame; AMD: scratch), what
    the driver reports at run time and a config's max_local_bytes is held to."""
    registers: int
    spill_bytes: int
    shared_bytes: int
    asm: dict
    warnings: list
    local_bytes: int


KERNEL_NAMES = {"memory_read_fwd_kernel": "forward", "memory_read_merge_kernel": "merge",
                "memory_read_bwd_kernel_dv": "dv", "memory_read_bwd_kernel_dkdq": "dkdq",
                "memory_read_bwd_kernel_dq": "dq", "memory_read_topk_kernel": "select",
                "memory_read_usage_kernel": "usage"}


def signature_of(kernel, arguments):
    """(signature, constexprs, attrs) for triton.compile of kernel(**arguments), specialised
    as Triton's JIT specialises a launch: tensors as pointers of their dtype (16-byte aligned,
    as fresh allocations are), an integer equal to 1 as a constant, other integers i32 (i64
    from 2**31) with divisibility 16 when they are multiples of 16, floats fp32; the kernel's
    constexpr parameters as constants."""
    signature, constexprs, attrs = {}, {}, {}
    for index, parameter in enumerate(kernel.params):
        name, value = parameter.name, arguments[parameter.name]
        if parameter.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: no signature type for {name}={value!r}")
    return signature, constexprs, attrs


_compiled: dict = {}
# A directory to keep compile results across runs (the search tool's long runs); unset: none.
CACHE_ENV = "STM_KERNEL_REPORT_CACHE"
# Part of every cache key: raised when Resources changes, so that older entries are not read.
RESOURCES_FORMAT = 2


def compile_kernel(kernel, arguments, options, target):
    """Resources of kernel(**arguments) compiled with the launch options (num_warps,
    num_stages, ...) for the target (memoised per specialisation, and on disk under
    $STM_KERNEL_REPORT_CACHE, keyed with the kernel sources' fingerprint; a failed compile
    raises its error again from the cache)."""
    signature, constexprs, attrs = signature_of(kernel, arguments)
    memo = (kernel.__name__, tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)), options["num_warps"], options["num_stages"],
            target.compiled_as)
    extra = tuple(sorted((k, v) for k, v in options.items()
                         if k not in ("num_warps", "num_stages")))
    if extra:  # keys without extra options stay those of the compiles made before them
        memo += extra
    if memo not in _compiled:
        _compiled[memo] = _cached(memo, lambda: _compile(kernel, signature, constexprs, attrs,
                                                         options, target))
    result = _compiled[memo]
    if isinstance(result, Exception):
        raise result
    return result


def _cached(memo, compile_):
    directory = os.environ.get(CACHE_ENV)
    path = None
    if directory:
        from tools.kernel_report.report import KERNEL_SOURCES, fingerprint
        # the memo holds every constexpr and option, so only the kernels' own sources count
        key = repr((fingerprint(KERNEL_SOURCES), RESOURCES_FORMAT, memo))
        key = hashlib.sha256(key.encode()).hexdigest()
        path = os.path.join(directory, key + ".pickle")
        if os.path.exists(path):
            with open(path, "rb") as file:
                return pickle.load(file)
    try:
        result = compile_()
    except Exception as error:  # kept as the result: the same compile fails the same way
        result = RuntimeError(launch.one_line(error))
    if path:
        os.makedirs(directory, exist_ok=True)
        with open(path + ".tmp", "wb") as file:
            pickle.dump(result, file)
        os.replace(path + ".tmp", path)
    return result


def _compile(kernel, signature, constexprs, attrs, options, target):
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # ptxas' own -v log of the compile (Triton prints it); always compile, so it is printed.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=target.gpu_target, options=dict(options))
    asm = {key: value for key, value in compiled.asm.items() if isinstance(value, str)}
    if target.backend == "cuda":
        text = log.getvalue()
        def number(pattern):
            match = re.search(pattern, text)
            return int(match.group(1)) if match else 0
        return Resources(number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
                         compiled.metadata.shared, asm,
                         sorted(set(re.findall(r"warning : (.*)", text))),
                         local_bytes=number(r"(\d+) bytes stack frame"))
    registers, spilled, scratch = _amd_resources(asm["amdgcn"])
    return Resources(registers, spilled, compiled.metadata.shared, asm, [], local_bytes=scratch)


def _amd_resources(amdgcn):
    """(VGPRs + AGPRs, spilled bytes, scratch bytes) from an AMDGPU kernel's metadata: spill
    counts are in registers of 4 bytes per lane; scratch (private segment) catches any other
    stack use."""
    def field(name):
        match = re.search(rf"\.{name}:\s*(\d+)", amdgcn)
        return int(match.group(1)) if match else 0
    registers = field("vgpr_count") + field("agpr_count")
    spilled = 4 * (field("vgpr_spill_count") + field("sgpr_spill_count"))
    scratch = field("private_segment_fixed_size")
    return registers, max(spilled, scratch), scratch


@contextlib.contextmanager
def compiling_for(target, only=None):
    """Record every launch the runtime makes in the block, compiled for target (see the
    module docstring); yields the list the Launches are appended to. only: the runtime names
    of the kernels to compile (the others are recorded, not compiled: they run as if they
    had)."""
    launches = []

    def executor(kernel, grid, arguments, config, options):
        name = KERNEL_NAMES[kernel.__name__]
        if name == "dkdq" and not arguments["ATOMIC_DQ"]:
            name = "dk"  # the deterministic backward's, with a table entry of its own
        record = Launch(name, config, tuple(grid), arguments, config.num_warps,
                        config.num_stages)
        launches.append(record)
        if only is not None and record.kernel not in only:
            return
        try:
            record.compiled = compile_kernel(kernel, arguments, options, target)
        except Exception as error:
            record.error = launch.one_line(error)
            raise
        if record.compiled.shared_bytes > target.shared_memory:
            record.error = (f"OutOfResources: shared memory {record.compiled.shared_bytes} > "
                            f"{target.shared_memory}")
            raise OutOfResources(record.compiled.shared_bytes, target.shared_memory,
                                 "shared memory")
        budget, used = config.max_local_bytes, record.compiled.local_bytes
        if budget is not None and used > budget:
            record.error = (f"LocalMemoryExceeded: {used} B of local memory per thread > "
                            f"{budget} B")
            raise launch.LocalMemoryExceeded(record.error)

    with devices.pretend(target.device), launch.recording(executor):
        yield launches
