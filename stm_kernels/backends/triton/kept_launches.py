"""Launches kept per call layout. A layout's first call plans its pass and runs it (candidates
falling through, running.py), then keeps its launches: each kernel's KernelLaunch, with its
chosen config and the arguments the layout fixes, in the pass's Prepared* object (beside its
launcher: PreparedForward, PreparedBackward, PreparedSelect, PreparedSingle). A repeated call
finds them under its layout (_layout_key) and only allocates its outputs and launches, each
kernel's compile called directly (direct_launch.py) without Triton's binder.

    KernelLaunch          one kernel's launch; its first through running.run
    _layout_key           what a kept pass is keyed by
    _kept                 the pass kept for a layout, or None
    _run_prepared         a kept pass run on a call's tensors (dropped where it fails)
    _keep_prepared        a pass kept (at most PREPARED_LAYOUTS, the oldest dropped)
    planning_every_call   within the block nothing is kept or reused (an A/B of the saving)
    binding_every_launch  within the block kept launches go through Triton's binder
    forget_choices        every remembered choice and kept launch forgotten
"""
import dataclasses
import threading

import torch

from . import calls, devices, running, tilings
from .direct_launch import DirectLaunch
from .running import flag_within_block, one_line, warn_once

# Prepared launches per call layout (_layout_key), oldest first, at most PREPARED_LAYOUTS: a
# video's memory grows by one size per memory frame, and a size it has outgrown is not read
# again.
_prepared: dict = {}
PREPARED_LAYOUTS = 256
_keeping_launches = True  # False inside planning_every_call
_launching_directly = True  # False inside binding_every_launch (KernelLaunch)
_keeping = threading.Lock()  # held where _prepared changes (reads need none: one dict lookup)
# calls.current_tables() when the kept passes were planned (_kept checks their Calls against it)
_planned_from = calls.current_tables()


@dataclasses.dataclass(eq=False)
class KernelLaunch:
    """One launch of `kernel` with the arguments a call's layout fixes (sizes, strides,
    constexprs, grid, config): called with a call's tensors, it launches the kernel on them.
    first=True is the launch of the call that plans it, through `running.run`, which also checks the
    compile's local memory against the config's budget; it keeps the compile, and later calls
    launch that directly (direct_launch.DirectLaunch: Triton's binder and cache lookup skipped),
    or through `run` where the direct launch declines (a tensor off the alignment the compile
    assumed, a profiler's launch hook) or is switched off (binding_every_launch)."""
    kernel: object
    grid: tuple
    config: object
    fixed: dict
    direct: DirectLaunch | None = dataclasses.field(default=None, init=False)

    def __call__(self, call, first=False, **tensors):
        if not first and launched_directly(self.direct, tensors):
            return
        compiled = running.run(self.kernel, self.grid, {**self.fixed, **tensors}, self.config,
                               call, check_local=first)
        if first and _keeping_launches:
            self.direct = DirectLaunch.of(self.kernel, self.grid, compiled, self.fixed, tensors)

    def again(self, call, tensors):
        """A kept launch on a later call's tensors ({name: tensor}, the names of the first
        call's): directly where it can, else through `running.run`."""
        if not launched_directly(self.direct, tensors):
            running.run(self.kernel, self.grid, {**self.fixed, **tensors}, self.config, call,
                        check_local=False)


def keeping_launches():
    """Whether launches are kept per layout now (not inside planning_every_call)."""
    return _keeping_launches


def launched_directly(direct, tensors):
    """Whether a kept launch's DirectLaunch (or None) launched on `tensors`: not while
    launches are recorded or inside binding_every_launch, nor where it declines; False, with a
    warning once, where this Triton's launcher refuses the call (an argument it parses
    differently): launches then go through Triton's own path."""
    global _launching_directly
    if direct is None or not _launching_directly or running._executor is not None:
        return False
    try:
        return direct(tensors)
    except (TypeError, ValueError, AttributeError) as error:
        _launching_directly = False
        warn_once(f"launching kept Triton kernels directly failed ({one_line(error)}); "
                  "launching them through Triton's binder from now on")
        return False


def binding_every_launch():
    """Within the block kept launches go through Triton's binder (`kernel[grid](...)`) as a
    first call does, instead of launching their compiled kernel directly (an A/B of the
    direct launch's saving within one run)."""
    return flag_within_block(globals(), "_launching_directly", False)


def _layout_key(read, planned_on, scale, l2, lengths, *tensors):
    """What the planning of a read depends on besides its tensors' values: the device (its
    description and torch's device with its index: two GPUs of one model share the first) and
    torch's float32 matmul precision, which with planned_on's dtype and key channels decide its
    Call (planned_on: the tensor calls._call plans from, one of `tensors`); every tensor's
    shape, strides and dtype, the scale, similarity and raggedness, and the configs
    use_configs forces. A prepared launch is kept under it (a repeated call then skips
    planning, its Call included: at ten memory frames the host's work outweighs a GPU's)."""
    return (read, devices.describe(planned_on.device), tensors[0].device,
            torch.get_float32_matmul_precision(), scale, l2, lengths is None,
            tilings.forced_configs(), *[(t.shape, t.stride(), t.dtype) for t in tensors])


def _kept(layout):
    """The pass kept for `layout`, or None (none kept, inside planning_every_call, or its Call
    no longer what the tables say: calls.planned_from_current_tables)."""
    prepared = _prepared.get(layout) if _keeping_launches else None
    if prepared is None or not calls.planned_from_current_tables(prepared.call, *_planned_from):
        return None
    return prepared


def _run_prepared(layout, *tensors):
    """(the result, the pass) of the launch prepared for `layout` on `tensors`, or None where
    there is none or it failed (dropped then: the caller plans afresh, and a failing candidate
    falls through to the next as on a first call)."""
    prepared = _kept(layout)
    if prepared is None:
        return None
    try:
        return prepared(*tensors), prepared
    except Exception:
        with _keeping:
            _prepared.pop(layout, None)
        return None


def _keep_prepared(layout, prepared):
    """Keep a pass's launches for its layout (none inside planning_every_call), the oldest
    dropped beyond PREPARED_LAYOUTS."""
    global _planned_from
    if not _keeping_launches:
        return
    with _keeping:  # two threads keeping at the limit must not drop one layout twice
        if not calls.tables_unchanged(*_planned_from):
            _prepared.clear()  # planned from other tables: none is looked at again
            _planned_from = calls.current_tables()
        while _prepared and len(_prepared) >= PREPARED_LAYOUTS:
            del _prepared[next(iter(_prepared))]
        _prepared[layout] = prepared


def planning_every_call():
    """Within the block no launch is kept or reused: every call plans as a layout's first call
    does, as the launchers did before they kept launches (an A/B of their saving within one
    run). The launches kept before the block are kept for after it."""
    return flag_within_block(globals(), "_keeping_launches", False)


def forget_choices():
    """Forget every remembered choice, prepared launch and call (calls._call): the next call of
    each kernel tries its candidates again (the offline tools start each case afresh)."""
    running._chosen.clear()
    calls._calls.clear()
    with _keeping:
        _prepared.clear()
