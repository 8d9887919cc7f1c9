"""The read captured in a CUDA graph (GPU only): at a few memory frames the host's work outweighs
the kernels' (docs/kernels.md), and a captured graph replays the kernels without it. One eager
call first compiles the kernels, chooses their configs and keeps the prepared launches; the
capture then records launches only, and a replay reads whatever the captured input tensors
hold by then.
"""
import pytest
import torch

from reference import reference_read, reference_usage
from helpers import TOLERANCE, captured_graph, random_inputs, relative_error
from stm_kernels import memory_read, memory_usage

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_a_captured_read_replays_on_new_inputs(similarity):
    dtype = torch.bfloat16
    static = random_inputs(2, 1, 64, 96, 300, 4000, dtype, "cuda", seed=0)

    def read(q, k, v):
        with torch.no_grad():
            return memory_read(q, k, v, backend="triton", similarity=similarity,
                               return_lse=True)

    graph, (out, lse) = captured_graph(read, *static)
    for seed in (1, 2):
        fresh = random_inputs(2, 1, 64, 96, 300, 4000, dtype, "cuda", seed=seed)
        for captured, new in zip(static, fresh, strict=True):
            captured.copy_(new)
        graph.replay()
        expected, expected_lse, _ = reference_read(*fresh, similarity=similarity)
        assert relative_error(out, expected) < TOLERANCE[dtype]
        assert relative_error(lse, expected_lse) < 1e-3


def test_a_captured_top_k_read_and_usage_replay_on_new_inputs():
    dtype = torch.float16
    static = random_inputs(2, 1, 64, 96, 300, 4000, dtype, "cuda", seed=3)

    def read(q, k, v):
        with torch.no_grad():
            out, lse = memory_read(q, k, v, backend="triton", top_k=20, return_lse=True)
            return out, memory_usage(q, k, lse, backend="triton")

    graph, (out, usage) = captured_graph(read, *static)
    fresh = random_inputs(2, 1, 64, 96, 300, 4000, dtype, "cuda", seed=4)
    for captured, new in zip(static, fresh, strict=True):
        captured.copy_(new)
    graph.replay()
    expected, lse, _ = reference_read(*fresh, top_k=20)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    # usage under the read's own lse: the probabilities of every position (XMem's usage)
    assert relative_error(usage, reference_usage(fresh[0], fresh[1], lse)) < 1e-2
