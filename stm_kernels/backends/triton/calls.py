"""What a read is to the kernels (Call: its device, the architecture whose tilings it runs, its
precision), or why no Triton kernel reads it; and what every launch of the call shares.

    _plan_call, unsupported_reason  the Call of a memory, or why no kernel reads it
    _call                           the Call of one read ("forward", "backward", "select",
                                    "usage"), or KernelUnavailable; remembered per device,
                                    dtype, key width, read and similarity (_calls)
    exact_float32_on_torch          whether backend="auto" reads exact float32 with torch
    _check_device                   CUDA tensors, or the interpreter
    _launch_flags                   CK, BLOCK_CK, RANK1, PRECISION, UPCAST and I64 (_needs_int64)
    _signature                      what a remembered choice of config depends on

A memory whose key channels are one past a tiling width (tilings.splits_last_channel: XMem's
2 * 128 + 1 = 257) runs on tiles of that width: the kernels take its first channels as the
tiled dot (CK) and the last as a rank-1 score term u_i w_j (RANK1), exact for any input; its
gradients come back as the last channel of dq and dk. Its key width class is 257 (the tables'
own entries for it, else the 256-wide ones).
"""
import dataclasses

import torch

from . import devices, tilings
from .devices import INTERPRETING
from .plans import next_power_of_2
from .running import KernelUnavailable


@dataclasses.dataclass(frozen=True)
class Call:
    """The device side of one call: the device, the architecture whose tilings it runs, the
    input precision of tl.dot, the precision and key-width classes of the tables."""
    device: devices.Device
    architecture: tilings.Architecture
    input_precision: str
    precision_class: str
    width: int
    rank1: bool = False  # the last key channel runs as a rank-1 score term (RANK1)

    def volatile_keys(self, l2):
        """VOLATILE_K of a kernel whose loop stores nothing: whether its streamed key load must
        stay in the loop. With FMA dots (exact float32 on NVIDIA: no tensor core takes it) and
        the l2 similarity, Triton hoists it and holds the tile in registers, which spills."""
        return l2 and self.architecture.vendor == "nvidia" and self.precision_class == "fp32"


def _block_ck(channels):
    """The key tile width of `channels` tiled key channels: rounded up to a power of two, at
    least 16."""
    return max(16, next_power_of_2(channels))


def _plan_call(k):
    """(the Call of a read of memory k, None), or (None, why the Triton kernels cannot read it)."""
    device = devices.describe(k.device)
    architecture, reason = tilings.architecture_of(device)
    if architecture is None:
        return None, reason
    input_precision = architecture.input_precision(k.dtype)
    rank1 = tilings.splits_last_channel(k.shape[1])
    block_ck = _block_ck(k.shape[1] - rank1)
    width = tilings.width_class(block_ck)
    if width is None:
        return None, (f"{k.shape[1]} key channels (a {block_ck}-wide key tile) are more "
                      f"than the kernels' tilings take ({tilings.WIDTHS[-1]})")
    # a rank-1 read has a key width of its own (257), whose tables fall back to its tiles'
    return Call(device, architecture, input_precision, tilings.precision_class(k.dtype),
                width + rank1, rank1), None


def exact_float32_on_torch(k):
    """Whether backend="auto" reads memory k with the torch backend by choice: exact float32
    operands on an architecture where tilings.exact_float32_read says "torch"."""
    if tilings.precision_class(k.dtype) != "fp32":
        return False
    architecture, _ = tilings.architecture_of(devices.describe(k.device))
    return architecture is not None and tilings.exact_float32_read(architecture) == "torch"


def unsupported_reason(k):
    """Why the Triton kernels cannot read a memory of k's device, dtype and key width, or
    None."""
    return _plan_call(k)[1]


# (Device, dtype, key channels, read, l2, float32 matmul precision of a float32 memory) ->
# (its Call, the ON_TORCH table and the number of ARCHITECTURES it was planned with): _call's
# answers, at most CALLS of them (all dropped beyond)
_calls: dict = {}
CALLS = 256


def _call(k, read, l2):
    """The Call of `read` ("forward", "backward", "select", "usage") of memory k, or
    KernelUnavailable: no kernel reads it there, or the torch backend does by design
    (tilings.ON_TORCH, tilings.RANK1_L2). Remembered per (device, dtype, key channels, read,
    similarity, and torch's float32 matmul precision for a float32 memory: everything the
    planning reads of the call), and planned again where the tables it read were changed since
    (ON_TORCH replaced, or its architecture's entry in ARCHITECTURES, or an entry added or
    removed): a repeated read then finds its Call in one dictionary lookup."""
    dtype = k.dtype
    key = (devices.describe(k.device), dtype, k.shape[1], read, l2,
           torch.get_float32_matmul_precision() if dtype == torch.float32 else None)
    known = _calls.get(key)
    if known is not None and planned_from_current_tables(*known):
        return known[0]
    call = _planned_call(k, read, l2)
    if len(_calls) >= CALLS:
        _calls.clear()
    _calls[key] = (call, *current_tables())
    return call


def current_tables():
    """What a Call is planned from that a test or a tuning session may replace at run time:
    (tilings.ON_TORCH, the number of ARCHITECTURES)."""
    return tilings.ON_TORCH, len(tilings.ARCHITECTURES)


def tables_unchanged(on_torch, architectures):
    """Whether current_tables() is still (on_torch, architectures): ON_TORCH the same table, no
    architecture added or removed."""
    return on_torch is tilings.ON_TORCH and architectures == len(tilings.ARCHITECTURES)


def planned_from_current_tables(call, on_torch, architectures):
    """Whether `call`, planned when current_tables() was (on_torch, architectures), is still
    what the tables say: tables_unchanged, and its own architecture's entry the same object."""
    return tables_unchanged(on_torch, architectures) and \
        tilings.ARCHITECTURES.get(call.architecture.name) is call.architecture


def _planned_call(k, read, l2):
    """_call's answer, planned from the tables."""
    call, reason = _plan_call(k)
    if call is None:
        raise KernelUnavailable("every", devices.describe(k.device), reason)
    reason = tilings.on_torch(call.architecture, read, call.precision_class, call.width)
    if reason is None and call.rank1 and l2:
        reason = tilings.RANK1_L2
    if reason is not None:
        raise KernelUnavailable(read, call.device, reason)
    return call


def _check_device(*tensors):
    device = tensors[0].device
    if device.type not in ("cuda", "meta") and not INTERPRETING:
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            f"stm_kernels, to run the kernels on CPU); got tensors on {device}")


def _tile_span(sizes, strides):
    return sum(next_power_of_2(size) * abs(stride)
               for size, stride in zip(sizes, strides, strict=True))


def _needs_int64(*tensors, outputs=()):
    """Whether in-tile offsets (over the last two dims: channels x positions) of the inputs or
    of contiguous outputs of the given (C, L) shapes can reach 2**31 elements; batch, split and
    block starts always go through int64 scalars."""
    spans = [_tile_span(t.shape[-2:], t.stride()[-2:]) for t in tensors]
    spans += [_tile_span(shape, (shape[1], 1)) for shape in outputs]
    return max(spans) >= 2**31


def _launch_flags(call, inputs, outputs):
    """Constexprs shared by the kernels of one call (inputs start with q, k, v; outputs are the
    (C, L) shapes of the contiguous outputs) and CK, the key channels of the tiled dot."""
    k = inputs[1]
    return dict(
        CK=k.shape[1] - call.rank1,
        BLOCK_CK=_block_ck(k.shape[1] - call.rank1),
        RANK1=call.rank1,
        PRECISION=call.input_precision,
        UPCAST=INTERPRETING and k.dtype == torch.bfloat16,
        I64=_needs_int64(*inputs, outputs=outputs),
    )


def _signature(call, *values):
    """What a remembered choice of config depends on besides the device and kernel."""
    return (call.input_precision,) + values
