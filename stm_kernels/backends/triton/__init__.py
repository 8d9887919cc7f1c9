"""The "triton" backend: the fused memory-read kernels.

    launch.py     host side: launch plans, config fallback, the launchers
    tilings.py    the kernels' tilings (configs) and candidate tables
    kernels/      the @triton.jit kernels (forward and split merge, backward, top-k, usage)
    compat.py     fixes for older Triton releases
"""
from .launch import INTERPRETING, triton_backward as backward, triton_forward as forward  # noqa: F401
from .launch import triton_select as select, triton_usage as usage  # noqa: F401
