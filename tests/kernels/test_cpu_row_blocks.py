"""The torch backend's CPU forward: (object, row block) tasks on worker threads, an object's row
blocks read in lockstep by readers sharing its chunks (bf16 products), or for one object by the
caller with torch's threads, against the float64 reference with blocks and memory chunks small
enough that every object takes several of each, ragged memories, a broadcast query, inference
mode, any thread count, and after a fork."""
import multiprocessing
import os
import threading

import pytest
import torch

from helpers import (check_read, per_object_reference, ragged_case, relative_error,
                     ragged_read_with_grads, random_inputs, read_with_grads,
                     reference_with_grads)
from reference import reference_read
from stm_kernels import memory_read, poison_outputs
from stm_kernels.backends import pytorch


@pytest.fixture(autouse=True)
def _small_tasks(monkeypatch):
    """Blocks of at most 8 rows (float32, bf16, and a one-object bf16 read's) stepping over 16
    positions, and row blocks for every read however small: many tasks on small inputs."""
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", 0)
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 1)
    monkeypatch.setattr(pytorch, "ROW_BLOCK", 8)
    monkeypatch.setattr(pytorch, "BF16_ROW_BLOCK", 8)
    monkeypatch.setattr(pytorch, "CPU_CHUNK", 16)
    with poison_outputs():
        yield


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("shape", [(2, 2, 20, 40, 45, 111), (3, 1, 12, 24, 70, 63)],
                         ids=lambda s: "x".join(map(str, s)))
def test_row_blocks_match_the_float64_read(shape, similarity, dtype, threads):
    q, k, v = random_inputs(*shape, dtype, "cpu")
    results = read_with_grads(q, k, v, similarity=similarity, backend="torch")
    check_read(results, reference_with_grads(q, k, v, similarity=similarity), dtype)
    assert torch.get_num_threads() == threads  # the workers' single thread stays theirs


def test_ragged_memories_take_only_their_own_positions(threads):
    case = ragged_case("cpu", seed=5, cotangent_seed=6, lengths=(160, 20))
    results = ragged_read_with_grads(*case, backend="torch")
    check_read(results, per_object_reference(*case), torch.float32)


def test_inference_mode_and_every_thread_count_give_the_same_read(threads):
    q, k, v = random_inputs(3, 1, 16, 24, 50, 90, torch.float32, "cpu", seed=2)
    with torch.inference_mode():
        out, lse = memory_read(q, k, v, backend="torch", return_lse=True)
    assert out.is_inference()
    expected, expected_lse, _ = reference_read(q, k, v)
    assert (out - expected).abs().max() < 1e-5 and (lse - expected_lse).abs().max() < 1e-5


@pytest.mark.parametrize("lengths", [None, (40, 7)], ids=["full", "ragged"])
def test_a_small_read_runs_batched_and_a_large_one_in_row_blocks(monkeypatch, lengths):
    q, k, v = random_inputs(2, 1, 12, 24, 10, 40, torch.float32, "cpu", seed=4)
    lengths = None if lengths is None else torch.tensor(lengths)
    positions = 80 if lengths is None else 47
    taken = []
    for name in ("_forward_row_blocks", "_forward_batched"):
        original = getattr(pytorch, name)
        monkeypatch.setattr(pytorch, name, lambda *a, _f=original, _n=name: taken.append(_n)
                            or _f(*a))
    work = positions * 10 * (12 + 24)  # multiply-adds: memory positions x rows x (Ck + Cv)
    expected = reference_read(q, k, v, lengths=lengths)[0]
    for threshold, path in [(work + 1, "_forward_batched"), (work, "_forward_row_blocks")]:
        monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_WORK", threshold)
        with torch.no_grad():
            out = memory_read(q, k, v, backend="torch", memory_lengths=lengths)
        assert taken.pop() == path and not taken
        assert (out - expected).abs().max() < 1e-5


def _key_product_rows(monkeypatch):
    """A list that gets the query rows of every key product (torch.addmm) the read takes."""
    rows = []
    original = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **o: rows.append(a[1].shape[0]) or
                        original(*a, **o))
    return rows


def _count_online_reads(monkeypatch):
    """A list that gets one entry per row block read again by the online softmax."""
    online = []
    original = pytorch._online_softmax
    monkeypatch.setattr(pytorch, "_online_softmax",
                        lambda *a: online.append(1) or original(*a))
    return online


@pytest.mark.parametrize("Bq", [1, 2], ids=["shared query", "a query per object"])
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_scores_far_above_the_first_chunks_are_read_again_online(monkeypatch, similarity,
                                                                 threads, Bq):
    """The first chunk's maximum is each row's offset; later scores 100s above it overflow
    exp in float32, and those row blocks are read again with a running maximum (each
    object's own query rows where each has its own query)."""
    q, k, v = random_inputs(2, Bq, 12, 24, 20, 70, torch.float32, "cpu", seed=7)
    if similarity == "dot":
        k[:, :, 40:] *= 100  # scores ~ +-300 after the first chunks' ~ +-3
    else:
        k[:, :, :16] *= 50  # the first chunk far from every query: its scores ~ -10,000
    online = _count_online_reads(monkeypatch)
    results = read_with_grads(q, k, v, similarity=similarity, backend="torch")
    assert online  # without the second read, those rows would be NaN
    check_read(results, reference_with_grads(q, k, v, similarity=similarity), torch.float32)


def test_ordinary_scores_take_the_fixed_offset_alone(monkeypatch):
    q, k, v = random_inputs(3, 1, 12, 24, 20, 70, torch.float32, "cpu", seed=8)
    online = _count_online_reads(monkeypatch)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert online == []
    expected = reference_read(q, k, v)[0]
    assert (out - expected).abs().max() < 1e-5


def _read_in_child(queue):
    q, k, v = random_inputs(2, 1, 8, 8, 40, 50, torch.float32, "cpu", seed=3)
    queue.put(memory_read(q, k, v, backend="torch").sum().item())


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_a_forked_child_reads_with_its_own_workers(threads):
    q, k, v = random_inputs(2, 1, 8, 8, 40, 50, torch.float32, "cpu", seed=3)
    parent = memory_read(q, k, v, backend="torch").sum().item()  # the parent's workers exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or failed reading"
    assert queue.get(timeout=5) == pytest.approx(parent, rel=1e-6)


@pytest.fixture
def bf16_products(monkeypatch):
    """The bf16 products' path on any CPU (its numerics need no bf16 instructions)."""
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1")
    taken = []
    original = pytorch._bf16_softmax
    monkeypatch.setattr(pytorch, "_bf16_softmax", lambda *a: taken.append(1) or original(*a))
    return taken


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("peak", [1.0, 3.0], ids=["plain", "peaked"])
@pytest.mark.parametrize("lengths", [None, (70, 23)], ids=["full", "ragged"])
def test_bf16_products_match_the_float64_read(bf16_products, similarity, peak, lengths,
                                              threads):
    """bf16 inputs read with both products in bf16: within bf16's bound of the float64 read
    of the same inputs, its log-sum-exp too, with scores peaked enough (peak 3: ~±30) that a
    product rounded to bf16 without the offset inside would be off by 10%."""
    q, k, v = random_inputs(2, 1, 12, 24, 20, 70, torch.float64, "cpu", seed=9)
    q, k = q * peak, k * peak
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    lengths = None if lengths is None else torch.tensor(lengths)
    with torch.no_grad():
        out, lse = memory_read(q, k, v, similarity=similarity, backend="torch",
                               memory_lengths=lengths, return_lse=True)
    assert bf16_products and out.dtype == torch.bfloat16
    expected, expected_lse, _ = reference_read(q, k, v, similarity=similarity, lengths=lengths)
    assert relative_error(out, expected) < 1e-2
    assert (lse.double() - expected_lse).abs().max() < 0.05  # 8 bits of a score of ~30
    assert relative_error(lse, expected_lse) < 1e-3


def test_bf16_products_are_taken_for_bf16_inputs_only(bf16_products, monkeypatch):
    q, k, v = random_inputs(2, 1, 12, 24, 20, 70, torch.float32, "cpu", seed=10)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            memory_read(*(t.to(dtype) for t in (q, k, v)), backend="torch")
        assert not bf16_products  # fp16 keeps its 3 more bits: float32 products
        memory_read(*(t.to(torch.bfloat16) for t in (q, k, v)), backend="torch")
        assert bf16_products
        monkeypatch.setenv("STM_KERNELS_CPU_BF16", "0")
        bf16_products.clear()
        memory_read(*(t.to(torch.bfloat16) for t in (q, k, v)), backend="torch")
        assert not bf16_products


def test_bf16_scores_far_above_the_first_chunks_raise_the_offset_themselves(bf16_products,
                                                                            monkeypatch):
    """Scores hundreds above the first chunks' raise the rows' offsets inside the bf16 read
    (the chunk multiplied again): finite and accurate, with no second read."""
    q, k, v = random_inputs(2, 1, 12, 24, 20, 70, torch.float32, "cpu", seed=7)
    k[:, :, 40:] *= 100
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    online = _count_online_reads(monkeypatch)
    with torch.no_grad():
        out, lse = memory_read(q, k, v, backend="torch", return_lse=True)
    assert bf16_products and not online
    expected, expected_lse, _ = reference_read(q, k, v)
    assert torch.isfinite(out).all() and relative_error(out, expected) < 1e-2
    assert relative_error(lse, expected_lse) < 1e-3


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_bf16_rows_rising_in_a_later_chunk_are_multiplied_again_alone(bf16_products,
                                                                      monkeypatch, threads):
    """A later chunk's keys along one direction: the rows pointing along it rise far above
    their offsets (their offsets raised, their sums so far rescaled, their products taken
    again), the others fall. Only the rising rows are multiplied again, and every row reads as
    the float64 read does."""
    monkeypatch.setattr(pytorch, "BF16_ROW_BLOCK", 64)  # one block of 40 rows
    q, k, v = random_inputs(1, 1, 12, 24, 40, 64, torch.float32, "cpu", seed=21)
    direction = torch.randn(12, generator=torch.Generator().manual_seed(22))
    k[0, :, 40:48] = 6 * direction[:, None] + 0.1 * k[0, :, 40:48]
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    along = (q[0].float().T @ direction > 0.5).sum().item()
    assert 5 < along < 35  # some rows rise, not all
    shapes = _key_product_rows(monkeypatch)
    online = _count_online_reads(monkeypatch)
    with torch.no_grad():
        out, lse = memory_read(q, k, v, backend="torch", return_lse=True)
    assert bf16_products and not online
    again = [rows for rows in shapes if rows < 40]
    assert again and sum(again) < 40 * len(again)  # a part of the rows, taken again
    assert shapes.count(40) == 64 // 16 + 1  # every chunk once, the first twice
    expected, expected_lse, _ = reference_read(q, k, v)
    assert relative_error(out, expected) < 1e-2
    assert relative_error(lse, expected_lse) < 1e-3
    per_row = (out.double() - expected).norm(dim=1) / expected.norm(dim=1)
    assert per_row.max() < 3e-2  # each row, the ones that rose and the ones that did not


def test_a_bf16_read_is_written_in_the_outputs_layout(bf16_products):
    """The bf16 read sums into (Cv, rows) columns: its output comes out contiguous in (B, Cv,
    HW) from a cast, with no transposing copy (the one-object read's whole block, and two
    objects' row blocks)."""
    for B in (1, 2):
        q, k, v = random_inputs(B, 1, 12, 24, 20, 70, torch.bfloat16, "cpu", seed=23)
        with torch.no_grad():
            out = memory_read(q, k, v, backend="torch")
        assert out.is_contiguous() and out.shape == (B, 24, 20)
        assert relative_error(out, reference_read(q, k, v)[0]) < 1e-2


def test_cpu_features_name_the_processor_and_its_flags(monkeypatch):
    from stm_kernels.backends import cpu_features
    info = cpu_features.cpu_info()
    assert info["model"] and set(info["flags"]) <= set(cpu_features.FLAGS)
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("STM_KERNELS_CPU_BF16", value)
        assert cpu_features.bf16_dot_products() is expected
    monkeypatch.delenv("STM_KERNELS_CPU_BF16")
    assert cpu_features.bf16_dot_products() == bool(
        set(info["flags"]) & set(cpu_features.BF16_DOT_FLAGS))


def test_a_short_query_runs_batched_in_chunks_of_bounded_copies(monkeypatch):
    """Blocks of fewer than ROW_BLOCKS_MIN_ROWS query rows would be too thin for the products:
    such a read runs batched, its chunks copying at most COPY_ELEMENTS memory elements each
    (a 16-bit memory's float32 copies), and still matches the float64 read."""
    q, k, v = random_inputs(2, 1, 12, 20, 10, 300, torch.float16, "cpu", seed=8)
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 6)  # 10 rows on 2 threads: 5 a block
    monkeypatch.setattr(pytorch, "COPY_ELEMENTS", 2 * 32 * 40)  # 40 positions of 2 objects
    taken, chunks = [], []
    original = pytorch._forward_batched
    monkeypatch.setattr(pytorch, "_forward_batched",
                        lambda *a: taken.append("batched") or original(*a))
    segments = pytorch._segments
    monkeypatch.setattr(pytorch, "_segments", lambda *a: [
        chunks.append(c) or c for c in segments(*a)])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out, lse = memory_read(q, k, v, backend="torch", return_lse=True)
    finally:
        torch.set_num_threads(before)
    assert taken == ["batched"]
    assert [stop - start for start, stop, _ in chunks] == [40] * 7 + [20]
    expected, expected_lse, _ = reference_read(q, k, v)
    assert relative_error(out.double(), expected) < 2e-3
    assert (lse.double() - expected_lse).abs().max() < 1e-2
    monkeypatch.setattr(pytorch, "ROW_BLOCKS_MIN_ROWS", 5)  # 5-row blocks are enough now
    with torch.no_grad():
        memory_read(q, k, v, backend="torch")
    assert taken == ["batched"]  # the row blocks took it


def test_a_growing_memory_hands_the_bf16_products_one_shape_and_layout(bf16_products,
                                                                       monkeypatch):
    """oneDNN makes a matmul primitive per shape and strides, and its cache and PyTorch's keep
    up to 1,024 of them (about 0.5 MiB each on an AVX-512 CPU): a memory growing by a frame
    per read, held in preallocated storage as MemoryBank holds it, hands the bf16 products
    chunks of one shape and layout whatever its length, or the process grows by every length
    it reads."""
    layouts = set()

    def recorded(original):
        def product(*args, **kwargs):
            layouts.add(tuple((tuple(t.shape), t.stride()) for t in args))
            return original(*args, **kwargs)
        return product
    for name in ("addmm", "mm"):
        monkeypatch.setattr(torch, name, recorded(getattr(torch, name)))
    q, k, v = random_inputs(1, 1, 12, 24, 20, 250, torch.bfloat16, "cpu", seed=11)
    lengths = range(40, 250, 7)  # 16-position chunks: every length leaves a partial one
    with torch.no_grad():
        for length in lengths:
            out = memory_read(q, k[:, :, :length], v[:, :, :length], backend="torch")
            expected = reference_read(q, k[:, :, :length], v[:, :, :length])[0]
            assert relative_error(out, expected) < 1e-2
    assert len(bf16_products) >= len(lengths)
    # (the query's row blocks) x (the two products), and the rising rows' products in
    # power-of-two counts below a block's 8 rows (1, 2, 4)
    assert len(layouts) <= 6 + 3, len(layouts)


def _recorded_chunks(monkeypatch):
    """(thread name, chunk index) of every key chunk the bf16 readers make."""
    made = []
    original = pytorch._KeyChunks.__getitem__

    def getitem(self, index):
        made.append((threading.current_thread().name, index))
        return original(self, index)
    monkeypatch.setattr(pytorch._KeyChunks, "__getitem__", getitem)
    return made


@pytest.mark.filterwarnings("error")  # an output buffer of the wrong shape warns as it is resized
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize(("N", "made_chunks"), [(150, list(range(10))),
                                                (160, list(range(10))), (10, [0])],
                         ids=["overlapping last chunk", "whole chunks", "one short chunk"])
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_the_bf16_read_makes_each_chunk_once_on_the_callers_thread(bf16_products, monkeypatch,
                                                                   threads, similarity, N,
                                                                   made_chunks):
    """On two threads the bf16 path reads all of an object's row blocks in lockstep on the
    caller's thread, whose ops take torch's threads: each chunk is made once (not once per
    row block; 16-position chunks: 150 positions take 9 and one overlapping the ninth, 160
    take 10; 10 positions, shorter than a chunk, one), and the read matches the float64
    read."""
    q, k, v = random_inputs(1, 1, 12, 24, 40, N, torch.float64, "cpu", seed=12)
    q, k, v = (t.to(torch.bfloat16) for t in (q * 2, k * 2, v))
    made = _recorded_chunks(monkeypatch)
    with torch.no_grad():
        out, lse = memory_read(q, k, v, similarity=similarity, backend="torch",
                               return_lse=True)
    assert [index for _, index in made] == made_chunks  # 40 rows: 5 blocks
    assert {name for name, _ in made} == {threading.current_thread().name}
    assert len(bf16_products) == 1
    expected, expected_lse, _ = reference_read(q, k, v, similarity=similarity)
    assert relative_error(out, expected) < 1e-2
    assert relative_error(lse, expected_lse) < 1e-3


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_a_one_object_bf16_read_takes_blocks_of_its_own_size(bf16_products, monkeypatch,
                                                             threads):
    """A one-object bf16 read cuts its query into the fewest blocks of at most BF16_ROW_BLOCK
    rows (16 here: 40 rows in 14, 14 and 12), not the workers' ROW_BLOCK (8), all read on the
    caller's thread."""
    monkeypatch.setattr(pytorch, "BF16_ROW_BLOCK", 16)
    blocks = []
    init = pytorch._Bf16Rows.__init__

    def recorded(self, query, *args):
        blocks.append((threading.current_thread().name, query.shape[1]))
        init(self, query, *args)
    monkeypatch.setattr(pytorch._Bf16Rows, "__init__", recorded)
    q, k, v = random_inputs(1, 1, 12, 24, 40, 70, torch.bfloat16, "cpu", seed=20)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert blocks == [(threading.current_thread().name, rows) for rows in (14, 14, 12)]
    assert relative_error(out, reference_read(q, k, v)[0]) < 1e-2


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_bf16_readers_of_two_objects_make_each_chunk_once_and_merge_their_sums(
        bf16_products, monkeypatch, threads):
    """With two objects the workers read them side by side: each object's row blocks in
    lockstep by two readers taking its chunks as they come, each chunk made once (not once per
    row block), their sums merged, against the float64 read of a ragged memory."""
    made = _recorded_chunks(monkeypatch)
    q, k, v = random_inputs(2, 1, 12, 24, 40, 150, torch.bfloat16, "cpu", seed=13)
    lengths = torch.tensor([150, 70])
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch", memory_lengths=lengths)
    chunks = len(pytorch._chunk_starts(150)) + len(pytorch._chunk_starts(70))
    assert len(made) == chunks and len(bf16_products) == 4  # two readers an object
    assert {name for name, _ in made} != {threading.current_thread().name}
    assert relative_error(out, reference_read(q, k, v, lengths=lengths)[0]) < 1e-2


@pytest.mark.filterwarnings("error")
def test_bf16_values_narrower_than_a_row_block(bf16_products):
    """4 value channels under 8-row blocks: the value product's buffer is as tall as a block,
    not as the values are wide."""
    q, k, v = random_inputs(1, 1, 12, 4, 40, 70, torch.bfloat16, "cpu", seed=15)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert relative_error(out, reference_read(q, k, v)[0]) < 1e-2


@pytest.mark.parametrize("threads", [1], indirect=True)
def test_bf16_scores_that_do_not_rise_take_each_chunk_product_once(bf16_products, monkeypatch,
                                                                   threads):
    """Unit-normal scores (none far above its row's first chunk): each row block multiplies
    each chunk's keys once, the first chunk twice (its offset is set from its own product),
    and again only the rows whose scores rise past the offset's headroom."""
    rows = _key_product_rows(monkeypatch)
    q, k, v = random_inputs(1, 1, 12, 24, 40, 160, torch.bfloat16, "cpu", seed=16)
    with torch.no_grad():
        memory_read(q, k, v, backend="torch")
    blocks, chunks, block_rows = 5, 10, 8
    assert rows.count(block_rows) == blocks * (chunks + 1)  # every chunk, the first twice
    again = [count for count in rows if count < block_rows]
    assert sum(again) < 0.2 * block_rows * blocks * chunks, again


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_a_bf16_reader_left_without_chunks_adds_nothing(bf16_products, monkeypatch, threads):
    """A reader that finds every chunk taken (the other ran first) returns no sums: the read
    is the other reader's, written from its own buffers into the output."""
    class FirstComerTakesAll(pytorch._SharedIndices):
        """Every index to the first thread that asks."""

        def __next__(self):
            with self.lock:
                self.owner = getattr(self, "owner", threading.current_thread().name)
            if threading.current_thread().name != self.owner:
                raise StopIteration
            return super().__next__()
    monkeypatch.setattr(pytorch, "_SharedIndices", FirstComerTakesAll)
    made = _recorded_chunks(monkeypatch)
    q, k, v = random_inputs(2, 1, 12, 24, 20, 70, torch.bfloat16, "cpu", seed=13)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert len(bf16_products) == 4  # two objects, two readers each
    chunks = len(pytorch._chunk_starts(70))
    assert sorted(index for _, index in made) == sorted(list(range(chunks)) * 2)
    assert relative_error(out, reference_read(q, k, v)[0]) < 1e-2


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_a_one_chunk_memory_shares_its_row_blocks_out_instead(bf16_products, monkeypatch,
                                                              threads):
    """A memory of one chunk has nothing to share between readers: each object's row blocks
    are split into one group a worker, each reading the chunk."""
    made = _recorded_chunks(monkeypatch)
    q, k, v = random_inputs(2, 1, 12, 24, 40, 16, torch.bfloat16, "cpu", seed=14)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert [index for _, index in made] == [0, 0, 0, 0]
    assert len(bf16_products) == 4
    assert relative_error(out, reference_read(q, k, v)[0]) < 1e-2


def test_row_blocks_are_taken_on_a_cpu_without_gradients_through_the_read(monkeypatch):
    """Row blocks need a CPU and no gradient flowing through the read (autograd cannot follow
    the workers' in-place sums); gradients enabled with no input that needs them do not stop
    them. Meta tensors (another device) read batched."""
    q, k, v = random_inputs(1, 1, 12, 24, 40, 70, torch.float32, "cpu", seed=17)
    assert torch.is_grad_enabled()
    assert pytorch._row_blocks_pay(q, k, v, None)
    assert not pytorch._row_blocks_pay(q.requires_grad_(), k, v, None)
    with torch.no_grad():
        assert pytorch._row_blocks_pay(q, k, v, None)
    meta = [t.detach().to("meta") for t in (q, k, v)]
    assert not pytorch._row_blocks_pay(*meta, None)


def test_the_worker_pool_is_kept_and_made_again_where_it_must_be(monkeypatch):
    """One pool of `size` named threads, each with a single-threaded torch, kept between
    reads; made again when the thread count changes (the old one shut down) and in a forked
    child (another pid: the parent's pool, whose threads the child has not, left alone)."""
    monkeypatch.setattr(pytorch, "_workers", {"pool": None, "size": 0, "pid": None})
    pool = pytorch._worker_pool(2)
    assert pytorch._worker_pool(2) is pool and pool._max_workers == 2

    def inside():
        return threading.current_thread().name, torch.get_num_threads()
    name, torch_threads = pool.submit(inside).result()
    assert name.startswith("stm_kernels_read") and torch_threads == 1
    other = pytorch._worker_pool(3)
    assert other is not pool and other._max_workers == 3 and pool._shutdown
    assert pytorch._worker_pool(3) is other
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)
    child = pytorch._worker_pool(3)
    assert child is not other and not other._shutdown
    assert pytorch._worker_pool(3) is child
    for made in (other, child):
        made.shutdown(wait=False)


def test_float16_l2_row_blocks_take_their_key_norms_in_float32():
    """float16 inputs read with float32 products (no bf16 path for them): the keys' squared
    norms in float32 too, so the read is within float16's rounding of the float64 one."""
    q, k, v = random_inputs(1, 1, 12, 24, 40, 70, torch.float64, "cpu", seed=18)
    q, k, v = (t.mul(4).to(torch.float16) for t in (q, k, v))
    with torch.no_grad():
        out = memory_read(q, k, v, similarity="l2", backend="torch")
    assert relative_error(out, reference_read(q, k, v, similarity="l2")[0]) < 2e-3


def test_rising_rows_take_a_few_product_shapes_whatever_their_count(bf16_products,
                                                                   monkeypatch):
    """Peaked scores over a long memory: rows rise in most chunks, in every count from one to
    the block's; their products come in power-of-two counts (and the block's own), so oneDNN
    keeps a few matmul primitives, not one per count (each about 0.5 MiB, kept in its
    cache)."""
    monkeypatch.setattr(pytorch, "BF16_ROW_BLOCK", 64)  # one block of 40 rows
    q, k, v = random_inputs(1, 1, 12, 24, 40, 800, torch.float32, "cpu", seed=24)
    q, k, v = q.bfloat16(), (k * 20).bfloat16(), v.bfloat16()
    counts = _key_product_rows(monkeypatch)
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    assert bf16_products and len(set(counts)) > 3  # rows rose, in several counts
    assert set(counts) <= {1, 2, 4, 8, 16, 32, 40}, sorted(set(counts))
    assert relative_error(out, reference_read(q, k, v)[0]) < 2e-2


def test_rising_rows_are_multiplied_in_power_of_two_counts():
    """_bucketed pads the rising rows' indices by repeating the last (the product's rows past
    the real ones are dropped): one oneDNN primitive per power of two, not per count."""
    rows = torch.tensor([3, 5, 9])
    assert pytorch._bucketed(rows, 40).tolist() == [3, 5, 9, 9]
    assert pytorch._bucketed(rows[:2], 40).tolist() == [3, 5]
    assert pytorch._bucketed(torch.arange(20), 24).tolist() == list(range(20)) + [19] * 4


def test_the_bf16_peak_read_as_int16_is_the_rows_maximum():
    """_rising_peak's integer maximum over bf16 products: rising exactly where the row's
    maximum exceeds the headroom (not at it), with that maximum, over rows of negatives only,
    -inf (positions an earlier chunk read), +inf, +0 and -0, and values a step either side."""
    generator = torch.Generator().manual_seed(3)
    products = (torch.randn(12, 300, generator=generator, dtype=torch.float64) * 3).bfloat16()
    headroom = torch.tensor(pytorch.BF16_HEADROOM, dtype=torch.bfloat16)
    step = torch.tensor(1, dtype=torch.int16)
    products[0] = -products[0].abs() - 1  # negatives only
    products[1, :150] = float("-inf")
    products[2, 7] = float("inf")
    products[3] = 0.0
    products[4] = -0.0
    products[5].clamp_(max=headroom)  # at the headroom: not rising
    products[6].clamp_(max=headroom)
    products[6, 30] = (headroom.view(torch.int16) + step).view(torch.bfloat16)  # just above
    products[7] = -products[7].abs()
    products[7, 0] = float("-inf")
    peak, rising = pytorch._rising_peak(products)
    expected = products.float().amax(1, keepdim=True)
    assert torch.equal(rising, expected > pytorch.BF16_HEADROOM)
    assert rising[:7].flatten().tolist() == [False, True, True, False, False, False, True]
    assert torch.equal(peak[rising], expected[rising])


@pytest.mark.parametrize("sign", [1, -1], ids=["nan", "negative nan"])
def test_a_nan_key_in_a_later_bf16_chunk_reaches_every_row(bf16_products, sign):
    """A NaN key past the first chunks (a NaN product in every row, with the row's other
    scores above the headroom or not) turns the whole object's read NaN, as in the float64
    read; the other object stays finite and right."""
    q, k, v = random_inputs(2, 1, 12, 24, 20, 70, torch.float64, "cpu", seed=21)
    k[0, 3, 50] = sign * float("nan")
    q, k, v = (t.to(torch.bfloat16) for t in (q * 2, k * 2, v))
    with torch.no_grad():
        out = memory_read(q, k, v, backend="torch")
    expected = reference_read(q, k, v)[0]
    assert out[0].isnan().all() and expected[0].isnan().all()
    assert torch.isfinite(out[1]).all() and relative_error(out[1], expected[1]) < 1e-2
