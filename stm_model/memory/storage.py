"""Where a MemoryBank's frames live and how a read reaches them: one strategy per kind of
storage, behind one read.

    OnDevice       storage on the compute device: one fused read over views of it
    Offloaded      storage in (pinned) CPU memory: chunk_frames frames at a time copied to the
                   compute device, the chunks' reads merged exactly by their log-sum-exp
    Sharded(s)     frames spread over the ranks of a process group, each rank's own stored as
                   s stores them: every rank reads its frames, the reads merged across ranks

A strategy reads the first `frames` frames a bank stores through `bank.stored(start, stop)`: the
keys and values of stored frames [start, stop) as (n, C, (stop - start)·h·w) views (an 8-bit
memory: a QuantizedMemory of views each, keys with scales per channel and frame), in the
bank's read_dtype.
"""
from typing import Any, Optional

import torch

from stm_kernels import QuantizedMemory, memory_read, merge_reads


def read_in_storage_dtype(query_key, keys, values, dtype: Optional[torch.dtype] = None,
                          **options):
    """memory_read(query_key, keys, values, **options) in the memory's storage dtype (the
    segmenters' --memory-dtype), or `dtype` (the read dtype of an 8-bit memory, whose chunks
    are QuantizedMemory: required then): the query cast to it, autocast off. Under the
    network's autocast the op would cast the memory to autocast's dtype, as SDPA does: a copy
    of the whole memory per read, at another precision than the one it is stored in."""
    if dtype is None:
        first = keys[0] if isinstance(keys, (list, tuple)) else keys
        if isinstance(first, QuantizedMemory):
            raise ValueError("an 8-bit memory (QuantizedMemory) is read in the dtype given as "
                             "dtype=; got none")
        dtype = first.dtype
    with torch.autocast(query_key.device.type, enabled=False):
        return memory_read(query_key.to(dtype), keys, values, **options)


def storage_tensors(memory) -> list:
    """A bank's storage tensors (MemoryBank's, BatchedMemory's): its keys and values, and an
    8-bit memory's key and value scales (memory.quantized set): what its bytes, copies and
    growth go over."""
    tensors = [memory.keys, memory.values]
    return tensors if memory.quantized is None else tensors + [memory.key_scales,
                                                              memory.value_scales]


def _on(memory, device):
    """A memory argument (a tensor, a QuantizedMemory, or a list of them) copied to device
    (asynchronously from pinned memory)."""
    if isinstance(memory, (list, tuple)):
        return [_on(chunk, device) for chunk in memory]
    if isinstance(memory, torch.Tensor):
        return memory.to(device, non_blocking=True)
    return QuantizedMemory(memory.data.to(device, non_blocking=True),
                           memory.scale.to(device, non_blocking=True))


class OnDevice:
    """Storage on the compute device (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = self.storage_device = device
        self.pinned = False

    def partial_read(self, bank, query_key, frames: int, options: dict):
        """(out, lse) of the first `frames` stored frames (at least one)."""
        keys, values = bank.stored(0, frames)
        return read_in_storage_dtype(query_key, keys, values, return_lse=True,
                                     dtype=bank.read_dtype, **options)

    def read(self, bank, query_key, frames: int, options: dict):
        """The read-out of the first `frames` stored frames."""
        keys, values = bank.stored(0, frames)
        return read_in_storage_dtype(query_key, keys, values, dtype=bank.read_dtype, **options)


class Offloaded:
    """Storage in (pinned) CPU memory, read chunk_frames frames at a time (see the module
    docstring)."""

    def __init__(self, device: torch.device, chunk_frames: int) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1; got {chunk_frames!r}")
        self.device, self.storage_device = device, torch.device("cpu")
        self.chunk_frames = chunk_frames
        self.pinned = torch.cuda.is_available()  # pinned pages: asynchronous copies

    def partial_read(self, bank, query_key, frames: int, options: dict):
        reads = []
        for start in range(0, frames, self.chunk_frames):
            keys, values = bank.stored(start, min(start + self.chunk_frames, frames))
            reads.append(read_in_storage_dtype(query_key, _on(keys, self.device),
                                               _on(values, self.device), return_lse=True,
                                               dtype=bank.read_dtype, **options))
        return merge_reads(*zip(*reads, strict=True))

    def read(self, bank, query_key, frames: int, options: dict):
        return self.partial_read(bank, query_key, frames, options)[0]


class Sharded:
    """Frames spread over the ranks of `group`, this rank's stored by `local` (see the module
    docstring): `frames` is the number this rank holds, possibly none yet."""

    def __init__(self, local: Any, group: Any) -> None:
        self.local, self.group = local, group
        self.device, self.storage_device = local.device, local.storage_device
        self.pinned = local.pinned

    def read(self, bank, query_key, frames: int, options: dict):
        from stm_kernels.distributed import merge_across_ranks
        if frames:
            out, lse = self.local.partial_read(bank, query_key, frames, options)
        else:  # no frame on this rank yet: an empty read (out 0, lse -inf)
            positions = tuple(query_key.shape[2:])
            out = torch.zeros((bank.num_objects, bank.value_dim) + positions,
                              dtype=bank.read_dtype,
                              device=self.device)
            lse = torch.full((bank.num_objects,) + positions, float("-inf"), dtype=torch.float32,
                             device=self.device)
        return merge_across_ranks(out, lse, self.group)[0]
