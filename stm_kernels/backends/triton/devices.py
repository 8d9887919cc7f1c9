"""What the launchers know of a device: its vendor, architecture, shared memory and size.

`describe(device)` reads it off the device itself (torch.cuda.get_device_properties: compute
capability or ROCm's gcnArchName, the opt-in shared memory per block, the multiprocessor
count); under TRITON_INTERPRET=1 it is the CPU interpreter. The offline tools describe a GPU
that is not there with `pretend(Device(...))`, which makes every launcher plan, pick tilings
and compile for that device.
"""
import contextlib
import dataclasses
import os
from typing import Optional

import torch

# Triton decides at decoration time whether kernels are interpreted, so this is read once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

KIB = 1024


@dataclasses.dataclass(frozen=True)
class Device:
    """A device as the launchers see it.

    vendor: "nvidia", "amd" or "interpreter"; arch: "sm_90", "gfx942", ... (or "interpreter");
    shared_memory: bytes of shared memory one block may use (the opt-in limit Triton checks
    at launch); multiprocessors: SMs (NVIDIA) or compute units (AMD), to size the grid."""
    name: str
    vendor: str
    arch: str
    shared_memory: int
    multiprocessors: int
    # the fields' hash, made once: every read hashes its device in its kept launches' keys
    _hash: int = dataclasses.field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.name, self.vendor, self.arch,
                                                 self.shared_memory, self.multiprocessors)))

    def __hash__(self):
        return self._hash

    @property
    def capability(self) -> Optional[tuple[int, int]]:
        """(major, minor) of an NVIDIA architecture, else None."""
        if self.vendor != "nvidia":
            return None
        digits = self.arch.removeprefix("sm_")
        return int(digits[:-1]), int(digits[-1])

    def __str__(self):
        return f"{self.name} ({self.arch})"


# The interpreter: a pretend device small enough that the memory-split paths run.
INTERPRETER = Device("Triton interpreter (CPU)", "interpreter", "interpreter", 1 << 30, 4)

_pretended: list = []


@contextlib.contextmanager
def pretend(device: Device):
    """Within the block, every launch plans for `device` whatever the tensors' device (the
    offline tools pair it with tensors on the "meta" device and a recording executor)."""
    _pretended.append(device)
    try:
        yield device
    finally:
        _pretended.pop()


def describe(device: torch.device) -> Device:
    """The Device a tensor on `device` runs on."""
    if _pretended:
        return _pretended[-1]
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_device(device.index if device.index is not None else torch.cuda.current_device())


_described: dict = {}


def _cuda_device(index):
    if index not in _described:
        properties = torch.cuda.get_device_properties(index)
        shared = getattr(properties, "shared_memory_per_block_optin", 0) or \
            properties.shared_memory_per_block
        if torch.version.hip is not None:
            vendor, arch = "amd", properties.gcnArchName.split(":")[0]
        else:
            vendor, arch = "nvidia", f"sm_{properties.major}{properties.minor}"
        _described[index] = Device(properties.name, vendor, arch, shared,
                                   properties.multi_processor_count)
    return _described[index]
