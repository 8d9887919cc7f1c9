"""memory_read's two routes to the fused backends: the custom op (torch.compile, modes,
subclasses) and, in plain eager mode, the same implementation called directly. Both must give
the same numbers and the same gradients; modes must still see one op. (torch.func transforms
and forward-mode AD take a third route, _TransformedRead: test_memory_read_transforms.py.)"""
import importlib

import pytest
import torch

from stm_kernels import memory_read
from tests.helpers import RecordedOps, random_inputs, relative_error
from tests.reference import reference_read


def _loss(out, lse, use):
    """A loss of the read's out, its lse, or both."""
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return {"out": (out * weights).sum(), "lse": lse.square().sum(),
            "both": (out * weights).sum() + lse.sum()}[use]


def _read_and_grads(q, ks, vs, use, **kwargs):
    """out, lse and the gradients of q and every memory chunk, for a loss on `use`."""
    q = q.detach().requires_grad_()
    ks = [k.detach().requires_grad_() for k in ks]
    vs = [v.detach().requires_grad_() for v in vs]
    out, lse = memory_read(q, ks, vs, return_lse=True, backend="torch", **kwargs)
    grads = torch.autograd.grad(_loss(out, lse, use), [q, *ks, *vs])
    return [out.detach(), lse.detach(), *grads]


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("use", ["out", "lse", "both"])
@pytest.mark.parametrize("lengths", [None, [23, 9]])
def test_eager_route_equals_the_custom_op(use, lengths, similarity):
    """Three memory chunks of ragged lengths, two objects, a shared query: the custom op's
    result and gradients to float32 rounding (a recording mode forces the custom op; it passes
    zeros for an unused output's gradient where the eager route passes nothing), and both
    within float32's bound of the float64 read and its gradients."""
    q, k, v = random_inputs(2, 1, 8, 6, 11, 23, torch.float32, "cpu", seed=3)
    ks, vs = list(k.split([7, 10, 6], 2)), list(v.split([7, 10, 6], 2))
    kwargs = {"similarity": similarity}
    if lengths is not None:
        kwargs["memory_lengths"] = lengths
    eager = _read_and_grads(q, ks, vs, use, **kwargs)
    with RecordedOps() as recorder:
        through_op = _read_and_grads(q, ks, vs, use, **kwargs)
    assert "stm_kernels.memory_read.default" in recorder.names
    assert "stm_kernels.memory_read_backward.default" in recorder.names
    for a, b in zip(eager, through_op, strict=True):  # float32 rounding (L2's sums larger)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    expected = _reference_and_grads(q, k, v, use, similarity, lengths)
    for name, a, b in zip(["out", "lse", "q", "k", "v"], _joined(through_op), expected,
                          strict=True):
        assert relative_error(a, b) < 1e-5, name


def _joined(results):
    """[out, lse, dq, dk, dv] of _read_and_grads's results for three memory chunks."""
    out, lse, dq, *memory = results
    return [out, lse, dq, torch.cat(memory[:3], 2), torch.cat(memory[3:], 2)]


def _reference_and_grads(q, k, v, use, similarity, lengths):
    """_joined's list from the float64 read written out in plain torch (tests/reference.py)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse, _ = reference_read(q, k, v, similarity=similarity, lengths=lengths)
    grads = torch.autograd.grad(_loss(out, lse, use), [q, k, v], allow_unused=True)
    return [out.detach(), lse.detach(), *(torch.zeros_like(t) if g is None else g
                                          for g, t in zip(grads, (q, k, v), strict=True))]


def test_plain_eager_calls_skip_the_custom_op(monkeypatch):
    """Without gradients, with gradients, and in the backward: the implementation is called
    directly (the custom op's dispatch is the cost this route saves)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called in plain eager mode")
    monkeypatch.setattr(torch.ops.stm_kernels, "memory_read", refuse)
    monkeypatch.setattr(torch.ops.stm_kernels, "memory_read_backward", refuse)
    q, k, v = random_inputs(1, 1, 8, 6, 5, 12, torch.float32, "cpu", seed=4)
    with torch.no_grad():
        memory_read(q, k, v, backend="torch")
    q.requires_grad_()
    memory_read(q, k, v, backend="torch").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_lengths_of_a_tensor_subclass_take_the_custom_op(monkeypatch):
    """Plain q, k and v with lengths of a tensor subclass: the subclass (which may carry its
    own __torch_function__) sees the custom op, as for any other input, and the read is the
    float64 read of those lengths."""
    class Lengths(torch.Tensor):
        pass

    called = []
    real = torch.ops.stm_kernels.memory_read

    def recorded(*args):
        called.append(type(args[-1]))
        return real(*args)
    q, k, v = random_inputs(2, 1, 8, 6, 5, 12, torch.float32, "cpu", seed=8)
    lengths = torch.tensor([12, 7]).as_subclass(Lengths)
    monkeypatch.setattr(torch.ops.stm_kernels, "memory_read", recorded)
    with torch.no_grad():
        out = memory_read(q, k, v, memory_lengths=lengths, backend="torch")
    assert called
    expected = reference_read(q.double(), k.double(), v.double(), lengths=[12, 7])[0]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_dispatch_mode_sees_one_op():
    """FlopCounterMode, FakeTensorMode and the like see the read as stm_kernels::memory_read,
    not as the torch operations inside it."""
    q, k, v = random_inputs(1, 1, 8, 6, 5, 12, torch.float32, "cpu", seed=5)
    with torch.no_grad(), RecordedOps() as recorder:
        memory_read(q, k, v, backend="torch")
    assert [name for name in recorder.names if name != "aten.view.default"] == [
        "stm_kernels.memory_read.default"]



def test_a_jit_trace_records_the_custom_op():
    q, k, v = random_inputs(1, 1, 8, 6, 5, 12, torch.float32, "cpu", seed=6)
    traced = torch.jit.trace(lambda q, k, v: memory_read(q, k, v, backend="torch"), (q, k, v))
    assert "stm_kernels::memory_read" in str(traced.graph)
    torch.testing.assert_close(traced(q, k, v), memory_read(q, k, v, backend="torch"))


def test_a_function_mode_alone_sees_one_op():
    """A TorchFunctionMode with no dispatch mode on the stack sees the read as the custom op,
    once, not the eager route's torch functions; the values are the float64 read's."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = random_inputs(2, 1, 8, 6, 11, 23, torch.float32, "cpu", seed=5)
    with Seen() as seen:
        out = memory_read(q, k, v, backend="torch")
    assert seen.names.count("stm_kernels.memory_read") == 1, seen.names
    # beside the op only the input checks' tensor attributes (dim, numel, ...), no product
    assert not any(word in name for name in seen.names
                   for word in ("einsum", "softmax", "matmul", "mm", "exp")), seen.names
    assert relative_error(out, reference_read(q, k, v)[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fake_kernels_give_the_real_outputs_shapes_and_dtypes(dtype):
    """The custom ops' fake (meta) kernels, which torch.compile and FakeTensorMode trace
    with, against the outputs of the real ops: forward (out, lse) and backward (dq, dk, dv
    over the whole memory), two memory chunks, ragged lengths."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = random_inputs(2, 1, 8, 6, 11, 23, torch.float32, "cpu", seed=6)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ks, vs = list(k.split([9, 14], 2)), list(v.split([9, 14], 2))
    lengths = torch.tensor([23, 9])

    def run(q, ks, vs, lengths):
        out, lse = torch.ops.stm_kernels.memory_read(q, ks, vs, 0.3, False, "torch", lengths)
        grads = torch.ops.stm_kernels.memory_read_backward(
            torch.ones_like(out), torch.ones_like(lse), q, ks, vs, out, lse, 0.3, False,
            "torch", lengths)
        return [out, lse, *grads]

    real = run(q, ks, vs, lengths)
    with FakeTensorMode() as mode:
        fake = run(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else
                     [mode.from_tensor(c) for c in t] for t in (q, ks, vs, lengths)))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], real, fake, strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name


def test_meta_tensors_take_the_custom_op_and_its_fake_kernel(monkeypatch):
    """A read of meta tensors (shapes only, as shape inference runs it) goes through the custom
    op, whose fake kernel gives the outputs' shapes, not through a backend's kernels."""
    module = importlib.import_module("stm_kernels.memory_read")  # the package's name is the op
    called = []
    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *a: called.append(1) or forward(*a))
    q, k, v = (t.to("meta") for t in random_inputs(2, 1, 8, 6, 11, 23, torch.float32, "cpu",
                                                    seed=7))
    out, lse = memory_read(q, k, v, return_lse=True, backend="torch")
    assert not called
    assert (out.device.type, out.shape, lse.shape) == ("meta", (2, 6, 11), (2, 11))
