"""What every segmenting session shares: the model side and the checks of its inputs.

VideoSegmenter, BatchSegmenter and InteractiveSession are SessionCores: the model in eval mode,
its device and dtype, the storage dtype of the memory, the autocast dtype of the network, the
memory_read backend, and the construction of a MemoryBank of the model's key/value sizes. The
frame and mask checks of a step live here too, so that every session refuses bad input with
the same message.
"""
import contextlib
from typing import Optional

import torch

from stm_kernels import backends

from stm_model.inference.options import check_memory_format, memory_format
from stm_model.memory.bank import MemoryBank
from stm_model.runtime.devices import DtypeName, amp_dtype_option, memory_dtype_option
from stm_model.network.checkpoint import warn_if_synthetic_only
from stm_model.network.stm import STM


def channels_last_on(model: STM) -> None:
    """The model's 4-D weights in channels-last layout (in place; values unchanged) on a CPU,
    where oneDNN's convolutions and max-pooling then run without reordering every activation
    (docs/performance.md has the measured step times). A GPU's model keeps its layout until a
    GPU run measures the other."""
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)


_EIGHT_BIT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # memory_dtype's 8-bit formats


class SessionCore:
    """The model side of a segmenting session (see the module docstring).

    Args:
        model: an STM (put in eval mode here).
        memory_dtype: storage dtype of the memory ("fp32", "fp16", "bf16" or a torch dtype;
            default: the model's dtype); "auto": bf16 on a CPU with bf16 dot products, a
            float32 model and no fp16 autocast, else the model's
            (runtime.devices.memory_dtype_option); "int8" or "fp8" (torch.int8,
            torch.float8_e4m3fn): 8-bit storage with float32 scales (MemoryBank), read in
            what "auto" would store (read_dtype; the 8-bit read multiplies in it), by the
            torch backend ("auto" takes it; "triton" is refused).
        amp_dtype: run the network under torch.autocast with this dtype ("fp16", "bf16" or a
            torch dtype; None or "fp32": no autocast, the default); "auto": bf16 on a CPU with
            bf16 dot products and a float32 model, else no autocast
            (runtime.devices.amp_dtype_option; the `stm` commands' default).
        read_backend: memory_read backend (default: the model config's).

    A shipped model trained on synthetic video only ("small", "small-interactive") warns once
    here (SyntheticOnlyWarning; network.checkpoint.warn_if_synthetic_only says why here).
    """

    model: STM
    device: torch.device
    model_dtype: torch.dtype
    memory_dtype: torch.dtype
    read_dtype: torch.dtype
    amp_dtype: Optional[torch.dtype]
    read_backend: str

    def __init__(self, model: STM, *, memory_dtype: DtypeName = None,
                 amp_dtype: DtypeName = None, read_backend: Optional[str] = None) -> None:
        parameter = next(model.parameters())
        self.device, self.model_dtype = parameter.device, parameter.dtype
        amp = amp_dtype_option(amp_dtype, self.device, self.model_dtype)
        self.model = model.eval()
        channels_last_on(model)
        warn_if_synthetic_only(model, stacklevel=3)  # the caller of the session's __init__
        eight_bit = memory_format(memory_dtype)
        if eight_bit is None:
            self.memory_dtype = memory_dtype_option(memory_dtype, self.device, parameter.dtype,
                                                    amp)
            self.read_dtype = self.memory_dtype
        else:
            self.memory_dtype = _EIGHT_BIT[eight_bit]
            self.read_dtype = memory_dtype_option("auto", self.device, parameter.dtype, amp)
        self.amp_dtype = amp
        self.read_backend = read_backend or model.config.read_backend
        check_memory_format(memory_dtype, self.read_backend)
        # a backend that cannot run here is refused now, before any frame or file
        backends.resolve(self.read_backend, torch.empty(0, dtype=self.read_dtype,
                                                        device=self.device))

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast with amp_dtype on the model's device (a no-op without amp_dtype)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def new_memory_bank(self, num_objects: int, padded_size: tuple, **storage) -> MemoryBank:
        """An empty MemoryBank for num_objects objects of frames padded to padded_size (H, W)
        (multiples of 16), in memory_dtype (read in read_dtype) on the model's device;
        storage: MemoryBank's keyword arguments (max_frames, offload, ...)."""
        config = self.model.config
        height, width = padded_size
        return MemoryBank(num_objects, config.key_dim, config.value_dim, height // 16,
                          width // 16, dtype=self.memory_dtype, read_dtype=self.read_dtype,
                          device=self.device, **storage)

    @property
    def eight_bit_memory(self) -> bool:
        """Whether the memory is stored in 8 bits (memory_dtype int8 or fp8)."""
        return self.memory_dtype in _EIGHT_BIT.values()

    def synchronize(self) -> None:
        """Wait for the model's device (timings of CUDA work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def checked_frame_and_mask(frame, mask, *, expected_size, frame_index, device, first=None,
                           larger_mask=False):
    """(frame float32 (3, H, W), mask int64 (H, W) or None) on `device`, after checking them:
    ValueError naming the problem for a frame that is not float (3, H, W), a frame of another
    size than `expected_size` (None: any), a mask that is not (H, W) integer ids >= 0 of the
    frame's size (with larger_mask, or at least as large in both dimensions: the frame's mask
    before the frame was shrunk), or no mask on the first frame (first; None: frame_index ==
    0)."""
    frame = torch.as_tensor(frame)
    if frame.dim() != 3 or frame.shape[0] != 3 or not frame.is_floating_point():
        raise ValueError("frame must be a float (3, H, W) RGB tensor in [0, 1]; got "
                         f"{tuple(frame.shape)} {frame.dtype}")
    size = tuple(frame.shape[1:])
    if expected_size is not None and size != tuple(expected_size):
        raise ValueError(f"frame {frame_index} is {size[1]}x{size[0]} (WxH) but the "
                         f"video's frames are {expected_size[1]}x{expected_size[0]}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.is_floating_point() or mask.dtype == torch.bool or mask.dim() != 2:
            raise ValueError("mask must be an (H, W) integer tensor of object ids; got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        if tuple(mask.shape) != size and not (larger_mask and mask.shape[0] >= size[0] and
                                              mask.shape[1] >= size[1]):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but frame "
                             f"{frame_index} is {size[1]}x{size[0]}")
        if mask.min() < 0:
            raise ValueError("mask ids must be >= 0 (0 is background)")
        mask = mask.to(device, torch.int64)
    elif first or (first is None and frame_index == 0):
        raise ValueError("the first frame needs a mask (step(frame, mask=labels))")
    return frame.to(device, torch.float32), mask


def checked_frames(frames) -> torch.Tensor:
    """frames as a tensor after checking it is float (T, 3, H, W) RGB (ValueError otherwise)."""
    frames = torch.as_tensor(frames)
    if frames.dim() != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
        raise ValueError("frames must be a float (T, 3, H, W) RGB tensor in [0, 1]; got "
                         f"{tuple(frames.shape)} {frames.dtype}")
    return frames
