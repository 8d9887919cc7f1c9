"""stm segment: a first mask on a later frame, --both-directions, --size."""
import numpy as np
from PIL import Image

from stm_model import io as video_io
from stm_model.cli import main

HW = (32, 48)


def _folder_with_a_later_mask(tmp_path, frames=6, masked=3):
    images, masks = tmp_path / "frames", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for t in range(frames):
        Image.fromarray(rng.integers(0, 256, HW + (3,), dtype=np.uint8)).save(
            images / f"{t:05d}.png")
    labels = np.zeros(HW, dtype=np.uint8)
    labels[4:14, 6:20], labels[18:28, 26:40] = 1, 2
    video_io.write_mask(masks / f"{masked:05d}.png", labels)
    return images, masks, labels


def _segment(images, masks, output, *extra):
    return main(["segment", str(images), "--masks", str(masks),
                 "--output", str(output), "--overlay", "none", "--quiet", *extra])


def _written(output):
    return sorted(path.name for path in (output / "masks").glob("*.png"))


def test_a_later_first_mask_segments_forward_from_it(tmp_path):
    images, masks, labels = _folder_with_a_later_mask(tmp_path)
    assert _segment(images, masks, tmp_path / "out") == 0
    assert _written(tmp_path / "out") == ["00003.png", "00004.png", "00005.png"]
    written = video_io.read_mask(tmp_path / "out" / "masks" / "00003.png")
    np.testing.assert_array_equal(written, labels)


def test_both_directions_segments_every_frame_at_the_input_size(tmp_path):
    images, masks, labels = _folder_with_a_later_mask(tmp_path)
    output = tmp_path / "out"
    assert _segment(images, masks, output, "--both-directions", "--size", "16") == 0
    assert _written(output) == [f"{t:05d}.png" for t in range(6)]
    for t in range(6):
        mask = video_io.read_mask(output / "masks" / f"{t:05d}.png")
        assert mask.shape == HW
        assert set(np.unique(mask)) <= {0, 1, 2}
    # the annotated frame's mask is written back as given, whatever the network size
    np.testing.assert_array_equal(video_io.read_mask(output / "masks" / "00003.png"), labels)
