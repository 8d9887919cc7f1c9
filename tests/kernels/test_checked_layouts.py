"""inputs.prepared's fast path: a call whose tensors have the shapes, dtypes and devices of
one that passed its checks (same similarity and scale) skips the checks those decide. Each
change the checks would refuse is refused after a good call of the same layout too, with the
error the checks give; the fast path returns the new call's tensors, never the cached call's."""
import math

import pytest
import torch

from stm_kernels import inputs, memory_read
from tests.reference import reference_read

B, CK, CV, HW, N = 2, 8, 12, 6, 10


def _tensors(dtype=torch.float32, device="meta", q_shape=(1, CK, HW), n=N):
    return (torch.empty(q_shape, dtype=dtype, device=device),
            torch.empty((B, CK, n), dtype=dtype, device=device),
            torch.empty((B, CV, n), dtype=dtype, device=device))


def _random(seed):
    """q, k, v of _tensors's layout on the CPU, unit normals."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) for shape in
            ((1, CK, HW), (B, CK, N), (B, CV, N)))


@pytest.fixture
def checks(monkeypatch):
    """The calls of flatten_checked (the checks) during the test, nothing cached before."""
    monkeypatch.setattr(inputs, "_checked_layouts", {})
    counted = []
    real = inputs.flatten_checked

    def flatten_checked(*args, **kwargs):
        counted.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs, "flatten_checked", flatten_checked)
    return counted


def test_a_repeated_layout_is_checked_once_and_reads_the_new_tensors(checks):
    first = inputs.prepared(*_tensors(), backend="torch")
    q, k, v = _tensors()
    again = inputs.prepared(q, k, v, backend="torch")
    assert len(checks) == 1
    assert again.q is q and again.keys[0] is k and again.values[0] is v
    assert (again.query_spatial, again.scale, again.l2, again.backend) == (
        first.query_spatial, 1 / math.sqrt(CK), False, "torch")
    chunks = inputs.prepared(q, [k[:, :, :4], k[:, :, 4:]], [v[:, :, :4], v[:, :, 4:]],
                             backend="torch")
    chunks_again = inputs.prepared(q, [k[:, :, :4], k[:, :, 4:]], [v[:, :, :4], v[:, :, 4:]],
                                   backend="torch")
    assert len(checks) == 2 and [t.shape[2] for t in chunks_again.keys] == [4, 6]
    assert chunks.query_spatial == chunks_again.query_spatial


@pytest.mark.parametrize("change, expected", [
    (dict(q_shape=(1, CK, 2, 3)), dict(query_spatial=(2, 3))),
    (dict(scale=0.5), dict(scale=0.5)),
    (dict(scale=2), dict(scale=2.0)),
    (dict(similarity="l2"), dict(l2=True)),
    (dict(dtype=torch.float16), dict()),
    (dict(n=3), dict()),
], ids=["spatial query", "scale", "integer scale", "l2", "dtype", "memory size"])
def test_each_valid_change_is_checked_and_gets_its_own_answer(checks, change, expected):
    inputs.prepared(*_tensors(), backend="torch")
    options = {name: change.pop(name) for name in ("scale", "similarity") if name in change}
    call = inputs.prepared(*_tensors(**change), backend="torch", **options)
    assert len(checks) == 2
    for name, value in dict(dict(query_spatial=(HW,), scale=1 / math.sqrt(CK), l2=False),
                            **expected).items():
        assert getattr(call, name) == value, name
    assert inputs.prepared(*_tensors(**change), backend="torch", **options).scale == call.scale
    assert len(checks) == 2  # remembered since


def _bad_calls():
    """(name, arguments of a call the checks refuse), each one change from _tensors()."""
    q, k, v = _tensors()
    half = torch.empty((B, CV, N), dtype=torch.float16, device="meta")
    return {
        "query dtype": (q.half(), k, v),
        "value dtype": (q, k, half),
        "query channels": (torch.empty(1, CK + 1, HW, device="meta"), k, v),
        "query objects": (torch.empty(B + 1, CK, HW, device="meta"), k, v),
        "query dims": (torch.empty(CK, HW, device="meta"), k, v),
        "value positions": (q, k, torch.empty(B, CV, N + 1, device="meta")),
        "value objects": (q, k, torch.empty(B + 1, CV, N, device="meta")),
        "empty memory": (q, *_tensors(n=0)[1:]),
        "integer memory": (q, k.to(torch.int32), v),
        "device": (torch.empty(1, CK, HW), k, v),
        "chunk counts": (q, [k, k], [v]),
        "chunk not a tensor": (q, [k, None], [v, v]),
        "empty chunk list": (q, [], []),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_each_refused_change_is_refused_after_a_good_call(checks, monkeypatch, case):
    arguments = _bad_calls()[case]
    with pytest.raises((TypeError, ValueError)) as uncached:
        inputs.prepared(*arguments, backend="torch")
    inputs.prepared(*_tensors(), backend="torch")  # the good layout, now remembered
    inputs.prepared(*_tensors(), backend="torch")
    with pytest.raises(uncached.type) as cached:
        inputs.prepared(*arguments, backend="torch")
    assert str(cached.value) == str(uncached.value)


@pytest.mark.parametrize("options", [
    dict(similarity="cosine"), dict(similarity=["dot"]), dict(scale=float("nan")),
    dict(scale=float("inf")), dict(scale=True), dict(scale=1e39), dict(scale="0.1"),
    dict(scale=torch.tensor(0.1)), dict(shrinkage=torch.empty(B, 1, N, device="meta")),
    dict(backend="cuda"), dict(top_k=0), dict(memory_lengths=[N]),
    dict(memory_lengths=torch.ones(B, dtype=torch.float32, device="meta")),
], ids=["similarity", "similarity list", "nan scale", "inf scale", "bool scale",
        "overflowing scale", "string scale", "tensor scale", "shrinkage with dot", "backend",
        "top_k", "lengths shape", "float lengths"])
def test_each_refused_option_is_refused_after_a_good_call(checks, options):
    with pytest.raises((TypeError, ValueError)) as uncached:
        inputs.prepared(*_tensors(), backend="torch", **options)
    inputs.prepared(*_tensors(), backend="torch")
    # a neighbour of the refused option, remembered (1e38 is in float32's range)
    inputs.prepared(*_tensors(), backend="torch", scale=1e38 if "scale" in options else None,
                    similarity="l2" if "similarity" in options else "dot")
    with pytest.raises(uncached.type) as cached:
        inputs.prepared(*_tensors(), backend="torch", **options)
    assert str(cached.value) == str(uncached.value)


def test_lengths_are_checked_on_every_call(checks):
    """The lengths' values are read on every call (CPU tensors): a good call does not let bad
    values through."""
    q, k, v = _tensors(device="cpu")
    inputs.prepared(q, k, v, backend="torch", memory_lengths=torch.tensor([N, 1]))
    for bad in ([N + 1, 1], [0, 1]):
        with pytest.raises(ValueError, match="memory_lengths"):
            inputs.prepared(q, k, v, backend="torch", memory_lengths=torch.tensor(bad))
    assert len(checks) == 1


def test_a_parameter_or_subclass_is_checked_every_time(checks):
    q, k, v = _tensors()
    parameter = torch.nn.Parameter(k)
    for _ in range(2):
        call = inputs.prepared(q, parameter, v, backend="torch")
        assert call.keys[0] is parameter
    assert len(checks) == 2


def test_a_parameter_query_or_a_scale_of_another_type_is_checked_every_time(checks):
    """A query that is not a plain tensor, or a scale that is not a float or int (a numpy
    float), is checked on every call: neither is a key of the fast path."""
    import numpy

    q, k, v = _tensors()
    for _ in range(2):
        inputs.prepared(torch.nn.Parameter(q), k, v, backend="torch")
    assert len(checks) == 2
    for _ in range(2):
        inputs.prepared(q, k, v, scale=numpy.float64(0.5), backend="torch")
    assert len(checks) == 4


def test_a_memory_in_chunks_is_checked_chunk_by_chunk_after_a_good_call(checks):
    """A good call with two key chunks does not let a later call with a second chunk of
    other channels through: the chunks' shapes are part of the layout."""
    q, k, v = _tensors()
    inputs.prepared(q, [k, k], [v, v], backend="torch")
    with pytest.raises(ValueError) as caught:
        inputs.prepared(q, [k, k[:, :CK - 1]], [v, v], backend="torch")
    assert str(caught.value).startswith("memory_key[1] must have shape")
    assert len(checks) == 2


def test_keys_in_chunks_with_the_value_in_one_tensor_read_alike_on_every_call(checks):
    """Chunks on one side and a tensor on the other is a good call, checked every time (not
    a key of the fast path), and read alike on every call."""
    q, k, v = _random(1)
    expected = reference_read(q.double(), k.double(), v.double())[0]
    for keys, values in (([k], v), (k, [v])):
        for _ in range(2):
            out = memory_read(q, keys, values, backend="torch")
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(checks) == 4


def test_xmem_is_augmented_on_every_call(checks):
    """XMem never takes the fast path: its query and keys are augmented (without a selection
    or shrinkage, 2 Ck channels: [2 q, -1] . [k, k^2]) on every call, the read equal to the
    float64 one."""
    q, k, v = _random(0)
    for _ in range(2):
        call = inputs.prepared(q, k, v, similarity="xmem", backend="torch")
        assert call.q.shape[1] == call.keys[0].shape[1] == 2 * CK
    assert len(checks) == 2
    out = memory_read(q, k, v, similarity="xmem", backend="torch")
    # XMem without shrinkage or selection: -(|k|^2 - 2 q.k) / sqrt(Ck), the query's own term
    # left out
    scores = (2 * torch.einsum("ci,bcj->bij", q[0].double(), k.double())
              - k.double().square().sum(1)[:, None, :]) / math.sqrt(CK)
    expected = torch.einsum("bij,bcj->bci", scores.softmax(-1), v.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_nothing_is_remembered_while_torch_compile_traces(checks, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inputs.prepared(*_tensors(), backend="torch")
    assert inputs._checked_layouts == {}


def test_the_remembered_layouts_are_bounded(checks, monkeypatch):
    monkeypatch.setattr(inputs, "CHECKED_LAYOUTS", 3)
    for n in range(1, 6):
        inputs.prepared(*_tensors(n=n), backend="torch")
        assert len(inputs._checked_layouts) <= 3


def test_lengths_are_handed_on_as_int64_and_one_chunk_without_a_copy():
    """The backends take the lengths as (B,) int64, whatever integer dtype the caller gave;
    a memory of one chunk is that chunk (no copy), of several their concatenation."""
    q, k, v = _tensors(device="cpu")
    call = inputs.prepared(q, k, v, memory_lengths=torch.tensor([N, 3], dtype=torch.int32),
                           backend="torch")
    assert call.lengths.dtype == torch.int64 and call.lengths.tolist() == [N, 3]
    chunks = [torch.arange(6.0).view(1, 2, 3), torch.arange(6.0, 10.0).view(1, 2, 2)]
    assert inputs.concatenated(chunks[:1]) is chunks[0]
    torch.testing.assert_close(inputs.concatenated(chunks), torch.cat(chunks, dim=2))
