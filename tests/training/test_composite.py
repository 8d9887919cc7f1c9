"""Copy-paste synthesis of touching objects (stm_model.training.composite), the multi-object
labels split from DAVIS-2016's ground truth (pseudo_labels) and the training clips that paste
objects (datasets.PastedObjects)."""
import numpy as np
import pytest
from scipy import ndimage

from helpers import SHARED
from stm_model import io as video_io
from stm_model.training import composite
from stm_model.training.pseudo_labels import split_labels, write_split_labels


def disk(shape, centre, radius):
    ys, xs = np.ogrid[:shape[0], :shape[1]]
    return (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius ** 2


def test_shifted_places_an_array_and_cuts_what_falls_outside():
    piece = np.arange(1, 7).reshape(2, 3)
    placed = composite.shifted(piece, 1, 2, (4, 4))
    assert placed.tolist() == [[0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 4, 5], [0, 0, 0, 0]]
    assert composite.shifted(piece, -1, -2, (2, 2)).tolist() == [[6, 0], [0, 0]]
    assert not composite.shifted(piece, 5, 5, (4, 4)).any()


@pytest.mark.parametrize("seed", range(4))
def test_the_pasted_piece_touches_the_target_and_covers_a_little(seed):
    target = disk((120, 160), (60, 50), 20)
    piece = disk((120, 160), (30, 120), 15)
    offset = composite.touching_offset(target, piece, np.random.default_rng(seed), cover=0.05)
    placed = composite.shifted(piece, *offset, target.shape)
    overlap = (placed & target).sum()
    assert 0.05 * piece.sum() <= overlap <= 0.25 * piece.sum()  # touching, not swallowed
    assert placed.sum() >= 0.8 * piece.sum()  # on the canvas


def test_no_offset_for_an_empty_mask_or_where_no_side_fits():
    target = disk((40, 40), (20, 20), 8)
    assert composite.touching_offset(np.zeros_like(target), target) is None
    assert composite.touching_offset(target, np.zeros_like(target)) is None
    whole = np.ones((40, 40), bool)  # a piece the size of the canvas cannot stay on it beside
    assert composite.touching_offset(target, whole, inside=0.99) is None


def test_paste_puts_the_piece_in_front_with_a_soft_edge_and_its_id():
    frames = np.zeros((2, 40, 60, 3), np.float32)
    labels = np.zeros((2, 40, 60), np.uint8)
    labels[:, 10:30, 5:25] = 1
    piece_frames = np.ones((2, 40, 60, 3), np.float32)
    piece_masks = np.stack([disk((40, 60), (20, 20), 8), disk((40, 60), (20, 22), 8)])
    out_frames, out_labels = composite.paste(frames, labels, piece_frames, piece_masks, (0, 10), 2)
    for t in range(2):
        mask = composite.shifted(piece_masks[t], 0, 10, (40, 60))
        assert (out_labels[t][mask] == 2).all()
        assert (out_labels[t][~mask] == labels[t][~mask]).all()
        inner = ndimage.binary_erosion(mask, iterations=3)
        assert np.allclose(out_frames[t][inner], 1, atol=1e-3)
        assert (out_frames[t][~mask] == 0).all()  # no halo of the piece's own background
        edge = mask & ~ndimage.binary_erosion(mask)
        assert (out_frames[t][edge] < 0.9).all() and (out_frames[t][edge] > 0.1).all()
    assert (labels == np.where(labels, 1, 0)).all()  # the inputs are not changed


def test_resize_clip_scales_frames_and_masks():
    frames = np.random.default_rng(0).random((2, 40, 60, 3)).astype(np.float32)
    masks = np.zeros((2, 40, 60), bool)
    masks[:, 10:30, 20:40] = True
    small_frames, small_masks = composite.resize_clip(frames, masks, 0.5)
    assert small_frames.shape == (2, 20, 30, 3) and small_masks.shape == (2, 20, 30)
    assert small_masks.dtype == bool and abs(small_masks[0].sum() - 100) <= 12
    assert 0 <= small_frames.min() and small_frames.max() <= 1


def test_split_labels_follow_the_truth_outline_and_keep_objects_it_lacks():
    truth = np.zeros((30, 50), bool)
    truth[5:25, 5:35] = True  # a rider and their bike, one object in the ground truth
    prediction = np.zeros((30, 50), np.uint8)
    prediction[4:15, 6:34] = 3  # the rider, a little off the outline
    prediction[17:26, 8:30] = 1  # the bike, missing rows 15-16 and the truth's edges
    prediction[2:6, 40:48] = 2  # a kite the ground truth leaves out
    [labels] = split_labels([truth], [prediction])
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert ((labels == 1) | (labels == 2)).sum() == truth.sum()  # the truth's outline, split
    assert (labels[truth] > 0).all() and (labels[~truth] != 1).all()
    assert (labels[6:14, 10:30] == 2).all()  # the rider: the prediction's id 3, renumbered 2
    assert (labels[19:24, 10:28] == 1).all()  # the bike keeps 1
    assert labels[15, 20] == 2 and labels[16, 20] == 1  # the gap: the nearest object's
    kite = (prediction == 2) & ~truth
    assert (labels[kite] == 3).all()  # outside the truth: the predicted object itself


def test_split_labels_of_a_frame_without_predicted_objects_give_the_first():
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    prediction = np.zeros((10, 10), np.uint8)
    prediction[2:6, 2:4], prediction[2:6, 4:6] = 1, 2
    labels = split_labels([truth, truth], [prediction, np.zeros_like(prediction)])
    assert set(np.unique(labels[0])) == {0, 1, 2}
    assert (labels[1][truth] == 1).all()


def test_write_split_labels_skips_single_object_sequences(tmp_path):
    for name, ids in (("single", [1]), ("double", [1, 2])):
        for t in range(2):
            truth = np.zeros((20, 30), np.uint8)
            truth[4:16, 4:26] = 255
            prediction = np.zeros((20, 30), np.uint8)
            for k in ids:
                prediction[4:16, 4 + 11 * (k - 1):15 + 11 * (k - 1)] = k
            annotations = tmp_path / "davis" / "Annotations" / "480p" / name
            annotations.mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.fromarray(truth, mode="L").save(annotations / f"{t:05d}.png")
            video_io.write_mask(tmp_path / "pred" / name / f"{t:05d}.png", prediction)
    written = write_split_labels(tmp_path / "davis", tmp_path / "pred", tmp_path / "out")
    assert written == ["double"] and not (tmp_path / "out" / "single").exists()
    labels = video_io.read_mask(tmp_path / "out" / "double" / "00001.png")
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.skipif(not (SHARED / "data" / "osvos-davis2017-val-predictions").is_dir(),
                    reason="needs ../shared/data")
def test_osvos_split_of_bmx_trees_keeps_the_ground_truth_outline(tmp_path):
    davis = SHARED / "data" / "davis2016-val"
    assert write_split_labels(davis, SHARED / "data" / "osvos-davis2017-val-predictions",
                              tmp_path, ["bmx-trees"]) == ["bmx-trees"]
    for name in ("00000.png", "00040.png"):
        truth = video_io.read_mask(davis / "Annotations" / "480p" / "bmx-trees" / name) > 0
        labels = video_io.read_mask(tmp_path / "bmx-trees" / name)
        assert ((labels > 0) == truth).all()  # bmx-trees' two objects both lie in the truth
        assert set(np.unique(labels)) == {0, 1, 2}
