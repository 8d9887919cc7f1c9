"""Per-frame query features computed once and kept: an interactive session re-segments the same
frames round after round, and a frame's query key, value and decoder skips do not depend on the
memory, so only the reads and the decoders are paid again.
"""
from typing import Callable, Sequence

import torch

from stm_model.network.stm import QueryFeatures


class QueryFeatureCache:
    """Query features of a video's frames by frame index, each computed once.

    Args:
        encode: frame indices -> their QueryFeatures, batched in that order (e.g. the padded
            frames through STM.encode_query).
        dtype, device: where the kept features live (a smaller dtype or the CPU bounds the
            cache of a long video).
    """

    def __init__(self, encode: Callable[[Sequence[int]], QueryFeatures], *,
                 dtype: torch.dtype, device: torch.device) -> None:
        self._encode = encode
        self.dtype, self.device = dtype, device
        self._features: dict[int, QueryFeatures] = {}

    def __len__(self) -> int:
        """Frames whose features are kept."""
        return len(self._features)

    def __contains__(self, frame: int) -> bool:
        return frame in self._features

    def batch(self, frames: Sequence[int], *, dtype: torch.dtype,
              device: torch.device) -> QueryFeatures:
        """QueryFeatures of `frames`, batched in their order, in dtype on device; the frames
        not kept yet are encoded (in one call) and kept."""
        missing = [t for t in dict.fromkeys(frames) if t not in self._features]
        if missing:
            encoded = self._encode(missing).tensors()
            for i, t in enumerate(missing):
                self._features[t] = QueryFeatures(*(
                    x[i:i + 1].to(self.device, self.dtype) for x in encoded))
        kept = [self._features[t].tensors() for t in frames]
        return QueryFeatures(*(torch.cat(parts).to(device, dtype)
                               for parts in zip(*kept, strict=True)))

