"""One captured CUDA graph of a FixedCapacityMemory's read replayed at many memory lengths (GPU
only): the storage and the lengths keep their addresses, the lengths are set on the host between
replays, and every replay equals an eager read of the same memory and the float64 read of each
object's prefix. The CPU half of this (the checks, the NaN tails, the plans, the gradients) is
test_fixed_capacity.py.
"""
import pytest
import torch

from helpers import TOLERANCE, captured_graph, relative_error
from stm_kernels import FixedCapacityMemory, memory_read

pytestmark = pytest.mark.gpu

B, CK, CV, HW, CAPACITY = 2, 64, 96, 300, 4096


def _reference(q, k, v, lengths):
    """float64 (out, lse) of object b's first lengths[b] positions: einsum and softmax."""
    outs, lses = [], []
    for b, length in enumerate(lengths):
        qb, kb, vb = q[0].double(), k[b, :, :length].double(), v[b, :, :length].double()
        scores = torch.einsum("cn,ci->ni", kb, qb) * CK ** -0.5
        outs.append(torch.einsum("cn,ni->ci", vb, torch.softmax(scores, dim=0)))
        lses.append(torch.logsumexp(scores, dim=0))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_captured_read_serves_every_length_up_to_the_capacity(dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype)

    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY, dtype=dtype, device="cuda",
                                       fill=float("nan"))
    q = randn(1, CK, HW)
    memory.append(randn(B, CK, 1000), randn(B, CV, 1000))

    def read():
        with torch.no_grad():
            return memory.read(q, backend="triton", return_lse=True)

    graph, (out, lse) = captured_graph(read)
    filled = 1000
    for lengths in ([1000, 1000], [1500, 700], [CAPACITY, 1], [1, 2048], [CAPACITY, CAPACITY]):
        if max(lengths) > filled:  # new frames written in place, past the old lengths
            memory.keys[:, :, filled:max(lengths)] = randn(B, CK, max(lengths) - filled)
            memory.values[:, :, filled:max(lengths)] = randn(B, CV, max(lengths) - filled)
            filled = max(lengths)
        memory.set_lengths(lengths)
        graph.replay()
        eager, eager_lse = read()
        torch.cuda.synchronize()
        assert relative_error(out, eager) < 1e-6, lengths
        assert relative_error(lse, eager_lse) < 1e-6, lengths
        expected, expected_lse = _reference(q, memory.keys, memory.values, lengths)
        assert relative_error(out, expected) < TOLERANCE[dtype], lengths
        assert relative_error(lse, expected_lse) < 1e-3, lengths
    assert memory.keys[:, :, filled:].isnan().all()


def test_a_plain_tensors_lengths_are_refused_under_a_real_capture():
    memory = FixedCapacityMemory.empty(B, CK, CV, 512, dtype=torch.float16, device="cuda")
    memory.append(torch.randn(B, CK, 100, device="cuda"), torch.randn(B, CV, 100, device="cuda"))
    q = torch.randn(1, CK, HW, device="cuda", dtype=torch.float16)
    plain = memory.lengths.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="^memory_lengths under CUDA graph capture must be a "
                                         "FixedCapacityMemory's lengths"):
        with torch.cuda.graph(graph):
            memory_read(q, memory.keys, memory.values, memory_lengths=plain, backend="triton")
