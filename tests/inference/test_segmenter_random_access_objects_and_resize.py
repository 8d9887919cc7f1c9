"""VideoSegmenter features: start on any frame and segment both directions (random-access
frames), remove objects, a bounded internal size for high-resolution input, torch.compile."""
import numpy as np
import pytest
import torch

from helpers import SHARED, synthetic_video, write_davis_folder
from stm_model import STM, MemoryBank, STMConfig, VideoSegmenter
from stm_model import io as video_io
from stm_model.inference.directions import (FrameSequence, segment_backward,
                                            segment_both_directions, segment_forward)
from stm_model.inference.resize import internal_size, resize_frame, upsample_probs

DAVIS = SHARED / "data" / "davis2016-val"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return STM(STMConfig.small()).eval()


@pytest.fixture(scope="module")
def trained_model():
    from stm_model.demo import WEIGHTS, load_small_model
    if not WEIGHTS.exists():
        pytest.skip("the committed small model is missing")
    return load_small_model()


def _video(frames, height, width, seed=0):
    return torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _boxes(height, width, boxes):
    mask = torch.zeros(height, width, dtype=torch.int64)
    for object_id, (top, left, bottom, right) in boxes.items():
        mask[top:bottom, left:right] = object_id
    return mask


def _run(segmenter, frames, mask, masks=None):
    """Probabilities of every frame, the mask on the first (and masks {position: mask})."""
    masks = {**(masks or {}), 0: mask}
    return [segmenter.step(frame, mask=masks.get(t)) for t, frame in enumerate(frames)]


# ----------------------------------------------------------------------- start anywhere


def test_start_on_a_later_frame_counts_video_indices(small_model):
    frames = _video(12, 48, 64, seed=1)
    mask = _boxes(48, 64, {1: (4, 4, 20, 30), 2: (24, 30, 44, 60)})
    expected = _run(VideoSegmenter(small_model, mem_every=3), frames[5:], mask)
    seg = VideoSegmenter(small_model, mem_every=3, start_frame=5)
    assert seg.frame_index == 5
    with pytest.raises(ValueError, match="first frame needs a mask"):
        seg.step(frames[5])
    actual = _run(seg, frames[5:], mask)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    # the schedule counts from frame 5; memory slots hold video indices
    assert seg.banks[0].slot_frames == [5, 8, 10] and seg.frame_index == 12
    with pytest.raises(ValueError, match=r"frame 12 is 63x48 \(WxH\)"):
        seg.step(torch.rand(3, 48, 63))
    # the helper: from the first mask of a {frame index: mask} mapping to the end
    results = list(segment_forward(seg, frames, {5: mask}))
    assert [r.index for r in results] == list(range(5, 12))
    assert all(torch.equal(r.probs, e) for r, e in zip(results, expected, strict=True))
    assert torch.equal(results[0].labels, mask)
    with pytest.raises(ValueError, match="start_frame must be a frame index"):
        VideoSegmenter(small_model, start_frame=-1)


def test_backward_pass_is_a_forward_run_over_the_reversed_frames(small_model):
    frames = _video(9, 32, 48, seed=2)
    mask = _boxes(32, 48, {1: (2, 2, 16, 20), 2: (18, 24, 30, 46)})
    late = _boxes(32, 48, {3: (0, 30, 10, 46)})  # an object entering on frame 2, backwards
    reversed_frames = frames[:7].flip(0)  # frames 6, 5, ..., 0
    expected = _run(VideoSegmenter(small_model, mem_every=2), reversed_frames, mask, {4: late})
    seg = VideoSegmenter(small_model, mem_every=2)
    results = list(segment_backward(seg, frames, {6: mask, 2: late}.get, start=6))
    assert [r.index for r in results] == [5, 4, 3, 2, 1, 0]
    assert all(torch.equal(r.probs, e) for r, e in zip(results, expected[1:], strict=True))
    assert results[-1].object_ids == [1, 2, 3] and seg.reverse
    assert seg.banks[0].slot_frames == [6, 4, 2, 1]  # kept: 6, 4, 2 (masked) + previous


def test_both_directions_on_real_davis_frames(trained_model):
    """DAVIS-2016 blackswan, frames 0..11 read at random from the folder, mask on frame 8,
    at a reduced internal size: every frame once; the backward pass equals the forward
    segmenter over the reversed frame list from frame 8's mask."""
    folder = DAVIS / "JPEGImages" / "480p" / "blackswan"
    if not folder.exists():
        pytest.skip("../shared/data is absent")
    sequence = FrameSequence(folder)
    frames = [sequence[i].tensor for i in range(12)]
    mask = torch.from_numpy(video_io.read_mask(
        DAVIS / "Annotations" / "480p" / "blackswan" / "00008.png"))
    options = dict(mem_every=3, max_internal_size=120)
    seg = VideoSegmenter(trained_model, **options)
    results = {r.index: r for r in segment_both_directions(seg, frames, {8: mask})}
    assert sorted(results) == list(range(12)) and seg.frame_index == -1
    assert results[0].probs.shape == (2, 480, 854)
    assert torch.equal(results[8].labels, mask)
    reference = VideoSegmenter(trained_model, **options)
    expected = _run(reference, frames[8::-1], mask)  # frames 8, 7, ..., 0
    for position, index in enumerate(range(8, -1, -1)):
        if index != 8:
            assert torch.allclose(results[index].probs, expected[position], atol=1e-6), index
    # the same frames through FrameSequence.range (backwards, as the CLI reads them)
    backward = list(segment_backward(VideoSegmenter(trained_model, **options), sequence,
                                     {8: mask}))
    assert [r.index for r in backward] == list(range(7, -1, -1))
    assert [r.frame.name for r in backward] == [f"{i:05d}" for i in range(7, -1, -1)]
    assert all(torch.allclose(r.probs, results[r.index].probs, atol=1e-6) for r in backward)


def _write_video(path, frames, gop):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt, stream.gop_size = "yuv420p", gop
        stream.bit_rate = 4_000_000
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_frame_sequence_reads_ranges_at_random(tmp_path, kind):
    """Forwards, backwards (in chunks) and single frames equal the sequential reader's."""
    images = (np.random.default_rng(0).random((23, 32, 48, 3)) * 255).astype(np.uint8)
    images[:, :, :, 0] = np.arange(23)[:, None, None] * 10  # frames differ visibly
    if kind == "video":
        source = tmp_path / "clip.mp4"
        _write_video(source, images, gop=5)  # keyframes every 5 frames: seeks land on them
    else:
        write_davis_folder(tmp_path, torch.from_numpy(images).permute(0, 3, 1, 2) / 255,
                           np.zeros((23, 32, 48), np.uint8))
        source = tmp_path / "JPEGImages" / "480p" / "synth"
    reference = [frame.image for frame in video_io.FrameReader(source)]
    frames = FrameSequence(source, chunk_frames=4)
    assert len(frames) == 23 and frames.names[3] == "00003"
    forwards = list(frames.range(7, 19))
    backwards = list(frames.range(22, -1, -1))
    assert [f.index for f in forwards] == list(range(7, 19))
    assert [f.index for f in backwards] == list(range(22, -1, -1))
    for frame in forwards + backwards + [frames[0], frames[12], frames[22]]:
        assert np.array_equal(frame.image, reference[frame.index]), frame.index
    with pytest.raises(IndexError, match=r"outside \[0, 23\)"):
        frames[23]


# ----------------------------------------------------------------------- remove objects


def test_remove_objects_drops_memory_rows_and_channels_then_an_id_returns(small_model):
    frames = _video(8, 48, 64, seed=3)
    seg = VideoSegmenter(small_model, mem_every=2)
    seg.step(frames[0], mask=_boxes(48, 64, {1: (2, 2, 20, 20), 2: (24, 30, 44, 60)}))
    seg.step(frames[1], mask=_boxes(48, 64, {5: (30, 2, 46, 16)}))  # 5 enters: a second bank
    probs = seg.step(frames[2])
    bank = seg.banks[0]
    kept_keys = bank.keys[1, :, :bank.num_frames].clone()
    with pytest.raises(ValueError, match=r"ids \[7\] are not objects of this video"):
        seg.remove_objects([7])
    with pytest.raises(ValueError, match=r"probs must be \(4, H, W\)"):
        seg.remove_objects([1], probs=probs[:2])
    reduced = seg.remove_objects([1], probs=probs)
    assert seg.object_ids == [2, 5] and [b.num_objects for b in seg.banks] == [1, 1]
    assert reduced.shape == (3, 48, 64)
    assert torch.allclose(reduced[0], probs[0] + probs[1]) and torch.equal(reduced[1:],
                                                                           probs[2:])
    assert torch.equal(bank.keys[0, :, :bank.num_frames], kept_keys)  # object 2's rows stay
    assert bank.keys.stride(1) % 16 == 0
    assert seg._pending.object_probs.shape[0] == 2  # the frame awaiting memorisation lost channel 1
    assert seg.step(frames[3]).shape[0] == 3
    seg.remove_objects([5])  # all of the second bank's objects: the bank goes
    assert len(seg.banks) == 1 and seg.step(frames[4]).shape[0] == 2
    # a later mask with id 1: a new object with a memory of its own from that frame on
    returning = _boxes(48, 64, {1: (4, 40, 20, 60)})
    probs = seg.step(frames[5], mask=returning)
    assert seg.object_ids == [2, 1] and probs.shape[0] == 3
    assert torch.equal(seg.labels(probs) == 1, returning == 1)
    assert seg.step(frames[6]).shape[0] == 3
    assert seg.banks[1].slot_frames == [5]
    seg.remove_objects([2, 1])  # nothing left: background only, nothing memorised
    assert seg.step(frames[7]).shape[0] == 1 and seg.banks == []


def test_memory_bank_remove_objects_keeps_the_others_frames():
    bank = MemoryBank(3, 8, 12, 2, 3)
    generator = torch.Generator().manual_seed(0)
    added = [(torch.randn(3, 8, 2, 3, generator=generator),
              torch.randn(3, 12, 2, 3, generator=generator)) for _ in range(5)]
    for index, (keys, values) in enumerate(added):
        bank.add(keys, values, permanent=True, frame_index=index)
    bank.remove_objects([1])
    assert bank.num_objects == 2 and bank.capacity == 16 and bank.slot_frames == [0, 1, 2, 3, 4]
    for slot, (keys, values) in enumerate(added):
        assert torch.equal(bank.keys[:, :, slot].view(2, 8, 2, 3), keys[[0, 2]])
        assert torch.equal(bank.values[:, :, slot].view(2, 12, 2, 3), values[[0, 2]])
    bank.add(added[0][0][:2], added[0][1][:2], permanent=False, frame_index=5)
    before = bank.keys[:, :, :6].clone()
    bank.reserve(17)  # grows by doubling, keeping every frame (the temporary one too)
    assert bank.capacity == 32 and torch.equal(bank.keys[:, :, :6], before)
    assert bank.keys.stride(1) % 16 == 0
    with pytest.raises(ValueError, match=r"rows must be object indices in \[0, 2\)"):
        bank.remove_objects([2])
    with pytest.raises(ValueError, match="without objects"):
        bank.remove_objects([0, 1])


# ----------------------------------------------------------------------- high resolution


def test_internal_size_bounds_the_shorter_side():
    assert internal_size((480, 854), 480) == (480, 854)
    assert internal_size((1080, 1920), 480) == (480, 853)
    assert internal_size((2160, 3840), 480) == (480, 853)
    assert internal_size((1920, 1080), 480) == (853, 480)  # portrait
    assert internal_size((2160, 3840), None) == (2160, 3840)
    for bad in (8, 100.0, "480", True):
        with pytest.raises(ValueError, match="max_internal_size must be an integer >= 16"):
            VideoSegmenter(STM(STMConfig.small()), max_internal_size=bad)


def test_resized_segmentation_round_trips_to_the_input_size(small_model):
    """64x96 input at max_internal_size=32: the network and memory see 32x48 frames, the
    probabilities come back at 64x96, upsampled from what segmenting the downsized frames
    gives; the masked frame returns the given mask's own pixels."""
    frames = _video(6, 64, 96, seed=4)
    mask = _boxes(64, 96, {1: (4, 6, 30, 40), 2: (34, 50, 60, 90)})  # even: exact 2x shrink
    seg = VideoSegmenter(small_model, mem_every=2, max_internal_size=32)
    actual = _run(seg, frames, mask)
    assert seg.banks[0].size == (2, 3) and seg.memory_bytes_per_frame == \
        2 * (64 + 128) * 6 * 4
    small = [resize_frame(frame, (32, 48)) for frame in frames]
    expected = _run(VideoSegmenter(small_model, mem_every=2), small, mask[::2, ::2])
    assert torch.equal(seg.labels(actual[0]), mask) and actual[0].shape == (3, 64, 96)
    for a, e in zip(actual[1:], expected[1:], strict=True):
        assert a.shape == (3, 64, 96)
        assert torch.allclose(a, upsample_probs(e, (64, 96)), atol=1e-5)
        assert torch.allclose(a.sum(0), torch.ones(64, 96), atol=1e-5)
    # frames already within the bound go through untouched
    plain = _run(VideoSegmenter(small_model, mem_every=2, max_internal_size=64), frames, mask)
    reference = _run(VideoSegmenter(small_model, mem_every=2), frames, mask)
    assert all(torch.equal(a, e) for a, e in zip(plain, reference, strict=True))


def test_a_model_with_its_own_internal_size_segments_at_it(tmp_path):
    """STMConfig.internal_size is the segmenters' max_internal_size when the caller names
    none (VideoSegmenter, InteractiveSession), the caller's wins, and a checkpoint keeps it."""
    from stm_model import InteractiveSession, load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    sized = STM(STMConfig.small(internal_size=32)).eval()
    save_checkpoint(sized, tmp_path / "sized.pt")
    assert load_checkpoint(tmp_path / "sized.pt").config.internal_size == 32
    frames = _video(4, 64, 96, seed=5)
    mask = _boxes(64, 96, {1: (4, 6, 30, 40)})
    own = VideoSegmenter(sized, mem_every=2)
    actual = _run(own, frames, mask)
    assert own.max_internal_size == 32 and own.banks[0].size[-2:] == (2, 3)
    expected = _run(VideoSegmenter(sized, mem_every=2, max_internal_size=32), frames, mask)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    assert actual[-1].shape == (2, 64, 96)
    wider = VideoSegmenter(sized, mem_every=2, max_internal_size=64)
    _run(wider, frames, mask)
    assert wider.banks[0].size[-2:] == (4, 6)
    interactive = STM(STMConfig.small(internal_size=32, interactive=True)).eval()
    assert InteractiveSession(interactive, frames, 1).frames.shape[-2:] == (32, 48)


def test_thin_objects_survive_the_downsized_memory(small_model):
    """A 1-pixel-wide object given at 4x the internal size is merged at the input size (the
    returned labels are the mask) and memorised with a partial probability, not dropped."""
    frames = _video(3, 64, 64, seed=5)
    mask = _boxes(64, 64, {1: (0, 0, 30, 30), 2: (40, 41, 60, 42)})
    seg = VideoSegmenter(small_model, max_internal_size=16)
    assert torch.equal(seg.labels(seg.step(frames[0], mask=mask)), mask)
    memorised = seg._pending.object_probs
    assert memorised.shape == (2, 16, 16) and 0 < memorised[1].max() < 1
    assert seg.step(frames[1]).shape == (3, 64, 64)


# ----------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # compiled graphs of earlier tests would be reused (and not counted)
    yield
    torch._dynamo.reset()


def test_compiled_segmenter_matches_eager(trained_model, fresh_dynamo):
    """torch.compile (inductor) against eager on a synthetic video: same masks, probabilities
    to float32 rounding. Every frame is kept (mem_every=1), so the memory fills its first
    capacity (16 frames) and grows past it on two graphs in all (query encoder + read +
    decoder, memory encoder), not one per memory length."""
    from torch._dynamo.utils import counters
    frames, labels = synthetic_video(19, size=(48, 64), seed=1)
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames
    mask = torch.from_numpy(labels[0]).long()
    eager = _run(VideoSegmenter(trained_model, mem_every=1), frames, mask)
    graphs = counters["stats"]["unique_graphs"]
    seg = VideoSegmenter(trained_model, mem_every=1, compile=True)
    compiled = _run(seg, frames, mask)
    assert seg.memory_frames == 18 and seg.banks[0].capacity == 32
    assert counters["stats"]["unique_graphs"] - graphs == 2
    for c, e in zip(compiled, eager, strict=True):
        assert torch.allclose(c, e, atol=1e-4)
        assert torch.equal(seg.labels(c), seg.labels(e))


@pytest.mark.parametrize("offload", [False, True], ids=["in-device", "offload"])
def test_compiled_graphs_stay_bounded_as_the_memory_grows(small_model, fresh_dynamo, offload):
    """Every frame kept (mem_every=1) for 40 frames: the memory passes two capacity doublings
    (16 -> 32 -> 64 frames) and 28 memory lengths on one set of graphs (the memory length is
    a dynamic dimension); an object entering adds graphs once (another object grouping)."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()  # a backend that counts the graphs compiled, then runs eagerly
    frames = _video(8, 32, 32, seed=6)
    mask = _boxes(32, 32, {1: (2, 2, 14, 14)})
    seg = VideoSegmenter(small_model, mem_every=1, offload=offload,
                         compile={"backend": counter})
    eager = VideoSegmenter(small_model, mem_every=1, offload=offload)
    compiles = []
    for t in range(40):
        frame_mask = mask if t == 0 else _boxes(32, 32, {2: (20, 20, 30, 30)}) if t == 30 \
            else None
        assert torch.equal(seg.step(frames[t % 8], mask=frame_mask),
                           eager.step(frames[t % 8], mask=frame_mask))
        compiles.append(counter.frame_count)
    assert seg.banks[0].capacity == 64 and seg.memory_frames == 39
    functions = 3 if offload else 2  # (query encoder, decoder | predict) + memory encoder
    assert compiles[1] == compiles[29] == functions
    assert compiles[-1] - compiles[29] <= functions  # the new object's grouping
