"""stm_kernels.prepare_read: the read planned once per layout, run with no planning and no host
read of a device value (interpreter on CPU; meta tensors planned for an H100)."""
import pytest
import torch

from reference import reference_read
from helpers import (TOLERANCE, NoHostReads, check_read, per_object_reference, random_inputs,
                     ragged_case, reference_with_grads, relative_error)
from stm_kernels import memory_read, poison_outputs, prepare_read
from stm_kernels.backends.triton import devices, kept_launches, running

pytestmark = pytest.mark.skipif(not devices.INTERPRETING,
                                reason="the Triton kernels on CPU need TRITON_INTERPRET=1")

def _no_planning(monkeypatch):
    """Planning (a config chosen, a layout keyed) fails from here on."""
    def refuse(*args, **kwargs):
        raise AssertionError("planned")
    monkeypatch.setattr(running, "launch_first_that_runs", refuse)
    monkeypatch.setattr(kept_launches, "_layout_key", refuse)
    for module in ("forward_launcher", "backward_launcher", "selection_launchers"):
        monkeypatch.setattr(f"stm_kernels.backends.triton.{module}._layout_key", refuse)


def _with_grads(read, q, k, v, cotangents):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = read(q, k, v)
    grad_out, grad_lse = cotangents
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    return [out, lse, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_run_reads_new_tensors_of_its_layout_as_the_float64_reference(similarity, fresh_launches,
                                                                      monkeypatch):
    """Built on one set of tensors, run on others of the same layout (ragged sizes, a shared
    query, NaN-poisoned outputs), forward and backward, with planning made to fail."""
    q, k, v = random_inputs(3, 1, 16, 24, 37, 70, torch.float32, "cpu", seed=1)
    plan = prepare_read(*(t.requires_grad_() for t in random_inputs(3, 1, 16, 24, 37, 70,
                                                                    torch.float32, "cpu")),
                        similarity=similarity, return_lse=True)
    _no_planning(monkeypatch)
    expected = reference_with_grads(q, k, v, similarity=similarity)
    # the same cotangents as reference_with_grads (seed 1)
    results = _with_grads(plan.run, q, k, v, _reference_cotangents(expected))
    check_read(results, expected, torch.float32)


def _reference_cotangents(expected):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(expected[0].shape, generator=generator, dtype=torch.float64),
            torch.randn(expected[1].shape, generator=generator, dtype=torch.float64))


def test_a_ragged_read_takes_new_lengths_on_every_run_without_rebuilding(fresh_launches,
                                                                       monkeypatch):
    q, k, v, _, cotangents = ragged_case("cpu", seed=2, cotangent_seed=3)
    plan = prepare_read(q, k, v, memory_lengths=torch.tensor([160, 20], dtype=torch.int32),
                        return_lse=True, backward=True)
    _no_planning(monkeypatch)
    for lengths in ([160, 20], [7, 133], [1, 160]):
        k_poisoned = k.clone()
        for b, length in enumerate(lengths):  # past an object's length: never read
            k_poisoned[b, :, length:] = float("nan")
        results = _with_grads(lambda *t, lengths=lengths: plan.run(
            *t, torch.tensor(lengths, dtype=torch.int32)), q, k_poisoned, v, cotangents)
        expected = per_object_reference(q, k, v, lengths, cotangents)
        for b, length in enumerate(lengths):  # zero gradient past the length
            assert torch.all(results[3][b, :, length:] == 0)
        check_read(results, expected, torch.float32)


def test_a_top_k_read_equals_memory_reads(fresh_launches, monkeypatch):
    q, k, v = random_inputs(2, 1, 16, 24, 30, 90, torch.float32, "cpu")
    plan = prepare_read(q, k, v, top_k=9)
    expected = memory_read(q, k, v, top_k=9, backend="torch")
    _no_planning(monkeypatch)
    out = plan.run(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert relative_error(out, reference_read(q, k, v, top_k=9)[0]) < TOLERANCE[torch.float32]


def test_memory_read_uses_the_passes_the_prepared_read_holds(fresh_launches, plannings):
    q, k, v = random_inputs(2, 1, 16, 24, 30, 50, torch.float32, "cpu")
    plan = prepare_read(*(t.requires_grad_() for t in (q, k, v)))
    planned = dict(plannings)
    assert plan._forward in kept_launches._prepared.values()
    assert plan._backwards[False] in kept_launches._prepared.values()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = memory_read(*leaves, backend="triton")
    (out * torch.randn_like(out)).sum().backward()  # a contiguous cotangent: no planning
    assert plannings == planned


def test_no_host_read_of_a_device_value_while_a_kept_read_runs(fresh_launches):
    """Forward and backward (autograd), ragged and top-k: no item, nonzero or the like (the
    interpreter's own ops run here too: the ops themselves are checked on meta tensors)."""
    q, k, v = random_inputs(2, 1, 16, 24, 30, 50, torch.float32, "cpu")
    lengths = torch.tensor([50, 17], dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    dense, ragged, top = (prepare_read(*leaves), prepare_read(q, k, v, memory_lengths=lengths),
                          prepare_read(q, k, v, top_k=5))
    with NoHostReads():
        dense.run(*leaves).sum().backward()
        ragged.run(q, k, v, lengths)
        top.run(q, k, v)


H100 = devices.Device("NVIDIA H100 (planned on meta tensors)", "nvidia", "sm_90", 227 * 1024, 132)


def test_the_whole_read_runs_on_meta_tensors_planned_for_an_h100(fresh_launches):
    """At N = 16,200 in bf16 (meta tensors refuse .item(), nonzero, tolist, bool): build,
    then forward and backward through autograd, a ragged read and a top-k selection; the
    kernels are dropped (running.recording). The forward's only torch ops allocate its
    outputs; the backward's add dQ's cast to bf16 and views."""
    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k, v = meta(1, 128, 1620), meta(1, 128, 16200), meta(1, 512, 16200)
    lengths = meta(1, dtype=torch.int32)
    with devices.pretend(H100), running.recording(lambda *launch: None), \
            poison_outputs(False):
        leaves = [t.requires_grad_() for t in (q, k, v)]
        plan = prepare_read(*leaves, return_lse=True)
        with NoHostReads() as ops, torch.no_grad():
            plan.run(q, k, v)
        assert set(ops.names) == {"aten.empty.memory_format"}
        kept = plan._backwards[False]
        with NoHostReads() as ops:
            kept(*(meta(*shape) for shape in ((1, 512, 1620),)), None, q, k, v,
                 meta(1, 512, 1620), meta(1, 1620, dtype=torch.float32), None)
        assert set(ops.names) == {"aten.empty.memory_format", "aten.empty_strided.default",
                                "aten._to_copy.default"}  # allocations and dQ's cast
        with NoHostReads() as ops:
            out, lse = plan.run(*leaves)
            (out.float().sum() + lse.sum()).backward()
        assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]
        assert "aten._to_copy.default" in ops.names  # dQ's cast to bf16 (docs/op.md)
        ragged = prepare_read(q.detach(), k.detach(), v.detach(), memory_lengths=lengths)
        assert ragged.run(q.detach(), k.detach(), v.detach(), lengths).shape == (1, 512, 1620)
        select = prepare_read(q.detach(), k.detach(), v.detach(), top_k=20)._select
        scores, indices = select(q.detach(), k.detach(), None)
        assert indices.shape == (1, 1620, 20)


def test_tensors_of_another_layout_are_refused_in_one_line(fresh_launches):
    q, k, v = random_inputs(2, 1, 16, 24, 30, 50, torch.float32, "cpu")
    plan = prepare_read(q, k, v)
    lengths = torch.tensor([50, 17], dtype=torch.int32)
    cases = {"memory_key": (q, k[:, :, :40], v), "memory_value": (q, k, v.double()),
             "query_key": (q.transpose(1, 2).contiguous().transpose(1, 2), k, v)}
    for name, tensors in cases.items():
        with pytest.raises(ValueError, match=rf"^PreparedRead.run: {name} must have shape") as e:
            plan.run(*tensors)
        assert "\n" not in str(e.value) and "float32 on cpu" in str(e.value)
    with pytest.raises(ValueError, match="memory_lengths was not given"):
        plan.run(q, k, v, lengths)
    ragged = prepare_read(q, k, v, memory_lengths=lengths)
    with pytest.raises(ValueError, match="memory_lengths is required"):
        ragged.run(q, k, v)
    with pytest.raises(ValueError, match="memory_lengths must have shape"):
        ragged.run(q, k, v, lengths.long())
    with pytest.raises(ValueError, match=r"prepare_read: memory_lengths must be a \(B=2,\) int32"):
        prepare_read(q, k, v, memory_lengths=[50, 17])
    with pytest.raises(TypeError, match="not lists"):
        prepare_read(q, [k], [v])
    with pytest.raises(ValueError, match="similarity 'dot' or 'l2'"):
        prepare_read(q, k, v, similarity="xmem")
    with pytest.raises(RuntimeError, match="without its backward"):
        plan.run(*(t.requires_grad_() for t in (q, k, v)))


def test_outputs_are_written_whole(fresh_launches):
    """Every output element written (the fixture poisons new buffers with NaN)."""
    q, k, v = random_inputs(2, 1, 16, 24, 30, 50, torch.float32, "cpu")
    plan = prepare_read(q, k, v, return_lse=True)
    with poison_outputs():
        out, lse = plan.run(q, k, v)
    assert not out.isnan().any() and not lse.isnan().any()
