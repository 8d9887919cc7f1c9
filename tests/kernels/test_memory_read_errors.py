"""Bad input raises ValueError/TypeError naming the argument and the expected shape."""
import pytest
import torch

from stm_kernels import memory_read


def _inputs(B=2, Ck=8, Cv=6, HW=10, N=12):
    return torch.randn(B, Ck, HW), torch.randn(B, Ck, N), torch.randn(B, Cv, N)


q, k, v = _inputs()
CASES = [
    ("channels", (torch.randn(2, 7, 10), k, v), {}, ValueError, r"query_key must have shape \(B=2 or 1, Ck=8"),
    ("objects", (torch.randn(3, 8, 10), k, v), {}, ValueError, r"query_key must have shape \(B=2 or 1"),
    ("value objects", (q, k, torch.randn(3, 6, 12)), {}, ValueError, r"memory_value must have shape \(B, Cv, N\) = \(B=2, Cv, 12\)"),
    ("memory length", (q, k, torch.randn(2, 6, 11)), {}, ValueError, r"memory_value must have shape .*12"),
    ("value layout", (q, torch.randn(2, 8, 1, 3, 4), v), {}, ValueError, r"memory_value must have shape \(B, Cv, T, H, W\)"),
    ("query rank", (torch.randn(8, 10), k, v), {}, ValueError, r"query_key must have shape \(B or 1, Ck, HW\)"),
    ("memory rank", (q, torch.randn(2, 8, 3, 4), v), {}, ValueError, r"memory_key must have shape \(B, Ck, N\) or \(B, Ck, T, H, W\)"),
    ("integer query", (q.long(), k, v), {}, TypeError, r"query_key must be a floating-point tensor"),
    ("integer value", (q, k, v.int()), {}, TypeError, r"memory_value must be a floating-point"),
    ("mixed memory dtypes", (q, k, v.double()), {}, ValueError, r"must share one dtype .*got query_key torch.float32, memory_key torch.float32, memory_value torch.float64$"),
    ("not a tensor", (q.numpy(), k, v), {}, TypeError, r"query_key must be a torch.Tensor"),
    ("empty memory", (q, torch.randn(2, 8, 0), torch.randn(2, 6, 0)), {}, ValueError, r"memory_key is empty .*N"),
    ("empty query", (torch.randn(2, 8, 0), k, v), {}, ValueError, r"query_key is empty"),
    ("devices", (q, k.to("meta"), v), {}, ValueError, r"must be on one device"),
    ("similarity", (q, k, v), {"similarity": "cos"}, ValueError, r"similarity must be one of"),
    ("backend", (q, k, v), {"backend": "cuda"}, ValueError, r"backend must be one of"),
    ("scale", (q, k, v), {"scale": float("nan")}, TypeError, r"scale must be a finite"),
    ("scale overflows float32", (q, k, v), {"scale": 1e308}, ValueError, r"scale=1e\+308 overflows the read's compute dtype torch.float32 \(\|scale\| must be at most"),
    ("negative scale overflows", (q, k, v), {"scale": -3e38}, ValueError, r"overflows the read's compute dtype torch.float32"),
    ("xmem scale overflows float16", (q.half(), k.half(), v.half()), {"scale": 1e5, "similarity": "xmem"}, ValueError, r"overflows the read's compute dtype torch.float16"),
    ("boolean scale", (q, k, v), {"scale": True}, TypeError, r"scale must be a finite Python number"),
    ("triton float64", (q.double(), k.double(), v.double()), {"backend": "triton"}, TypeError, r"backend='triton' supports float16, bfloat16 and float32"),
]


@pytest.mark.parametrize("args, kwargs, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        memory_read(*args, **kwargs)


@pytest.mark.parametrize("query_dtype, memory_dtype", [(torch.float16, torch.float32),
                                                       (torch.float64, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_mixed_query_and_memory_dtypes_are_refused_not_promoted(query_dtype, memory_dtype,
                                                                backend):
    """As scaled_dot_product_attention: an fp16 query against an fp32 memory is a ValueError
    naming each argument's dtype (it used to read, and return, fp32 silently)."""
    with pytest.raises(ValueError, match=rf"must share one dtype .*got query_key "
                                         rf"{query_dtype}, memory_key {memory_dtype}, "
                                         rf"memory_value {memory_dtype}$"):
        memory_read(q.to(query_dtype), k.to(memory_dtype), v.to(memory_dtype), backend=backend)
    with pytest.raises(ValueError, match=r"share one dtype"):
        memory_read(q.to(query_dtype), k.to(memory_dtype), v.to(memory_dtype), top_k=3,
                    backend=backend)


def test_mixed_dtypes_name_every_chunk_and_the_xmem_inputs():
    chunks = [k, k.double()]
    with pytest.raises(ValueError, match=r"got query_key torch.float32, memory_key\[0\] "
                                         r"torch.float32, memory_key\[1\] torch.float64, "
                                         r"memory_value \(2 chunks\) torch.float32$"):
        memory_read(q, chunks, [v, v])
    shrinkage = 1 + torch.rand(2, 1, 12)
    with pytest.raises(ValueError, match=r"got query_key torch.float16, memory_key "
                                         r"torch.float16, memory_value torch.float16, "
                                         r"shrinkage torch.float32, selection torch.float16$"):
        memory_read(q.half(), k.half(), v.half(), similarity="xmem", shrinkage=shrinkage,
                    selection=torch.rand(2, 8, 10).half())
    with pytest.raises(ValueError, match=r"selection torch.float64$"):
        memory_read(q, k, v, similarity="xmem", selection=torch.rand(2, 8, 10).double())


def test_a_large_scale_in_float64_is_accepted_and_reads_the_argmax():
    """1e300 overflows float32, not float64: the softmax is then a hard maximum."""
    qd, kd, vd = q.double(), k.double(), v.double()
    out = memory_read(qd, kd, vd, scale=1e300, backend="torch")
    best = torch.einsum("bci,bcj->bij", qd, kd).argmax(2)  # (B, HW)
    expected = torch.gather(vd, 2, best.unsqueeze(1).expand(-1, vd.shape[1], -1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_triton_backend_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    from stm_kernels.backends.triton import calls
    monkeypatch.setattr(calls, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        memory_read(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("output", ["out", "lse"])
@pytest.mark.parametrize("similarity", ["dot", "l2", "xmem"])
def test_double_backward_of_the_fused_backends_is_a_one_line_error(backend, output, similarity):
    """A gradient of a gradient (create_graph=True, then grad again) raises one line saying it
    is unsupported, not torch's internal "no autograd formula was registered"."""
    query = q.clone().requires_grad_()
    memory = [t.clone().requires_grad_() for t in (k, v)]
    out, lse = memory_read(query, *memory, backend=backend, return_lse=True,
                           similarity=similarity)
    loss = (out.square().sum() if output == "out" else lse.square().sum())
    first = torch.autograd.grad(loss, [query, *memory], create_graph=True, allow_unused=True)
    assert first[0] is not None
    with pytest.raises(RuntimeError, match=r"^double backward \(higher-order gradients\) of "
                                           r"stm_kernels.memory_read is not supported") as caught:
        torch.autograd.grad(first[0].sum(), query)
    assert "\n" not in str(caught.value)
    out = memory_read(query, *memory, backend=backend)  # a plain backward is unaffected
    out.sum().backward()
    assert query.grad is not None


@pytest.mark.parametrize("options", [
    dict(backend="naive"), dict(backend="naive", similarity="l2"),
    dict(backend="naive", similarity="xmem"), dict(backend="naive", memory_lengths=[5, 3]),
    dict(backend="torch", top_k=3), dict(backend="torch", top_k=3, similarity="l2")],
    ids=["naive-dot", "naive-l2", "naive-xmem", "naive-ragged", "top3-dot", "top3-l2"])
def test_double_backward_through_the_naive_and_top_k_reads_is_right(options):
    """Where a second derivative is supported (the naive read: plain autograd; a top-k read:
    autograd through the gathered positions), gradgradcheck holds it to finite differences in
    float64, for out and lse, with respect to the query and the memory."""
    generator = torch.Generator().manual_seed(21)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in ((2, 4, 6), (2, 4, 5), (2, 3, 5))]

    def read(query, keys, values):
        return memory_read(query, keys, values, return_lse=True, **options)

    assert torch.autograd.gradgradcheck(read, inputs)


S, E = torch.rand(2, 1, 12) + 1, torch.rand(2, 8, 10)  # XMem's shrinkage and selection
SHARE = ("the read's floating-point inputs must share one dtype (it does not promote; cast "
         "them explicitly, e.g. query_key.to(memory_key.dtype)); ")
WHOLE_MESSAGES = [
    ("query rank", (torch.randn(8, 10), k, v), {}, ValueError,
     "query_key must have shape (B or 1, Ck, HW) or (B or 1, Ck, H, W); got shape (8, 10)"),
    ("memory length", (q, k, torch.randn(2, 6, 11)), {}, ValueError,
     "memory_value must have shape (B, Cv, N) = (B=2, Cv, 12) to match memory_key (2, 8, 12); "
     "got shape (2, 6, 11)"),
    ("shrinkage alone", (q, k, v), {"shrinkage": torch.rand(2, 1, 12)}, ValueError,
     "shrinkage and selection belong to similarity='xmem'; got similarity='dot'"),
    ("selection alone", (q, k, v), {"selection": torch.rand(2, 8, 10), "similarity": "l2"},
     ValueError, "shrinkage and selection belong to similarity='xmem'; got similarity='l2'"),
    ("second key chunk's dtype", (q, [k, k.int()], [v, v]), {}, TypeError,
     "memory_key[1] must be a floating-point tensor (float16, bfloat16, float32 or float64); "
     "got torch.int32"),
    ("second value chunk's channels", (q, [k, k], [v, torch.randn(2, 5, 12)]), {}, ValueError,
     "memory_value[1] must have shape (B, Cv, N) = (B=2, Cv, 12) to match memory_key[1] "
     "(2, 8, 12); got shape (2, 5, 12)"),
    ("xmem shrinkage's dtype", (q, k, v), {"similarity": "xmem", "shrinkage": S.double(),
                                           "selection": E}, ValueError,
     SHARE + "got query_key torch.float32, memory_key torch.float32, memory_value "
     "torch.float32, shrinkage torch.float64, selection torch.float32"),
    ("xmem shrinkage chunk's dtype", (q, [k[..., :5], k[..., 5:]], [v[..., :5], v[..., 5:]]),
     {"similarity": "xmem", "shrinkage": [S[..., :5], S[..., 5:].double()], "selection": E},
     ValueError, SHARE + "got query_key torch.float32, memory_key (2 chunks) torch.float32, "
     "memory_value (2 chunks) torch.float32, shrinkage[0] torch.float32, shrinkage[1] "
     "torch.float64, selection torch.float32"),
    ("value frames' layout", (q, torch.randn(2, 8, 1, 3, 4), torch.randn(2, 6, 1, 3, 5)), {},
     ValueError, "memory_value must have shape (B, Cv, T, H, W) = (B=2, Cv, 1, 3, 4) to match "
     "memory_key (2, 8, 1, 3, 4); got shape (2, 6, 1, 3, 5)"),
    ("memory not a tensor", (q, 3, v), {}, TypeError,
     "memory_key must be a torch.Tensor or a non-empty list of tensors (memory chunks); got "
     "int"),
    ("query not a tensor", (q.numpy(), k, v), {}, TypeError,
     "query_key must be a torch.Tensor; got ndarray"),
    ("empty memory", (q, torch.randn(2, 8, 0), torch.randn(2, 6, 0)), {}, ValueError,
     "memory_key is empty (shape (2, 8, 0)); every dimension, including the number of memory "
     "positions N, must be at least 1"),
    ("second key chunk's objects", (q, [k, k[:1]], [v, v]), {}, ValueError,
     "memory_key[1] must have shape (B, Ck, N) or (B, Ck, T, H, W) with B=2, Ck=8; got shape "
     "(1, 8, 12)"),
]


@pytest.mark.parametrize("args, kwargs, error, message", [c[1:] for c in WHOLE_MESSAGES],
                         ids=[c[0] for c in WHOLE_MESSAGES])
def test_whole_messages_name_the_argument_and_chunk(args, kwargs, error, message):
    """The whole message, word for word: the argument (and the chunk of a list) it names, the
    shape it expects, what it got; each of XMem's inputs alone is refused outside XMem."""
    with pytest.raises(error) as caught:
        memory_read(*args, **kwargs)
    assert str(caught.value) == message


def test_a_scale_above_float16_is_read_where_the_scores_are_float32():
    """A float16 read's scores are made in float32 (the scale applied to the query there), so
    a scale of 1e5, past what float16 holds after _LARGEST_SCALE_FACTOR, is accepted (only
    XMem, which folds the scale into the float16 keys, refuses it) and the torch backend
    reads it as float64 does."""
    from tests.reference import reference_read
    half = [t[:, :, :4].half() * 0.01 for t in (q, k, v)]  # scores up to about 1e-2
    out = memory_read(*half, scale=1e5, backend="torch")
    expected = reference_read(*(t.double() for t in half), scale=1e5)[0]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), expected, rtol=4e-3, atol=1e-7)


def test_the_largest_scale_the_message_allows_is_accepted():
    """The overflow check's bound is inclusive ("at most"): that very scale reads (zero
    query: every score 0, so the read is the mean of the values), one float32 step above it
    is refused."""
    import math

    from stm_kernels import inputs
    largest = torch.finfo(torch.float32).max / inputs._LARGEST_SCALE_FACTOR
    out = memory_read(torch.zeros_like(q), k, v, scale=largest, backend="torch")
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out))
    with pytest.raises(ValueError, match="overflows"):
        memory_read(q, k, v, scale=math.nextafter(largest, math.inf), backend="torch")


def test_top_k_is_a_positive_integer_within_the_triton_backends_cap():
    """top_k: 1 and above (not a bool), capped at N; above TRITON_MAX_TOP_K the triton backend
    refuses it word for word, at the cap it takes it, and the other backends take any."""
    from stm_kernels import backends, inputs
    cap = backends.TRITON_MAX_TOP_K
    assert inputs.checked_top_k(1, "torch", 10) == 1
    assert inputs.checked_top_k(cap + 5, "torch", cap + 10) == cap + 5
    assert inputs.checked_top_k(cap, "triton", cap + 10) == cap
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError) as caught:
            inputs.checked_top_k(bad, "torch", 10)
        assert str(caught.value) == f"top_k must be a positive integer or None; got {bad!r}"
    with pytest.raises(ValueError) as caught:
        inputs.checked_top_k(cap + 1, "triton", cap + 10)
    assert str(caught.value) == (f"top_k={cap + 1} is above the {cap} the triton backend "
                                 "supports; use backend='torch'")
