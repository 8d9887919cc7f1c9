"""The runtime's own launches compiled for a GPU that is not there.

    with compiling_for(TARGETS["sm_80"]) as launches:
        launch.triton_forward(q, k, v, scale, l2)     # tensors on the "meta" device
    launches  ->  [Launch(kernel="forward", config=..., compiled=Resources(...) or error=...)]

`compiling_for(target)` pretends the target's device (stm_kernels' devices.pretend: its
architecture, shared memory and multiprocessors) and replaces the launchers' one launch point
(running.recording) with an offline compile: a candidate whose compile fails, whose shared
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
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from triton.compiler import ASTSource
from triton.runtime.errors import OutOfResources

from stm_kernels.backends.triton import devices, running
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
    instructions store (ptxas' "spill stores"; AMD: the scratch memory per lane);
    local_bytes: the local memory per thread they use (ptxas' stack frame; AMD: scratch), what
    the driver reports at run time and a config's max_local_bytes is held to."""
    registers: int
    spill_bytes: int
    shared_bytes: int
    asm: dict
    warnings: list
    local_bytes: int
    vgpr_spills: int = 0  # AMD: VGPRs spilled (into AGPRs where there is no scratch)
    sgpr_spills: int = 0  # AMD: SGPRs spilled into VGPR lanes (no memory traffic)


KERNEL_NAMES = {"memory_read_fwd_kernel": "forward", "memory_read_merge_kernel": "merge",
                "memory_read_fwd_kernel_8bit": "forward_8bit",
                "memory_read_bwd_kernel_prepare": "prepare",
                "memory_read_bwd_kernel_dv": "dv", "memory_read_bwd_kernel_dkdq": "dkdq",
                "memory_read_bwd_kernel_dq": "dq", "memory_read_topk_kernel": "select",
                "memory_read_topk_merge_kernel": "select_merge",
                "memory_read_usage_kernel": "usage"}


_compiled: dict = {}
# A directory to keep compile results across runs (the search tool's long runs); unset: none.
CACHE_ENV = "STM_KERNEL_REPORT_CACHE"
# Part of every cache key: raised when Resources changes, so that older entries are not read.
RESOURCES_FORMAT = 2


def launch_specialisation(kernel, arguments, options, target):
    """(signature, constexprs, attrs) of kernel(**arguments, **options) as Triton's JIT
    specialises that launch on the target: the JIT's own binder and argument packing with the
    target's backend, so every rule a real launch applies holds here too (16-byte divisibility,
    integers equal to 1 as constants, and on AMD the 32-bit pointer range of tensors whose
    storage is under 2 GB, which turns their loads into buffer loads). Attributes with nothing
    in them are left out. constexprs are keyed by argument path, as the JIT passes them."""
    backend = make_backend(target.gpu_target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, launch_options = binder(**arguments, **options)
    _, signature, constexprs, attrs = kernel._pack_args(backend, dict(options), bound,
                                                        specialization, launch_options)
    return signature, constexprs, {path: attr for path, attr in attrs.items() if attr}


def compile_kernel(kernel, arguments, options, target):
    """Resources of kernel(**arguments) compiled with the launch options (num_warps,
    num_stages, ...) for the target, specialised as the launch would be
    (launch_specialisation; memoised per specialisation, and on disk under
    $STM_KERNEL_REPORT_CACHE, keyed with the kernel sources' fingerprint; a failed compile
    raises its error again from the cache)."""
    signature, constexprs, attrs = launch_specialisation(kernel, arguments, options, target)
    names = [parameter.name for parameter in kernel.params]
    memo = (kernel.__name__, tuple(sorted(signature.items())),
            tuple(sorted((names[path[0]], str(v)) for path, v in constexprs.items())),
            tuple(sorted(attrs)), options["num_warps"], options["num_stages"],
            target.compiled_as)
    extra = tuple(sorted((k, v) for k, v in options.items()
                         if k not in ("num_warps", "num_stages")))
    if extra:  # keys without extra options stay those of the compiles made before them
        memo += extra
    special = tuple(sorted((path, str(attr)) for path, attr in attrs.items()
                           if attr != [["tt.divisibility", 16]]))
    if special:  # likewise: attributes beyond divisibility (AMD's pointer range) join the key
        memo += (("attrs",) + special,)
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
        result = RuntimeError(running.one_line(error))
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
    registers, scratch, vgpr_spills, sgpr_spills = _amd_resources(asm["amdgcn"], target.arch)
    return Resources(registers, scratch, compiled.metadata.shared, asm, [], local_bytes=scratch,
                     vgpr_spills=vgpr_spills, sgpr_spills=sgpr_spills)


# AMD architectures whose VGPRs and AGPRs are one register file: the metadata's .vgpr_count
# already counts both (the AGPRs after the VGPRs), so adding .agpr_count counts them twice.
UNIFIED_VGPR_FILE = ("gfx90a", "gfx942", "gfx950")


def _amd_resources(amdgcn, arch):
    """(registers per lane, scratch bytes per lane, VGPR spills, SGPR spills) from an AMDGPU
    kernel's metadata. Registers: VGPRs and AGPRs, once. Scratch (the private segment) is the
    memory spilled registers use. VGPR spills go to AGPRs where the file has room (no scratch)
    and to scratch otherwise; SGPR spills go to VGPR lanes: neither touches memory by itself."""
    def field(name):
        match = re.search(rf"\.{name}:\s*(\d+)", amdgcn)
        return int(match.group(1)) if match else 0
    registers = field("vgpr_count")
    if arch not in UNIFIED_VGPR_FILE:
        registers += field("agpr_count")
    return (registers, field("private_segment_fixed_size"), field("vgpr_spill_count"),
            field("sgpr_spill_count"))


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
            record.error = running.one_line(error)
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
            raise running.LocalMemoryExceeded(record.error)

    with devices.pretend(target.device), running.recording(executor):
        yield launches
