"""The memory of many videos at once, stored so that one fused read serves all their objects.

Storage: keys (rows, Ck, frames, h·w) and values (rows, Cv, frames, h·w), one row per object of
every running video (all of one frame size). Objects that entered a video together form a
MemoryGroup: they share a memory schedule (FrameSlots) and so a memory length. Rows in use are
kept contiguous ([0, rows_in_use)); a read views keys[:rows_in_use, :, :T] as
(rows, Ck, T·h·w) without copying and passes each row's own length (its group's frames · h·w)
as `memory_lengths`: positions past a row's length are never read.

Growth: the frame capacity (a multiple of 16, so that the channel stride is 16-aligned) and
the row capacity double when full: amortised O(1) copies, never a per-step concatenation.
Removing a group (its video ended) frees its rows; rows from the end move into the gap so the
rows in use stay contiguous (one copy of the moved objects' memory, once per finished video).

Schedule: memory_schedule.FrameSlots, the same as MemoryBank's (one per group).

8-bit storage (dtype torch.int8 / torch.float8_e4m3fn), as MemoryBank's: each frame quantised
as it is added, keys with a float32 scale per row, channel and frame (key_scales (rows, Ck,
frames, 1)), values per row and position (value_scales (rows, 1, frames, h·w)); a read hands
memory_read one QuantizedMemory per argument, views over the frames it sees (keys with scales
per channel and frame), in read_dtype: one call, fused on CUDA.
"""
import torch

from stm_kernels import QuantizedMemory

from stm_model.memory.storage import read_in_storage_dtype, storage_tensors

from stm_model.memory.schedule import FrameSlots

_ALIGN_FRAMES = 16


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


class MemoryGroup:
    """Objects of one video that entered together: their rows in a BatchedMemory and their
    schedule. `owner` is whatever the creator tags the group with (the video)."""

    def __init__(self, num_objects, owner, max_frames):
        self.num_objects, self.owner = num_objects, owner
        self.slots = FrameSlots(max_frames)
        self.rows = []  # storage row of each object, in object order

    @property
    def num_frames(self):
        """Frames a read of this group sees."""
        return self.slots.num_frames


class BatchedMemory:
    """Keys and values of every object of many videos of one frame size (see the module
    docstring). key_dim/value_dim: channels; height, width: the stride-16 feature size;
    dtype, device: the storage's (torch.int8 / torch.float8_e4m3fn: 8-bit, read in
    read_dtype, default float32; a float storage is read in its own dtype); max_frames: each
    group's bound (FIFO eviction), None: unbounded."""

    def __init__(self, key_dim, value_dim, height, width, *, dtype=torch.float32, device="cpu",
                 max_frames=None, read_dtype=None):
        from stm_model.memory.bank import QUANTIZED_DTYPES
        self.key_dim, self.value_dim = key_dim, value_dim
        self.size = (height, width)
        self.dtype, self.device = dtype, torch.device(device)
        self.quantized = QUANTIZED_DTYPES.get(dtype)  # "int8", "fp8" or None
        if self.quantized is None and read_dtype not in (None, dtype):
            raise ValueError(f"read_dtype applies to an 8-bit memory (dtype torch.int8 or "
                             f"torch.float8_e4m3fn); a {dtype} memory is read in {dtype}")
        self.read_dtype = read_dtype or (torch.float32 if self.quantized else dtype)
        self.max_frames = max_frames
        self.owners = []  # the MemoryGroup of each row in use
        self.key_scales = self.value_scales = None
        self._set(*self._empty(0, _ALIGN_FRAMES))

    @property
    def rows_in_use(self):
        """Storage rows holding an object (rows [0, rows_in_use))."""
        return len(self.owners)

    @property
    def frame_capacity(self):
        """Frames the storage holds per row before it grows."""
        return self.keys.shape[2]

    @property
    def nbytes(self):
        """Storage bytes (keys and values, an 8-bit memory's scales included, capacity
        included)."""
        return sum(tensor.nbytes for tensor in self._tensors())

    def add_group(self, num_objects, owner=None):
        """A new MemoryGroup of num_objects objects, with rows at the end of the rows in use."""
        group = MemoryGroup(num_objects, owner, self.max_frames)
        start = self.rows_in_use
        if start + num_objects > self.keys.shape[0]:
            self._reallocate(max(start + num_objects, 2 * self.keys.shape[0]),
                             self.frame_capacity)
        group.rows = list(range(start, start + num_objects))
        self.owners += [group] * num_objects
        return group

    def remove_group(self, group):
        """Free a group's rows; rows from the end move into the gap (the rows in use stay
        contiguous)."""
        freed = sorted(group.rows)
        group.rows = []
        kept = self.rows_in_use - len(freed)
        moves = []  # (from row, to row)
        tail = [row for row in range(kept, self.rows_in_use) if self.owners[row] is not group]
        for target, source in zip([row for row in freed if row < kept], tail, strict=True):
            moves.append((source, target))
        if moves:
            sources = torch.tensor([s for s, _ in moves], device=self.device)
            targets = torch.tensor([t for _, t in moves], device=self.device)
            for tensor in self._tensors():
                tensor[targets] = tensor[sources]
            for source, target in moves:
                owner = self.owners[source]
                owner.rows[owner.rows.index(source)] = target
                self.owners[target] = owner
        del self.owners[kept:]

    def add(self, entries, keys, values):
        """Store one frame for each of several groups, in one write.

        entries: [(group, permanent, frame_index)]; keys (Σ n, Ck, h, w) and values
        (Σ n, Cv, h, w): the groups' objects in entry order, each group's in object order.
        """
        total = sum(group.num_objects for group, _, _ in entries)
        expected = (total, self.key_dim) + self.size
        if tuple(keys.shape) != expected or tuple(values.shape) != (
                total, self.value_dim) + self.size:
            raise ValueError(f"BatchedMemory.add expects keys {expected} and values "
                             f"{(total, self.value_dim) + self.size}; got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        rows, slots = [], []
        for group, permanent, frame_index in entries:
            slot = group.slots.assign(permanent, frame_index)
            rows += group.rows
            slots += [slot] * group.num_objects
        if max(slots) >= self.frame_capacity:
            capacity = _round_up(max(max(slots) + 1, 2 * self.frame_capacity), _ALIGN_FRAMES)
            if self.max_frames is not None:
                capacity = min(capacity, _round_up(self.max_frames, _ALIGN_FRAMES))
            self._reallocate(self.keys.shape[0], capacity)
        rows = torch.tensor(rows, device=self.device)
        slots = torch.tensor(slots, device=self.device)
        keys, values = keys.flatten(2), values.flatten(2)
        if self.quantized is None:
            self.keys[rows, :, slots] = keys.to(self.dtype)
            self.values[rows, :, slots] = values.to(self.dtype)
            return
        for memory, axis, data, scales in ((keys, "channel", self.keys, self.key_scales),
                                           (values, "position", self.values,
                                            self.value_scales)):
            quantized = QuantizedMemory.quantize(memory, self.quantized, axis=axis)
            data[rows, :, slots] = quantized.data
            scales[rows, :, slots] = quantized.scale

    def lengths(self):
        """Memory frames of each row in use (a list of ints)."""
        return [group.num_frames for group in self.owners]

    def read(self, query_key, *, scale=None, similarity="dot", backend="auto"):
        """Read-out (rows_in_use, Cv, h, w) of every row in use for query_key
        (rows_in_use or 1, Ck, h, w): one fused read, each row over its own memory."""
        frames = self.lengths()
        if not frames or min(frames) == 0:
            raise RuntimeError("every row read needs a memory frame: add one before reading")
        longest = max(frames)
        positions = self.size[0] * self.size[1]
        lengths = None
        if min(frames) != longest:
            lengths = torch.tensor([f * positions for f in frames], device=self.device)
        rows = self.rows_in_use
        if self.quantized is None:
            keys = self.keys[:rows, :, :longest].flatten(2)
            values = self.values[:rows, :, :longest].flatten(2)
        else:  # keys with a scale per channel and frame, values per position
            keys = QuantizedMemory(self.keys[:rows, :, :longest],
                                   self.key_scales[:rows, :, :longest])
            values = QuantizedMemory(self.values[:rows, :, :longest],
                                     self.value_scales[:rows, :, :longest])
        return read_in_storage_dtype(query_key, keys, values, dtype=self.read_dtype,
                                     scale=scale, similarity=similarity, backend=backend,
                                     memory_lengths=lengths)

    _tensors = storage_tensors  # keys, values (and an 8-bit memory's scales)

    def _set(self, keys, values, key_scales=None, value_scales=None):
        self.keys, self.values = keys, values
        self.key_scales, self.value_scales = key_scales, value_scales

    def _empty(self, rows, frames):
        """New storage tensors of rows x frames (an 8-bit memory's zeroed, scales one: rows
        past a row's length are read by no one, but hold finite values)."""
        positions = self.size[0] * self.size[1]
        shapes = [(rows, self.key_dim, frames, positions), (rows, self.value_dim, frames,
                                                             positions)]
        if self.quantized is None:
            return [torch.empty(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        return ([torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in shapes]
                + [torch.ones(shape, dtype=torch.float32, device=self.device)
                   for shape in ((rows, self.key_dim, frames, 1), (rows, 1, frames, positions))])

    def _reallocate(self, rows, frames):
        tensors = self._empty(rows, frames)
        used, old_frames = self.rows_in_use, self.frame_capacity
        for new, old in zip(tensors, self._tensors(), strict=True):
            new[:used, :, :old_frames] = old[:used]
        self._set(*tensors)
