"""Cutie (the rf-cutie package) reading memory with `stm_kernels.memory_read`.

    from stm_kernels.integrations.cutie import use_fused_read, fused_read

    processor = InferenceCore(network, cfg)
    use_fused_read(processor)           # from now on its memory reads are fused
    with fused_read(network):           # training: CUTIE.read_memory, restored on exit
        ...

What changes, per instance (the classes and other instances are untouched):

- an `InferenceCore` (the "processor"): its memory manager, as below, and its `clear_memory`,
  so that the manager it creates reads fused too.
- a `MemoryManager`: `read`. Per memory bucket one memory_read with similarity="xmem" (the
  memory shrinkage and the query selection, scale 1/sqrt(CK)), `top_k=cfg.top_k`, the
  long-term memory and the working memory passed as two chunks (no concatenated copy of the
  keys), the objects of a chunk of `chunk_size` objects folded into the value channels, and
  `return_usage=True` where Cutie counts usage: the usage is split at the long-term memory's
  size and given to `update_bucket_usage` as Cutie does. With `chunk_size` objects per chunk
  it is one read per chunk (the scores are recomputed per chunk, where Cutie keeps one
  affinity per bucket), the usage counted on the first. Everything after the visual readout
  (pixel fusion, object transformer, save_aux) is Cutie's own code, unchanged.
- a `CUTIE` network (or a subclass such as the training wrapper): `read_memory`, the training
  read (no top-k, float32 outside autocast as Cutie): the fused read and its backward, which
  give gradients to the query key and selection, the memory keys, shrinkage and values.

The memory consolidation (`MemoryManager.consolidation`) keeps Cutie's read: its affinity is
memory x prototypes (at most `num_prototypes` columns), never memory x HW, and fusing it would
copy the values of all objects into one tensor or read once per object.

The results are Cutie's up to float32 rounding, except where Cutie's own read fails or is
arbitrary: its top-k softmax exponentiates the scores without subtracting their maximum (the
scores are negative distances: a query whose k best are all below about -103 underflows to
0/0 = NaN in float32; memory_read's softmax is stable), torch.topk breaks score ties in no
specified order (memory_read: the lower memory index), and a top_k above the memory size
makes torch.topk raise (memory_read reads the whole memory).

Before patching, the Cutie functions whose behaviour the fused read reproduces (the methods
replaced, and the similarity, softmax and readout functions they call, as the target's class
and modules resolve them) are compared with fingerprints of their source in the known rf-cutie
versions: any difference, even a comment, raises RuntimeError naming the installed version
and the functions that differ, rather than risking a silent wrong read. Another release whose
functions are unchanged is accepted; the "cutie" extra pins the known version (_check_known
says why).
"""
import contextlib

import torch

from ..memory_read import memory_read
from ..options import BACKENDS
from ._patching import MISSING, backend_of, check_free, install
from ._versions import installed_version, unknown_functions

__all__ = ["use_fused_read", "use_original_read", "fused_read"]

# sha256 (first 16 hex digits) of inspect.getsource of each function the fused read stands in
# for, per rf-cutie version whose read it reproduces exactly.
_KNOWN_FINGERPRINTS = {
    "1.0.1": {
        "MemoryManager.read": "f7dacb97d975deee",
        "MemoryManager._readout": "b11c7a7385fd0877",
        "MemoryManager._get_visual_values_by_ids": "6f99421213b5969d",
        "InferenceCore.clear_memory": "673de36b76589737",
        "CUTIE.read_memory": "0587493c4a417f1f",
        "get_similarity": "73f0895cb7385b4b",
        "do_softmax": "9739f1f78ecb92e1",
        "get_affinity": "d28ca9380aa5684a",
        "readout": "780b8022e5ac63a7",
    },
}

# The version setup.py's "cutie" extra pins (rf-cutie==_PINNED): the newest known one.
_PINNED = list(_KNOWN_FINGERPRINTS)[-1]


def use_fused_read(target, *, backend="auto"):
    """Make `target` read memory with `stm_kernels.memory_read` from now on; returns target.

    target: a Cutie `InferenceCore`, `MemoryManager` or `CUTIE` network (see the module
    docstring for what each reads fused). backend: memory_read's backend ("auto": Triton on
    CUDA, the chunked torch read otherwise). Calling it again changes the backend.
    The patch is per instance: other models, and the classes, keep Cutie's read.

    Raises ImportError without Cutie (`pip install "/path/to/stm-kernels[cutie]"`), TypeError
    for another target, ValueError for an unknown backend or a method already replaced on this
    instance by something else, RuntimeError when the installed Cutie functions are not ones
    it knows (see _check_known).
    """
    kind = _kind(target)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _check_known(_originals(target, kind))
    if kind == "processor":
        _check_free(target, "clear_memory")
        _check_free(target.memory, "read")
        install(target, "clear_memory", _fused_clear_memory, backend)
        install(target.memory, "read", _fused_manager_read, backend)
    elif kind == "manager":
        _check_free(target, "read")
        install(target, "read", _fused_manager_read, backend)
    else:
        _check_free(target, "read_memory")
        install(target, "read_memory", _fused_read_memory, backend)
    return target


def use_original_read(target):
    """Undo use_fused_read: `target` (and, for an InferenceCore, its current memory manager)
    reads with Cutie's own methods again; returns target. A target never patched is left as
    it is."""
    kind = _kind(target)
    if kind == "processor":
        _uninstall(target, "clear_memory")
        _uninstall(target.memory, "read")
    elif kind == "manager":
        _uninstall(target, "read")
    else:
        _uninstall(target, "read_memory")
    return target


@contextlib.contextmanager
def fused_read(target, *, backend="auto"):
    """`with fused_read(target):` reads fused inside the block (use_fused_read) and restores
    the target's previous methods on exit, also on an exception: exactly those of the
    instance before the block (Cutie's, or an enclosing fused read's). For an InferenceCore
    whose memory was cleared inside the block, the new memory manager gets the processor's
    restored state."""
    kind = _kind(target)
    saved = _saved_state(target, kind)
    use_fused_read(target, backend=backend)
    try:
        yield target
    finally:
        _restore_state(target, kind, saved)


# --------------------------------------------------------------------------- targets


def _cutie_classes():
    """(InferenceCore, MemoryManager, CUTIE), importing Cutie only when asked."""
    try:
        from cutie.inference.inference_core import InferenceCore
        from cutie.inference.memory_manager import MemoryManager
        from cutie.model.cutie import CUTIE
    except ImportError as error:
        raise ImportError("stm_kernels.integrations.cutie needs Cutie (the rf-cutie package): "
                          'pip install "/path/to/stm-kernels[cutie]" (your clone), or pip '
                          f'install "rf-cutie=={_PINNED}"') from error
    return InferenceCore, MemoryManager, CUTIE


def _kind(target):
    """"processor", "manager" or "network"; TypeError for anything else."""
    InferenceCore, MemoryManager, CUTIE = _cutie_classes()
    for kind, cls in (("processor", InferenceCore), ("manager", MemoryManager),
                      ("network", CUTIE)):
        if isinstance(target, cls):
            return kind
    raise TypeError("target must be a Cutie InferenceCore, MemoryManager or CUTIE network "
                    "(for a DistributedDataParallel model pass model.module); got "
                    f"{type(target).__name__}")


def _originals(target, kind):
    """{name: the function} Cutie would run for target, as its class and modules resolve them
    (a subclass overriding one of them, or a module-level function replaced, shows up as a
    different fingerprint)."""
    functions = {}
    if kind in ("processor", "manager"):
        manager_type = type(target.memory if kind == "processor" else target)
        read = manager_type.read
        functions.update({
            "MemoryManager.read": read,
            "MemoryManager._readout": manager_type._readout,
            "MemoryManager._get_visual_values_by_ids": manager_type._get_visual_values_by_ids,
            "get_similarity": getattr(read, "__globals__", {}).get("get_similarity"),
            "do_softmax": getattr(read, "__globals__", {}).get("do_softmax"),
        })
        if kind == "processor":
            functions["InferenceCore.clear_memory"] = type(target).clear_memory
    else:
        read_memory = type(target).read_memory
        get_affinity = getattr(read_memory, "__globals__", {}).get("get_affinity")
        functions.update({
            "CUTIE.read_memory": read_memory,
            "get_affinity": get_affinity,
            "readout": getattr(read_memory, "__globals__", {}).get("readout"),
            "get_similarity": getattr(get_affinity, "__globals__", {}).get("get_similarity"),
            "do_softmax": getattr(get_affinity, "__globals__", {}).get("do_softmax"),
        })
    return functions


def _check_known(functions):
    """RuntimeError, naming the installed and the known versions and the functions that
    differ, unless every function has the fingerprint of one known rf-cutie version.

    The guard compares the functions, not the version string: any rf-cutie release whose
    fingerprinted functions are unchanged is accepted. And setup.py's "cutie" extra pins
    `rf-cutie==_PINNED` (not `>=`), so that `pip install "/path/to/stm-kernels[cutie]"`
    always installs a version this guard accepts: with `>=`, a later release that changes
    one of these functions would install without a word and only fail here, at run time. The
    pin moves that decision to the resolver at install time, and a Cutie installed by other
    means still gets the guard's verdict. A release that changes them is supported by
    checking the fused read against it, adding its fingerprints and moving the pin."""
    unknown = unknown_functions(functions, _KNOWN_FINGERPRINTS)
    if unknown is None:
        return
    newest, differing = unknown
    raise RuntimeError(
        f"stm_kernels.integrations.cutie reproduces the memory read of rf-cutie "
        f"{', '.join(_KNOWN_FINGERPRINTS)}; in the installed rf-cutie "
        f"{installed_version('rf-cutie', 'cutie')} "
        f"these functions differ from {newest}'s: {', '.join(differing)} (changed, or "
        "replaced by a subclass or a patch). Refusing to patch rather than risk a silently "
        f'different read: pip install "rf-cutie=={_PINNED}", or keep Cutie\'s own read')


# --------------------------------------------------------------------------- patching


def _ours(method):
    """The backend of one of our installed methods; None for anything else."""
    return backend_of(method, _FUSED_FUNCTIONS)


def _check_free(obj, name):
    check_free(obj, name, _FUSED_FUNCTIONS)


def _uninstall(obj, name):
    if _ours(vars(obj).get(name)) is not None:
        delattr(obj, name)


def _saved_state(target, kind):
    """The instance attributes the patch may change, as they are now."""
    def attribute(obj, name):
        return vars(obj).get(name, MISSING)
    if kind == "processor":
        return {"clear_memory": attribute(target, "clear_memory"), "memory": target.memory,
                "read": attribute(target.memory, "read")}
    name = "read" if kind == "manager" else "read_memory"
    return {name: attribute(target, name)}


def _restore_state(target, kind, saved):
    def put(obj, name, value):
        if value is not MISSING:
            setattr(obj, name, value)
        elif name in vars(obj):
            delattr(obj, name)
    if kind != "processor":
        name, value = next(iter(saved.items()))
        put(target, name, value)
        return
    put(target, "clear_memory", saved["clear_memory"])
    put(saved["memory"], "read", saved["read"])
    if target.memory is not saved["memory"]:  # cleared inside: follow the restored processor
        backend = _ours(saved["clear_memory"])
        if backend is None:
            _uninstall(target.memory, "read")
        else:
            install(target.memory, "read", _fused_manager_read, backend)


# --------------------------------------------------------------------------- fused methods


def _fused_clear_memory(processor, *, backend):
    """InferenceCore.clear_memory, then the new memory manager reads fused too."""
    type(processor).clear_memory(processor)
    install(processor.memory, "read", _fused_manager_read, backend)


def _fused_manager_read(manager, pix_feat, query_key, selection, last_mask, network, *,
                        backend):
    """MemoryManager.read (rf-cutie 1.0.1) with the visual readout as memory_read: the same
    readout, usage updates and per-object results; see the module docstring."""
    h, w = pix_feat.shape[-2:]
    bs = pix_feat.shape[0]
    assert query_key.shape[0] == bs
    assert selection.shape[0] == bs
    assert last_mask.shape[0] == bs

    query_key = query_key.flatten(start_dim=2)  # bs*C^k*HW
    selection = selection.flatten(start_dim=2)  # bs*C^k*HW
    all_readout_mem = {}
    for bucket_id, bucket in manager.work_mem.buckets.items():
        stores = [manager.work_mem]
        if manager.use_long_term and manager.long_mem.engaged(bucket_id):
            stores.insert(0, manager.long_mem)  # long-term positions come first, as Cutie's
        keys = [store.key[bucket_id] for store in stores]
        shrinkages = [store.shrinkage[bucket_id] for store in stores]

        if manager.chunk_size < 1:
            object_chunks = [bucket]
        else:
            object_chunks = [bucket[i:i + manager.chunk_size]
                             for i in range(0, len(bucket), manager.chunk_size)]

        for chunk_index, objects in enumerate(object_chunks):
            this_sensory = manager._get_sensory_by_ids(objects)
            this_last_mask = manager._get_mask_by_ids(last_mask, objects)
            values = _visual_values(manager, objects)  # chunks of bs*(num_objects*C)*N
            # the usage does not depend on the values: counted once per bucket, as Cutie's
            count_usage = manager.use_long_term and chunk_index == 0
            # memory_read takes one dtype and never promotes; they differ only under
            # autocast, where Cutie's matmuls would cast them all too
            dtype = torch.promote_types(keys[0].dtype, values[0].dtype)
            read = memory_read(
                query_key.to(dtype), [key.to(dtype) for key in keys],
                [value.to(dtype) for value in values], similarity="xmem",
                shrinkage=[shrinkage.to(dtype) for shrinkage in shrinkages],
                selection=selection.to(dtype),
                top_k=manager.top_k,
                return_usage=count_usage, backend=backend)
            if count_usage:
                read, usage = read
                _update_usage(manager, bucket_id, usage, stores)
            visual_readout = read.view(bs, len(objects), manager.CV, h, w)
            pixel_readout = network.pixel_fusion(pix_feat, visual_readout, this_sensory,
                                                 this_last_mask)
            this_obj_mem = manager._get_object_mem_by_ids(objects)
            this_obj_mem = this_obj_mem.unsqueeze(2) if this_obj_mem is not None else None
            readout_memory, aux_features = network.readout_query(pixel_readout, this_obj_mem)
            for i, obj in enumerate(objects):
                all_readout_mem[obj] = readout_memory[:, i]

            if manager.save_aux:
                aux_output = {
                    "sensory": this_sensory,
                    "pixel_readout": pixel_readout,
                    "q_logits": aux_features["logits"] if aux_features else None,
                    "q_weights": aux_features["q_weights"] if aux_features else None,
                    "p_weights": aux_features["p_weights"] if aux_features else None,
                    "attn_mask": aux_features["attn_mask"].float() if aux_features else None,
                }
                manager.aux = aux_output

    return all_readout_mem


def _visual_values(manager, objects):
    """MemoryManager._get_visual_values_by_ids as chunks [long-term, working], each
    bs*(num_objects*C)*N: the objects folded into the channels, not concatenated along N."""
    stores = [manager.work_mem]
    if manager.use_long_term and objects[0] in manager.long_mem.value:
        stores.insert(0, manager.long_mem)
    if len(objects) == 1:  # a view: stacking one object would copy its whole value memory
        return [store.value[objects[0]] for store in stores]
    return [torch.stack([store.value[obj] for obj in objects], dim=1).flatten(1, 2)
            for store in stores]


def _update_usage(manager, bucket_id, usage, stores):
    """Cutie's usage bookkeeping for a read over [long-term,] working memory: the working part
    always, the long-term part when cfg.long_term.count_usage."""
    if len(stores) == 1:
        manager.work_mem.update_bucket_usage(bucket_id, usage)
        return
    long_mem_size = manager.long_mem.size(bucket_id)
    manager.work_mem.update_bucket_usage(bucket_id, usage[:, long_mem_size:])
    if manager.count_long_term_usage:
        manager.long_mem.update_bucket_usage(bucket_id, usage[:, :long_mem_size])


def _fused_read_memory(network, query_key, query_selection, memory_key, memory_shrinkage,
                       msk_value, obj_memory, pix_feat, sensory, last_mask, selector, *,
                       backend):
    """CUTIE.read_memory (rf-cutie 1.0.1) with get_affinity + readout as one memory_read:
    the same readout, in float32 outside CUDA autocast, differentiable by the op's backward."""
    batch_size, num_objects = msk_value.shape[:2]

    # read using visual attention
    with torch.autocast("cuda", enabled=False):
        pixel_readout = memory_read(
            query_key.float(), memory_key.float(),
            msk_value.flatten(start_dim=1, end_dim=2).float(), similarity="xmem",
            shrinkage=memory_shrinkage.float(), selection=query_selection.float(),
            backend=backend)
        pixel_readout = pixel_readout.view(batch_size, num_objects, network.value_dim,
                                           *pixel_readout.shape[-2:])
    pixel_readout = network.pixel_fusion(pix_feat, pixel_readout, sensory, last_mask)

    # read from query transformer
    mem_readout, aux_features = network.readout_query(pixel_readout, obj_memory,
                                                      selector=selector)

    aux_output = {
        "sensory": sensory,
        "q_logits": aux_features["logits"] if aux_features else None,
        "attn_mask": aux_features["attn_mask"] if aux_features else None,
    }

    return mem_readout, aux_output


_FUSED_FUNCTIONS = (_fused_clear_memory, _fused_manager_read, _fused_read_memory)
