"""Input preparation shared by the op's public functions: checks (every error names the
argument and the shape, dtype or range it expected), then the views the backends run on.

`prepared(...)` turns a call's arguments into a PreparedCall: q (Bq, Ck, HW), key and value
chunks (B, C, N_i) as views where the strides allow, the effective scale and similarity (XMem
folded into a dot product over augmented channels, xmem.py), the backend that runs
(backends.resolve) and the checked memory lengths and top_k.
"""
import dataclasses
import math
import weakref
from typing import Optional

import torch

from . import backends, xmem
from .options import SIMILARITIES
from .torch_common import accumulation_dtype

# The largest multiple of scale a backend forms: 2 * scale * log2(e) (L2 scores in exp2 form).
_LARGEST_SCALE_FACTOR = 2.0 / math.log(2.0)


def checked_scale(scale, key_channels, compute_dtype=torch.float32):
    """scale as a float: 1/sqrt(Ck) by default (official STM). A finite scale whose products
    overflow compute_dtype (float32 for half, bfloat16 and float32 memories, the memory's own
    dtype where the scale is folded into it) would turn every score into inf and the read into
    NaN, so it is rejected here."""
    if scale is None:
        return 1.0 / math.sqrt(key_channels)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
            not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python number or None; got {scale!r}")
    largest = torch.finfo(compute_dtype).max / _LARGEST_SCALE_FACTOR
    if abs(scale) > largest:
        raise ValueError(f"scale={scale!r} overflows the read's compute dtype {compute_dtype} "
                         f"(|scale| must be at most {largest:.4g})")
    return float(scale)


def checked_similarity(similarity):
    """similarity, or ValueError when it is not one of SIMILARITIES."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
    return similarity


def as_chunks(name, memory):
    """[(name, tensor)] of a memory given as one tensor or a list of chunks (names
    indexed per chunk); TypeError for anything else or an empty list."""
    if isinstance(memory, torch.Tensor):
        return [(name, memory)]
    if not isinstance(memory, (list, tuple)) or not memory:
        raise TypeError(f"{name} must be a torch.Tensor or a non-empty list of tensors "
                        f"(memory chunks); got {type(memory).__name__}")
    return [(f"{name}[{index}]", chunk) for index, chunk in enumerate(memory)]


def check_tensor(name, tensor):
    """TypeError or ValueError naming `name` unless tensor is a non-empty floating-point
    tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64); got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(tensor.shape)}); every dimension, including "
            "the number of memory positions N, must be at least 1")


def check_one_dtype(named):
    """ValueError naming every floating-point input [(name, tensor)] and its dtype unless
    they all share one dtype. The read never promotes (as torch's
    scaled_dot_product_attention refuses mixed dtypes): an fp16 query against an fp32 memory
    would otherwise read, and return, fp32 without a word; the caller casts explicitly (a
    memory bank stored in bf16 casts its query to bf16 at its call site)."""
    dtypes = [tensor.dtype for _, tensor in named]
    if len(set(dtypes)) == 1:
        return
    groups = {}  # argument (chunks grouped under their argument's name) -> [(name, dtype)]
    for (name, _), dtype in zip(named, dtypes, strict=True):
        groups.setdefault(name.split("[")[0], []).append((name, dtype))
    parts = []
    for argument, members in groups.items():
        if len({dtype for _, dtype in members}) == 1:
            chunks = f" ({len(members)} chunks)" if len(members) > 1 else ""
            parts.append(f"{argument}{chunks} {members[0][1]}")
        else:
            parts += [f"{name} {dtype}" for name, dtype in members]
    raise ValueError(f"the read's floating-point inputs must share one dtype (it does not "
                     f"promote; cast them explicitly, e.g. query_key.to(memory_key.dtype)); "
                     f"got {', '.join(parts)}")


def flatten_checked(query_key, memory_key, memory_value, others=()):
    """Validate; return q (Bq, Ck, HW), key chunks [(B, Ck, N_i)], value chunks [(B, Cv, N_i)]
    (views where the strides allow) and the query's spatial shape. others: more
    floating-point inputs [(name, tensor)] (XMem's shrinkage and selection) that must share
    the query's and the memory's dtype."""
    check_tensor("query_key", query_key)
    keys, values = as_chunks("memory_key", memory_key), as_chunks("memory_value", memory_value)
    if len(keys) != len(values):
        raise ValueError(f"memory_key and memory_value must hold as many chunks; got "
                         f"{len(keys)} and {len(values)}")
    if query_key.dim() not in (3, 4):
        raise ValueError(
            "query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W); got shape "
            f"{tuple(query_key.shape)}")
    first_key_name, first_key = keys[0]
    check_tensor(first_key_name, first_key)
    B, Ck = first_key.shape[:2]
    Cv = None
    for (key_name, key), (value_name, value) in zip(keys, values, strict=True):
        check_tensor(key_name, key)
        check_tensor(value_name, value)
        if key.dim() not in (3, 5) or key.shape[:2] != (B, Ck):
            raise ValueError(
                f"{key_name} must have shape (B, Ck, N) or (B, Ck, T, H, W) with B={B}, "
                f"Ck={Ck}; got shape {tuple(key.shape)}")
        Cv = value.shape[1] if Cv is None else Cv
        if value.dim() != key.dim() or value.shape[0] != B or value.shape[1] != Cv or \
                value.shape[2:] != key.shape[2:]:
            layout = "(B, Cv, N)" if key.dim() == 3 else "(B, Cv, T, H, W)"
            raise ValueError(
                f"{value_name} must have shape {layout} = (B={B}, Cv, "
                f"{', '.join(map(str, key.shape[2:]))}) to match {key_name} "
                f"{tuple(key.shape)}; got shape {tuple(value.shape)}")
        if not query_key.device == key.device == value.device:
            raise ValueError(
                f"query_key, {key_name} and {value_name} must be on one device; got "
                f"{query_key.device}, {key.device} and {value.device}")
    if query_key.shape[0] not in (1, B) or query_key.shape[1] != Ck:
        raise ValueError(
            f"query_key must have shape (B={B} or 1, Ck={Ck}, ...) to match memory_key "
            f"{tuple(first_key.shape)}; got shape {tuple(query_key.shape)}")
    check_one_dtype([("query_key", query_key), *keys, *values, *others])
    return (_positions_last(query_key), [_positions_last(key) for _, key in keys],
            [_positions_last(value) for _, value in values], query_key.shape[2:])


def _positions_last(tensor):
    """(B, C, *positions) as (B, C, L): a view where the strides allow; a (B, C, L) tensor
    itself (flatten's dispatch costs a call about a microsecond)."""
    return tensor if tensor.dim() == 3 else tensor.flatten(2)


def checked_lengths(memory_lengths, keys):
    """memory_lengths as a (B,) int64 tensor on the memory's device, or None; ValueError when
    it is not (B,) integers in [1, N].

    The values are checked against N on the host: for lengths whose range the host knows
    (set by a FixedCapacityMemory and not changed since: known_lengths), from that range;
    otherwise by reading the tensor's minimum and maximum back (a device synchronisation,
    skipped while torch.compile traces), which a CUDA graph capture cannot contain, so a plain
    tensor (or a sequence) of lengths is refused under capture."""
    if memory_lengths is None:
        return None
    B, device = keys[0].shape[0], keys[0].device
    N = sum(key.shape[2] for key in keys)
    expected = f"a (B={B},) integer tensor on {device} with values in [1, N={N}]"
    if not isinstance(memory_lengths, torch.Tensor):
        if capturing():
            raise ValueError(CAPTURED_LENGTHS)
        try:
            memory_lengths = torch.as_tensor(memory_lengths, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"memory_lengths must be {expected}; got {memory_lengths!r}") \
                from error
    if memory_lengths.is_floating_point() or memory_lengths.is_complex() or \
            memory_lengths.dtype == torch.bool:
        raise ValueError(f"memory_lengths must be {expected}; got dtype {memory_lengths.dtype}")
    if tuple(memory_lengths.shape) != (B,):
        raise ValueError(f"memory_lengths must be {expected}; got shape "
                         f"{tuple(memory_lengths.shape)}")
    if memory_lengths.device != device:
        raise ValueError(f"memory_lengths must be {expected}; got a tensor on "
                         f"{memory_lengths.device}")
    if torch._C._are_functorch_transforms_active() and \
            torch._C._functorch.is_batchedtensor(memory_lengths):
        raise ValueError(f"memory_lengths must be {expected}; got a tensor mapped by "
                         "torch.func.vmap (its values are checked on the host): map the query "
                         "and the memory, not the lengths")
    if not torch.compiler.is_compiling():
        known = known_range(memory_lengths)
        if known is None:
            if capturing():
                raise ValueError(CAPTURED_LENGTHS)
            known = memory_lengths.min().item(), memory_lengths.max().item()
        low, high = known
        if low < 1 or high > N:
            raise ValueError(f"memory_lengths must be {expected}; got values in [{low}, {high}]")
    return memory_lengths.to(torch.int64)


CAPTURED_LENGTHS = (
    "memory_lengths under CUDA graph capture must be a FixedCapacityMemory's lengths (checked "
    "on the host where they are set): a plain tensor's values would be read back from the "
    "device to be checked, which a capture cannot contain")


def capturing():
    """Whether the current CUDA stream is capturing a graph (False without CUDA initialised:
    no capture, and no CUDA context made for the question; False while torch.compile traces,
    whose graphs are captured later, by its own CUDA graphs, without these checks)."""
    return not torch.compiler.is_compiling() and torch.cuda.is_initialized() and \
        torch.cuda.is_current_stream_capturing()


# id(lengths tensor) -> (weak reference, its version counter, lowest, highest) for lengths
# whose values the host knows (known_lengths)
_KNOWN_RANGES: dict = {}


def known_lengths(lengths, low, high):
    """Record that the (B,) int64 tensor `lengths` holds values in [low, high] as it stands
    now (its version counter): the reads then check that range on the host instead of reading
    the tensor back. Any later in-place change not recorded here (its version moves on) makes
    the reads check the tensor itself again (and refuse it under CUDA graph capture). The
    tensor must track versions (not an inference-mode tensor)."""
    key = id(lengths)
    entry = _KNOWN_RANGES.get(key)
    if entry is None or entry[0]() is not lengths:
        reference = weakref.ref(lengths, lambda _: _KNOWN_RANGES.pop(key, None))
    else:
        reference = entry[0]
    _KNOWN_RANGES[key] = (reference, lengths._version, int(low), int(high))


def known_range(lengths):
    """(low, high) recorded by known_lengths for this tensor as it stands, or None."""
    entry = _KNOWN_RANGES.get(id(lengths))
    if entry is None or entry[0]() is not lengths or lengths.is_inference() or \
            entry[1] != lengths._version:
        return None
    return entry[2], entry[3]


def concatenated(chunks):
    """The memory as one (B, C, N) tensor: the chunk itself when there is one (no copy)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


@dataclasses.dataclass
class PreparedCall:
    """A validated call: flattened q (Bq, Ck', HW), key and value chunks, the query's spatial
    shape, the effective scale and similarity (XMem folded into "dot"), backend, lengths
    (B,) int64 or None, top_k or None."""
    q: torch.Tensor
    keys: list
    values: list
    query_spatial: tuple
    scale: float
    l2: bool
    backend: str
    lengths: Optional[torch.Tensor]
    top_k: Optional[int]


def prepared(query_key, memory_key, memory_value, *, scale=None, similarity="dot",
             shrinkage=None, selection=None, memory_lengths=None, backend="auto", top_k=None):
    """Validate a read's arguments (errors name the argument and the expected shape) and
    return the PreparedCall the backends run; under autocast, after autocast_inputs. A call
    whose tensors have the shapes, dtypes and devices of one that passed (and the same
    similarity and scale) skips the checks those decide (_checked_layouts); the lengths, the
    backend and top_k are checked on every call."""
    query_key, memory_key, memory_value, shrinkage, selection = autocast_inputs(
        query_key, memory_key, memory_value, shrinkage, selection)
    key = _layout_key(query_key, memory_key, memory_value, scale, similarity) \
        if shrinkage is None and selection is None else None
    checked = None if key is None else _checked_layouts.get(key)
    if checked is not None:
        query_spatial, scale, l2 = checked
        q = _positions_last(query_key)
        if type(memory_key) is torch.Tensor:
            keys, values = [_positions_last(memory_key)], [_positions_last(memory_value)]
        else:
            keys = [_positions_last(chunk) for chunk in memory_key]
            values = [_positions_last(chunk) for chunk in memory_value]
    else:
        q, keys, values, query_spatial, scale, l2 = _checked(
            query_key, memory_key, memory_value, scale, similarity, shrinkage, selection)
        if key is not None:
            if len(_checked_layouts) >= CHECKED_LAYOUTS:
                _checked_layouts.clear()
            _checked_layouts[key] = (query_spatial, scale, l2)
    backend = backends.resolve(backend, keys[0])
    lengths = checked_lengths(memory_lengths, keys)
    if lengths is not None and backend == "torch" and capturing():
        raise ValueError("memory_lengths under CUDA graph capture needs backend='triton' or "
                         "'naive': the 'torch' backend reads the lengths on the host")
    if top_k is not None:
        top_k = checked_top_k(top_k, backend, sum(key.shape[2] for key in keys))
    return PreparedCall(q, keys, values, query_spatial, scale, l2, backend, lengths, top_k)


# _layout_key -> (query spatial shape, scale, l2) of calls that passed the checks (_checked),
# at most CHECKED_LAYOUTS of them (all dropped beyond)
_checked_layouts: dict = {}
CHECKED_LAYOUTS = 256


def _layout_key(query_key, memory_key, memory_value, scale, similarity):
    """What _checked reads of a "dot" or "l2" call: every tensor's shape, dtype and device,
    the memory's chunks, the similarity and the scale; None where the call may not take the
    fast path (XMem, whose inputs are augmented on every call; anything but plain tensors; a
    scale of another type; or while torch.compile traces: its symbolic sizes are not keys)."""
    if type(similarity) is not str or similarity not in ("dot", "l2") or \
            not (scale is None or type(scale) in (float, int)) or \
            type(query_key) is not torch.Tensor:
        return None
    if type(memory_key) is torch.Tensor:
        if type(memory_value) is not torch.Tensor:
            return None
        memory = (memory_key.shape, memory_key.dtype, memory_key.device,
                  memory_value.shape, memory_value.dtype, memory_value.device)
    elif type(memory_key) in (list, tuple) and type(memory_value) in (list, tuple):
        if not all(type(chunk) is torch.Tensor for chunk in (*memory_key, *memory_value)):
            return None
        memory = (len(memory_key), len(memory_value),
                  *[(chunk.shape, chunk.dtype, chunk.device)
                    for chunk in (*memory_key, *memory_value)])
    else:
        return None
    if torch.compiler.is_compiling():
        return None
    return (query_key.shape, query_key.dtype, query_key.device, type(memory_key), memory,
            similarity, scale)


def _checked(query_key, memory_key, memory_value, scale, similarity, shrinkage, selection):
    """(q, key chunks, value chunks, query spatial shape, scale, l2) of a call, every check
    made: flatten_checked, the similarity, the scale, XMem's inputs (folded in)."""
    q, keys, values, query_spatial = flatten_checked(query_key, memory_key, memory_value,
                                                     _xmem_tensors(similarity, shrinkage,
                                                                   selection))
    similarity = checked_similarity(similarity)
    # XMem folds the scale into the memory keys (memory dtype); the other reads apply it to
    # the query in float32 (float64 for a float64 memory)
    compute_dtype = keys[0].dtype if similarity == "xmem" else accumulation_dtype(keys[0].dtype)
    scale = checked_scale(scale, q.shape[1], compute_dtype)
    if similarity != "xmem" and (shrinkage is not None or selection is not None):
        raise ValueError("shrinkage and selection belong to similarity='xmem'; got similarity="
                         f"{similarity!r}")
    if similarity == "xmem":
        q, keys = xmem.augment(q, keys, scale, shrinkage, selection)
        scale = 1.0
    return q, keys, values, tuple(query_spatial), float(scale), similarity == "l2"


def autocast_inputs(query_key, *others):
    """(query_key, *others) as the read takes them under torch.autocast: where autocast is on
    for the query's device, every floating-point tensor on that device other than float64
    (in others: a tensor or a list of chunks) cast to autocast's dtype, as autocast casts the
    inputs of torch's scaled_dot_product_attention (a "lower precision" op); the read then
    runs as on inputs of that dtype (its backends turn autocast off inside). Anything else
    (integers, float64, other devices, non-tensors) as it is, for the checks to name."""
    if not torch._C._is_any_autocast_enabled() or not isinstance(query_key, torch.Tensor):
        return (query_key, *others)
    device = query_key.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return (query_key, *others)
    dtype = torch.get_autocast_dtype(device)

    def cast(value):
        if isinstance(value, (list, tuple)):
            return [cast(chunk) for chunk in value]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                value.dtype != torch.float64 and value.device.type == device:
            return value.to(dtype)
        return value
    return (cast(query_key), *(cast(value) for value in others))


def _xmem_tensors(similarity, shrinkage, selection):
    """[(name, tensor)] of the XMem inputs that are floating-point tensors (xmem.py's checks
    name the rest)."""
    if similarity != "xmem":
        return []
    chunks = list(shrinkage) if isinstance(shrinkage, (list, tuple)) else [shrinkage]
    named = [(f"shrinkage[{index}]" if isinstance(shrinkage, (list, tuple)) else "shrinkage",
              chunk) for index, chunk in enumerate(chunks)] + [("selection", selection)]
    return [(name, tensor) for name, tensor in named
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]


def checked_top_k(top_k, backend, N):
    """top_k capped at N, or None; ValueError for anything but a positive integer, or one
    above what the backend supports."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
    if backend == "triton" and top_k > backends.TRITON_MAX_TOP_K:
        raise ValueError(f"top_k={top_k} is above the {backends.TRITON_MAX_TOP_K} the triton "
                         "backend supports; use backend='torch'")
    return min(top_k, N)
