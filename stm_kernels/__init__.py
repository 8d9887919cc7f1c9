"""stm_kernels: the fused space-time memory read of STM (Oh et al., ICCV 2019) as a torch op.

    from stm_kernels import memory_read, merge_reads
    out = memory_read(query_key, memory_key, memory_value)            # (B, Cv, *Q)
    out, lse = memory_read(q, k_chunk, v_chunk, return_lse=True)       # for merge_reads
    out = memory_read(q, k, v, top_k=30)                               # STCN/XMem top-k read
    plan = prepare_read(q, k, v); out = plan.run(q, k, v)              # planned once, run many

`python -m stm_kernels.selftest` checks the read on this machine's GPU (docs/kernels.md).

The names below are imported on first use (PEP 562), so that importing a light submodule
(stm_kernels.options) does not import torch and Triton.
"""
from types import ModuleType
from typing import TYPE_CHECKING

from ._lazy_imports import import_module
from ._version import __version__

# name -> the submodule that defines it
_EXPORTS = {
    "memory_read": "memory_read", "memory_usage": "memory_read", "merge_reads": "merge",
    "naive_memory_read": "backends.naive", "poison_outputs": "_buffers",
    "FallbackWarning": "backends", "BACKENDS": "options", "DTYPES": "options",
    "SIMILARITIES": "options", "FixedCapacityMemory": "fixed_memory",
    "prepare_read": "prepared", "PreparedRead": "prepared", "QuantizedMemory": "quantized",
}

__all__ = ["memory_read", "memory_usage", "merge_reads", "naive_memory_read", "poison_outputs",
           "prepare_read", "PreparedRead", "topk", "FallbackWarning", "BACKENDS", "DTYPES",
           "SIMILARITIES", "FixedCapacityMemory", "QuantizedMemory", "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see (the same names, imported eagerly)
    from . import topk
    from ._buffers import poison_outputs
    from .backends import FallbackWarning
    from .backends.naive import naive_memory_read
    from .fixed_memory import FixedCapacityMemory
    from .memory_read import memory_read, memory_usage
    from .merge import merge_reads
    from .options import BACKENDS, DTYPES, SIMILARITIES
    from .prepared import PreparedRead, prepare_read
    from .quantized import QuantizedMemory


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}", f"{__name__}.{name}"),
                        name)
    elif name == "topk":
        value = import_module(f"{__name__}.topk", f"{__name__}.topk")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    if isinstance(globals().get("memory_read"), ModuleType):
        # the submodule stm_kernels.memory_read, bound here by the import system when it was
        # first imported for another name: the op of that name is the package's attribute
        globals()["memory_read"] = globals()["memory_read"].memory_read
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
