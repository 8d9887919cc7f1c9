"""Key widths one channel past a tile width (257 = XMem's 2 * 128 + 1): the Triton kernels read
them on 256-wide tiles with the last channel as a rank-1 score term u_i w_j, and return its
gradients as the last channel of dq and dk. Against the float64 reference of the official read,
with the last channel made as large as the other 256 together, so that a dropped term or
gradient is far outside the bounds (checked on its own too)."""
import contextlib

import pytest
import torch

from bench.common import deterministic_algorithms
from helpers import (DEVICES, TOLERANCE, check_read, per_object_reference, random_inputs,
                     ragged_read_with_grads, read_with_grads, reference_with_grads,
                     relative_error, skip_unless_runnable)
from reference import reference_read
from stm_kernels import FallbackWarning, memory_read, memory_usage, poison_outputs
from stm_kernels.backends.triton import calls, running, tilings
from stm_kernels.backends.triton.launch import (BackwardConfig, DkdqConfig, DqConfig, DvConfig,
                                                ForwardConfig, use_configs)
from stm_kernels.backends.triton.tilings import SelectConfig, UsageConfig
from stm_kernels.topk import topk_scores

CHANNELS = 257
SCALE = 0.1


@pytest.fixture(autouse=True)
def _poisoned():
    with poison_outputs():  # an output element the kernels never write stays NaN
        yield


def rank1_inputs(B, Bq, Cv, HW, N, dtype, device, seed):
    """Random q, k, v of 257 key channels whose last channel carries about half of q.k."""
    q, k, v = random_inputs(B, Bq, CHANNELS, Cv, HW, N, torch.float64, "cpu", seed=seed)
    q[:, -1] *= 4
    k[:, -1] *= 4
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def check_last_channel(results, expected, dtype):
    """dq's and dk's last channel (the rank-1 term's gradients) against the reference alone."""
    for name, index in (("dq", 2), ("dk", 3)):
        error = relative_error(results[index][:, -1], expected[index][:, -1])
        assert error < 3 * TOLERANCE[dtype], f"{name}[:, -1]: relative error {error:.2e}"


def _skip(device, dtype=torch.float32):
    # bf16 runs here: the kernels' UPCAST computes its dots in fp32 in the interpreter
    skip_unless_runnable("triton", device, torch.float32 if dtype == torch.bfloat16 else dtype)


def test_the_launcher_takes_257_channels_to_the_256_wide_tiles():
    """The plan of a 257-channel memory: 256 tiled channels and the rank-1 last one, key width
    class 257 (the tables' own entries, else the 256-wide ones); 129 and 256 channels keep
    their tile; 258 has no tiling."""
    plans = {channels: calls._plan_call(torch.empty(1, channels, 4, device="meta"))
             for channels in (129, 256, 257, 258)}
    if plans[257][0] is None:
        pytest.skip(f"no Triton kernels here: {plans[257][1]}")
    call = plans[257][0]
    assert call.rank1 and call.width == 257
    assert tilings.key_widths(257) == (257, 256) and tilings.key_widths(256) == (256,)
    sm_90 = tilings.ARCHITECTURES["sm_90"]  # its own 257 entry, else the 256 one
    assert sm_90.candidates("dkdq", "16-bit", 257) == sm_90.tilings[("dkdq", "16-bit", 257)]
    assert sm_90.candidates("dv", "16-bit", 257) == sm_90.candidates("dv", "16-bit", 256)
    assert not plans[129][0].rank1 and plans[129][0].width == 256
    assert not plans[256][0].rank1 and plans[256][0].width == 256
    assert plans[258][0] is None and "258 key channels (a 512-wide key tile)" in plans[258][1]
    flags = calls._launch_flags(call, [torch.empty(1, 257, 4, device="meta")] * 3, [])
    assert (flags["CK"], flags["BLOCK_CK"], flags["RANK1"]) == (256, 256, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Bq", [1, 2])
def test_a_257_channel_dot_read_and_its_gradients(device, dtype, Bq):
    """Forward, lse and dq, dk, dv (the last channels included) of a plain dot read, with a
    shared and a per-object query, ragged last blocks (HW 37, N 70)."""
    _skip(device, dtype)
    q, k, v = rank1_inputs(2, Bq, 24, 37, 70, dtype, device, seed=30)
    results = read_with_grads(q, k, v, backend="triton", scale=SCALE)
    expected = reference_with_grads(q, k, v, scale=SCALE)
    check_read(results, expected, dtype)
    check_last_channel(results, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_257_channels_with_memory_splits_value_chunks_and_the_deterministic_backward(device):
    """Flash-decoding memory splits and value chunks in the forward; value chunks streamed
    through dP; the deterministic backward (dQ and du from the dQ kernel, no atomics) equal to
    the reference and bitwise repeatable."""
    _skip(device)
    q, k, v = rank1_inputs(2, 1, 40, 37, 150, torch.float32, device, seed=31)
    expected = reference_with_grads(q, k, v, scale=SCALE)
    backward = BackwardConfig(DvConfig(block_n=16, block_m=16, block_v=16, num_warps=4),
                              DkdqConfig(block_n=16, block_m=16, block_cv=16, num_warps=4),
                              DqConfig(block_m=16, block_n=16, block_cv=16, splits=3))
    forward = ForwardConfig(block_m=16, block_n=16, block_v=16, num_warps=4, num_stages=1,
                            splits=3)
    with use_configs(forward=forward, backward=backward):
        results = read_with_grads(q, k, v, backend="triton", scale=SCALE)
        check_read(results, expected, torch.float32)
        check_last_channel(results, expected, torch.float32)
        with deterministic_algorithms():
            first = read_with_grads(q, k, v, backend="triton", scale=SCALE)
            second = read_with_grads(q, k, v, backend="triton", scale=SCALE)
    check_read(first, expected, torch.float32)
    check_last_channel(first, expected, torch.float32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("stream_tiles", [False, True], ids=["held", "streamed"])
def test_257_channels_over_a_ragged_nan_padded_strided_memory(device, deterministic,
                                                               stream_tiles):
    """A ragged memory whose padding is NaN, read in place from a slice of a larger bank with
    channel-last values and a strided query: per-object reads of the reference, zero
    gradients past each length (the last key channel's too), with the kernels' loop-invariant
    tiles held through their loops or loaded in every step (the forward's and the
    deterministic dQ's queries, the backward's keys)."""
    _skip(device)
    q, k, v = rank1_inputs(3, 1, 24, 30, 100, torch.float32, device, seed=32)
    lengths = [100, 33, 1]
    key_bank = torch.full((3, CHANNELS, 128), float("nan"), device=device)
    key_bank[:, :, :100] = k
    value_bank = torch.full((3, 128, 24), float("nan"), device=device)
    value_bank[:, :100] = v.transpose(1, 2)
    query = torch.zeros(1, CHANNELS, 60, device=device)
    query[:, :, ::2] = q
    k, v, q = key_bank[:, :, :100], value_bank[:, :100].transpose(1, 2), query[:, :, ::2]
    assert not (k.is_contiguous() or v.is_contiguous() or q.is_contiguous())
    for b, length in enumerate(lengths):
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("nan")
    generator = torch.Generator().manual_seed(4)
    cotangents = (torch.randn(3, 24, 30, generator=generator, dtype=torch.float64),
                  torch.randn(3, 30, generator=generator, dtype=torch.float64))
    streamed = dict(
        forward=ForwardConfig(block_m=16, block_n=32, num_warps=4, num_stages=1,
                              stream_queries=True),
        dv=DvConfig(block_n=32, block_m=16, num_warps=4, stream_keys=True),
        dkdq=DkdqConfig(block_n=32, block_m=16, block_cv=16, num_warps=4, stream_keys=True),
        dq=DqConfig(block_m=16, block_n=32, block_cv=16, splits=2, stream_queries=True))
    with deterministic_algorithms() if deterministic else contextlib.nullcontext(), \
            use_configs(**streamed) if stream_tiles else contextlib.nullcontext():
        results = ragged_read_with_grads(q, k, v, torch.tensor(lengths, device=device),
                                         cotangents, backend="triton", scale=SCALE)
    expected = per_object_reference(q, k, v, lengths, cotangents, scale=SCALE)
    check_read(results, expected, torch.float32)
    check_last_channel(results, expected, torch.float32)
    for b, length in enumerate(lengths):
        assert (results[3][b, :, length:] == 0).all() and (results[4][b, :, length:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", ["held", "streamed", "chunked"])
def test_257_channel_top_k_selection_and_usage(device, tiles):
    """The fused selection's scores and positions and the usage kernel's sums include the
    rank-1 term (their loop-invariant tiles held, or loaded in every step: the selection's
    queries, the usage's keys; or the selection's scores summed over 64-channel chunks of the
    256 tiled ones): against the float64 scores of the whole 257 channels."""
    _skip(device)
    q, k, _ = rank1_inputs(2, 1, 8, 20, 90, torch.float32, device, seed=33)
    lengths = torch.tensor([90, 41], device=device)
    dense = torch.bmm(k.double().cpu().transpose(1, 2), q.double().cpu().expand(2, -1, -1))
    dense = (dense * SCALE).masked_fill((torch.arange(90)[None, :] >= lengths.cpu()[:, None])
                                        .unsqueeze(2), float("-inf"))  # (B, N, HW)
    streamed = dict(
        select=SelectConfig(block_m=16, num_warps=4, num_stages=1, stream_queries=True),
        usage=UsageConfig(block_n=32, block_m=16, num_warps=4, num_stages=1, stream_keys=True))
    chunked = dict(select=SelectConfig(block_m=16, num_warps=4, num_stages=1, block_ck=64))
    lse = torch.logsumexp(dense, dim=1)  # (B, HW)
    configs = dict(held=None, streamed=streamed, chunked=chunked)[tiles]
    with use_configs(**configs) if configs else contextlib.nullcontext():
        scores, indices = topk_scores(q, k, 8, scale=SCALE, memory_lengths=lengths,
                                      backend="triton")
        usage = memory_usage(q, k, lse.float().to(device), scale=SCALE, memory_lengths=lengths,
                             backend="triton")
    best = dense.transpose(1, 2).topk(8, dim=2).values  # (B, HW, 8)
    assert relative_error(scores, best) < 1e-5
    assert relative_error(dense.transpose(1, 2).gather(2, indices.cpu()), best) < 1e-5
    assert relative_error(usage, torch.exp(dense - lse[:, None]).sum(2)) < 1e-5
    assert (usage[1, 41:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_257_channels_with_the_l2_similarity_read_with_torch(device, monkeypatch):
    """l2's per-position term holds |k|^2, so its 257-channel read is the torch backend's,
    with one warning saying so."""
    _skip(device)
    monkeypatch.setattr(running, "_warned", set())
    q, k, v = random_inputs(1, 1, CHANNELS, 8, 10, 20, torch.float32, device, seed=34)
    with pytest.warns(FallbackWarning, match="l2 similarity with a key channel past the tile"):
        out = memory_read(q, k, v, backend="triton", similarity="l2", scale=SCALE)
    expected = reference_read(q, k, v, similarity="l2", scale=SCALE)[0]
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
