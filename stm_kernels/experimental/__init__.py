"""Warp-specialised Gluon kernels for Hopper (sm_90): a forward, a dV and a dK/dQ kernel.

Each runs in place of its plain Triton kernel where asked for (STM_KERNELS_WARP_SPECIALIZED=1
for the forward, STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1 for the backward's two) or where an
architecture lists it as a default (tilings.Architecture.warp_specialized); where one cannot
take the inputs, the plain kernel runs (docs/gluon_backward.md, docs/kernels.md).
"""


def read_unsupported_reasons(q, k, v):
    """{"forward", "dV", "dK/dQ": None where a memory_read(q, k, v) with the Gluon kernels
    opted in runs that kernel, else why the plain one runs instead}: each module's own check,
    at the tilings in force (the backward's on the operands it passes its kernels)."""
    from ..backends.triton import tilings
    from . import gluon_backward, gluon_backward_dv, gluon_forward
    return {"forward": gluon_forward.unsupported_reason(q, k, v,
                                                         tilings.warp_specialized_config()),
            "dV": gluon_backward_dv.read_unsupported_reason(q, k, v,
                                                            tilings.warp_specialized_dv_config()),
            "dK/dQ": gluon_backward.read_unsupported_reason(
                q, k, v, tilings.warp_specialized_backward_config())}
