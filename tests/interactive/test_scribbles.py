"""DAVIS-format scribbles: rasterisation of known paths, checks with clear errors, synthesis."""
import numpy as np
import pytest

from stm_model.interactive import scribbles as S


def _stroke(path, object_id=1):
    return {"path": path, "object_id": object_id, "start_time": 0.0, "end_time": 1.0}


def test_diagonal_is_a_bresenham_line_from_corner_to_corner():
    drawn = S.rasterize([_stroke([[0, 0], [1, 1]], 2)], 5, 9)
    expected = np.full((5, 9), -1)
    for row, col in [(0, 0), (1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (3, 6), (4, 7), (4, 8)]:
        expected[row, col] = 2
    np.testing.assert_array_equal(drawn, expected)


def test_points_map_to_pixel_centres_with_w_minus_1_scaling():
    drawn = S.rasterize([_stroke([[0.5, 0.25]], 0)], 9, 11)  # x 0.5*10 = 5, y 0.25*8 = 2
    assert (drawn == 0).sum() == 1 and drawn[2, 5] == 0


def test_polyline_visits_every_vertex_and_later_strokes_overwrite():
    path = [[0, 0.5], [0.5, 0.5], [0.5, 1]]  # horizontal then down, 11 x 11
    drawn = S.rasterize([_stroke(path, 1), _stroke([[0.5, 0], [0.5, 1]], 2)], 11, 11)
    np.testing.assert_array_equal(drawn[5, :5], [1] * 5)  # the horizontal part, left of x=5
    np.testing.assert_array_equal(drawn[:, 5], [2] * 11)  # the vertical stroke drawn last
    assert (drawn >= 0).sum() == 5 + 11


def test_line_width_thickens_with_a_disk():
    drawn = S.rasterize([_stroke([[0, 0.5], [1, 0.5]], 3)], 9, 20, line_width=3)
    rows = np.flatnonzero((drawn == 3).any(1))
    np.testing.assert_array_equal(rows, [3, 4, 5])
    assert (drawn == 3).sum() == 3 * 20
    dot = S.rasterize([_stroke([[0.5, 0.5]], 1)], 5, 5, line_width=3)
    np.testing.assert_array_equal(dot >= 0, [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0],
                                             [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="line_width"):
        S.rasterize([_stroke([[0.5, 0.5]])], 5, 5, line_width=0)


def test_channels_are_positive_for_the_object_and_negative_for_everything_else_drawn():
    scribble_map = np.array([[-1, 0, 1, 2]])
    channels = S.scribble_channels(scribble_map, 2)
    assert channels.shape == (2, 2, 1, 4)
    np.testing.assert_array_equal(channels[0, 0, 0], [0, 0, 1, 0])  # object 1 positive
    np.testing.assert_array_equal(channels[0, 1, 0], [0, 1, 0, 1])  # background + object 2
    np.testing.assert_array_equal(channels[1, 0, 0], [0, 0, 0, 1])
    np.testing.assert_array_equal(channels[1, 1, 0], [0, 1, 1, 0])
    probs = np.full((2, 1, 4), 0.5, dtype=np.float32)
    np.testing.assert_array_equal(S.paint_scribbles(probs, channels)[0, 0], [0.5, 0, 1, 0])


@pytest.mark.parametrize("scribbles, message", [
    ([[]], "DAVIS interactive format"),
    ({"sequence": "x"}, "DAVIS interactive format"),
    ({"scribbles": [[], []]}, "has 2 frame entries but the video has 3"),
    ({"scribbles": [[], [_stroke([[0.2, 1.5]])], []]}, r"frame 1, stroke 0: point 0 .* outside"),
    ({"scribbles": [[_stroke([[0.1, 0.1], [-0.01, 0.5]])], [], []]}, "point 1 .* outside"),
    ({"scribbles": [[], [], [_stroke([[0.5, 0.5]], 3)]]}, "unknown object_id 3"),
    ({"scribbles": [[], [], [_stroke([[0.5, 0.5]], -1)]]}, "unknown object_id -1"),
    ({"scribbles": [[_stroke([[0.5, 0.5]], 1.0)], [], []]}, "object_id must be an integer"),
    ({"scribbles": [[_stroke([[0.5, 0.5]], True)], [], []]}, "object_id must be an integer"),
    ({"scribbles": [[_stroke([])], [], []]}, "frame 0, stroke 0: empty path"),
    ({"scribbles": [[{"path": [[0.5, 0.5]]}], [], []]}, '"path" and "object_id"'),
    ({"scribbles": [[_stroke([[0.5, 0.5, 0.5]])], [], []]}, r"\[x, y\] points"),
    ({"scribbles": [[_stroke([[float("nan"), 0.5]])], [], []]}, "outside"),
])
def test_bad_scribbles_are_clear_errors(scribbles, message):
    with pytest.raises(S.ScribbleError, match=message):
        S.check_scribbles(scribbles, num_frames=3, num_objects=2)


def test_helpers_find_annotated_frames_ids_and_fuse_rounds():
    first = S.empty_scribbles(3, "seq")
    first["scribbles"][1] = [_stroke([[0.5, 0.5]], 2)]
    second = S.empty_scribbles(3, "seq")
    second["scribbles"][1] = [_stroke([[0.1, 0.1]], 0)]
    second["scribbles"][2] = [_stroke([[0.1, 0.1]], 1)]
    fused = S.fuse_scribbles(first, second)
    assert S.annotated_frames(fused) == [1, 2] and S.object_ids(fused) == [0, 1, 2]
    assert [s["object_id"] for s in fused["scribbles"][1]] == [2, 0]
    assert S.check_scribbles(fused, 3, 2) is fused["scribbles"]


@pytest.fixture
def two_objects():
    gt = np.zeros((48, 64), dtype=np.int64)
    gt[8:30, 4:40] = 1
    gt[28:46, 36:62] = 2
    predicted = np.zeros_like(gt)
    predicted[0:10, 0:24] = 1   # false positive of object 1 on background (and on object 1)
    predicted[30:46, 40:60] = 2  # most of object 2
    return gt, predicted


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_synthesised_strokes_lie_in_the_largest_error_region_of_their_id(two_objects, seed):
    gt, predicted = two_objects
    rng = None if seed is None else np.random.default_rng(seed)
    strokes = S.synthesize_strokes(gt, predicted, 2, rng=rng)
    assert {s["object_id"] for s in strokes} == {0, 1, 2}
    for stroke in strokes:
        region = S.largest_component((gt == stroke["object_id"]) &
                                     (predicted != stroke["object_id"]))
        drawn = S.rasterize([stroke], *gt.shape) >= 0
        assert drawn.any() and region[drawn].all(), stroke
    S.check_scribbles({"scribbles": [strokes]}, 1, 2)  # valid DAVIS format


def test_robot_path_is_the_skeleton_s_longest_path():
    region = np.zeros((20, 40), dtype=bool)
    region[8:12, 2:38] = True  # a bar: its skeleton is a horizontal segment
    stroke = S.region_scribble(region, 1)
    drawn = S.rasterize([stroke], 20, 40) >= 0
    cols = np.flatnonzero(drawn.any(0))
    assert cols.min() <= 4 and cols.max() >= 35  # spans (nearly) the whole bar
    assert len(stroke["path"]) == 2  # a straight skeleton simplifies to its two ends


def test_no_strokes_for_a_perfect_prediction_or_tiny_errors(two_objects):
    gt, _ = two_objects
    assert S.synthesize_strokes(gt, gt, 2) == []
    nearly = gt.copy()
    nearly[20, 20] = 0  # one pixel off: below min_pixels
    assert S.synthesize_strokes(gt, nearly, 2) == []


def test_corrected_regions_claim_a_mislabelled_region_whole_and_an_overgrowth_in_part():
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[5:15, 5:15] = 2                 # object 1 mislabelled as 2 (an identity switch)
    labels[25:35, 0:40] = 1                # object 1 overgrown into object 2's place (x >= 30)
    labels[20:22, 50:52] = 1               # a spurious speck of object 1
    drawn = np.full(labels.shape, S.NO_SCRIBBLE, dtype=np.int16)
    drawn[10, 7:13] = 1                    # along the middle of the mislabelled square
    drawn[27:33, 35] = 2                   # across the overgrown end
    drawn[21, 51] = 0                      # background on the speck
    drawn[30, 5:10] = 1                    # agrees with the mask: claims nothing
    drawn[0, 0:20] = 0                     # on background: claims nothing
    claimed = S.corrected_regions(labels, drawn, num_objects=3)
    assert claimed.shape == (40, 60) and claimed.dtype == np.int16
    assert (claimed[labels == 2] == 1).all()             # the whole square, for object 1
    assert (claimed[20:22, 50:52] == 0).all()            # the speck, for the background
    overgrowth = claimed[25:35]
    assert (overgrowth[:, 30:40] == 2).all()             # the overgrown end, for object 2
    assert (overgrowth[:, :20] == S.NO_SCRIBBLE).all()   # not the rest of object 1
    assert (claimed[labels == 0] == S.NO_SCRIBBLE).all()
    nothing = np.full_like(drawn, S.NO_SCRIBBLE)
    assert (S.corrected_regions(labels, nothing, 3) == S.NO_SCRIBBLE).all()
    # two ids across one region: each pixel goes to the nearer stroke
    band = np.zeros((10, 40), dtype=np.int64)
    band[2:8] = 1
    strokes = np.full(band.shape, S.NO_SCRIBBLE, dtype=np.int16)
    strokes[5, 2:6], strokes[5, 34:38] = 0, 2
    claimed = S.corrected_regions(band, strokes, 2, reach=20)
    assert (claimed[2:8, :10] == 0).all() and (claimed[2:8, 30:] == 2).all()
