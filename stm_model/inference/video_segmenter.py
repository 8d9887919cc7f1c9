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
remove_objects(ids) forgets objects (their memory rows and probability channels); a later mask
may bring an id back, as a new object.

Start anywhere: the first mask may be on any frame t of the video. VideoSegmenter(model,
start_frame=t) is fed frames t, t+1, ... (reverse=True: t, t-1, ..., 0, i.e. segmenting
backwards from a memory seeded with frame t); frame indices (memory slots, error messages)
are the video's, and the schedule counts from t. stm_model.inference.directions runs both
directions over a random-access frame source.

Resuming an interrupted run (`stm segment --resume`): replay(frame, labels) memorises a frame
from the labels that run wrote for it, as step() would have after segmenting it, without
segmenting it; only the frames the schedule keeps are encoded.

High resolution (max_internal_size): see stm_model.inference.resize. compile=True: torch.compile
of the per-frame network work and memory read, one graph for every memory length (see _Compiled;
with CUDA graphs, one graph of the step, read included, per memory capacity).
"""
import dataclasses
from typing import Any, Iterable, Optional, Union

import torch

from stm_kernels import backends

from stm_model.memory.storage import read_in_storage_dtype

from stm_model.inference.masks import check_first_mask, labels_of, merge_mask, object_ids
from stm_model.memory.bank import MemoryBank
from stm_model.memory.schedule import PendingFrame, is_kept
from stm_model.inference.options import SegmenterOptions
from stm_model.network.stm import STM, pad_to_multiple, soft_aggregate, unpad
from stm_model.inference.resize import (downsample_probs, internal_size, model_internal_size,
                                        resize_frame, upsample_probs)
from stm_model.inference.session import SessionCore, checked_frame_and_mask
from stm_model.runtime.devices import DtypeName


class VideoSegmenter(SessionCore):
    """Segments a video one frame at a time (see the module docstring).

    Args:
        model: an STM (put in eval mode here).
        mem_every: keep every mem_every-th frame in memory (official: 5).
        memory_dtype: storage dtype of the memory ("fp32", "fp16", "bf16" or a torch dtype;
            default: the model's dtype). Halves the memory at a small precision cost. "int8"
            or "fp8": 8 bits with float32 scales, about half of bf16's bytes (SessionCore,
            MemoryBank; docs/segmenting.md says when); read eagerly by the torch backend
            (with compile, the network is compiled and the read runs between), not with
            shard_memory.
        max_memory_frames: bound on the frames per memory bank (FIFO eviction of the oldest
            kept frame; the first frame always stays). None: unbounded.
        offload: keep the memory in CPU memory and read it chunk by chunk on the device.
        offload_chunk_frames: memory frames per chunk when offloading.
        amp_dtype: run the encoders and decoder under torch.autocast with this dtype (None
            or "fp32": no autocast, the default; "auto": bf16 on a CPU with bf16 dot products,
            as SessionCore says).
        read_backend: memory_read backend (default: the model config's).
        shard_memory: spread the memory over the ranks of shard_group (torch.distributed):
            every rank runs this segmenter on the same frames and masks, stores every
            world_size-th memory frame (MemoryBank's round-robin slots) and reads through
            stm_kernels.distributed.memory_read; every rank returns the same probabilities as
            one process holding the whole memory. Each rank keeps about 1/world_size of the
            memory (long videos on several GPUs).
        shard_group: the process group of shard_memory (default: every rank).
        start_frame: video index of the first frame stepped (the one with the first mask).
        reverse: the frames come in decreasing order (start_frame, start_frame - 1, ...).
        max_internal_size: run the network on frames whose shorter side is larger than this
            resized to it (stm_model.inference.resize); probabilities come back at the input size.
            None: the model's own (STMConfig.internal_size), else the input size.
        compile: torch.compile the per-frame work (query encoder, memory read, decoder;
            memory encoder). True: torch.compile's defaults (inductor); a dict: torch.compile
            keyword arguments (e.g. {"mode": "max-autotune"}). The memory length is a dynamic
            dimension: growing memory does not recompile (a frame size, object count or
            dtype does). With CUDA graphs ({"mode": "reduce-overhead"}, "max-autotune", or
            backend "cudagraphs") the step (query encoder, read, decoder) is one graph that
            reads each bank's whole storage with its lengths on the device
            (MemoryBank.fixed_capacity): recorded once per capacity (the storage doubles when
            full), replayed at every memory length up to it. Offloaded or sharded memory, or
            on a GPU a read backend resolving to "torch" (which reads the lengths on the
            host), keeps the read eager between the graphed query encoder and decoder.
    """

    def __init__(self, model: STM, mem_every: int = 5, *, memory_dtype: DtypeName = None,
                 max_memory_frames: Optional[int] = None, offload: bool = False,
                 offload_chunk_frames: int = 64, amp_dtype: DtypeName = None,
                 read_backend: Optional[str] = None, shard_memory: bool = False,
                 shard_group: Optional[Any] = None, start_frame: int = 0,
                 reverse: bool = False, max_internal_size: Optional[int] = None,
                 compile: Union[bool, dict] = False) -> None:
        self.options = SegmenterOptions(
            mem_every=mem_every, memory_dtype=memory_dtype, max_memory_frames=max_memory_frames,
            offload=offload, offload_chunk_frames=offload_chunk_frames, amp_dtype=amp_dtype,
            read_backend=read_backend, shard_memory=shard_memory, shard_group=shard_group,
            start_frame=start_frame, reverse=reverse, max_internal_size=max_internal_size,
            compile=compile)
        super().__init__(model, memory_dtype=memory_dtype, amp_dtype=amp_dtype,
                         read_backend=read_backend)
        self.mem_every, self.max_memory_frames = int(mem_every), max_memory_frames
        self.offload, self.offload_chunk_frames = offload, offload_chunk_frames
        self.shard_memory, self.shard_group = shard_memory, shard_group
        self.max_internal_size = model_internal_size(model, max_internal_size)
        self._compiled = _Compiled.of(compile)
        self._graph_read_backend: Optional[str] = None  # the read's backend (_read_in_graph)
        self.reset(start_frame, reverse)

    @classmethod
    def from_options(cls, model: STM, options: SegmenterOptions) -> "VideoSegmenter":
        """A VideoSegmenter with the given options."""
        return cls(model, **options.arguments())

    def reset(self, start_frame: int = 0, reverse: bool = False) -> None:
        """Forget the video: memory, objects and frame count. The next frame stepped is video
        frame start_frame (it needs a mask); reverse=True: later steps go backwards in the
        video (start_frame - 1, start_frame - 2, ...)."""
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"start_frame must be a frame index >= 0; got {start_frame!r}")
        self.object_ids: list[int] = []  # object id of output channel k is object_ids[k - 1]
        self.banks: list[MemoryBank] = []  # MemoryBank per group of objects that entered together
        self.start_frame, self.reverse = start_frame, bool(reverse)
        self.frame_index = start_frame  # video index of the next frame
        self.steps = 0                  # frames stepped since start_frame
        self._pending: Optional[PendingFrame] = None  # the last frame, memorised next step
        self._size: Optional[tuple] = None

    def with_options(self, **overrides: Any) -> "VideoSegmenter":
        """A new VideoSegmenter on the same model with this one's options (overrides replace
        some, e.g. start_frame, reverse) and an empty memory; compiled functions are shared."""
        options = dataclasses.replace(self.options, **overrides)
        segmenter = VideoSegmenter.from_options(self.model, dataclasses.replace(
            options, compile=False))
        segmenter._compiled = self._compiled if options.compile is self.options.compile \
            else _Compiled.of(options.compile)
        segmenter.options = options
        return segmenter

    @property
    def num_objects(self) -> int:
        """Objects being segmented (the probabilities have num_objects + 1 channels)."""
        return len(self.object_ids)

    @property
    def memory_frames(self) -> int:
        """Frames in the largest memory bank (what a read of the oldest objects sees)."""
        return max((bank.num_frames for bank in self.banks), default=0)

    @property
    def memory_bytes(self) -> int:
        """Bytes of memory-bank storage, the capacity set aside included (this rank's share
        when the memory is sharded); memory_held_bytes is what the frames held take."""
        return sum(bank.nbytes for bank in self.banks)

    @property
    def memory_held_bytes(self) -> int:
        """Bytes of the memory frames held, all banks together (this rank's share when
        sharded): memory_bytes without the capacity not filled yet."""
        return sum(bank.held_bytes for bank in self.banks)

    @property
    def memory_bytes_per_frame(self) -> int:
        """Bytes one memory frame takes in storage, all objects' banks together (this rank's
        share when sharded): what the memory grows by per kept frame."""
        return sum(bank.bytes_per_frame for bank in self.banks)

    @torch.no_grad()
    def step(self, frame: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Segment the next frame; returns (K, H, W) probabilities, background first.

        frame: (3, H, W) float RGB in [0, 1]. mask: optional (H, W) integer object ids
        (0 = background), required on the first frame (start_frame).
        """
        frame, mask = self._checked(frame, mask)
        if self.steps == 0:
            check_first_mask(mask, self.object_ids)
        self._begin_graphed_step()
        size = tuple(frame.shape[1:])
        inner = internal_size(size, self.max_internal_size)
        resized = inner != size
        padded, pad = pad_to_multiple(resize_frame(frame, inner).unsqueeze(0))
        if self._pending is not None:
            self._memorise(self._pending)
            self._pending = None
        with self.autocast():
            foreground = self._predict(padded) if self.banks else padded.new_zeros(
                (0,) + padded.shape[-2:])
        # a copy where CUDA graphs own the decoder's output (the next replay overwrites it)
        foreground = foreground.to(torch.float32, copy=self._graphed)
        if mask is None:
            probs = unpad(torch.softmax(soft_aggregate(foreground), dim=0), pad)
            keep = is_kept(self.steps, self.mem_every, annotated=False)
            memorised = probs
            probs = upsample_probs(probs, size)
        elif not resized:
            probs = unpad(self._apply_mask(foreground, pad_to_multiple(mask)[0],
                                           padded.shape[-2:]), pad)
            keep, memorised = True, probs
        else:  # merged at the input size: the mask's own pixels, however thin its objects
            probs = self._apply_mask(upsample_probs(unpad(foreground, pad), size), mask,
                                     padded.shape[-2:])
            keep, memorised = True, downsample_probs(probs, inner)
        # memorised as the official code does: the returned (cropped) probabilities, zero-padded
        self._pending = PendingFrame(padded, pad_to_multiple(memorised[1:])[0], keep,
                                     self.frame_index)
        self.frame_index += -1 if self.reverse else 1
        self.steps += 1
        return probs

    @torch.no_grad()
    def replay(self, frame: torch.Tensor, labels: torch.Tensor, annotated: bool = False
               ) -> torch.Tensor:
        """Take the next frame as segmented already, with these labels: it is memorised as
        step() would have memorised it (kept or not by the schedule), without segmenting it.
        Resumes an interrupted run from the masks it wrote: replaying its frames, then
        stepping on, reaches the memory that run had (up to the probabilities: the run
        memorised its soft ones, a replay the one-hot labels; see docs/segmenting.md).

        frame: (3, H, W) as for step(); labels: (H, W) integer object ids written for it;
        annotated: the frame came with a mask in that run (it is kept; ids new here become
        objects, as a given mask's do; elsewhere an unknown id is a ValueError). Returns the
        (K, H, W) one-hot probabilities of labels.
        """
        if labels is None:
            raise ValueError("replay needs the labels written for the frame; got None")
        frame, labels = self._checked(frame, labels)
        if self.steps == 0:
            check_first_mask(labels, self.object_ids)
        new_ids = [i for i in object_ids(labels) if i not in self.object_ids]
        if new_ids and not annotated:
            raise ValueError(f"labels of frame {self.frame_index} hold ids {new_ids} that are "
                             f"not objects of this video (objects: {self.object_ids}); new "
                             "objects come with a mask (annotated=True)")
        size = tuple(frame.shape[1:])
        inner = internal_size(size, self.max_internal_size)
        padded, _ = pad_to_multiple(resize_frame(frame, inner).unsqueeze(0))
        self._begin_graphed_step()
        if self._pending is not None and self._pending.keep:
            self._memorise(self._pending)  # a temporary one: replaced by this frame anyway
        self._pending = None
        if new_ids:
            self._add_objects(new_ids, padded.shape[-2:])
        ids = torch.tensor([0] + self.object_ids, device=labels.device)
        probs = (labels.unsqueeze(0) == ids[:, None, None]).float()
        memorised = probs if inner == size else downsample_probs(probs, inner)
        keep = is_kept(self.steps, self.mem_every, annotated=annotated)
        self._pending = PendingFrame(padded, pad_to_multiple(memorised[1:])[0], keep,
                                     self.frame_index)
        self.frame_index += -1 if self.reverse else 1
        self.steps += 1
        return probs

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(H, W) int64 object ids (0 = background) of the most probable channel."""
        return labels_of(probs, self.object_ids)

    def remove_objects(self, ids: Iterable[int], probs: Optional[torch.Tensor] = None
                       ) -> Optional[torch.Tensor]:
        """Forget objects: their rows leave the memory banks (a bank left empty is dropped),
        their channels leave the probabilities awaiting memorisation, and later steps return
        K - len(ids) channels. A later mask may reintroduce an id: it is then a new object
        (a memory of its own from that frame on).

        ids: object ids (ValueError for ids that are not objects of this video). probs:
        optionally probabilities (K, H, W) from the last step; returned without the removed
        channels, their probability moved to the background (None: returns None).
        """
        ids = [int(i) for i in ids]
        unknown = [i for i in ids if i not in self.object_ids]
        if unknown:
            raise ValueError(f"ids {unknown} are not objects of this video (objects: "
                             f"{self.object_ids})")
        if probs is not None and (probs.dim() != 3 or probs.shape[0] != self.num_objects + 1):
            raise ValueError(f"probs must be ({self.num_objects + 1}, H, W) probabilities of "
                             f"the last step; got {tuple(probs.shape)}")
        removed = sorted({self.object_ids.index(i) for i in ids})  # object (channel - 1) index
        start, banks = 0, []
        for bank in self.banks:
            rows = [o - start for o in removed if start <= o < start + bank.num_objects]
            start += bank.num_objects
            if len(rows) == bank.num_objects:
                continue  # every object of this bank: drop the bank
            if rows:
                bank.remove_objects(rows)
            banks.append(bank)
        kept = [o for o in range(self.num_objects) if o not in removed]
        if self._pending is not None:
            self._pending = self._pending.with_objects(kept)
        self.banks = banks
        self.object_ids = [self.object_ids[o] for o in kept]
        if probs is None:
            return None
        background = probs[:1] + probs[[o + 1 for o in removed]].sum(0, keepdim=True)
        return torch.cat([background, probs[[o + 1 for o in kept]]])

    def _checked(self, frame, mask):
        frame, mask = checked_frame_and_mask(frame, mask, expected_size=self._size,
                                             frame_index=self.frame_index, device=self.device,
                                             first=self.steps == 0)
        self._size = tuple(frame.shape[1:])
        return frame, mask

    @property
    def _read_in_graph(self) -> bool:
        """Whether CUDA graphs hold the read too: memory on the compute device (not offloaded
        or sharded), read by a backend that takes device lengths under capture ("triton",
        "naive"; the "torch" backend reads them on the host), or no GPU (nothing recorded)."""
        if self.offload or self.shard_memory or self.eight_bit_memory:
            return False
        if self._graph_read_backend is None:
            self._graph_read_backend = backends.resolve(
                self.read_backend, torch.empty(0, dtype=self.read_dtype, device=self.device))
        return self.device.type != "cuda" or self._graph_read_backend in ("triton", "naive")

    @property
    def _graphed(self) -> bool:
        """Whether the compiled network work runs as CUDA graphs (see `compile`)."""
        return self._compiled is not None and self._compiled.graphs

    def _begin_graphed_step(self):
        """Tell CUDA graph trees that a step begins: the previous step's graph outputs may be
        overwritten now (each is copied or consumed within its step)."""
        if self._graphed:
            torch.compiler.cudagraph_mark_step_begin()

    def _memorise(self, pending: PendingFrame):
        if not self.banks:  # no objects (all removed, or a mask without any)
            return
        with self.autocast():
            encode = self._compiled.encode_memory if self._compiled else _encode_memory
            keys, values = encode(self.model, pending.frame, pending.object_probs)
        start = 0
        for bank in self.banks:
            stop = start + bank.num_objects
            bank.add(keys[start:stop], values[start:stop], pending.keep, pending.frame_index)
            start = stop

    def _predict(self, padded):
        """Foreground probabilities (n, Hp, Wp) of the known objects from their memory."""
        config = self.model.config
        compiled = self._compiled
        if compiled is not None and compiled.graphs and self._read_in_graph:
            # the whole storage with the lengths on the device: one CUDA graph per capacity
            memories = [bank.fixed_capacity() for bank in self.banks]
            return compiled.predict(self.model, padded, compiled.static(m.keys for m in memories),
                                    compiled.static(m.values for m in memories),
                                    config.similarity, self.read_backend,
                                    compiled.static(m.lengths for m in memories))
        if compiled is not None and not (self.offload or self.shard_memory or compiled.graphs
                                         or self.eight_bit_memory):
            for bank in self.banks:
                if bank.num_frames == bank.capacity:
                    # a view filling its storage is contiguous, which inductor's graph for
                    # strided views excludes (a second graph); the bank's next permanent frame
                    # would grow it anyway
                    bank.reserve(bank.capacity + 1)
            keys, values = zip(*(bank.memory_views() for bank in self.banks), strict=True)
            return compiled.predict(self.model, padded, compiled.dynamic(keys),
                                    compiled.dynamic(values), config.similarity,
                                    self.read_backend)
        # offloaded, sharded or 8-bit memory (chunked copies, collectives, QuantizedMemory
        # chunks), or CUDA graphs with a read that cannot be captured with its lengths: the
        # read stays eager
        query = (compiled.encode_query if compiled else _encode_query)(self.model, padded)
        readout = torch.cat([bank.read(query.key, similarity=config.similarity,
                                       backend=self.read_backend) for bank in self.banks])
        return (compiled.foreground if compiled else _foreground)(self.model, readout, query)

    def _apply_mask(self, foreground, mask, padded_size):
        """Probabilities (K, Hp, Wp) after a given mask (see merge_mask); new ids get a
        MemoryBank of their own (of the padded network size)."""
        probs, new_ids = merge_mask(foreground, mask, self.object_ids)
        if new_ids:
            self._add_objects(new_ids, padded_size)
        return probs

    def _add_objects(self, new_ids, padded_size):
        """New objects, entering together: a MemoryBank of their own (of the padded size)."""
        self.banks.append(self.new_memory_bank(
            len(new_ids), padded_size, max_frames=self.max_memory_frames,
            offload=self.offload, chunk_frames=self.offload_chunk_frames,
            shard_memory=self.shard_memory, shard_group=self.shard_group))
        self.object_ids += new_ids


def _encode_query(model, padded):
    return model.encode_query(padded)


def _foreground(model, readout, query):
    return model.foreground(readout, query)


def _encode_memory(model, padded, object_probs):
    return model.encode_memory(padded, object_probs)


def _predict_from_views(model, padded, keys, values, similarity, backend, lengths=None):
    """Query encoder, the memory read of every bank and the decoder, in one function so that
    torch.compile captures them as one graph (the read is an opaque custom op in it). keys,
    values: each bank's MemoryBank.memory_views, or with lengths (each bank's (n,) lengths
    on the device) its whole storage (MemoryBank.fixed_capacity)."""
    query = model.encode_query(padded)
    lengths = [None] * len(keys) if lengths is None else lengths
    readout = torch.cat([read_in_storage_dtype(query.key, k, v, similarity=similarity,
                                               backend=backend,  # --memory-dtype's
                                               memory_lengths=length)
                         for k, v, length in zip(keys, values, lengths, strict=True)])
    return _foreground(model, readout, query)


def uses_cuda_graphs(options: dict) -> bool:
    """Whether torch.compile with these keyword arguments replays CUDA graphs: the cudagraphs
    backend, or inductor with triton.cudagraphs set by its mode ("reduce-overhead",
    "max-autotune") or its options."""
    backend = options.get("backend", "inductor")
    if backend == "cudagraphs":
        return True
    if backend != "inductor":
        return False
    from torch._inductor import list_mode_options
    settings = {**list_mode_options(options.get("mode")), **(options.get("options") or {})}
    return bool(settings.get("triton.cudagraphs", False))


class _Compiled:
    """The torch.compile'd per-frame functions of a VideoSegmenter.

    Recompilation: the memory views a read gets grow by h·w positions per memory frame. Their
    position dimension is marked dynamic (maybe_mark_dynamic), so one graph serves every
    memory length (the fake implementation of stm_kernels' custom op does not depend on it):
    one graph per frame size, object grouping and dtype (tested). A view that filled its
    bank's capacity exactly would be contiguous, which inductor's guards tell apart (a second
    graph, compiled mid-video): such a bank grows first (VideoSegmenter._predict). Reading
    the whole capacity with memory_lengths would bound recompiles too, but memory_read's
    argument checks specialise on N then: one graph per capacity.

    CUDA graphs (graphs=True) are recorded per concrete shape, dynamic dimensions included: a
    graph holding a read of the memory views would be recorded again every kept frame. So the
    graphed step reads each bank's whole storage with its lengths on the device
    (MemoryBank.fixed_capacity), shapes that change only when the storage grows, marked as
    static addresses (static): CUDA graph trees read them in place, never copy them in, and
    record anew when the storage moves. Where that read cannot be captured
    (VideoSegmenter._read_in_graph), the query encoder and decoder are graphed apart and the
    read runs eagerly between them.
    """

    def __init__(self, options):
        self.options = options
        self.graphs = uses_cuda_graphs(options)
        self.predict = torch.compile(_predict_from_views, **options)
        self.encode_query = torch.compile(_encode_query, **options)
        self.foreground = torch.compile(_foreground, **options)
        self.encode_memory = torch.compile(_encode_memory, **options)

    @classmethod
    def of(cls, compile):
        """None for compile=False/None, else the compiled functions (True: torch.compile's
        defaults; a mapping: its keyword arguments)."""
        if compile is None or compile is False:
            return None
        if compile is True:
            return cls({})
        if hasattr(compile, "items"):
            return cls(dict(compile))
        raise ValueError("compile must be True, False or a dict of torch.compile keyword "
                         f"arguments; got {compile!r}")

    @staticmethod
    def dynamic(views):
        for view in views:
            torch._dynamo.maybe_mark_dynamic(view, 2)
        return list(views)

    @staticmethod
    def static(tensors):
        """tensors as a list, each marked as an input whose address stays (storage, lengths):
        CUDA graph trees read it where it is instead of copying it in at every replay, and
        record anew when it moves (the storage grew: a new capacity)."""
        tensors = list(tensors)
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor, guard=False)
        return tensors
