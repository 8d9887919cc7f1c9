"""VideoSegmenter with CUDA graphs (compile={"mode": "reduce-overhead"} and the like): the query
encoder, the decoder and the memory encoder graphed apart, the memory read eager between them,
since a graph is recorded per shape and the memory's length changes every kept frame."""
import pytest
import torch

from helpers import synthetic_video
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


def test_graphed_network_with_the_read_eager_between(fresh_dynamo, monkeypatch):
    """With CUDA graphs asked for (the cudagraphs backend, which on a CPU skips the recording
    and runs its graphs as they are): the same probabilities as eager while the memory grows
    and an object enters; three graphs (query encoder, decoder, memory encoder), not one
    holding the read (two more for the second object's grouping); the read called eagerly
    every step after the first; CUDA graph trees told of every step."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = STM(STMConfig.small()).eval()
    frames = torch.rand(10, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    masks = _masks(32, 48)
    eager = _run(VideoSegmenter(model, mem_every=2), frames, masks)
    steps, reads = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: steps.append(len(reads)))
    read = MemoryBank.read
    monkeypatch.setattr(MemoryBank, "read", lambda bank, *args, **kwargs: (
        reads.append(bank), read(bank, *args, **kwargs))[1])
    graphs = counters["stats"]["unique_graphs"]
    segmenter = VideoSegmenter(model, mem_every=2, compile={"backend": "cudagraphs"})
    assert segmenter._compiled.graphs
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


@pytest.mark.gpu
def test_cuda_graphs_segment_as_eager_on_a_gpu(fresh_dynamo):
    """On a GPU, compile={"mode": "reduce-overhead"} under inference mode: inductor records
    CUDA graphs (none skipped) and the probabilities follow eager's over a growing memory, in
    float32 without TF32 on either side."""
    from torch._dynamo.utils import counters
    if not WEIGHTS.exists():
        pytest.skip("the committed small model is missing")
    model = load_small_model(device="cuda")
    frames, labels = synthetic_video(16, size=(64, 96), seed=2)
    frames = torch.as_tensor(frames).cuda()
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames
    masks = {0: torch.as_tensor(labels[0]).long().cuda()}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            eager = _run(VideoSegmenter(model, mem_every=2), frames, masks)
            segmenter = VideoSegmenter(model, mem_every=2, compile={"mode": "reduce-overhead"})
            with torch.inference_mode():  # as bench long-video runs it
                graphed = [probs.clone() for probs in _run(segmenter, frames, masks)]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    assert counters["inductor"]["cudagraph_skips"] == 0
    for actual, expected in zip(graphed, eager, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)
        agree = (segmenter.labels(actual) == segmenter.labels(expected)).float().mean()
        assert agree > 0.999
