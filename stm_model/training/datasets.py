"""Training clips: synthetic videos, static images turned into clips, DAVIS-format folders.

Every dataset item is a dict with `frames` (T, 3, H, W) float32 RGB in [0, 1], `labels`
(T, H, W) int64 object ids 1..n (0 = background) and `num_objects` n, and is deterministic
from (dataset seed, index), so training resumes and distributes without sampler state.
`collate_clips` batches items for `ClipForward`. `InteractiveClips` adds synthesised scribbles
for the interactive model. `DavisFrames` gives a DAVIS folder's annotated frames as the images
of `StaticImageClips`; `MixedClips` draws each item from one of two datasets; `PastedObjects`
pastes another clip's object beside one of an item's (multi-object clips of touching objects).

Seed convention: training videos use synthetic seeds below HELD_OUT_SEEDS; evaluation and the
demo use HELD_OUT_SEEDS + s, videos no training clip ever saw.
"""
import math
import pathlib

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from scipy import ndimage
from skimage import morphology

from stm_model.interactive import scribbles as scribble_format
from stm_model import io as video_io
from stm_model.training import composite
from stm_model.training.synthetic import SyntheticVideo

HELD_OUT_SEEDS = 1_000_000_000


def max_skip_schedule(step, total_steps, start=1, peak=10, end=5):
    """STM's max-skip curriculum: ramps from `start` to `peak` over the first half of training,
    then down to `end` (long gaps teach robustness; short ones at the end match inference)."""
    progress = step / max(total_steps, 1)
    if progress < 0.5:
        return int(round(start + (peak - start) * progress / 0.5))
    return int(round(peak + (end - peak) * (progress - 0.5) / 0.5))


def _choose_objects(labels, rng, max_objects, min_pixels):
    """Remap up to max_objects ids visible on frame 0 (at least min_pixels) to 1..n."""
    ids, counts = np.unique(labels[0], return_counts=True)
    visible = [int(i) for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_pixels]
    rng.shuffle(visible)
    chosen = visible[:max_objects]
    remapped = np.zeros_like(labels)
    for new, old in enumerate(chosen, start=1):
        remapped[labels == old] = new
    return remapped, len(chosen)


def _item(frames, labels, num_objects):
    return {"frames": torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2),
            "labels": torch.from_numpy(labels), "num_objects": num_objects}


class _Clips(torch.utils.data.Dataset):
    """What every clip dataset keeps: `length` items of `clip_len` frames at `size`, up to
    `max_objects` objects of at least `min_pixels` pixels, a seed, and a max-skip that is a
    number or a function of the item index (curriculum)."""

    def __init__(self, length, clip_len, size, max_objects, max_skip, seed, min_pixels):
        self.length, self.clip_len, self.size = length, clip_len, size
        self.max_objects, self.max_skip, self.seed = max_objects, max_skip, seed
        self.min_pixels = min_pixels

    def __len__(self):
        return self.length

    def _max_skip(self, index):
        return self.max_skip(index) if callable(self.max_skip) else self.max_skip


class SyntheticClips(_Clips):
    """Clips of `clip_len` frames from synthetic training videos, with gaps of 1..max_skip
    frames; `max_skip` is a number or a function of the item index (curriculum)."""

    def __init__(self, length, clip_len=3, size=(128, 128), max_objects=3, max_skip=5, seed=0,
                 min_pixels=20):
        super().__init__(length, clip_len, size, max_objects, max_skip, seed, min_pixels)

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index))
        max_skip = self._max_skip(index)
        video = SyntheticVideo(int(rng.integers(HELD_OUT_SEEDS)), *self.size)
        times = int(rng.integers(0, 3000)) + np.concatenate(
            [[0], np.cumsum(rng.integers(1, max_skip + 1, size=self.clip_len - 1))])
        images, labels = zip(*(video.render(int(t)) for t in times), strict=True)
        labels, count = _choose_objects(np.stack(labels), rng, self.max_objects, self.min_pixels)
        return _item(np.stack(images), labels, count)


class StaticImageClips(_Clips):
    """STM's pre-training stage: one image and its mask, turned into a clip by random affine
    and colour transforms per frame. `source[i]` gives (image float (H, W, 3) in [0, 1], labels
    (H, W)), e.g. DavisFrames; each item takes a random one, resized (aspect kept) to just cover
    `size` and randomly cropped to it (as DavisClips). The default source renders random
    synthetic frames at `size`."""

    def __init__(self, length, clip_len=3, size=(128, 128), max_objects=3, seed=0, source=None,
                 min_pixels=20):
        super().__init__(length, clip_len, size, max_objects, 1, seed, min_pixels)
        self.source = source

    def _image(self, rng):
        if self.source is not None:
            image, labels = self.source[int(rng.integers(len(self.source)))]
            frames = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            masks = torch.from_numpy(np.asarray(labels, dtype=np.int64))[None, None]
            frames, masks = _cover_crop(frames, masks, self.size, rng, self.min_pixels)
            return frames[0], masks[0]
        video = SyntheticVideo(int(rng.integers(HELD_OUT_SEEDS)), *self.size)
        image, labels = video.render(int(rng.integers(0, 3000)))
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                torch.from_numpy(np.asarray(labels, dtype=np.int64))[None])

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index, 1))
        image, labels = self._image(rng)
        frames, masks = [], []
        for t in range(self.clip_len):
            identity = t == 0
            angle = 0.0 if identity else float(rng.uniform(-20, 20))
            shift = [0, 0] if identity else [int(v) for v in rng.uniform(-0.1, 0.1, 2) * self.size]
            scale = 1.0 if identity else float(rng.uniform(0.85, 1.15))
            shear = [0.0, 0.0] if identity else [float(v) for v in rng.uniform(-8, 8, 2)]
            frame = TF.affine(image, angle=angle, translate=shift, scale=scale, shear=shear,
                              interpolation=TF.InterpolationMode.BILINEAR)
            mask = TF.affine(labels, angle=angle, translate=shift, scale=scale, shear=shear,
                             interpolation=TF.InterpolationMode.NEAREST)
            if not identity:
                frame = TF.adjust_brightness(frame, float(rng.uniform(0.8, 1.2)))
                frame = TF.adjust_contrast(frame, float(rng.uniform(0.8, 1.2)))
                frame = TF.adjust_hue(frame, float(rng.uniform(-0.04, 0.04)))
            frame = TF.resize(frame, list(self.size), antialias=True)
            mask = TF.resize(mask, list(self.size), interpolation=TF.InterpolationMode.NEAREST)
            frames.append(frame.clamp(0, 1).permute(1, 2, 0).numpy())
            masks.append(mask[0].numpy())
        labels, count = _choose_objects(np.stack(masks), rng, self.max_objects, self.min_pixels)
        return _item(np.stack(frames), labels, count)


def davis_sequences(root, resolution="480p", sequences=None):
    """(JPEG folder, annotation folder, {sequence: frame paths}) of a DAVIS-format root:
    <root>/JPEGImages/<res>/<seq>/*.jpg with masks in <root>/Annotations/<res>/<seq>/*.png.
    `sequences` (names) restricts it to those (None or empty: all); ValueError naming any that
    the root lacks, FileNotFoundError when it holds none."""
    root = pathlib.Path(root)
    images, annotations = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    if not annotations.is_dir():
        raise FileNotFoundError(f"no sequences in {annotations}")
    available = sorted(p.name for p in annotations.iterdir() if p.is_dir())
    if sequences:
        unknown = sorted(set(sequences) - set(available))
        if unknown:
            raise ValueError(f"sequences {', '.join(unknown)} are not in {annotations} (it has "
                             f"{', '.join(available) or 'none'})")
        available = [name for name in available if name in set(sequences)]
    if not available:
        raise FileNotFoundError(f"no sequences in {annotations}")
    return images, annotations, {name: video_io.list_frames(images / name) for name in available}


def _cover_crop(frames, masks, size, rng, min_pixels, tries=5, zoom=1.0):
    """frames (T, 3, H, W) float and masks (T, 1, H, W) int resized (aspect kept) to `zoom`
    times just covering size and cropped to it at a random place; up to `tries` places are drawn
    until frame 0 keeps an object of min_pixels. Returns (frames (T, 3, h, w), masks (T, 1, h,
    w))."""
    height, width = frames.shape[-2:]
    factor = max(size[0] / height, size[1] / width) * zoom
    resized = [math.ceil(height * factor), math.ceil(width * factor)]
    frames = TF.resize(frames, resized, antialias=True)
    masks = TF.resize(masks, resized, interpolation=TF.InterpolationMode.NEAREST)
    for _ in range(tries):
        top = int(rng.integers(0, resized[0] - size[0] + 1))
        left = int(rng.integers(0, resized[1] - size[1] + 1))
        crop = masks[..., top:top + size[0], left:left + size[1]]
        ids, counts = np.unique(crop[0].numpy(), return_counts=True)
        if ((ids != 0) & (counts >= min_pixels)).any():
            break
    return frames[..., top:top + size[0], left:left + size[1]], crop


def annotation_path(annotations, labels, name, frame):
    """The mask of `frame` (a path) of sequence `name`: labels/<name>/<stem>.png where a
    `labels` folder has that sequence (e.g. pseudo_labels' multi-object split), else the
    root's annotations/<name>/<stem>.png."""
    if labels is not None and (pathlib.Path(labels) / name).is_dir():
        return pathlib.Path(labels) / name / f"{frame.stem}.png"
    return annotations / name / f"{frame.stem}.png"


class DavisFrames:
    """The annotated frames of a DAVIS-format folder (see davis_sequences), as the images of
    StaticImageClips: item i is (image float32 (H, W, 3) in [0, 1], labels int64 (H, W));
    `labels`: a folder of masks replacing the root's for the sequences it has."""

    def __init__(self, root, sequences=None, resolution="480p", labels=None):
        _, self.annotations, frames = davis_sequences(root, resolution, sequences)
        self.sequences, self.labels = list(frames), labels
        self.items = [(name, path) for name, paths in frames.items() for path in paths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        name, path = self.items[index]
        image = video_io.load_image(path).astype(np.float32) / 255
        return image, video_io.read_mask(annotation_path(self.annotations, self.labels, name,
                                                         path))


class DavisClips(_Clips):
    """Clips from a DAVIS-format folder (see davis_sequences; masks on every frame, palette or
    DAVIS-2016 'L'), restricted to `sequences` when given; frames are resized (aspect kept) to
    just cover `size` and randomly cropped to it. With `augment`, each clip is also zoomed,
    flipped and recoloured and each frame slightly moved (augment_clip): a few sequences are
    otherwise learnt by heart. `labels`: a folder of masks (<sequence>/<frame>.png) replacing
    the root's annotations for the sequences it has (pseudo_labels' multi-object split)."""

    def __init__(self, root, length, clip_len=3, size=(384, 384), max_objects=3, max_skip=5,
                 seed=0, resolution="480p", min_pixels=100, sequences=None, augment=False,
                 labels=None):
        _, self.annotations, self.frames = davis_sequences(root, resolution, sequences)
        self.sequences = list(self.frames)
        self.augment, self.labels = augment, labels
        super().__init__(length, clip_len, size, max_objects, max_skip, seed, min_pixels)

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index, 2))
        name = self.sequences[int(rng.integers(len(self.sequences)))]
        paths = self.frames[name]
        max_skip = self._max_skip(index)
        skips = rng.integers(1, max_skip + 1, size=self.clip_len - 1)
        span = int(skips.sum())
        if span >= len(paths):
            skips = np.ones_like(skips)
            span = int(skips.sum())
        start = int(rng.integers(0, max(len(paths) - span, 1)))
        picks = start + np.concatenate([[0], np.cumsum(skips)])
        images = [video_io.load_image(paths[i]) for i in picks]
        labels = [video_io.read_mask(annotation_path(self.annotations, self.labels, name,
                                                     paths[i])) for i in picks]
        frames = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        masks = torch.from_numpy(np.stack(labels))[:, None]
        if self.augment:
            frames, masks = augment_clip(frames, masks, self.size, self.min_pixels,
                                         np.random.default_rng((self.seed, index, 5)))
        else:
            frames, masks = _cover_crop(frames, masks, self.size, rng, self.min_pixels)
        labels, count = _choose_objects(masks[:, 0].numpy(), rng, self.max_objects,
                                        self.min_pixels)
        return _item(frames.permute(0, 2, 3, 1).numpy(), labels, count)


def augment_clip(frames, masks, size, min_pixels, rng, max_zoom=1.5):
    """A clip of frames (T, 3, H, W) in [0, 1] and masks (T, 1, H, W) cropped to `size` as
    _cover_crop does after a zoom of 1..max_zoom, flipped left-right half of the time and
    recoloured (brightness, contrast, saturation, hue) the same way on every frame; each frame
    after the first is then moved by a small affine (rotation, scale, shift, shear: camera
    shake) and brightened a little on its own. Returns (frames, masks) at `size`."""
    frames, masks = _cover_crop(frames, masks, size, rng, min_pixels,
                                zoom=float(rng.uniform(1.0, max_zoom)))
    if rng.random() < 0.5:
        frames, masks = frames.flip(-1), masks.flip(-1)
    frames = TF.adjust_brightness(frames, float(rng.uniform(0.7, 1.3)))
    frames = TF.adjust_contrast(frames, float(rng.uniform(0.7, 1.3)))
    frames = TF.adjust_saturation(frames, float(rng.uniform(0.7, 1.3)))
    frames = TF.adjust_hue(frames, float(rng.uniform(-0.05, 0.05)))
    moved_frames, moved_masks = [frames[0]], [masks[0]]
    for frame, mask in zip(frames[1:], masks[1:], strict=True):
        angle, scale = float(rng.uniform(-8, 8)), float(rng.uniform(0.93, 1.07))
        shift = [int(v) for v in rng.uniform(-0.04, 0.04, 2) * size[::-1]]
        shear = [float(v) for v in rng.uniform(-4, 4, 2)]
        moved_frames.append(TF.adjust_brightness(TF.affine(
            frame, angle=angle, translate=shift, scale=scale, shear=shear,
            interpolation=TF.InterpolationMode.BILINEAR), float(rng.uniform(0.9, 1.1))))
        moved_masks.append(TF.affine(mask, angle=angle, translate=shift, scale=scale,
                                     shear=shear, interpolation=TF.InterpolationMode.NEAREST))
    return torch.stack(moved_frames).clamp(0, 1), torch.stack(moved_masks)


class MixedClips(torch.utils.data.Dataset):
    """Item i from `second` with probability `ratio` (drawn from (seed, i)), else from `first`;
    both datasets give item i deterministically and have the same length."""

    def __init__(self, first, second, ratio, seed=0):
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1]; got {ratio}")
        self.first, self.second, self.ratio, self.seed = first, second, ratio, seed

    def __len__(self):
        return len(self.first)

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index, 4))
        return (self.second if rng.random() < self.ratio else self.first)[index]


class PastedObjects(torch.utils.data.Dataset):
    """Items of `clips` that, with probability `probability` (drawn from (seed, i)), gain one
    object cut out of a random item of `donors` (its own frames and masks, so its own motion),
    scaled to at most the size of one of the item's objects and pasted so that on frame 0 it
    touches that object and covers a little of it (composite.touching_offset): STM's
    copy-paste synthesis, which teaches the model to keep touching objects apart. Items that
    already have `max_objects`, or where no place fits or an object would be covered below
    `min_pixels` on frame 0, stay as they are. Both datasets give (T, 3, H, W) clips of one
    size."""

    def __init__(self, clips, donors, probability, max_objects, seed=0, min_pixels=100):
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1]; got {probability}")
        self.clips, self.donors, self.probability = clips, donors, probability
        self.max_objects, self.seed, self.min_pixels = max_objects, seed, min_pixels

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        item = self.clips[index]
        rng = np.random.default_rng((self.seed, index, 6))
        count = item["num_objects"]
        if count == 0 or count >= self.max_objects or rng.random() >= self.probability:
            return item
        donor = self.donors[int(rng.integers(len(self.donors)))]
        if donor["num_objects"] == 0:
            return item
        piece_masks = (donor["labels"] == int(rng.integers(1, donor["num_objects"] + 1))).numpy()
        labels = item["labels"].numpy()
        target = labels[0] == int(rng.integers(1, count + 1))
        if piece_masks[0].sum() < self.min_pixels or not target.any():
            return item
        factor = float(rng.uniform(0.5, 1.0)) * min(
            1.0, float(np.sqrt(target.sum() / piece_masks[0].sum())))
        piece_frames, piece_masks = composite.resize_clip(
            donor["frames"].permute(0, 2, 3, 1).numpy(), piece_masks, factor)
        offset = composite.touching_offset(target, piece_masks[0], rng)
        if offset is None:
            return item
        frames, labels = composite.paste(item["frames"].permute(0, 2, 3, 1).numpy(), labels,
                                         piece_frames, piece_masks, offset, count + 1)
        visible = np.bincount(labels[0].ravel(), minlength=count + 2)[1:]
        if (visible < self.min_pixels).any():
            return item
        return _item(frames.astype(np.float32), labels, count + 1)


class InteractiveClips(torch.utils.data.Dataset):
    """Training clips for the interactive STM: each item of `clips` gains the user's scribbles
    on frame 0 and the mask they correct. With probability p_first that mask is empty (a first
    round); otherwise it is a corrupted ground truth standing in for an earlier round's
    prediction (objects eroded or dilated, shifted, dropped, with a spurious blob). The
    scribbles are synthesised from ground truth and that mask (skeleton + random walk, see
    stm_model.interactive.scribbles). Adds `previous` (H, W) ids and `scribble_map` (H, W) int16."""

    def __init__(self, clips, seed=0, p_first=0.4, line_width=3):
        self.clips, self.seed, self.p_first, self.line_width = clips, seed, p_first, line_width

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        item = dict(self.clips[index])
        rng = np.random.default_rng((self.seed, index, 3))
        truth = item["labels"][0].numpy()
        count = item["num_objects"]
        previous = (np.zeros_like(truth) if rng.random() < self.p_first
                    else corrupt_labels(truth, count, rng))
        strokes = scribble_format.synthesize_strokes(truth, previous, count, rng=rng)
        item["previous"] = torch.from_numpy(previous)
        item["scribble_map"] = torch.from_numpy(scribble_format.rasterize(
            strokes, *truth.shape, line_width=self.line_width))
        return item


def corrupt_labels(labels, num_objects, rng):
    """An imperfect prediction of `labels`: per object a random erosion or dilation (radius
    1-4) and shift (up to 4% of the size), sometimes dropped (15%); sometimes (30%) a spurious
    elliptic blob of a random object."""
    height, width = labels.shape
    corrupted = np.zeros_like(labels)
    for k in range(1, num_objects + 1):
        mask = labels == k
        if not mask.any() or rng.random() < 0.15:
            continue
        radius = int(rng.integers(1, 5))
        grow = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
        mask = grow(mask, structure=morphology.disk(radius))
        shift = (rng.uniform(-0.04, 0.04, 2) * (height, width)).round().astype(int)
        mask = np.roll(mask, tuple(shift), axis=(0, 1))
        corrupted[mask] = k
    if num_objects and rng.random() < 0.3:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.2) * height, rng.uniform(0.05, 0.2) * width
        ys, xs = np.ogrid[:height, :width]
        corrupted[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1] = rng.integers(
            1, num_objects + 1)
    return corrupted


def collate_clips(items, max_objects=None):
    """Batch items into `frames` (S, T, 3, H, W), `labels` (S, T, H, W), `first_probs`
    (S, n, H, W) one-hot masks of frame 0 and `object_valid` (S, n), n = the most objects of
    any clip (or max_objects); clips with fewer objects get empty, invalid slots."""
    n = max(max_objects or 0, max(item["num_objects"] for item in items), 1)
    frames = torch.stack([item["frames"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    ids = torch.arange(1, n + 1).view(1, n, 1, 1)
    first_probs = (labels[:, 0, None] == ids).float()
    valid = torch.stack([torch.arange(n) < item["num_objects"] for item in items])
    batch = {"frames": frames, "labels": labels, "first_probs": first_probs,
             "object_valid": valid}
    if "scribble_map" in items[0]:  # InteractiveClips: the mask before the scribbles, painted
        channels = torch.stack([torch.from_numpy(scribble_format.scribble_channels(
            item["scribble_map"].numpy(), n)) for item in items])
        previous = (torch.stack([item["previous"] for item in items])[:, None] == ids).float()
        batch["first_probs"] = scribble_format.paint_scribbles(previous, channels)
        batch["first_scribbles"] = channels
    return batch
