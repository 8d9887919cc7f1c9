"""Kept launches call their compiled kernel directly (direct_launch.DirectLaunch), skipping
Triton's binder. What must hold, without a GPU: the arguments it passes are those Triton's own
binder would pass to the same compiled kernel's launcher, in the same order, for every kernel
the launchers start; the alignment it checks is the specialisation that binder makes; a call
off that alignment, or with a profiler's launch hook installed, declines (and goes through
Triton); a KernelLaunch launches directly only after its first call, never while launches
are recorded or inside binding_every_launch, and a launcher that refuses the call switches
direct launches off with a warning. On a GPU tests/kernels/test_prepared_launch_gpu.py runs
them for real.
"""
import types

import pytest
import torch

from stm_kernels.backends.triton import devices, kept_launches, launch, running
from stm_kernels.backends.triton.direct_launch import ALIGNMENT, DirectLaunch
from bench import host_path

pytestmark = [pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("fresh_launches")]

B, CK, CV, HW, N = 2, 128, 512, 20, 2048  # N: memory splits, so the merge launches too
STREAM = 12345


class Launcher:
    """A compiled kernel's stand-in: its launcher records what it is called with."""

    def __init__(self, error=None):
        self.calls, self.error = [], error
        self.compiled = types.SimpleNamespace(run=self, function="function",
                                              packed_metadata="metadata")

    def __call__(self, *arguments):
        if self.error is not None:
            raise self.error
        self.calls.append(arguments)


def streams():
    return (lambda: 0), (lambda device: STREAM)


def _inputs(dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    q, k, v, out, grad = (torch.randn(shape, generator=generator).to(dtype) for shape in (
        (1, CK, HW), (B, CK, N), (B, CV, N), (B, CV, HW), (B, CV, HW)))
    return q, k, v, out, grad, torch.randn(B, HW, generator=generator)


def recorded_launches():
    """[(kernel, grid, arguments, options)] of every kernel the launchers start, planned for an
    H100 on CPU tensors: forward and merge, dV and dK/dQ, the deterministic dQ, selection,
    usage."""
    q, k, v, out, grad, lse = _inputs()
    scale = CK ** -0.5

    def every_read():
        launch.triton_forward(q, k, v, scale, False)
        launch.triton_backward(grad, None, q, k, v, out, lse, scale, False)
        torch.use_deterministic_algorithms(True)
        try:
            launch.triton_backward(grad, None, q, k, v, out, lse, scale, False)
        finally:
            torch.use_deterministic_algorithms(False)
        launch.triton_select(q, k, 7, scale, False)
        launch.triton_usage(q, k, lse, scale, False)

    with devices.pretend(host_path.H100):
        return host_path.recorded_launches(every_read)


def _triton_binding(kernel, arguments, options):
    """(bound arguments in order, {name: (type, specialisation)}) of Triton's binder for
    sm_90, as JITFunction.run binds them before it calls the compile's launcher."""
    bind = host_path.triton_binder(kernel)
    if bind is None:
        pytest.skip("this Triton lacks the binder's private functions")
    bound, specialization, _ = bind(**arguments, **options, debug=False)
    return list(bound.values()), dict(zip(bound, specialization, strict=True))


def _view(tensor):
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


def _same(ours, theirs):
    """The same arguments: tensors viewing the same memory the same way, the rest equal."""
    assert len(ours) == len(theirs)
    for mine, triton in zip(ours, theirs, strict=True):
        if isinstance(triton, torch.Tensor):
            assert _view(mine) == _view(triton)
        else:
            assert mine == triton


def test_every_kernel_gets_the_arguments_and_alignment_tritons_binder_gives():
    launches = recorded_launches()
    names = {kernel.fn.__name__ for kernel, *_ in launches}
    assert names == {"memory_read_fwd_kernel", "memory_read_merge_kernel",
                     "memory_read_bwd_kernel_prepare", "memory_read_bwd_kernel_dv",
                     "memory_read_bwd_kernel_dkdq", "memory_read_bwd_kernel_dq",
                     "memory_read_topk_kernel", "memory_read_topk_merge_kernel",
                     "memory_read_usage_kernel"}
    for kernel, grid, arguments, options in launches:
        fixed, tensors = host_path.fixed_and_tensors(arguments)
        launcher = Launcher()
        direct = DirectLaunch.of(kernel, grid, launcher.compiled, fixed, tensors, streams())
        bound, specialization = _triton_binding(kernel, arguments, options)
        _same(direct.positional(tensors), bound)
        aligned = {name for name, (kind, attribute) in specialization.items()
                   if kind.startswith("*") and attribute == "D"}
        assert direct.aligned == aligned, kernel.fn.__name__

        assert direct(tensors)
        (call,) = launcher.calls
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        assert call[:9] == grid3 + (STREAM, "function", "metadata", None, None, None)
        _same(list(call[9:]), bound)


def _forward_launch():
    kernel, grid, arguments, _ = next(launch for launch in recorded_launches()
                                      if launch[0].fn.__name__ == "memory_read_fwd_kernel")
    return (kernel, grid) + host_path.fixed_and_tensors(arguments)


def _misaligned(tensor):
    """A tensor of the same shape, strides and dtype whose data starts off 16 bytes."""
    storage = torch.empty(tensor.numel() + 8, dtype=tensor.dtype)
    view = storage[1:1 + tensor.numel()].view(tensor.shape)
    assert view.data_ptr() % ALIGNMENT
    return view


def test_a_tensor_off_the_compiles_alignment_declines():
    kernel, grid, fixed, tensors = _forward_launch()
    launcher = Launcher()
    direct = DirectLaunch.of(kernel, grid, launcher.compiled, fixed, tensors, streams())
    assert "v" in direct.aligned
    assert not direct({**tensors, "v": _misaligned(tensors["v"])})
    assert launcher.calls == []
    assert direct(tensors) and len(launcher.calls) == 1


def test_a_compile_for_an_unaligned_tensor_takes_any():
    kernel, grid, fixed, tensors = _forward_launch()
    tensors = {**tensors, "v": _misaligned(tensors["v"])}
    launcher = Launcher()
    direct = DirectLaunch.of(kernel, grid, launcher.compiled, fixed, tensors, streams())
    assert "v" not in direct.aligned
    assert direct({**tensors, "v": _misaligned(tensors["v"])})
    assert direct(tensors) and len(launcher.calls) == 2


def test_a_profilers_launch_hook_declines(monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    kernel, grid, fixed, tensors = _forward_launch()
    launcher = Launcher()
    direct = DirectLaunch.of(kernel, grid, launcher.compiled, fixed, tensors, streams())
    chain = knobs.runtime.launch_enter_hook
    hook = chain.add if hasattr(chain, "add") else None

    def profiler(metadata):
        return None

    if hook is not None:  # Triton's hook chain: one hook added
        hook(profiler)
        try:
            assert not direct(tensors) and launcher.calls == []
        finally:
            chain.remove(profiler)
        assert direct(tensors) and len(launcher.calls) == 1
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", profiler)
    assert not direct(tensors) and len(launcher.calls) == (1 if hook else 0)


def test_nothing_to_keep_without_a_compile():
    kernel, grid, fixed, tensors = _forward_launch()
    assert DirectLaunch.of(kernel, grid, None, fixed, tensors, streams()) is None
    assert DirectLaunch.of(kernel, grid, object(), fixed, tensors, streams()) is None
    compiled = Launcher().compiled
    assert DirectLaunch.of(kernel, grid, compiled, fixed, tensors, streams()) is not None
    del fixed["HW"]  # arguments that do not bind: Triton's path, which raises, is kept
    assert DirectLaunch.of(kernel, grid, compiled, fixed, tensors, streams()) is None


@pytest.fixture
def kernel_launch():
    """(KernelLaunch of the forward kernel, its first call's tensors), recorded."""
    kernel, grid, fixed, tensors = _forward_launch()
    return kept_launches.KernelLaunch(kernel, grid, None, fixed), tensors


@pytest.fixture
def compiles(monkeypatch, kernel_launch):
    """running.run replaced by a compile's stand-in (after kernel_launch's recording): [arguments
    of each run], the Launcher its compiled kernel launches through; Triton's streams stood in
    for."""
    runs, launcher = [], Launcher()

    def run(kernel, grid, arguments, config, call, check_local=True):
        runs.append(arguments)
        return launcher.compiled

    monkeypatch.setattr(running, "run", run)
    monkeypatch.setattr("stm_kernels.backends.triton.direct_launch._triton_streams", streams)
    return runs, launcher


def test_a_kernel_launch_goes_direct_after_its_first_call(compiles, kernel_launch):
    runs, launcher = compiles
    kept, tensors = kernel_launch
    kept(None, first=True, **tensors)
    assert len(runs) == 1 and launcher.calls == []
    other = {name: tensor.clone() for name, tensor in tensors.items()}
    kept(None, **other)
    kept(None, **other)
    assert len(runs) == 1 and len(launcher.calls) == 2
    assert launcher.calls[-1][9 + list(kept.direct.positional(other)).index(other["q"])] \
        is other["q"]

    with kept_launches.binding_every_launch():
        kept(None, **other)
    assert len(runs) == 2 and len(launcher.calls) == 2
    with running.recording(lambda *args: None):
        kept(None, **other)
    assert len(runs) == 3 and len(launcher.calls) == 2
    kept(None, **{**other, "v": _misaligned(other["v"])})
    assert len(runs) == 4 and len(launcher.calls) == 2


def test_planning_every_call_keeps_no_compile(compiles, kernel_launch):
    runs, launcher = compiles
    kept, tensors = kernel_launch
    with kept_launches.planning_every_call():
        kept(None, first=True, **tensors)
    assert kept.direct is None


def test_a_launcher_that_refuses_switches_direct_launches_off(compiles, kernel_launch,
                                                             monkeypatch):
    runs, launcher = compiles
    launcher.error = TypeError("function takes 30 arguments (31 given)")
    monkeypatch.setattr(kept_launches, "_launching_directly", True)
    monkeypatch.setattr(running, "_warned", set())
    kept, tensors = kernel_launch
    kept(None, first=True, **tensors)
    with pytest.warns(RuntimeWarning) as warned:
        kept(None, **tensors)
    assert [str(w.message) for w in warned] == [
        "launching kept Triton kernels directly failed (TypeError: function takes 30 arguments "
        "(31 given)); launching them through Triton's binder from now on"]
    assert len(runs) == 2 and not kept_launches._launching_directly
    kept(None, **tensors)
    assert len(runs) == 3


class GluonKernel:
    """The Gluon forward kernel's stand-in for its WsLaunch: records each launch through
    Triton's path, returns a compile whose launcher records its direct launches."""

    def __init__(self, kernel, launcher):
        self.fn, self.params, self.launcher, self.launches = kernel.fn, kernel.params, launcher, []

    def __getitem__(self, grid):
        def launch(**arguments):
            self.launches.append(arguments)
            return self.launcher.compiled
        return launch


def test_the_gluon_forwards_kept_launch_goes_direct_with_tritons_arguments(compiles, monkeypatch):
    gluon_forward = pytest.importorskip("stm_kernels.experimental.gluon_forward")
    if not gluon_forward.AVAILABLE:
        pytest.skip(gluon_forward.UNAVAILABLE_REASON)
    _, launcher = compiles
    real = gluon_forward.memory_read_ws_fwd_kernel
    kernel = GluonKernel(real, launcher)
    monkeypatch.setattr(gluon_forward, "memory_read_ws_fwd_kernel", kernel)
    monkeypatch.setattr(gluon_forward, "unsupported_reason", lambda *args, **kwargs: None)
    q, k, v, *_ = _inputs()
    k, v = k[:1], v[:1]  # one object: its rows fold into the TMA boxes, one launch a call
    splits, per_split = 4, 512
    part_out, part_lse = torch.empty(splits, 1, CV, HW), torch.empty(splits, 1, HW)
    kept = gluon_forward.prepare(q, k, v, part_out, part_lse, per_split=per_split,
                                 qk_scale=0.1, l2=False)
    kept(q, k, v, part_out, part_lse)
    assert len(kernel.launches) == 1 and kept.direct is not None and launcher.calls == []

    q2, k2, v2 = (t.clone() for t in (q, k, v))
    kept(q2, k2, v2, part_out, part_lse)
    assert len(kernel.launches) == 1 and len(launcher.calls) == 1
    sent = launcher.calls[0][9:]
    # this call's tensors (the query's 20 rows of 40 bytes in a padded copy, for TMA)
    assert [descriptor.base.data_ptr() for descriptor in sent[1:3]] == [k2.data_ptr(),
                                                                         v2.data_ptr()]
    assert torch.equal(sent[0].base, q2[0])
    # Triton's binder, on the arguments Triton's path would get for this call
    arguments = {**kept.fixed, "Q_BROADCAST": True,
                 **dict(zip(("q_desc", "k_desc", "v_desc"), sent[:3], strict=True)),
                 "o": part_out, "lse": part_lse}
    options = {"num_warps": arguments.pop("num_warps")}
    bound, specialization = _triton_binding(real, arguments, options)
    _same(list(sent), bound)
    assert kept.direct.aligned == {name for name, (kind, attribute) in specialization.items()
                                   if kind.startswith("*") and attribute == "D"}

    with kept_launches.binding_every_launch():
        kept(q2, k2, v2, part_out, part_lse)
    assert len(kernel.launches) == 2 and len(launcher.calls) == 1


def test_a_gluon_launch_keeps_its_first_compile_and_launches_it_directly(monkeypatch):
    """gluon_common.launch_keeping (the Gluon kernels' kept launches): the first call goes
    through kernel[grid] and keeps a DirectLaunch of its compile; a later call launches that
    compile directly with its own per-call arguments (TMA descriptors, tensors); nothing is
    kept while launches are planned every call, and binding_every_launch goes through
    Triton."""
    from stm_kernels.backends.triton import direct_launch
    from stm_kernels.experimental.gluon_common import launch_keeping
    monkeypatch.setattr(direct_launch, "_triton_streams", streams)
    launcher, bound = Launcher(), []

    def fn(q_desc, lse, HW, BLOCK: "constexpr"):  # noqa: F821 - a stand-in's annotation
        pass

    class Kernel:
        def __init__(self):
            self.fn = fn

        def __getitem__(self, grid):
            def run(**arguments):
                bound.append((grid, arguments))
                return launcher.compiled
            return run

    kernel, fixed = Kernel(), dict(HW=20, BLOCK=64, num_warps=4)
    first = dict(q_desc="descriptor 1", lse=torch.zeros(4))
    direct = launch_keeping(kernel, (3, 1), first, fixed, None)
    assert isinstance(direct, DirectLaunch) and len(bound) == 1 and not launcher.calls
    second = dict(q_desc="descriptor 2", lse=torch.zeros(4))
    assert launch_keeping(kernel, (3, 1), second, fixed, direct) is direct
    assert len(bound) == 1 and len(launcher.calls) == 1
    # (grid x 3, stream, function, metadata, three hooks, the arguments in order)
    grid_and_stream, arguments = launcher.calls[0][:4], launcher.calls[0][9:]
    assert grid_and_stream == (3, 1, 1, STREAM)
    assert arguments[0] == "descriptor 2" and arguments[1] is second["lse"]
    assert arguments[2:] == (20, 64)
    with kept_launches.binding_every_launch():
        assert launch_keeping(kernel, (3, 1), second, fixed, direct) is direct
    assert len(bound) == 2 and len(launcher.calls) == 1
    with kept_launches.planning_every_call():
        assert launch_keeping(kernel, (3, 1), first, fixed, None) is None
