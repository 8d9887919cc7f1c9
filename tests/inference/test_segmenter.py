"""VideoSegmenter and MemoryBank: schedule, padding, late objects, growth, eviction, offload."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import SHARED
from stm_model import STM, MemoryBank, STMConfig, VideoSegmenter
from stm_model.memory.storage import Offloaded, OnDevice
from stm_model.network.stm import pad_to_multiple, unpad


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return STM(STMConfig.small()).eval()


def _video(frames, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, height, width, generator=generator)


def _blob_mask(height, width, boxes):
    mask = torch.zeros(height, width, dtype=torch.int64)
    for object_id, (top, left, bottom, right) in boxes.items():
        mask[top:bottom, left:right] = object_id
    return mask


def test_padding_is_centred_like_the_official_code_and_cropped_back(small_model):
    x = torch.arange(50 * 70, dtype=torch.float32).view(1, 1, 50, 70)
    padded, pad = pad_to_multiple(x)
    assert padded.shape[-2:] == (64, 80) and pad == (5, 5, 7, 7)
    assert torch.equal(unpad(padded, pad), x)
    frames = _video(3, 50, 70)
    seg = VideoSegmenter(small_model)
    mask = _blob_mask(50, 70, {1: (5, 5, 20, 30), 2: (30, 40, 48, 66)})
    first = seg.step(frames[0], mask=mask)
    assert first.shape == (3, 50, 70) and torch.equal(seg.labels(first), mask)
    for frame in frames[1:]:
        probs = seg.step(frame)
        assert probs.shape == (3, 50, 70)
        assert torch.allclose(probs.sum(0), torch.ones(50, 70), atol=1e-5)


def test_official_schedule_keeps_every_mem_every_frame_plus_the_previous(small_model):
    frames = _video(13, 32, 32)
    seg = VideoSegmenter(small_model, mem_every=5)
    seg.step(frames[0], mask=_blob_mask(32, 32, {1: (4, 4, 20, 20)}))
    for t in range(1, 13):
        seg.step(frames[t])
        bank = seg.banks[0]
        kept = [f for f in range(0, t - 1) if f % 5 == 0]
        assert bank.slot_frames == kept + [t - 1], t


def test_objects_entering_late_get_their_own_memory_from_that_frame(small_model):
    frames = _video(7, 48, 64, seed=1)
    seg = VideoSegmenter(small_model, mem_every=5)
    assert seg.step(frames[0], mask=_blob_mask(48, 64, {1: (0, 0, 24, 24)})).shape[0] == 2
    seg.step(frames[1])
    seg.step(frames[2])
    entering = _blob_mask(48, 64, {3: (30, 40, 46, 62)})
    probs = seg.step(frames[3], mask=entering)
    assert seg.object_ids == [1, 3] and probs.shape[0] == 3
    claimed = entering > 0
    assert torch.all(probs[2][claimed] > 0.99) and torch.all(probs[1][claimed] < 1e-3)
    for t in range(4, 7):
        assert seg.step(frames[t]).shape[0] == 3
    first_bank, late_bank = seg.banks
    assert first_bank.num_objects == 1 and late_bank.num_objects == 1
    assert late_bank.slot_frames[0] == 3 and first_bank.slot_frames[0] == 0
    assert 3 in first_bank.slot_frames  # the annotated frame is kept for everyone


def test_mask_size_and_first_frame_errors(small_model):
    seg = VideoSegmenter(small_model)
    frame = torch.rand(3, 48, 64)
    with pytest.raises(ValueError, match="first frame needs a mask"):
        seg.step(frame)
    with pytest.raises(ValueError, match=r"mask is 63x48 \(WxH\) but frame 0 is 64x48"):
        seg.step(frame, mask=torch.zeros(48, 63, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer tensor of object ids"):
        seg.step(frame, mask=torch.zeros(48, 64))


def _judo_mask(name):
    return torch.from_numpy(np.array(Image.open(
        SHARED / "data" / "cutie-examples" / "masks" / "judo" / name)).astype(np.int64))


def test_judo_objects_enter_on_their_annotated_frames(small_model):
    """Real frames: objects 1, 3, 4 annotated on frames 0, 8, 13 (half resolution here)."""
    folder = SHARED / "data" / "cutie-examples" / "images" / "judo"
    if not folder.exists():
        pytest.skip("../shared/data is absent")
    masks = {0: _judo_mask("00000.png"), 8: _judo_mask("00008.png"), 13: _judo_mask("00013.png")}
    seg = VideoSegmenter(small_model, mem_every=5)
    channels = []
    for t, path in enumerate(sorted(folder.glob("*.jpg"))):
        frame = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
        frame = frame[:, ::2, ::2]
        mask = masks[t][::2, ::2] if t in masks else None
        channels.append(seg.step(frame, mask=mask).shape[0])
    assert channels == [2] * 8 + [3] * 5 + [4] * 3
    assert seg.object_ids == [1, 3, 4]
    with pytest.raises(ValueError, match=r"mask is 853x480 \(WxH\) but frame 0 is 854x480"):
        VideoSegmenter(small_model).step(torch.rand(3, 480, 854), mask=_judo_mask("00005.png"))


def _segment_all(model, frames, mask, **options):
    seg = VideoSegmenter(model, mem_every=2, **options)
    return torch.stack([seg.step(frames[0], mask=mask)] + [seg.step(f) for f in frames[1:]])


@pytest.mark.parametrize("options, atol", [
    (dict(read_backend="naive"), 1e-5),
    (dict(offload=True, offload_chunk_frames=1), 1e-5),
    (dict(max_memory_frames=64), 1e-5),
    (dict(memory_dtype="bf16"), 3e-2),
    (dict(amp_dtype="bf16", memory_dtype="bf16"), 3e-2),
], ids=["naive", "offload", "bounded", "bf16-memory", "bf16-autocast"])
def test_memory_options_and_naive_read_give_the_same_masks(small_model, options, atol):
    """The fused read against the official one, and every memory option against the plain
    fp32 in-device memory."""
    frames = _video(6, 48, 48, seed=2)
    mask = _blob_mask(48, 48, {1: (2, 2, 20, 30), 2: (24, 10, 46, 40)})
    expected = _segment_all(small_model, frames, mask, read_backend="torch")
    actual = _segment_all(small_model, frames, mask, **options)
    assert torch.allclose(actual, expected, atol=atol)
    if atol < 1e-3:  # (an untrained model's classes are near ties: lossy options may flip them)
        assert torch.equal(actual.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offloaded"])
def test_under_autocast_the_memory_is_read_in_its_storage_dtype(small_model, monkeypatch,
                                                               offload):
    """--amp bf16 with fp32 memory: the network runs autocast, the read its stored fp32 (the
    op under autocast would cast the memory to bf16, as SDPA does: a copy of the whole memory
    per read, at another precision than --memory-dtype's)."""
    from stm_model.memory import storage
    seen, real = [], storage.memory_read

    def recorded(query, keys, values, **options):
        seen.append((query.dtype, keys.dtype, values.dtype, torch.is_autocast_enabled("cpu")))
        return real(query, keys, values, **options)
    monkeypatch.setattr(storage, "memory_read", recorded)
    frames = _video(4, 48, 48, seed=2)
    mask = _blob_mask(48, 48, {1: (2, 2, 20, 30), 2: (24, 10, 46, 40)})
    _segment_all(small_model, frames, mask, amp_dtype="bf16", memory_dtype="fp32",
                 offload=offload)
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}


def _random_frame(n, key_dim, value_dim, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, key_dim, *size, generator=generator),
            torch.randn(n, value_dim, *size, generator=generator))


def test_memory_bank_grows_by_doubling_and_keeps_its_frames():
    bank = MemoryBank(2, 8, 12, 3, 5)
    assert bank.capacity == 16
    added = [_random_frame(2, 8, 12, (3, 5), seed) for seed in range(40)]
    capacities = []
    for index, (keys, values) in enumerate(added):
        bank.add(keys, values, permanent=True, frame_index=index)
        capacities.append(bank.capacity)
    assert sorted(set(capacities)) == [16, 32, 64]
    assert bank.nbytes == 2 * (8 + 12) * 64 * 15 * 4
    for slot, (keys, values) in enumerate(added):
        assert torch.equal(bank.keys[:, :, slot].view(2, 8, 3, 5), keys)
        assert torch.equal(bank.values[:, :, slot].view(2, 12, 3, 5), values)
    # the memory handed to the kernel is a view of the bank with a 16-aligned channel stride
    view = bank.stored(0, bank.num_frames)[0]
    assert view.data_ptr() == bank.keys.data_ptr() and view.stride(1) % 16 == 0


def test_memory_bank_temporary_slot_and_eviction_keep_the_first_frame():
    bank = MemoryBank(1, 4, 4, 2, 2, max_frames=4)
    for index in range(10):
        bank.add(*_random_frame(1, 4, 4, (2, 2), index), permanent=True, frame_index=index)
    assert bank.num_frames == 3 and sorted(bank.slot_frames) == [0, 8, 9]
    bank.add(*_random_frame(1, 4, 4, (2, 2), 10), permanent=False, frame_index=10)
    bank.add(*_random_frame(1, 4, 4, (2, 2), 11), permanent=False, frame_index=11)
    assert bank.num_frames == 4 and bank.slot_frames[-1] == 11
    assert bank.slot_frames[0] == 0 and bank.capacity == 16
    with pytest.raises(ValueError, match="at least 2"):
        MemoryBank(1, 4, 4, 2, 2, max_frames=1)
    with pytest.raises(ValueError, match=r"expects keys \(1, 4, 2, 2\)"):
        bank.add(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3), permanent=True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_offloaded_and_low_precision_reads_match_the_plain_read(dtype, tolerance):
    plain = MemoryBank(2, 16, 24, 4, 4)
    other = MemoryBank(2, 16, 24, 4, 4, dtype=dtype, offload=True, chunk_frames=3)
    for index in range(7):
        frame = _random_frame(2, 16, 24, (4, 4), index)
        plain.add(*frame, permanent=index % 2 == 0, frame_index=index)
        other.add(*frame, permanent=index % 2 == 0, frame_index=index)
    query = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    expected = plain.read(query)
    actual = other.read(query)
    assert actual.shape == (2, 24, 4, 4)
    assert ((actual.float() - expected).norm() / expected.norm()) < tolerance
    # one read, two storage strategies: the offloaded one reads 7 frames in chunks of 3
    assert isinstance(plain.storage, OnDevice) and isinstance(other.storage, Offloaded)
    assert other.storage_device.type == "cpu" and other.keys.device.type == "cpu"
    with pytest.raises(RuntimeError, match="memory_views\\(\\) needs the whole memory"):
        other.memory_views()


def test_long_video_memory_grows_only_with_the_bank(small_model):
    """200 low-resolution frames, mem_every=5: 40 kept frames + the previous one; the
    segmenter's memory is the bank (capacity 64 frames after doubling), nothing per frame."""
    seg = VideoSegmenter(small_model, mem_every=5)
    frames = _video(8, 32, 48, seed=3)
    seg.step(frames[0], mask=_blob_mask(32, 48, {1: (4, 4, 20, 20), 2: (18, 20, 30, 44)}))
    for t in range(1, 200):
        seg.step(frames[t % 8])
    bank = seg.banks[0]
    assert seg.memory_frames == 41 and bank.permanent == 40 and bank.capacity == 64
    config = small_model.config
    assert seg.memory_bytes == 2 * (config.key_dim + config.value_dim) * 64 * (2 * 3) * 4
    # what the 41 frames take, without the 23 frames' capacity set aside
    assert seg.memory_held_bytes == 2 * (config.key_dim + config.value_dim) * 41 * (2 * 3) * 4
    assert len(bank.slot_frames) == 41


def test_a_cpu_session_lays_the_weights_out_channels_last(monkeypatch):
    """On a CPU every session puts the model's 4-D weights in channels-last layout (faster
    convolutions and max-pooling there; docs/performance.md): the same probabilities as
    the model left in its own layout, to float32 rounding."""
    from stm_model import BatchSegmenter, InteractiveSession
    from stm_model.inference import session
    torch.manual_seed(0)
    frames = torch.rand(6, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(48, 64, dtype=torch.int64)
    mask[8:30, 10:40] = 1

    def probabilities(model):
        segmenter = VideoSegmenter(model, mem_every=2)
        return [segmenter.step(frame, mask=mask if t == 0 else None)
                for t, frame in enumerate(frames)]
    model = STM(STMConfig.small()).eval()
    weights = [p for p in model.parameters() if p.dim() == 4]
    with monkeypatch.context() as patched:
        patched.setattr(session, "channels_last_on", lambda model: None)
        as_given = probabilities(model)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    laid_out = probabilities(model)
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    for actual, expected in zip(laid_out, as_given, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    for made in (BatchSegmenter(STM(STMConfig.small())),
                 InteractiveSession(STM(STMConfig.small(interactive=True)), frames, 1)):
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in made.model.parameters() if p.dim() == 4)
