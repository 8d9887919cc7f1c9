"""Training on DAVIS-format folders: the sequences filter, static-image clips from annotated
frames, mixing with synthetic clips, the options, and a few steps of the small-real model."""
import argparse

import numpy as np
from scipy import ndimage
import pytest
import torch
from PIL import Image

from helpers import SHARED
from stm_model.network import efficientnet_lite
from stm_model.network.stm import LITE_VARIANTS
from stm_model.training.config import SMALL_REAL_TRUNKS, TrainConfig, add_arguments
from stm_model.training.datasets import (DavisClips, DavisFrames, MixedClips, StaticImageClips,
                                         SyntheticClips)
from stm_model.training.loop import build_dataset, build_model, train

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
# the DAVIS-2016 sequences training may use; the other ten of davis2016-val are a test set
TRAINING_SEQUENCES = ("bmx-trees", "breakdance", "camel", "car-roundabout", "cows",
                      "drift-chicane", "goat", "kite-surf", "motocross-jump", "parkour")


@pytest.fixture
def davis_root(tmp_path):
    """A DAVIS-2016-style folder: sequences red, green, blue (frames of that colour, 6 each,
    48x80) with a moving grey square as the object ('L' masks, 0 and 255)."""
    root = tmp_path / "davis"
    for name, colour in COLOURS.items():
        images = root / "JPEGImages" / "480p" / name
        masks = root / "Annotations" / "480p" / name
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for t in range(6):
            frame = np.zeros((48, 80, 3), np.uint8) + np.array(colour, np.uint8)
            mask = np.zeros((48, 80), np.uint8)
            mask[10:34, 10 + 4 * t:40 + 4 * t] = 255
            frame[mask > 0] = 128
            Image.fromarray(frame).save(images / f"{t:05d}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(masks / f"{t:05d}.png")
    return root


def colour_of(frames):
    """The sequence colour of a clip's frames (T, 3, H, W): its dominant channel."""
    return list(COLOURS)[int(frames.mean((0, 2, 3)).argmax())]


def test_davis_clips_read_only_the_chosen_sequences(davis_root):
    clips = DavisClips(davis_root, 24, clip_len=3, size=(32, 32), max_skip=2,
                       sequences=["green", "red"])
    assert clips.sequences == ["green", "red"]
    seen = {colour_of(clips[i]["frames"]) for i in range(24)}
    assert seen == {"red", "green"}
    item = clips[0]
    assert item["frames"].shape == (3, 3, 32, 32) and item["num_objects"] == 1
    assert DavisClips(davis_root, 2, sequences=()).sequences == ["blue", "green", "red"]
    with pytest.raises(ValueError, match="sequences purple are not in"):
        DavisClips(davis_root, 2, sequences=["red", "purple"])


def test_static_clips_from_annotated_davis_frames(davis_root):
    frames = DavisFrames(davis_root, ["blue"])
    assert len(frames) == 6 and frames.sequences == ["blue"]
    image, labels = frames[2]
    assert image.shape == (48, 80, 3) and image.dtype == np.float32 and image.max() <= 1
    assert labels.shape == (48, 80) and set(np.unique(labels)) == {0, 1}
    clips = StaticImageClips(8, clip_len=3, size=(40, 40), seed=1, source=frames)
    item, again = clips[3], clips[3]
    assert torch.equal(item["frames"], again["frames"])
    assert item["frames"].shape == (3, 3, 40, 40) and item["labels"].shape == (3, 40, 40)
    assert item["num_objects"] == 1 and (item["labels"][0] == 1).sum() >= 20
    assert not torch.equal(item["frames"][0], item["frames"][1])  # transformed copies
    assert colour_of(item["frames"]) == "blue"


def test_mixed_clips_draw_from_both_by_ratio(davis_root):
    davis = DavisClips(davis_root, 40, clip_len=2, size=(32, 32), sequences=["red"])
    synthetic = SyntheticClips(40, clip_len=2, size=(32, 32))
    assert all(colour_of(MixedClips(davis, synthetic, 0.0)[i]["frames"]) == "red"
               for i in range(5))
    assert all(torch.equal(MixedClips(davis, synthetic, 1.0)[i]["frames"],
                           synthetic[i]["frames"]) for i in range(5))
    half = MixedClips(davis, synthetic, 0.5, seed=3)
    picks = [torch.equal(half[i]["frames"], synthetic[i]["frames"]) for i in range(40)]
    assert 8 <= sum(picks) <= 32 and picks == [torch.equal(half[i]["frames"],
                                                            synthetic[i]["frames"])
                                               for i in range(40)]
    with pytest.raises(ValueError, match="ratio must be in"):
        MixedClips(davis, synthetic, 1.5)


def test_training_options_for_davis_data(davis_root):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "small-real", "--data", str(davis_root), "--sequences", "red", "green",
         "--synthetic-ratio", "0.25", "--freeze-bn"])
    options = dict(vars(args))
    options.pop("no_progress")
    config = TrainConfig(**options)
    assert (config.model, config.sequences, config.synthetic_ratio, config.freeze_bn) == (
        "small-real", ("red", "green"), 0.25, True)
    assert TrainConfig(data=str(davis_root), sequences="red,blue").sequences == ("red", "blue")
    assert TrainConfig().sequences == () and TrainConfig().synthetic_ratio == 0.0
    with pytest.raises(ValueError, match="sequences needs a DAVIS-format data root"):
        TrainConfig(sequences=("red",))
    with pytest.raises(ValueError, match="synthetic_ratio must be in"):
        TrainConfig(data=str(davis_root), synthetic_ratio=-0.1)
    assert add_arguments(argparse.ArgumentParser()).parse_args(["--augment"]).augment
    with pytest.raises(ValueError, match="augment needs a DAVIS-format data root"):
        TrainConfig(augment=True)


def grey_iou(frame, mask):
    """IoU of the mask with the frame's grey pixels: the fixture's object is grey on a coloured
    background, and recolouring keeps grey grey (the affine's black border is too dark)."""
    pixels = frame.permute(1, 2, 0)
    grey = (pixels.max(-1).values - pixels.min(-1).values < 0.08) & (pixels.mean(-1) > 0.15)
    return float((grey & mask).sum() / (grey | mask).sum())


def test_augmented_clips_keep_masks_on_their_objects_and_vary(davis_root):
    plain = DavisClips(davis_root, 16, clip_len=3, size=(32, 32), max_skip=2)
    clips = DavisClips(davis_root, 16, clip_len=3, size=(32, 32), max_skip=2, augment=True)
    areas, flipped = set(), 0
    for index in range(16):
        item = clips[index]
        assert item["frames"].shape == (3, 3, 32, 32) and item["num_objects"] == 1
        assert torch.equal(item["frames"], clips[index]["frames"])  # deterministic
        assert not torch.equal(item["frames"], plain[index]["frames"])
        for frame, labels in zip(item["frames"], item["labels"], strict=True):
            # 0.72 at least when aligned; 0.61 when the masks turn the other way than the frames
            assert grey_iou(frame, labels == 1) > 0.7, index
        areas.add(int((item["labels"][0] == 1).sum()))
        # the object moves right in the fixture: left in a flipped clip
        columns = [(labels == 1).nonzero()[:, 1].float().mean() for labels in item["labels"]]
        flipped += bool(columns[-1] < columns[0])
    assert len(areas) > 8  # zoomed differently
    assert 2 <= flipped <= 14


def davis_colour(item):
    """The fake sequence an item's frame 0 comes from (its colour, with the grey object covering
    the rest), or None for a synthetic frame."""
    pixels = item["frames"][0].permute(1, 2, 0).reshape(-1, 3)
    grey = ((pixels - 128 / 255).abs().max(1).values < 0.1).float()
    for name, colour in COLOURS.items():
        near = ((pixels - torch.tensor(colour) / 255).abs().max(1).values < 0.1).float()
        if (near + grey).mean() > 0.8:
            return name
    return None


def test_both_stages_read_the_chosen_sequences_and_mix_in_synthetic_clips(davis_root):
    config = TrainConfig(data=str(davis_root), sequences=("green",), synthetic_ratio=0.5,
                         steps=10, static_steps=5, batch_size=4, size=(32, 32), clip_len=2)
    dataset = build_dataset(config)
    for stage in (range(0, 20), range(20, 40)):  # static-image clips, then video clips
        sources = [davis_colour(dataset[i]) for i in stage]
        assert set(sources) == {"green", None}, sources
        assert 4 <= sources.count(None) <= 16


def test_small_real_builds_from_imagenet_weights_unless_initialised(monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(efficientnet_lite, "load_imagenet_weights",
                        lambda trunk: loaded.append(trunk) or [])
    model = build_model(TrainConfig(model="small-real"))
    assert model.config.backbone == "efficientnet_lite0" and model.config.pretrained_backbone
    assert [id(t) for t in loaded] == [id(model.memory_encoder.trunk),
                                       id(model.query_encoder.trunk)]
    from stm_model import save_checkpoint
    save_checkpoint(model, tmp_path / "start.pt")
    loaded.clear()
    again = build_model(TrainConfig(model="small-real", init_from=str(tmp_path / "start.pt")))
    assert not loaded and not again.config.pretrained_backbone
    deeper = build_model(TrainConfig(model="small-real", trunk="efficientnet_lite1"))
    assert deeper.config.backbone == "efficientnet_lite1"
    assert [trunk.variant for trunk in loaded] == ["lite1", "lite1"]
    assert [len(stage) for stage in deeper.query_encoder.trunk.stages] == [1, 3, 3, 4, 4]
    assert SMALL_REAL_TRUNKS == tuple(LITE_VARIANTS)  # the torch-free copy of the names
    with pytest.raises(ValueError, match="trunk applies to the small-real model only"):
        TrainConfig(model="small", trunk="efficientnet_lite1")
    with pytest.raises(ValueError, match="trunk must be one of"):
        TrainConfig(model="small-real", trunk="resnet18")


def test_a_few_small_real_steps_on_davis_data_with_frozen_batch_norm(davis_root, tmp_path,
                                                                     monkeypatch):
    start = {}

    def fake_weights(trunk):  # the ImageNet weights stand-in: random BatchNorm statistics
        with torch.no_grad():
            for buffer in trunk.buffers():
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5)
        start.update({name: t.clone() for name, t in trunk.state_dict().items()})
        return []
    monkeypatch.setattr(efficientnet_lite, "load_imagenet_weights", fake_weights)
    config = TrainConfig(output=str(tmp_path / "run"), model="small-real", data=str(davis_root),
                         sequences=("red", "green"), synthetic_ratio=0.5, steps=3,
                         static_steps=1, batch_size=2, clip_len=3, size=(64, 64),
                         warmup_steps=1, log_every=1, save_every=3, freeze_bn=True)
    model = train(config, show_progress=False)
    assert (tmp_path / "run" / "model.pt").exists()
    losses = [float(line.split(",")[1]) for line in
              (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    trunk = model.query_encoder.trunk.state_dict()
    for name, tensor in trunk.items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(tensor, start[name]), name  # statistics frozen
    assert not torch.equal(trunk["stem_conv.weight"], start["stem_conv.weight"])  # trained


def test_real_davis_training_sequences_only():
    root = SHARED / "data" / "davis2016-val"
    if not root.exists():
        pytest.skip("../shared/data is absent")
    clips = DavisClips(root, 4, clip_len=3, size=(96, 96), sequences=TRAINING_SEQUENCES)
    assert tuple(clips.sequences) == TRAINING_SEQUENCES
    frames = DavisFrames(root, TRAINING_SEQUENCES)
    assert {name for name, _ in frames.items} == set(TRAINING_SEQUENCES)
    static = StaticImageClips(2, clip_len=3, size=(96, 96), source=frames)[1]
    assert static["frames"].shape == (3, 3, 96, 96) and static["num_objects"] == 1


def test_labels_folder_replaces_the_roots_annotations_for_its_sequences(davis_root, tmp_path):
    """--labels: a sequence it has reads its masks (two objects here), the others the root's."""
    from stm_model import io as video_io
    for t in range(6):
        labels = video_io.read_mask(davis_root / "Annotations" / "480p" / "red" / f"{t:05d}.png")
        labels[:, 40:] *= 2  # the square split in two objects
        video_io.write_mask(tmp_path / "labels" / "red" / f"{t:05d}.png",
                            labels.astype(np.uint8))
    clips = DavisClips(davis_root, 12, clip_len=2, size=(48, 80), max_skip=1, min_pixels=10,
                       labels=tmp_path / "labels")
    counts = {colour_of(clips[i]["frames"]): clips[i]["num_objects"] for i in range(12)}
    assert counts["red"] == 2 and counts.get("green", 1) == counts.get("blue", 1) == 1
    frames = DavisFrames(davis_root, ["red"], labels=tmp_path / "labels")
    assert set(np.unique(frames[5][1])) == {0, 1, 2}  # the square has moved across x = 40


def test_pasted_objects_touch_one_of_the_clips_objects(davis_root):
    """PastedObjects adds the donor's object as id n+1, touching (not swallowing) an object
    of the clip on frame 0, deterministically; probability 0 and max_objects leave items as
    they are."""
    from stm_model.training.datasets import PastedObjects
    clips = DavisClips(davis_root, 20, clip_len=2, size=(48, 80), max_skip=1, seed=0,
                       min_pixels=10, sequences=["red"])
    donors = DavisClips(davis_root, 20, clip_len=2, size=(48, 80), max_skip=1, seed=1,
                        min_pixels=10, sequences=["blue"])
    pasted = PastedObjects(clips, donors, 1.0, max_objects=3, seed=0, min_pixels=10)
    grown = 0
    for index in range(20):
        item = pasted[index]
        assert torch.equal(item["labels"], pasted[index]["labels"])  # deterministic
        if item["num_objects"] == 1:
            continue
        grown += 1
        assert item["num_objects"] == 2
        first, second = (item["labels"][0] == 1).numpy(), (item["labels"][0] == 2).numpy()
        assert first.sum() >= 10 and second.sum() >= 10
        assert (ndimage.binary_dilation(second, iterations=2) & first).any()  # they touch
        pixels = item["frames"][0].permute(1, 2, 0)[torch.from_numpy(
            ndimage.binary_erosion(second, iterations=2))]
        assert len(pixels) == 0 or (pixels[:, 2] > pixels[:, 0]).float().mean() > 0.5 or \
            (pixels.max(-1).values - pixels.min(-1).values < 0.1).all()  # the donor's pixels
    assert grown >= 10
    unchanged = PastedObjects(clips, donors, 0.0, max_objects=3)
    assert all(torch.equal(unchanged[i]["frames"], clips[i]["frames"]) for i in range(5))
    full = PastedObjects(clips, donors, 1.0, max_objects=1)
    assert all(full[i]["num_objects"] == 1 for i in range(5))
    with pytest.raises(ValueError, match="probability must be in"):
        PastedObjects(clips, donors, 2.0, max_objects=3)


def test_multi_object_training_options(davis_root, tmp_path):
    config = TrainConfig(data=str(davis_root), labels=str(tmp_path), paste_objects=0.5,
                         max_objects=3, size=(48, 80), steps=2, batch_size=2, clip_len=2)
    dataset = build_dataset(config)
    assert dataset[0]["num_objects"] >= 1
    for name, value in (("labels", "x"), ("paste_objects", 0.5)):
        with pytest.raises(ValueError, match=f"{name} needs a DAVIS-format data root"):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="paste_objects must be in"):
        TrainConfig(data=str(davis_root), paste_objects=1.5)
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--labels", "runs/labels", "--paste-objects", "0.3"])
    assert (args.labels, args.paste_objects) == ("runs/labels", 0.3)
