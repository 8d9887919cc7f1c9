"""What the warp-specialised Gluon kernels (gluon_forward.py, gluon_backward.py,
gluon_backward_dv.py) share: whether this Triton has the Gluon Hopper API they use, the TMA-side
helpers of their launchers, and the mbarrier rings of their kernels.

AVAILABLE is False (UNAVAILABLE_REASON says why) without Triton, or with one whose Gluon lacks
a name the kernels use; the kernels' modules then import, and refuse every call.
"""
import dataclasses
from typing import ClassVar

import torch

from .._buffers import device_context

try:
    import triton
except ImportError:  # a PyTorch without Triton: AVAILABLE stays False
    triton = None

SM90_SHARED_MEMORY = 227 * 1024  # the architecture's per-block limit (its devices report it)
GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}  # the 16-bit inputs
SIGNATURE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # offline compiles' names

AVAILABLE = False
UNAVAILABLE_REASON = "not checked"

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    for _module, _names in ((gl, ("warp_specialize", "allocate_shared_memory", "NVMMASharedLayout",
                                  "NVMMADistributedLayout", "DotOperandLayout", "SliceLayout",
                                  "BlockedLayout", "SwizzledSharedLayout", "convert_layout",
                                  "exp2", "log2", "atomic_add", "inline_asm_elementwise")),
                            (mbarrier, ("MBarrierLayout", "init", "expect", "wait", "arrive")),
                            (tma, ("async_copy_global_to_shared", "async_copy_shared_to_global",
                                   "store_wait"))):
        _missing = [name for name in _names if not hasattr(_module, name)]
        if _missing:
            raise ImportError(f"{_module.__name__} lacks {', '.join(_missing)}")
    AVAILABLE, UNAVAILABLE_REASON = True, ""
except Exception as _error:  # no Triton, or one without (this version of) Gluon's Hopper API
    UNAVAILABLE_REASON = (f"Triton {getattr(triton, '__version__', 'missing')}: Gluon Hopper API "
                          f"unavailable ({type(_error).__name__}: {str(_error).splitlines()[0]})")


def cdiv(a, b):
    return -(-a // b)


def gl_dtype(dtype):
    """The Gluon dtype of a 16-bit torch dtype."""
    return getattr(gl, GL_DTYPES[dtype])


def tma_strides_ok(t):
    """Innermost stride 1, other strides (of dims longer than 1) 16-byte aligned, base aligned."""
    size = t.element_size()
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    if t.data_ptr() % 16:
        return False
    return all((stride * size) % 16 == 0
               for dim, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True) if dim > 1)


def rows_2d(t):
    """t (B, C, L) as a 2-D (B*C, L) strided view when the object dimension folds into the rows
    (one TMA descriptor for all objects), else None."""
    B, C, L = t.shape
    if B == 1 or t.stride(0) == C * t.stride(1):
        return t.as_strided((B * C, L), (t.stride(1), 1))
    return None


def nvmma_layouts(dtype, shapes):
    """{name: (shape, its NVMMA shared layout)} of a kernel's TMA boxes and shared tiles, from
    {name: shape} (the default swizzle for the shape and the 16-bit torch dtype)."""
    element = gl_dtype(dtype)
    return {name: (shape, gl.NVMMASharedLayout.get_default_for(shape, element))
            for name, shape in shapes.items()}


def device_reason(tensors):
    """Why a Gluon Hopper kernel cannot take these tensors ({name: tensor}), or None: CUDA
    tensors, all bf16 or all fp16, an sm_90 device. (Each kernel's module checks its AVAILABLE
    first: a test may patch it there.)"""
    if any(t.device.type != "cuda" for t in tensors.values()):
        return "needs CUDA tensors"
    dtypes = [t.dtype for t in tensors.values()]
    if dtypes[0] not in GL_DTYPES or any(dtype != dtypes[0] for dtype in dtypes):
        got = ", ".join(str(dtype) for dtype in dtypes)
        return f"needs {', '.join(tensors)} all bf16 or all fp16 (got {got})"
    if torch.cuda.get_device_capability(next(iter(tensors.values())).device) != (9, 0):
        return "needs an sm_90 (Hopper) GPU: wgmma, TMA and setmaxnreg as compiled here"
    return None


def tma_reason(tensors, shared_bytes, shared_limit):
    """Why these (B, C, L) tensors ({name: tensor}) cannot be a kernel's TMA operands, or a
    program's shared_bytes not fit the device's shared_limit (with room for barriers, scheduling
    state and layout scratch); None where they can."""
    for name, t in tensors.items():
        if not tma_strides_ok(t):
            return (f"{name} is not TMA-addressable: needs position stride 1, other strides and "
                    f"the base 16-byte aligned; got strides {tuple(t.stride())}")
        if t.shape[1] * t.stride(1) * t.shape[0] >= 2**31:
            return f"{name} spans >= 2**31 elements"
    if shared_bytes + 1024 > shared_limit:
        return (f"needs ~{shared_bytes} bytes of shared memory (> {shared_limit // 1024} KiB) "
                "at this config")
    return None


def launch_keeping(kernel, grid, per_call, fixed, direct):
    """kernel[grid](**per_call, **fixed), or the same through `direct` (the DirectLaunch kept
    from a first launch of this layout, or None) where it takes the call: past Triton's binder,
    as the plain kernels' kept launches are (backends/triton/direct_launch.py). Returns the
    DirectLaunch to keep: `direct`, or this launch's where none was kept yet and launches are
    kept (kept_launches.keeping_launches)."""
    from ..backends.triton.direct_launch import DirectLaunch
    from ..backends.triton.kept_launches import keeping_launches, launched_directly
    if launched_directly(direct, per_call):
        return direct
    compiled = kernel[grid](**per_call, **fixed)
    if direct is None and keeping_launches():
        direct = DirectLaunch.of(kernel, grid, compiled, fixed, per_call)
    return direct


def launch_views(q, tensors, folded):
    """[(objects, q2, [t2, ...], q_broadcast)]: the 2-D TMA views of a Gluon kernel's (B, C, L)
    operands, one launch with the objects folded into the rows (folded: rows_2d of each) or one
    launch per object (objects: its slice of the per-object outputs); a batch-1 query serves
    every object (q_broadcast, as the kernels' Q_BROADCAST)."""
    broadcast = q.shape[0] == 1
    if folded:
        return [(slice(None), rows_2d(q), [rows_2d(t) for t in tensors], broadcast)]
    return [(slice(b, b + 1), q[0 if broadcast else b], [t[b] for t in tensors], True)
            for b in range(tensors[0].shape[0])]


def descriptor(t2, block_shape, layout):
    """The TMA descriptor of a 2-D tensor, boxes of block_shape in the shared layout."""
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), list(block_shape), layout)


@dataclasses.dataclass(eq=False)
class KeptGluonLaunch:
    """A Gluon kernel planned for one call layout: its grid, its operands' shared-memory layouts
    ({name: (block shape, layout)}), the constexprs and strides the layout fixes, and whether
    the objects fold into the TMA rows (one launch) or launch one by one. A subclass names its
    TMA operands (`operands`, the query first; the kernel takes each as `<name>_desc`); its
    __call__ checks a call's tensors and calls `launch`, which makes their TMA descriptors and
    launches; from its second launch on it calls its first launch's compile directly
    (launch_keeping), as the plain kernels' kept launches do."""
    operands: ClassVar[tuple] = ("q",)
    grid: tuple
    layouts: dict
    fixed: dict
    folded: bool
    direct: object = dataclasses.field(default=None, init=False)  # a DirectLaunch, or None
    descriptors: "Descriptors" = dataclasses.field(init=False)  # its operands' TMA descriptors

    def __post_init__(self):
        self.descriptors = Descriptors(self.layouts)
        self._arguments = tuple(zip(self.operands, [f"{name}_desc" for name in self.operands],
                                    strict=True))

    def launch(self, kernel, q, tensors, pointers):
        """`kernel` over a call's (B, C, L) TMA operands, q and then `tensors` in the order
        of `operands` (passed as their descriptors), with the other arguments
        `pointers(objects)` gives for a launch's objects (a slice of the batch)."""
        with device_context(q.device):
            for objects, q2, views, q_broadcast in launch_views(q, tensors, self.folded):
                per_call = pointers(objects)
                for (name, argument), t2 in zip(self._arguments, (q2, *views), strict=True):
                    per_call[argument] = self.descriptors(name, t2)
                self.direct = launch_keeping(kernel, self.grid, per_call,
                                             dict(self.fixed, Q_BROADCAST=q_broadcast),
                                             self.direct)


class Descriptors:
    """The TMA descriptors of a kept launch's operands, by name ({name: (block_shape,
    layout)}). The first of a name is made by Triton (which checks the shape, strides, dtype,
    alignment and box); a later tensor of the same shape, strides and dtype on 16 bytes gets a
    copy of it with its own base, since Triton's checks would only repeat themselves (2 us a
    descriptor on a CPU core, eight in a Gluon backward). Holds no tensor of a call."""

    def __init__(self, layouts):
        self.layouts = layouts
        self.made = {}  # name -> ((shape, strides, dtype), the descriptor's fields but its base)

    def __call__(self, name, t2):
        known = self.made.get(name)
        if known is not None and known[0] == (t2.shape, t2.stride(), t2.dtype) and \
                t2.data_ptr() % 16 == 0:
            made = object.__new__(TensorDescriptor)
            made.__dict__.update(known[1], base=t2)
            return made
        made = descriptor(t2, *self.layouts[name])
        if hasattr(made, "__dict__"):  # a Triton whose descriptors have slots makes every one
            self.made[name] = ((t2.shape, t2.stride(), t2.dtype),
                               {field: value for field, value in vars(made).items()
                                if field != "base"})
        return made


if AVAILABLE:
    @gluon.jit
    def barrier_ring(STAGES: gl.constexpr, COUNT: gl.constexpr):
        """STAGES mbarriers in shared memory, each initialised to expect COUNT arrivals (a
        count is a number of partitions: Gluon's arrive syncs a partition's warps and arrives
        once)."""
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=COUNT)
        return bars
