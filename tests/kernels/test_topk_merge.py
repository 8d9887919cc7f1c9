"""memory_read_topk_merge_kernel, the selection's second kernel: the top_k best of its memory
splits' packed keys, best first, decoded to scores in natural units and memory indices, against
a reference in Python integers and floats (Triton's interpreter). Keys hold unfilled slots
(MIN_KEY), positions past the memory (-inf scores), signed zeros; splits not a power of two, a
top_k below the kernel's power of two, a ragged last block of query rows; the scores' buffer
NaN-poisoned beforehand."""
import math
import random
import struct

import pytest
import torch

from stm_kernels._buffers import poison_outputs
from stm_kernels.backends.triton import calls
from stm_kernels.backends.triton.kernels.topk import MIN_KEY
from stm_kernels.backends.triton.selection_launchers import _merge_selection, _select_outputs

B, N = 2, 5000


def _key(score, index):
    """The top-k kernel's int64 key of a base-2 float32 score at a memory index (kernels/topk.py
    _packed): order-preserving score bits high, 0xFFFFFFFF - index low."""
    bits = struct.unpack("<i", struct.pack("<f", score))[0]
    mono = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return (mono << 32) | (0xFFFFFFFF - index)


def _decoded(key):
    """(natural-unit score, index) of a key; (-inf, -1) for an unfilled or -inf one."""
    high = key >> 32
    bits = high ^ 0x7FFFFFFF if high < 0 else high
    score = struct.unpack("<f", struct.pack("<i", bits))[0]
    if math.isnan(score) or score == float("-inf"):
        return float("-inf"), -1
    return score * math.log(2.0), 0xFFFFFFFF - (key & 0xFFFFFFFF)


def _split_keys(splits, hw, top_k_pow2, seed):
    """(keys (splits, B, hw, top_k_pow2) int64, as the top-k kernel writes them: each split's
    row sorted best first, unfilled slots MIN_KEY; the memory indices of one row distinct)."""
    rng = random.Random(seed)
    special = [float("-inf"), 0.0, -0.0]
    keys = torch.empty(splits, B, hw, top_k_pow2, dtype=torch.int64)
    for b in range(B):
        for m in range(hw):
            indices = iter(rng.sample(range(N), splits * top_k_pow2))
            for s in range(splits):
                filled = rng.randint(0, top_k_pow2) if m % 7 else 0  # some rows empty
                row = [_key(rng.choice(special) if rng.random() < 0.2 else rng.gauss(0, 4),
                            next(indices)) for _ in range(filled)]
                row = sorted(row, reverse=True) + [MIN_KEY] * (top_k_pow2 - filled)
                keys[s, b, m] = torch.tensor(row, dtype=torch.int64)
    return keys


@pytest.mark.parametrize("splits, hw, top_k, top_k_pow2", [
    (1, 37, 5, 8),     # one split: decoding alone; a top_k below the kernel's power of two
    (3, 70, 8, 8),     # splits not a power of two, a ragged last block of rows
    (5, 130, 16, 16),
    (2, 9, 1, 1),
])
def test_merge_kernel_matches_the_reference(splits, hw, top_k, top_k_pow2):
    keys = _split_keys(splits, hw, top_k_pow2, seed=hw)
    call = calls._call(torch.empty(B, 16, 64), "select", False)
    with poison_outputs(True):
        scores, indices, _ = _merge_selection(call, keys, top_k, False)
    assert scores.shape == indices.shape == (B, hw, top_k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    for b in range(B):
        for m in range(hw):
            best = sorted(keys[:, b, m].flatten().tolist(), reverse=True)[:top_k]
            expected = [_decoded(key) for key in best]
            assert indices[b, m].tolist() == [index for _, index in expected], (b, m)
            torch.testing.assert_close(scores[b, m], torch.tensor(
                [score for score, _ in expected], dtype=torch.float32), rtol=1e-6, atol=0)
    assert not scores.isnan().any()


def test_decoding_gives_natural_scores_indices_and_empty_slots():
    """Scores back in natural units, indices, and -inf / -1 both for an unfilled slot (MIN_KEY)
    and for a position past the memory (a -inf score); -0.0 sorts below 0.0."""
    log2e = 1 / math.log(2)
    cases = [(2.5, 7), (-3.25, 0), (0.0, 123456), (-0.0, 5), (float("-inf"), 9)]
    row = [_key(score * log2e, index) for score, index in cases] + [MIN_KEY] * 3
    keys = torch.tensor(row, dtype=torch.int64).view(1, 1, 1, 8).expand(1, B, 1, 8).contiguous()
    call = calls._call(torch.empty(B, 16, 64), "select", False)
    scores, indices, _ = _merge_selection(call, keys, 6, False)
    torch.testing.assert_close(scores[0, 0], torch.tensor(
        [2.5, 0.0, -0.0, -3.25, float("-inf"), float("-inf")]), rtol=1e-6, atol=0)
    assert indices[0, 0].tolist() == [7, 123456, 5, 0, -1, -1]


def test_a_kept_merge_writes_the_buffers_of_each_call():
    call = calls._call(torch.empty(B, 16, 64), "select", False)
    first = _split_keys(3, 20, 8, seed=0)
    _, _, merge = _merge_selection(call, first, 8, False)
    second = _split_keys(3, 20, 8, seed=1)
    scores, indices = _select_outputs(second, 8)
    merge(call, keys=second, scores=scores, indices=indices)
    expected, _, _ = _merge_selection(call, second, 8, False)
    assert torch.equal(scores, expected) and not torch.equal(scores, _merge_selection(
        call, first, 8, False)[0])
