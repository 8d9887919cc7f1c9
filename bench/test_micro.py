"""Micro benchmarks of the CPU paths (pytest-benchmark), outside the default test run:

    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-json bench/results/micro_cpu.json

Sizes are one 240x432 frame of queries (HW = 405) against 16 memory frames (N = 6,480), the
official channel sizes (Ck = 128, Cv = 512); each benchmark also checks its result, so a fast
wrong path cannot pass.
"""
import math

import numpy as np
import pytest
import torch

from stm_kernels import memory_read, merge_reads
from stm_kernels import naive_memory_read

HW, N, CK, CV = 405, 16 * 405, 128, 512


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, CK, HW, generator=generator)
    k = torch.randn(2, CK, N, generator=generator)
    v = torch.randn(2, CV, N, generator=generator)
    reference = naive_memory_read(q.double(), k.double(), v.double(), 1 / math.sqrt(CK), False)[0]
    return q, k, v, reference.float()


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_read_forward(benchmark, inputs, backend):
    q, k, v, reference = inputs
    with torch.no_grad():
        out = benchmark(memory_read, q, k, v, backend=backend)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_read_forward_backward(benchmark, inputs, backend):
    q, k, v, _ = (t.clone().requires_grad_() if i < 3 else t for i, t in enumerate(inputs))
    grad = torch.randn(2, CV, HW, generator=torch.Generator().manual_seed(1))

    def step():
        for tensor in (q, k, v):
            tensor.grad = None
        memory_read(q, k, v, backend=backend).backward(grad)
    benchmark(step)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_merge_four_chunks(benchmark, inputs):
    q, k, v, reference = inputs
    with torch.no_grad():
        parts = [memory_read(q, kc, vc, backend="torch", return_lse=True)
                 for kc, vc in zip(k.chunk(4, dim=2), v.chunk(4, dim=2), strict=True)]
    outs, lses = zip(*parts, strict=True)
    out, _ = benchmark(merge_reads, outs, lses)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_memory_bank_add_and_read(benchmark):
    from stm_model.memory.bank import MemoryBank
    keys = torch.randn(1, CK, 15, 27)
    values = torch.randn(1, CV, 15, 27)

    def fill_and_read():
        bank = MemoryBank(1, CK, CV, 15, 27)
        for t in range(40):
            bank.add(keys, values, permanent=t % 5 == 0, frame_index=t)
        return bank.read(keys)
    out = benchmark(fill_and_read)
    assert out.shape == (1, CV, 15, 27) and torch.isfinite(out).all()


def test_segmenter_step_small_model(benchmark):
    from stm_model import STM, STMConfig
    from stm_model.inference.video_segmenter import VideoSegmenter
    torch.manual_seed(0)
    segmenter = VideoSegmenter(STM(STMConfig.small()), mem_every=5)
    frame = torch.rand(3, 128, 224)
    mask = torch.zeros(128, 224, dtype=torch.int64)
    mask[40:90, 60:140] = 1
    segmenter.step(frame, mask=mask)
    with torch.inference_mode():
        probs = benchmark(segmenter.step, frame)
    assert probs.shape == (2, 128, 224)
    torch.testing.assert_close(probs.sum(0), torch.ones(128, 224))


def test_jf_of_a_480p_frame(benchmark):
    from stm_model import metrics
    rng = np.random.default_rng(0)
    gt = np.zeros((1, 480, 854), np.uint8)
    gt[0, 100:380, 200:600] = 1
    pred = gt.copy()
    pred[0, 90:370, 210:610] = 1
    pred[0, rng.integers(0, 480, 500), rng.integers(0, 854, 500)] = 1
    result = benchmark(metrics.evaluate_sequence, gt, pred)
    assert 0.5 < result["J"].mean() < 1
