"""torch.func over the layouts the read's vmap rules fold into its objects (memory_read.py's
_TransformedRead.vmap and _TransformedBackward.vmap): ragged memories under grad and jacrev, a
query per object, keys or values mapped alone, a query mapped along a later dimension, L2, a
gradient through the log-sum-exp alone, and a second derivative refused. Each against the
float64 read written out in plain torch (test_memory_read_transforms.reference), on the torch
backend in float64."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from stm_kernels import memory_read
from stm_kernels._buffers import poison_outputs
from stm_kernels.memory_read import DOUBLE_BACKWARD_UNSUPPORTED
from tests.helpers import relative_error
from tests.kernels.test_memory_read_transforms import _inputs as transforms_inputs
from tests.kernels.test_memory_read_transforms import _mapped as _stacked, reference

BOUND = 1e-10


def _inputs(B=2, Bq=1, Ck=5, Cv=3, HW=6, N=9, seed=0):
    """q, k, v in float64: test_memory_read_transforms's inputs without their tangents."""
    return transforms_inputs(torch.float64, B, Bq, Ck, Cv, HW, N, seed)[:3]


def _close(actual, expected, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert relative_error(actual, expected) < BOUND, what


def _both(read):
    """read's (out, lse) as one flat vector, for jacobians."""
    return lambda *args: torch.cat([t.flatten() for t in read(*args)])


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_grad_and_jacrev_of_a_ragged_read(similarity):
    """A ragged memory's lengths reach the backward under torch.func: grad and jacrev (the
    backward under vmap) with respect to the query, keys and values, one query per object."""
    q, k, v = _inputs(Bq=2, seed=1)
    lengths = torch.tensor([9, 4])
    weights = _inputs(Bq=2, Ck=3, seed=2)[0]  # (2, Cv, HW)

    def ragged_read(q, k, v, read=memory_read):
        if read is memory_read:
            return read(q, k, v, similarity=similarity, backend="torch",
                        memory_lengths=lengths, return_lse=True)
        return read(q, k, v, similarity=similarity, lengths=lengths)

    def loss(q, k, v, read=memory_read):
        out, lse = ragged_read(q, k, v, read)
        return (out * weights).sum() + lse.square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    expected = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, reference)
    for name, a, b in zip("qkv", grads, expected, strict=True):
        _close(a, b, f"grad {name}")
    assert grads[1][:, :, 4:][1].abs().max() == 0  # past object 1's length: no gradient
    with poison_outputs():
        jacobians = torch.func.jacrev(_both(ragged_read), argnums=(0, 1, 2))(q, k, v)
    expected = torch.func.jacrev(_both(lambda *a: ragged_read(*a, reference)),
                                 argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", jacobians, expected, strict=True):
        _close(a, b, f"jacrev {name}")


@pytest.mark.parametrize("query", ["per object", "shared"])
def test_vmap_of_grad_over_mapped_queries(query):
    """vmap(grad) over a stack of queries (the backward's vmap rule with the query mapped): a
    query per object keeps its own gradient, a shared one gets the sum over the objects."""
    q, k, v = _inputs(Bq=2 if query == "per object" else 1, seed=3)
    qs = _stacked(q, 3, 0, 4)

    def loss(q, read=memory_read):
        out, lse = read(q, k, v, backend="torch", return_lse=True) if read is memory_read \
            else read(q, k, v)
        return out.square().sum() + lse.sum()

    grads = torch.func.vmap(torch.func.grad(loss))(qs)
    for index in range(3):
        _close(grads[index], torch.func.grad(loss)(qs[index], reference), f"index {index}")


def test_vmap_of_a_vjp_with_the_lse_cotangent_shared():
    """vmap over the output's cotangents with one log-sum-exp cotangent for all of them (the
    backward's vmap rule given an unmapped lse cotangent)."""
    q, k, v = _inputs(seed=5)
    out, vjp = torch.func.vjp(lambda q, k, v: memory_read(q, k, v, backend="torch",
                                                          return_lse=True), q, k, v)
    expected_out, expected_vjp = torch.func.vjp(reference, q, k, v)
    grad_lse = torch.randn(out[1].shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(6))
    grads_out = _stacked(out[0], 3, 0, 7)
    grads = torch.func.vmap(lambda g: vjp((g, grad_lse)))(grads_out)
    for index in range(3):
        expected = expected_vjp((grads_out[index], grad_lse))
        for name, a, b in zip("qkv", grads, expected, strict=True):
            _close(a[index], b, f"index {index} {name}")


@pytest.mark.parametrize("mapped", ["keys", "values", "query along dim 1",
                                    "query along dim 1, memory", "memory, query per object",
                                    "memory, as many objects as key channels"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_vmap_folds_each_layout_into_the_objects(mapped, similarity):
    """vmap of the forward over what the rule folds: the keys or the values mapped alone (the
    other shared by every index), a shared query mapped along its second dimension (alone, and
    with the memory), the memory mapped under an unmapped query per object, and a shared query
    expanded to B = Ck objects."""
    Ck = 2 if mapped.endswith("key channels") else 5
    Bq = 2 if mapped.endswith("per object") else 1
    q, k, v = _inputs(B=2, Bq=Bq, Ck=Ck, seed=8)
    V = 3
    stacks = {"q": _stacked(q, V, 1, 9) if mapped.startswith("query") else None,
              "k": _stacked(k, V, 0, 10) if mapped == "keys" or "memory" in mapped else None,
              "v": _stacked(v, V, 0, 11) if mapped == "values" or "memory" in mapped else None}
    if mapped.endswith("key channels"):
        stacks["q"] = _stacked(q, V, 0, 12)
    names = [name for name, stack in stacks.items() if stack is not None]
    in_dims = tuple(1 if name == "q" and mapped.startswith("query") else 0 for name in names)

    def parts(given):
        fixed = dict(q=q, k=k, v=v)
        fixed.update(zip(names, given, strict=True))
        return fixed["q"], fixed["k"], fixed["v"]

    def read(*given):
        return memory_read(*parts(given), similarity=similarity, backend="torch",
                           return_lse=True)

    out, lse = torch.func.vmap(read, in_dims=in_dims)(*(stacks[name] for name in names))
    for index in range(V):
        given = [stacks[name].select(dim, index) for name, dim in zip(names, in_dims,
                                                                        strict=True)]
        expected = reference(*parts(given), similarity=similarity)
        _close(out[index], expected[0], f"out {index}")
        _close(lse[index], expected[1], f"lse {index}")


def test_grad_through_the_lse_alone():
    """torch.func.grad of a loss of the log-sum-exp alone (the output's cotangent None)."""
    q, k, v = _inputs(seed=13)

    def loss(q, k, read=memory_read):
        lse = read(q, k, v, backend="torch", return_lse=True)[1] if read is memory_read \
            else read(q, k, v)[1]
        return lse.square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(q, k)
    expected = torch.func.grad(loss, argnums=(0, 1))(q, k, reference)
    for name, a, b in zip("qk", grads, expected, strict=True):
        _close(a, b, name)


def test_a_second_derivative_under_torch_func_is_refused_in_one_line():
    q, k, v = _inputs(seed=14)

    def loss(q):
        return memory_read(q, k, v, backend="torch").square().sum()

    with pytest.raises(RuntimeError) as raised:
        torch.func.grad(lambda q: torch.func.grad(loss)(q).sum())(q)
    assert str(raised.value) == DOUBLE_BACKWARD_UNSUPPORTED


class _NoGradient(torch.autograd.Function):
    """x unchanged, with no gradient flowing back through it (None, not zeros)."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None


def test_a_read_whose_outputs_return_no_gradient_gives_none_to_its_inputs():
    """Under torch.func.grad, a read whose output's gradient comes back as None (and whose
    lse is unused) hands None to every input: the loss's gradient is its other term's."""
    q, k, v = _inputs(seed=15)

    def loss(q):
        out = memory_read(q, k, v, backend="torch")
        return _NoGradient.apply(out).sum() + q.square().sum()

    _close(torch.func.grad(loss)(q), 2 * q, "grad")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                            "ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_a_trace_inside_a_forward_mode_level_records_the_custom_op():
    """torch.jit.trace within a forward-AD dual level (no dual tensor given to the read)
    records the read as the custom op, as outside one, not the ops of its transform path."""
    q, k, v = _inputs(seed=16)
    with fwAD.dual_level():
        traced = torch.jit.trace(lambda q: memory_read(q, k, v, backend="torch"), (q,),
                                 check_trace=False)
    assert "stm_kernels::memory_read" in str(traced.graph)
    _close(traced(q), reference(q, k, v)[0], "traced read")
