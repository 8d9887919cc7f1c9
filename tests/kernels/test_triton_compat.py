"""The Triton compatibility layer (stm_kernels/backends/triton/compat.py): the interpreter fix
for Triton 3.6 with NumPy >= 2.4, and the reading of a compiled kernel's local memory."""
import inspect

import numpy as np
import pytest

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

from stm_kernels.backends.triton import compat as triton_compat  # noqa: E402


class Handle:
    def __init__(self, data):
        self.data = data


class Tensor:
    def __init__(self, data):
        self.handle = Handle(data)


def triton_36_patch_lang_tensor(tensor, scope):
    # Triton 3.6's line, as in its interpreter._patch_lang_tensor
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def fixed_patch_lang_tensor(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


def test_the_old_interpreter_line_is_patched_and_restored(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton_36_patch_lang_tensor)
    assert triton_compat.patch_interpreter_index()
    assert not triton_compat.patch_interpreter_index()  # once only
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    # A loop bound as the interpreter holds it: a 1-element array (program ids are).
    assert list(range(Tensor(np.array([2])), Tensor(np.array([8])), 3)) == [2, 5]
    scope.restore()
    assert not hasattr(Tensor, "__index__")


def test_a_fixed_interpreter_is_left_alone(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", fixed_patch_lang_tensor)
    assert not triton_compat.patch_interpreter_index()
    assert interpreter._patch_lang_tensor is fixed_patch_lang_tensor


def test_the_installed_interpreter_has_no_old_index_left():
    """Importing the package under TRITON_INTERPRET=1 patched an old interpreter (or found a
    fixed one): every interpreted kernel test depends on it with Triton 3.6."""
    from stm_kernels.backends.triton.tilings import INTERPRETING
    if not INTERPRETING:
        pytest.skip("needs TRITON_INTERPRET=1")
    installed = interpreter._patch_lang_tensor
    assert (getattr(installed, "patched_by_stm_kernels", False)
            or triton_compat._OLD_INDEX not in inspect.getsource(installed))


def test_local_memory_is_read_off_the_loaded_kernel():
    """compat.local_memory_bytes loads the compiled kernel (as its first launch would: an
    OutOfResources there is raised, so the launch falls through) and turns Triton's n_spills
    (4-byte words) into bytes; a Triton that does not keep it says None."""
    from triton.runtime.errors import OutOfResources

    class Compiled:
        n_spills = None

        def _init_handles(self):
            self.n_spills = 16

    assert triton_compat.local_memory_bytes(Compiled()) == 64

    class TooLarge:
        def _init_handles(self):
            raise OutOfResources(200000, 101376, "shared memory")

    with pytest.raises(OutOfResources):
        triton_compat.local_memory_bytes(TooLarge())
    assert triton_compat.local_memory_bytes(object()) is None
