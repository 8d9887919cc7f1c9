"""A kept launch's second and later calls: the compiled kernel launched without Triton's binder.

`kernel[grid](**arguments)` binds and specialises every argument (dtype, 16-byte alignment,
divisibility of each integer) and looks the compile up in Triton's cache before it launches,
on every call. A kept launch (kept_launches.KernelLaunch) calls one compile again with new
tensors of one layout: every integer, float and constexpr argument is the same, so the only
specialisation a call can break is a pointer's alignment. `DirectLaunch` therefore keeps the
compiled kernel of the first call and the arguments in the kernel's parameter order, and a
later call puts its tensors in their slots, checks the alignment the compile assumed, and
calls the compiled kernel's launcher as `JITFunction.run` does after its cache lookup (the
same call on Triton 3.6 and 3.8, NVIDIA and AMD). A call it cannot take (a tensor off its
alignment, a launch hook of a profiler installed) returns False and goes through Triton.
"""
import inspect

import torch

ALIGNMENT = 16  # bytes: Triton specialises a pointer argument on data_ptr() % 16 == 0


def _triton_streams():
    """(current device, stream of a device) as Triton's active driver gives them."""
    from triton.runtime import driver
    return driver.active.get_current_device, driver.active.get_current_stream


try:  # imported once here: _hooked runs on every direct launch
    from triton import knobs
except ImportError:  # pragma: no cover - Triton before 3.4 keeps the hooks elsewhere
    knobs = None


def _hooked():
    """Whether a launch hook is installed (a profiler's, e.g. Proton's). Triton 3.6 and 3.8 hold
    them in chains that are empty, not None, when there is none."""
    if knobs is None:  # pragma: no cover
        return False
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


class DirectLaunch:
    """Launches `compiled` (what kernel[grid](**arguments) returned on a layout's first call)
    on a later call's tensors: call it with {name: value} of the names given at construction
    (tensors, whose alignment it checks, or other per-call objects such as TMA descriptors,
    which their maker checks). Returns whether it launched."""

    __slots__ = ("compiled", "grid", "arguments", "slots", "aligned", "launcher",
                 "current_device", "current_stream", "_filled")

    def __init__(self, compiled, grid, arguments, slots, aligned, streams=None):
        self.compiled = compiled
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.arguments = arguments  # every argument in the kernel's parameter order
        self.slots = slots  # ((index in arguments, name), ...) of the per-call tensors
        self.aligned = aligned  # names whose pointer the compile assumed 16-byte aligned
        self.launcher = compiled.run
        self.current_device, self.current_stream = streams or _triton_streams()
        # (index, name, whether its alignment is checked) of each slot: what a call fills
        self._filled = tuple((index, name, name in aligned) for index, name in slots)

    @classmethod
    def of(cls, kernel, grid, compiled, fixed, tensors, streams=None):
        """The DirectLaunch of the compile `kernel[grid](**fixed, **tensors)` returned, or None
        where it cannot be kept: no compile (the interpreter, a recording executor), a
        compiled kernel without the launcher Triton's own run calls, or arguments that do not
        bind to the kernel's parameters."""
        if compiled is None or not all(hasattr(compiled, name) for name in
                                       ("run", "function", "packed_metadata")):
            return None
        signature = inspect.signature(kernel.fn)
        # compile options among the arguments (num_warps) are not the kernel's parameters
        fixed = {name: value for name, value in fixed.items() if name in signature.parameters}
        try:
            bound = signature.bind(**fixed, **tensors)
        except TypeError:  # not this kernel's arguments: its launches go through Triton
            return None
        bound.apply_defaults()
        names = list(bound.arguments)
        slots = tuple((names.index(name), name) for name in tensors)
        not_specialised = {param.name for param in getattr(kernel, "params", ())
                           if getattr(param, "do_not_specialize", False)}
        aligned = frozenset(name for name, tensor in tensors.items()
                            if isinstance(tensor, torch.Tensor) and name not in not_specialised
                            and tensor.data_ptr() % ALIGNMENT == 0)
        arguments = list(bound.arguments.values())
        for index, _ in slots:
            arguments[index] = None  # kept launches hold no tensor of the call that made them
        return cls(compiled, grid, arguments, slots, aligned, streams)

    def positional(self, tensors):
        """The kernel's arguments in parameter order with `tensors` in their slots, or None
        where a tensor is off the alignment its compile assumed."""
        arguments = self.arguments.copy()
        for index, name, aligned in self._filled:
            tensor = tensors[name]
            if aligned and tensor.data_ptr() % ALIGNMENT:
                return None
            arguments[index] = tensor
        return arguments

    def __call__(self, tensors):
        if _hooked():
            return False  # the hooks want Triton's launch metadata: its own path makes it
        arguments = self.positional(tensors)
        if arguments is None:
            return False
        compiled = self.compiled
        self.launcher(*self.grid, self.current_stream(self.current_device()), compiled.function,
                      compiled.packed_metadata, None, None, None, *arguments)
        return True
