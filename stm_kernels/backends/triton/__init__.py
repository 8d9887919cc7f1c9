"""The "triton" backend: the fused memory-read kernels, failing safe to the torch backend.

    launch.py           host side, entered here: the launchers and their switches; it names
                        the module of each concern (forward_launcher.py, backward_launcher.py,
                        selection_launchers.py; running.py: the one launch point and the
                        candidate-config fallback; calls.py, plans.py, kernel_arguments.py:
                        a call's set-up; gluon_opt_in.py; kept_launches.py)
    direct_launch.py    a kept launch's later calls, past Triton's binder
    tilings.py          the kernels' tilings per GPU architecture (the one place that shows them)
    devices.py          what a device is to the launchers (vendor, architecture, shared memory)
    kernels/            the @triton.jit kernels (forward and split merge, backward, top-k, usage)
    compat.py           fixes for older Triton releases
    compiler_output.py  the compiler's stderr captured while candidates are tried

forward, backward, select and usage run the kernels where they can. Where they cannot (a
device below sm_80 or without a validated tiling, keys wider than the tilings take, or no
candidate tiling that compiles and launches there) they warn once per process, naming the
device, the kernel and the reason, and compute the same result with the torch backend: a user
never gets a Triton traceback from a read.
"""
from .. import FallbackWarning, pytorch
from . import devices, launch, running
from .devices import INTERPRETING  # noqa: F401

# The kernel a KernelUnavailable names when no kernel reads the memory on its device (_call).
EVERY_KERNEL = "every"


def _with_fallback(kernel, k, fused, reference, *args):
    """fused(*args) where the kernels run on k's device, else reference(*args) with one
    FallbackWarning saying why."""
    if k.device.type == "cpu" and not INTERPRETING:
        return fused(*args)  # raises the user's error: backend="triton" needs a GPU
    try:  # planned once, by the launcher: a device no kernel runs on is its first refusal
        return fused(*args)
    except launch.KernelUnavailable as unavailable:
        reason = unavailable.reason
        if unavailable.kernel != EVERY_KERNEL:
            kernel = unavailable.kernel
    device = devices.describe(k.device)
    running.warn_once(f"stm_kernels: the Triton {kernel} kernel cannot run on {device}: {reason}. "
                      "The torch backend computes this read instead (same result, slower).",
                      FallbackWarning)
    return reference(*args)


def forward(q, k, v, scale, l2, lengths=None):
    """(out (B, Cv, HW), lse (B, HW)): launch.triton_forward, or the torch backend's."""
    return _with_fallback("forward", k, launch.triton_forward, pytorch.forward, q, k, v, scale,
                          l2, lengths)


def quantized_forward(q, k, k_scale, k_axis, v, v_scale, v_axis, scale, l2, lengths, reference):
    """(out, lse) of an 8-bit memory's read (launch.triton_quantized_forward's arguments), or
    reference() (the torch backend's 8-bit read) where the kernel cannot run."""
    return _with_fallback("forward", q, launch.triton_quantized_forward,
                          lambda *_: reference(), q, k, k_scale, k_axis, v, v_scale, v_axis,
                          scale, l2, lengths)


def backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths=None):
    """(dq, dk, dv): launch.triton_backward, or the torch backend's."""
    return _with_fallback("backward", k, launch.triton_backward, pytorch.backward, grad_out,
                          grad_lse, q, k, v, out, lse, scale, l2, lengths)


def select(q, k, top_k, scale, l2, lengths=None):
    """(scores, indices) of the top_k positions: launch.triton_select, or the torch one."""
    return _with_fallback("select", k, launch.triton_select, pytorch.select, q, k, top_k, scale,
                          l2, lengths)


def usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) usage for the read's lse: launch.triton_usage, or the torch backend's."""
    return _with_fallback("usage", k, launch.triton_usage, pytorch.usage, q, k, lse, scale, l2,
                          lengths)
