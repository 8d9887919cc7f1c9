"""The torch backend's batched forward where the mutation run (docs/testing.md, "Mutation
score") found it untested: a ragged memory whose longest object is not the first (the chunk past
the shorter objects is read by a view starting at a later object), the views it takes of
consecutive objects, and the copy bound of its memory chunks."""
import pytest
import torch

from helpers import (check_read, per_object_reference, ragged_read_with_grads, random_inputs,
                     relative_error)
from reference import reference_read, reference_select, reference_usage
from stm_kernels import poison_outputs
from stm_kernels.backends import pytorch


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("lengths", [[1, 41, 150], [41, 150, 150], [90, 1, 150]],
                         ids=["ascending", "last-two", "gap"])
def test_ragged_memory_with_later_objects_longest_against_float64(similarity, lengths):
    """The segment past the shorter objects' memory covers only later objects (object 2 alone
    over [41, 150), or 1 and 2): their rows, not object 0's NaN padding, are read and updated;
    out, lse and the gradients against each object read alone in float64 (plain torch)."""
    B, Ck, Cv, HW, N = 3, 24, 40, 37, 150
    q, k, v = random_inputs(B, 1, Ck, Cv, HW, N, torch.float32, "cpu", seed=21)
    for b, length in enumerate(lengths):
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("nan")
    generator = torch.Generator().manual_seed(5)
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    with poison_outputs():
        results = ragged_read_with_grads(q, k, v, torch.tensor(lengths), cotangents,
                                         backend="torch", similarity=similarity)
    check_read(results, per_object_reference(q, k, v, lengths, cotangents,
                                             similarity=similarity), torch.float32)


@pytest.mark.parametrize("objects, rows", [
    ([0], slice(0, 1)), ([2], slice(2, 3)), ([1, 2, 3], slice(1, 4)), ([0, 1], slice(0, 2))])
def test_consecutive_objects_are_read_through_a_view(objects, rows):
    """_rows: consecutive objects as the slice of exactly them (the batched forward then
    updates its sums in place through views)."""
    assert pytorch._rows(objects) == rows


def test_objects_with_a_gap_are_gathered():
    assert pytorch._rows([0, 2]).tolist() == [0, 2]
    assert pytorch._rows([1, 3, 4]).tolist() == [1, 3, 4]


def test_memory_chunks_copy_at_most_copy_elements(monkeypatch):
    """A chunk copies at most COPY_ELEMENTS memory elements (objects x (Ck + Cv) x positions),
    down to one position per chunk, and the read over such chunks is still the float64 one."""
    B, Ck, Cv, HW, N = 2, 8, 12, 9, 23
    monkeypatch.setattr(pytorch, "COPY_ELEMENTS", B * (Ck + Cv))  # one position per chunk
    widths = []
    real = pytorch.chunk_scores

    def recorded(q_rows, k_chunk, *args):
        widths.append(k_chunk.shape[2])
        return real(q_rows, k_chunk, *args)

    monkeypatch.setattr(pytorch, "chunk_scores", recorded)
    q, k, v = random_inputs(B, 1, Ck, Cv, HW, N, torch.float32, "cpu", seed=3)
    generator = torch.Generator().manual_seed(6)
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    with torch.no_grad(), poison_outputs():
        out, lse = pytorch.forward(q, k, v, Ck ** -0.5, False)
    assert widths == [1] * N
    expected = per_object_reference(q, k, v, [N] * B, cotangents)
    check_read([out, lse, None, None, None], expected[:2] + [None] * 3, torch.float32)


def test_padded_selections_fill_to_top_k_and_mark_missing_positions():
    """A selection of fewer than top_k entries (a memory shorter than top_k) is padded with
    -inf scores, and every -inf entry (padding, or a position past an object's memory) gets
    index -1; a full selection keeps its entries."""
    inf = float("-inf")
    values = torch.tensor([[[3.0, inf], [2.0, 1.0], [0.5, 0.25]]])  # (1, 3 rows, 2 picked)
    indices = torch.tensor([[[4, 7], [0, 5], [1, 2]]])
    for top_k in (3, 4):
        padded_values, padded_indices = pytorch.padded(values, indices, top_k)
        pad = top_k - 2
        assert torch.equal(padded_values, torch.cat([values, torch.full((1, 3, pad), inf)], 2))
        assert torch.equal(padded_indices, torch.tensor(
            [[[4, -1] + [-1] * pad, [0, 5] + [-1] * pad, [1, 2] + [-1] * pad]]))
    same_values, same_indices = pytorch.padded(values, indices, 2)
    assert torch.equal(same_values, values)
    assert torch.equal(same_indices, torch.tensor([[[4, -1], [0, 5], [1, 2]]]))


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_usage_of_a_bf16_read_is_summed_in_float32(similarity):
    """bf16 inputs: the usage's products, exponentials and sums run in float32 (the
    accumulation dtype), so it matches the float64 usage of the same bf16 inputs to float32's
    precision, not bf16's (about 1e-2)."""
    q, k, _ = random_inputs(2, 1, 12, 4, 30, 70, torch.bfloat16, "cpu", seed=23)
    lse = torch.logsumexp(torch.randn(2, 30, generator=torch.Generator().manual_seed(2)), 1,
                          keepdim=True).expand(2, 30) + 3
    scale = 12 ** -0.5
    usage = pytorch.usage(q, k, lse, scale, similarity == "l2")
    expected = reference_usage(q, k, lse, scale=scale, similarity=similarity)
    assert usage.dtype == torch.float32
    assert ((usage.double() - expected).abs() / expected.abs()).max() < 1e-4


@pytest.mark.parametrize("Bq", [1, 2], ids=["shared-query", "a-query-per-object"])
def test_ragged_backward_in_float64_against_float64(Bq):
    """The ragged backward reads object by object: each object's dq is accumulated in the
    query's own precision (float64 here, 1e-12) into its own row, or summed into the shared
    query's."""
    B, Ck, Cv, HW, N, lengths = 2, 12, 20, 23, 70, [70, 33]
    q, k, v = random_inputs(B, Bq, Ck, Cv, HW, N, torch.float64, "cpu", seed=31)
    generator = torch.Generator().manual_seed(6)
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    with poison_outputs():
        results = ragged_read_with_grads(q, k, v, torch.tensor(lengths), cotangents,
                                         backend="torch")
    check_read(results, per_object_reference(q, k, v, lengths, cotangents), torch.float64)


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("with_lse_grad", [False, True], ids=["out-only", "out-and-lse"])
def test_backward_called_directly_returns_dq_shaped_and_typed_like_q(ragged, with_lse_grad):
    """pytorch.backward's contract, called as a backend is (autograd would sum a broadcast dq
    and cast its dtype, hiding either slip): for a bf16 query shared by two objects, dq
    (1, Ck, HW) in bf16, dk and dv in the memory's dtype; grad_lse may be None, with or
    without lengths; the values against float64 gradients written in plain torch."""
    B, Ck, Cv, HW, N = 2, 12, 20, 23, 70
    lengths = torch.tensor([70, 33]) if ragged else None
    q, k, v = random_inputs(B, 1, Ck, Cv, HW, N, torch.bfloat16, "cpu", seed=32)
    scale = Ck ** -0.5
    generator = torch.Generator().manual_seed(7)
    grad_out = torch.randn(B, Cv, HW, generator=generator).bfloat16()
    grad_lse = torch.randn(B, HW, generator=generator) if with_lse_grad else None
    out, lse = pytorch.forward(q, k, v, scale, False, lengths)
    dq, dk, dv = pytorch.backward(grad_out, grad_lse, q, k, v, out, lse, scale, False, lengths)
    assert (dq.shape, dq.dtype) == (q.shape, torch.bfloat16)
    assert (dk.dtype, dv.dtype) == (torch.bfloat16, torch.bfloat16)
    cotangents = (grad_out.double(), torch.zeros(B, HW, dtype=torch.float64)
                  if grad_lse is None else grad_lse.double())
    expected = per_object_reference(q, k, v, [N, 33] if ragged else [N, N], cotangents)
    check_read([out, lse, dq, dk, dv], expected, torch.bfloat16)


def test_tangents_called_directly_return_out_and_lse_dtypes():
    """pytorch.tangents' contract, called as a backend is (forward-mode AD would cast a
    tangent of the wrong dtype): d_out in out's dtype (bf16), d_lse in lse's (float32), each
    against the float64 tangent of the same bf16 numbers."""
    B, Ck, Cv, HW, N = 2, 12, 20, 23, 70
    q, k, v = random_inputs(B, 1, Ck, Cv, HW, N, torch.bfloat16, "cpu", seed=33)
    dq, dk, dv = random_inputs(B, 1, Ck, Cv, HW, N, torch.bfloat16, "cpu", seed=34)
    scale = Ck ** -0.5
    out, lse = pytorch.forward(q, k, v, scale, False)
    d_out, d_lse = pytorch.tangents(q, [k], [v], out, lse, dq, [dk], [dv], scale, False)
    assert (d_out.dtype, d_lse.dtype) == (torch.bfloat16, lse.dtype)
    _, expected = torch.func.jvp(lambda q, k, v: reference_read(q, k, v, scale=scale)[:2],
                                 tuple(t.double() for t in (q, k, v)),
                                 tuple(t.double() for t in (dq, dk, dv)))
    assert relative_error(d_lse, expected[1]) < 1e-5
    assert relative_error(d_out, expected[0]) < 6e-3


@pytest.mark.parametrize("k", [5, 49, 50], ids=["k<n-1", "k=n-1", "k=n"])
def test_exact_topk_where_every_row_ties_at_its_kth_value(k):
    """exact_topk over rows that each tie at their k-th value (one of them entirely equal):
    the lower indices are taken, as a stable sort orders them, for k below n, one below and
    equal to n."""
    generator = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 4, (3, 50), generator=generator).double()  # four values
    scores[2] = 1.0
    ranked = torch.sort(scores, descending=True).values
    assert k == 50 or bool((ranked[:, k] == ranked[:, k - 1]).all())  # every row ties
    values, indices = pytorch.exact_topk(scores, k)
    expected_values, expected_indices = torch.sort(scores, descending=True, stable=True)
    assert torch.equal(indices, expected_indices[:, :k])
    assert torch.equal(values, expected_values[:, :k])


def test_selection_ties_across_memory_chunks_go_to_the_lower_index(monkeypatch):
    """select over a memory of many chunks whose scores tie across them (keys repeating every
    7 positions, integer-valued: exact scores): each chunk's best are merged keeping the lower
    indices first, so the result is the float64 stable sort's."""
    monkeypatch.setattr(pytorch.torch_common, "CHUNK_ELEMENTS", 2 * 5 * 6)  # 6 (< top_k 9)
    generator = torch.Generator().manual_seed(9)
    q = torch.randint(-2, 3, (1, 4, 5), generator=generator).float()
    pattern = torch.randint(-2, 3, (2, 4, 7), generator=generator).float()
    k = pattern.repeat(1, 1, 6)  # (2, 4, 42): every score appears six times
    widths = []
    monkeypatch.setattr(pytorch, "chunk_scores", lambda q, k, *a, f=pytorch.chunk_scores:
                        widths.append(k.shape[2]) or f(q, k, *a))
    values, indices = pytorch.select(q, k, 9, 0.5, False)
    assert widths == [9] * 4 + [6]  # chunks of CHUNK_ELEMENTS // (B HW), at least top_k
    expected_values, expected_indices = reference_select(q, k, 9, scale=0.5)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(values.double(), expected_values)


def test_selection_of_a_float64_memory_ranks_in_float64():
    """Scores 1e-12 apart (equal once rounded to float32): a float64 selection ranks them in
    float64, so the last positions are the best, not the lowest indices of a float32 tie."""
    q = torch.ones(1, 1, 1, dtype=torch.float64)
    k = 1 + torch.arange(20, dtype=torch.float64).view(1, 1, 20) * 1e-12
    values, indices = pytorch.select(q, k, 3, 1.0, False)
    assert indices.tolist() == [[[19, 18, 17]]]
    assert values.dtype == torch.float64 and torch.equal(values, k[:, :, [19, 18, 17]])
