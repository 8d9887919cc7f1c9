"""STM's main-training forward over clips, with activation checkpointing.

    clips = ClipForward(model, checkpointing="all").train()
    logits = clips(frames, first_probs)          # (S, T-1, n+1, H, W), background first
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(0, 1))

The network (stm_model.network.stm.STM) knows nothing of training: this wrapper runs its modules
over a clip and decides what the backward recomputes. Its parameters are the model's (a
state_dict of the model, not of the wrapper, is what gets saved).
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stm_kernels import memory_read

from stm_model.network.stm import STM, QueryFeatures, foreground_of, per_object, soft_aggregate
from stm_model.training.config import CHECKPOINTING



class ClipForward(nn.Module):
    """Training forward of `model` over clips (see the module docstring).

    Args:
        model: the STM to train (its parameters are this module's).
        checkpointing: activation checkpointing level, one of CHECKPOINTING.
    """

    def __init__(self, model: STM, checkpointing: str = "none") -> None:
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}; got "
                             f"{checkpointing!r}")
        self.model = model
        self.checkpointing = checkpointing
        self._inside_checkpoint = False  # modules run unwrapped inside a _per_frame checkpoint

    def forward(self, frames, first_probs, object_valid=None, first_scribbles=None):
        """STM's main-training recurrence.

        frames (S, T, 3, H, W) RGB in [0, 1]; first_probs (S, n, H, W) the objects' masks on
        frame 0; object_valid (S, n) bool, False for padding objects of clips with fewer than n.
        Frame 0 is memorised with its masks; every later frame is segmented from the memory of
        all earlier frames and then memorised with its own predicted (soft) probabilities.
        Returns soft-aggregated logits (S, T-1, n+1, H, W) for frames 1..T-1, background first.
        The memory is a growing list of per-frame chunks (memory_read saves them uncopied).

        Interactive model: first_scribbles (S, n, 2, H, W) are the user's scribbles on frame 0
        and first_probs the mask before them (the previous round's, or zeros); frame 0 is then
        also segmented from the memory (it is what the user corrected) and the logits cover
        frames 0..T-1 (S, T, n+1, H, W).
        """
        S, T = frames.shape[:2]
        n = first_probs.shape[1]
        valid = (torch.ones(S, n, dtype=torch.bool, device=frames.device)
                 if object_valid is None else object_valid.to(frames.device))
        config = self.model.config
        keys, values = self._encode_memory(frames[:, 0], first_probs, first_scribbles)
        memory_keys, memory_values = [keys.unsqueeze(2)], [values.unsqueeze(2)]  # (B, C, 1, h, w)
        outputs = []
        for t in range(0 if first_scribbles is not None else 1, T):
            query = self.model.query_features(self._run(1, self.model.query_encoder,
                                                        frames[:, t]))
            readout = memory_read(per_object(query.key, n), memory_keys, memory_values,
                                  similarity=config.similarity, backend=config.read_backend)
            logits = self._per_frame(self._clip_logits, readout, query.value, query.r3,
                                     query.r2, valid)
            outputs.append(logits)
            if 0 < t < T - 1:
                keys, values = self._per_frame(self._memorise_prediction, frames[:, t], logits)
                memory_keys.append(keys.unsqueeze(2))
                memory_values.append(values.unsqueeze(2))
        return torch.stack(outputs, dim=1)

    def _encode_memory(self, frame, object_probs, scribbles=None):
        inputs = self.model.memory_encoder_inputs(frame, object_probs, scribbles)
        r4, _, _ = self._run(1, self.model.memory_encoder, *inputs)
        return self.model.memory_key_value(r4)

    def _clip_logits(self, readout, value, r3, r2, valid):
        """Soft-aggregated logits (S, n+1, H, W) of one frame of each clip."""
        S, n = valid.shape
        query = QueryFeatures(None, value, r3, r2)
        inputs = self.model.decoder_inputs(readout, query)
        foreground = foreground_of(self._run(2, self.model.decoder, *inputs))
        foreground = foreground.unflatten(0, (S, n)) * valid[:, :, None, None]
        return torch.stack([soft_aggregate(clip) for clip in foreground])

    def _memorise_prediction(self, frame, logits):
        return self._encode_memory(frame, torch.softmax(logits, 1)[:, 1:])

    def _per_frame(self, function, *inputs):
        """Under checkpointing="all" a frame's whole head (decoder + soft aggregation) and its
        memory encoding (mask preparation included) are recomputed in the backward: only their
        inputs stay, not their full-resolution intermediates (which dominate a long clip's
        memory once the read keeps no affinity). Modules inside run unwrapped then."""
        if self.checkpointing != "all" or not torch.is_grad_enabled():
            return function(*inputs)
        return checkpoint(self._unwrapped, function, *inputs, use_reentrant=False)

    def _unwrapped(self, function, *inputs):
        previous, self._inside_checkpoint = self._inside_checkpoint, True
        try:
            return function(*inputs)
        finally:
            self._inside_checkpoint = previous

    def _run(self, level, module, *inputs):
        """module(*inputs), recomputed in the backward when the checkpointing level reaches
        `level` (1: the encoders, 2: the decoder too) outside a _per_frame checkpoint."""
        if (CHECKPOINTING.index(self.checkpointing) >= level and torch.is_grad_enabled()
                and not self._inside_checkpoint):
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)
