"""The torch backend's batched forward where the mutation run (docs/testing.md, "Mutation
score") found it untested: a ragged memory whose longest object is not the first (the chunk past
the shorter objects is read by a view starting at a later object), the views it takes of
consecutive objects, and the copy bound of its memory chunks."""
import pytest
import torch

from helpers import check_read, per_object_reference, ragged_read_with_grads, random_inputs
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
