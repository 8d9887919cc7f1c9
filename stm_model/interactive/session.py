"""Interactive video object segmentation with STM's memory (the unified model of the DAVIS-2019
interactive track): the frames the user scribbled on form the memory, every frame is a query.

    session = InteractiveSession(model, frames, num_objects=2)    # frames (T, 3, H, W) in [0, 1]
    labels = session.interact(scribbles)    # DAVIS-format scribbles -> (T, H, W) object ids
    labels = session.interact(more)         # a later round refines from the previous masks

A round: (1) on each annotated frame, the regions of the current masks that the new strokes
contradict take the strokes' ids (a stroke of object k across a region predicted as object j
claims that region, near the stroke, for k: see scribbles.corrected_regions); the frame is encoded
into the memory from the frame, the current mask of every object (the previous round's
probabilities, zeros at first, with the drawn pixels set to what the user said) and the
scribbles as positive/negative channels; a frame annotated again replaces its own memory slot.
(2) That frame is segmented from this memory and memorised again with the new mask
(`refine_steps` times): the network serves as its own interaction network, so the memory holds
a mask that follows the scribbles beyond the drawn pixels. (3) The other frames are segmented
from that memory, `batch_size` frames per fused read (their query positions are concatenated:
one read of all memory positions per batch); with `mem_every`, by propagation from the
annotated frames instead, forwards and backwards, as the semi-supervised segmenter does from a
first frame: each frame, propagated from its nearest frame annotated in this round, reads the
annotated frames' memory plus every `mem_every`-th frame predicted on the way (kept for that
propagation only), `mem_every` frames per read at most. The new masks are blended with the
previous ones by distance to the annotated frames, as IPN does (`merge`): frames beyond a frame
annotated in an earlier round keep their masks and are not re-segmented (merge=False
re-segments every frame). Query keys, values and decoder skips are
computed once per frame and cached, so a round costs the memory encodings of the annotated (and
propagated) memory frames, the reads and the decoders. Pixels under a stroke take the stroke's
label in the returned masks.
"""
import dataclasses
import time
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from stm_model.interactive import scribbles as scribble_format
from stm_model.memory.storage import read_in_storage_dtype
from stm_model.network.checkpoint import copy_synthetic_mark
from stm_model.network.stm import (STM, load_into_interactive, pad_to_multiple, soft_aggregate,
                                   unpad)
from stm_model.memory.query_cache import QueryFeatureCache
from stm_model.inference.resize import (checked_max_internal_size, internal_size,
                                        model_internal_size, resize_frame,
                                        upsample_probs)
from stm_model.inference.session import SessionCore, checked_frames
from stm_model.runtime.devices import DtypeName, dtype_option


def as_interactive(model: STM) -> STM:
    """An interactive STM with the weights of a semi-supervised one (the scribble conv starts at
    zero: scribbles then act only through the mask they paint, until it is trained)."""
    if model.config.interactive:
        return model
    interactive = STM(dataclasses.replace(model.config, interactive=True))
    load_into_interactive(interactive, model.state_dict())
    copy_synthetic_mark(model, interactive)  # still the synthetic-only weights
    parameter = next(model.parameters())
    return interactive.to(parameter.device, parameter.dtype).train(model.training)


@dataclasses.dataclass
class RoundInfo:
    """What one `interact` call did."""
    annotated_frames: list
    seconds: float
    memory_frames: int
    encoded_queries: int  # frames whose query features were computed in this round


class InteractiveSession(SessionCore):
    """Interactive segmentation of one video (see the module docstring).

    Args:
        model: an interactive STM (STMConfig(interactive=True)); a semi-supervised one is
            converted with `as_interactive` (with a warning: its scribble channels are untrained).
        frames: (T, 3, H, W) float RGB in [0, 1] (any device; moved to the model's in batches).
        num_objects: n; scribbles may name objects 1..n and the background 0.
        batch_size: frames segmented per fused memory read.
        line_width: width in pixels of rasterised strokes.
        refine_steps: times an annotated frame is re-segmented from the memory holding its
            scribbles and memorised again with that mask before the other frames are segmented
            (0: memorise the previous mask with the scribbles painted in, as is).
        claim_regions: the regions the strokes contradict take the strokes' ids in the
            annotated frame's mask before it is memorised (see the module docstring); False
            keeps the previous mask with only the drawn pixels changed, which the network
            tends to reproduce (an identity switch survives a stroke across it).
        mem_every: propagate from the annotated frames, memorising every mem_every-th
            predicted frame on the way (see the module docstring); None (the default: on the
            DAVIS robot rounds propagation gained nothing, docs/interactive.md): the annotated
            frames are the only memory.
        merge: blend each round's masks with the previous round's by distance to the frames
            annotated in the round (as IPN): a frame takes the new mask at a newly annotated
            frame, less of it towards a frame annotated in an earlier round, none beyond it
            (those frames keep their masks and are not re-segmented), all of it where no earlier
            annotation lies in between. False: every frame takes its new mask.
        memory_dtype, cache_dtype: storage dtypes of the memory and of the per-frame query
            cache and masks ("fp32", "fp16", "bf16"; default: the model's dtype; the memory
            also "int8" or "fp8", as VideoSegmenter's).
        cache_device: where the query cache and masks live (default: the model's device).
        amp_dtype: autocast the network with this dtype.
        read_backend: memory_read backend (default: the model config's).
        show_progress: a progress bar over each round's batches.
        sequence: the video's name (the progress bar's label).
        max_internal_size: segment frames whose shorter side is larger than this resized to
            it (as VideoSegmenter's); scribbles are drawn and masks kept at that size, and
            labels() come back at the input size. None: the model's own
            (STMConfig.internal_size), else the input size.
    """

    def __init__(self, model: STM, frames: torch.Tensor, num_objects: int, *,
                 batch_size: int = 8, line_width: int = 3, refine_steps: int = 1,
                 claim_regions: bool = True, merge: bool = True, mem_every: Optional[int] = None,
                 memory_dtype: DtypeName = None, cache_dtype: DtypeName = None,
                 cache_device: Union[str, torch.device, None] = None,
                 amp_dtype: DtypeName = None, read_backend: Optional[str] = None,
                 show_progress: bool = False, sequence: Optional[str] = None,
                 max_internal_size: Optional[int] = None) -> None:
        frames = checked_frames(frames)
        self.input_size = tuple(frames.shape[-2:])
        inner = internal_size(self.input_size, checked_max_internal_size(
            model_internal_size(model, max_internal_size)))
        if inner != self.input_size:  # resized once, batch by batch (bounded memory)
            frames = torch.cat([torch.stack([resize_frame(frame, inner) for frame in chunk])
                                for chunk in frames.split(max(1, int(batch_size)))])
        if isinstance(num_objects, bool) or int(num_objects) != num_objects or num_objects < 1:
            raise ValueError(f"num_objects must be a positive integer; got {num_objects!r}")
        cache_dtype = dtype_option("cache_dtype", cache_dtype)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if mem_every is not None and (isinstance(mem_every, bool) or int(mem_every) != mem_every
                                      or mem_every < 1):
            raise ValueError(f"mem_every must be a positive integer or None; got {mem_every!r}")
        if not model.config.interactive:
            warnings.warn("InteractiveSession got a semi-supervised STM: converted with "
                          "as_interactive (untrained scribble channels; the scribbles act "
                          "through the mask they paint only)", stacklevel=2)
            model = as_interactive(model)
        super().__init__(model, memory_dtype=memory_dtype, amp_dtype=amp_dtype,
                         read_backend=read_backend)
        self.sequence = sequence
        self.num_frames, self.num_objects = frames.shape[0], int(num_objects)
        self.size = tuple(frames.shape[-2:])
        self.batch_size, self.line_width = int(batch_size), line_width
        self.refine_steps, self.merge = int(refine_steps), bool(merge)
        self.mem_every = None if mem_every is None else int(mem_every)
        self.claim_regions = bool(claim_regions)
        self.cache_dtype = cache_dtype or self.model_dtype
        self.cache_device = torch.device(cache_device) if cache_device else self.device
        self.show_progress = show_progress
        self.frames = frames
        padded, self._pad = pad_to_multiple(frames[:1])
        self.bank = self.new_memory_bank(self.num_objects, padded.shape[-2:])
        self.queries = QueryFeatureCache(self._encode_queries, dtype=self.cache_dtype,
                                         device=self.cache_device)
        self.probs = torch.zeros((self.num_frames, self.num_objects) + self.size,
                                 dtype=self.cache_dtype, device=self.cache_device)
        self.scribble_maps: dict = {}  # frame -> (H, W) int16 map of all strokes so far
        self.rounds: list = []

    # ----------------------------------------------------------------------------- public

    @property
    def memory_frames(self) -> int:
        """Annotated frames in the memory."""
        return self.bank.num_frames

    @property
    def memory_frame_indices(self) -> list[int]:
        """Video frame index held by each memory slot."""
        return list(self.bank.slot_frames)

    def labels(self) -> torch.Tensor:
        """(T, H, W) int64 object ids (0 = background) of the current masks."""
        return torch.cat([self.labels_of(slice(start, start + self.batch_size))  # bounded memory
                          for start in range(0, self.num_frames, self.batch_size)])

    def labels_of(self, frames: Union[int, slice]) -> torch.Tensor:
        """Object ids (on the CPU) of self.probs[frames] (an index or a slice), at the input
        size (the masks upsampled when the session runs at a max_internal_size)."""
        objects = self.probs[frames].float()
        background = 1 - objects.sum(-3, keepdim=True)
        probs = torch.cat([background, objects], -3)
        if self.size != self.input_size:
            single = probs.dim() == 3
            probs = torch.stack([upsample_probs(p, self.input_size)
                                 for p in (probs[None] if single else probs)])
            probs = probs[0] if single else probs
        return probs.argmax(-3).cpu()

    def _labels_inside(self, t: int) -> torch.Tensor:
        """Object ids of frame t at the size the session works at (where scribbles are drawn)."""
        objects = self.probs[t].float()
        return torch.cat([1 - objects.sum(0, keepdim=True), objects]).argmax(0).cpu()

    @torch.no_grad()
    def interact(self, scribbles: dict,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """One round: add the scribbled frame(s) to the memory and re-segment every frame;
        returns the (T, H, W) int64 object ids (on the CPU). Scribbles are in the DAVIS
        interactive format (see stm_model.interactive.scribbles) with one entry per frame.

        progress: called as progress(frames done, frames to segment) before the first batch
        and after each; an exception it raises stops the round and reaches the caller (the
        session is then part-way through the round: a caller that stops a round rebuilds
        the session, as stm annotate does)."""
        scribble_format.check_scribbles(scribbles, self.num_frames, self.num_objects)
        annotated = scribble_format.annotated_frames(scribbles)
        if not annotated:
            raise scribble_format.ScribbleError("the scribbles hold no stroke on any frame")
        self.synchronize()
        start = time.perf_counter()
        encoded_before = len(self.queries)
        earlier = set(self.scribble_maps) - set(annotated)
        height, width = self.size
        for t in annotated:
            drawn = scribble_format.rasterize(scribbles["scribbles"][t], height, width,
                                              self.line_width)
            if self.claim_regions:
                # the regions the strokes contradict take the strokes' ids; the network then
                # refines the mask from there
                claimed = scribble_format.corrected_regions(
                    self._labels_inside(t).numpy(), drawn, self.num_objects)
                channels = torch.from_numpy(scribble_format.scribble_channels(
                    claimed, self.num_objects)).to(self.cache_device)
                self.probs[t] = scribble_format.paint_scribbles(
                    self.probs[t].float(), channels).to(self.cache_dtype)
            previous = self.scribble_maps.get(t)
            if previous is not None:
                drawn = np.where(drawn >= 0, drawn, previous).astype(np.int16)
            self.scribble_maps[t] = drawn
            self._memorise(t)
            for _ in range(self.refine_steps):
                # the model as its own interaction network: the annotated frame's mask is
                # re-predicted from the memory that now holds the scribbles, and memorised again,
                # so that the memory carries the corrected mask, not the previous round's
                self._segment([t])
                self._memorise(t)
        weights = (merge_weights(self.num_frames, annotated, earlier) if self.merge
                   else np.ones(self.num_frames))
        if self.mem_every is None:
            self._segment_all(weights, progress)
        else:
            self._propagate_all(annotated, weights, progress)
        self.synchronize()
        self.rounds.append(RoundInfo(
            annotated_frames=annotated, seconds=time.perf_counter() - start,
            memory_frames=self.memory_frames,
            encoded_queries=len(self.queries) - encoded_before))
        return self.labels()

    # ----------------------------------------------------------------------------- steps

    def _memorise(self, t):
        channels = torch.from_numpy(scribble_format.scribble_channels(
            self.scribble_maps[t], self.num_objects)).to(self.device)
        current = self.probs[t].to(self.device, torch.float32)
        painted = scribble_format.paint_scribbles(current, channels)
        frame = pad_to_multiple(self.frames[t:t + 1].to(self.device, torch.float32))[0]
        with self.autocast():
            keys, values = self.model.encode_memory(frame, pad_to_multiple(painted)[0],
                                                    pad_to_multiple(channels)[0])
        self.bank.put(keys, values, t)

    def _segment_all(self, weights, progress=None):
        """Segment the frames of nonzero weight, `batch_size` per read, blending the new masks
        with the previous ones by `weights` (T,); progress(done, total) as interact's."""
        frames = [t for t in range(self.num_frames) if weights[t] > 0]
        starts = range(0, len(frames), self.batch_size)
        if progress is not None:
            progress(0, len(frames))
        for start in tqdm(starts, unit="batch", disable=not self.show_progress,
                          desc=f"segmenting {self.sequence or 'video'}"):
            batch = frames[start:start + self.batch_size]
            self._segment(batch, weights)
            if progress is not None:
                progress(start + len(batch), len(frames))

    def _propagate_all(self, annotated, weights, progress=None):
        """Segment the frames of nonzero weight by propagation from the annotated frames (see
        the module docstring), blending by `weights` (T,); progress(done, total) as
        interact's."""
        anchors = np.asarray(sorted(annotated))
        nearest = anchors[np.abs(np.arange(self.num_frames)[:, None] - anchors).argmin(1)]
        runs = []  # (frames in propagation order) from each anchor, each way
        for a in anchors:
            for step in (1, -1):
                run, t = [], a + step
                while 0 <= t < self.num_frames and nearest[t] == a and weights[t] > 0:
                    run.append(int(t))
                    t += step
                runs.append(run)
        total = len(anchors) + sum(len(run) for run in runs)
        if progress is not None:
            progress(0, total)
        done = 0

        def segment(frames, extra=()):
            nonlocal done
            self._segment(frames, weights, extra)
            done += len(frames)
            if progress is not None:
                progress(done, total)
        segment([int(a) for a in anchors])  # as their refine steps left them
        for run in tqdm(runs, unit="run", disable=not self.show_progress,
                        desc=f"propagating {self.sequence or 'video'}"):
            extra: list = []  # the frames memorised on the way
            for start in range(0, len(run), self.mem_every):
                block = run[start:start + self.mem_every]
                for first in range(0, len(block), self.batch_size):
                    segment(block[first:first + self.batch_size], extra)
                if start + self.mem_every < len(run):
                    extra.append(self._encode_prediction(block[-1]))

    def _encode_prediction(self, t):
        """(keys (n, Ck, h·w), values (n, Cv, h·w)) of frame t with its current masks and no
        scribbles, as the bank stores a frame (bank.as_stored): a propagation's memory
        frame."""
        channels = torch.zeros((self.num_objects, 2) + self.size, device=self.device)
        current = self.probs[t].to(self.device, torch.float32)
        frame = pad_to_multiple(self.frames[t:t + 1].to(self.device, torch.float32))[0]
        with self.autocast():
            keys, values = self.model.encode_memory(frame, pad_to_multiple(current)[0],
                                                    pad_to_multiple(channels)[0])
        return self.bank.as_stored(keys.flatten(2), values.flatten(2))

    def _segment(self, indices, weights=None, extra=()):
        """Segment frames `indices` from the memory in one fused read and update self.probs
        (blended with the previous masks by weights[t], default 1: replaced); `extra`: more
        memory frames (keys, values) read with the bank's."""
        query = self.queries.batch(indices, dtype=self.model_dtype, device=self.device)
        count, key_dim, h, w = query.key.shape
        keys = query.key.transpose(0, 1).reshape(1, key_dim, count * h * w)
        config = self.model.config
        with self.autocast():
            if extra:
                stored_keys, stored_values = self.bank.memory_views()  # lists if 8-bit
                readout = read_in_storage_dtype(
                    keys, _listed(stored_keys) + [k for k, _ in extra],
                    _listed(stored_values) + [v for _, v in extra], dtype=self.bank.read_dtype,
                    similarity=config.similarity, backend=self.read_backend)
            else:
                readout = self.bank.read(keys, similarity=config.similarity,
                                         backend=self.read_backend)  # (n, Cv, count·h·w)
            readout = readout.unflatten(2, (count, h, w)).permute(2, 0, 1, 3, 4).flatten(0, 1)
            foreground = self.model.foreground(readout, query)
        foreground = foreground.float().unflatten(0, (count, self.num_objects))
        for offset, t in enumerate(indices):
            probs = unpad(torch.softmax(soft_aggregate(foreground[offset]), 0), self._pad)
            weight = 1.0 if weights is None else float(weights[t])
            if weight < 1:
                objects = weight * probs[1:] + (1 - weight) * self.probs[t].to(
                    probs.device, probs.dtype)
                probs = torch.cat([(1 - objects.sum(0, keepdim=True)).clamp(min=0), objects])
            probs = self._without_undrawn_objects(probs)
            if t in self.scribble_maps:
                probs = _stroke_labels(probs, self.scribble_maps[t])
            self.probs[t] = probs[1:].to(self.cache_device, self.cache_dtype)

    def _without_undrawn_objects(self, probs):
        """probs (n + 1, H, W) with the objects no stroke has drawn yet at 0 (their share goes
        to the background): an object has no pixels until it is scribbled."""
        drawn = set()
        for scribble_map in self.scribble_maps.values():
            drawn.update(int(i) for i in np.unique(scribble_map) if i > 0)
        undrawn = [o for o in range(self.num_objects) if o + 1 not in drawn]
        if not undrawn:
            return probs
        objects = probs[1:].clone()
        objects[undrawn] = 0
        return torch.cat([(1 - objects.sum(0, keepdim=True)).clamp(min=0), objects])

    def _encode_queries(self, indices):
        """QueryFeatures of frames `indices`, batched (what self.queries keeps)."""
        frames = pad_to_multiple(self.frames[indices].to(self.device, torch.float32))[0]
        with self.autocast():
            return self.model.encode_query(frames)


def _listed(memory) -> list:
    """A memory argument (a tensor, or a list of chunks) as a list of chunks."""
    return list(memory) if isinstance(memory, (list, tuple)) else [memory]


def merge_weights(num_frames, annotated, earlier):
    """(T,) weight of this round's mask per frame (see InteractiveSession's `merge`): 1 at the
    frames `annotated` in this round, falling linearly to 0 at the nearest frame annotated in an
    earlier round (`earlier`, which excludes frames annotated again now) and 0 beyond it; 1 on a
    side with no earlier annotation. A frame near several new annotations takes the largest."""
    frames = np.arange(num_frames)
    earlier = np.asarray(sorted(earlier), dtype=np.int64)
    weights = np.zeros(num_frames)
    for a in annotated:
        # a ramp 0 -> 1 -> 0 between the earlier annotations around `a`; np.interp holds the
        # end values beyond them (1 on a side without one)
        before, after = earlier[earlier < a][-1:], earlier[earlier > a][:1]
        stops = np.concatenate([before, [a], after])
        heights = np.concatenate([np.zeros(len(before)), [1.0], np.zeros(len(after))])
        weights = np.maximum(weights, np.interp(frames, stops, heights))
    return weights


def _stroke_labels(probs, scribble_map):
    """(K, H, W) probabilities with the drawn pixels set to their stroke's label (one-hot)."""
    drawn = torch.from_numpy(scribble_map >= 0).to(probs.device)
    if not drawn.any():
        return probs
    ids = torch.from_numpy(scribble_map.astype(np.int64)).to(probs.device).clamp(min=0)
    one_hot = torch.nn.functional.one_hot(ids, probs.shape[0]).permute(2, 0, 1).to(probs.dtype)
    return torch.where(drawn, one_hot, probs)
