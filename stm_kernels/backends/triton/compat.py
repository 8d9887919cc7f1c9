"""Compatibility with older Triton releases, and the one place that reads a compiled kernel's
internals (its registers and local memory).

Triton 3.6's CPU interpreter converts a loop bound such as `range(n_lo, n_end, BLOCK_N)` to
an int with `int(ndarray)`, and program ids are 1-element arrays there; NumPy 2.4 refuses
that conversion ("only 0-dimensional arrays can be converted to Python scalars",
triton-lang/triton#9171). Every kernel here loops over runtime bounds, so with Triton 3.6 and
NumPy >= 2.4 no kernel could run under TRITON_INTERPRET=1. Triton's own fix (#9172, shipped
after 3.6) squeezes the array first; `patch_interpreter_index` applies the same one line to
an interpreter that still has the old one, and does nothing otherwise. Compiled (GPU) kernels
are never affected.
"""
import inspect

_OLD_INDEX = "int(self.handle.data))"


def _squeezed_index(self):
    return int(self.handle.data.squeeze())


def patch_interpreter_index():
    """Give the interpreter's tensors an `__index__` that accepts 1-element arrays if its
    `_patch_lang_tensor` still uses `int(self.handle.data)`; True if it patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - every supported Triton has the interpreter
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "patched_by_stm_kernels", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):  # no source to check: leave Triton alone
        return False
    if _OLD_INDEX not in source:
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores attributes last-in first-out, so this override is undone too.
        scope.set_attr(tensor, "__index__", _squeezed_index)

    patch_lang_tensor.patched_by_stm_kernels = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def local_memory_bytes(compiled):
    """Bytes of local memory per thread of a compiled kernel (`JITFunction.warmup`'s result:
    mostly spilled registers), as the driver reports it when the kernel is loaded, or None
    where this Triton does not say. Triton keeps it as `n_spills`, in 4-byte words (the
    driver's local size / 4, on CUDA and ROCm alike), filled in when the kernel is loaded
    (`_init_handles`, which raises OutOfResources as the launch would)."""
    load = getattr(compiled, "_init_handles", None)
    if load is not None:
        load()
    return _local_bytes(compiled)


def _local_bytes(compiled):
    words = getattr(compiled, "n_spills", None)  # the driver's local size / 4
    return None if words is None else 4 * int(words)


def compiled_resources(compiled):
    """(registers, bytes of local memory) per thread of a launched kernel (what `kernel[grid]
    (...)` returns, loaded by its launch), or None where it says neither (the interpreter
    returns no compiled kernel)."""
    registers, local = getattr(compiled, "n_regs", None), _local_bytes(compiled)
    if registers is None or local is None:
        return None
    return int(registers), local
