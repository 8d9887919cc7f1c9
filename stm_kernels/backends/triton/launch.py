"""Host side of the fused Triton memory read, entered here: the launchers, and the switches and
records users and tools call. Each concern has a module of its own:

    forward_launcher.py     triton_forward: memory_read_fwd_kernel over (query block, object x
                            value chunk, memory split), then memory_read_merge_kernel when the
                            memory is split (flash-decoding); or, opted in, the Gluon forward;
                            triton_quantized_forward: memory_read_fwd_kernel_8bit (an 8-bit
                            memory) on the same plans
    backward_launcher.py    triton_backward: memory_read_bwd_kernel_prepare (delta, aligned
                            copies of dO and q, the zeroed dQ), then memory_read_bwd_kernel_dv
                            and memory_read_bwd_kernel_dkdq (dQ by atomics; deterministic, or
                            where dK+dQ does not fit the device: memory_read_bwd_kernel_dq); or,
                            opted in, the Gluon dV and dK/dQ kernels
    selection_launchers.py  triton_select (memory_read_topk_kernel, then
                            memory_read_topk_merge_kernel) and triton_usage
                            (memory_read_usage_kernel: XMem's memory usage)
    running.py              run, the one place a kernel is compiled and launched (recording
                            replaces it for the offline tools); launch_first_that_runs, the
                            fallback from candidate tiling to tiling, remembered per device,
                            kernel and signature; KernelUnavailable when none runs (the backend
                            then reads with torch); the chosen configs and compiled resources;
                            the one-line warnings
    calls.py                Call: a read's device, architecture and precision, or why no kernel
                            reads it (unsupported_reason); the constexprs and signature of its
                            launches; a key one channel past a tiling width as a rank-1 score
                            term (XMem's 257)
    plans.py                grids: query blocks, value chunks, memory splits
    kernel_arguments.py     strides, alignment, 16-aligned query rows, the memory's score term
    gluon_opt_in.py         the warp-specialised Gluon kernels: their switches (env and blocks),
                            the architecture's defaults, the fallback to the plain kernels
    kept_launches.py        KernelLaunch, and the launches kept per call layout (_layout_key): a
                            repeated call only allocates its outputs and launches, each kernel's
                            compile called directly (direct_launch.py) without Triton's binder

The kernels are in kernels/, their tilings in tilings.py, devices in devices.py. Kernel
arguments are passed by name.
"""
from .backward_launcher import triton_backward
from .calls import exact_float32_on_torch, unsupported_reason
from .forward_launcher import quantized_forward as triton_quantized_forward
from .forward_launcher import triton_forward
from .gluon_opt_in import (WARP_SPECIALIZED_BACKWARD_ENV, WARP_SPECIALIZED_ENV,
                           warp_specialized_backward, warp_specialized_backward_opted_in,
                           warp_specialized_forward, warp_specialized_opted_in)
from .kept_launches import binding_every_launch, forget_choices, planning_every_call
from .running import (NO_FALLBACK_ENV, KernelUnavailable, chosen_configs, compiled_resources,
                      recording)
from .selection_launchers import triton_select, triton_usage
from .tilings import BackwardConfig, DkdqConfig, DqConfig, DvConfig, ForwardConfig, use_configs

__all__ = [
    # the launchers
    "triton_forward", "triton_backward", "triton_select", "triton_usage",
    "triton_quantized_forward",
    # whether and why not
    "KernelUnavailable", "unsupported_reason", "exact_float32_on_torch",
    # switches
    "WARP_SPECIALIZED_ENV", "WARP_SPECIALIZED_BACKWARD_ENV", "NO_FALLBACK_ENV",
    "warp_specialized_forward", "warp_specialized_backward", "warp_specialized_opted_in",
    "warp_specialized_backward_opted_in", "planning_every_call", "binding_every_launch",
    "use_configs", "ForwardConfig", "BackwardConfig", "DvConfig", "DkdqConfig", "DqConfig",
    # records
    "recording", "chosen_configs", "compiled_resources", "forget_choices",
]
