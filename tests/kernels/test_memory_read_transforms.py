"""memory_read under torch.func (grad, jvp, vmap, jacrev, jacfwd), forward-mode AD (dual
tensors) and autocast, on every backend, against float64 reads written here in plain torch
(einsum and softmax): right derivatives, or a one-line error, never a silent zero."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from stm_kernels import memory_read, memory_usage, torch_common
from stm_kernels._buffers import poison_outputs
from stm_kernels.memory_read import DOUBLE_BACKWARD_UNSUPPORTED, FORWARD_MODE_UNSUPPORTED
from tests.helpers import TOLERANCE, relative_error, skip_unless_runnable
from tests.reference import reference_read, reference_usage

BACKENDS = ["naive", "torch", "triton"]
# float64 for naive and torch; the Triton kernels (interpreter) in float32 against float64
DTYPE = {"naive": torch.float64, "torch": torch.float64, "triton": torch.float32}
BOUND = {torch.float64: 1e-10, torch.float32: 2e-5}


def reference(q, k, v, *, scale=None, similarity="dot", lengths=None, shrinkage=None,
              selection=None, top_k=None):
    """(out (B, Cv, HW), lse (B, HW)) of q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N), in plain
    torch: the scores, then softmax over the memory (over each query's top_k scores)."""
    B, Ck, N = k.shape
    scale = 1 / math.sqrt(Ck) if scale is None else scale
    q = q.expand(B, -1, -1)
    if similarity == "xmem" and selection is not None:  # -s_j scale sum_c e_ic (q_ic - k_jc)^2
        difference = q.unsqueeze(3) - k.unsqueeze(2)  # (B, Ck, HW, N)
        scores = -(selection.expand(B, -1, -1).unsqueeze(3) * difference.square()).sum(1)
    else:
        scores = torch.einsum("bci,bcj->bij", q, k)
        if similarity != "dot":  # l2, and xmem without a selection: 2 q.k - |k|^2
            scores = 2 * scores - k.square().sum(1).unsqueeze(1)
    if shrinkage is not None:
        scores = scores * shrinkage.reshape(B, 1, N)
    scores = scores * scale
    if lengths is not None:
        past = torch.arange(N) >= torch.as_tensor(lengths).unsqueeze(1)  # (B, N)
        scores = scores.masked_fill(past.unsqueeze(1), float("-inf"))
        v = v.masked_fill(past.unsqueeze(1), 0)
    if top_k is not None:
        scores, picked = scores.topk(top_k, dim=2)  # (B, HW, top_k)
        gathered = torch.gather(v.unsqueeze(2).expand(-1, -1, picked.shape[1], -1), 3,
                                picked.unsqueeze(1).expand(-1, v.shape[1], -1, -1))
        out = torch.einsum("bik,bcik->bci", torch.softmax(scores, 2), gathered)
    else:
        out = torch.einsum("bij,bcj->bci", torch.softmax(scores, 2), v)
    return out, torch.logsumexp(scores, 2)


def _inputs(dtype, B=2, Bq=1, Ck=16, Cv=8, HW=37, N=53, seed=0):
    """q, k, v and tangents dq, dk, dv (float64, then cast)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(Bq, Ck, HW), (B, Ck, N), (B, Cv, N)] * 2
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape in shapes]


def _check(actual, expected, dtype, what):
    for name, a, b in zip(["out", "lse"], actual, expected, strict=True):
        assert a.shape == b.shape and torch.isfinite(a).all(), f"{what} {name}"
        error = relative_error(a, b)
        assert error < BOUND[dtype], f"{what} {name}: relative error {error:.1e}"


def _dual_read(read, primals, tangents):
    """(outputs, tangents) of read through torch.autograd.forward_ad's dual tensors."""
    with fwAD.dual_level():
        outputs = read(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)])
        unpacked = [fwAD.unpack_dual(output) for output in outputs]
    return [u.primal for u in unpacked], [u.tangent for u in unpacked]


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tangents_equal_the_float64_reads(backend, similarity, api):
    """torch.func.jvp and dual tensors give the tangent of out and lse on every backend (on
    the fused backends they gave a zero tangent, or none), here with a shared query and a
    memory in two chunks of ragged sizes; the Triton outputs are poisoned with NaN first."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, dq, dk, dv = _inputs(dtype, Bq=1 if similarity == "dot" else 2)

    def read(q, k, v):
        return memory_read(q, list(k.split([20, 33], 2)), list(v.split([20, 33], 2)),
                           similarity=similarity, backend=backend, return_lse=True)

    def expected_read(q, k, v):
        return reference(q, k, v, similarity=similarity)

    with poison_outputs():
        if api == "func.jvp":
            outputs, tangents = torch.func.jvp(read, (q, k, v), (dq, dk, dv))
        else:
            outputs, tangents = _dual_read(read, (q, k, v), (dq, dk, dv))
    as64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    expected, expected_tangents = torch.func.jvp(expected_read, tuple(as64[:3]),
                                                 tuple(as64[3:]))
    _check(outputs, expected, dtype, "primal")
    _check(tangents, expected_tangents, dtype, "tangent")
    assert tangents[0].dtype == dtype and tangents[1].dtype == outputs[1].dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangents_of_a_ragged_memory_ignore_what_lies_past_the_lengths(backend):
    """memory_lengths: NaN keys, values and tangents past each object's length change
    nothing; the tangent is the float64 one of the truncated memories."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, dq, dk, dv = _inputs(dtype, Bq=2, seed=1)
    lengths = [53, 19]
    for tensor in (k, v, dk, dv):
        tensor[1, :, 19:] = float("nan")
    outputs, tangents = torch.func.jvp(
        lambda q, k, v: memory_read(q, k, v, memory_lengths=lengths, backend=backend,
                                    return_lse=True), (q, k, v), (dq, dk, dv))
    clean = [torch.nan_to_num(t.double()) for t in (q, k, v, dq, dk, dv)]
    expected, expected_tangents = torch.func.jvp(
        lambda q, k, v: reference(q, k, v, lengths=lengths), tuple(clean[:3]),
        tuple(clean[3:]))
    _check(outputs, expected, dtype, "primal")
    _check(tangents, expected_tangents, dtype, "tangent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangents_of_top_k_xmem_and_with_usage(backend):
    """top_k (the selection has no derivative; the softmax over the selected scores has),
    XMem's similarity with tangents of shrinkage and selection, and return_usage (the usage
    as without jvp) under torch.func.jvp."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, dq, dk, dv = _inputs(dtype, Bq=2, seed=2)
    top_k = 5
    outputs, tangents = torch.func.jvp(
        lambda q, k, v: memory_read(q, k, v, top_k=top_k, backend=backend, return_lse=True),
        (q, k, v), (dq, dk, dv))
    as64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    expected, expected_tangents = torch.func.jvp(
        lambda q, k, v: reference(q, k, v, top_k=top_k), tuple(as64[:3]), tuple(as64[3:]))
    _check(outputs, expected, dtype, "top-k primal")
    _check(tangents, expected_tangents, dtype, "top-k tangent")

    generator = torch.Generator().manual_seed(3)
    shrinkage = (1 + torch.rand(2, 1, 53, generator=generator, dtype=torch.float64)).to(dtype)
    selection = torch.rand(2, 16, 37, generator=generator, dtype=torch.float64).to(dtype)
    d_shrinkage, d_selection = (torch.randn_like(t) for t in (shrinkage, selection))
    primals, directions = (q, k, v, shrinkage, selection), (dq, dk, dv, d_shrinkage,
                                                            d_selection)
    outputs, tangents = torch.func.jvp(
        lambda q, k, v, s, e: memory_read(q, k, v, similarity="xmem", shrinkage=s,
                                          selection=e, backend=backend, return_lse=True),
        primals, directions)
    expected, expected_tangents = torch.func.jvp(
        lambda q, k, v, s, e: reference(q, k, v, similarity="xmem", shrinkage=s,
                                        selection=e),
        tuple(t.double() for t in primals), tuple(t.double() for t in directions))
    _check(outputs, expected, dtype, "xmem primal")
    _check(tangents, expected_tangents, dtype, "xmem tangent")

    (out, usage), (d_out, d_usage) = torch.func.jvp(
        lambda q: memory_read(q, k, v, backend=backend, return_usage=True), (q,), (dq,))
    _, plain_usage = memory_read(q, k, v, backend=backend, return_usage=True)
    torch.testing.assert_close(usage, plain_usage)
    assert not d_usage.any()  # no derivative: a zero tangent, as for integer outputs
    _, (_, dual_usage) = _dual_read(
        lambda q: memory_read(q, k, v, backend=backend, return_usage=True), (q,), (dq,))
    assert dual_usage is None  # forward-mode AD, which no_grad does not stop, too
    expected_tangent = torch.func.jvp(lambda q: reference(q.double(), k.double(), v.double()),
                                      (q.double(),), (dq.double(),))[1][0]
    assert relative_error(d_out, expected_tangent) < BOUND[dtype]


def test_tangents_stream_over_memory_chunks_of_the_backward_size(monkeypatch):
    """The forward-mode rule accumulates over chunks of the backward's size: many small
    chunks (and chunks cut inside the caller's memory chunks) give the same tangent."""
    q, k, v, dq, dk, dv = _inputs(torch.float64, Bq=1, seed=4)
    expected = torch.func.jvp(lambda q, k, v: reference(q, k, v, similarity="l2"),
                              (q, k, v), (dq, dk, dv))[1]
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 2 * 37 * 7)  # 7-position chunks
    tangents = torch.func.jvp(
        lambda q, k, v: memory_read(q, [k[..., :30], k[..., 30:]], [v[..., :30], v[..., 30:]],
                                    similarity="l2", backend="torch", return_lse=True),
        (q, k, v), (dq, dk, dv))[1]
    _check(tangents, expected, torch.float64, "chunked tangent")


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_gradcheck_reverse_and_forward_mode_in_float64(backend, similarity):
    """torch.autograd.gradcheck with check_forward_ad: forward and reverse mode against
    finite differences, a shared query, two memory chunks and ragged lengths."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
               for shape in [(1, 5, 7), (2, 5, 11), (2, 3, 11)])
    for lengths in (None, [11, 6]):
        def read(q, k, v, lengths=lengths):
            return memory_read(q, [k[..., :4], k[..., 4:]], [v[..., :4], v[..., 4:]],
                               similarity=similarity, backend=backend, return_lse=True,
                               memory_lengths=lengths)
        assert torch.autograd.gradcheck(read, (q, k, v), check_forward_ad=True,
                                        fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_equals_the_float64_gradients(backend):
    """torch.func.grad (it raised "must override the setup_context staticmethod"), the read
    and the top-k read."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, weights, _, _ = _inputs(dtype, Bq=1, seed=6)
    weights = weights[:, :8].expand(2, -1, -1)  # (B, Cv, HW)

    for kwargs in ({}, {"top_k": 4}):
        def loss(q, k, v, read=memory_read, kwargs=kwargs):
            out, lse = read(q, k, v, return_lse=True, backend=backend, **kwargs) \
                if read is memory_read else read(q, k, v, **kwargs)
            return (out * weights.to(out.dtype)).sum() + lse.square().sum()
        grads = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
        expected = torch.func.grad(loss, argnums=(0, 1, 2))(
            *(t.double() for t in (q, k, v)), read=reference)
        for name, a, b in zip("qkv", grads, expected, strict=True):
            assert a.dtype == dtype and relative_error(a, b) < 3 * BOUND[dtype], (kwargs, name)


def _mapped(tensor, V, dim, seed):
    """V random variations of tensor stacked along dim."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((V,) + tuple(tensor.shape), generator=generator, dtype=torch.float64)
    return (tensor.unsqueeze(0) + noise.to(tensor.dtype)).movedim(0, dim)


@pytest.mark.parametrize("mapped", ["query", "memory", "both", "value-dim-1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_reads_each_index_like_a_read_of_its_own(backend, mapped):
    """torch.func.vmap ("Batching rule not implemented" before): the mapped query alone
    (read once over V x HW query positions), the memory, both, a map along dim 1; with a
    shared query, ragged lengths and return_lse, against the float64 read of each index."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, _, _, _ = _inputs(dtype, Bq=1, HW=11, N=23, seed=7)
    lengths = [23, 9]
    V = 3
    qs = _mapped(q, V, 0, 8) if mapped in ("query", "both") else None
    ks = _mapped(k, V, 0, 9) if mapped in ("memory", "both") else None
    vs = _mapped(v, V, 1 if mapped == "value-dim-1" else 0, 10) \
        if mapped in ("memory", "both", "value-dim-1") else None
    args = [t for t in (qs, ks, vs) if t is not None]
    in_dims = tuple(1 if t is vs and mapped == "value-dim-1" else 0 for t in args)

    def read(*mapped_args):
        given = iter(mapped_args)
        parts = [next(given) if t is not None else fixed for t, fixed in
                 zip((qs, ks, vs), (q, k, v), strict=True)]
        return memory_read(*parts, backend=backend, memory_lengths=lengths, return_lse=True)

    with poison_outputs():
        out, lse = torch.func.vmap(read, in_dims=in_dims)(*args)
    assert out.shape == (V, 2, 8, 11) and lse.shape == (V, 2, 11)
    for index in range(V):
        parts = [fixed if t is None else t.select(1 if t is vs and mapped == "value-dim-1"
                                                  else 0, index)
                 for t, fixed in zip((qs, ks, vs), (q, k, v), strict=True)]
        expected = reference(*(t.double() for t in parts), lengths=lengths)
        _check((out[index], lse[index]), expected, dtype, f"index {index}")


def test_vmap_of_top_k_and_usage_and_of_the_lengths():
    """vmap over the top-k read with its usage (the selection and the usage run one index at
    a time); mapping memory_lengths is a one-line error naming it."""
    q, k, v, _, _, _ = _inputs(torch.float64, Bq=2, HW=9, N=17, seed=11)
    qs = _mapped(q, 3, 0, 12)
    out, usage = torch.func.vmap(
        lambda q: memory_read(q, k, v, top_k=4, return_usage=True, backend="torch"))(qs)
    for index in range(3):
        expected_out, expected_usage = memory_read(qs[index], k, v, top_k=4,
                                                   return_usage=True, backend="torch")
        torch.testing.assert_close(out[index], expected_out)
        torch.testing.assert_close(usage[index], expected_usage)
    torch.testing.assert_close(out[1], reference(qs[1], k, v, top_k=4)[0])
    # the usage is float32 (its contract): float32's rounding of the float64 one
    assert relative_error(usage[1], reference_read(qs[1], k, v, top_k=4)[2]) < 2 ** -23
    lengths = torch.tensor([[17, 3], [5, 17]])
    with pytest.raises(ValueError, match=r"^memory_lengths must be .* got a tensor mapped by "
                                         r"torch\.func\.vmap \(its values are checked on the "
                                         r"host\): map the query and the memory, not the "
                                         r"lengths$"):
        torch.func.vmap(lambda lengths: memory_read(q, k, v, memory_lengths=lengths))(lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_and_jacfwd_equal_the_float64_jacobians(backend):
    """jacrev (the backward under vmap) and jacfwd (the forward-mode rule under vmap)."""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, _, _, _ = _inputs(dtype, B=2, Bq=1, Ck=4, Cv=3, HW=5, N=6, seed=13)

    def read(q, k):
        out, lse = memory_read(q, k, v, similarity="l2", backend=backend, return_lse=True)
        return torch.cat([out.flatten(), lse.flatten()])

    def expected_read(q, k):
        out, lse = reference(q, k, v.double(), similarity="l2")
        return torch.cat([out.flatten(), lse.flatten()])

    expected = torch.func.jacrev(expected_read, argnums=(0, 1))(q.double(), k.double())
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        jacobians = transform(read, argnums=(0, 1))(q, k)
        for a, b in zip(jacobians, expected, strict=True):
            assert relative_error(a, b) < 3 * BOUND[dtype], transform.__name__


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_derivatives_of_the_fused_backends_are_refused_in_one_line(backend):
    """hessian and jvp of grad (forward over reverse) raise the double-backward error."""
    skip_unless_runnable(backend, "cpu")
    q, k, v, dq, _, _ = _inputs(torch.float32, Bq=1, Ck=4, Cv=3, HW=5, N=6, seed=14)

    def loss(q):
        return memory_read(q, k, v, backend=backend).square().sum()

    message = "^" + DOUBLE_BACKWARD_UNSUPPORTED.replace("(", r"\(").replace(")", r"\)") + "$"
    with pytest.raises(RuntimeError, match=message):
        torch.func.hessian(loss)(q)
    with pytest.raises(RuntimeError, match=message):
        torch.func.jvp(torch.func.grad(loss), (q,), (dq,))
    hessian = torch.func.hessian(
        lambda q: memory_read(q, k, v, backend="naive").square().sum())(q)  # plain autograd
    assert hessian.shape == q.shape * 2 and torch.isfinite(hessian).all()


def test_the_custom_op_refuses_dual_tensors_in_one_line():
    """The custom op itself has no forward-mode rule: dual tensors passed to it directly are an
    error (its tangent would be zero), not a zero tangent."""
    q, k, v, dq, _, _ = _inputs(torch.float32, seed=15)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="^forward-mode AD .* stm_kernels::memory_read"):
            torch.ops.stm_kernels.memory_read(fwAD.make_dual(q, dq), [k], [v], 0.25, False,
                                              "torch", None)
        out, _ = torch.ops.stm_kernels.memory_read(q, [k], [v], 0.25, False, "torch", None)
    assert FORWARD_MODE_UNSUPPORTED.count("\n") == 0 and torch.isfinite(out).all()


def test_forward_mode_under_torch_compile_reads_eagerly_with_the_right_tangent():
    """torch.func.jvp inside a compiled function and dual tensors passed to one: the read runs
    eagerly (a graph break) with its forward-mode rule, instead of the custom op's zero
    tangent; under fullgraph=True that graph break is an error, not a wrong tangent."""
    q, k, v, dq, dk, dv = _inputs(torch.float32, Bq=1, HW=9, N=13, seed=16)

    def read(q, k, v):
        return memory_read(q, k, v, backend="torch", return_lse=True)

    def jvp(q, k, v, dq, dk, dv):
        return torch.func.jvp(read, (q, k, v), (dq, dk, dv))[1]

    as64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    expected = torch.func.jvp(reference, tuple(as64[:3]), tuple(as64[3:]))[1]
    torch._dynamo.reset()
    _check(torch.compile(jvp)(q, k, v, dq, dk, dv), expected, torch.float32, "compile(jvp)")
    torch._dynamo.reset()
    _check(_dual_read(torch.compile(read), (q, k, v), (dq, dk, dv))[1], expected,
           torch.float32, "dual tensors into compile")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)graph break|skip|disable"):
        torch.compile(jvp, fullgraph=True)(q, k, v, dq, dk, dv)
    torch._dynamo.reset()


def test_grad_and_vmap_inside_torch_compile():
    """torch.func.grad and vmap inside a compiled function: the float64 gradient, and each
    index of the map read as a read of its own."""
    q, k, v, _, _, _ = _inputs(torch.float32, Bq=1, HW=9, N=13, seed=21)

    def loss(q, read=memory_read, **kwargs):
        return read(q, k.to(q.dtype), v.to(q.dtype), **kwargs)[0].square().sum()

    torch._dynamo.reset()
    grad = torch.compile(torch.func.grad(lambda q: loss(q, return_lse=True,
                                                        backend="torch")))(q)
    expected = torch.func.grad(lambda q: loss(q, read=reference))(q.double())
    assert relative_error(grad, expected) < 3 * BOUND[torch.float32]
    torch._dynamo.reset()
    qs = _mapped(q, 3, 0, 22)
    out = torch.compile(torch.func.vmap(lambda q: memory_read(q, k, v, backend="torch")))(qs)
    for index in range(3):
        assert relative_error(out[index], reference(qs[index].double(), k.double(),
                                                    v.double())[0]) < BOUND[torch.float32]
    torch._dynamo.reset()


# --------------------------------------------------------------------------- autocast


def _sdpa(q, k, v, scale=None):
    """SDPA on the channel-first layout: (B, Cv, HW) from q (Bq, Ck, HW), k (B, Ck, N)."""
    q = q.expand(k.shape[0], -1, -1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_inputs_as_for_sdpa(backend, autocast_dtype):
    """Under torch.autocast("cpu") a bf16 query against a float32 memory reads (it raised):
    every floating input is cast to autocast's dtype, as scaled_dot_product_attention's are.
    out comes back in that dtype, equal to the read of explicitly cast inputs and close to
    SDPA under the same autocast; lse stays float32; gradients reach the float32 inputs in
    float32."""
    skip_unless_runnable(backend, "cpu", autocast_dtype)
    q, k, v, _, _, _ = _inputs(torch.float32, Bq=2, HW=13, N=21, seed=17)
    q16 = q.to(torch.bfloat16).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        out, lse = memory_read(q16, k, v, backend=backend, return_lse=True)
        sdpa = _sdpa(q16, k, v)
    assert out.dtype == sdpa.dtype == autocast_dtype and lse.dtype == torch.float32
    cast = [t.detach().to(autocast_dtype) for t in (q16, k, v)]
    expected_out, expected_lse = memory_read(*cast, backend=backend, return_lse=True)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert relative_error(out, sdpa) < 2e-2
    (out.float().sum() + lse.sum()).backward()
    assert q16.grad.dtype == torch.bfloat16 and k.grad.dtype == v.grad.dtype == torch.float32
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_autocast_casts_xmem_inputs_leaves_float64_and_lengths_and_applies_to_the_family():
    """shrinkage and selection are cast too; float64 inputs are not (as autocast leaves
    float64 alone), so a float64 query against a float32 memory stays an error, naming the
    dtypes autocast gave; memory_lengths stay integers; memory_usage casts likewise. Outside
    autocast, or in a region that turns it off, mixed dtypes stay an error."""
    q, k, v, _, _, _ = _inputs(torch.float32, Bq=2, HW=13, N=21, seed=18)
    shrinkage, selection = 1 + torch.rand(2, 1, 21), torch.rand(2, 16, 13)
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v, shrinkage, selection)]
    with torch.autocast("cpu"):
        out = memory_read(q.bfloat16(), k, v, similarity="xmem", shrinkage=shrinkage,
                          selection=selection, memory_lengths=[21, 8], backend="torch")
        usage = memory_usage(q, k, torch.zeros(2, 13), backend="torch")
        with pytest.raises(ValueError, match=r"got query_key torch.float64, memory_key "
                                             r"torch.bfloat16, memory_value torch.bfloat16$"):
            memory_read(q.double(), k, v)
        with torch.autocast("cpu", enabled=False), pytest.raises(ValueError,
                                                                 match="share one dtype"):
            memory_read(q.bfloat16(), k, v)
    expected = memory_read(*bf16[:3], similarity="xmem", shrinkage=bf16[3], selection=bf16[4],
                           memory_lengths=[21, 8], backend="torch")
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    torch.testing.assert_close(usage, memory_usage(*bf16[:2], torch.zeros(2, 13),
                                                   backend="torch"), rtol=0, atol=0)
    float64 = reference_read(*bf16[:3], similarity="xmem", shrinkage=bf16[3],
                             selection=bf16[4], lengths=[21, 8])[0]
    assert relative_error(out, float64) < TOLERANCE[torch.bfloat16]
    float64 = reference_usage(*bf16[:2], torch.zeros(2, 13))
    assert relative_error(usage, float64) < TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError, match="share one dtype"):
        memory_read(q.bfloat16(), k, v)


def test_autocast_of_chunks_another_device_and_a_query_that_is_no_tensor():
    """Under CPU autocast a memory in chunks is cast chunk by chunk (the read equal to the cast
    chunks'); autocast on for another device only (xpu) leaves a CPU read in float32; under
    CPU autocast a query that is not a tensor is refused by the read's own check."""
    q, k, v, _, _, _ = _inputs(torch.float32, Bq=2, HW=13, N=21, seed=19)
    keys, values = [k[..., :8], k[..., 8:]], [v[..., :8], v[..., 8:]]
    with torch.autocast("cpu"):
        out = memory_read(q, keys, values, backend="torch")
    expected = memory_read(q.bfloat16(), [t.bfloat16() for t in keys],
                           [t.bfloat16() for t in values], backend="torch")
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    with torch.autocast("xpu", dtype=torch.bfloat16):
        out = memory_read(q, k, v, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q.double(), k.double(), v.double())[0])
    with torch.autocast("cpu"), pytest.raises(TypeError) as caught:
        memory_read(q.numpy(), k, v)
    assert str(caught.value) == "query_key must be a torch.Tensor; got ndarray"


def test_autocast_under_torch_compile_fullgraph():
    q, k, v, _, _, _ = _inputs(torch.float32, Bq=1, HW=13, N=21, seed=19)
    torch._dynamo.reset()
    read = torch.compile(lambda q, k, v: memory_read(q, k, v, backend="torch"), fullgraph=True)
    with torch.autocast("cpu"):
        out = read(q.bfloat16(), k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, memory_read(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                backend="torch"), rtol=0, atol=0)
    float64 = reference_read(q.bfloat16(), k.bfloat16(), v.bfloat16())[0]
    assert relative_error(out, float64) < TOLERANCE[torch.bfloat16]
    assert read(q, k, v).dtype == torch.float32  # outside autocast: recompiled, not cast
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_on_cuda_casts_like_sdpa(backend):
    """torch.autocast("cuda"): fp16 (its default) for CUDA tensors; CPU tensors in the same
    region are not autocast's (a CPU read of mixed dtypes stays an error)."""
    q, k, v, dq, dk, dv = [t.cuda() for t in _inputs(torch.float32, Bq=2, HW=37, N=53,
                                                        seed=20)]
    with torch.autocast("cuda"):
        out, lse = memory_read(q.bfloat16(), k, v, backend=backend, return_lse=True)
        sdpa = _sdpa(q.half(), k, v)
        with pytest.raises(ValueError, match="share one dtype"):
            memory_read(q.cpu().bfloat16(), k.cpu(), v.cpu())
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert torch.equal(out, memory_read(q.half(), k.half(), v.half(), backend=backend))
    assert relative_error(out, sdpa) < 4e-3
    tangents = torch.func.jvp(lambda q, k, v: memory_read(q, k, v, backend=backend,
                                                          return_lse=True),
                              (q, k, v), (dq, dk, dv))[1]
    as64 = [t.double().cpu() for t in (q, k, v, dq, dk, dv)]
    expected = torch.func.jvp(reference, tuple(as64[:3]), tuple(as64[3:]))[1]
    for a, b in zip(tangents, expected, strict=True):  # TF32 off by default: exact float32
        assert relative_error(a.cpu(), b) < 1e-4


def test_tangents_of_a_bf16_read_are_accumulated_in_float32():
    """The torch backend's tangents of a bf16 read: d_lse (float32, as lse) to float32's
    precision against the float64 tangent of the same bf16 numbers, d_out rounded once to
    bf16 (products and sums in bf16 would miss d_lse by about 1e-2)."""
    q, k, v, dq, dk, dv = _inputs(torch.bfloat16, Bq=2, seed=5)
    outputs, tangents = torch.func.jvp(
        lambda q, k, v: memory_read(q, k, v, backend="torch", return_lse=True),
        (q, k, v), (dq, dk, dv))
    as64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    _, expected = torch.func.jvp(reference, tuple(as64[:3]), tuple(as64[3:]))
    assert (tangents[0].dtype, tangents[1].dtype) == (torch.bfloat16, outputs[1].dtype)
    assert relative_error(tangents[1], expected[1]) < 1e-5
    assert relative_error(tangents[0], expected[0]) < 6e-3


def test_tangents_of_a_ragged_memory_in_chunks_each_cut_in_steps(monkeypatch):
    """memory_lengths over a memory of three chunks, each cut into several 7-position steps:
    every step masks the positions past the lengths at its own place in the whole memory."""
    q, k, v, dq, dk, dv = _inputs(torch.float64, Bq=2, seed=6)
    lengths = [53, 30]
    for tensor in (k, v, dk, dv):
        tensor[1, :, 30:] = float("nan")
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 2 * 37 * 7)
    sizes = [20, 15, 18]
    outputs, tangents = torch.func.jvp(
        lambda q, k, v: memory_read(q, list(k.split(sizes, 2)), list(v.split(sizes, 2)),
                                    memory_lengths=lengths, backend="torch", return_lse=True),
        (q, k, v), (dq, dk, dv))
    clean = [torch.nan_to_num(t) for t in (q, k, v, dq, dk, dv)]
    expected, expected_tangents = torch.func.jvp(
        lambda q, k, v: reference(q, k, v, lengths=lengths), tuple(clean[:3]),
        tuple(clean[3:]))
    _check(outputs, expected, torch.float64, "primal")
    _check(tangents, expected_tangents, torch.float64, "tangent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tangent_of_the_values_alone(backend):
    """Dual values only (no tangent for the query or the keys): the scores do not move, so
    d_lse is zero, of lse's shape (one object), and d_out the float64 one. (The naive read's
    lse, plain torch ops not reached by the dual values, has no tangent: None.)"""
    skip_unless_runnable(backend, "cpu")
    dtype = DTYPE[backend]
    q, k, v, _, _, dv = _inputs(dtype, B=1, seed=7)
    outputs, tangents = _dual_read(
        lambda v: memory_read(q, k, v, backend=backend, return_lse=True), (v,), (dv,))
    _, expected = torch.func.jvp(lambda v: reference(q.double(), k.double(), v),
                                 (v.double(),), (dv.double(),))
    if backend == "naive":
        assert tangents[1] is None
    else:
        assert tangents[1].shape == outputs[1].shape and not tangents[1].any()
    assert relative_error(tangents[0], expected[0]) < BOUND[dtype]
