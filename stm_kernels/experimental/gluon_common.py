"""What the warp-specialised Gluon kernels (gluon_forward.py, gluon_backward.py,
gluon_backward_dv.py) share: whether this Triton has the Gluon Hopper API they use, the TMA-side
helpers of their launchers, and the mbarrier rings of their kernels.

AVAILABLE is False (UNAVAILABLE_REASON says why) without Triton, or with one whose Gluon lacks
a name the kernels use; the kernels' modules then import, and refuse every call.
"""
import torch

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


def descriptor(t2, block_shape, layout):
    """The TMA descriptor of a 2-D tensor, boxes of block_shape in the shared layout."""
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), list(block_shape), layout)


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
