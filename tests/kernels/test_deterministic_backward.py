"""The Triton backward under torch.use_deterministic_algorithms(True): dQ comes from
memory_read_bwd_kernel_dq (partials per memory split, summed in a fixed order) instead of the
dK/dQ kernel's atomics; values against the float64 reference, repeats bitwise equal."""
import pytest
import torch

from bench.common import deterministic_algorithms
from helpers import (DEVICES, check_read, per_object_reference, ragged_case, ragged_read_with_grads,
                     random_inputs, read_with_grads, reference_with_grads, skip_unless_runnable)
from stm_kernels.backends.triton import backward_launcher
from stm_kernels import poison_outputs
from stm_kernels.backends.triton.launch import (BackwardConfig, DkdqConfig, DqConfig, DvConfig,
                                           use_configs)

# Memory splits (3) with value chunks streamed through dP, whole dO tiles without splits, and
# the loop-invariant tiles streamed: the dK kernel's keys per query step, the dQ kernel's
# queries per memory step.
CONFIGS = {
    "stream-tiles": BackwardConfig(DvConfig(block_n=32, block_m=16, num_warps=4),
                                   DkdqConfig(block_n=32, block_m=16, block_cv=16, num_warps=4,
                                              stream_keys=True),
                                   DqConfig(block_m=16, block_n=32, block_cv=16, splits=2,
                                            stream_queries=True)),
    "split-streamed": BackwardConfig(DvConfig(block_n=16, block_m=16, block_v=16, num_warps=4),
                                     DkdqConfig(block_n=16, block_m=16, block_cv=16, num_warps=4),
                                     DqConfig(block_m=16, block_n=16, block_cv=16, splits=3)),
    "whole-dO": BackwardConfig(DvConfig(block_n=32, block_m=32, num_warps=4),
                               DkdqConfig(block_n=32, block_m=32, num_warps=4),
                               DqConfig(block_m=32, block_n=32, splits=1)),
}


@pytest.fixture(autouse=True)
def _poisoned():
    with poison_outputs():
        yield


@pytest.fixture
def dq_launches(monkeypatch):
    """Counts launches of the deterministic dQ kernel."""
    kernel = backward_launcher.memory_read_bwd_kernel_dq
    grids = []

    class Counting:  # the kernel itself, its launches counted
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

        def __getattr__(self, name):  # __name__, warmup, ...: what a compiled launch reads
            return getattr(kernel, name)
    monkeypatch.setattr(backward_launcher, "memory_read_bwd_kernel_dq", Counting())
    return grids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("query", ["batch-1", "per-object", "expanded"])
def test_deterministic_gradients_match_reference_and_repeat_bitwise(device, config, similarity,
                                                                    query, dq_launches):
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 2 if query == "per-object" else 1, 24, 40, 37, 150,
                            torch.float32, device, seed=21)
    if query == "expanded":  # stride 0: one query read by both objects, a gradient per object
        q = q.expand(2, -1, -1)
    with use_configs(backward=config), deterministic_algorithms():
        first = read_with_grads(q, k, v, backend="triton", similarity=similarity)
        second = read_with_grads(q, k, v, backend="triton", similarity=similarity)
    assert len(dq_launches) == 2
    check_read(first, reference_with_grads(q, k, v, similarity=similarity), torch.float32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_without_the_flag_dq_comes_from_the_atomics(device, dq_launches):
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 1, 16, 24, 20, 40, torch.float32, device, seed=22)
    results = read_with_grads(q, k, v, backend="triton")
    assert dq_launches == []
    check_read(results, reference_with_grads(q, k, v), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_deterministic_ragged_memory(device, similarity, dq_launches):
    """Splits past an object's length store zero partials; padding gets zero dK, dV."""
    skip_unless_runnable("triton", device)
    q, k, v, lengths, cotangents = ragged_case(device, seed=23, cotangent_seed=4)
    with use_configs(backward=CONFIGS["split-streamed"]), deterministic_algorithms():
        results = ragged_read_with_grads(q, k, v, torch.tensor(lengths, device=device),
                                         cotangents, backend="triton", similarity=similarity)
    assert len(dq_launches) == 1
    check_read(results, per_object_reference(q, k, v, lengths, cotangents,
                                             similarity=similarity), torch.float32)
    assert (results[3][1, :, 20:] == 0).all() and (results[4][1, :, 20:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_deterministic_half_precision_on_gpu(dtype, dq_launches):
    """GPU default configs in half precision: the values, and bitwise repeats (the atomics
    path is not expected to repeat bitwise; the deterministic one must)."""
    skip_unless_runnable("triton", "cuda", dtype)
    q, k, v = random_inputs(3, 1, 128, 512, 333, 16200 - 8, dtype, "cuda", seed=24)
    with deterministic_algorithms():
        first = read_with_grads(q, k, v, backend="triton", similarity="l2")
        second = read_with_grads(q, k, v, backend="triton", similarity="l2")
    assert len(dq_launches) == 2
    check_read(first, reference_with_grads(q, k, v, similarity="l2"), dtype)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_int64_offsets_and_a_strided_unaligned_memory(device, forced_int64,
                                                                    dq_launches):
    """The forced int64 in-tile offsets, and a memory slice of a larger bank whose channel
    stride (101) is not a multiple of any power of two."""
    skip_unless_runnable("triton", device)
    q, k_bank, v_bank = random_inputs(2, 1, 16, 24, 40, 101, torch.float32, device, seed=25)
    k, v = k_bank[:, :, :90], v_bank[:, :, 5:95]
    assert not k.is_contiguous() and not v.is_contiguous()
    with use_configs(backward=CONFIGS["split-streamed"]), deterministic_algorithms():
        results = read_with_grads(q, k, v, backend="triton", similarity="l2")
    assert len(dq_launches) == 1
    check_read(results, reference_with_grads(q, k, v, similarity="l2"), torch.float32)
    assert forced_int64 and all(forced_int64)  # every kernel took the int64 path
