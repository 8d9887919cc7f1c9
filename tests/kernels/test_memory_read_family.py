"""The read of the STM family beyond STM: top-k softmax (STCN, XMem), memory usage (XMem) and
XMem's similarity with shrinkage and selection, against float64 transcriptions of the
materialised formulas (XMem's get_similarity / do_softmax, STCN's softmax_w_top)."""
import math

import pytest
import torch

from helpers import DEVICES, TOLERANCE, random_inputs, relative_error, skip_unless_runnable
from reference import reference_read
from stm_kernels import memory_read, memory_usage, merge_reads, poison_outputs
from stm_kernels.backends.triton import calls
from stm_kernels.backends.triton.tilings import SelectConfig, UsageConfig, use_configs
from stm_kernels.topk import read_selected, topk_scores


@pytest.fixture(autouse=True)
def _poisoned():
    with poison_outputs():
        yield


def xmem_similarity(mk, ms, qk, qe):
    """XMem's get_similarity (model/memory_util.py), transcribed: (B, N, HW)."""
    CK = mk.shape[1]
    mk, qk = mk.flatten(start_dim=2), qk.flatten(start_dim=2)
    ms = ms.flatten(start_dim=1).unsqueeze(2) if ms is not None else None
    qe = qe.flatten(start_dim=2) if qe is not None else None
    if qe is not None:
        mk = mk.transpose(1, 2)
        a_sq = mk.pow(2) @ qe
        two_ab = 2 * (mk @ (qk * qe))
        b_sq = (qe * qk.pow(2)).sum(1, keepdim=True)
        similarity = -a_sq + two_ab - b_sq
    else:
        a_sq = mk.pow(2).sum(1).unsqueeze(2)
        two_ab = 2 * (mk.transpose(1, 2) @ qk)
        similarity = -a_sq + two_ab
    if ms is not None:
        return similarity * ms / math.sqrt(CK)
    return similarity / math.sqrt(CK)


def dense_scores(q, k, scale, similarity, lengths=None):
    affinity = torch.bmm(k.transpose(1, 2), q.expand(k.shape[0], -1, -1))  # (B, N, HW)
    if similarity == "l2":
        affinity = 2 * affinity - k.pow(2).sum(1).unsqueeze(2)
    affinity = affinity * scale
    if lengths is not None:
        past = torch.arange(k.shape[2])[None, :] >= torch.as_tensor(lengths)[:, None]
        affinity = affinity.masked_fill(past.unsqueeze(2), float("-inf"))
    return affinity


def top_k_softmax(affinity, top_k):
    """Softmax over each query's top_k scores (ties: lower index), the others 0: (B, N, HW)."""
    if top_k is None:
        return torch.softmax(affinity, dim=1)
    order = torch.sort(affinity.detach(), dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(affinity, dtype=torch.bool).scatter_(1, order[:, :top_k], True)
    return torch.softmax(affinity.masked_fill(~keep, float("-inf")), dim=1)


def reference(q, k, v, *, top_k=None, similarity="dot", scale=None, lengths=None,
              shrinkage=None, selection=None, seed=1):
    """float64 (out, lse, usage, grads of every input given) through the materialised read."""
    inputs = [t.detach().double().cpu().requires_grad_() if t is not None else None
              for t in (q, k, v, shrinkage, selection)]
    q64, k64, v64, s64, e64 = inputs
    if similarity == "xmem":
        affinity = xmem_similarity(k64, s64, q64.expand(k64.shape[0], -1, -1), e64)
        if lengths is not None:
            past = torch.arange(k.shape[2])[None, :] >= torch.as_tensor(lengths)[:, None]
            affinity = affinity.masked_fill(past.unsqueeze(2), float("-inf"))
    else:
        scale = 1 / math.sqrt(q.shape[1]) if scale is None else scale
        affinity = dense_scores(q64, k64, scale, similarity, lengths)
    probabilities = top_k_softmax(affinity, top_k)
    out = torch.bmm(v64 if lengths is None else v64.masked_fill(
        (torch.arange(k.shape[2])[None, :] >= torch.as_tensor(lengths)[:, None]).unsqueeze(1),
        0), probabilities)
    kept = probabilities > 0
    lse = torch.logsumexp(affinity.masked_fill(~kept, float("-inf")), dim=1)
    usage = probabilities.detach().sum(2)
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    grads = [t.grad if t is not None else None for t in inputs]
    return out.detach(), lse.detach(), usage, grads, (grad_out, grad_lse)


def run(q, k, v, cotangents, **kwargs):
    inputs = [t.detach().requires_grad_() if t is not None else None
              for t in (q, k, v, kwargs.pop("shrinkage", None), kwargs.pop("selection", None))]
    q_, k_, v_, s_, e_ = inputs
    extra = {} if s_ is None and e_ is None else dict(shrinkage=s_, selection=e_)
    out, lse, usage = memory_read(q_, k_, v_, return_lse=True, return_usage=True, **extra,
                                  **kwargs)
    grad_out, grad_lse = cotangents
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    return out, lse, usage, [t.grad if t is not None else None for t in inputs]


def check(actual, expected, dtype, grad_factor=3):
    out, lse, usage, grads = actual
    out64, lse64, usage64, grads64, _ = expected
    bound = TOLERANCE[dtype]
    assert relative_error(out, out64) < bound, ("out", relative_error(out, out64))
    assert relative_error(lse, lse64) < bound, ("lse", relative_error(lse, lse64))
    assert relative_error(usage, usage64) < bound, ("usage", relative_error(usage, usage64))
    names = ["dq", "dk", "dv", "dshrinkage", "dselection"]
    for name, grad, grad64 in zip(names, grads, grads64, strict=True):
        if grad64 is not None:
            assert grad is not None, name
            error = relative_error(grad, grad64)
            assert error < grad_factor * bound, (name, error)


BACKENDS = ["triton", "torch", "naive"]


def _skip(backend, device, dtype=torch.float32):
    if backend == "naive":
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    else:
        skip_unless_runnable(backend, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("top_k", [1, 7, 64])
def test_top_k_read_equals_the_materialised_top_k(device, backend, dtype, similarity, top_k):
    """STCN/XMem's top-k softmax: out, lse, usage and gradients (only through the selected
    positions) against the materialised float64 read; a ragged memory and a shared query."""
    _skip(backend, device, dtype)
    if dtype != torch.float32 and backend == "naive":
        pytest.skip("the naive reference runs in float32/float64")
    if backend == "triton" and device == "cpu" and top_k == 64 and (
            dtype != torch.float32 or similarity != "dot"):
        pytest.skip("interpreted bitonic sorts of 64 keys are slow: k=64 runs for fp32 dot")
    q, k, v = random_inputs(3, 1, 24, 40, 37, 150, dtype, device, seed=20)
    lengths = [150, 90, 50]
    expected = reference(q, k, v, top_k=top_k, similarity=similarity, lengths=lengths)
    actual = run(q, k, v, expected[-1], top_k=top_k, similarity=similarity, backend=backend,
                 memory_lengths=torch.tensor(lengths, device=device))
    check(actual, expected, dtype)
    dk = actual[3][1]
    for b, length in enumerate(lengths):
        assert (dk[b, :, length:] == 0).all()
    chosen = expected[2] > 0  # (B, N): positions selected by at least one query
    assert ((dk.abs().sum(1) > 0).cpu() <= chosen).all()  # gradients only there


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_ties_go_to_the_lower_memory_index(device, backend):
    _skip(backend, device)
    q, k, _ = random_inputs(1, 1, 16, 8, 5, 40, torch.float32, device, seed=21)
    k[:, :, 30:40] = k[:, :, 10:20]  # positions 30-39 score exactly as 10-19
    scores, indices = topk_scores(q, k, 40, backend=backend)
    for row_scores, row_indices in zip(scores[0], indices[0], strict=True):
        assert (row_scores[:-1] >= row_scores[1:]).all()
        for a in range(40):
            twin = row_indices[a].item()
            if 10 <= twin < 20:  # its twin twin + 20 ties with it and must come right after
                position = (row_indices == twin + 20).nonzero().item()
                assert position == a + 1 or row_scores[a + 1] == row_scores[a]
    five = topk_scores(q, k, 15, backend=backend)[1]
    assert five.shape == (1, 5, 15)
    dense = dense_scores(q.double().cpu(), k.double().cpu(), 0.25, "dot")[0].T  # (HW, N)
    for row, chosen in zip(dense, five[0].cpu(), strict=True):
        order = torch.sort(row, descending=True, stable=True).indices[:15]
        assert chosen.tolist() == order.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("config", [
    SelectConfig(block_m=16, num_warps=4, num_stages=1, stream_queries=True),
    SelectConfig(block_m=16, num_warps=4, num_stages=1, block_ck=16)],
    ids=["streamed", "chunked"])
def test_selection_streaming_its_query_tile_or_summing_key_channel_chunks(device, similarity,
                                                                          config):
    """The selection kernel loading its query tile in every memory step (SelectConfig.
    stream_queries), or computing each block's scores 16 key channels at a time (block_ck; of
    45 channels, so the last chunk is partial), from strided keys, picks the float64
    reference's positions (ties: lower index) with its scores, over a ragged memory with a
    last partial block."""
    skip_unless_runnable("triton", device)
    q, k, _ = random_inputs(2, 1, 45, 8, 21, 150, torch.float32, device, seed=24)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost: not contiguous
    lengths = torch.tensor([150, 77], device=device)
    with use_configs(select=config):
        scores, indices = topk_scores(q, k, 8, memory_lengths=lengths, similarity=similarity,
                                      backend="triton")
    dense = dense_scores(q.double().cpu(), k.double().cpu(), 45 ** -0.5, similarity,
                         lengths.cpu())  # (B, N, HW)
    for b in range(2):
        order = torch.sort(dense[b].T, dim=1, descending=True, stable=True).indices[:, :8]
        assert indices[b].cpu().tolist() == order.tolist()
        assert relative_error(scores[b], dense[b].T.gather(1, order)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_usage_streaming_its_key_tile(device, similarity):
    """The usage kernel loading its key tile in every query step (UsageConfig.stream_keys)
    sums the float64 reference's probabilities over a ragged memory whose last block is
    partial, zero past each length."""
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 1, 24, 8, 37, 150, torch.float32, device, seed=26)
    lengths = [150, 77]
    expected = reference(q, k, v, similarity=similarity, lengths=lengths)
    config = UsageConfig(block_n=32, block_m=16, num_warps=4, num_stages=1, stream_keys=True)
    with use_configs(usage=config):
        usage = memory_usage(q, k, expected[1].float().to(device), similarity=similarity,
                             memory_lengths=torch.tensor(lengths, device=device),
                             backend="triton")
    assert relative_error(usage, expected[2]) < 1e-5
    assert (usage[1, 77:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_scores_and_read_selected(device, backend):
    """The two halves of a top-k read: selection (sorted, -1 past a short memory) and the
    read over given positions, which equals memory_read(top_k=...); a query with no slot."""
    _skip(backend, device)
    q, k, v = random_inputs(2, 1, 16, 24, 30, 50, torch.float32, device, seed=22)
    lengths = torch.tensor([50, 4], device=device)
    scores, indices = topk_scores(q, k, 8, memory_lengths=lengths, backend=backend)
    assert scores.shape == indices.shape == (2, 30, 8) and scores.dtype == torch.float32
    assert (indices[1, :, 4:] == -1).all() and torch.isneginf(scores[1, :, 4:]).all()
    assert (indices[1, :, :4].sort(-1).values == torch.arange(4, device=device)).all()
    dense = dense_scores(q.double().cpu(), k.double().cpu(), 0.25, "dot")
    assert relative_error(scores[0], dense[0].T.gather(1, indices[0].cpu())) < 1e-6
    out, lse = read_selected(q, k, v, indices, return_lse=True)
    expected_out, expected_lse, _ = reference_read(q, k, v, top_k=8, lengths=lengths)
    assert relative_error(out, expected_out) < 1e-5 and relative_error(lse, expected_lse) < 1e-5
    none = indices.clone()
    none[0, 3] = -1
    out, lse = read_selected(q, k, v, none, return_lse=True)
    assert (out[0, :, 3] == 0).all() and torch.isneginf(lse[0, 3])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_usage_of_a_full_read_and_for_a_given_lse(device, backend, similarity):
    _skip(backend, device)
    q, k, v = random_inputs(2, 2, 16, 24, 45, 111, torch.float32, device, seed=23)
    lengths = [111, 60]
    expected = reference(q, k, v, similarity=similarity, lengths=lengths)
    actual = run(q, k, v, expected[-1], similarity=similarity, backend=backend,
                 memory_lengths=torch.tensor(lengths, device=device))
    check(actual, expected, torch.float32)
    assert actual[2].shape == (2, 111) and actual[2].dtype == torch.float32
    assert (actual[2][1, 60:] == 0).all()
    assert relative_error(actual[2].sum(1), torch.full((2,), 45.0)) < 1e-5  # each query sums to 1
    # the share of this memory in a read over a larger one: usage under a larger lse
    lse = expected[1] + 0.5
    share = memory_usage(q, k, lse.float().to(device), similarity=similarity, backend=backend,
                         memory_lengths=torch.tensor(lengths, device=device))
    assert relative_error(share, expected[2] * math.exp(-0.5)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("terms", ["shrinkage+selection", "shrinkage", "selection", "none"])
@pytest.mark.parametrize("top_k", [None, 10])
def test_xmem_similarity_equals_xmems_formula(device, backend, terms, top_k):
    """similarity="xmem" against a transcription of XMem's get_similarity (and do_softmax's
    top-k), gradients to the query, memory, shrinkage and selection included."""
    _skip(backend, device)
    q, k, v = random_inputs(2, 1, 16, 24, 30, 70, torch.float32, device, seed=24)
    generator = torch.Generator().manual_seed(25)
    shrinkage = (1 + torch.rand(2, 1, 70, generator=generator)).to(device) \
        if "shrinkage" in terms else None
    selection = torch.rand(1, 16, 30, generator=generator).to(device) \
        if "selection" in terms else None
    expected = reference(q, k, v, top_k=top_k, similarity="xmem", shrinkage=shrinkage,
                         selection=selection)
    actual = run(q, k, v, expected[-1], top_k=top_k, similarity="xmem", backend=backend,
                 shrinkage=shrinkage, selection=selection)
    check(actual, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("terms", ["shrinkage+selection", "selection", "shrinkage"])
@pytest.mark.parametrize("top_k", [None, 10])
def test_xmem_at_ck_128_equals_xmems_formula(device, backend, terms, top_k):
    """XMem's read at Ck = 128: with a selection its 257 augmented key channels run on the
    256-wide kernels with the last channel as a rank-1 score term (no fallback: the suite
    fails on one); out, lse, usage and the gradients to the query, keys, values, shrinkage
    and selection against XMem's formula. A ragged memory, the selection of a shared query."""
    _skip(backend, device)
    q, k, v = random_inputs(2, 1, 128, 16, 20, 40, torch.float32, device, seed=27)
    generator = torch.Generator().manual_seed(28)
    shrinkage = (1 + 4 * torch.rand(2, 1, 40, generator=generator)).to(device) \
        if "shrinkage" in terms else None
    selection = torch.rand(1, 128, 20, generator=generator).to(device) \
        if "selection" in terms else None
    lengths = [40, 23]
    expected = reference(q, k, v, top_k=top_k, similarity="xmem", shrinkage=shrinkage,
                         selection=selection, lengths=lengths)
    actual = run(q, k, v, expected[-1], top_k=top_k, similarity="xmem", backend=backend,
                 shrinkage=shrinkage, selection=selection,
                 memory_lengths=torch.tensor(lengths, device=device))
    check(actual, expected, torch.float32)
    assert (actual[3][1][1, :, 23:] == 0).all()


def test_xmem_spatial_layouts_and_chunks():
    """(T, H, W) memory with a (B, 1, T, H, W) shrinkage, (H, W) query and selection, and a
    memory given as chunks with one shrinkage for the whole."""
    q, k, v = random_inputs(2, 1, 8, 6, 12, 24, torch.float64, "cpu", seed=26)
    shrinkage = 1 + torch.rand(2, 1, 24, dtype=torch.float64)
    selection = torch.rand(1, 8, 12, dtype=torch.float64)
    flat = memory_read(q, k, v, similarity="xmem", shrinkage=shrinkage, selection=selection)
    expected = reference(q, k, v, similarity="xmem", shrinkage=shrinkage, selection=selection)
    assert relative_error(flat, expected[0]) < 1e-12
    spatial = memory_read(q.view(1, 8, 3, 4), k.view(2, 8, 2, 3, 4), v.view(2, 6, 2, 3, 4),
                          similarity="xmem", shrinkage=shrinkage.view(2, 1, 2, 3, 4),
                          selection=selection.view(1, 8, 3, 4))
    chunked = memory_read(q, [k[:, :, :10], k[:, :, 10:]], [v[:, :, :10], v[:, :, 10:]],
                          similarity="xmem", shrinkage=shrinkage, selection=selection)
    assert relative_error(spatial.flatten(2), flat) < 1e-12
    assert relative_error(chunked, flat) < 1e-12


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(top_k=0), ValueError, "top_k must be a positive integer"),
    (dict(top_k=2.5), ValueError, "top_k must be a positive integer"),
    (dict(top_k=True), ValueError, "top_k must be a positive integer"),
    (dict(shrinkage=torch.ones(2, 1, 12)), ValueError, "belong to similarity='xmem'"),
    (dict(similarity="xmem", shrinkage=torch.ones(2, 1, 11)), ValueError,
     r"shrinkage must have shape \(B=2, 1, N=12\)"),
    (dict(similarity="xmem", selection=torch.ones(1, 7, 10)), ValueError,
     r"selection must have the query's shape \(Bq=1, Ck=8, HW=10\)"),
    (dict(similarity="xmem", selection=torch.ones(1, 8, 10, dtype=torch.long)), TypeError,
     "selection must be a floating-point"),
    (dict(similarity="cosine"), ValueError, "similarity must be one of"),
], ids=["zero", "float", "bool", "shrinkage without xmem", "shrinkage shape", "selection shape",
        "selection dtype", "similarity"])
def test_bad_family_arguments_are_rejected(kwargs, error, message):
    q, k, v = random_inputs(2, 1, 8, 6, 10, 12, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        memory_read(q, k, v, **kwargs)


def test_triton_top_k_above_64_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(calls, "INTERPRETING", True)  # resolve without running
    q, k, v = random_inputs(1, 1, 8, 6, 10, 100, torch.float32, "cpu")
    with pytest.raises(ValueError, match="top_k=65 is above the 64 the triton backend supports"):
        memory_read(q, k, v, top_k=65, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_top_k_read_equals_stcns_own_read(backend):
    """Our top-k read against STCN's read transcribed (bench.topk_read.stcn_read)."""
    from bench.topk_read import stcn_read
    q, k, v = random_inputs(2, 1, 16, 32, 20, 300, torch.float64, "cpu", seed=27)
    ours = memory_read(q, k, v, similarity="l2", top_k=5, backend=backend)
    assert relative_error(ours, stcn_read(q, k.clone(), v, 5)) < 1e-12


def test_merged_top_k_reads_are_not_a_top_k_read_but_a_list_of_chunks_is():
    """What merge_reads' docstring says: merging per-chunk top_k reads is a softmax over every
    chunk's top_k (not the memory's top_k); chunks passed as a list read the global top_k."""
    q, k, v = random_inputs(1, 1, 8, 6, 10, 60, torch.float64, "cpu", seed=4)
    whole = memory_read(q, k, v, backend="torch", top_k=5)
    assert relative_error(whole, reference_read(q, k, v, top_k=5)[0]) < 1e-12
    chunks = [(k[:, :, :30], v[:, :, :30]), (k[:, :, 30:], v[:, :, 30:])]
    listed = memory_read(q, [c[0] for c in chunks], [c[1] for c in chunks], backend="torch",
                         top_k=5)
    assert relative_error(listed, whole) < 1e-12
    merged, _ = merge_reads(*zip(*(memory_read(q, ck, cv, backend="torch", top_k=5,
                                               return_lse=True) for ck, cv in chunks),
                                 strict=True))
    assert relative_error(merged, whole) > 1e-3
