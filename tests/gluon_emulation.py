"""A CPU emulation of the Gluon primitives the warp-specialised kernels use
(stm_kernels/experimental/gluon_forward.py, gluon_backward.py, gluon_backward_dv.py), for their
tests.

Triton's CPU interpreter does not run Gluon (a Gluon launch under TRITON_INTERPRET=1 still asks
for a GPU driver). `EmulatedKernel(kernel)[grid](**kwargs)` runs the kernel's own Python source
(the same function objects Gluon compiles) with small stand-ins: one thread per partition,
mbarriers with phases, counts and transaction bytes, TMA copies that land after a random delay
(zero-filled outside the tensor) and TMA stores (clipped to it), wgmma that reads shared memory
only at its wait, loads, stores and atomics through element offsets into a tensor's storage.
This checks ring indexing, barrier parities and counts, masks, splits and the host launchers
end to end; it does not check layouts or Gluon's lowering.
"""
import itertools
import math
import random
import threading
import time
import types

import torch

try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton or no Gluon: the tests that use this skip
    TensorDescriptor = JITFunction = None


def _jitter():
    if random.random() < 0.3:
        time.sleep(random.random() * 2e-4)


class _Barrier:
    """An mbarrier: pending arrivals and transaction bytes; completing a phase flips parity.
    try_wait.parity(P) succeeds once the phase of parity P has completed, i.e. while the
    current (incomplete) phase's parity differs from P."""

    def __init__(self, lock):
        self.cond = threading.Condition(lock)
        self.count = None

    def init(self, count):
        self.count, self.pending, self.tx, self.completed = count, count, 0, 0

    def _check(self):
        assert self.pending >= 0, "more arrivals than the barrier's count in one phase"
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count
            self.cond.notify_all()

    def arrive(self, count=1):
        with self.cond:
            assert self.count is not None, "arrive on an uninitialised barrier"
            self.pending -= count
            self._check()

    def expect(self, nbytes):
        with self.cond:
            self.tx += nbytes
            self.pending -= 1
            self._check()

    def complete_tx(self, nbytes):
        with self.cond:
            self.tx -= nbytes
            assert self.tx >= 0, "TMA delivered more bytes than expected"
            self._check()

    def wait(self, parity, timeout=20.0):
        with self.cond:
            assert self.count is not None, "wait on an uninitialised barrier"
            ok = self.cond.wait_for(lambda: (self.completed & 1) != parity, timeout)
            assert ok, f"deadlock: waiting for parity {parity}, {self.completed} phases done"


class _BarrierRef:
    def __init__(self, cells, i=0):
        self.cells, self.i = cells, i

    def index(self, i):
        return _BarrierRef(self.cells, int(i))

    @property
    def cell(self):
        return self.cells[self.i]


class _Smem:
    def __init__(self, data):
        self.data = data

    shape = property(lambda self: list(self.data.shape))
    dtype = property(lambda self: self.data.dtype)

    def index(self, i):
        return _Smem(self.data[int(i)])

    def slice(self, start, length, dim=0):
        return _Smem(self.data.narrow(dim, int(start), int(length)))

    def permute(self, order):
        return _Smem(self.data.permute(*order))

    def load(self, layout=None):
        return self.data.clone()

    def store(self, value):
        _jitter()
        self.data.copy_(value)


class _Pointer:
    """A scalar or tensor of element offsets into a tensor's storage (gl pointer arithmetic)."""

    def __init__(self, tensor, offset=0):
        self.tensor, self.offset = tensor, offset
        self.dtype = types.SimpleNamespace(element_ty=tensor.dtype)

    def __add__(self, other):
        if isinstance(other, torch.Tensor):
            other = other.to(torch.int64)
        return _Pointer(self.tensor, self.offset + other)

    __radd__ = __add__


class _Lazy:
    """An async wgmma: shared memory is read at the wait, the latest legal moment."""

    def __init__(self, a, b, acc, use_acc):
        self.a, self.b, self.acc, self.use_acc = a, b, acc, use_acc

    def value(self):
        a = self.a.data if isinstance(self.a, _Smem) else self.a
        out = a.float() @ self.b.data.float()
        if not self.use_acc:
            return out
        acc = self.acc.value() if isinstance(self.acc, _Lazy) else self.acc
        return out + acc.float()


def _make_fake_gluon(state):
    """Stand-ins for the names the kernel's source uses (gl, mbarrier, tma, wgmma, fences)."""
    lock = threading.Lock()
    layout = lambda *args, **kwargs: None  # noqa: E731
    int64, float32 = torch.int64, torch.float32

    class MBarrierLayout:
        pass

    def allocate_shared_memory(dtype, shape, layout):
        if isinstance(layout, MBarrierLayout):
            return _BarrierRef([_Barrier(lock) for _ in range(shape[0])])
        return _Smem(torch.full(list(shape), float("nan"), dtype=dtype))

    def as_tensor(x):
        return x if isinstance(x, torch.Tensor) else torch.tensor(x)

    def flat(pointer, shape, mask):
        # (the pointer's tensor as a flat view of its storage, offsets and mask of `shape`)
        t = pointer.tensor
        length = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
        offsets = torch.broadcast_to(as_tensor(pointer.offset), shape)
        mask = torch.ones_like(offsets, dtype=torch.bool) if mask is None else \
            torch.broadcast_to(as_tensor(mask), shape)
        return t.as_strided((length,), (1,), t.storage_offset()), offsets, mask

    def store(pointer, value, mask=None):
        view, offsets, mask = flat(pointer, value.shape, mask)
        view[offsets[mask]] = value[mask].to(view.dtype)

    def load(pointer, mask=None, other=0.0):
        shape = as_tensor(pointer.offset).shape if mask is None else torch.broadcast_shapes(
            as_tensor(pointer.offset).shape, as_tensor(mask).shape)
        view, offsets, mask = flat(pointer, shape, mask)
        out = torch.full(shape, other, dtype=view.dtype)
        out[mask] = view[offsets[mask]]
        return out

    def atomic_add(pointer, value, mask=None, sem=None):
        view, offsets, mask = flat(pointer, value.shape, mask)
        with lock:
            view.index_put_((offsets[mask],), value[mask].to(view.dtype), accumulate=True)

    def warp_specialize(functions_and_args, worker_num_warps, worker_num_regs):
        assert len(functions_and_args) == len(worker_num_warps) + 1 == len(worker_num_regs) + 1
        errors = []

        def run(fn, args):
            try:  # grad mode is per thread: kernels write outside autograd
                with torch.no_grad():
                    state["compile"](fn)(*args)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=pair, daemon=True)
                   for pair in functions_and_args]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a partition never finished"
        if errors:
            raise errors[0]

    gl = types.SimpleNamespace(
        constexpr=lambda x: x, int32=torch.int32, int64=int64, float32=float32,
        NVMMADistributedLayout=layout, DotOperandLayout=layout, SliceLayout=layout,
        BlockedLayout=layout, SwizzledSharedLayout=layout,
        program_id=lambda axis: torch.tensor(state["pid"][axis], dtype=torch.int32),
        minimum=lambda a, b: torch.minimum(as_tensor(a), as_tensor(b)),
        maximum=lambda a, b: torch.maximum(as_tensor(a), as_tensor(b)),
        cdiv=lambda a, b: (a + b - 1) // b,
        full=lambda shape, value, dtype, layout=None: torch.full(list(shape), value, dtype=dtype),
        zeros=lambda shape, dtype, layout=None: torch.zeros(list(shape), dtype=dtype),
        arange=lambda start, end, layout=None: torch.arange(start, end),
        where=lambda c, x, y: torch.where(c, x, torch.as_tensor(y, dtype=x.dtype)),
        max=lambda x, axis: x.amax(axis), sum=lambda x, axis: x.sum(axis),
        exp2=torch.exp2, log2=torch.log2, convert_layout=lambda x, layout: x,
        store=store, load=load, atomic_add=atomic_add, static_range=range,
        allocate_shared_memory=allocate_shared_memory, warp_specialize=warp_specialize,
        # the kernels' inline assembly only hides a 0 from the compiler
        inline_asm_elementwise=lambda asm, constraints, args, dtype, is_pure, pack: 0)

    def wait(bar, phase):
        _jitter()
        bar.cell.wait(int(phase))

    def arrive(bar, count=1):
        _jitter()
        bar.cell.arrive(count)

    mbarrier = types.SimpleNamespace(MBarrierLayout=MBarrierLayout,
                                     init=lambda bar, count: bar.cell.init(count),
                                     expect=lambda bar, nbytes: bar.cell.expect(nbytes),
                                     wait=wait, arrive=arrive)

    def async_copy_global_to_shared(desc, coord, bar, smem):
        # The box [r0, r0 + R) x [c0, c0 + C) of the 2-D tensor, zero outside it, lands later.
        r0, c0 = (int(c) for c in coord)
        rows, cols = desc.block_shape
        source = desc.base
        box = torch.zeros(rows, cols, dtype=source.dtype)
        r1, c1 = min(r0 + rows, source.shape[0]), min(c0 + cols, source.shape[1])
        if r1 > r0 and c1 > c0:
            box[:r1 - r0, :c1 - c0] = source[r0:r1, c0:c1]
        assert list(smem.shape) == [rows, cols]

        def land():
            time.sleep(random.random() * 3e-4)
            with torch.no_grad():
                smem.data.copy_(box)
            bar.cell.complete_tx(box.numel() * box.element_size())

        threading.Thread(target=land, daemon=True).start()

    def async_copy_shared_to_global(desc, coord, smem):
        # The tile into the box at [r0, c0) of the 2-D tensor, clipped to its bounds; written
        # at once (store_wait has nothing left to wait for).
        r0, c0 = (int(c) for c in coord)
        rows, cols = desc.block_shape
        target = desc.base
        assert list(smem.shape) == [rows, cols]
        r1, c1 = min(r0 + rows, target.shape[0]), min(c0 + cols, target.shape[1])
        _jitter()
        if r1 > r0 and c1 > c0:
            with torch.no_grad():
                target[r0:r1, c0:c1] = smem.data[:r1 - r0, :c1 - c0].to(target.dtype)

    tma = types.SimpleNamespace(async_copy_global_to_shared=async_copy_global_to_shared,
                                async_copy_shared_to_global=async_copy_shared_to_global,
                                store_wait=lambda pendings: None)
    fake = dict(gl=gl, mbarrier=mbarrier, tma=tma, fence_async_shared=lambda: None,
                warpgroup_mma=lambda a, b, acc, use_acc=True, is_async=False:
                    _Lazy(a, b, acc, use_acc),
                warpgroup_mma_wait=lambda num_outstanding=0, deps=():
                    deps[0].value() if len(deps) == 1 else tuple(d.value() for d in deps),
                LN2_C=math.log(2.0), LOG2E_C=1 / math.log(2.0))
    return fake


class EmulatedKernel:
    """`kernel[grid](**kwargs)` running the kernel's Python source on CPU: its tensor
    descriptors' boxes come from their tensors, its tensors are pointers to their storage,
    the Gluon functions it calls run emulated too. `launches` records (grid, kwargs)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.state = {"pid": (0, 0, 0)}
        self.fake = _make_fake_gluon(self.state)
        self.cache = {}
        self.state["compile"] = self.compile
        self.launches = []

    def compile(self, jit_fn):
        fn = getattr(jit_fn, "fn", jit_fn)
        if fn not in self.cache:
            scope = dict(fn.__globals__)
            for name, value in fn.__globals__.items():
                if JITFunction is not None and isinstance(value, JITFunction):
                    scope[name] = self._deferred(value)
            scope.update(self.fake)
            self.cache[fn] = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__,
                                                fn.__closure__)
        return self.cache[fn]

    def _deferred(self, jit_fn):
        return lambda *args, **kwargs: self.compile(jit_fn)(*args, **kwargs)

    @staticmethod
    def _argument(value):
        if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
            return types.SimpleNamespace(
                base=value.base, block_shape=list(value.block_shape), layout=value.layout,
                dtype=value.base.dtype,
                block_type=types.SimpleNamespace(shape=list(value.block_shape)))
        if isinstance(value, torch.Tensor):
            return _Pointer(value)
        return value

    def __getitem__(self, grid):
        def launch(**kwargs):
            kwargs.pop("num_warps", None)
            self.launches.append((grid, dict(kwargs)))
            kwargs = {name: self._argument(value) for name, value in kwargs.items()}
            args = [kwargs[name] for name in self.kernel.arg_names]
            for pid in itertools.product(*(range(n) for n in grid)):
                self.state["pid"] = tuple(pid) + (0,) * (3 - len(pid))
                self.compile(self.kernel)(*args)
        return launch


def emulate(monkeypatch, module, kernel_name):
    """module.<kernel_name> (a Gluon kernel) replaced by its EmulatedKernel for the test and
    module.unsupported_reason passed (its device checks refuse CPU tensors); returns the
    EmulatedKernel, which records its launches."""
    emulated = EmulatedKernel(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, emulated)
    monkeypatch.setattr(module, "unsupported_reason", lambda *args, **kwargs: None)
    return emulated
