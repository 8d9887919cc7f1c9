"""memory_read_bwd_kernel_prepare, the backward's first kernel, against float64 torch: delta
(rowsum(dO * O) minus the incoming gradient of lse), dO and q copied with 16-aligned rows where
theirs are not, and dQ's float32 accumulator zeroed; every buffer NaN-poisoned beforehand,
inputs of ragged sizes and non-contiguous layouts (Triton's interpreter)."""
import pytest
import torch

from stm_kernels._buffers import poison_outputs
from stm_kernels.backends.triton import calls, kernel_arguments
from stm_kernels.backends.triton.backward_launcher import (_backward_inputs, _prepare_backward,
                                                           _prepare_tensors)

B, CV, QC = 3, 40, 17  # CV, QC: not multiples of the channel block (masked steps)


def _layout(t, transposed):
    """t itself, or the same values in a non-contiguous layout (positions outermost)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if transposed else t


def _case(dtype, batch_q, hw, transposed, grad_lse, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    grad_out = _layout(randn(B, CV, hw), transposed)
    out = randn(B, CV + 8, hw)[:, 4:CV + 4]  # a channel slice of a wider tensor
    q = _layout(randn(batch_q, QC, hw), transposed)
    d_lse = torch.randn(hw, B, generator=generator).t() if grad_lse else None  # strides (1, B)
    return grad_out, d_lse, q, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("batch_q, hw, transposed, grad_lse, atomic_dq", [
    (1, 30, False, False, True),    # rows 30 apart: both copied; a query shared by the objects
    (B, 77, True, True, True),      # non-contiguous dO and q, d lse given, a ragged last block
    (B, 32, False, True, False),    # rows already aligned: nothing copied; no dQ buffer
    (1, 100, True, False, False),
])
def test_prepare_kernel_matches_float64(dtype, batch_q, hw, transposed, grad_lse, atomic_dq):
    grad_out, d_lse, q, out = _case(dtype, batch_q, hw, transposed, grad_lse, seed=hw)
    call = calls._call(torch.empty(B, QC, 64, dtype=dtype), "backward", False)
    with poison_outputs(True):
        filled, prepare = _prepare_backward(call, grad_out, d_lse, q, out, atomic_dq, False)
    expected = (grad_out.double() * out.double()).sum(1)
    if d_lse is not None:
        expected -= d_lse.double()
    torch.testing.assert_close(filled["delta"].double(), expected, rtol=1e-5, atol=1e-5)
    assert filled["delta"].dtype == torch.float32 and filled["delta"].is_contiguous()
    copies = {"do_copy": grad_out, "q_copy": q}
    for name, source in copies.items():
        copied = filled[name]
        assert kernel_arguments._rows_aligned(copied, compact=name == "q_copy"), name
        if kernel_arguments._rows_aligned(source, compact=name == "q_copy"):
            assert copied is source, name  # read in place, not copied
        else:
            assert copied is not source and copied.data_ptr() != source.data_ptr(), name
            torch.testing.assert_close(copied, source, rtol=0, atol=0)
    inputs, delta, dq = _backward_inputs(filled, torch.empty(B, QC, 64), torch.zeros(B, hw), None)
    assert inputs["do"] is filled["do_copy"] and inputs["q"] is filled["q_copy"]
    assert delta is filled["delta"]
    if atomic_dq:
        assert dq.dtype == torch.float32 and dq.shape == q.shape
        assert dq.stride()[1:] == filled["q_copy"].stride()[1:]  # the dK/dQ kernel's strides
        assert torch.equal(dq, torch.zeros_like(dq))  # every element written (was NaN)
    else:
        assert dq is None


def test_a_kept_prepare_fills_new_buffers_on_every_call():
    # The kept launch writes the buffers of the call at hand, not the first call's.
    grad_out, d_lse, q, out = _case(torch.bfloat16, 1, 30, False, True, seed=0)
    call = calls._call(torch.empty(B, QC, 64, dtype=torch.bfloat16), "backward", False)
    with poison_outputs(True):
        first, prepare = _prepare_backward(call, grad_out, d_lse, q, out, True, False)
        grad_out2, d_lse2, q2, out2 = _case(torch.bfloat16, 1, 30, False, True, seed=1)
        second = _prepare_tensors(grad_out2, d_lse2, q2, out2, True)
        prepare(call, **second)
    expected = (grad_out2.double() * out2.double()).sum(1) - d_lse2.double()
    torch.testing.assert_close(second["delta"].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second["do_copy"], grad_out2, rtol=0, atol=0)
    torch.testing.assert_close(second["q_copy"], q2, rtol=0, atol=0)
    assert torch.equal(second["dq"], torch.zeros_like(second["dq"]))
    assert second["delta"].data_ptr() != first["delta"].data_ptr()
