"""Segmenting several videos of one frame size together: one network batch per step.

    seg = BatchSegmenter(model, mem_every=5)
    probs = seg.step({"a": frame_a, "b": frame_b}, masks={"a": labels_a, "b": labels_b})
    probs = seg.step({"a": frame_a, "b": frame_b})   # {video: (K, H, W) probabilities}
    seg.finish("a")                                  # video a ended: its memory is freed
    probs = seg.step({"b": frame_b, "c": frame_c}, masks={"c": labels_c})   # c joins
    labels = seg.labels("b", probs["b"])

Each video is segmented exactly as VideoSegmenter segments it alone (same schedule, objects,
late objects, masks on later frames; the same outputs to float32 rounding), but per step all
videos share one query-encoder batch, one memory read of all their objects (a BatchedMemory:
every object over its own memory length), one decoder batch and one memory-encoder batch for
the frames being memorised.

Rules: a step takes a frame for every running video (finish(video) a video that has ended);
a key seen for the first time starts a new video and needs a mask; all frames of a step have
one size (one BatchSegmenter per frame size; once every video has finished, another size may
start).

Frames shrunk before the step (a dataset run segmenting at a smaller size): a mask may be
given at the size its frame was shrunk from (at least as large in both dimensions). It is
merged at that size, as VideoSegmenter merges a mask into a frame it resizes, so its own
pixels are kept however thin its objects; that video's probabilities for the frame are
returned at the mask's size, and memorised downsampled to the frame's.
"""
import dataclasses
from typing import Any, Optional

import torch

from stm_model.memory.batched import BatchedMemory
from stm_model.memory.schedule import PendingFrame, is_kept
from stm_model.inference.options import SegmenterOptions
from stm_model.inference.masks import check_first_mask, labels_of, merge_mask
from stm_model.inference.resize import downsample_probs, upsample_probs
from stm_model.network.stm import QueryFeatures, pad_to_multiple, soft_aggregate, unpad
from stm_model.inference.session import SessionCore, checked_frame_and_mask

CPU_PIXELS_PER_CALL = 1 << 16  # network_batch="auto" on a CPU: frames per call x H x W


@dataclasses.dataclass
class _Video:
    key: Any
    size: Optional[tuple] = None
    object_ids: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)  # MemoryGroups, in object order
    frame_index: int = 0
    pending: Optional[PendingFrame] = None


class BatchSegmenter(SessionCore):
    """Segments several videos of one frame size together (see the module docstring).

    Args:
        model: an STM (put in eval mode here).
        mem_every: keep every mem_every-th frame in memory (official: 5).
        memory_dtype: storage dtype of the memory ("fp32", "fp16", "bf16" or a torch dtype;
            default: the model's dtype; "int8", "fp8": 8 bits with scales, as
            VideoSegmenter's).
        max_memory_frames: bound on the frames of each object's memory (FIFO eviction of the
            oldest kept frame; the first frame always stays). None: unbounded.
        amp_dtype: run the encoders and decoder under torch.autocast with this dtype (None
            or "fp32": no autocast, the default; "auto": bf16 on a CPU with bf16 dot products,
            as SessionCore says).
        read_backend: memory_read backend (default: the model config's).
        network_batch: most frames (query encoder) or objects (memory encoder, decoder) per
            network call; "auto": all of them on a GPU, CPU_PIXELS_PER_CALL pixels' worth
            (at least 1) on a CPU; None: all of them.
    """

    def __init__(self, model, mem_every=5, *, memory_dtype=None, max_memory_frames=None,
                 amp_dtype=None, read_backend=None, network_batch="auto"):
        self.options = SegmenterOptions(mem_every=mem_every, memory_dtype=memory_dtype,
                                        max_memory_frames=max_memory_frames,
                                        amp_dtype=amp_dtype, read_backend=read_backend)
        super().__init__(model, memory_dtype=memory_dtype, amp_dtype=amp_dtype,
                         read_backend=read_backend)
        self.mem_every, self.max_memory_frames = int(mem_every), max_memory_frames
        if network_batch not in ("auto", None) and not (
                isinstance(network_batch, int) and network_batch >= 1):
            raise ValueError("network_batch must be a positive integer, 'auto' or None; got "
                             f"{network_batch!r}")
        self.network_batch = network_batch
        self._videos = {}
        self.memory = None  # BatchedMemory of the current frame size

    @classmethod
    def from_options(cls, model, options, network_batch="auto"):
        """A BatchSegmenter with the given SegmenterOptions (ValueError for an option that
        applies to one video only)."""
        return cls(model, **options.batch_arguments(), network_batch=network_batch)

    @property
    def videos(self):
        """Keys of the running videos, in the order they started."""
        return list(self._videos)

    def object_ids(self, video):
        """Object ids of a running video; channel k of its probabilities is object_ids[k-1]."""
        return list(self._video(video).object_ids)

    def num_objects(self, video):
        """Objects of a running video (its probabilities have num_objects + 1 channels)."""
        return len(self._video(video).object_ids)

    def memory_frames(self, video):
        """Frames in the video's largest memory (what a read of its oldest objects sees)."""
        return max((group.num_frames for group in self._video(video).groups), default=0)

    @property
    def memory_bytes(self):
        """Bytes of the shared memory storage (all videos, capacity included)."""
        return self.memory.nbytes if self.memory is not None else 0

    def labels(self, video, probs):
        """(H, W) int64 object ids (0 = background) of the most probable channel."""
        return labels_of(probs, self._video(video).object_ids)

    def finish(self, video):
        """Forget a video that has ended and free its memory."""
        state = self._video(video)
        for group in state.groups:
            self.memory.remove_group(group)
        del self._videos[video]

    @torch.no_grad()
    def step(self, frames, masks=None):
        """Segment the next frame of every running video (and the first of new ones).

        frames: {video: (3, H, W) float RGB in [0, 1]}, one entry per running video (plus new
        videos), all of one size. masks: optional {video: (H, W) integer object ids}, required
        for a video's first frame; of the frame's size, or of the size the frame was shrunk
        from (see the module docstring). Returns {video: (K, H, W) probabilities, background
        first}, at the mask's size for a frame given a mask of another size.
        """
        checked = self._checked(frames, masks or {})
        for key in checked:
            if key not in self._videos:
                self._videos[key] = _Video(key)
        videos = [self._videos[key] for key in checked]
        padded, pad = pad_to_multiple(torch.stack([frame for frame, _ in checked.values()]))
        if self.memory is None or self.memory.size != (padded.shape[-2] // 16,
                                                       padded.shape[-1] // 16):
            config = self.model.config
            self.memory = BatchedMemory(config.key_dim, config.value_dim,
                                        padded.shape[-2] // 16, padded.shape[-1] // 16,
                                        dtype=self.memory_dtype, device=self.device,
                                        max_frames=self.max_memory_frames,
                                        read_dtype=self.read_dtype)
        self._memorise_pending(videos)
        with self.autocast():
            foreground = self._predict(videos, padded)
        results = {}
        for index, (video, (frame, mask)) in enumerate(zip(videos, checked.values(), strict=True)):
            size = tuple(frame.shape[1:])
            if mask is not None and tuple(mask.shape) != size:  # merged at the mask's size
                probs = self._merged(video, upsample_probs(
                    unpad(foreground[index].float(), pad), tuple(mask.shape)), mask)
                keep, memorised = True, downsample_probs(probs, size)
            else:
                probs, keep = self._probabilities(video, foreground[index].float(), mask)
                probs = memorised = unpad(probs, pad)
            # memorised as the official code does: the returned (cropped) probabilities
            video.pending = PendingFrame(padded[index], pad_to_multiple(memorised[1:])[0], keep,
                                         video.frame_index)
            video.size = size
            video.frame_index += 1
            results[video.key] = probs
        return results

    def _video(self, video):
        if video not in self._videos:
            raise KeyError(f"no running video {video!r} (running: {self.videos})")
        return self._videos[video]

    def _checked(self, frames, masks):
        """{video: (frame, mask)} on the device, in frames' order; ValueError naming the
        argument and the video for bad input (nothing changes then)."""
        if not hasattr(frames, "items") or not frames:
            raise ValueError("frames must be a non-empty mapping {video: (3, H, W) frame}; got "
                             f"{type(frames).__name__}")
        if not hasattr(masks, "items"):
            raise ValueError("masks must be a mapping {video: (H, W) object ids}; got "
                             f"{type(masks).__name__}")
        missing = [key for key in self._videos if key not in frames]
        if missing:
            raise ValueError(f"frames: running videos {missing} have no frame in this step; "
                             "pass a frame for every running video, and finish(video) when a "
                             "video has ended")
        stray = [key for key in masks if key not in frames]
        if stray:
            raise ValueError(f"masks: videos {stray} have a mask but no frame in this step")
        checked, first = {}, None
        for key, frame in frames.items():
            video = self._videos.get(key)
            try:
                checked[key] = checked_frame_and_mask(
                    frame, masks.get(key), expected_size=video.size if video else None,
                    frame_index=video.frame_index if video else 0, device=self.device,
                    larger_mask=True)
                if video is None:
                    check_first_mask(checked[key][1], [])
            except ValueError as error:
                raise ValueError(f"video {key!r}: {error}") from None
            size = tuple(checked[key][0].shape[1:])
            if first is None:
                first = (key, size)
            elif size != first[1]:
                raise ValueError(
                    f"frames: video {key!r} is {size[1]}x{size[0]} (WxH) but video "
                    f"{first[0]!r} is {first[1][1]}x{first[1][0]}; a BatchSegmenter steps "
                    "videos of one frame size (use one per size)")
        return checked

    def _memorise_pending(self, videos):
        """Encode every video's previous frame with its probabilities (one encoder batch, cut
        into network_batch calls) and store the keys/values in each object's memory."""
        memorising = [video for video in videos if video.pending is not None and video.groups]
        if not memorising:
            return
        inputs, entries = [], []
        for video in memorising:
            pending = video.pending
            inputs.append(self.model.memory_encoder_inputs(pending.frame.unsqueeze(0),
                                                           pending.object_probs))
            entries += [(group, pending.keep, pending.frame_index) for group in video.groups]
            video.pending = None
        # frames, masks, others (each object's rows, all videos together)
        inputs = [torch.cat(parts) for parts in zip(*inputs, strict=True)]
        encoded = []
        with self.autocast():
            for part in self._calls(inputs[0].shape[0], inputs[0].shape[-2:]):
                r4, _, _ = self.model.memory_encoder(*(x[part] for x in inputs))
                encoded.append(self.model.memory_key_value(r4))
        keys, values = (torch.cat(parts) if len(parts) > 1 else parts[0]
                        for parts in zip(*encoded, strict=True))
        self.memory.add(entries, keys, values)

    def _predict(self, videos, padded):
        """Per video, the foreground probabilities (n, Hp, Wp) of its objects from their
        memory (n = 0 for a video on its first frame)."""
        empty = padded.new_zeros((0,) + padded.shape[-2:])
        predicting = [index for index, video in enumerate(videos) if video.groups]
        if not predicting:
            return [empty for _ in videos]
        frames = padded if len(predicting) == len(videos) else padded[predicting]
        query = self._encode_query(frames)
        position = {videos[index].key: slot for slot, index in enumerate(predicting)}
        row_video = [position[group.owner] for group in self.memory.owners]
        if row_video != list(range(len(predicting))):  # not one object per video, in order
            rows = torch.tensor(row_video, device=self.device)
            query = QueryFeatures(*(features.index_select(0, rows)
                                    for features in query.tensors()))
        config = self.model.config
        readout = self.memory.read(query.key, similarity=config.similarity,
                                   backend=self.read_backend)
        per_row = torch.cat([self.model.foreground(readout[part], QueryFeatures(
            None, query.value[part], query.r3[part], query.r2[part]))
            for part in self._calls(readout.shape[0], padded.shape[-2:])])
        foreground = [empty for _ in videos]
        for index in predicting:
            rows = [row for group in videos[index].groups for row in group.rows]
            foreground[index] = per_row[rows[0]:rows[0] + 1] if len(rows) == 1 else \
                per_row[torch.tensor(rows, device=self.device)]
        return foreground

    def _calls(self, count, size):
        """Slices of a network batch of `count` items of size (H, W), one per call."""
        per_call = self.network_batch
        if per_call == "auto":
            per_call = None if self.device.type == "cuda" else max(
                1, CPU_PIXELS_PER_CALL // (size[0] * size[1]))
        per_call = per_call or count
        return [slice(start, start + per_call) for start in range(0, count, per_call)]

    def _encode_query(self, frames):
        """STM.encode_query of the frames, in network_batch calls."""
        parts = [self.model.encode_query(frames[part])
                 for part in self._calls(frames.shape[0], frames.shape[-2:])]
        if len(parts) == 1:
            return parts[0]
        return QueryFeatures(*(torch.cat(features)
                               for features in zip(*(q.tensors() for q in parts), strict=True)))

    def _probabilities(self, video, foreground, mask):
        """(probabilities (K, Hp, Wp), keep in memory) of a video's frame; a mask's new ids
        become objects with a memory group of their own."""
        if mask is None:
            keep = is_kept(video.frame_index, self.mem_every, annotated=False)
            return torch.softmax(soft_aggregate(foreground), dim=0), keep
        return self._merged(video, foreground, pad_to_multiple(mask)[0]), True

    def _merged(self, video, foreground, mask):
        """Probabilities (K, H, W) of a frame given a mask of the foreground's size (see
        merge_mask); its new ids become objects with a memory group of their own."""
        probs, new_ids = merge_mask(foreground, mask, video.object_ids)
        if new_ids:
            video.groups.append(self.memory.add_group(len(new_ids), owner=video.key))
            video.object_ids += new_ids
        return probs
