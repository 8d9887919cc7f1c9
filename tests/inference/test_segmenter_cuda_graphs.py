"""VideoSegmenter with CUDA graphs (compile={"mode": "reduce-overhead"} and the like): the per-frame
step (query encoder, memory read, decoder) is one graph reading each memory bank's whole storage
with its lengths on the device (MemoryBank.fixed_capacity), so a graph serves every memory length
up to the bank's capacity and a new one is recorded when the storage grows; the memory encoder
is graphed apart. Offloaded or sharded memory, or a read backend that reads its lengths on the
host, keeps the read eager between the graphed query encoder and decoder. On a CPU the
cudagraphs backend runs its graphs without recording: everything but the capture is tested here,
the capture itself by the `gpu` test."""
import contextlib

import pytest
import torch

import stm_kernels.backends.pytorch
from helpers import synthetic_video
from stm_kernels.inputs import known_range
from stm_model import STM, MemoryBank, STMConfig, VideoSegmenter
from stm_model.demo import WEIGHTS, load_small_model
from stm_model.inference.video_segmenter import uses_cuda_graphs


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused, not counted
    yield
    torch._dynamo.reset()


def _boxes(height, width, boxes):
    mask = torch.zeros(height, width, dtype=torch.int64)
    for object_id, (top, left, bottom, right) in boxes.items():
        mask[top:bottom, left:right] = object_id
    return mask


def _masks(height, width):
    """{frame: mask}: one object first, a second entering on frame 6."""
    return {0: _boxes(height, width, {1: (2, 2, height // 2, width // 2)}),
            6: _boxes(height, width, {2: (height // 2, width // 2, height - 2, width - 2)})}


def _run(segmenter, frames, masks):
    return [segmenter.step(frame, mask=masks.get(t)) for t, frame in enumerate(frames)]


def test_which_compile_options_replay_cuda_graphs():
    assert uses_cuda_graphs({"mode": "reduce-overhead"})
    assert uses_cuda_graphs({"mode": "max-autotune"})
    assert uses_cuda_graphs({"options": {"triton.cudagraphs": True}})
    assert uses_cuda_graphs({"backend": "cudagraphs"})
    assert not uses_cuda_graphs({})
    assert not uses_cuda_graphs({"mode": "max-autotune-no-cudagraphs"})
    assert not uses_cuda_graphs({"mode": "default"})
    assert not uses_cuda_graphs({"backend": "eager", "mode": "reduce-overhead"})


def test_offloaded_memory_keeps_the_read_eager_between_graphs(fresh_dynamo, monkeypatch):
    """With CUDA graphs asked for (the cudagraphs backend, which on a CPU skips the recording
    and runs its graphs as they are) and the memory offloaded (read chunk by chunk): the same
    probabilities as eager while the memory grows and an object enters; three graphs (query
    encoder, decoder, memory encoder), not one holding the read (two more for the second
    object's grouping); the read called eagerly every step after the first; CUDA graph trees
    told of every step."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = STM(STMConfig.small()).eval()
    frames = torch.rand(10, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    masks = _masks(32, 48)
    eager = _run(VideoSegmenter(model, mem_every=2, offload=True), frames, masks)
    steps, reads = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: steps.append(len(reads)))
    read = MemoryBank.read
    monkeypatch.setattr(MemoryBank, "read", lambda bank, *args, **kwargs: (
        reads.append(bank), read(bank, *args, **kwargs))[1])
    graphs = counters["stats"]["unique_graphs"]
    segmenter = VideoSegmenter(model, mem_every=2, offload=True,
                               compile={"backend": "cudagraphs"})
    assert segmenter._compiled.graphs and not segmenter._read_in_graph
    graphed, compiled = [], []
    for t, frame in enumerate(frames):
        graphed.append(segmenter.step(frame, mask=masks.get(t)))
        compiled.append(counters["stats"]["unique_graphs"] - graphs)
    # the memory encoder (frame 1), the query encoder and decoder (frame 1 on); the second
    # object's entry adds a decoder and a memory encoder for two objects, the query encoder
    # stays as it was
    assert compiled[1] == compiled[5] == 3 and compiled[-1] == 5
    assert len(steps) == len(frames) and steps == sorted(steps)
    # frame 0 has no memory to read; from frame 7 on, two banks (the second object's own)
    assert len(reads) == 6 + 3 * 2
    for actual, expected in zip(graphed, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def _poisoned_storage(monkeypatch):
    """Every MemoryBank's storage NaN past the frames it copies when allocated: a read of the
    unused capacity would turn the probabilities into NaN."""
    allocate = MemoryBank._allocate

    def poisoned(bank, capacity, kept=None):
        if bank.keys is None:
            copied = 0
        else:
            copied = kept if kept is not None else min(bank._local_count(bank.permanent),
                                                       bank.capacity)
        allocate(bank, capacity, kept)
        bank.keys[:, :, copied:] = float("nan")
        bank.values[:, :, copied:] = float("nan")

    monkeypatch.setattr(MemoryBank, "_allocate", poisoned)


def _spied_reads(monkeypatch):
    """[(memory positions N, lengths)] of every read the torch backend runs (inside the
    compiled graph too: the custom op calls the backend when the graph runs)."""
    reads, forward = [], stm_kernels.backends.pytorch.forward

    def spied(q, k, v, scale, l2, lengths=None):
        reads.append((k.shape[2], None if lengths is None else lengths.tolist()))
        return forward(q, k, v, scale, l2, lengths)

    monkeypatch.setattr(stm_kernels.backends.pytorch, "forward", spied)
    return reads


def test_graphed_step_reads_the_whole_capacity_with_device_lengths(fresh_dynamo, monkeypatch):
    """CUDA graphs asked for (the cudagraphs backend: on a CPU its graphs run unrecorded), the
    memory NaN past what it holds: one graph per step holding the read (MemoryBank.read never
    called), each bank read over its whole capacity with its frames' lengths, the same
    probabilities as eager while the memory grows past its capacity (16 -> 32 frames) and a
    second object enters; new graphs compiled only where the layout changed (the first read,
    the second object's bank, the first growth), none while the lengths change."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = STM(STMConfig.small()).eval()
    frames = torch.rand(20, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    masks = _masks(32, 48)
    _poisoned_storage(monkeypatch)
    eager = _run(VideoSegmenter(model, mem_every=1), frames, masks)
    monkeypatch.setattr(MemoryBank, "read", lambda *args, **kwargs: pytest.fail(
        "the read ran outside the graph"))
    reads = _spied_reads(monkeypatch)
    segmenter = VideoSegmenter(model, mem_every=1, compile={"backend": "cudagraphs"})
    assert segmenter._compiled.graphs and segmenter._read_in_graph
    graphed, compiled, capacities = [], [], []
    for t, frame in enumerate(frames):
        before = counters["stats"]["unique_graphs"]
        graphed.append(segmenter.step(frame, mask=masks.get(t)))
        compiled.append(counters["stats"]["unique_graphs"] - before)
        capacities.append([bank.capacity for bank in segmenter.banks])
    for actual, expected in zip(graphed, eager, strict=True):
        assert not actual.isnan().any()
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    positions = 2 * 3  # a 32x48 frame's stride-16 features
    expected_reads = []
    for t in range(1, len(frames)):  # every frame is kept (mem_every=1): t frames at step t
        first_capacity = 16 if t <= 16 else 32
        expected_reads.append((first_capacity * positions, [t * positions]))
        if t >= 7:  # the second object's bank, from its mask on frame 6
            expected_reads.append((16 * positions, [(t - 6) * positions]))
    assert reads == expected_reads
    assert capacities[16] == [16, 16] and capacities[17] == [32, 16]
    # step 1: the step's graph and the memory encoder; 7: both for two banks (the step's)
    # and two objects (the memory encoder's); 17: the step's for a capacity of 32 frames
    assert [t for t, count in enumerate(compiled) if count] == [1, 7, 17]


def test_a_torch_read_on_a_gpu_stays_out_of_the_graph(monkeypatch):
    """The torch backend reads its lengths on the host, which a capture cannot hold: on a GPU
    such a segmenter keeps the read eager between its graphs; on a CPU (nothing recorded) and
    with the triton or naive backend the read is graphed."""
    model = STM(STMConfig.small()).eval()
    graphed = VideoSegmenter(model, read_backend="naive", compile={"backend": "cudagraphs"})
    assert graphed._read_in_graph
    torch_read = VideoSegmenter(model, read_backend="torch", compile={"backend": "cudagraphs"})
    assert torch_read._read_in_graph  # on a CPU
    monkeypatch.setattr(torch_read, "device", torch.device("cuda"))
    assert not torch_read._read_in_graph
    monkeypatch.setattr(graphed, "device", torch.device("cuda"))
    assert graphed._read_in_graph


def test_a_banks_fixed_capacity_memory_follows_its_frames_without_a_device_read(monkeypatch):
    """MemoryBank.fixed_capacity: the whole storage as views, lengths frames·h·w recorded on the
    host (no Tensor.item); the same object while the frames change, a new one when the
    storage grows or objects leave; refused for offloaded memory."""
    bank = MemoryBank(2, 4, 6, 2, 3)
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a device read"))
    keys, values = torch.randn(2, 4, 2, 3), torch.randn(2, 6, 2, 3)
    bank.add(keys, values, permanent=True)
    memory = bank.fixed_capacity()
    assert memory.keys.shape == (2, 4, 16 * 6) and memory.keys.data_ptr() == bank.keys.data_ptr()
    assert memory.values.data_ptr() == bank.values.data_ptr()
    assert memory.host_lengths == (6, 6) and known_range(memory.lengths) == (6, 6)
    torch.testing.assert_close(memory.keys[:, :, :6], keys.flatten(2), rtol=0, atol=0)
    bank.add(keys, values, permanent=False)
    assert bank.fixed_capacity() is memory and memory.host_lengths == (12, 12)
    bank.add(keys, values, permanent=False)  # replaces the temporary frame: same length
    assert bank.fixed_capacity() is memory and known_range(memory.lengths) == (12, 12)
    for _ in range(16):  # 17 permanent frames (the temporary one dropped)
        bank.add(keys, values, permanent=True)
    grown = bank.fixed_capacity()
    assert grown is not memory and grown.capacity == 32 * 6 and grown.host_lengths == (102, 102)
    bank.remove_objects([0])
    fewer = bank.fixed_capacity()
    assert fewer is not grown and fewer.batch == 1 and fewer.host_lengths == (102,)
    with pytest.raises(RuntimeError, match="fixed_capacity.. needs the whole memory on the "
                                           "compute device"):
        MemoryBank(1, 4, 6, 2, 3, offload=True).fixed_capacity()


def test_graphed_replay_memorises_as_step_does(fresh_dynamo, monkeypatch):
    """replay() memorises through the graphed memory encoder: it too begins a graph step."""
    torch.manual_seed(0)
    model = STM(STMConfig.small()).eval()
    frames = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = _boxes(32, 32, {1: (4, 4, 20, 20)})
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    graphed = VideoSegmenter(model, mem_every=1, compile={"backend": "cudagraphs"})
    plain = VideoSegmenter(model, mem_every=1)
    for t in range(3):
        for segmenter in (graphed, plain):
            segmenter.replay(frames[t], labels, annotated=t == 0)
    assert len(steps) == 3
    torch.testing.assert_close(graphed.step(frames[3]), plain.step(frames[3]), rtol=0,
                               atol=1e-5)


def _gpu_clip(length):
    """(the committed small model on the GPU, a synthetic clip of `length` frames there, its
    first mask); skips where the model is missing."""
    if not WEIGHTS.exists():
        pytest.skip("the committed small model is missing")
    model = load_small_model(device="cuda")
    frames, labels = synthetic_video(length, size=(64, 96), seed=2)
    frames = torch.as_tensor(frames).cuda()
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames
    return model, frames, {0: torch.as_tensor(labels[0]).long().cuda()}


@contextlib.contextmanager
def _float32_without_tf32():
    """Within the block cuDNN and matmuls compute float32 without TF32 (eager and graphed
    alike)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
def test_cuda_graphs_segment_as_eager_on_a_gpu(fresh_dynamo):
    """On a GPU, compile={"mode": "reduce-overhead"} under inference mode: inductor records
    CUDA graphs (none skipped) and the probabilities follow eager's over a growing memory, in
    float32 without TF32 on either side."""
    from torch._dynamo.utils import counters
    model, frames, masks = _gpu_clip(16)
    with _float32_without_tf32():
        eager = _run(VideoSegmenter(model, mem_every=2), frames, masks)
        segmenter = VideoSegmenter(model, mem_every=2, compile={"mode": "reduce-overhead"})
        with torch.inference_mode():  # as bench long-video runs it
            graphed = [probs.clone() for probs in _run(segmenter, frames, masks)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    for actual, expected in zip(graphed, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)
        agree = (segmenter.labels(actual) == segmenter.labels(expected)).float().mean()
        assert agree > 0.999


@pytest.mark.gpu
def test_cuda_graphs_hold_the_read_on_a_gpu(fresh_dynamo, monkeypatch):
    """On a GPU, compile={"mode": "reduce-overhead"} with the triton read, under inference
    mode, every frame kept so that the memory grows past 16 frames: the step's graph holds the
    read (MemoryBank.read never called; the triton read's Python runs only in the steps that
    warm up or record a graph), no CUDA graph skipped, recordings only where a capacity or the
    banks changed (none two steps after), and the probabilities follow eager's (float32,
    TF32 off on both sides) at every memory length."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees
    import stm_kernels.backends.triton as triton_backend
    model, frames, masks = _gpu_clip(24)
    step = [0]
    recorded, python_reads = [], []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda manager, *args: (recorded.append(step[0]),
                                                record(manager, *args))[1])
    forward = triton_backend.forward
    monkeypatch.setattr(triton_backend, "forward", lambda *args, **kwargs: (
        python_reads.append(step[0]), forward(*args, **kwargs))[1])
    with _float32_without_tf32():
        eager = _run(VideoSegmenter(model, mem_every=1, read_backend="triton"), frames, masks)
        python_reads.clear()
        monkeypatch.setattr(MemoryBank, "read", lambda *args, **kwargs: pytest.fail(
            "the read ran outside the graph"))
        segmenter = VideoSegmenter(model, mem_every=1, read_backend="triton",
                                   compile={"mode": "reduce-overhead"})
        assert segmenter._read_in_graph
        graphed, capacities = [], []
        with torch.inference_mode():
            for t, frame in enumerate(frames):
                step[0] = t
                graphed.append(segmenter.step(frame, mask=masks.get(t)).clone())
                capacities.append(tuple(bank.capacity for bank in segmenter.banks))
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert capacities[16] == (16,) and capacities[-1] == (32,)
    settled = [t for t in range(3, len(frames)) if len(set(capacities[t - 2:t + 1])) == 1]
    assert recorded and not set(recorded) & set(settled), (recorded, capacities)
    assert not set(python_reads) & set(settled), (python_reads, capacities)
    for actual, expected in zip(graphed, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)
        agree = (segmenter.labels(actual) == segmenter.labels(expected)).float().mean()
        assert agree > 0.999
