"""STCN (the stcnbuf package) reading memory with `stm_kernels.memory_read`.

    from stm_kernels.integrations.stcn import use_fused_read, fused_read

    stcn = STCNInference(prop_model, mem_size, temp_mem_size, top_k, resolution)
    use_fused_read(stcn)                # from now on its memory banks read fused
    results = process_video(init_segmenter, stcn)   # stcnbuf.segment_video's loop, unchanged
    with fused_read(stcn): ...          # the same inside the block, restored on exit

What changes, per instance (other instances, and the classes, keep STCN's read):

- a `MemoryBank`: `match_memory` becomes one memory_read with similarity="l2" (STCN's
  negative squared L2 `(2 q.k - |k|^2) / sqrt(CK)`), `top_k=bank.top_k`, the permanent and
  the temporary memory passed as two chunks (no concatenated copy of the memory), the objects
  folded into the value channels and the query batch into the query positions (all of them
  share the one memory key). The readout has match_memory's shape (objects, batch, CV, h, w)
  and dtype (autocast included), contiguous; the (N x HW) affinity is never materialised.
  Where STCN's read is undefined or fails, the fused one is defined: identical keys (a frame
  stored twice) tie at the top-k boundary, where torch.topk takes either and memory_read the
  lower position (the permanent memory's); a memory of fewer than top_k positions, where
  torch.topk raises, reads all of them.
  The bank's class is swapped for a subclass of it that differs only in match_memory, rather
  than setting an instance attribute: `torch.jit.script` (segment_video scripts the model)
  compiles a module's methods from its class, and would silently keep STCN's read. The
  subclass's match_memory is scriptable and calls the fused read back in Python
  (`torch.jit.ignore`), so a model scripted while fused reads fused.
- an `STCNInference` (the "processor"): its current memory bank, if any, as above, and its
  `initialize` (an instance attribute), which creates a new MemoryBank per video, so that
  the bank it creates reads fused too.

`use_original_read` and the exit of `fused_read` restore the Python objects. A model scripted
in between keeps the read it was compiled with: the scripted copy is the caller's (and, its
read being a call into Python, torch.jit.save cannot export it).

Before patching, the stcnbuf functions whose behaviour the fused read reproduces or relies on
(match_memory, _global_matching, softmax_w_top, add_memory's memory layout, and
STCNInference.initialize, as the target's classes and modules resolve them) are compared with
fingerprints of the known stcnbuf versions: a difference raises RuntimeError naming the
installed version and the functions that differ, rather than risking a silent wrong read.
Another release whose functions are unchanged is accepted; the "stcn" extra pins the known
version (_check_known says why).
"""
import contextlib
import functools
import math
from typing import cast

import torch

from ..backends import TRITON_MAX_TOP_K
from ..memory_read import memory_read
from ..options import BACKENDS, Backend
from ._patching import MISSING, backend_of, check_free, install
from ._versions import installed_version, unknown_functions

__all__ = ["use_fused_read", "use_original_read", "fused_read"]

# sha256 (first 16 hex digits) of inspect.getsource of each function the fused read stands in
# for or relies on, per stcnbuf version whose read it reproduces exactly.
_KNOWN_FINGERPRINTS = {
    "0.2.2": {
        "MemoryBank.match_memory": "b230c58f19df0e9b",
        "MemoryBank._global_matching": "be61bc754d90acb0",
        "softmax_w_top": "a6f750bf941734eb",
        "MemoryBank.add_memory": "bc6311e18885f3cb",
        "STCNInference.initialize": "5fde535f039aca8b",
    },
}

# The instance attribute holding a fused bank's backend (a TorchScript attribute once scripted)
_BACKEND = "_stm_kernels_backend"
# The version setup.py's "stcn" extra pins (stcnbuf==_PINNED): the newest known one.
_PINNED = list(_KNOWN_FINGERPRINTS)[-1]


def use_fused_read(target, *, backend="auto"):
    """Make `target` read memory with `stm_kernels.memory_read` from now on; returns target.

    target: an stcnbuf `STCNInference` (before or after `initialize`: the banks it creates
    read fused too) or a `MemoryBank`; patch before `torch.jit.script`, which compiles the
    read in. backend: memory_read's backend ("auto": Triton on CUDA, the chunked torch read
    otherwise; a bank's top_k above Triton's limit reads with "torch"). Calling it again
    changes the backend. The patch is per instance: other models keep STCN's read.

    Raises ImportError without stcnbuf (`pip install "/path/to/stm-kernels[stcn]"`),
    TypeError for another target, ValueError for an unknown backend or an `initialize`
    already replaced on this instance by something else, RuntimeError when the installed
    stcnbuf functions are not ones it knows (see _check_known).
    """
    kind = _kind(target)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _check_known(_originals(target, kind))
    if kind == "processor":
        _check_free(target, "initialize")
        install(target, "initialize", _fused_initialize, backend)
        if target.memory_bank is not None:
            _fuse_bank(target.memory_bank, backend)
    else:
        _fuse_bank(target, backend)
    return target


def use_original_read(target):
    """Undo use_fused_read: `target` (and, for an STCNInference, its current memory bank)
    reads with STCN's own methods again; returns target. A target never patched is left as
    it is."""
    kind = _kind(target)
    if kind == "processor":
        if _ours(vars(target).get("initialize")) is not None:
            delattr(target, "initialize")
        if target.memory_bank is not None:
            _unfuse_bank(target.memory_bank)
    else:
        _unfuse_bank(target)
    return target


@contextlib.contextmanager
def fused_read(target, *, backend="auto"):
    """`with fused_read(target):` reads fused inside the block (use_fused_read) and restores
    the target's previous read on exit, also on an exception: exactly the state before the
    block (STCN's read, or an enclosing fused read's). For an STCNInference initialised inside
    the block, the new memory bank gets the processor's restored state."""
    kind = _kind(target)
    saved = _saved_state(target, kind)
    use_fused_read(target, backend=backend)
    try:
        yield target
    finally:
        _restore_state(target, kind, saved)


# --------------------------------------------------------------------------- targets


def _stcn_classes():
    """(STCNInference, MemoryBank), importing stcnbuf only when asked."""
    try:
        from stcnbuf.inference_memory_bank import MemoryBank
        from stcnbuf.model.eval_network import STCNInference
    except ImportError as error:
        raise ImportError("stm_kernels.integrations.stcn needs STCN (the stcnbuf package): "
                          'pip install "/path/to/stm-kernels[stcn]" (your clone), or pip '
                          f'install "stcnbuf=={_PINNED}"') from error
    return STCNInference, MemoryBank


def _kind(target):
    """"processor" or "bank"; TypeError for anything else."""
    STCNInference, MemoryBank = _stcn_classes()
    if isinstance(target, STCNInference):
        return "processor"
    if isinstance(target, MemoryBank):
        return "bank"
    if isinstance(target, torch.jit.ScriptModule):
        raise TypeError("target must be the Python STCNInference or MemoryBank, not a "
                        "torch.jit.script'ed module (scripting compiles the read in): call "
                        "use_fused_read(model) before torch.jit.script(model)")
    raise TypeError("target must be an stcnbuf STCNInference or MemoryBank; got "
                    f"{type(target).__name__}")


def _bank_functions(bank_class):
    """{name: function} of the read the MemoryBank class bank_class runs, as it and its module
    resolve them (a fused class: the class it stands in for)."""
    bank_class = _ORIGINAL_CLASS.get(bank_class, bank_class)
    global_matching = bank_class._global_matching
    return {
        "MemoryBank.match_memory": bank_class.match_memory,
        "MemoryBank._global_matching": global_matching,
        "softmax_w_top": getattr(global_matching, "__globals__", {}).get("softmax_w_top"),
        "MemoryBank.add_memory": bank_class.add_memory,
    }


def _originals(target, kind):
    """[{name: function}] STCN would run for target: a subclass overriding one of them, or a
    module-level function replaced, shows up as a different fingerprint."""
    if kind == "bank":
        return [_bank_functions(type(target))]
    initialize = type(target).initialize
    created = getattr(initialize, "__globals__", {}).get("MemoryBank")  # what initialize makes
    functions = [{"STCNInference.initialize": initialize, **_bank_functions(created)}]
    if target.memory_bank is not None:
        functions.append(_bank_functions(type(target.memory_bank)))
    return functions


def _check_known(function_sets):
    """RuntimeError, naming the installed and the known versions and the functions that
    differ, unless every function of each set has the fingerprint of one known stcnbuf
    version.

    The guard compares the functions, not the version string: any stcnbuf release whose
    fingerprinted functions are unchanged is accepted. And setup.py's "stcn" extra pins
    `stcnbuf==_PINNED` (not `>=`), so that `pip install "/path/to/stm-kernels[stcn]"` always
    installs a version this guard accepts: with `>=`, a later release that changes one of
    these functions would install without a word and only fail here, at run time. The pin
    moves that decision to the resolver at install time, and an stcnbuf installed by other
    means still gets the guard's verdict. A release that changes them is supported by
    checking the fused read against it, adding its fingerprints and moving the pin."""
    for functions in function_sets:
        unknown = unknown_functions(functions, _KNOWN_FINGERPRINTS)
        if unknown is None:
            continue
        newest, differing = unknown
        raise RuntimeError(
            f"stm_kernels.integrations.stcn reproduces the memory read of stcnbuf "
            f"{', '.join(_KNOWN_FINGERPRINTS)}; the installed stcnbuf is "
            f"{installed_version('stcnbuf', 'stcnbuf')} and its {', '.join(differing)} differ from "
            f"{newest}'s (or a subclass or patch replaces them). Refusing to patch rather than "
            f'risk a silently different read: pip install "stcnbuf=={_PINNED}", or keep '
            "STCN's read")


# --------------------------------------------------------------------------- patching


class _FusedMatchMemory:
    """The method a fused bank's class puts before MemoryBank's (see _fused_class)."""

    def match_memory(self, qk: torch.Tensor) -> torch.Tensor:
        # the attributes are MemoryBank's (this class is only ever mixed into it)
        return _fused_match_memory(  # type: ignore[attr-defined]
            qk, self.mem_k, self.mem_v, self.temp_k, self.temp_v,  # type: ignore[attr-defined]
            self.has_temp_mem, self.top_k, self._stm_kernels_backend)  # type: ignore[attr-defined]


# fused class -> the bank class it stands in for, and back
_ORIGINAL_CLASS: dict[type, type] = {}
_FUSED_CLASS: dict[type, type] = {}


def _fused_class(bank_class):
    """The subclass of bank_class whose match_memory is the fused read (one per class)."""
    if bank_class not in _FUSED_CLASS:
        fused = type(f"Fused{bank_class.__name__}", (_FusedMatchMemory, bank_class),
                     {"__module__": __name__})
        _FUSED_CLASS[bank_class] = fused
        _ORIGINAL_CLASS[fused] = bank_class
    return _FUSED_CLASS[bank_class]


def _fuse_bank(bank, backend):
    if type(bank) not in _ORIGINAL_CLASS:
        bank.__class__ = _fused_class(type(bank))
    setattr(bank, _BACKEND, backend)


def _unfuse_bank(bank):
    if type(bank) in _ORIGINAL_CLASS:
        bank.__class__ = _ORIGINAL_CLASS[type(bank)]
    if _BACKEND in vars(bank):
        delattr(bank, _BACKEND)


def _ours(method):
    """The backend of our installed initialize; None for anything else."""
    return backend_of(method, (_fused_initialize,))


def _check_free(obj, name):
    check_free(obj, name, (_fused_initialize,))


def _bank_state(bank):
    return None if bank is None else (bank, type(bank), vars(bank).get(_BACKEND, MISSING))


def _saved_state(target, kind):
    """What the patch may change, as it is now."""
    if kind == "bank":
        return {"bank": _bank_state(target)}
    return {"initialize": vars(target).get("initialize", MISSING),
            "bank": _bank_state(target.memory_bank)}


def _restore_state(target, kind, saved):
    if saved["bank"] is not None:
        bank, bank_class, backend = saved["bank"]
        bank.__class__ = bank_class
        if backend is not MISSING:
            setattr(bank, _BACKEND, backend)
        elif _BACKEND in vars(bank):
            delattr(bank, _BACKEND)
    if kind == "bank":
        return
    if saved["initialize"] is not MISSING:
        target.initialize = saved["initialize"]
    elif "initialize" in vars(target):
        delattr(target, "initialize")
    bank = target.memory_bank
    if bank is not None and (saved["bank"] is None or bank is not saved["bank"][0]):
        # initialised inside the block: the new bank follows the restored processor
        backend = _ours(saved["initialize"])
        if backend is None:
            _unfuse_bank(bank)
        else:
            _fuse_bank(bank, backend)


# --------------------------------------------------------------------------- fused read


def _fused_initialize(processor, frame, mask, *, backend):
    """STCNInference.initialize, then the memory bank it created reads fused too."""
    type(processor).initialize(processor, frame, mask)
    _fuse_bank(processor.memory_bank, backend)


@torch.jit.ignore
def _fused_match_memory(qk: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                        temp_k: torch.Tensor, temp_v: torch.Tensor, has_temp_mem: bool,
                        top_k: int, backend: str) -> torch.Tensor:
    """MemoryBank.match_memory (stcnbuf 0.2.2) as one memory_read: qk (batch, CK, h, w)
    against the key (1, CK, N) and the values (objects, CV, N) of the permanent memory and,
    when has_temp_mem, the temporary one; returns (objects, batch, CV, h, w)."""
    batch, key_channels, h, w = qk.shape
    keys, values = [mem_k], [mem_v]
    if has_temp_mem:
        keys.append(temp_k)
        values.append(temp_v)
    objects, value_channels = mem_v.shape[:2]
    out_dtype = _readout_dtype(qk, keys, values)
    # STCN's einsums promote the query and memory dtypes; memory_read takes one
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in [qk, *keys, *values]])
    # every object and every query frame reads the one memory key: objects become value
    # channels, frames query positions, so the top-k is selected once per query position
    query = qk.to(dtype).flatten(2).transpose(0, 1).reshape(1, key_channels, batch * h * w)
    if backend == "auto" and top_k > TRITON_MAX_TOP_K:
        backend = "torch"
    out = memory_read(query, [key.to(dtype) for key in keys],
                      [value.to(dtype).reshape(1, objects * value_channels, value.shape[2])
                       for value in values],
                      scale=1 / math.sqrt(key_channels), similarity="l2", top_k=top_k,
                      backend=cast(Backend, backend))  # a BACKENDS name (checked when patched)
    out = out.view(objects, value_channels, batch, h * w).transpose(1, 2)
    # contiguous as segment_with_query's view needs
    return out.to(out_dtype).contiguous().view(objects, batch, value_channels, h, w)


def _readout_dtype(qk: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor]) -> torch.dtype:
    """The dtype of match_memory's readout under the current autocast: its arithmetic
    (concatenation, einsums, the squared-norm subtraction) run on empty tensors."""
    key_channels = qk.shape[1]
    mk = torch.cat([key.new_empty((key_channels, 0)) for key in keys], 1)
    mv = torch.cat([value.new_empty((1, 1, 0)) for value in values], 2)
    ab = torch.einsum('cm,bcq->bmq', mk, qk.new_empty((1, key_channels, 0)))
    affinity = 2 * ab - mk.pow(2).sum(0).unsqueeze(-1)
    return torch.einsum('ocm,bmq->obcq', mv, affinity).dtype
