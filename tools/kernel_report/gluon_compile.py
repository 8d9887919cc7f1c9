"""The warp-specialised Gluon forward (stm_kernels/experimental/gluon_forward.py) compiled ahead
of time for sm_90, without a GPU: its PTX, TTGIR and shared memory for the static report and
the compile tests."""
import triton
from triton.backends.compiler import GPUTarget

from stm_kernels.backends.triton.plans import warp_specialized_forward_plan
from stm_kernels.experimental import gluon_forward as gluon
from stm_kernels.experimental.gluon_common import SIGNATURE_DTYPES
from tools.kernel_report.compile import TARGETS


def compile_for_arch(*, dtype="bf16", l2=False, arch=90, config=None, HW=1620, N=162000,
                     Ck=128, Cv=512, B=1):
    """Compile the kernel ahead of time, without a GPU, for GPUTarget("cuda", arch, 32), as a
    launch on contiguous tensors of these sizes would on an H100 (its memory splits as the
    launcher plans them, fp32 partial outputs when there are several, a broadcast query,
    integer arguments specialised like the JIT: 1 -> constant, multiples of 16 -> divisibility
    16). Returns the compiled kernel (.asm["ptx"], .asm["ttgir"], .metadata.shared)."""
    if not gluon.AVAILABLE:
        raise RuntimeError(gluon.UNAVAILABLE_REASON)
    config = config or gluon.WarpSpecializedConfig()
    torch_dtype = SIGNATURE_DTYPES[dtype]
    plan = warp_specialized_forward_plan(config, B, HW, N, Cv, TARGETS["sm_90"].multiprocessors)
    splits, per_split = plan.splits, plan.per_split
    layouts = gluon._layouts(torch_dtype, Ck, Cv, config)
    out_type = f"*{dtype}" if splits == 1 else "*fp32"
    values = dict(stride_os=B * Cv * HW, stride_ob=Cv * HW, stride_oc=HW, stride_om=1,
                  stride_ls=B * HW, stride_lb=HW, stride_lm=1, HW=HW, N=N, n_per_split=per_split)
    return _compile(gluon.memory_read_ws_fwd_kernel, dtype, layouts, ("q", "k", "v"),
                    dict(o=out_type, lse="*fp32", qk_scale="fp32"), values,
                    gluon._constexprs(l2, Ck, Cv, config, layouts), arch)


def _compile(kernel, dtype, layouts, descriptors, types, values, constexprs, arch):
    """triton.compile of a Gluon kernel for GPUTarget("cuda", arch, 32), 4 warps: its
    `descriptors` arguments (<name>_desc) typed from their TMA boxes' shapes and layouts,
    the other typed arguments `types`, the integers `values` specialised as the JIT does
    (specialised_signature), `constexprs` and a broadcast query."""
    def descriptor(key):
        shape, layout = layouts[key]
        return f"tensordesc<{dtype}[{','.join(map(str, shape))}],{layout!r}>"

    types = dict({f"{name}_desc": descriptor(name) for name in descriptors}, **types)
    signature, constexprs, attrs = specialised_signature(
        kernel.arg_names, types, values, dict(constexprs, Q_BROADCAST=True))
    from triton.experimental.gluon._runtime import GluonASTSource

    source = GluonASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))


def specialised_signature(arg_names, types, values, constexprs):
    """(signature, constexprs, attrs) for triton.compile, as the JIT specialises a launch
    (the Gluon kernel takes tensor descriptors, so its types are given):
    pointer and typed arguments from `types` (pointers 16-byte aligned), an integer equal to 1
    becomes a constant, other integers i32 with divisibility 16 when they are multiples of 16;
    names in `constexprs` are compile-time constants."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for index, name in enumerate(arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
            if types[name].startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif values[name] == 1:
            constexprs[name] = 1
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_backward_for_arch(*, dtype="bf16", l2=False, arch=90, config=None, HW=1620,
                              N=162000, Ck=128, Cv=512, B=1):
    """The warp-specialised dK/dQ kernel (stm_kernels/experimental/gluon_backward.py) compiled
    ahead of time as a launch on the backward's contiguous, padded tensors of these sizes (a
    broadcast query) would be; as compile_for_arch."""
    from stm_kernels.experimental import gluon_backward as backward

    config = config or backward.WarpSpecializedBackwardConfig()
    torch_dtype = SIGNATURE_DTYPES[dtype]
    layouts = backward._layouts(torch_dtype, Ck, Cv, config)
    padded_hw = -(-HW // 16) * 16
    values = dict(stride_lb=HW, stride_lm=1, stride_dqb=0, stride_dqc=padded_hw, stride_dqm=1,
                  stride_dkb=Ck * N, stride_dkc=N, stride_dkn=1, HW=HW, N=N)
    types = dict(lse="*fp32", delta="*fp32", dq="*fp32", dk=f"*{dtype}", qk_scale="fp32",
                 dq_scale="fp32")
    return _compile(backward.memory_read_ws_bwd_dkdq_kernel, dtype, layouts,
                    ("q", "k", "v", "do"), types, values,
                    backward.constexprs(l2, Ck, Cv, config, layouts), arch)


def compile_backward_dv_for_arch(*, dtype="bf16", l2=False, arch=90, config=None, HW=1620,
                                 N=162000, Ck=128, Cv=512, B=1):
    """The warp-specialised dV kernel (stm_kernels/experimental/gluon_backward_dv.py) compiled
    ahead of time as a launch on the backward's contiguous, padded tensors of these sizes (a
    broadcast query) would be; as compile_for_arch."""
    from stm_kernels.experimental import gluon_backward_dv as backward_dv

    config = config or backward_dv.WarpSpecializedDvConfig()
    layouts = backward_dv._layouts(SIGNATURE_DTYPES[dtype], Ck, Cv, config)
    return _compile(backward_dv.memory_read_ws_bwd_dv_kernel, dtype, layouts,
                    ("q", "k", "do", "dv"), dict(lse="*fp32", qk_scale="fp32"),
                    dict(stride_lb=HW, stride_lm=1, HW=HW, N=N),
                    backward_dv.constexprs(l2, Ck, Cv, config, layouts), arch)
