"""The per-frame parts of an STM as torch modules with tensor-only signatures, the form
torch.onnx.export takes: query encoder, memory encoder, decoder, soft aggregation."""
import torch
from torch import nn

from stm_model.network.stm import QueryFeatures, soft_aggregate


class QueryEncoder(nn.Module):
    """frame (1, 3, H, W) -> key (1, Ck, h, w), value (1, Cv, h, w), r3, r2."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frame):
        return self.model.encode_query(frame).tensors()


class MemoryEncoder(nn.Module):
    """frame (1, 3, H, W), object_probs (n, H, W) [, scribbles (n, 2, H, W)] -> key
    (n, Ck, h, w), value (n, Cv, h, w): STM.encode_memory for any n. The other objects' mask
    is the sum of all minus the object's own (STM.memory_encoder_inputs sums the others one
    by one, a loop over n that an export would fix to the example's n)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frame, object_probs, scribbles=None):
        masks = object_probs.unsqueeze(1)  # (n, 1, H, W)
        others = (masks.sum(0, keepdim=True) - masks).clamp(0, 1)
        frames = frame.expand(masks.shape[0], -1, -1, -1)
        inputs = [frames, masks, others] + ([] if scribbles is None else [scribbles])
        r4, _, _ = self.model.memory_encoder(*inputs)
        return self.model.memory_key_value(r4)


class Decoder(nn.Module):
    """readout (n, Cv, h, w), the query's value (1, Cv, h, w), r3, r2 -> foreground
    probabilities (n, H, W)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, readout, value, r3, r2):
        return self.model.foreground(readout, QueryFeatures(None, value, r3, r2))


class Aggregate(nn.Module):
    """foreground (n, H, W) -> probabilities (n + 1, H, W), background first (the official
    soft aggregation, then a softmax over the objects)."""

    def forward(self, foreground):
        return torch.softmax(soft_aggregate(foreground), dim=0)
