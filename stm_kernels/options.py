"""The read's options, as types (memory_read's signature) and as the tuples every CLI and
benchmark takes its choices from."""
from typing import Literal, get_args

import torch

Backend = Literal["auto", "triton", "torch", "naive"]
Similarity = Literal["dot", "l2", "xmem"]
BACKENDS: tuple[str, ...] = get_args(Backend)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
# Floating-point dtypes by the short names the CLI, configs and benchmarks use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
