"""stm_model: the STM network and everything model-side.

    from stm_model import load_checkpoint, VideoSegmenter
    model = load_checkpoint("small-real")  # shipped; or load_official_checkpoint("official")
    seg = VideoSegmenter(model, mem_every=5)
    prob = seg.step(frame, mask=labels)   # then seg.step(frame) for every later frame

    seg = VideoSegmenter(model, max_internal_size=480, compile=True)   # 4K input, compiled
    for result in segment_both_directions(seg, FrameSequence("clip.mp4"), {40: labels}):
        result.index, result.labels         # frames 40.. forwards, then 39..0 backwards

    batch = BatchSegmenter(model)          # several videos of one size, one batch per step
    probs = batch.step({"a": frame_a, "b": frame_b}, masks={"a": labels_a, "b": labels_b})

Built on `stm_kernels.memory_read`: the memory bank stores keys/values in the layout the fused
read wants and the read never materialises the affinity.

The names below are imported on first use (PEP 562): the `stm` command parses its arguments
before anything imports torch.
"""
from typing import TYPE_CHECKING

from stm_kernels._lazy_imports import import_module
from stm_kernels._version import __version__

# name -> the module that defines it
_EXPORTS = {
    "STM": "network.stm", "STMConfig": "network.stm", "soft_aggregate": "network.stm",
    "CheckpointError": "network.checkpoint", "load_checkpoint": "network.checkpoint",
    "load_official_checkpoint": "network.checkpoint", "save_checkpoint": "network.checkpoint",
    "MemoryBank": "memory.bank", "BatchedMemory": "memory.batched",
    "VideoSegmenter": "inference.video_segmenter", "BatchSegmenter": "inference.batch_segmenter",
    "FrameSequence": "inference.directions", "FrameResult": "inference.directions",
    "segment_forward": "inference.directions", "segment_backward": "inference.directions",
    "segment_both_directions": "inference.directions",
    "segment_videos": "inference.video_batches", "VideoJob": "inference.video_batches",
    "FrameInput": "inference.video_batches", "SegmentedFrame": "inference.video_batches",
    "InteractiveSession": "interactive.session", "as_interactive": "interactive.session",
    "ClipForward": "training.clip_forward",
}

__all__ = ["__version__", "STM", "STMConfig", "ClipForward", "soft_aggregate", "MemoryBank",
           "VideoSegmenter",
           "FrameSequence", "FrameResult", "segment_forward", "segment_backward",
           "segment_both_directions",
           "BatchSegmenter", "BatchedMemory", "segment_videos", "VideoJob", "FrameInput",
           "SegmentedFrame",
           "InteractiveSession", "as_interactive",
           "load_official_checkpoint", "load_checkpoint", "save_checkpoint", "CheckpointError"]

if TYPE_CHECKING:  # what type checkers and IDEs see (the same names, imported eagerly)
    from stm_model.network.checkpoint import (CheckpointError, load_checkpoint,
                                              load_official_checkpoint, save_checkpoint)
    from stm_model.memory.batched import BatchedMemory
    from stm_model.inference.directions import (FrameResult, FrameSequence, segment_backward,
                                                segment_both_directions, segment_forward)
    from stm_model.inference.batch_segmenter import BatchSegmenter
    from stm_model.training.clip_forward import ClipForward
    from stm_model.interactive.session import InteractiveSession, as_interactive
    from stm_model.memory.bank import MemoryBank
    from stm_model.network.stm import STM, STMConfig, soft_aggregate
    from stm_model.inference.video_segmenter import VideoSegmenter
    from stm_model.inference.video_batches import (FrameInput, SegmentedFrame, VideoJob,
                                                   segment_videos)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}", f"{__name__}.{name}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
