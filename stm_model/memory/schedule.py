"""Which storage slot each memory frame goes to: the official STM schedule with optional FIFO
eviction, shared by MemoryBank (one video) and BatchedMemory (many videos).

Permanent frames (the first frame, every mem_every-th frame, annotated frames) plus one
temporary slot for the previous frame, overwritten at every step. With max_frames, when a
permanent frame would leave no room for the temporary slot, the oldest permanent frame other
than the first is overwritten (FIFO). Occupied slots are always [0, num_frames).
"""
import collections
import dataclasses
from typing import Any, Optional



@dataclasses.dataclass(frozen=True)
class PendingFrame:
    """A segmented frame awaiting memorisation: a segmenter encodes it into the memory at the
    start of its next step, with the probabilities it returned for it (the official schedule:
    frame t is read with frames up to t - 1 in memory).

    frame: the padded frame as the segmenter's memory encoder takes it; object_probs: (K, Hp,
    Wp) the objects' probabilities, padded, background excluded; keep: a permanent memory
    frame (else the temporary previous-frame slot); frame_index: the video's frame index."""
    frame: Any  # a tensor (torch segmenters) or an array (the ONNX runner)
    object_probs: Any
    keep: bool
    frame_index: int

    def with_objects(self, kept):
        """The same frame with only the objects (probability channels) at indices `kept`."""
        return dataclasses.replace(self, object_probs=self.object_probs[kept])


def is_kept(step, mem_every, annotated):
    """Whether the step-th frame since the first mask (0-based) becomes a permanent memory
    frame: the first, every mem_every-th, and every frame that came with a mask."""
    return annotated or step % mem_every == 0


def check_schedule(mem_every: int, max_memory_frames: Optional[int]) -> None:
    """ValueError for a memory schedule that cannot run: mem_every < 1, or a bound on the
    memory frames below the two every step needs (the first frame and the previous one)."""
    if isinstance(mem_every, bool) or int(mem_every) != mem_every or mem_every < 1:
        raise ValueError(f"mem_every must be a positive integer; got {mem_every!r}")
    if max_memory_frames is not None and max_memory_frames < 2:
        raise ValueError("max_memory_frames must be at least 2 (the first frame and the "
                         f"previous frame); got {max_memory_frames}")


class FrameSlots:
    """Slot assignment of one memory (see the module docstring)."""

    def __init__(self, max_frames=None):
        if max_frames is not None and max_frames < 2:
            raise ValueError(f"max_frames must be at least 2 (the first frame and the previous "
                             f"frame); got {max_frames}")
        self.max_frames = max_frames
        self.permanent = 0          # permanent frames, in slots [0, permanent)
        self.has_temporary = False  # the previous frame, in slot `permanent`
        self.slot_frames = []       # video frame index held by each slot
        self._fifo = collections.deque()  # evictable permanent slots, oldest first

    @property
    def num_frames(self):
        """Frames a read sees: the permanent ones plus the temporary previous frame."""
        return self.permanent + int(self.has_temporary)

    def assign(self, permanent, frame_index=None):
        """The slot for a new frame; the previous temporary frame is dropped, permanent=False
        makes this frame the new temporary one."""
        self.has_temporary = False
        del self.slot_frames[self.permanent:]
        slot = self.permanent
        full = self.max_frames is not None and self.permanent + 1 >= self.max_frames
        if permanent and full:
            if self._fifo:
                slot = self._fifo.popleft()  # evict the oldest; keep a slot for the temporary
            else:
                permanent = False  # only the first frame is permanent: nothing to evict
        if slot < self.permanent:  # an evicted slot
            self.slot_frames[slot] = frame_index
            self._fifo.append(slot)
            return slot
        self.slot_frames.append(frame_index)
        if not permanent:
            self.has_temporary = True
            return slot
        if self.permanent > 0:  # the group's first frame is never evicted
            self._fifo.append(slot)
        self.permanent += 1
        return slot
