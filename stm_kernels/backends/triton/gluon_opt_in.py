"""The opt-in to the experimental Gluon warp-specialised kernels (stm_kernels.experimental,
sm_90): whether a pass asks for one, whether it can read the call's inputs, and the plain Triton
kernel instead, with a one-line warning where the Gluon one was asked for.

    STM_KERNELS_WARP_SPECIALIZED=1, or within warp_specialized_forward()     the forward
    STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1, or within warp_specialized_backward()
                                                                             dV and dK/dQ
    =0 turns off a Gluon kernel the architecture runs by default (tilings:
    Architecture.warp_specialized); unset, the architecture decides (_gluon_wanted).

Each pass's Gluon launches are beside its plain ones: forward_launcher.py (_gluon_forward) and
backward_launcher.py (_gluon_dv, _gluon_dkdq).
"""
import importlib
import os

from .running import _falls_through, flag_within_block, one_line, warn_once
from .tilings import warp_specialized_config

WARP_SPECIALIZED_ENV = "STM_KERNELS_WARP_SPECIALIZED"
WARP_SPECIALIZED_BACKWARD_ENV = "STM_KERNELS_WARP_SPECIALIZED_BACKWARD"
_warp_specialized = False  # True inside warp_specialized_forward()
_warp_specialized_backward = False  # True inside warp_specialized_backward()


# os.environ as imported, its own mapping and key encoding where CPython keeps them (else None)
_ENVIRON = os.environ
_RAW_ENVIRON = getattr(_ENVIRON, "_data", None)
_ENCODED: dict = {}  # name -> its key in _RAW_ENVIRON


def _environment_value(name):
    """os.environ.get(name), read from the environment's own mapping where CPython keeps one:
    os.environ.get of an unset name raises and catches two KeyErrors (about a microsecond
    on every read, whose layout key holds the switch)."""
    if os.environ is not _ENVIRON or _RAW_ENVIRON is None:  # replaced, or not CPython
        return os.environ.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = _ENVIRON.encodekey(name)
    value = _RAW_ENVIRON.get(key)
    return None if value is None else _ENVIRON.decodevalue(value)


def _switch(env, within_block):
    """"1" where the Gluon kernels of env are asked for (env=1, or within their block), "0"
    where they are turned off (env=0), None where the architecture decides (unset)."""
    value = _environment_value(env)
    return "1" if within_block or value == "1" else "0" if value == "0" else None


def forward_switch():
    """_switch of the Gluon forward now (part of the forward's layout key)."""
    return _switch(WARP_SPECIALIZED_ENV, _warp_specialized)


def backward_switch():
    """_switch of the Gluon dV and dK/dQ kernels now (part of the backward's layout key)."""
    return _switch(WARP_SPECIALIZED_BACKWARD_ENV, _warp_specialized_backward)


def warp_specialized_opted_in():
    """Whether the forward opts into the Gluon warp-specialised forward:
    STM_KERNELS_WARP_SPECIALIZED=1, or inside warp_specialized_forward()."""
    return _switch(WARP_SPECIALIZED_ENV, _warp_specialized) == "1"


def warp_specialized_forward():
    """Within the block the forward opts into the Gluon warp-specialised forward, as
    STM_KERNELS_WARP_SPECIALIZED=1 does (a benchmark's candidate beside the default)."""
    return flag_within_block(globals(), "_warp_specialized", True)


def warp_specialized_backward_opted_in():
    """Whether the backward opts into the Gluon warp-specialised dV and dK/dQ kernels:
    STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1, or inside warp_specialized_backward()."""
    return _switch(WARP_SPECIALIZED_BACKWARD_ENV, _warp_specialized_backward) == "1"


def warp_specialized_backward():
    """Within the block the backward opts into the Gluon warp-specialised dV and dK/dQ
    kernels, as STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1 does (a benchmark's candidate beside
    the default)."""
    return flag_within_block(globals(), "_warp_specialized_backward", True)


def _gluon_wanted(call, kernel, N):
    """(wanted, asked) for the Gluon `kernel` (tilings.WARP_SPECIALIZED_KERNELS) on `call`'s
    device and a memory of N positions: asked for by its switch (_switch: env=1 or its block),
    or the architecture's default (tilings: Architecture.warp_specialized) unless its env is
    0."""
    env, flag = ((WARP_SPECIALIZED_ENV, _warp_specialized) if kernel == "forward" else
                 (WARP_SPECIALIZED_BACKWARD_ENV, _warp_specialized_backward))
    switch = _switch(env, flag)
    if switch is not None:
        return switch == "1", switch == "1"
    return call.architecture.runs_warp_specialized(kernel, N), False


def _usable_gluon(call, env, module_name, plain, reason_of, asked=True):
    """The Gluon kernel's module (stm_kernels.experimental.<module_name>) where
    reason_of(module) has nothing against the call's inputs and the device is an sm_90; else
    None: the plain Triton `plain` runs instead, with a one-line warning (once) where the
    Gluon kernel was asked for (env=1; an architecture's default that does not take these
    inputs is no news)."""
    try:
        module = importlib.import_module(f"stm_kernels.experimental.{module_name}")
    except ImportError as error:  # pragma: no cover - the modules import on every Triton
        reason = one_line(error)
    else:
        reason = reason_of(module)
    if reason is None and call.device.arch != "sm_90":
        reason = f"it runs on sm_90 only, not {call.device}"
    if reason is not None:
        if asked:
            warn_once(f"{env}=1 ignored ({reason}); using the plain Triton {plain}")
        return None
    return module


def _run_or_warn(env, what, call, run, asked=True):
    """run() of a Gluon kernel; None where it raises what a plain kernel would fall through on
    (_falls_through: the caller then runs the plain one), with a one-line warning (once)
    naming the Gluon `what` and, where it was asked for, env."""
    try:
        return run()
    except Exception as error:
        if not _falls_through(error):
            raise
        switch = f"{env}=1: " if asked else ""
        warn_once(f"{switch}the Gluon {what} failed on {call.device} ({one_line(error)}); "
                  f"using the plain Triton {what}")
        return None


def _warp_specialized_forward(call, q, k, v):
    """(the Gluon warp-specialised forward's module where it is wanted (_gluon_wanted) and
    usable, else None; whether it was asked for)."""
    wanted, asked = _gluon_wanted(call, "forward", k.shape[2])
    if not wanted:
        return None, asked
    return _usable_gluon(call, WARP_SPECIALIZED_ENV, "gluon_forward", "forward",
                         lambda gluon: gluon.unsupported_reason(q, k, v,
                                                                warp_specialized_config()),
                         asked), asked
