"""Where the memory read's host time goes, layer by layer.

    python -m bench host-path [--ns 1620 16200] [--calls 300]

At N = 16,200 (ten 480p memory frames) the forward's kernels take about 0.1 ms on an H100
while the op takes 0.4-0.6 ms (bench/NOTES.md): below a hundred memory frames the read is
bound by the host, not the GPU. This tool times each layer of a read's host path, outermost
first, so that the share of each (checks, the custom op, planning, Triton's launcher) is a
measurement, not a guess:

    op                     memory_read(q, k, v, backend="triton") without gradients: the
                           input checks, then (plain eager mode) the launcher called directly
    custom op              torch.ops.stm_kernels.memory_read (no input checks): the route
                           torch.compile and dispatch modes take, for its dispatch cost
    launcher               launch.triton_forward (no custom op, no fallback wrapper)
    launcher, no launch    the same with every kernel launch replaced by nothing: our Python
    Triton launches        the launcher's kernels launched alone, with the arguments it made
    Triton's binding       of each kernel: Triton's own work before its launch, up to its
                           compile-cache lookup (triton_binding_calls; also without CUDA)
    direct launch(es)      the kept launches' way past that binding (direct_launch.py): the
                           kernels launched alone by their compiles' launchers, and each
                           one's Python with no launcher (direct_launch_calls; also
                           without CUDA); ", through Triton's binder" rows: the op, the
                           launchers and forward + backward with kept launches going through
                           kernel[grid](...) instead (launch.binding_every_launch)
    Gluon ...              the op (without CUDA: the launcher, no launch) with the opt-in
                           Gluon forward, with and without its kept launch; on a GPU also
                           forward + backward with the opt-in Gluon backward (dV, dK/dQ)
    forward + backward     memory_read(...).backward(grad), then the backward's launcher with
                           and without its launches
    peer                   bench kernel's sdpa_flash_split: four SDPA calls and a cat
    ..., planned every call   the op, forward + backward and both launchers again with no
                           launch kept (launch.planning_every_call): the kept launches' saving,
                           measured in the same run

Beside the rows, cProfile's view of three of them (the forward through the op, forward +
backward, the backward's launcher; without CUDA the launcher's Python): the functions with the
most own time per call, Python and the C calls it makes (Triton's launcher, torch's ops). The
profiler inflates Python-heavy functions about twofold, so its figures are shares to read
beside the rows, not times; it sees only the calling thread, and the autograd engine runs a
CUDA backward on a thread of its own (it shows as run_backward), hence the backward launcher's
own profile.

Each row is the wall time per call of `--calls` back-to-back calls, the device synchronised
only before and after: where the kernels are shorter than the host's work (N = 1,620), that
is the host time per call. Without CUDA only the forward's "no launch" rows run, on "meta"
tensors planned for an H100 (devices.pretend): the launcher's Python alone, on this CPU, then
Triton's binding of the two kernels it would launch, for sm_90 on CPU tensors. The
backward computes with torch, whose operations on meta tensors run Python reference code, far
slower than CUDA's dispatch: its "no launch" row runs on small CPU tensors instead (HW = 20,
N = 64, where its torch work takes microseconds; once a run, in the N = 64 column), and so do
the selection's and the usage's launchers and the op's rows without gradients and with
forward + backward (kernels dropped: the checks, the autograd function and the wrappers),
and Triton's binding and the direct launch of the backward's dV and dK/dQ kernels; only under
TRITON_INTERPRET=1, which lets CPU tensors through the launcher.

Without CUDA, then, the four read kinds at N = 16,200 (READS: forward, forward + backward,
ragged, top-k; read_rows) on meta tensors planned for an H100, with the kept launches going
their direct way to a compiled kernel that launches nothing (launches_to_nothing): the host
path up to the driver's launch call, layer by layer (`<read>: <layer>` rows):

    op                     memory_read with its checks, on its eager route (meta_read_eagerly);
                           forward + backward only: "autograd alone", a Function that saves
                           what the op saves and only allocates (_AllocatingRead): torch's floor
                           the ragged read's lengths a FixedCapacityMemory's (checked where
                           they are set: no host read of the device)
    custom op's dispatch   torch.ops.stm_kernels.memory_read (on meta it runs the op's fake
                           implementation, not the launcher: its dispatch, not its work)
    prepared read          stm_kernels.prepare_read's run (no planning, no checks but layout)
    launcher               the launcher(s) called directly
    launcher, no launch    the same with every launch dropped (running.recording)

A layer that cannot run on meta tensors (it reads a device value on the host) is listed with
its one-line reason under "not_timed"; GOALS are checked against the rows ("goals": met or
missed).

Writes bench/results/host_path_<device>_<date>.json.
"""
import argparse
import contextlib
import cProfile
import functools
import importlib
import pathlib
import pstats
import time
import types

import torch

from bench import common
from bench import kernel as kernel_bench
from stm_kernels import FixedCapacityMemory, memory_read
from stm_kernels.backends.triton import devices, launch, running
from stm_kernels.backends.triton.direct_launch import DirectLaunch

B, HW, CK, CV = 1, 1620, 128, 512
# What "meta" rows plan for: an H100's sm_90 tilings and 132 multiprocessors.
H100 = devices.Device("NVIDIA H100 (planned on meta tensors)", "nvidia", "sm_90", 227 * 1024,
                      132)


def per_call_us(call, calls, device, repeats=5):
    """The best of `repeats` rounds of `calls` calls: wall microseconds per call, the device
    synchronised before and after each round."""
    for _ in range(max(3, calls // 10)):
        call()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def python_profile(call, calls, device, top=20):
    """[dict(function, calls, own_us, total_us)] per call of call(), for the `top` functions
    by own time over `calls` calls under cProfile (this thread only), the device synchronised
    before and after."""
    for _ in range(3):
        call()
    _synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    _synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, all calls, own, total, _)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [dict(function=_function_name(*key), calls=round(every / calls, 2),
                 own_us=round(own / calls * 1e6, 2), total_us=round(total / calls * 1e6, 2))
            for key, (_, every, own, total, _) in ranked]


def _function_name(file, line, name):
    """`folder/file.py:line(name)`, or the C function's own name (cProfile's "~" file)."""
    if file == "~":
        return name
    return f"{'/'.join(pathlib.Path(file).parts[-2:])}:{line}({name})"


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recorded_launches(run):
    """[(kernel, grid, arguments, options)] of the kernel launches `run()` makes, recorded
    instead of launched (running.recording)."""
    launches = []

    def record(kernel, grid, arguments, config, options):
        launches.append((kernel, grid, arguments, options))

    with running.recording(record):
        run()
    return launches


def triton_binder(kernel):
    """Triton's own JIT binder of `kernel` for the current GPU, or without one for an H100's
    sm_90: called with a launch's keyword arguments, options and debug=False, it returns
    (bound arguments in parameter order, their specialisation, options), as JITFunction.run
    binds them before its cache lookup. None where this Triton lacks the private functions."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError:
        return None
    target = driver.active.get_current_target() if torch.cuda.is_available() else \
        GPUTarget("cuda", 90, 32)
    jitted = JITFunction(kernel.fn)  # the interpreter's kernels have no binder of their own
    return create_function_from_signature(jitted.signature, jitted.params, make_backend(target))


def triton_binding_calls(launches, prefix=""):
    """{row name: call} of Triton's own host work for each recorded launch, up to its
    compile-cache lookup: the JIT binder (every argument specialised: alignment, divisibility
    by 16, value 1), then the cache key. For the current GPU, or without one for an H100's
    sm_90 with CPU tensors in place of the meta ones. What follows it (the launch metadata, the
    C launcher, cuLaunchKernel) is the rest of the "Triton launches" row. {} where this Triton
    lacks the private functions it uses."""
    try:
        from triton.runtime.jit import compute_cache_key
    except ImportError:
        return {}
    calls = {}
    for kernel, _, arguments, options in launches:
        binder = triton_binder(kernel)
        if binder is None:
            return {}
        keywords = {name: _materialised(value) for name, value in arguments.items()}
        keywords.update(options, debug=False)

        def bind(binder=binder, keywords=keywords, cache={}):  # noqa: B006 - the key cache
            _, specialization, bound_options = binder(**keywords)
            return compute_cache_key(cache, specialization, bound_options)

        calls[f"{prefix}Triton's binding, {kernel.fn.__name__}, no launch"] = bind
    return calls


def fixed_and_tensors(arguments):
    """(the arguments that are not tensors, the tensors) of a launch: every tensor as a
    per-call slot (the upper bound of what a kept launch passes per call)."""
    tensors = {name: value for name, value in arguments.items()
               if isinstance(value, torch.Tensor)}
    return {name: value for name, value in arguments.items() if name not in tensors}, tensors


def _direct_launches(launches, compiled_of):
    """[(DirectLaunch, its tensors)] of recorded launches (fixed_and_tensors), each kernel's
    compile given by compiled_of(kernel, grid, arguments, options)."""
    directs = []
    streams = None if torch.cuda.is_available() else ((lambda: 0), (lambda device: 0))
    for kernel, grid, arguments, options in launches:
        arguments = {name: _materialised(value) for name, value in arguments.items()}
        fixed, tensors = fixed_and_tensors(arguments)
        compiled = compiled_of(kernel, grid, arguments, options)
        directs.append((DirectLaunch.of(kernel, grid, compiled, fixed, tensors, streams),
                        tensors))
    return directs


def direct_launch_calls(launches, prefix=""):
    """{row name: call} of a kept launch's direct path (direct_launch.DirectLaunch) for each
    recorded launch, its compiled kernel's launcher replaced by nothing: the arguments put in
    their slots, the alignment checked, the stream looked up: what it does in place of the
    "Triton's binding" rows. Also without CUDA (CPU tensors, no stream)."""
    def no_launcher(kernel, grid, arguments, options):
        return types.SimpleNamespace(run=lambda *arguments: None, function=None,
                                     packed_metadata=None)

    return {f"{prefix}direct launch, {kernel.fn.__name__}, no launch":
            functools.partial(direct, tensors)
            for (kernel, *_), (direct, tensors) in zip(
                launches, _direct_launches(launches, no_launcher), strict=True)}


@contextlib.contextmanager
def gluon_without_launch(backward=False):
    """Within the block the opted-in Gluon forward (backward: the Gluon dV and dK/dQ kernels)
    plans and makes its descriptors but launches nothing, and its device check passes: its
    launcher's Python alone, without CUDA (Gluon kernels do not go through running.run, which
    running.recording replaces)."""
    from stm_kernels.experimental import gluon_backward, gluon_backward_dv, gluon_forward

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda **arguments: None

    kernels = ([(gluon_backward, "memory_read_ws_bwd_dkdq_kernel"),
                (gluon_backward_dv, "memory_read_ws_bwd_dv_kernel")] if backward else
               [(gluon_forward, "memory_read_ws_fwd_kernel")])
    saved = [(module, name, getattr(module, name), module.unsupported_reason)
             for module, name in kernels]
    for module, name in kernels:
        setattr(module, name, NoLaunch())
        module.unsupported_reason = lambda *args, **kwargs: None
    try:
        with launch.warp_specialized_backward() if backward else \
                launch.warp_specialized_forward():
            yield
    finally:
        for module, name, kernel, reason in saved:
            setattr(module, name, kernel)
            module.unsupported_reason = reason


def _materialised(value):
    """A meta tensor's CPU twin (same shape, strides and dtype: what the binder reads); any
    other argument as it is."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
    return value


def _gluon_runs(q, k, v):
    """Whether the opted-in Gluon forward reads q, k, v (else the read falls back to the plain
    forward, and a Gluon row would time that): its own check on a GPU; without one, that Gluon
    imports and that TMA can address k and v (rows on 16 bytes: N % 8 == 0)."""
    from stm_kernels.experimental import gluon_common, gluon_forward
    if k.is_cuda:
        return gluon_forward.unsupported_reason(q, k, v) is None
    return gluon_common.AVAILABLE and all(gluon_common.tma_strides_ok(t) for t in (k, v))


def _nothing(kernel, grid, arguments, config, options):
    return None


SMALL = "(HW 20, N 64 on the CPU)"  # the rows of _small_cpu_layers, in their names
SMALL_N = 64


def _small_cpu_layers():
    """{layer: call} on small CPU tensors of the target's channels, kernels dropped: the
    launchers of the backward, the top-k selection and the usage, the op without gradients
    and the op's forward + backward (the input checks, the autograd function and the fallback
    wrapper around the launchers)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, out, grad = (torch.randn(shape, generator=generator).bfloat16() for shape in (
        (1, CK, 20), (B, CK, SMALL_N), (B, CV, SMALL_N), (B, CV, 20), (B, CV, 20)))
    lse = torch.randn(B, 20, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def op():
        with torch.no_grad():
            return memory_read(q, k, v, backend="triton")

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        memory_read(*leaves, backend="triton").backward(grad)

    scale = CK ** -0.5
    return {f"backward launcher, no launch {SMALL}":
            lambda: launch.triton_backward(grad, None, q, k, v, out, lse, scale, False),
            f"top-7 selection launcher, no launch {SMALL}":
            lambda: launch.triton_select(q, k, 7, scale, False),
            f"usage launcher, no launch {SMALL}":
            lambda: launch.triton_usage(q, k, lse, scale, False),
            f"op, no launch {SMALL}": op,
            f"forward + backward, no launch {SMALL}": forward_backward}


def small_cpu_rows(calls, measured=lambda row: None):
    """[dict(layer, N, us)] of _small_cpu_layers (N = SMALL_N, their memory), once a run:
    planned for an H100, kernels dropped; then Triton's binding and the direct launch of the
    backward's kernels (dV, dK/dQ) at that size; only under TRITON_INTERPRET=1."""
    rows = []
    layers = _small_cpu_layers()
    with devices.pretend(H100):
        backward = recorded_launches(layers[f"backward launcher, no launch {SMALL}"])
        with running.recording(_nothing):
            for layer, call in layers.items():
                rows.append(dict(layer=layer, N=SMALL_N,
                                 us=round(per_call_us(call, calls, torch.device("cpu")), 2)))
                measured(rows[-1])
            from stm_kernels.experimental import gluon_common
            if gluon_common.AVAILABLE:  # the Gluon backward's launchers, on CPU tensors
                with gluon_without_launch(backward=True):
                    call = layers[f"backward launcher, no launch {SMALL}"]
                    rows.append(dict(layer=f"Gluon backward launcher, no launch {SMALL}",
                                     N=SMALL_N, us=round(per_call_us(call, calls,
                                                                     torch.device("cpu")), 2)))
                    measured(rows[-1])
    for layer, call in {**triton_binding_calls(backward), **direct_launch_calls(backward)}.items():
        rows.append(dict(layer=f"{layer} {SMALL}", N=SMALL_N,
                         us=round(per_call_us(call, calls, torch.device("cpu")), 2)))
        measured(rows[-1])
    return rows


def rows_for(N, calls, device, measured=lambda row: None, profiled=lambda profile: None):
    """[dict(layer, N, us)] of one memory size: every layer on CUDA, the Python-only layers
    elsewhere; measured(row) is called after each (a cold GPU compiles for tens of seconds
    before the first rows: a stage's time limit keeps the rows before it), and
    profiled(dict(layer, N, functions)) after each cProfile view (python_profile)."""
    meta = device.type != "cuda"
    if meta:
        q, k, v, grad = (torch.empty(shape, dtype=torch.bfloat16, device="meta")
                         for shape in ((1, CK, HW), (B, CK, N), (B, CV, N), (B, CV, HW)))
    else:
        q, k, v, grad = common.read_inputs(B, HW, N, CK, CV, torch.bfloat16, device)
    scale = CK ** -0.5
    rows = []

    def row(layer, call):
        rows.append(dict(layer=layer, N=N, us=round(per_call_us(call, calls, device), 2)))
        measured(rows[-1])

    def profile(layer, call):
        profiled(dict(layer=layer, N=N, functions=python_profile(call, min(calls, 50), device)))

    def launcher_rows(prefix, run):
        """The launcher (with its kept launches direct, then through Triton's binder), its
        Python alone, and the kernels it launches alone, through Triton and directly."""
        row(f"{prefix}launcher", run)
        with launch.binding_every_launch():
            row(f"{prefix}launcher, through Triton's binder", run)
        with running.recording(_nothing):
            row(f"{prefix}launcher, no launch", run)
        launches = recorded_launches(run)
        row(f"{prefix}Triton launches", lambda: [kernel[grid](**arguments, **options)
                                                 for kernel, grid, arguments, options in launches])
        directs = _direct_launches(launches, lambda kernel, grid, arguments, options:
                                   kernel[grid](**arguments, **options))
        row(f"{prefix}direct launches", lambda: [direct(tensors) for direct, tensors in directs])
        for layer, call in {**triton_binding_calls(launches, prefix),
                            **direct_launch_calls(launches, prefix)}.items():
            row(layer, call)

    def forward():
        return launch.triton_forward(q, k, v, scale, False)

    if meta:
        with devices.pretend(H100), running.recording(_nothing):
            row("launcher, no launch", forward)
            profile("launcher, no launch", forward)
            with launch.planning_every_call():
                row("launcher, no launch, planned every call", forward)
            launches = recorded_launches(forward)
            if _gluon_runs(q, k, v):
                with gluon_without_launch():
                    row("Gluon launcher, no launch", forward)
                    with launch.planning_every_call():
                        row("Gluon launcher, no launch, planned every call", forward)
        for layer, call in {**triton_binding_calls(launches),
                            **direct_launch_calls(launches)}.items():
            row(layer, call)
        return rows
    def op():
        return memory_read(q, k, v, backend="triton")

    out, lse = forward()
    with torch.no_grad():
        row("op", op)
        with launch.binding_every_launch():
            row("op, through Triton's binder", op)
        row("custom op", lambda: torch.ops.stm_kernels.memory_read(q, [k], [v], scale, False,
                                                                    "triton", None))
        launcher_rows("", forward)
        peer, _ = kernel_bench.make_inputs("sdpa_flash_split", "fwd", torch.bfloat16, B, HW, N,
                                           CK, CV, device)
        row("peer: sdpa_flash_split", peer)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        memory_read(*leaves, backend="triton").backward(grad)

    row("forward + backward", forward_backward)
    with launch.binding_every_launch():
        row("forward + backward, through Triton's binder", forward_backward)

    def backward():
        return launch.triton_backward(grad, None, q, k, v, out, lse, scale, False)

    launcher_rows("backward ", backward)
    with launch.planning_every_call():
        with torch.no_grad():
            row("op, planned every call", op)
            row("launcher, planned every call", forward)
        row("forward + backward, planned every call", forward_backward)
        row("backward launcher, planned every call", backward)
    with torch.no_grad():
        profile("op", op)
    profile("forward + backward", forward_backward)
    profile("backward launcher", backward)
    if _gluon_runs(q, k, v):  # last: its kernel compiles cold here
        with torch.no_grad(), launch.warp_specialized_forward():
            row("op, Gluon forward", op)
            with launch.planning_every_call():
                row("op, Gluon forward, planned every call", op)
    if common.warp_specialized_backward_reason(q, k, v) is None:  # likewise
        with launch.warp_specialized_backward():
            row("forward + backward, Gluon backward", forward_backward)
            with launch.planning_every_call():
                row("forward + backward, Gluon backward, planned every call", forward_backward)
    return rows


READ_N = 16200  # ten 480p memory frames: the proxy's size (issue 79)
TOP_K = 20  # STCN's top-k
# Goals on the CPU proxy (microseconds a call, kernels launched to nothing): the row, its limit.
GOALS = {"forward: op": 30.0, "forward + backward: op": 80.0}
READS = ("forward", "forward + backward", "ragged", "top-k")


@contextlib.contextmanager
def launches_to_nothing():
    """Within the block (no CUDA: meta tensors planned for an H100), the launchers plan and
    keep their launches as on a GPU, and a kept launch goes its direct way
    (direct_launch.DirectLaunch) to a compiled kernel whose launcher does nothing: the host
    path up to the driver's launch call. Yields first(call): a layout's first call, run with
    its launches recorded (running.recording) as compiles of that launcher, which later calls
    then launch. Every kept launch and choice is forgotten before and after."""
    from stm_kernels.backends.triton import direct_launch, kept_launches
    compiled = types.SimpleNamespace(run=lambda *arguments: None, function=None,
                                     packed_metadata=None)
    streams = direct_launch._triton_streams

    def first(call):
        with running.recording(lambda *launch: compiled):
            return call()

    kept_launches.forget_choices()
    direct_launch._triton_streams = lambda: ((lambda: 0), (lambda device: 0))
    try:
        with devices.pretend(H100):
            yield first
    finally:
        direct_launch._triton_streams = streams
        kept_launches.forget_choices()


@contextlib.contextmanager
def meta_read_eagerly():
    """Within the block memory_read takes its plain eager route (the launchers called directly,
    as for CUDA tensors) for meta tensors too, which it otherwise hands to its custom op (whose
    fake implementation then runs)."""
    read_module = importlib.import_module("stm_kernels.memory_read")  # the module, not the op
    real = read_module._plain_eager
    read_module._plain_eager = lambda tensors: real(()) and all(
        type(t) is torch.Tensor for t in tensors)
    try:
        yield
    finally:
        read_module._plain_eager = real


class _AllocatingRead(torch.autograd.Function):
    """The op's autograd with no read in it: saves what the op saves (q, out, lse, k, v) and
    only allocates its outputs and gradients, the floor torch's autograd sets under the
    forward + backward rows."""

    @staticmethod
    def forward(ctx, scale, q, k, v):
        out = torch.empty((q.shape[0], v.shape[1], q.shape[2]), dtype=v.dtype, device=v.device)
        lse = torch.empty((q.shape[0], q.shape[2]), dtype=torch.float32, device=v.device)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, out, lse, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, _, _, k, v = ctx.saved_tensors
        return (None, *(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                        for t in (q, k, v)))


def _read_layers(kind, q, k, v, grad, lengths, first):
    """{layer: call} of one read kind on meta tensors, each layout planned (first)."""
    from stm_kernels import prepare_read
    scale = CK ** -0.5
    if kind == "top-k":
        plan = first(lambda: prepare_read(q, k, v, top_k=TOP_K))
        return {"op": lambda: memory_read(q, k, v, top_k=TOP_K, backend="triton"),
                "prepared read": lambda: plan.run(q, k, v),
                "launcher": lambda: launch.triton_select(q, k, TOP_K, scale, False)}
    if kind == "forward + backward":
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = first(lambda: launch.triton_forward(q, k, v, scale, False))
        plan = first(lambda: prepare_read(*leaves))

        def through(read):
            def call():
                for leaf in leaves:
                    leaf.grad = None
                read().backward(grad)
            return call

        def launchers():
            launch.triton_forward(q, k, v, scale, False)
            return launch.triton_backward(grad, None, q, k, v, out, lse, scale, False)

        first(through(lambda: memory_read(*leaves, backend="triton")))
        first(launchers)
        return {"op": through(lambda: memory_read(*leaves, backend="triton")),
                "autograd alone (a Function that only allocates)": through(
                    lambda: _AllocatingRead.apply(scale, *leaves)),
                "custom op's dispatch (its fake implementation)": through(
                    lambda: torch.ops.stm_kernels.memory_read(
                        leaves[0], [leaves[1]], [leaves[2]], scale, False, "triton", None)[0]),
                "prepared read": through(lambda: plan.run(*leaves)),
                "launcher": launchers}
    plan = first(lambda: prepare_read(q, k, v, memory_lengths=lengths))
    # the op's lengths: a FixedCapacityMemory's, checked on the host where they are set (a
    # plain tensor's would be read back: .item(), which meta tensors refuse)
    memory = None if lengths is None else FixedCapacityMemory(k, v, lengths=k.shape[2])
    layers = {"op": (lambda: memory_read(q, k, v, backend="triton")) if memory is None else
              lambda: memory_read(q, memory.keys, memory.values, backend="triton",
                                  memory_lengths=memory.lengths),
              "custom op's dispatch (its fake implementation)":
              lambda: torch.ops.stm_kernels.memory_read(q, [k], [v], scale, False, "triton",
                                                        lengths),
              "prepared read": lambda: plan.run(q, k, v, lengths),
              "launcher": lambda: launch.triton_forward(q, k, v, scale, False, lengths)}
    return layers


def read_rows(calls, measured=lambda row: None, profiled=lambda profile: None, n=None):
    """([dict(layer, N, us)], [dict(layer, N, reason)]) of the four read kinds (READS) at
    N = n on meta tensors planned for an H100, without CUDA: the op (memory_read with its
    checks, taking its eager route: meta_read_eagerly), the custom op's dispatch (on meta it
    runs the op's fake implementation, not the launcher), the prepared read
    (stm_kernels.prepare_read's run), the launcher(s), each with kept launches going their
    direct way to nothing (launches_to_nothing); then the launchers with every launch dropped
    (running.recording). Layers that cannot run on meta tensors (a host read of a device
    value) are returned with the one-line reason instead; a cProfile of the forward's and
    forward + backward's op (profiled)."""
    n = READ_N if n is None else n
    q, k, v, grad = (torch.empty(shape, dtype=torch.bfloat16, device="meta")
                     for shape in ((1, CK, HW), (B, CK, n), (B, CV, n), (B, CV, HW)))
    lengths = torch.empty((B,), dtype=torch.int32, device="meta")
    rows, skipped = [], []
    with launches_to_nothing() as first, meta_read_eagerly(), \
            common.environment_variable(running.NO_FALLBACK_ENV, "1"):
        for kind in READS:
            with torch.enable_grad() if kind == "forward + backward" else torch.no_grad():
                layers = _read_layers(kind, q, k, v, grad, lengths if kind == "ragged" else None,
                                      first)
                layers["launcher, no launch"] = layers["launcher"]
                for layer, call in layers.items():
                    name = f"{kind}: {layer}"
                    try:
                        with running.recording(_nothing) if layer == "launcher, no launch" \
                                else contextlib.nullcontext():
                            first(call)  # its layouts planned and kept, if not yet
                            timed = _calls_within(call, calls)
                            us = per_call_us(call, timed, torch.device("cpu"))
                    except (RuntimeError, NotImplementedError) as error:
                        skipped.append(dict(layer=name, N=n, reason=_where(error)))
                        continue
                    rows.append(dict(layer=name, N=n, us=round(us, 2), calls=timed))
                    measured(rows[-1])
                    if layer == "op" and kind in ("forward", "forward + backward"):
                        profiled(dict(layer=name, N=n, functions=python_profile(
                            call, min(calls, 50), torch.device("cpu"))))
    return rows, skipped


ROUND_S = 0.2  # the longest timed round of a read row (its calls cut to fit)


def _calls_within(call, calls):
    """`calls`, or fewer (at least 3) where one call takes so long that a round of them would
    pass ROUND_S: the top-k read's softmax over its picks runs torch operations whose meta
    implementations are Python reference code (milliseconds a call on meta tensors)."""
    start = time.perf_counter()
    call()
    return max(3, min(calls, int(ROUND_S / max(time.perf_counter() - start, 1e-9))))


def _where(error):
    """The error in one line, with the last line of stm_kernels it came from."""
    import traceback
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "stm_kernels" in frame.filename]
    where = f" (at {'/'.join(pathlib.Path(frames[-1].filename).parts[-2:])}:"\
        f"{frames[-1].lineno}, {frames[-1].line})" if frames else ""
    return running.one_line(error) + where


def goals(records):
    """[dict(goal, us, limit, met)] of GOALS against the rows measured."""
    us = {row["layer"]: row["us"] for row in records if row["N"] == READ_N}
    return [dict(goal=f"{layer} <= {limit:g} us", layer=layer, us=us.get(layer), limit=limit,
                 met=layer in us and us[layer] <= limit) for layer, limit in GOALS.items()]


def summary(payload):
    """Markdown table: microseconds per call of each layer, one column per N."""
    ns = sorted({row["N"] for row in payload["records"]})
    layers = list(dict.fromkeys(row["layer"] for row in payload["records"]))
    us = {(row["layer"], row["N"]): row["us"] for row in payload["records"]}
    lines = ["| layer | " + " | ".join(f"us per call, N = {n:,}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for layer in layers:
        cells = [f"{us[(layer, n)]:.1f}" if (layer, n) in us else "" for n in ns]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if payload.get("goals") or payload.get("not_timed"):
        lines.append("")
    for goal in payload.get("goals", []):
        us = "not measured" if goal["us"] is None else f"{goal['us']:.1f} us"
        lines.append(f"- goal {goal['goal']}: {us}, {'met' if goal['met'] else 'missed'}")
    for row in payload.get("not_timed", []):
        lines.append(f"- not timed on meta tensors, {row['layer']}: {row['reason']}")
    for profile in payload.get("profiles", []):
        lines += ["", f"cProfile, {profile['layer']}, N = {profile['N']:,} (per call; shares, "
                      "not times):", "", "| function | calls | own us | total us |",
                  "|---|---|---|---|"]
        lines += [f"| `{entry['function']}` | {entry['calls']:g} | {entry['own_us']:.1f} | "
                  f"{entry['total_us']:.1f} |" for entry in profile["functions"][:SHOWN]]
    return "\n".join(lines)


SHOWN = 8  # functions of each profile in the summary (the JSON keeps python_profile's top)


def main(argv=None):
    """`python -m bench host-path`: host microseconds per call of each layer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1620, 16200],
                        help="memory positions (1,620 per 480p frame)")
    parser.add_argument("--calls", type=int, default=300, help="calls per timed round")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.ns) or args.calls < 1:
        raise SystemExit("--ns and --calls must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = dict(benchmark="host_path", **common.environment(device),
                   shape=dict(B=B, HW=HW, Ck=CK, Cv=CV, dtype="bf16"), calls=args.calls,
                   records=[], profiles=[])

    def kept(key):
        def keep(entry):
            payload[key].append(entry)
            common.save_progress("host_path", payload)
        return keep

    for n in args.ns:
        rows_for(n, args.calls, device, kept("records"), kept("profiles"))
    if device.type != "cuda":
        _, payload["not_timed"] = read_rows(args.calls, kept("records"), kept("profiles"))
        payload["goals"] = goals(payload["records"])
    if device.type != "cuda" and devices.INTERPRETING:
        small_cpu_rows(args.calls, kept("records"))
    common.finish_run("host_path", payload, None, summary)


if __name__ == "__main__":
    main()
