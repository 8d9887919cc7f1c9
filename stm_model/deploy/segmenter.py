"""OnnxSegmenter: the VideoSegmenter's schedule and outputs on ONNX graphs, run by onnxruntime
with numpy arrays; no torch.

    seg = OnnxSegmenter("small-real-onnx/")            # written by `stm export ... --format onnx`
    probs = seg.step(frame, mask=labels)   # frame (3, H, W) float32 RGB in [0, 1]; labels (H, W)
    probs = seg.step(frame)                # (K, H, W) float32 probabilities, background first
    labels = seg.labels(probs)             # (H, W) int64 object ids

The same schedule as stm_model.inference.video_segmenter (the first frame, every mem_every-th
and every frame with a mask kept, plus the previous frame), the same merge of later masks
(new ids become objects with a memory of their own), the same resize to the model's internal
size, replay() for resuming, start_frame and reverse. The memory is numpy arrays, one per
memory frame; read="chunk" reads it chunk_frames frames at a time, each chunk's read-out and
log-sum-exp merged exactly, so the read's working memory is bounded by the chunk however long
the video; read="whole" runs one graph over all of it (the Attention operator where the
runtime has it), whose affinity grows with the memory. An export with memory_dtype "int8"
(to_onnx(..., memory_dtype="int8")): each memory frame is quantised as it is added, as the
torch bank does (keys one scale per object and channel, values one per object and position;
arrays.quantize_int8), no float32 copy kept, and the read graphs dequantise it.
"""
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from stm_model.deploy import arrays
from stm_model.deploy.manifest import (MANIFEST, MEMORY_DTYPES, READ_FORMS, ExportFolderError,
                                       check_graph_interface, graph_file, memory_dtype_of,
                                       read_manifest)
from stm_model.inference.options import internal_size
from stm_model.memory.schedule import FrameSlots, PendingFrame, check_schedule, is_kept


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("OnnxSegmenter needs onnxruntime: pip install onnxruntime (or "
                          "'/path/to/stm-kernels[deploy]' from a clone)") from None
    return onnxruntime


class _Graph:
    """One ONNX graph in an onnxruntime session, called with its inputs by name; checked
    against the manifest (ExportFolderError naming the file when it cannot be loaded or does
    not match)."""

    def __init__(self, path, name, manifest, options, providers):
        try:
            self.session = _onnxruntime().InferenceSession(str(path), options,
                                                           providers=providers)
        except ImportError:
            raise
        except Exception as error:  # noqa: BLE001 (onnxruntime's own exception types)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else \
                type(error).__name__
            raise ExportFolderError(f"onnxruntime cannot load {path} ({reason}): corrupt, or "
                                    "not this export's graph; export the model again"
                                    ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        check_graph_interface(path, name, manifest, [(i.name, i.shape) for i in inputs],
                              [(o.name, o.shape) for o in outputs],
                              {i.name: i.type for i in inputs})
        self.inputs = [i.name for i in inputs]

    def __call__(self, *arrays_in):
        return self.session.run(None, dict(zip(self.inputs, arrays_in, strict=True)))


class _Bank:
    """The memory of objects that entered together: one (n, Ck, h·w) key and (n, Cv, h·w)
    value array per memory frame, in FrameSlots' slots; int8 (quantized): int8 arrays, with
    key scales (n, Ck, 1) and value scales (n, 1, h·w) per frame."""

    def __init__(self, num_objects, max_frames, quantized=False):
        self.num_objects, self.quantized = num_objects, quantized
        self.slots = FrameSlots(max_frames)
        self.keys, self.values = [], []
        self.key_scales, self.value_scales = [], []

    @property
    def num_frames(self):
        return self.slots.num_frames

    @property
    def nbytes(self):
        return sum(array.nbytes for store in (self.keys, self.values, self.key_scales,
                                              self.value_scales) for array in store)

    def add(self, keys, values, permanent, frame_index):
        slot = self.slots.assign(permanent, frame_index)
        keys = keys.reshape(keys.shape[0], keys.shape[1], -1)
        values = values.reshape(values.shape[0], values.shape[1], -1)
        stores, stored = (self.keys, self.values), (keys, values)
        if self.quantized:
            (keys, key_scales), (values, value_scales) = (
                arrays.quantize_int8(keys, "channel"), arrays.quantize_int8(values, "position"))
            stores += (self.key_scales, self.value_scales)
            stored = (keys, values, key_scales, value_scales)
        for store, array in zip(stores, stored, strict=True):
            if slot < len(store):
                store[slot] = array
            else:
                store.append(array)
            del store[self.slots.num_frames:]


class OnnxSegmenter:
    """Segments a video one frame at a time on an ONNX export (see the module docstring).

    Args:
        folder: an export folder (`stm export MODEL OUT/ --format onnx`, or
            stm_model.export.to_onnx).
        mem_every: keep every mem_every-th frame in memory (official: 5).
        read: "chunk" (bounded memory, default) or "whole".
        chunk_frames: memory frames per chunk of the chunk read.
        max_memory_frames: bound on the frames per memory (FIFO eviction; the first stays).
        max_internal_size: the shorter side the network runs at (default: the model's own, as
            the torch segmenter); None where the model has none: the frames' size.
        start_frame, reverse: as VideoSegmenter's.
        threads: onnxruntime's intra-op threads (default: its own choice).
        providers: onnxruntime execution providers (default: ["CPUExecutionProvider"]).
        memory_dtype: "fp32" or "int8", the memory the export's read graphs take (its
            manifest's memory_dtype); None or "auto": the export's. Another than the export's
            is an ExportFolderError naming the manifest: the read graphs are exported for one.
    """

    def __init__(self, folder, mem_every: int = 5, *, read: str = "chunk",
                 chunk_frames: int = 16, max_memory_frames: Optional[int] = None,
                 max_internal_size: Optional[int] = None, start_frame: int = 0,
                 reverse: bool = False, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None,
                 memory_dtype: Optional[str] = None) -> None:
        check_schedule(mem_every, max_memory_frames)
        if read not in READ_FORMS:
            raise ValueError(f"read must be one of {', '.join(READ_FORMS)}; got {read!r}")
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or \
                chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer; got {chunk_frames!r}")
        if memory_dtype not in (None, "auto") + MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)} (or None: "
                             f"the export's); got {memory_dtype!r}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.memory_dtype = memory_dtype_of(self.manifest)
        if memory_dtype not in (None, "auto", self.memory_dtype):
            raise ExportFolderError(f"{self.folder / MANIFEST}: this export's read graphs take "
                                    f"a {self.memory_dtype} memory, not {memory_dtype}; export "
                                    f"the model with memory_dtype {memory_dtype} for that")
        self.mem_every, self.max_memory_frames = int(mem_every), max_memory_frames
        self.read, self.chunk_frames = read, chunk_frames
        self.max_internal_size = max_internal_size or self.manifest["internal_size"]
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # errors only: no notes on unused initialisers
        # the graphs run one after another, each session with its own thread pool: threads
        # that spin after a run would take the cores from the next graph's run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = list(providers or ["CPUExecutionProvider"])

        def graph(name):
            return _Graph(self.folder / graph_file(name), name, self.manifest, options,
                          providers)

        self.query_encoder, self.memory_encoder = graph("query_encoder"), graph("memory_encoder")
        self.decoder, self.aggregate_graph = graph("decoder"), graph("aggregate")
        if read == "chunk":
            self.read_graph_name, self.read_graph = "read_chunk", graph("read_chunk")
        else:  # the Attention operator, where this onnxruntime has it
            try:
                attention = graph("read")
                key_dim, value_dim = self.manifest["key_dim"], self.manifest["value_dim"]
                memory = np.int8 if self.memory_dtype == "int8" else np.float32
                scales = (np.ones((1, key_dim, 1), np.float32), np.ones((1, 1, 1), np.float32)
                          ) if self.memory_dtype == "int8" else ()
                attention(np.zeros((1, key_dim, 1), np.float32),
                          np.zeros((1, key_dim, 1), memory),
                          np.zeros((1, value_dim, 1), memory), *scales)
                self.read_graph_name, self.read_graph = "read", attention
            except Exception:  # noqa: BLE001 (an older runtime: no Attention kernel)
                self.read_graph_name, self.read_graph = "read_matmul", graph("read_matmul")
        self.interactive = bool(self.manifest["interactive"])
        self.reset(start_frame, reverse)

    def reset(self, start_frame: int = 0, reverse: bool = False) -> None:
        """Forget the video; the next frame stepped is video frame start_frame (with a mask)."""
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"start_frame must be a frame index >= 0; got {start_frame!r}")
        self.object_ids: list = []
        self.banks: list = []
        self.start_frame, self.reverse = start_frame, bool(reverse)
        self.frame_index, self.steps = start_frame, 0
        self._pending: Optional[PendingFrame] = None
        self._size = None

    @property
    def num_objects(self) -> int:
        """Objects being segmented (the probabilities have num_objects + 1 channels)."""
        return len(self.object_ids)

    @property
    def memory_frames(self) -> int:
        """Frames in the largest memory."""
        return max((bank.num_frames for bank in self.banks), default=0)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the memory's arrays."""
        return sum(bank.nbytes for bank in self.banks)

    def step(self, frame, mask=None) -> np.ndarray:
        """Segment the next frame; returns (K, H, W) float32 probabilities, background first.
        frame: (3, H, W) float RGB in [0, 1] (any array-like); mask: optional (H, W) integer
        ids, required on the first frame."""
        frame, mask = self._checked(frame, mask)
        if self.steps == 0 and not arrays.object_ids(mask):
            raise ValueError("the first frame's mask has no object (every pixel is 0)")
        size = frame.shape[1:]
        inner = internal_size(size, self.max_internal_size)
        resized = inner != size
        padded, pad = arrays.pad_to_multiple(arrays.resize_bilinear(frame, inner)[None])
        if self._pending is not None:
            self._memorise(self._pending)
            self._pending = None
        foreground = self._predict(padded) if self.banks else \
            np.zeros((0,) + padded.shape[-2:], np.float32)
        if mask is None:
            probs = arrays.unpad(self._aggregate(foreground), pad)
            keep, memorised = is_kept(self.steps, self.mem_every, annotated=False), probs
            probs = arrays.resize_bilinear(probs, size)
        elif not resized:
            probs = arrays.unpad(self._apply_mask(foreground, arrays.pad_to_multiple(mask)[0]),
                                 pad)
            keep, memorised = True, probs
        else:  # merged at the input size, as the torch segmenter does
            probs = self._apply_mask(arrays.resize_bilinear(arrays.unpad(foreground, pad),
                                                            size), mask)
            keep, memorised = True, arrays.downsample_area(probs, inner)
        self._pending = PendingFrame(padded, arrays.pad_to_multiple(memorised[1:])[0], keep,
                                     self.frame_index)
        self.frame_index += -1 if self.reverse else 1
        self.steps += 1
        return probs

    def replay(self, frame, labels, annotated: bool = False) -> np.ndarray:
        """Take the next frame as segmented already, with these labels (VideoSegmenter.replay:
        resuming a run from the masks it wrote); returns the one-hot probabilities."""
        if labels is None:
            raise ValueError("replay needs the labels written for the frame; got None")
        frame, labels = self._checked(frame, labels)
        new_ids = [i for i in arrays.object_ids(labels) if i not in self.object_ids]
        if new_ids and not annotated:
            raise ValueError(f"labels of frame {self.frame_index} hold ids {new_ids} that are "
                             f"not objects of this video (objects: {self.object_ids}); new "
                             "objects come with a mask (annotated=True)")
        size = frame.shape[1:]
        inner = internal_size(size, self.max_internal_size)
        padded, _ = arrays.pad_to_multiple(arrays.resize_bilinear(frame, inner)[None])
        if self._pending is not None and self._pending.keep:
            self._memorise(self._pending)
        self._pending = None
        if new_ids:
            self._add_objects(new_ids)
        ids = np.array([0] + self.object_ids)
        probs = (labels[None] == ids[:, None, None]).astype(np.float32)
        memorised = probs if inner == size else arrays.downsample_area(probs, inner)
        keep = is_kept(self.steps, self.mem_every, annotated=annotated)
        self._pending = PendingFrame(padded, arrays.pad_to_multiple(memorised[1:])[0], keep,
                                     self.frame_index)
        self.frame_index += -1 if self.reverse else 1
        self.steps += 1
        return probs

    def labels(self, probs) -> np.ndarray:
        """(H, W) int64 object ids (0 = background) of the most probable channel."""
        return arrays.labels_of(np.asarray(probs), self.object_ids)

    def read_memory(self, bank, query_key) -> np.ndarray:
        """The read-out (n, Cv, HW) of `bank` for query_key (1, Ck, HW)."""
        if self.read == "whole":
            return self.read_graph(query_key, *self._memory_inputs(bank, 0, bank.num_frames)
                                   )[0]
        readout = lse = None
        for start in range(0, bank.num_frames, self.chunk_frames):
            chunk = self.read_graph(query_key, *self._memory_inputs(
                bank, start, start + self.chunk_frames))
            readout, lse = arrays.merge_chunks(readout, lse, *chunk)
        assert readout is not None, "a memory bank holds at least one frame"
        return readout

    @staticmethod
    def _memory_inputs(bank, start, stop):
        """The read graphs' memory inputs for the bank's frames [start, stop): keys, values
        (and an int8 memory's key scales (n, Ck, T), value scales (n, 1, T·h·w)), each frame's
        positions contiguous along the last axis."""
        stores = (bank.keys, bank.values) + ((bank.key_scales, bank.value_scales)
                                             if bank.quantized else ())
        return [np.concatenate(store[start:stop], 2) for store in stores]

    def _checked(self, frame, mask):
        frame = np.asarray(frame, dtype=np.float32)
        if frame.ndim != 3 or frame.shape[0] != 3:
            raise ValueError(f"frame must be a (3, H, W) RGB array in [0, 1]; got {frame.shape}")
        size = frame.shape[1:]
        if self._size is not None and size != self._size:
            raise ValueError(f"frame {self.frame_index} is {size[1]}x{size[0]} (WxH) but the "
                             f"video's frames are {self._size[1]}x{self._size[0]}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
                raise ValueError("mask must be an (H, W) integer array of object ids; got "
                                 f"{mask.shape} {mask.dtype}")
            if mask.shape != size:
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but frame "
                                 f"{self.frame_index} is {size[1]}x{size[0]}")
            if mask.min() < 0:
                raise ValueError("mask ids must be >= 0 (0 is background)")
            mask = mask.astype(np.int64)
        elif self.steps == 0:
            raise ValueError("the first frame needs a mask (step(frame, mask=labels))")
        self._size = size
        return np.ascontiguousarray(frame), mask

    def _aggregate(self, foreground):
        if foreground.shape[0] == 0:  # no objects: all background
            return np.ones((1,) + foreground.shape[1:], np.float32)
        return self.aggregate_graph(foreground)[0]

    def _predict(self, padded):
        key, value, r3, r2 = self.query_encoder(padded)
        query_key = key.reshape(1, key.shape[1], -1)
        readout = np.concatenate([self.read_memory(bank, query_key) for bank in self.banks])
        readout = readout.reshape(readout.shape[:2] + key.shape[2:])
        return self.decoder(readout, value, r3, r2)[0]

    def _memorise(self, pending):
        if not self.banks:
            return
        probs = np.ascontiguousarray(pending.object_probs, np.float32)
        inputs = (pending.frame, probs)
        if self.interactive:  # a mask without scribbles
            inputs += (np.zeros((probs.shape[0], 2) + probs.shape[1:], np.float32),)
        keys, values = self.memory_encoder(*inputs)
        start = 0
        for bank in self.banks:
            stop = start + bank.num_objects
            bank.add(keys[start:stop], values[start:stop], pending.keep, pending.frame_index)
            start = stop

    def _apply_mask(self, foreground, mask):
        probs, new_ids = arrays.merge_mask(foreground, mask, self.object_ids, self._aggregate)
        if new_ids:
            self._add_objects(new_ids)
        return probs

    def _add_objects(self, new_ids: Iterable[int]):
        new_ids = list(new_ids)
        self.banks.append(_Bank(len(new_ids), self.max_memory_frames,
                              quantized=self.memory_dtype == "int8"))
        self.object_ids += new_ids
