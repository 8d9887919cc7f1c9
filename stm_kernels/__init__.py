"""stm_kernels: the fused space-time memory read of STM (Oh et al., ICCV 2019) as a torch op.

    from stm_kernels import memory_read, merge_reads
    out = memory_read(query_key, memory_key, memory_value)            # (B, Cv, *Q)
    out, lse = memory_read(q, k_chunk, v_chunk, return_lse=True)       # for merge_reads
    out = memory_read(q, k, v, top_k=30)                               # STCN/XMem top-k read

`python -m stm_kernels.selftest` checks the read on this machine's GPU (docs/kernels.md).
"""
from ._buffers import poison_outputs
from ._version import __version__
from . import topk
from .backends import FallbackWarning
from .backends.naive import naive_memory_read
from .memory_read import memory_read, memory_usage
from .merge import merge_reads
from .options import BACKENDS, DTYPES, SIMILARITIES

__all__ = ["memory_read", "memory_usage", "merge_reads", "naive_memory_read", "poison_outputs",
           "topk", "FallbackWarning", "BACKENDS", "DTYPES", "SIMILARITIES", "__version__"]
