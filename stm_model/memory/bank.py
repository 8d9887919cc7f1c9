"""Key/value memory of a long video, stored the way the fused read wants it.

Storage per bank: keys (n, Ck, capacity, h·w) and values (n, Cv, capacity, h·w), where n is the
number of objects that share this memory. A read views the first T frames as (n, C, T·h·w)
without copying; capacity is a multiple of 16 frames so that the channel stride is 16-aligned
(vectorised asynchronous loads in the kernel).

Schedule (official STM): permanent frames (the first frame, every mem_every-th frame, annotated
frames) plus one temporary slot for the previous frame, overwritten at every step.

Growth: capacity doubles when full (amortised O(1) per frame, no re-concatenation);
reserve(frames) grows ahead of that. remove_objects(rows) drops objects' rows (one copy).

Eviction (only with max_frames): when a permanent frame would leave no room for the temporary
slot, the oldest permanent frame other than the bank's first frame is overwritten (FIFO).
The read is a softmax over all memory positions, so the order of frames in storage does not
matter.

8-bit storage (dtype torch.int8 or torch.float8_e4m3fn: the segmenters' memory_dtype "int8",
"fp8"): each frame is quantised as it is added (stm_kernels.QuantizedMemory.quantize), keys
with one float32 scale per object, channel and frame (key_scales (n, Ck, capacity, 1)), values
with one per object and position (value_scales (n, 1, capacity, h·w)); no full-precision copy
is kept. A read hands memory_read one QuantizedMemory per argument over the T frames it sees,
views of the storage: keys (n, Ck, T, h·w) with scales per channel and frame (the axis
"channel_frame", scale (n, Ck, T, 1)), values (n, Cv, T, h·w) per position, read in
read_dtype in one call (the fused 8-bit kernel on CUDA, the torch backend's chunks on a
CPU).

Storage and reads (stm_model.memory.storage): on the compute device, one fused read over views
of the storage (or, for a CUDA graph, fixed_capacity(): the whole storage with each object's
length on the device, one graph per capacity); offloaded (offload=True), storage in (pinned)
CPU memory read chunk_frames frames at a time on the compute device, the chunks merged exactly
with merge_reads; sharded, below.

Sharding (shard_memory=True, under torch.distributed): the memory is spread over the ranks of
shard_group (default: all ranks). Every rank runs the same schedule (the same frames, in the
same order) and stores only the frames whose slot s has s % world_size == rank (round-robin:
rank r holds slots r, r + W, ...; the temporary previous frame, in slot `permanent`, lies on
rank permanent % W; an evicted slot is refilled on the same rank). Each rank reads its own
frames as its storage does (on the device or offloaded), and the partial reads are merged
across ranks (stm_kernels.distributed.merge_across_ranks): every rank gets the read over the
whole memory. Each rank stores about 1/W of the memory; a rank may hold no frame yet (an
empty shard).
"""
from typing import Any, Optional, Sequence, Union

import torch

from stm_kernels import FixedCapacityMemory, QuantizedMemory

from stm_model.memory.schedule import FrameSlots
from stm_model.memory.storage import Offloaded, OnDevice, Sharded, storage_tensors

_ALIGN_FRAMES = 16
# 8-bit storage dtypes -> QuantizedMemory's format names
QUANTIZED_DTYPES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


class MemoryBank:
    """Memory of n objects that entered the video together (see the module docstring).

    Args:
        num_objects, key_dim, value_dim: n, Ck and Cv.
        height, width: a frame's stride-16 feature size (h, w).
        dtype, device: the storage dtype (a float dtype, or torch.int8 / torch.float8_e4m3fn
            for 8-bit storage with scales), and the device reads run on.
        read_dtype: the dtype an 8-bit memory is read in (the query's and the read-out's;
            default float32); a floating-point storage is read in its own dtype (read_dtype
            None or equal to it).
        max_frames: bound on the frames held (FIFO eviction); None: unbounded.
        offload, chunk_frames: storage in CPU memory, read chunk_frames frames at a time.
        initial_capacity: frames allocated up front without max_frames (with it: max_frames;
            rounded up to 16, this rank's share when sharded); doubled when full.
        shard_memory, shard_group: spread the frames over the ranks of shard_group.
    """

    def __init__(self, num_objects: int, key_dim: int, value_dim: int, height: int,
                 width: int, *, dtype: torch.dtype = torch.float32,
                 read_dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device] = "cpu", max_frames: Optional[int] = None,
                 offload: bool = False, chunk_frames: int = 64,
                 initial_capacity: int = _ALIGN_FRAMES, shard_memory: bool = False,
                 shard_group: Optional[Any] = None) -> None:
        self.slots = FrameSlots(max_frames)  # checks max_frames
        self.quantized = QUANTIZED_DTYPES.get(dtype)  # "int8", "fp8" or None
        if self.quantized is None and read_dtype not in (None, dtype):
            raise ValueError(f"read_dtype applies to an 8-bit memory (dtype torch.int8 or "
                             f"torch.float8_e4m3fn); a {dtype} memory is read in {dtype}")
        if self.quantized is not None and shard_memory:
            raise ValueError(f"shard_memory does not take an 8-bit memory (memory_dtype "
                             f"{self.quantized}) yet; use a floating-point memory_dtype")
        self.read_dtype = read_dtype or (torch.float32 if self.quantized else dtype)
        self.shard_memory, self.shard_group = bool(shard_memory), shard_group
        self.shard_rank, self.shard_count = _shard_of(shard_memory, shard_group)
        self.num_objects, self.key_dim, self.value_dim = num_objects, key_dim, value_dim
        self.size = (height, width)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_frames, self.offload, self.chunk_frames = max_frames, offload, chunk_frames
        local = Offloaded(self.device, chunk_frames) if offload else OnDevice(self.device)
        self.storage = Sharded(local, shard_group) if shard_memory else local
        self.storage_device = self.storage.storage_device
        capacity = initial_capacity if max_frames is None else max_frames
        capacity = -(-capacity // self.shard_count)  # this rank's share of the slots
        self.keys: Any = None  # (n, Ck, capacity, h·w) storage, allocated below
        self.values: Any = None
        self.key_scales: Any = None  # 8-bit storage: (n, Ck, capacity, 1) float32
        self.value_scales: Any = None  # 8-bit storage: (n, 1, capacity, h·w) float32
        self._fixed: Optional[FixedCapacityMemory] = None  # fixed_capacity(), per storage
        self._allocate(_round_up(capacity, _ALIGN_FRAMES))

    @property
    def num_frames(self) -> int:
        """Frames a read sees: the permanent ones plus the temporary previous frame."""
        return self.slots.num_frames

    @property
    def permanent(self) -> int:
        """Permanent frames, in slots [0, permanent)."""
        return self.slots.permanent

    @property
    def slot_frames(self) -> list[int]:
        """Video frame index held by each occupied slot."""
        return self.slots.slot_frames

    @property
    def local_frames(self) -> int:
        """Frames stored on this rank (num_frames without sharding)."""
        return self._local_count(self.num_frames)

    @property
    def capacity(self) -> int:
        """Frames this rank's storage holds before it grows."""
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Storage bytes on this rank (keys and values, an 8-bit memory's scales included,
        capacity included): what is set aside, held frames or not."""
        return sum(tensor.nbytes for tensor in self._tensors())

    @property
    def held_bytes(self) -> int:
        """Bytes of the frames this rank holds (local_frames · bytes_per_frame): what the
        memory takes, without the capacity set aside for frames to come."""
        return self.local_frames * self.bytes_per_frame

    @property
    def bytes_per_frame(self) -> int:
        """Storage bytes of one memory frame (all objects, keys and values, scales
        included)."""
        return self.nbytes // self.capacity

    def memory_views(self) -> tuple[Any, Any]:
        """(keys (n, Ck, T·h·w), values (n, Cv, T·h·w)): the T frames a read sees, as views
        of the storage (what read() passes to memory_read; not for offloaded or sharded
        memory, whose reads go chunk by chunk or across ranks). An 8-bit memory: two
        QuantizedMemory, keys (n, Ck, T, h·w) with scales per channel and frame, values
        (n, Cv, T, h·w) per position."""
        if not isinstance(self.storage, OnDevice):
            raise RuntimeError("memory_views() needs the whole memory on the compute device "
                               "(not offload or shard_memory); use read()")
        return self.stored(0, self.num_frames)

    def fixed_capacity(self) -> FixedCapacityMemory:
        """The whole storage as a FixedCapacityMemory (keys (n, Ck, capacity·h·w), values
        (n, Cv, capacity·h·w), views) whose lengths (n,) on the device are the frames a read
        sees, num_frames·h·w for every object, set on the host here (no device read). The
        same object, storage and lengths tensors until the storage is reallocated (growth,
        remove_objects): what a CUDA graph of the read holds, one per capacity. Not for
        offloaded or sharded memory."""
        if not isinstance(self.storage, OnDevice):
            raise RuntimeError("fixed_capacity() needs the whole memory on the compute device "
                               "(not offload or shard_memory); use read()")
        if self.quantized is not None:
            raise RuntimeError(f"fixed_capacity() does not take an 8-bit memory (memory_dtype "
                               f"{self.quantized}): FixedCapacityMemory holds tensors; use "
                               "read()")
        if self._fixed is None:
            self._fixed = FixedCapacityMemory(self.keys, self.values)
        self._fixed.set_lengths(self.num_frames * self.size[0] * self.size[1])
        return self._fixed

    def stored(self, start: int, stop: int) -> tuple[Any, Any]:
        """(keys (n, Ck, T·h·w), values (n, Cv, T·h·w)) of the frames this rank stores in
        slots [start, stop), as views of the storage (what the storage strategies read); an
        8-bit memory: two QuantizedMemory of views, keys (n, Ck, T, h·w) with scales per
        channel and frame (n, Ck, T, 1), values (n, Cv, T, h·w) with scales per position
        (n, 1, T, h·w): one memory each, read in one call."""
        if self.quantized is None:
            return (self.keys[:, :, start:stop].flatten(2),
                    self.values[:, :, start:stop].flatten(2))
        return (QuantizedMemory(self.keys[:, :, start:stop], self.key_scales[:, :, start:stop]),
                QuantizedMemory(self.values[:, :, start:stop],
                                self.value_scales[:, :, start:stop]))

    def as_stored(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[Any, Any]:
        """One frame's keys (n, Ck, h·w) and values (n, Cv, h·w) as this bank stores a frame
        (cast to its dtype; an 8-bit memory: quantised, two QuantizedMemory), on the compute
        device: a memory frame read beside the bank's memory_views() without being stored."""
        if self.quantized is None:
            return keys.to(self.device, self.dtype), values.to(self.device, self.dtype)
        return (QuantizedMemory.quantize(keys.to(self.device), self.quantized, axis="channel"),
                QuantizedMemory.quantize(values.to(self.device), self.quantized,
                                         axis="position"))

    def reserve(self, frames: int) -> None:
        """Grow the storage (doubling, as add does) until it holds `frames` frames on this rank;
        every stored frame is kept."""
        capacity = self.capacity
        while capacity < frames:
            capacity = _round_up(2 * capacity, _ALIGN_FRAMES)
        if capacity > self.capacity:
            self._allocate(capacity, kept=self.local_frames)

    def remove_objects(self, rows: Sequence[int]) -> None:
        """Drop the memory of the objects at `rows` (indices in [0, num_objects), not all of
        them: drop the bank instead). The schedule and the other objects' frames stay."""
        rows = sorted({int(row) for row in rows})
        if not rows or rows[0] < 0 or rows[-1] >= self.num_objects:
            raise ValueError(f"rows must be object indices in [0, {self.num_objects}); got "
                             f"{rows}")
        kept = [row for row in range(self.num_objects) if row not in rows]
        if not kept:
            raise ValueError("remove_objects would leave the bank without objects; drop the "
                             "bank instead")
        index = torch.tensor(kept, device=self.storage_device)
        pin = self.storage.pinned
        # index_select copies into new contiguous storage: same layout, same capacity
        self._set_tensors(*(
            tensor.index_select(0, index).pin_memory() if pin else tensor.index_select(0, index)
            for tensor in self._tensors()))
        self.num_objects = len(kept)

    def add(self, keys: torch.Tensor, values: torch.Tensor, permanent: bool,
            frame_index: Optional[int] = None) -> None:
        """Store one frame: keys (n, Ck, h, w), values (n, Cv, h, w). The previous temporary
        frame is dropped; permanent=False makes this frame the new temporary one."""
        self._check(keys, values, "add")
        slot = self.slots.assign(permanent, frame_index)
        if slot % self.shard_count != self.shard_rank:
            return  # another rank's frame
        slot //= self.shard_count
        if slot >= self.capacity:
            self._allocate(_round_up(2 * self.capacity, _ALIGN_FRAMES))
        self._write(slot, keys, values)

    def put(self, keys: torch.Tensor, values: torch.Tensor, frame_index: int) -> None:
        """Store video frame `frame_index` as a permanent frame; if the bank holds that frame
        already (an interactive round on a frame annotated before), overwrite its slot."""
        held = self.slot_frames[:self.permanent]
        if frame_index not in held:
            self.add(keys, values, True, frame_index)
            return
        self._check(keys, values, "put")
        slot = held.index(frame_index)
        if slot % self.shard_count != self.shard_rank:
            return  # another rank's frame
        slot //= self.shard_count
        self._write(slot, keys, values)

    def _write(self, slot, keys, values):
        """Store a frame's keys (n, Ck, h, w) and values in this rank's slot: cast to the
        storage dtype, or quantised (keys per channel, values per position)."""
        keys, values = keys.flatten(2), values.flatten(2)
        if self.quantized is None:
            self.keys[:, :, slot] = keys.to(self.storage_device, self.dtype)
            self.values[:, :, slot] = values.to(self.storage_device, self.dtype)
            return
        for memory, axis, data, scales in ((keys, "channel", self.keys, self.key_scales),
                                           (values, "position", self.values,
                                            self.value_scales)):
            quantized = QuantizedMemory.quantize(memory, self.quantized, axis=axis)
            data[:, :, slot] = quantized.data.to(self.storage_device)
            scales[:, :, slot] = quantized.scale.to(self.storage_device)

    def _check(self, keys, values, method):
        expected = (self.num_objects, self.key_dim) + self.size
        if tuple(keys.shape) != expected or tuple(values.shape) != (
                self.num_objects, self.value_dim) + self.size:
            raise ValueError(f"MemoryBank.{method} expects keys {expected} and values "
                             f"{(self.num_objects, self.value_dim) + self.size}; got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")

    def read(self, query_key: torch.Tensor, *, scale: Optional[float] = None,
             similarity: str = "dot", backend: str = "auto") -> torch.Tensor:
        """Memory read-out (n, Cv, h, w), in read_dtype (the storage dtype but for an 8-bit
        memory), for query_key (1 or n, Ck, h, w) of any floating dtype: it is cast to
        read_dtype here (memory_read never promotes; a bank stored in bf16 reads an fp32 query
        as bf16)."""
        if self.num_frames == 0:
            raise RuntimeError("the memory bank is empty: add a frame before reading")
        options: dict[str, Any] = dict(scale=scale, similarity=similarity, backend=backend)
        return self.storage.read(self, query_key.to(self.read_dtype), self.local_frames,
                                 options)

    def _local_count(self, frames):
        """How many of the slots [0, frames) lie on this rank."""
        return max(0, -(-(frames - self.shard_rank) // self.shard_count))

    _tensors = storage_tensors  # keys, values (and an 8-bit memory's scales)

    def _set_tensors(self, keys, values, key_scales=None, value_scales=None):
        self.keys, self.values = keys, values
        self.key_scales, self.value_scales = key_scales, value_scales
        self._fixed = None

    def _allocate(self, capacity, kept=None):
        positions = self.size[0] * self.size[1]
        pin = self.storage.pinned
        n = self.num_objects
        shapes = [(n, self.key_dim, capacity, positions), (n, self.value_dim, capacity,
                                                            positions)]
        dtypes = [self.dtype, self.dtype]
        if self.quantized is not None:
            shapes += [(n, self.key_dim, capacity, 1), (n, 1, capacity, positions)]
            dtypes += [torch.float32, torch.float32]
        tensors = [torch.empty(shape, dtype=dtype, device=self.storage_device, pin_memory=pin)
                   for shape, dtype in zip(shapes, dtypes, strict=True)]
        if self.keys is not None:  # growing: keep the permanent frames stored so far (from
            # add: the temporary one is being replaced; the slot being added lies past the old
            # storage), or `kept` frames
            if kept is None:
                kept = min(self._local_count(self.permanent), self.capacity)
            for new, old in zip(tensors, self._tensors(), strict=True):
                new[:, :, :kept] = old[:, :, :kept]
        self._set_tensors(*tensors)


def _shard_of(shard_memory, shard_group):
    """(rank, world size) of this process in the group a sharded memory is spread over;
    (0, 1) without sharding."""
    if not shard_memory:
        if shard_group is not None:
            raise ValueError("shard_group is given but shard_memory is False")
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_memory=True needs torch.distributed initialised "
                           "(dist.init_process_group, e.g. under torchrun)")
    rank = dist.get_rank(shard_group)
    if rank < 0:
        raise ValueError("this process is not a member of shard_group")
    return rank, dist.get_world_size(shard_group)
