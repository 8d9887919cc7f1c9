"""DAVIS J and F measures: hand-computed cases and per-frame values of the official code."""
import csv
import json
import math
import pathlib

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from stm_model import metrics

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared"
REFERENCE = SHARED / "reference" / "jf_reference.json"
GT_ROOT = SHARED / "data" / "davis2016-val" / "Annotations" / "480p"
PRED_ROOT = SHARED / "data" / "osvos-davis2017-val-predictions"


def block(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# J
# ---------------------------------------------------------------------------------------------

def test_j_identical_disjoint_empty():
    a = block((6, 7), (1, 4), (2, 5))
    assert metrics.region_similarity(a, a) == 1.0
    assert metrics.region_similarity(a, block((6, 7), (4, 6), (0, 2))) == 0.0
    empty = np.zeros((6, 7), dtype=bool)
    assert metrics.region_similarity(empty, empty) == 1.0
    assert metrics.region_similarity(a, empty) == 0.0
    assert metrics.region_similarity(empty, a) == 0.0


def test_j_hand_computed():
    # gt rows 0-1, pred rows 1-2, both cols 0-2: intersection 3 px, union 9 px.
    gt = block((4, 4), (0, 2), (0, 3))
    pred = block((4, 4), (1, 3), (0, 3))
    assert metrics.region_similarity(gt, pred) == pytest.approx(1 / 3, abs=1e-15)
    # Any castable-to-bool input: uint8 0/255 and labels.
    assert metrics.region_similarity(gt.astype(np.uint8) * 255, pred.astype(np.int64) * 2) == \
        pytest.approx(1 / 3, abs=1e-15)


@pytest.mark.parametrize("measure", [metrics.region_similarity, metrics.contour_accuracy,
                                     metrics.boundary_precision_recall])
def test_shape_errors_name_both_shapes(measure):
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        measure(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(3, 4\)"):
        measure(np.zeros((2, 3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\(5,\).*\(5,\)"):
        measure(np.zeros(5), np.zeros(5))


# ---------------------------------------------------------------------------------------------
# Boundaries and F
# ---------------------------------------------------------------------------------------------

def test_boundary_map_hand_computed():
    seg = block((4, 4), (1, 3), (1, 3))
    expected = np.array([[1, 1, 1, 0],
                         [1, 0, 1, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(metrics.boundary_map(seg), expected)
    # A mask covering the whole image has no boundary (the image border is not one).
    assert not metrics.boundary_map(np.ones((5, 6), dtype=bool)).any()


def test_f_identical_and_both_empty():
    a = block((20, 30), (3, 12), (5, 21))
    assert metrics.boundary_precision_recall(a, a) == (1.0, 1.0)
    assert metrics.contour_accuracy(a, a) == 1.0
    empty = np.zeros((20, 30), dtype=bool)
    assert metrics.boundary_precision_recall(empty, empty) == (1.0, 1.0)
    assert metrics.contour_accuracy(empty, empty) == 1.0


def test_f_one_side_empty():
    a = block((20, 30), (3, 12), (5, 21))
    empty = np.zeros((20, 30), dtype=bool)
    # No predicted boundary, some ground-truth boundary: precision 1, recall 0.
    assert metrics.boundary_precision_recall(a, empty) == (1.0, 0.0)
    assert metrics.contour_accuracy(a, empty) == 0.0
    # Predicted boundary, no ground-truth boundary: precision 0, recall 1.
    assert metrics.boundary_precision_recall(empty, a) == (0.0, 1.0)
    assert metrics.contour_accuracy(empty, a) == 0.0


def test_f_hand_computed():
    # 2x2 blocks two columns apart; bound_th=1 -> radius-1 disk (a plus). Of the 8 boundary
    # pixels of each mask, 5 lie within the plus of the other's boundary: P = R = F = 5/8.
    gt = block((4, 6), (1, 3), (1, 3))
    pred = block((4, 6), (1, 3), (3, 5))
    precision, recall = metrics.boundary_precision_recall(gt, pred, bound_th=1)
    assert (precision, recall) == (5 / 8, 5 / 8)
    assert metrics.contour_accuracy(gt, pred, bound_th=1) == pytest.approx(5 / 8, abs=1e-15)
    # Radius 2 covers the two-column shift everywhere.
    assert metrics.contour_accuracy(gt, pred, bound_th=2) == 1.0
    # A relative threshold: ceil(0.008 * hypot(4, 6)) = 1 pixel, the same as bound_th=1.
    assert metrics.contour_accuracy(gt, pred) == pytest.approx(5 / 8, abs=1e-15)


def dilation_reference(gt, pred, bound_th):
    """Precision and recall with whole-image scipy dilations, the literal DAVIS recipe."""
    gt_b, pred_b = metrics.boundary_map(gt), metrics.boundary_map(pred)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    structure = disk(radius).astype(bool)
    gt_dil = ndimage.binary_dilation(gt_b, structure=structure, border_value=0)
    pred_dil = ndimage.binary_dilation(pred_b, structure=structure, border_value=0)
    return (np.count_nonzero(pred_b & gt_dil) / np.count_nonzero(pred_b),
            np.count_nonzero(gt_b & pred_dil) / np.count_nonzero(gt_b))


@pytest.mark.parametrize("bound_th", [0.008, 0.02, 1, 3])
def test_f_matches_whole_image_dilation(bound_th):
    """The sparse boundary matching equals dilating the whole boundary map (border 0)."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        # Smoothed random blobs that also touch the image border.
        gt = ndimage.gaussian_filter(rng.random((61, 97)), 3) > 0.5
        pred = ndimage.gaussian_filter(rng.random((61, 97)), 3) > 0.5
        assert metrics.boundary_precision_recall(gt, pred, bound_th) == \
            dilation_reference(gt, pred, bound_th)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def test_statistics_hand_computed():
    v = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.9]
    # linspace(1, 7, 5) = [1, 2.5, 4, 5.5, 7]; +1e-10 rounds the halves up: ids [0, 2, 3, 5, 6]
    # bins v[0:3], v[2:4], v[3:6], v[5:7]; decay = mean(1, .8, .6) - mean(0, .9) = .8 - .45.
    # (Without the 1e-10, round-half-even would give ids [0, 1, 3, 5, 6] and decay 0.45.)
    mean, recall, decay = metrics.statistics(v)
    assert mean == pytest.approx(3.9 / 7, abs=1e-12)
    assert recall == pytest.approx(4 / 7, abs=1e-12)
    assert decay == pytest.approx(0.35, abs=1e-12)


def test_statistics_nan_and_edge_cases():
    # NaN frames are skipped by the means but count as misses in the recall (as DAVIS).
    # 3 frames: ids [0, 1, 1, 2, 2], bin 0 = v[0:2] = [nan, 1], bin 3 = v[2:3] = [0].
    mean, recall, decay = metrics.statistics([math.nan, 1.0, 0.0])
    assert mean == 0.5 and recall == pytest.approx(1 / 3) and decay == 1.0
    # One frame: all bins are that frame.
    assert metrics.statistics([0.7]) == (0.7, 1.0, 0.0)
    assert all(math.isnan(x) for x in metrics.statistics([]))


# ---------------------------------------------------------------------------------------------
# Sequences, aggregation, CSV
# ---------------------------------------------------------------------------------------------

def two_object_video():
    gt = np.zeros((3, 8, 10), dtype=np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:, 5:8, 5:9] = 2
    return gt


def test_evaluate_sequence_missing_object_counts_as_empty():
    gt = two_object_video()
    pred = np.where(gt == 2, 0, gt)  # object 2 never predicted
    result = metrics.evaluate_sequence(gt, list(pred))
    assert result["object_ids"] == [1, 2]
    np.testing.assert_array_equal(result["J"], [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(result["F"], [[1, 1, 1], [0, 0, 0]])
    # Explicit object ids: an id absent from both sides scores 1 (both masks empty).
    result = metrics.evaluate_sequence(gt, pred, object_ids=[2, 7])
    assert result["object_ids"] == [2, 7]
    np.testing.assert_array_equal(result["J"], [[0, 0, 0], [1, 1, 1]])


def test_evaluate_sequence_per_frame_values():
    gt = two_object_video()
    pred = gt.copy()
    pred[1, 1, 1:4] = 0  # frame 1: object 1 loses one row, 6 of 9 px remain
    result = metrics.evaluate_sequence(gt, pred)
    assert result["J"][0, 1] == pytest.approx(6 / 9)
    assert result["J"][0, 0] == result["J"][0, 2] == 1.0
    assert result["J"].shape == result["F"].shape == (2, 3)
    assert result["F"][0, 1] == metrics.contour_accuracy(gt[1] == 1, pred[1] == 1)


def test_evaluate_sequence_errors():
    gt = two_object_video()
    pred = gt.copy()
    pred[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        metrics.evaluate_sequence(gt, pred)
    with pytest.raises(ValueError, match=r"3 frames.*2"):
        metrics.evaluate_sequence(gt, gt[:2])
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(8, 9\)"):
        metrics.evaluate_sequence(gt, [gt[0], gt[1], gt[2][:, :9]])
    with pytest.raises(TypeError):
        metrics.evaluate_sequence(gt, gt.astype(np.float32))


def fake_results():
    # Sequence "a": 2 objects, 6 frames; sequence "b": 1 object, 4 frames.
    return {
        "a": {"object_ids": [1, 2],
              "J": np.array([[0.0, 0.9, 0.8, 0.7, 0.6, 0.0],
                             [0.0, 0.4, 0.4, 0.6, 0.6, 0.0]]),
              "F": np.array([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                             [0.0, 0.2, 0.2, 0.2, 0.2, 0.0]])},
        "b": {"object_ids": [1],
              "J": np.array([[1.0, 0.3, 0.5, 1.0]]),
              "F": np.array([[1.0, 0.8, 0.6, 1.0]])},
    }


def test_summarize_excludes_first_and_last_frame():
    per_object, global_row = metrics.summarize(fake_results())
    assert list(per_object) == ["a_1", "a_2", "b_1"]
    assert per_object["a_1"]["J-Mean"] == pytest.approx(0.75)
    assert per_object["a_2"]["J-Mean"] == pytest.approx(0.5)
    assert per_object["b_1"]["F-Mean"] == pytest.approx(0.7)
    assert list(global_row) == list(metrics.GLOBAL_COLUMNS)
    # Decays (frames 1..T-2): a_1 J [.9,.8,.7,.6] has ids [0,1,2,2,3], bins [.9,.8], [.8,.7],
    # [.7], [.7,.6]: .85 - .65 = .2; a_2 J [.4,.4,.6,.6]: .4 - .6; b_1 J [.3,.5] has ids
    # [0,0,1,1,1], bin 0 = [.3], bin 3 = [.5]: -.2. F: a_1 0, a_2 0, b_1 [.8,.6]: .2.
    assert global_row["J-Mean"] == pytest.approx((0.75 + 0.5 + 0.4) / 3)
    assert global_row["J-Recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert global_row["J-Decay"] == pytest.approx((0.2 - 0.2 - 0.2) / 3)
    assert global_row["F-Mean"] == pytest.approx((1 + 0.2 + 0.7) / 3)
    assert global_row["F-Recall"] == pytest.approx((1 + 0 + 1) / 3)
    assert global_row["F-Decay"] == pytest.approx((0 + 0 + 0.2) / 3)
    assert global_row["J&F-Mean"] == pytest.approx((global_row["J-Mean"]
                                                     + global_row["F-Mean"]) / 2)
    # All frames included: a_1's J mean drops by the two zero frames.
    per_object_all, _ = metrics.summarize(fake_results(), exclude_first_last=False)
    assert per_object_all["a_1"]["J-Mean"] == pytest.approx(3.0 / 6)


def test_write_csvs_and_table(tmp_path):
    per_object, global_row = metrics.summarize(fake_results())
    global_path, per_object_path = metrics.write_csvs(tmp_path / "out", per_object, global_row)
    assert pathlib.Path(global_path).name == "global_results.csv"
    assert pathlib.Path(per_object_path).name == "per-sequence_results.csv"
    with open(global_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
                       "F-Decay"]
    assert len(rows) == 2
    assert rows[1] == [f"{global_row[c]:.3f}" for c in rows[0]]
    assert rows[1][1] == "0.550"  # J-Mean = (0.75 + 0.5 + 0.4) / 3
    with open(per_object_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["Sequence", "J-Mean", "F-Mean"],
                    ["a_1", "0.750", "1.000"],
                    ["a_2", "0.500", "0.200"],
                    ["b_1", "0.400", "0.700"]]
    table = metrics.format_table(per_object, global_row)
    assert "J&F-Mean" in table and "a_2" in table and "0.550" in table


# ---------------------------------------------------------------------------------------------
# Against the official DAVIS-2017 evaluation code
# ---------------------------------------------------------------------------------------------

def load_reference():
    if not (REFERENCE.is_file() and GT_ROOT.is_dir() and PRED_ROOT.is_dir()):
        pytest.skip("../shared reference data not available")
    with open(REFERENCE) as f:
        return json.load(f)


@pytest.mark.parametrize("sequence", ["blackswan", "camel", "car-shadow"])
def test_matches_official_davis_values(sequence):
    from PIL import Image

    reference = load_reference()
    if sequence not in reference:
        pytest.skip(f"{sequence} not in {REFERENCE.name}")
    ref = reference[sequence]
    gt = [(np.array(Image.open(GT_ROOT / sequence / name).convert("L")) > 127).astype(np.uint8)
          for name in ref["frames"]]
    pred = [(np.array(Image.open(PRED_ROOT / sequence / name)) > 0).astype(np.uint8)
            for name in ref["frames"]]
    result = metrics.evaluate_sequence(gt, pred)
    assert result["object_ids"] == [1]
    # The reference values are rounded to 6 decimals (error <= 5e-7); measured max difference
    # here is < 5e-7 for every sequence, so the 1e-6 bound holds without extra slack.
    for measure in ("J", "F"):
        ours, expected = result[measure][0], np.array(ref[measure])
        bad = np.flatnonzero(np.abs(ours - expected) > 1e-6)
        assert bad.size == 0, (measure, [(ref["frames"][i], ours[i], expected[i]) for i in bad])
    # The challenge's per-sequence score averages frames 1..T-2.
    per_object, _ = metrics.summarize({sequence: result})
    assert per_object[f"{sequence}_1"]["J-Mean"] == pytest.approx(np.mean(ref["J"][1:-1]),
                                                                  abs=1e-6)
    assert per_object[f"{sequence}_1"]["F-Mean"] == pytest.approx(np.mean(ref["F"][1:-1]),
                                                                  abs=1e-6)


def test_void_pixels_are_left_out_of_j_and_f():
    """As the DAVIS evaluation does: pixels marked void (label 255 in the annotation) count in
    neither mask, so a prediction that differs from the ground truth only there scores 1."""
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = gt.copy()
    pred[0:3, :] = True  # wrong, but only under the void band
    void = np.zeros((20, 20), bool)
    void[0:3, :] = True
    assert metrics.region_similarity(gt, pred) < 1
    assert metrics.region_similarity(gt, pred, void) == 1.0
    assert metrics.contour_accuracy(gt, pred, void=void) == 1.0
    result = metrics.evaluate_sequence([gt.astype(np.int64)], [pred.astype(np.int64)],
                                       void=[void])
    assert result["J"][0, 0] == 1.0 and result["F"][0, 0] == 1.0
    with pytest.raises(ValueError, match="void has 2 frames"):
        metrics.evaluate_sequence([gt.astype(np.int64)], [pred.astype(np.int64)],
                                  void=[void, void])


def test_an_object_the_ground_truth_lacks_is_refused_naming_the_first_frame():
    gt = [np.ones((4, 4), np.int64)] * 3
    pred = [np.ones((4, 4), np.int64), np.full((4, 4), 2), np.full((4, 4), 3)]
    with pytest.raises(ValueError, match=r"prediction frame 1 holds object ids \[2, 3\]"):
        metrics.evaluate_sequence(gt, pred)
