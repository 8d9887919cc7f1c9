"""BatchSegmenter, BatchedMemory and segment_videos against VideoSegmenter, one video alone."""
import pytest
import torch

from helpers import skip_unless_runnable, synthetic_video
from stm_model import BatchSegmenter, BatchedMemory, MemoryBank, VideoSegmenter
from stm_model.demo import load_small_model
from stm_model.inference.video_batches import FrameInput, VideoJob, segment_videos

SIZE = (48, 64)
# float32 rounding: batched convolutions and reads sum in another order. Measured: at most
# 2.6e-6 on CPU (median 5e-7, this file's videos, 2026-11-27); on CUDA within the bound with
# TF32 off (H200 and H100, 2026-11-26), 2e-4 with cuDNN's default TF32 (10-bit mantissa,
# unit roundoff 2^-11 against float32's 2^-24), hence the GPU test turns TF32 off.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_small_model()


def _video(frames, seed, objects, size=SIZE):
    images, labels = synthetic_video(frames, size=size, seed=seed, objects=objects)
    return images, torch.from_numpy(labels).long()


def _only(labels, keep):
    """labels with every id outside `keep` set to background (None when nothing is left)."""
    mask = torch.where(torch.isin(labels, torch.tensor(keep)), labels, 0)
    return mask if mask.any() else None


# Videos of different lengths: "late" gets object 2 on frame 3 (an object entering late),
# "reset" has object 1's mask given again on frame 4; "joins" starts at step 3.
VIDEOS = {  # name: (frames, seed, objects, first step, {frame: ids given on it})
    "late": (7, 1, 2, 0, {0: [1], 3: [2]}),
    "long": (11, 2, 3, 0, {0: [1, 2, 3]}),
    "reset": (6, 3, 2, 0, {0: [1, 2], 4: [1]}),
    "joins": (5, 4, 1, 3, {0: [1]}),
}


@pytest.fixture(scope="module")
def videos():
    return {name: _video(frames, seed, objects)
            for name, (frames, seed, objects, _, _) in VIDEOS.items()}


def _mask(name, t, labels):
    given = VIDEOS[name][4]
    return _only(labels[t], given[t]) if t in given else None


def _alone(model, name, images, labels, **options):
    segmenter = VideoSegmenter(model, **options)
    return [segmenter.step(images[t], mask=_mask(name, t, labels)) for t in range(len(images))]


def _assert_same(batched, alone):
    assert len(batched) == len(alone)
    for t, (ours, theirs) in enumerate(zip(batched, alone, strict=True)):
        assert ours.shape == theirs.shape, t
        difference = (ours - theirs).abs().max().item()
        assert difference < TOLERANCE, f"frame {t}: largest difference {difference:.2e}"


@pytest.mark.parametrize("options", [
    dict(mem_every=2), dict(mem_every=1, max_memory_frames=3),
    dict(mem_every=2, network_batch=1), dict(mem_every=3, read_backend="triton")],
    ids=["mem_every=2", "evicting", "one-per-call", "triton"])
def test_batched_videos_equal_each_video_segmented_alone(model, videos, options):
    """Different lengths, a late object, a mask resetting an object, a video joining mid-run;
    videos finish independently (their memory rows are freed and the others move). Triton:
    the ragged fused read (in the interpreter here) against the plain one."""
    if options.get("read_backend") == "triton":
        skip_unless_runnable("triton", "cpu")
    _check_against_alone(model, videos, options)


@pytest.mark.gpu
def test_batched_videos_equal_each_video_segmented_alone_on_cuda(videos):
    """In float32 proper: cuDNN convolutions run in TF32 by default (10-bit mantissa), where
    a batched and a single convolution may pick algorithms that differ by far more than 1e-4
    (2e-4 measured on an H200 with TF32 on; within 1e-4 with it off: bench/NOTES.md)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _check_against_alone(load_small_model(device="cuda"), videos, dict(mem_every=2))


def _check_against_alone(model, videos, options):
    segmenter = BatchSegmenter(model, **options)
    outputs = {name: [] for name in VIDEOS}
    for step in range(20):
        frames, masks = {}, {}
        for name, (images, labels) in videos.items():
            t = step - VIDEOS[name][3]
            if 0 <= t < len(images):
                frames[name] = images[t]
                mask = _mask(name, t, labels)
                if mask is not None:
                    masks[name] = mask
        if not frames:
            break
        for name, probs in segmenter.step(frames, masks).items():
            outputs[name].append(probs)
            if len(outputs[name]) == len(videos[name][0]):
                segmenter.finish(name)
        rows = sum(segmenter.num_objects(name) for name in segmenter.videos)
        assert segmenter.memory.rows_in_use == rows
    assert segmenter.videos == []
    assert [p.shape[0] for p in outputs["late"]] == [2, 2, 2, 3, 3, 3, 3]  # object 2 enters
    for name, (images, labels) in videos.items():
        _assert_same(outputs[name], _alone(model, name, images, labels, **{
            k: v for k, v in options.items() if k != "network_batch"}))


def test_object_ids_labels_and_memory_frames_follow_each_video(model, videos):
    segmenter = BatchSegmenter(model, mem_every=2)
    images, labels = videos["late"]
    for t in range(5):
        probs = segmenter.step({"late": images[t]}, {"late": _mask("late", t, labels)}
                               if _mask("late", t, labels) is not None else None)["late"]
    assert segmenter.object_ids("late") == [1, 2] and probs.shape == (3,) + SIZE
    assert segmenter.memory_frames("late") == 3  # frames 0, 2 and 3 (annotated; the previous)
    ids = segmenter.labels("late", probs)
    assert set(ids.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(ids, torch.tensor([0, 1, 2])[probs.argmax(0)])


def test_memory_grows_past_its_first_capacity(model):
    """mem_every=1: 20 memory frames need a second allocation of the shared storage."""
    images, labels = _video(21, seed=5, objects=2, size=(32, 32))
    segmenter = BatchSegmenter(model, mem_every=1)
    batched = [segmenter.step({"v": images[t]}, {"v": labels[0]} if t == 0 else None)["v"]
               for t in range(21)]
    assert segmenter.memory.frame_capacity == 32 and segmenter.memory_frames("v") == 20
    alone = VideoSegmenter(model, mem_every=1)
    _assert_same(batched, [alone.step(images[t], mask=labels[0] if t == 0 else None)
                           for t in range(21)])


def test_segment_videos_runs_k_at_a_time_and_waits_for_another_size(model):
    """Five jobs, two frame sizes, two at a time: every video equals its solo run."""
    specs = [(4, 11, 1, SIZE), (6, 12, 2, SIZE), (3, 13, 2, (32, 48)), (5, 14, 1, SIZE),
             (2, 15, 1, (32, 48))]
    jobs, expected = [], {}
    for index, (frames, seed, objects, size) in enumerate(specs):
        images, labels = _video(frames, seed, objects, size)
        jobs.append(VideoJob(f"v{index}", [FrameInput(f"{t:05d}", images[t],
                                                      labels[0] if t == 0 else None)
                                           for t in range(frames)]))
        alone = VideoSegmenter(model, mem_every=2)
        expected[f"v{index}"] = [alone.step(images[t], mask=labels[0] if t == 0 else None)
                                 for t in range(frames)]
    segmenter = BatchSegmenter(model, mem_every=2)
    got, batches = {name: [] for name in expected}, []
    for result in segment_videos(segmenter, jobs, batch_size=2):
        got[result.video].append(result)
        batches.append(len(segmenter.videos))
    assert max(batches) == 2
    for name, results in got.items():
        assert [r.index for r in results] == list(range(len(expected[name])))
        assert [r.last for r in results] == [False] * (len(results) - 1) + [True]
        assert results[0].name == "00000"
        _assert_same([r.probs for r in results], expected[name])
        assert torch.equal(results[-1].labels, torch.tensor([0] + results[-1].object_ids)[
            results[-1].probs.argmax(0)])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(segment_videos(segmenter, jobs, batch_size=0))
    with pytest.raises(ValueError, match="video name 'v0' is used twice"):
        list(segment_videos(segmenter, [jobs[0], jobs[0]], batch_size=2))


def test_clear_errors_name_the_argument_and_the_video(model):
    segmenter = BatchSegmenter(model)
    frame, mask = torch.rand(3, *SIZE), torch.zeros(SIZE, dtype=torch.int64)
    mask[10:20, 10:20] = 1
    with pytest.raises(ValueError, match="video 'a': the first frame needs a mask"):
        segmenter.step({"a": frame})
    with pytest.raises(ValueError, match=r"frames: video 'b' is 32x48 \(WxH\) but video 'a' "
                                         r"is 64x48"):
        segmenter.step({"a": frame, "b": torch.rand(3, 48, 32)},
                       {"a": mask, "b": mask[:, :32]})
    with pytest.raises(ValueError, match=r"video 'a': mask is 63x48 \(WxH\) but frame 0"):
        segmenter.step({"a": frame}, {"a": mask[:, :63]})
    with pytest.raises(ValueError, match="frames must be a non-empty mapping"):
        segmenter.step([frame])
    assert segmenter.videos == []  # nothing changed by the rejected steps
    segmenter.step({"a": frame}, {"a": mask})
    with pytest.raises(ValueError, match=r"running videos \['a'\] have no frame"):
        segmenter.step({"b": frame}, {"b": mask})
    with pytest.raises(ValueError, match=r"masks: videos \['c'\] have a mask but no frame"):
        segmenter.step({"a": frame}, {"c": mask})
    with pytest.raises(ValueError, match=r"video 'a': frame 1 is 32x48 \(WxH\) but the "
                                         r"video's frames are 64x48"):
        segmenter.step({"a": torch.rand(3, 48, 32)})
    with pytest.raises(KeyError, match="no running video 'z'"):
        segmenter.finish("z")
    with pytest.raises(ValueError, match="network_batch must be a positive integer"):
        BatchSegmenter(model, network_batch=0)
    with pytest.raises(ValueError, match="mem_every must be a positive integer"):
        BatchSegmenter(model, mem_every=0)


def _random_frame(n, key_dim, value_dim, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, key_dim, *size, generator=generator),
            torch.randn(n, value_dim, *size, generator=generator))


def test_batched_memory_reads_each_group_over_its_own_frames():
    """Groups of 2, 1 and 3 objects given 5, 2 and 4 frames: one read equals MemoryBank reads;
    removing the first group moves the last rows into its place, content intact."""
    memory = BatchedMemory(8, 12, 3, 5)
    sizes, frames = [2, 1, 3], [5, 2, 4]
    groups = [memory.add_group(n, owner=i) for i, n in enumerate(sizes)]
    banks = [MemoryBank(n, 8, 12, 3, 5) for n in sizes]
    for t in range(max(frames)):
        entries, keys, values = [], [], []
        for index, (group, bank) in enumerate(zip(groups, banks, strict=True)):
            if t < frames[index]:
                k, v = _random_frame(group.num_objects, 8, 12, (3, 5), seed=10 * t + index)
                bank.add(k, v, permanent=t % 2 == 0, frame_index=t)
                entries.append((group, t % 2 == 0, t))
                keys.append(k)
                values.append(v)
        memory.add(entries, torch.cat(keys), torch.cat(values))
    assert memory.lengths() == [3, 3, 2, 3, 3, 3]  # odd frames are temporary
    query = torch.randn(6, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.cat([bank.read(query[rows]) for bank, rows in zip(
        banks, (slice(0, 2), slice(2, 3), slice(3, 6)), strict=True)])
    assert torch.allclose(memory.read(query), expected, atol=1e-5)
    memory.remove_group(groups[0])
    order = groups[1].rows + groups[2].rows  # rows of the remaining objects, in bank order
    assert memory.rows_in_use == 4 and groups[0].rows == [] and sorted(order) == [0, 1, 2, 3]
    assert memory.lengths() == [[2, 3][order.index(r) > 0] for r in range(4)]
    row_query = torch.empty(4, 8, 3, 5)
    row_query[order] = query[2:6]
    solo = torch.cat([banks[1].read(query[2:3]), banks[2].read(query[3:6])])
    assert torch.allclose(memory.read(row_query)[order], solo, atol=1e-5)
    with pytest.raises(ValueError, match=r"BatchedMemory.add expects keys \(1, 8, 3, 5\)"):
        memory.add([(groups[1], True, 9)], torch.zeros(2, 8, 3, 5), torch.zeros(2, 12, 3, 5))
