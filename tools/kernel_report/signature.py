"""Compiling kernels ahead of time, without a GPU: the signature a launch would specialise.

Used by the static work report (tools.kernel_report.report) and the Gluon kernel's compile check.
"""


def specialised_signature(arg_names, types, values, constexprs):
    """(signature, constexprs, attrs) for triton.compile, as the JIT specialises a launch:
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
