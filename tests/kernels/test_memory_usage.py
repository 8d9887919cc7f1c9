"""memory_usage, the memory's share of a given log-sum-exp, against the usage written out in
plain float64 torch (tests/reference.py): every option reaches the pass (scale, XMem's
shrinkage and selection, ragged lengths, the backend), its default backend, and its one-line
refusal of an lse of the wrong shape, word for word."""
import pytest
import torch

from reference import reference_read, reference_usage
from stm_kernels import memory_read, memory_usage
from stm_kernels.backends import pytorch


def _inputs(B=2, Bq=1, Ck=4, HW=5, N=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64)
            for shape in ((Bq, Ck, HW), (B, Ck, N), (B, 1, N), (Bq, Ck, HW))]


def _close(usage, expected):
    assert usage.dtype == torch.float32 and usage.shape == expected.shape
    # float32's rounding of a float64 usage (its contract), with room for the sums
    assert (usage.double() - expected).abs().max() <= 2 ** -22 * expected.abs().max()


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("options", ["scale", "xmem", "xmem without a selection", "lengths"])
def test_every_option_reaches_the_usage(options, backend):
    q, k, shrinkage, selection = _inputs(seed=1)
    shrinkage = shrinkage.abs() + 0.5
    selection = selection.sigmoid()
    given = {"scale": dict(scale=0.3),
             "xmem": dict(similarity="xmem", shrinkage=shrinkage, selection=selection),
             "xmem without a selection": dict(similarity="xmem", shrinkage=shrinkage),
             "lengths": dict(memory_lengths=torch.tensor([7, 3]))}[options]
    reference_options = {("lengths" if name == "memory_lengths" else name): value
                         for name, value in given.items()}
    # the lse of another read (scores shifted by 0.5): the usage is its share, not 1 per row
    lse = reference_read(q, k, k, **reference_options)[1] + 0.5
    usage = memory_usage(q, k, lse.float(), backend=backend, **given)
    _close(usage, reference_usage(q, k, lse.float(), **reference_options))


def test_the_backend_named_is_the_one_that_runs(monkeypatch):
    q, k, _, _ = _inputs(seed=2)
    lse = reference_read(q, k, k)[1].float()
    ran = []
    usage = pytorch.usage
    monkeypatch.setattr(pytorch, "usage", lambda *a: ran.append(1) or usage(*a))
    memory_usage(q, k, lse)  # "auto": the torch backend on a CPU
    assert ran
    ran.clear()
    memory_usage(q, k, lse, backend="naive")
    assert not ran
    with pytest.raises(ValueError, match="^backend must be one of"):
        memory_usage(q, k, lse, backend="bogus")


@pytest.mark.parametrize(("lse", "got"), [
    (torch.zeros(3, 5), "torch.Size([3, 5])"),
    (torch.zeros(2, 4), "torch.Size([2, 4])"),
    (torch.zeros(2, 6), "torch.Size([2, 6])"),
    ([[0.0] * 5] * 2, "list"),
], ids=["objects", "fewer positions", "more positions", "not a tensor"])
def test_an_lse_of_the_wrong_shape_is_refused_in_one_line(lse, got):
    q, k, _, _ = _inputs(seed=3)
    with pytest.raises(ValueError) as raised:
        memory_usage(q, k, lse)
    assert str(raised.value) == (f"lse must have shape (B=2, *Q) with 5 query positions; got "
                                 f"{got}")


@pytest.mark.parametrize("B", [1, 2])
def test_a_spatial_lse_is_read_as_its_query_positions(B):
    """An lse (B, H, W) for a spatial query (Bq, Ck, H, W), as memory_read returns it; one
    object or two."""
    q, k, _, _ = _inputs(B=B, HW=6, seed=4)
    spatial = q.unflatten(2, (2, 3))
    _, lse = memory_read(spatial, k, k, return_lse=True, backend="torch")
    assert lse.shape == (B, 2, 3)
    _close(memory_usage(spatial, k, lse), reference_usage(q, k, lse.flatten(1)))
