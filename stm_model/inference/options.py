"""The segmenters' options, declared once.

    options = SegmenterOptions(mem_every=5, memory_dtype="fp16")
    VideoSegmenter.from_options(model, options)     # or VideoSegmenter(model, mem_every=5, ...)
    BatchSegmenter(model, **options.batch_arguments())

VideoSegmenter takes every field, BatchSegmenter those marked for batches; each is checked here,
when the options are made. The `stm segment` and `stm segment-dataset` flags are made from the
fields' CliFlag (flag name, help, choices or minimum, and the commands' own default where it
differs: --amp auto), and a run over several videos refuses, by flag name and with the field's
reason, an option that applies to one video only.

This module imports no torch (the `stm` command builds its parsers from it before parsing):
the checks that need the segmenters' modules import them when options are made. The other
defaults the segmenting commands show (DEFAULT_MAX_OBJECTS, MASK_POLICIES) live here for that
reason.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Union

from stm_kernels.options import BACKENDS, DTYPE_NAMES

if TYPE_CHECKING:
    from stm_model.runtime.devices import DtypeName

# amp_dtype's names: "auto" (runtime.devices.amp_dtype_option), fp32 (no autocast), fp16, bf16
AMP_DTYPES = ("auto",) + DTYPE_NAMES
# memory_dtype's 8-bit formats (stm_kernels.QuantizedMemory), beside DTYPE_NAMES and "auto"
MEMORY_FORMATS = ("int8", "fp8")
MEMORY_DTYPES = tuple(sorted(DTYPE_NAMES)) + MEMORY_FORMATS + ("auto",)
_FORMAT_DTYPES = {"torch.int8": "int8", "torch.float8_e4m3fn": "fp8"}  # torch dtypes, by name
MIN_INTERNAL_SIZE = 16  # the smallest max_internal_size: one stride-16 feature row
DEFAULT_MAX_OBJECTS = 32  # object ids a video's masks may hold (more: a colour image as ids)
MASK_POLICIES = ("first", "all")  # a dataset's masks: the first frame's, or every annotation


@dataclasses.dataclass(frozen=True)
class CliFlag:
    """How a field appears on the command line: its flag, help text, the values it takes
    (choices; minimum for an integer; switch for an on/off flag) and, where the commands'
    default is not the Python API's, theirs."""
    name: str
    help: str
    choices: Optional[tuple] = None
    minimum: Optional[int] = None
    metavar: Optional[str] = None
    switch: bool = False
    default: Any = None  # the commands' default where it is not the field's (None: the field's)


def _option(default, flag=None, *, one_video=None):
    """A field: its default, its CliFlag (None: Python only) and, for an option that applies
    to one video only (not BatchSegmenter's), why, as a run over several videos says it."""
    return dataclasses.field(default=default, metadata=dict(flag=flag, one_video=one_video))


@dataclasses.dataclass(frozen=True)
class SegmenterOptions:
    """The memory and network options of VideoSegmenter and BatchSegmenter (VideoSegmenter's
    docstring says what each does)."""
    mem_every: int = _option(5, CliFlag(
        "--mem-every", "keep every N-th frame in memory (official: 5)", minimum=1,
        metavar="N"))
    memory_dtype: DtypeName = _option("auto", CliFlag(
        "--memory-dtype", "storage dtype of the memory (default: auto, bf16 on a CPU with bf16 "
        "dot products, where the read runs twice as fast with the same masks, else the "
        "model's); int8 or fp8: 8 bits with scales, about half of bf16's bytes (read by the "
        "torch backend)", choices=MEMORY_DTYPES))
    max_memory_frames: Optional[int] = _option(None, CliFlag(
        "--max-memory-frames", "bound the frames in memory: the oldest kept frame but the "
        "first is evicted (default: unbounded)", minimum=2, metavar="N"))
    offload: bool = _option(False, CliFlag(
        "--offload", "keep the memory in CPU RAM", switch=True),
        one_video="several videos share one memory")
    offload_chunk_frames: int = _option(64, CliFlag(
        "--offload-chunk-frames", "with --offload: memory frames copied to the device per "
        "read step", minimum=1, metavar="N"), one_video="it goes with --offload")
    amp_dtype: DtypeName = _option(None, CliFlag(
        "--amp", "autocast the network in this dtype (default: auto, bf16 on a CPU with bf16 "
        "dot products, where the network runs faster with the same J&F, else none); fp32: no "
        "autocast", choices=AMP_DTYPES, default="auto"))
    read_backend: Optional[str] = _option(None, CliFlag(
        "--backend", "memory read implementation (default: auto)", choices=BACKENDS))
    shard_memory: bool = _option(False, one_video="it spreads one video's memory over ranks")
    shard_group: Any = _option(None, one_video="it goes with shard_memory")
    start_frame: int = _option(0, one_video="each video starts at its first mask")
    reverse: bool = _option(False, one_video="videos run forwards")
    max_internal_size: Optional[int] = _option(None, CliFlag(
        "--size", "run the network on frames resized so that their shorter side is at most "
        "PIXELS (masks are written at the frames' size)", minimum=MIN_INTERNAL_SIZE,
        metavar="PIXELS"), one_video="a dataset run resizes the frames as it reads them")
    compile: Union[bool, dict] = _option(False, one_video="not built for batches")

    def __post_init__(self):
        from stm_model.memory.schedule import check_schedule
        check_schedule(self.mem_every, self.max_memory_frames)
        if self.memory_dtype != "auto" and memory_format(self.memory_dtype) is None:
            try:
                _check_dtype("memory_dtype", self.memory_dtype)
            except ValueError:
                raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)} (or "
                                 f"a torch dtype); got {self.memory_dtype!r}") from None
        check_memory_format(self.memory_dtype, self.read_backend, self.shard_memory)
        if self.amp_dtype != "auto":
            try:
                _check_dtype("amp_dtype", self.amp_dtype)
            except ValueError:
                raise ValueError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)} (or a "
                                 f"torch dtype); got {self.amp_dtype!r}") from None
        if self.read_backend is not None and self.read_backend not in BACKENDS:
            raise ValueError(f"read_backend must be one of {', '.join(BACKENDS)} or None; got "
                             f"{self.read_backend!r}")
        checked_max_internal_size(self.max_internal_size)
        if isinstance(self.start_frame, bool) or not isinstance(self.start_frame, int) or \
                self.start_frame < 0:
            raise ValueError(f"start_frame must be a frame index >= 0; got "
                             f"{self.start_frame!r}")
        if self.offload_chunk_frames < 1:
            raise ValueError("offload_chunk_frames must be at least 1; got "
                             f"{self.offload_chunk_frames!r}")

    def arguments(self) -> dict:
        """Every field as VideoSegmenter's keyword arguments."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def batch_arguments(self) -> dict:
        """The fields BatchSegmenter takes, as its keyword arguments (ValueError naming a
        one-video option set away from its default, with the reason)."""
        for field in one_video_fields():
            if getattr(self, field.name) != field.default:
                raise ValueError(f"{field.name} applies to one video, not to BatchSegmenter: "
                                 f"{field.metadata['one_video']}")
        return {field.name: getattr(self, field.name) for field in batch_fields()}


def _check_dtype(name, value):
    """ValueError naming the option unless value is None, a dtype's name (checked without
    torch: the ONNX runner's options are these too) or a torch dtype."""
    if value is None or (isinstance(value, str) and value in DTYPE_NAMES):
        return
    from stm_model.runtime.devices import dtype_option
    dtype_option(name, value)


def memory_format(memory_dtype) -> Optional[str]:
    """"int8" or "fp8" for an 8-bit memory_dtype (its name, or torch.int8 /
    torch.float8_e4m3fn), else None."""
    if isinstance(memory_dtype, str):
        return memory_dtype if memory_dtype in MEMORY_FORMATS else None
    return _FORMAT_DTYPES.get(str(memory_dtype))


def check_memory_format(memory_dtype, read_backend, shard_memory=False) -> None:
    """ValueError, naming the options, for what does not take an 8-bit memory_dtype yet:
    shard_memory. (Every read backend takes one: "triton" through its 8-bit forward.)"""
    name = memory_format(memory_dtype)
    if name is None:
        return
    if shard_memory:
        raise ValueError(f"memory_dtype {name}: shard_memory does not take an 8-bit memory "
                         "yet; use a floating-point memory_dtype")


def cli_fields() -> list:
    """The fields with a command-line flag, in declaration order."""
    return [field for field in dataclasses.fields(SegmenterOptions) if field.metadata["flag"]]


def batch_fields() -> list:
    """The fields BatchSegmenter takes."""
    return [field for field in dataclasses.fields(SegmenterOptions)
            if not field.metadata["one_video"]]


def one_video_fields() -> list:
    """The fields that apply to one video only (VideoSegmenter's, not BatchSegmenter's)."""
    return [field for field in dataclasses.fields(SegmenterOptions)
            if field.metadata["one_video"]]


def checked_max_internal_size(max_internal_size):
    """max_internal_size as an int (or None), or ValueError naming the argument."""
    if max_internal_size is None:
        return None
    if isinstance(max_internal_size, bool) or not isinstance(max_internal_size, int) or \
            max_internal_size < MIN_INTERNAL_SIZE:
        raise ValueError(f"max_internal_size must be an integer >= {MIN_INTERNAL_SIZE} (pixels "
                         f"of the shorter side) or None; got {max_internal_size!r}")
    return max_internal_size


def internal_size(size, max_internal_size):
    """(height, width) the network sees for a frame of `size`: unchanged when its shorter side
    is at most max_internal_size (or that is None), else scaled so that the shorter side is
    exactly max_internal_size (the longer side rounded). Here, without torch, for the ONNX
    runner too (stm_model.deploy)."""
    height, width = size
    if max_internal_size is None or min(height, width) <= max_internal_size:
        return tuple(size)
    scale = max_internal_size / min(height, width)
    if height <= width:
        return max_internal_size, max(1, round(width * scale))
    return max(1, round(height * scale)), max_internal_size
