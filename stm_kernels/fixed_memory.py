"""A memory of fixed capacity whose current lengths live on the device: one CUDA graph of a read
serves every memory length up to the capacity.

    memory = FixedCapacityMemory.empty(B, Ck, Cv, capacity, dtype=torch.bfloat16, device="cuda")
    memory.append(keys, values)        # (B, Ck, n), (B, Cv, n): written at each object's length
    out = memory.read(query_key)       # memory_read over the first lengths[b] positions

The storage (B, Ck, capacity) and (B, Cv, capacity) and the lengths (B,) int64 keep their
addresses for the object's life, so a graph captured around read() replays at whatever lengths
they hold then. The lengths are checked where they are set, on the host, where their values are
known (append, set_lengths; capacity bounds them): the read then checks that recorded range
instead of reading the lengths back from the device, a synchronisation a capture cannot contain
(stm_kernels.inputs.known_lengths).
"""
from typing import Any, Sequence, Union

import torch

from .inputs import known_lengths, known_range
from .memory_read import memory_read

Lengths = Union[int, Sequence[int]]


class FixedCapacityMemory:
    """keys (B, Ck, capacity) and values (B, Cv, capacity) storage with per-object lengths
    (B,) int64 on the storage's device (see the module docstring).

    Args:
        keys, values: the storage, (B, Ck, *M) and (B, Cv, *M) on one device with the same
            memory layout *M (flattened to capacity = prod(M) positions, a view where the
            strides allow). Positions past an object's length are never read and may hold
            anything (unused capacity, NaN).
        lengths: each object's current length (an int for all of them), in [0, capacity].

    Contract: change the lengths only through append and set_lengths, which record their
    values on the host. An in-place change made to `lengths` behind the object's back is
    noticed (the tensor's version counter): reads then check the tensor itself again (a
    device synchronisation), and refuse it under CUDA graph capture. A read needs every
    length to be at least 1 (an object with an empty memory reads nothing).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: Lengths = 0) -> None:
        for name, tensor in (("keys", keys), ("values", values)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3:
                raise ValueError(f"{name} must be a (B, C, *M) tensor; got "
                                 f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        if keys.shape[0] != values.shape[0] or keys.shape[2:] != values.shape[2:] or \
                keys.device != values.device:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must "
                             "share objects B and memory layout *M, on one device; got "
                             f"{keys.device} and {values.device}")
        self.keys = keys if keys.dim() == 3 else keys.flatten(2)
        self.values = values if values.dim() == 3 else values.flatten(2)
        # a tensor outside inference mode: it tracks versions (known_lengths)
        with torch.inference_mode(False):
            self.lengths = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
        self._host = (0,) * self.batch
        known_lengths(self.lengths, 0, 0)
        self.set_lengths(lengths)

    @classmethod
    def empty(cls, batch: int, key_channels: int, value_channels: int, capacity: int, *,
              dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
              fill: Any = None) -> "FixedCapacityMemory":
        """An empty memory (lengths 0) of `capacity` positions per object; fill: a value for
        the whole storage (e.g. float("nan") to show that the unused capacity is never read),
        None: left uninitialised."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer; got {capacity!r}")
        keys = torch.empty(batch, key_channels, capacity, dtype=dtype, device=device)
        values = torch.empty(batch, value_channels, capacity, dtype=dtype, device=device)
        if fill is not None:
            keys.fill_(fill)
            values.fill_(fill)
        return cls(keys, values)

    @property
    def batch(self) -> int:
        """B, the objects."""
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        """Positions per object the storage holds."""
        return self.keys.shape[2]

    @property
    def host_lengths(self) -> tuple:
        """The lengths as the host set them (no device read)."""
        return self._host

    def set_lengths(self, lengths: Lengths) -> None:
        """Set every object's length (an int: all of them) in place, checked here: ValueError
        unless B integers in [0, capacity]. No read of the device; on a GPU, asynchronous
        (an equal length for all is a fill, else one small host-to-device copy)."""
        if isinstance(lengths, torch.Tensor):
            raise TypeError("lengths must be Python integers (known on the host), not a "
                            "tensor: a tensor's values would be read back to be checked")
        values = (lengths,) * self.batch if isinstance(lengths, int) else tuple(lengths)
        if len(values) != self.batch or any(
                isinstance(value, bool) or not isinstance(value, int) or
                not 0 <= value <= self.capacity for value in values):
            raise ValueError(f"lengths must be {self.batch} integers in [0, capacity="
                             f"{self.capacity}] (or one for all objects); got {lengths!r}")
        if values == self._host and self._recorded():
            return
        if len(set(values)) == 1:
            self.lengths.fill_(values[0])
        else:
            self.lengths.copy_(torch.tensor(values, dtype=torch.int64), non_blocking=True)
        self._host = values
        known_lengths(self.lengths, min(values), max(values))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write n more positions per object after each one's current length and add n to
        the lengths: keys (B, Ck, *P), values (B, Cv, *P) with n = prod(P) positions (one
        memory frame (B, C, h, w), say), cast to the storage's dtype and device. ValueError,
        nothing written, when an object's length would pass the capacity."""
        keys, values = keys.flatten(2), values.flatten(2)
        expected = ((self.batch, self.keys.shape[1]), (self.batch, self.values.shape[1]))
        if (tuple(keys.shape[:2]), tuple(values.shape[:2])) != expected or \
                keys.shape[2] != values.shape[2]:
            raise ValueError(f"append expects keys (B={self.batch}, Ck={expected[0][1]}, *P) and "
                             f"values (B, Cv={expected[1][1]}, *P); got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        n = keys.shape[2]
        if max(self._host) + n > self.capacity:
            raise ValueError(f"append of {n} positions passes the capacity {self.capacity} "
                             f"(lengths {list(self._host)}): grow the memory (a larger "
                             "FixedCapacityMemory) first")
        starts = sorted(set(self._host))
        for start in starts:  # one slice write per distinct length (one when they are equal)
            rows = [b for b, length in enumerate(self._host) if length == start]
            if len(rows) == self.batch:
                self.keys[:, :, start:start + n] = keys
                self.values[:, :, start:start + n] = values
            else:
                for b in rows:
                    self.keys[b, :, start:start + n] = keys[b]
                    self.values[b, :, start:start + n] = values[b]
        self.set_lengths([length + n for length in self._host])

    def read(self, query_key: torch.Tensor, **options: Any) -> Any:
        """memory_read(query_key, keys, values, memory_lengths=lengths, **options): each object
        reads its first lengths[b] positions, checked on the host (no device synchronisation;
        safe under CUDA graph capture with backend "triton" or "naive")."""
        return memory_read(query_key, self.keys, self.values, memory_lengths=self.lengths,
                           **options)

    def _recorded(self):
        return known_range(self.lengths) == (min(self._host), max(self._host))
