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
    ("mixed memory dtypes", (q, k, v.double()), {}, TypeError, r"memory_key and memory_value must share one dtype"),
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


@pytest.mark.parametrize("query_dtype, memory_dtype", [(torch.float64, torch.float32),
                                                       (torch.float32, torch.float16)])
def test_query_is_cast_to_the_memory_dtype(query_dtype, memory_dtype):
    """The documented cast: the read runs in the memory's dtype, the query's gradient comes
    back in the query's own dtype and equals the gradient through an explicit cast."""
    query = q.to(query_dtype).clone().requires_grad_()
    cast = q.to(memory_dtype).clone().requires_grad_()
    memory = (k.to(memory_dtype), v.to(memory_dtype))
    out = memory_read(query, *memory, backend="torch")
    expected = memory_read(cast, *memory, backend="torch")
    assert out.dtype == memory_dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.randn(out.shape).to(memory_dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert query.grad.dtype == query_dtype
    torch.testing.assert_close(query.grad, cast.grad.to(query_dtype), rtol=0, atol=0)


def test_a_large_scale_in_float64_is_accepted_and_reads_the_argmax():
    """1e300 overflows float32, not float64: the softmax is then a hard maximum."""
    qd, kd, vd = q.double(), k.double(), v.double()
    out = memory_read(qd, kd, vd, scale=1e300, backend="torch")
    best = torch.einsum("bci,bcj->bij", qd, kd).argmax(2)  # (B, HW)
    expected = torch.gather(vd, 2, best.unsqueeze(1).expand(-1, vd.shape[1], -1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_triton_backend_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    from stm_kernels.backends.triton import launch as memory_read_triton
    monkeypatch.setattr(memory_read_triton, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        memory_read(q, k, v, backend="triton")
