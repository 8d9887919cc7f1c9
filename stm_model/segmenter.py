"""Streaming semi-supervised video object segmentation with an STM and a memory bank.

    seg = VideoSegmenter(model, mem_every=5)
    prob = seg.step(frame, mask=labels)   # frame (3, H, W) RGB in [0, 1]; labels (H, W) int64 ids
    prob = seg.step(frame)                # (K, H, W) probabilities, background first
    labels = seg.labels(prob)             # (H, W) object ids

The official evaluation schedule: frame t is segmented with a memory of the kept frames (the
first, every mem_every-th, and every frame that came with a mask) plus frame t-1. A frame is
memorised with the probabilities returned for it, at the start of the next step.

Masks on later frames: ids not seen before become new objects from that frame on (their memory
starts there: objects that entered together share one MemoryBank); ids already known are reset
to the given mask. Pixels a given mask claims are taken from the other objects.
"""
import contextlib

import torch

from .memory_bank import MemoryBank
from .network import pad_to_multiple, soft_aggregate, unpad

_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           torch.float32: torch.float32, torch.float16: torch.float16,
           torch.bfloat16: torch.bfloat16}


class VideoSegmenter:
    """Segments a video one frame at a time (see the module docstring).

    Args:
        model: an STM (put in eval mode here).
        mem_every: keep every mem_every-th frame in memory (official: 5).
        memory_dtype: storage dtype of the memory ("fp32", "fp16", "bf16" or a torch dtype;
            default: the model's dtype). Halves the memory at a small precision cost.
        max_memory_frames: bound on the frames per memory bank (FIFO eviction of the oldest
            kept frame; the first frame always stays). None: unbounded.
        offload: keep the memory in CPU memory and read it chunk by chunk on the device.
        offload_chunk_frames: memory frames per chunk when offloading.
        amp_dtype: run the encoders and decoder under torch.autocast with this dtype.
        read_backend: memory_read backend (default: the model config's).
        shard_memory: spread the memory over the ranks of shard_group (torch.distributed):
            every rank runs this segmenter on the same frames and masks, stores every
            world_size-th memory frame (MemoryBank's round-robin slots) and reads through
            stm_kernels.distributed.memory_read; every rank returns the same probabilities as
            one process holding the whole memory. Each rank keeps about 1/world_size of the
            memory (long videos on several GPUs).
        shard_group: the process group of shard_memory (default: every rank).
    """

    def __init__(self, model, mem_every=5, *, memory_dtype=None, max_memory_frames=None,
                 offload=False, offload_chunk_frames=64, amp_dtype=None, read_backend=None,
                 shard_memory=False, shard_group=None):
        apply_session_options(self, model, mem_every, memory_dtype, max_memory_frames,
                              amp_dtype, read_backend)
        self.offload, self.offload_chunk_frames = offload, offload_chunk_frames
        self.shard_memory, self.shard_group = shard_memory, shard_group
        self.reset()

    def reset(self):
        """Forget the video: memory, objects and frame count."""
        self.object_ids = []   # object id of output channel k is object_ids[k - 1]
        self.banks = []        # MemoryBank per group of objects that entered together
        self.frame_index = 0
        self._pending = None   # (padded frame, object probabilities, keep) awaiting memorisation
        self._size = None

    @property
    def num_objects(self):
        return len(self.object_ids)

    @property
    def memory_frames(self):
        """Frames in the largest memory bank (what a read of the oldest objects sees)."""
        return max((bank.num_frames for bank in self.banks), default=0)

    @property
    def memory_bytes(self):
        """Bytes of memory-bank storage (this rank's share when the memory is sharded)."""
        return sum(bank.nbytes for bank in self.banks)

    @torch.no_grad()
    def step(self, frame, mask=None):
        """Segment the next frame; returns (K, H, W) probabilities, background first.

        frame: (3, H, W) float RGB in [0, 1]. mask: optional (H, W) integer object ids
        (0 = background), required on the first frame.
        """
        frame, mask = self._checked(frame, mask)
        padded, pad = pad_to_multiple(frame.unsqueeze(0))
        if self._pending is not None:
            self._memorise(*self._pending)
            self._pending = None
        with self._autocast():
            foreground = self._predict(padded) if self.banks else padded.new_zeros(
                (0,) + padded.shape[-2:])
        foreground = foreground.float()
        if mask is None:
            probs = torch.softmax(soft_aggregate(foreground), dim=0)
            keep = self.frame_index % self.mem_every == 0
        else:
            probs = self._apply_mask(foreground, pad_to_multiple(mask)[0], padded.shape[-2:])
            keep = True
        probs = unpad(probs, pad)
        # memorised as the official code does: the returned (cropped) probabilities, zero-padded
        self._pending = (padded, pad_to_multiple(probs[1:])[0], keep, self.frame_index)
        self.frame_index += 1
        return probs

    def labels(self, probs):
        """(H, W) int64 object ids (0 = background) of the most probable channel."""
        return labels_of(probs, self.object_ids)

    def _checked(self, frame, mask):
        frame, mask = checked_frame_and_mask(frame, mask, expected_size=self._size,
                                             frame_index=self.frame_index, device=self.device)
        self._size = tuple(frame.shape[1:])
        return frame, mask

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _memorise(self, padded, object_probs, keep, frame_index):
        with self._autocast():
            keys, values = self.model.encode_memory(padded, object_probs)
        start = 0
        for bank in self.banks:
            stop = start + bank.num_objects
            bank.add(keys[start:stop], values[start:stop], keep, frame_index)
            start = stop

    def _predict(self, padded):
        """Foreground probabilities (n, Hp, Wp) of the known objects from their memory."""
        query = self.model.encode_query(padded)
        config = self.model.config
        readout = torch.cat([bank.read(query.key, similarity=config.similarity,
                                       backend=self.read_backend) for bank in self.banks])
        return self.model.foreground(readout.to(query.value.dtype), query)

    def _apply_mask(self, foreground, mask, padded_size):
        """Probabilities (K, Hp, Wp) after a given mask (see merge_mask); new ids get a
        MemoryBank of their own."""
        probs, new_ids = merge_mask(foreground, mask, self.object_ids)
        if new_ids:
            height, width = padded_size
            bank = MemoryBank(
                len(new_ids), self.model.config.key_dim, self.model.config.value_dim,
                height // 16, width // 16, dtype=self.memory_dtype, device=self.device,
                max_frames=self.max_memory_frames, offload=self.offload,
                chunk_frames=self.offload_chunk_frames, shard_memory=self.shard_memory,
                shard_group=self.shard_group)
            self.banks.append(bank)
            self.object_ids += new_ids
        return probs


def apply_session_options(session, model, mem_every, memory_dtype, max_memory_frames,
                          amp_dtype, read_backend):
    """Check a segmenter's common options and set model (eval mode), device, mem_every,
    memory_dtype (default: the model's), max_memory_frames, amp_dtype and read_backend."""
    if int(mem_every) < 1:
        raise ValueError(f"mem_every must be a positive integer; got {mem_every!r}")
    if memory_dtype not in _DTYPES or amp_dtype not in _DTYPES:
        raise ValueError("memory_dtype and amp_dtype must be one of fp32, fp16, bf16 (or "
                         f"torch dtypes); got {memory_dtype!r} and {amp_dtype!r}")
    if max_memory_frames is not None and max_memory_frames < 2:
        raise ValueError("max_memory_frames must be at least 2 (the first frame and the "
                         f"previous frame); got {max_memory_frames}")
    session.model = model.eval()
    parameter = next(model.parameters())
    session.device = parameter.device
    session.mem_every = int(mem_every)
    session.memory_dtype = _DTYPES[memory_dtype] or parameter.dtype
    session.max_memory_frames = max_memory_frames
    session.amp_dtype = _DTYPES[amp_dtype]
    session.read_backend = read_backend or model.config.read_backend


def labels_of(probs, object_ids):
    """(H, W) int64 object ids (0 = background) of the most probable channel of probs
    (K, H, W), channel k being object_ids[k - 1]; ties go to the first channel."""
    ids = torch.tensor([0] + list(object_ids), device=probs.device)
    # max(0).indices is argmax(0) (first maximum), but far faster on CPU
    return ids[probs.max(0).indices]


def checked_frame_and_mask(frame, mask, *, expected_size, frame_index, device):
    """(frame float32 (3, H, W), mask int64 (H, W) or None) on `device`, after checking them:
    ValueError naming the problem for a frame that is not float (3, H, W), a frame of another
    size than `expected_size` (None: any), a mask that is not (H, W) integer ids >= 0 of the
    frame's size, or no mask on frame 0."""
    frame = torch.as_tensor(frame)
    if frame.dim() != 3 or frame.shape[0] != 3 or not frame.is_floating_point():
        raise ValueError("frame must be a float (3, H, W) RGB tensor in [0, 1]; got "
                         f"{tuple(frame.shape)} {frame.dtype}")
    size = tuple(frame.shape[1:])
    if expected_size is not None and size != tuple(expected_size):
        raise ValueError(f"frame {frame_index} is {size[1]}x{size[0]} (WxH) but the "
                         f"video's frames are {expected_size[1]}x{expected_size[0]}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.is_floating_point() or mask.dtype == torch.bool or mask.dim() != 2:
            raise ValueError("mask must be an (H, W) integer tensor of object ids; got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        if tuple(mask.shape) != size:
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but frame "
                             f"{frame_index} is {size[1]}x{size[0]}")
        if mask.min() < 0:
            raise ValueError("mask ids must be >= 0 (0 is background)")
        mask = mask.to(device, torch.int64)
    elif frame_index == 0:
        raise ValueError("the first frame needs a mask (step(frame, mask=labels))")
    return frame.to(device, torch.float32), mask


def merge_mask(foreground, mask, object_ids):
    """Probabilities (K, Hp, Wp) of a frame that came with a mask, and the ids it introduces.

    foreground (n, Hp, Wp): the known objects' predicted probabilities (object_ids order);
    mask (Hp, Wp) int64 ids. Ids not in object_ids become new objects (appended, in id order;
    the caller records them); given ids take the mask's pixels; other objects lose the pixels
    the mask claims. When the mask gives every object, the probabilities are the mask itself
    (the official first frame); otherwise they are soft-aggregated.
    """
    ids = [int(i) for i in torch.unique(mask) if i != 0]
    new_ids = [i for i in ids if i not in object_ids]
    all_ids = list(object_ids) + new_ids
    if new_ids:
        foreground = torch.cat([foreground, foreground.new_zeros(
            (len(new_ids),) + foreground.shape[1:])])
    claimed = (mask > 0).float()
    foreground = foreground * (1 - claimed)
    for i in ids:
        foreground[all_ids.index(i)] = (mask == i).float()
    if set(ids) == set(all_ids):
        # every object given: the probabilities are the mask itself (official first frame)
        background = (mask == 0).float().unsqueeze(0)
        return torch.cat([background, foreground]), new_ids
    return torch.softmax(soft_aggregate(foreground), dim=0), new_ids
