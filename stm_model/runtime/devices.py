"""Device names, dtype options and peak memory, shared by the CLI, the segmenters, the demo and
the benchmarks."""
import resource
from typing import Optional, Union

import torch

from stm_kernels.options import DTYPES


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device option: "auto" is CUDA when present, else CPU.
    ValueError (naming the option's value) for a name torch does not know, a device this
    machine lacks, or a device type other than cpu and cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: unknown device (use auto, cpu, cuda or cuda:N)") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA's allocator peak on a GPU, the process's peak resident set on
    CPU (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def autocast_is_slow(device: torch.device, amp: str) -> bool:
    """Whether autocast in `amp` ("bf16", "fp16") runs slower than float32 on `device`: on a
    CPU without native matrix instructions for that dtype (oneDNN's check), where autocast
    emulates it (figures: bench/NOTES.md)."""
    if device.type != "cpu":
        return False
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[amp]
    try:
        return not getattr(torch.ops.mkldnn, check)()
    except (AttributeError, RuntimeError):  # a build without the check: fp16 is the slow one
        return amp == "fp16"


# a dtype by name ("fp32", "fp16", "bf16"), a torch.dtype, or None (the default)
DtypeName = Union[str, torch.dtype, None]

_DTYPE_OPTIONS: dict = {None: None, **DTYPES, **{dtype: dtype for dtype in DTYPES.values()}}


AUTO = "auto"  # a dtype chosen for the device (memory_dtype_option, amp_dtype_option)


def memory_dtype_option(value: DtypeName, device: torch.device, model_dtype: torch.dtype,
                        amp_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The memory's storage dtype for a memory_dtype option: "auto" is bf16 on a CPU with bf16
    dot products, a float32 model and no autocast other than bf16's (the read's products then
    run at twice the float32 rate, and the memory takes half the bytes; the masks are the
    same: docs/performance.md, memory-dtype), else the model's dtype; None is the model's
    dtype; anything else as dtype_option."""
    if value == AUTO:
        from stm_kernels.backends import cpu_features
        bf16 = (device.type == "cpu" and model_dtype == torch.float32
                and amp_dtype in (None, torch.bfloat16) and cpu_features.bf16_dot_products())
        return torch.bfloat16 if bf16 else model_dtype
    try:
        return dtype_option("memory_dtype", value) or model_dtype
    except ValueError:
        raise ValueError(f"memory_dtype must be one of {', '.join(DTYPES)}, {AUTO} (or a "
                         f"torch dtype); got {value!r}") from None


def amp_dtype_option(value: DtypeName, device: torch.device,
                     model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The network's autocast dtype for an amp_dtype option (None: no autocast). "auto" is
    bf16 on a CPU with bf16 dot products (cpu_features.bf16_dot_products) and a float32 model,
    where the network runs faster with the same J&F (docs/performance.md, the network in bf16
    autocast), else no autocast: on CUDA too, where bf16 autocast has not been measured against
    float32 yet. "fp32" (torch.float32) and None are no autocast; "fp16" and "bf16" (or those
    torch dtypes) are autocast in that dtype, whatever the device. ValueError naming amp_dtype
    for anything else."""
    if value == AUTO:
        from stm_kernels.backends import cpu_features
        bf16 = (device.type == "cpu" and model_dtype == torch.float32
                and cpu_features.bf16_dot_products())
        return torch.bfloat16 if bf16 else None
    try:
        dtype = dtype_option("amp_dtype", value)
    except ValueError:
        raise ValueError(f"amp_dtype must be one of {AUTO}, {', '.join(DTYPES)} (or a torch "
                         f"dtype); got {value!r}") from None
    return None if dtype == torch.float32 else dtype


def dtype_option(name: str, value: DtypeName) -> Optional[torch.dtype]:
    """The torch dtype of a dtype option (None stays None); ValueError naming the option for
    anything but fp32, fp16, bf16 or those torch dtypes."""
    try:
        return _DTYPE_OPTIONS[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)} (or a torch dtype); got "
                         f"{value!r}") from None
