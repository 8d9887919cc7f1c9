"""stm_model: the STM network and everything model-side.

    from stm_model import load_official_checkpoint, VideoSegmenter
    model = load_official_checkpoint("STM_weights.pth")
    seg = VideoSegmenter(model, mem_every=5)
    prob = seg.step(frame, mask=labels)   # then seg.step(frame) for every later frame

Built on `stm_kernels.memory_read`: the memory bank stores keys/values in the layout the fused
read wants and the read never materialises the affinity.
"""
from .checkpoint import (CheckpointError, load_checkpoint, load_official_checkpoint,
                         save_checkpoint)
from .interactive import InteractiveSession, as_interactive
from .memory_bank import MemoryBank
from .network import STM, STMConfig, soft_aggregate
from .segmenter import VideoSegmenter

__all__ = ["STM", "STMConfig", "soft_aggregate", "MemoryBank", "VideoSegmenter",
           "InteractiveSession", "as_interactive",
           "load_official_checkpoint", "load_checkpoint", "save_checkpoint", "CheckpointError"]
