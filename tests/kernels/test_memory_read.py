"""memory_read (triton and torch backends) against a float64 reference of the official read."""
import itertools
import math

import pytest
import torch

from reference import reference_read
from helpers import (DEVICES, TOLERANCE, check_read, per_object_reference, ragged_case,
                     ragged_read_with_grads, random_inputs, read_with_grads,
                     reference_with_grads, relative_error, skip_unless_runnable)
from stm_kernels import memory_read, merge_reads, poison_outputs
from stm_kernels import torch_common
from stm_kernels.backends.triton import launch as triton_module
from stm_kernels.backends.triton import calls, gluon_opt_in, kernel_arguments, running
from stm_kernels.backends.triton.launch import (BackwardConfig, DkdqConfig, DvConfig, ForwardConfig,
                                           use_configs)


@pytest.fixture(autouse=True)
def _poisoned():
    with poison_outputs():
        yield


# (B, Bq, Ck, Cv, HW, N): ragged sizes, a broadcast query, N = 1 and HW = 1.
SHAPES = [
    (2, 2, 20, 40, 45, 111),
    (3, 1, 32, 24, 70, 63),
    (1, 1, 16, 16, 1, 1),
    (2, 1, 8, 20, 33, 1),
    (1, 1, 24, 8, 1, 90),
]
BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_read_and_gradients_match_float64_reference(device, backend, dtype, similarity, shape):
    skip_unless_runnable(backend, device, dtype)
    B, Bq, Ck, Cv, HW, N = shape
    q, k, v = random_inputs(B, Bq, Ck, Cv, HW, N, dtype, device)
    results = read_with_grads(q, k, v, backend=backend, similarity=similarity)
    assert results[0].dtype == dtype and results[1].dtype == torch.float32
    assert results[2].shape == q.shape and results[2].dtype == dtype
    check_read(results, reference_with_grads(q, k, v, similarity=similarity), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_layout_custom_scale_and_broadcast(device, backend):
    """(H, W) query and (T, H, W) memory, batch-1 and stride-0 expanded queries, custom scale."""
    skip_unless_runnable(backend, device)
    B, Ck, Cv = 3, 16, 24
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, Ck, 5, 7, generator=generator).to(device)
    k = torch.randn(B, Ck, 2, 6, 9, generator=generator).to(device)
    v = torch.randn(B, Cv, 2, 6, 9, generator=generator).to(device)
    expected = reference_with_grads(q.flatten(2), k.flatten(2), v.flatten(2), scale=0.3)
    for query in (q, q.expand(B, -1, -1, -1)):
        out, lse, dq, dk, dv = read_with_grads(query, k, v, backend=backend, scale=0.3)
        assert out.shape == (B, Cv, 5, 7) and lse.shape == (B, 5, 7)
        assert dq.shape == query.shape and dk.shape == k.shape and dv.shape == v.shape
        dq = dq.sum(0, keepdim=True)  # the expanded query's gradient is per object
        results = [out.flatten(2), lse.flatten(1), dq.flatten(2), dk.flatten(2), dv.flatten(2)]
        check_read(results, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("scale", [-0.4, 0.0, 0.25])
def test_gradients_carry_the_scale_its_sign_and_zero(device, deterministic, similarity, scale):
    """The kernels put the score's factor (scale, 2 scale for l2) into dS themselves, so the
    gradients' scaling rests on them: a negative scale flips it, a zero one zeroes dq and dk
    (and makes the read a plain mean of the values), in both ways of computing dQ."""
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 1, 16, 24, 30, 70, torch.float32, device, seed=2)
    torch.use_deterministic_algorithms(deterministic)
    try:
        results = read_with_grads(q, k, v, backend="triton", similarity=similarity,
                                  scale=scale)
    finally:
        torch.use_deterministic_algorithms(False)
    check_read(results, reference_with_grads(q, k, v, similarity=similarity, scale=scale),
               torch.float32)
    if scale == 0.0:
        assert not results[2].any() and not results[3].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_memory_is_read_in_place(device, backend):
    """A slice of a preallocated bank (T < capacity), channel-last storage and a query slice."""
    skip_unless_runnable(backend, device)
    B, Ck, Cv, H, W, T = 2, 16, 20, 4, 5, 3
    generator = torch.Generator().manual_seed(4)
    key_bank = torch.randn(B, Ck, 8, H, W, generator=generator).to(device)
    value_bank = torch.randn(B, 8, H, W, Cv, generator=generator).to(device).permute(0, 4, 1, 2, 3)
    query = torch.randn(B, Ck * 2, H, W, generator=generator).to(device)[:, ::2]
    k, v = key_bank[:, :, :T], value_bank[:, :, :T]
    assert not k.is_contiguous() and not v.is_contiguous() and not query.is_contiguous()
    # The flattened memory must still view the bank: no copy of the whole bank.
    assert k.flatten(2).data_ptr() == key_bank.data_ptr()
    assert v.flatten(2).data_ptr() == value_bank.data_ptr()
    results = read_with_grads(query, k, v, backend=backend)
    check_read(results, reference_with_grads(query, k, v), torch.float32)


SPLIT_CONFIGS = [
    (ForwardConfig(block_m=16, block_n=16, block_v=16, num_warps=4, num_stages=1, splits=3),
     BackwardConfig(DvConfig(block_n=16, block_m=16, block_v=16, num_warps=4),
                    DkdqConfig(block_n=16, block_m=16, num_warps=4, block_cv=16))),
    (ForwardConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, splits=2),
     BackwardConfig(DvConfig(block_n=32, block_m=16, block_v=16, num_warps=4),
                    DkdqConfig(block_n=16, block_m=32, num_warps=4))),
    (ForwardConfig(block_m=16, block_n=32, block_v=16, num_warps=4, num_stages=1, splits=2,
                   stream_queries=True),
     BackwardConfig(DvConfig(block_n=32, block_m=16, block_v=16, num_warps=4, stream_keys=True),
                    DkdqConfig(block_n=32, block_m=16, num_warps=4, block_cv=16,
                               stream_keys=True))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("configs", SPLIT_CONFIGS, ids=["vsplit-3", "memsplit-2", "streamed"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_triton_memory_and_value_splits(device, configs, similarity):
    """Flash-decoding memory splits, value-channel splits (dV), value-channel chunks streamed
    through the dP reduction (dK/dQ), query tiles streamed per memory step (forward) and key
    tiles per query step (dV, dK/dQ) are exact."""
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 1, 24, 40, 37, 150, torch.float32, device, seed=5)
    with use_configs(*configs):
        results = read_with_grads(q, k, v, backend="triton", similarity=similarity)
    check_read(results, reference_with_grads(q, k, v, similarity=similarity), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_reads_equals_one_read_over_the_whole_memory(device, backend):
    skip_unless_runnable(backend, device)
    q, k, v = random_inputs(2, 1, 16, 24, 30, 100, torch.float32, device, seed=6)
    expected = reference_with_grads(q, k, v)
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    bounds = [0, 17, 18, 64, 100]
    reads = [memory_read(q, k[:, :, a:b], v[:, :, a:b], backend=backend, return_lse=True)
             for a, b in itertools.pairwise(bounds)]
    out, lse = merge_reads(*zip(*reads, strict=True))
    generator = torch.Generator().manual_seed(1)  # the cotangents of read_with_grads
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    check_read([out, lse, q.grad, k.grad, v.grad], expected, torch.float32)


def test_merge_reads_rejects_mismatched_reads():
    out, lse = torch.zeros(2, 4, 6), torch.zeros(2, 6)
    with pytest.raises(ValueError, match="one lse per out"):
        merge_reads([out, out], [lse])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        merge_reads([out, torch.zeros(2, 4, 5)], [lse, torch.zeros(2, 5)])
    with pytest.raises(ValueError, match=r"\(B, \*Q\)"):
        merge_reads([out], [torch.zeros(2, 5)])


def test_torch_backend_float64_gradcheck(monkeypatch):
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 7 * 5)  # several memory chunks
    q, k, v = random_inputs(2, 1, 6, 5, 7, 23, torch.float64, "cpu", seed=7)
    for similarity in ("dot", "l2"):
        def read(q, k, v, similarity=similarity):
            return memory_read(q, k, v, backend="torch", similarity=similarity, return_lse=True)
        inputs = [t.requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(read, inputs)


def test_torch_backend_chunks_agree_with_one_chunk(monkeypatch):
    """Memory chunks merged by their online softmax: one chunk and 13-position chunks both
    match the float64 read (not merely each other)."""
    q, k, v = random_inputs(3, 1, 16, 24, 40, 300, torch.float32, "cpu", seed=8)
    expected = reference_with_grads(q, k, v)
    check_read(read_with_grads(q, k, v, backend="torch"), expected, torch.float32)
    monkeypatch.setattr(torch_common, "CHUNK_ELEMENTS", 3 * 40 * 13)  # 13-position chunks
    check_read(read_with_grads(q, k, v, backend="torch"), expected, torch.float32)


def test_auto_backend_uses_torch_on_cpu_and_naive_matches():
    q, k, v = random_inputs(2, 2, 16, 8, 10, 20, torch.float64, "cpu", seed=9)
    auto = memory_read(q, k, v)
    expected = reference_read(q, k, v)[0]
    assert relative_error(auto, expected) < 1e-12
    assert relative_error(memory_read(q, k, v, backend="naive"), expected) < 1e-12
    assert relative_error(memory_read(q, k, v, scale=1 / math.sqrt(16)), expected) < 1e-12


class _ReadModule(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.project = torch.nn.Conv1d(16, 16, 1)

    def forward(self, q, k, v):
        out, lse = memory_read(self.project(q), k, v, backend=self.backend, return_lse=True)
        return out.relu().sum() + lse.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend, compiler):
    """The op traces without graph breaks (fake impls) and compiles with its backward."""
    skip_unless_runnable(backend, device)
    if compiler == "inductor" and device == "cpu" and backend == "triton":
        pytest.skip("inductor + interpreted Triton only repeats the torch case on CPU (slow)")
    torch.manual_seed(0)
    module = _ReadModule(backend).to(device)
    q, k, v = random_inputs(2, 1, 16, 12, 20, 50, torch.float32, device, seed=10)
    k.requires_grad_()
    eager = module(q, k, v)
    eager.backward()
    eager_grad = k.grad.clone()
    k.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=compiler)(q, k, v)
    compiled.backward()
    assert relative_error(compiled, eager) < 1e-6
    assert relative_error(k.grad, eager_grad) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_64bit_offsets_on_a_memory_past_2_31_elements(dtype):
    """memory_value with Cv * N > 2**31 elements: offsets must not wrap around."""
    Cv, N, HW, Ck = 512, (1 << 31) // 512 + 4099, 20, 16
    generator = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, Ck, HW, device="cuda", generator=generator, dtype=dtype)
    k = torch.randn(1, Ck, N, device="cuda", generator=generator, dtype=dtype)
    v = torch.randn(1, Cv, N, device="cuda", generator=generator, dtype=dtype)
    v[:, :, -4096:] += 4  # the tail past 2**31 decides the answer
    k[:, :, -4096:] *= 2
    out, lse = memory_read(q, k, v, backend="triton", return_lse=True)
    reference, reference_lse, _ = reference_read(q, k, v, device="cuda")  # float64: ~18 GB
    assert relative_error(out, reference) < TOLERANCE[dtype]
    assert relative_error(lse, reference_lse) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [96, 100, 101], ids=["align16", "align4", "align1"])
def test_triton_int64_offsets_and_stride_alignments(device, N, forced_int64):
    """The int64 in-tile offset path (forced) and memory strides of every alignment class."""
    skip_unless_runnable("triton", device)
    q, k, v = random_inputs(2, 1, 16, 24, 40, N, torch.float32, device, seed=12)
    with use_configs(*SPLIT_CONFIGS[1]):
        results = read_with_grads(q, k, v, backend="triton", similarity="l2")
    check_read(results, reference_with_grads(q, k, v, similarity="l2"), torch.float32)
    assert forced_int64 and all(forced_int64)  # every kernel took the int64 path


def test_int64_and_alignment_decisions_for_memory_bank_shapes():
    """Host-side choices, on meta tensors: int64 offsets from Cv*N >= 2**31 on, and the stride
    alignment that decides vectorised loads (N = 1,620*T is a multiple of 4)."""
    def bank(C, N, capacity=None):
        return torch.empty(1, C, capacity or N, device="meta")[:, :, :N]
    assert not calls._needs_int64(bank(512, 2000 * 1620))  # 2,000 memory frames
    assert calls._needs_int64(bank(512, 2000 * 1620, capacity=4096 * 1620))
    assert calls._needs_int64(bank(128, 16), outputs=[(512, 1 << 23)])
    assert [kernel_arguments._alignment(bank(128, 1620 * t)) for t in (1, 2, 4)] == [4, 8, 16]
    assert kernel_arguments._alignment(bank(128, 101)) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS + ["naive"])
def test_chunked_memory_equals_its_concatenation_and_is_saved_uncopied(device, backend):
    """A list of memory chunks (mixed layouts) reads as their concatenation, gradients reach each
    chunk, and autograd keeps the chunks themselves (no O(T^2) concatenated copies)."""
    if backend != "naive":
        skip_unless_runnable(backend, device)
    elif device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = random_inputs(2, 1, 16, 24, 30, 7 * 12, torch.float32, device, seed=13)
    expected = reference_with_grads(q, k, v)
    q = q.detach().requires_grad_()
    sizes = [12, 36, 36]
    k_chunks = [c.detach().clone().requires_grad_() for c in k.split(sizes, dim=2)]
    v_chunks = [c.detach().clone().requires_grad_() for c in v.split(sizes, dim=2)]
    # the second chunk as (T, H, W) = (3, 3, 4) frames
    keys = [k_chunks[0], k_chunks[1].unflatten(2, (3, 3, 4)), k_chunks[2]]
    values = [v_chunks[0], v_chunks[1].unflatten(2, (3, 3, 4)), v_chunks[2]]
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, lse = memory_read(q, keys, values, backend=backend, return_lse=True)
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64)
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    dk = torch.cat([c.grad for c in k_chunks], dim=2)
    dv = torch.cat([c.grad for c in v_chunks], dim=2)
    check_read([out, lse, q.grad, dk, dv], expected, torch.float32)
    if backend != "naive":  # the official read saves its concatenation, by design
        assert not any(t.dim() == 3 and t.shape[2] == sum(sizes) for t in saved)


def test_chunk_errors_name_the_chunk():
    q, k, v = random_inputs(2, 1, 8, 6, 10, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="as many chunks"):
        memory_read(q, [k, k], [v])
    with pytest.raises(ValueError, match=r"memory_key\[1\] must have shape .*Ck=8"):
        memory_read(q, [k, k[:, :4]], [v, v])
    with pytest.raises(ValueError, match=r"memory_value\[1\] must have shape"):
        memory_read(q, [k, k], [v, v[:, :, :5]])
    with pytest.raises(TypeError, match="non-empty list"):
        memory_read(q, [], [])


@pytest.mark.parametrize("device", DEVICES)
def test_warp_specialized_opt_in_falls_back_with_one_warning(device, monkeypatch):
    """STM_KERNELS_WARP_SPECIALIZED=1 where the Gluon forward cannot run (a Triton without its
    Gluon features, or inputs it does not take) warns once, in one line, and reads correctly."""
    skip_unless_runnable("triton", device)
    from stm_kernels.experimental import gluon_forward as memory_read_gluon
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "1")
    monkeypatch.setattr(memory_read_gluon, "AVAILABLE", False)
    monkeypatch.setattr(memory_read_gluon, "UNAVAILABLE_REASON", "Triton 0.1: no Gluon")
    monkeypatch.setattr(running, "_warned", set())
    q, k, v = random_inputs(2, 1, 16, 24, 30, 70, torch.float32, device, seed=14)
    with pytest.warns(RuntimeWarning, match=r"ignored \(Triton 0.1: no Gluon\); using the plain"):
        results = read_with_grads(q, k, v, backend="triton")
    check_read(results, reference_with_grads(q, k, v), torch.float32)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory_read(q, k, v, backend="triton")
    assert not [w for w in caught if gluon_opt_in.WARP_SPECIALIZED_ENV in str(w.message)]
    message = next(iter(running._warned))
    assert "\n" not in message


@pytest.mark.gpu
@pytest.mark.gluon
@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, False), (torch.float16, False),
                                         (torch.bfloat16, True)], ids=["bf16", "fp16", "bf16-rows"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_warp_specialized_forward_through_memory_read(dtype, rows, similarity, monkeypatch):
    """The opt-in Gluon forward behind memory_read (its default tiling, and the row split),
    splits and merge included, and the plain kernels' backward on its output (B=3, broadcast
    query, N with a ragged last block)."""
    from stm_kernels.experimental import gluon_forward as memory_read_gluon
    config = (memory_read_gluon.ROW_SPLIT_CONFIG if rows
              else memory_read_gluon.WarpSpecializedConfig())
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "1")
    q, k, v = random_inputs(3, 1, 128, 512, 333, 16200 - 8, dtype, "cuda", seed=15)
    reason = memory_read_gluon.unsupported_reason(q, k, v, config)
    if reason is not None:
        pytest.skip(reason)
    with triton_module.use_configs(warp_specialized=config):
        results = read_with_grads(q, k, v, backend="triton", similarity=similarity)
    check_read(results, reference_with_grads(q, k, v, similarity=similarity), dtype)


# ---------------------------------------------------------------- ragged memories

RAGGED_BACKENDS = ["triton", "torch", "naive"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", RAGGED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("Bq", [1, 3])
@pytest.mark.parametrize("lengths", [[150, 41, 1], [150, 1, 90]], ids=["sorted", "unsorted"])
def test_ragged_memory_equals_per_object_reads_and_never_reads_the_padding(
        device, backend, dtype, similarity, Bq, lengths):
    """memory_lengths: each object reads its own first positions of a padded memory whose
    padding is NaN; gradients past the lengths are zero (FlashAttention-varlen style). Unsorted
    lengths make the torch backend gather non-consecutive objects ({0, 2} over [90, 150))."""
    if backend == "naive" and device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend != "naive":
        skip_unless_runnable(backend, device, dtype)
    B, Ck, Cv, HW, N = 3, 24, 40, 37, 150
    q, k, v = random_inputs(B, Bq, Ck, Cv, HW, N, dtype, device, seed=16)
    for b, length in enumerate(lengths):  # a bank's unused capacity: anything, NaN included
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("nan")
    generator = torch.Generator().manual_seed(2)
    cotangents = (torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64),
                  torch.randn(B, HW, generator=generator, dtype=torch.float64))
    tensor_lengths = torch.tensor(lengths, device=device)
    results = ragged_read_with_grads(q, k, v, tensor_lengths, cotangents, backend=backend,
                           similarity=similarity)
    check_read(results, per_object_reference(q, k, v, lengths, cotangents, similarity=similarity),
           dtype)
    for b, length in enumerate(lengths):
        assert (results[3][b, :, length:] == 0).all() and (results[4][b, :, length:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
# A split past an object's length has an empty sum: its partial lse is log2(0) = -inf by
# design (weight 0 in the merge), which NumPy reports when the interpreter computes it.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_ragged_memory_with_splits_and_chunks(device, similarity):
    """Memory splits past an object's length (empty partial reads in the merge), value chunks,
    and merge_reads of two ragged reads over consecutive memory chunks."""
    skip_unless_runnable("triton", device)
    q, k, v, lengths, cotangents = ragged_case(device, seed=17, cotangent_seed=3)
    expected = per_object_reference(q, k, v, lengths, cotangents, similarity=similarity)
    with use_configs(*SPLIT_CONFIGS[0]):  # splits of 48 positions: object 1 fills one
        results = ragged_read_with_grads(q, k, v, torch.tensor(lengths, device=device), cotangents,
                               backend="triton", similarity=similarity)
    check_read(results, expected, torch.float32)
    # merge_reads of two chunks [0, 100) and [100, 160) read with their own lengths: object 0
    # reads both whole, object 1 reads positions 0-19 of the first and 100 of the second.
    qg, kg, vg = [t.detach().requires_grad_() for t in (q, k, v)]
    reads = [memory_read(qg, kg[:, :, a:b], vg[:, :, a:b], return_lse=True, backend="triton",
                         similarity=similarity, memory_lengths=torch.tensor(chunk, device=device))
             for (a, b), chunk in (((0, 100), [100, 20]), ((100, 160), [60, 1]))]
    out, lse = merge_reads(*zip(*reads, strict=True))
    grad_out, grad_lse = cotangents
    ((out * grad_out.to(out)).sum() + (lse * grad_lse.to(lse)).sum()).backward()
    keep = torch.cat([torch.arange(20), torch.tensor([100])])
    alone = per_object_reference(q, k[1:, :, keep], v[1:, :, keep], [21],
                                  (grad_out[1:], grad_lse[1:]), similarity=similarity)
    check_read([out[1:], lse[1:], None, kg.grad[1:, :, keep], vg.grad[1:, :, keep]],
           [alone[0], alone[1], None, alone[3], alone[4]], torch.float32)
    check_read([out[:1], lse[:1], None, kg.grad[:1], vg.grad[:1]],
           [expected[0][:1], expected[1][:1], None, expected[3][:1], expected[4][:1]],
           torch.float32)
    assert (kg.grad[1, :, 20:100] == 0).all() and (vg.grad[1, :, 101:] == 0).all()


@pytest.mark.parametrize("lengths, message", [
    ([0, 5], r"values in \[0, 5\]"), ([-1, 5], r"values in \[-1, 5\]"),
    ([13, 5], r"values in \[5, 13\]"), ([5], r"got shape \(1,\)"), ([[5, 5]], r"shape \(1, 2\)"),
    (torch.tensor([5.0, 5.0]), "dtype torch.float32"), (torch.tensor([True, True]), "dtype"),
    (torch.tensor([5, 5], device="meta"), "on meta"), ("five", "got 'five'"),
], ids=["zero", "negative", "above N", "short", "2-D", "float", "bool", "device", "string"])
def test_bad_memory_lengths_are_rejected(lengths, message):
    q, k, v = random_inputs(2, 1, 8, 6, 10, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"memory_lengths must be a \(B=2,\) integer tensor .*"
                                         + message):
        memory_read(q, k, v, memory_lengths=lengths)


def test_ragged_read_compiles_without_graph_breaks():
    q, k, v = random_inputs(2, 1, 8, 6, 10, 12, torch.float32, "cpu", seed=18)
    lengths = torch.tensor([12, 5])

    def read(q, k, v, lengths):
        return memory_read(q, k, v, memory_lengths=lengths, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(read, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(q, k, v, lengths), read(q, k, v, lengths)) < 1e-6
