"""The read's options, as types (memory_read's signature) and as the tuples every CLI and
benchmark takes its choices from. Importing this module does not import torch (`stm --help`
builds its parsers from it): DTYPES, the torch dtypes, is made on first use."""
from typing import Literal, get_args

Backend = Literal["auto", "triton", "torch", "naive"]
Similarity = Literal["dot", "l2", "xmem"]
BACKENDS: tuple[str, ...] = get_args(Backend)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
# The short names of the floating-point dtypes the CLI, configs and benchmarks use.
DTYPE_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")


def __getattr__(name: str):
    """DTYPES: {short name: torch dtype} for DTYPE_NAMES (torch imported here, not above)."""
    if name == "DTYPES":
        import torch
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        globals()["DTYPES"] = dtypes
        return dtypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
