"""Tests of shls_jax/evaluate.py against hand-computed DAVIS scores."""

import os

import numpy as np
from PIL import Image
import pytest
import scipy.ndimage as ndi
from skimage.morphology import disk

from data_prep import masks
from data_prep import video_sources
from shls_jax import evaluate

# ---------------------------------------------------------------- helpers


def stripe(height, width, first_col, last_col):
  """bool [H, W]: columns first_col..last_col (inclusive) set, all rows."""
  mask = np.zeros((height, width), bool)
  mask[:, first_col : last_col + 1] = True
  return mask


def pixel(height, width, row, col):
  mask = np.zeros((height, width), bool)
  mask[row, col] = True
  return mask


def sequence(*frames):
  """[T, H, W] int32 from T nested lists."""
  return np.array(frames, np.int32)


# ---------------------------------------------------------------- J


def test_region_similarity_of_hand_drawn_masks():
  predicted = np.zeros((4, 4), bool)
  predicted[0, 0:4] = True  # 4 pixels
  truth = np.zeros((4, 4), bool)
  truth[0:2, 2:4] = True  # 4 pixels
  truth[3, 0:2] = True  # 2 more
  # Intersection (0, 2), (0, 3): 2; union 4 + 6 - 2 = 8.
  assert evaluate.region_similarity(predicted, truth) == 0.25
  assert evaluate.region_similarity(predicted, np.zeros((4, 4), bool)) == 0.0
  # Both empty -> 1.
  empty = np.zeros((4, 4), bool)
  assert evaluate.region_similarity(empty, empty) == 1.0


def test_void_counts_as_background_and_objects_come_from_frame_0():
  # Frame 0 holds id 1 and void (255): one object, not 255.
  truth = sequence(
      [[1, 255, 0, 0]],
      [[1, 1, 255, 255]],
      [[0, 0, 0, 0]],
  )
  # Frame 1: object 1 covers the two true pixels and the two void pixels.
  predicted = sequence(
      [[0, 0, 0, 0]],
      [[1, 1, 1, 1]],
      [[0, 0, 0, 0]],
  )
  result = evaluate.evaluate_sequence("void", predicted, truth)
  np.testing.assert_array_equal(result["object_ids"], [1])
  # Void as background: intersection 2, union 4. (Ignoring void: 1.)
  np.testing.assert_array_equal(result["J"], [[0.5]])


def test_ground_truth_ids_above_first_frame_are_background():
  # Id 2 appears only after frame 0: not an object, so background for 1.
  truth = sequence(
      [[1, 0, 0, 0]],
      [[1, 2, 2, 0]],
      [[0, 0, 0, 0]],
  )
  predicted = sequence(
      [[0, 0, 0, 0]],
      [[1, 0, 0, 0]],
      [[0, 0, 0, 0]],
  )
  result = evaluate.evaluate_sequence("late", predicted, truth)
  np.testing.assert_array_equal(result["object_ids"], [1])
  np.testing.assert_array_equal(result["J"], [[1.0]])


# ---------------------------------------------------------------- boundaries


def test_boundary_map_of_a_square():
  mask = np.zeros((6, 6), bool)
  mask[1:4, 1:4] = True  # rows and columns 1..3
  # A pixel is marked when it differs from its east, south or south-east
  # neighbour: the outline sits half a pixel up and left of the square's.
  expected = np.array(
      [
          [1, 1, 1, 1, 0, 0],
          [1, 0, 0, 1, 0, 0],
          [1, 0, 0, 1, 0, 0],
          [1, 1, 1, 1, 0, 0],
          [0, 0, 0, 0, 0, 0],
          [0, 0, 0, 0, 0, 0],
      ],
      bool,
  )
  np.testing.assert_array_equal(evaluate.boundary_map(mask), expected)


def test_boundary_map_last_row_and_column():
  # Bottom-right pixel only: it has no neighbour to differ from; (2, 1) sees
  # it east, (1, 2) south, (1, 1) south-east.
  np.testing.assert_array_equal(
      evaluate.boundary_map(pixel(3, 3, 2, 2)),
      np.array([[0, 0, 0], [0, 1, 1], [0, 1, 0]], bool),
  )
  # Bottom-left pixel: last row compares east only, so (2, 0) is marked
  # (east (2, 1) differs) and (1, 0) sees it south.
  np.testing.assert_array_equal(
      evaluate.boundary_map(pixel(3, 3, 2, 0)),
      np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]], bool),
  )
  # The image border is no boundary.
  assert not evaluate.boundary_map(np.ones((5, 7), bool)).any()


def test_boundary_tolerance():
  # ceil(0.008 * 979.65) = ceil(7.84).
  assert evaluate.boundary_tolerance(480, 854) == 8
  # ceil(0.008 * 2202.9) = ceil(17.6).
  assert evaluate.boundary_tolerance(1080, 1920) == 18
  # ceil(0.008 * 141.4) = ceil(1.13); ceil(0.008 * 14.1) = ceil(0.11).
  assert evaluate.boundary_tolerance(100, 100) == 2
  assert evaluate.boundary_tolerance(10, 10) == 1
  # From 1 on, bound_th is the radius in pixels.
  assert evaluate.boundary_tolerance(480, 854, bound_th=3) == 3
  with pytest.raises(ValueError, match="integer"):
    evaluate.boundary_tolerance(480, 854, bound_th=2.5)
  with pytest.raises(ValueError, match="positive"):
    evaluate.boundary_tolerance(0, 854)


def test_f_of_shifted_stripes_within_and_beyond_tolerance():
  # 100 x 100: tolerance 2. A stripe of columns 30..59 has the boundary
  # columns 29 and 59 (200 pixels, every row).
  truth = stripe(100, 100, 30, 59)
  assert evaluate.boundary_f(truth, truth) == 1.0
  # Shifted 2 columns: every boundary pixel is 2 from one of the other's.
  assert evaluate.boundary_f(stripe(100, 100, 32, 61), truth) == 1.0
  # Shifted 3 columns: nothing matches, P = R = 0 -> F = 0.
  assert evaluate.boundary_precision_recall(
      stripe(100, 100, 33, 62), truth
  ) == (0.0, 0.0)
  assert evaluate.boundary_f(stripe(100, 100, 33, 62), truth) == 0.0
  # Columns 30..62 and 80..89: boundary columns 29, 62, 79, 89 (400 pixels).
  # Only column 29 matches (62 is 3 from 59): P = 100/400. Of the true
  # columns 29 and 59 only 29 matches: R = 100/200. F = 2PR/(P+R) = 1/3.
  predicted = stripe(100, 100, 30, 62) | stripe(100, 100, 80, 89)
  assert evaluate.boundary_precision_recall(predicted, truth) == (0.25, 0.5)
  assert evaluate.boundary_f(predicted, truth) == pytest.approx(1 / 3)


def test_f_tolerance_at_davis_resolution():
  # 480 x 854: tolerance 8 pixels.
  truth = stripe(480, 854, 100, 199)
  assert evaluate.boundary_f(stripe(480, 854, 108, 207), truth) == 1.0
  assert evaluate.boundary_f(stripe(480, 854, 109, 208), truth) == 0.0


def test_f_matches_within_a_disk_not_a_square():
  # 100 x 100: tolerance 2, disk(2) = offsets with dy^2 + dx^2 <= 4.
  # Pixel (50, 50) has the boundary (49, 49), (49, 50), (50, 49), (50, 50).
  truth = pixel(100, 100, 50, 50)
  # Pixel (53, 52): boundary (52..53, 51..52). The nearest pair,
  # (52, 51)-(50, 50), is (2, 1) apart: 5 > 4. A 5x5 square would match it.
  assert evaluate.boundary_f(pixel(100, 100, 53, 52), truth) == 0.0
  # Pixel (52, 52): boundary (51..52, 51..52). Only (51, 51)-(50, 50), at
  # squared distance 2, matches: P = R = 1/4, F = 1/4.
  assert evaluate.boundary_precision_recall(pixel(100, 100, 52, 52), truth) == (
      0.25,
      0.25,
  )
  assert evaluate.boundary_f(pixel(100, 100, 52, 52), truth) == 0.25


def test_empty_boundary_rules():
  empty = np.zeros((20, 20), bool)
  square = np.zeros((20, 20), bool)
  square[5:10, 5:10] = True
  full = np.ones((20, 20), bool)
  pr = evaluate.boundary_precision_recall
  # Both empty: P = R = 1.
  assert pr(empty, empty) == (1.0, 1.0)
  assert evaluate.boundary_f(empty, empty) == 1.0
  # Predicted empty, truth not: P = 1, R = 0.
  assert pr(empty, square) == (1.0, 0.0)
  assert evaluate.boundary_f(empty, square) == 0.0
  # Truth empty, prediction not: P = 0, R = 1.
  assert pr(square, empty) == (0.0, 1.0)
  assert evaluate.boundary_f(square, empty) == 0.0
  # A mask covering the whole image has no boundary either (as officially).
  assert pr(full, empty) == (1.0, 1.0)


def test_boundary_matching_equals_disk_dilation():
  """The nearest-neighbour matching against the official dilation recipe."""
  rng = np.random.default_rng(0)
  for _ in range(5):
    truth = ndi.gaussian_filter(rng.normal(size=(60, 90)), 3) > 0.1
    predicted = ndi.gaussian_filter(rng.normal(size=(60, 90)), 3) > 0.1
    radius = evaluate.boundary_tolerance(60, 90, bound_th=0.03)  # 4
    true_boundary = evaluate.boundary_map(truth)
    predicted_boundary = evaluate.boundary_map(predicted)
    footprint = disk(radius).astype(bool)
    true_dilated = ndi.binary_dilation(true_boundary, footprint)
    predicted_dilated = ndi.binary_dilation(predicted_boundary, footprint)
    precision = (predicted_boundary & true_dilated).sum() / (
        predicted_boundary.sum()
    )
    recall = (true_boundary & predicted_dilated).sum() / true_boundary.sum()
    assert 0 < precision < 1 and 0 < recall < 1
    assert evaluate.boundary_precision_recall(
        predicted, truth, bound_th=0.03
    ) == (precision, recall)


# ---------------------------------------------------------------- statistics


def test_mean_recall_decay_of_ten_values():
  values = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
  # n = 10: linspace(1, 10, 5) = [1, 3.25, 5.5, 7.75, 10], rounded
  # [1, 3, 6, 8, 10], minus 1: ids = [0, 2, 5, 7, 9]. Bins, both ends
  # inclusive: [0..2], [2..5], [5..7], [7..9].
  bins = evaluate.decay_bins(10)
  assert [(b.start, b.stop) for b in bins] == [(0, 3), (2, 6), (5, 8), (7, 10)]
  mean, recall, decay = evaluate.mean_recall_decay(values)
  assert mean == pytest.approx(0.45)
  # Strictly above 0.5: 0.9, 0.8, 0.7, 0.6 (0.5 is not).
  assert recall == 0.4
  # mean(0.9, 0.8, 0.7) - mean(0.2, 0.1, 0.0) = 0.8 - 0.1.
  assert decay == pytest.approx(0.7)


def test_decay_rounds_halves_up_like_the_official_tool():
  # n = 7: linspace(1, 7, 5) = [1, 2.5, 4, 5.5, 7]. Halves up: [1, 3, 4, 6, 7]
  # -> ids [0, 2, 3, 5, 6], first bin values[0..2], last values[5..6].
  # (numpy's half-to-even would make the first bin values[0..1].)
  values = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  _, _, decay = evaluate.mean_recall_decay(values)
  assert decay == pytest.approx(2 / 3)
  # n = 1: every bin is the one value.
  assert evaluate.mean_recall_decay(np.array([0.3])) == (0.3, 0.0, 0.0)
  # n = 2: linspace [1, 1.25, 1.5, 1.75, 2] -> ids [0, 0, 1, 1, 1]: the
  # first bin is values[0], the last values[1].
  assert evaluate.mean_recall_decay(np.array([0.75, 0.25]))[2] == 0.5
  # n = 3: [1, 1.5, 2, 2.5, 3] -> ids [0, 1, 1, 2, 2]: mean(v0, v1) - v2.
  assert evaluate.mean_recall_decay(np.array([1.0, 0.5, 0.25]))[2] == 0.5


# ---------------------------------------------------------------- sequences


def test_first_and_last_frames_are_not_scored():
  truth = sequence(
      [[1, 1, 0, 0]],
      [[1, 1, 0, 0]],
      [[1, 1, 0, 0]],
      [[1, 1, 0, 0]],
  )
  # Frames 0 and 3 are wrong (and hold an id the truth lacks: not read);
  # frame 1 is right, frame 2 half right.
  predicted = sequence(
      [[0, 0, 7, 7]],
      [[1, 1, 0, 0]],
      [[1, 0, 0, 0]],
      [[0, 0, 7, 7]],
  )
  result = evaluate.evaluate_sequence("ends", predicted, truth)
  np.testing.assert_array_equal(result["J"], [[1.0, 0.5]])
  np.testing.assert_array_equal(result["J-Mean"], [0.75])
  # Frame 1 is perfect. Frame 2 (1 x 4 image, tolerance 1): predicted
  # boundary (0, 0) (east differs), true boundary (0, 1), 1 apart: F = 1.
  np.testing.assert_array_equal(result["F"], [[1.0, 1.0]])


def test_object_that_disappears():
  # Object 1 leaves after frame 0; the truth is empty in frames 1..3.
  truth = np.zeros((5, 8, 8), np.int32)
  truth[0, 2:4, 2:4] = 1
  predicted = np.zeros((5, 8, 8), np.int32)
  # Frames 1 and 3: predicted empty too -> J = F = 1. Frame 2: something is
  # predicted -> J = 0, and F = 0 (true boundary empty: P = 0, R = 1).
  predicted[2, 5:7, 5:7] = 1
  result = evaluate.evaluate_sequence("gone", predicted, truth)
  np.testing.assert_array_equal(result["J"], [[1.0, 0.0, 1.0]])
  np.testing.assert_array_equal(result["F"], [[1.0, 0.0, 1.0]])
  # Recall: 2 of 3 frames above 0.5.
  np.testing.assert_allclose(result["J-Recall"], [2 / 3])


def test_missing_object_counts_as_empty():
  truth = np.zeros((3, 10, 10), np.int32)
  truth[:, 1:4, 1:4] = 1
  truth[:, 6:9, 6:9] = 2
  predicted = np.where(truth == 1, 1, 0)  # object 2 never predicted
  result = evaluate.evaluate_sequence("missing", predicted, truth)
  np.testing.assert_array_equal(result["object_ids"], [1, 2])
  np.testing.assert_array_equal(result["J"], [[1.0], [0.0]])
  # Object 2: predicted boundary empty, true not: P = 1, R = 0 -> F = 0.
  np.testing.assert_array_equal(result["F"], [[1.0], [0.0]])
  np.testing.assert_array_equal(result["F-Mean"], [1.0, 0.0])


def test_more_predicted_ids_than_ground_truth_is_an_error():
  truth = np.zeros((3, 4, 4), np.int32)
  truth[:, 0, 0] = 1
  truth[:, 3, 3] = 2
  predicted = truth.copy()
  predicted[1, 2, 2] = 3
  with pytest.raises(ValueError, match=r"'bike'.*\[3\].*2 object"):
    evaluate.evaluate_sequence("bike", predicted, truth)
  # The void id is no object a prediction may use either.
  predicted[1, 2, 2] = 255
  with pytest.raises(ValueError, match=r"\[255\]"):
    evaluate.evaluate_sequence("bike", predicted, truth)


def test_sequence_input_errors():
  truth = np.zeros((3, 4, 4), np.int32)
  with pytest.raises(ValueError, match="'s'.*\\[T, H, W\\]"):
    evaluate.evaluate_sequence("s", np.zeros((3, 4, 5), np.int32), truth)
  with pytest.raises(ValueError, match="at least 3"):
    evaluate.evaluate_sequence("s", truth[:2], truth[:2])
  with pytest.raises(ValueError, match="integer ids"):
    evaluate.evaluate_sequence("s", truth.astype(np.float32), truth)


# ---------------------------------------------------------------- summaries


def hand_result(name, j_means, f_means):
  """A per-sequence dict as evaluate_sequence returns, hand-filled."""
  n = len(j_means)
  return {
      "sequence": name,
      "object_ids": np.arange(1, n + 1),
      "J-Mean": np.array(j_means),
      "J-Recall": np.full(n, 0.5),
      "J-Decay": np.full(n, 0.25),
      "F-Mean": np.array(f_means),
      "F-Recall": np.full(n, 1.0),
      "F-Decay": np.full(n, -0.5),
  }


def test_global_scores_average_objects_not_sequences():
  results = [
      hand_result("a", [0.9], [0.7]),
      hand_result("b", [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]),
  ]
  scores, rows = evaluate.summarize(results)
  # J: (0.9 + 0.1 + 0.2 + 0.3) / 4 = 0.375 (per sequence: (0.9 + 0.2) / 2).
  # F: (0.7 + 1.5) / 4 = 0.55. J&F: (0.375 + 0.55) / 2.
  assert list(scores) == list(evaluate.GLOBAL_COLUMNS)
  assert scores["J-Mean"] == pytest.approx(0.375)
  assert scores["F-Mean"] == pytest.approx(0.55)
  assert scores["J&F-Mean"] == pytest.approx(0.4625)
  assert scores["J-Recall"] == 0.5
  assert scores["J-Decay"] == 0.25
  assert scores["F-Recall"] == 1.0
  assert scores["F-Decay"] == -0.5
  assert [r[0] for r in rows] == ["a_1", "b_1", "b_2", "b_3"]
  np.testing.assert_allclose([r[1:] for r in rows][1], (0.1, 0.5))


def test_global_average_end_to_end():
  # Sequence "one": one object, predicted perfectly (J = F = 1).
  one = np.zeros((3, 8, 8), np.int32)
  one[:, 2:5, 2:5] = 1
  # Sequence "three": three objects, nothing predicted (J = F = 0).
  three = np.zeros((3, 8, 8), np.int32)
  three[:, 0:2, 0:2] = 1
  three[:, 0:2, 5:7] = 2
  three[:, 5:7, 0:2] = 3
  results = [
      evaluate.evaluate_sequence("one", one, one),
      evaluate.evaluate_sequence("three", np.zeros_like(three), three),
  ]
  scores, rows = evaluate.summarize(results)
  # Over objects: 1 / 4 (over sequences it would be 1 / 2).
  assert scores["J-Mean"] == 0.25
  assert scores["F-Mean"] == 0.25
  assert scores["J&F-Mean"] == 0.25
  assert rows == [
      ("one_1", 1.0, 1.0),
      ("three_1", 0.0, 0.0),
      ("three_2", 0.0, 0.0),
      ("three_3", 0.0, 0.0),
  ]


def test_summarize_without_objects_is_an_error():
  with pytest.raises(ValueError, match="No objects"):
    evaluate.summarize([hand_result("empty", [], [])])


# ---------------------------------------------------------------- reports


def test_csvs_have_the_official_shape(tmp_path):
  scores = {
      "J&F-Mean": 0.81234,
      "J-Mean": 0.79,
      "J-Recall": 0.9,
      "J-Decay": -0.0456,
      "F-Mean": 0.8346,
      "F-Recall": 1.0,
      "F-Decay": 0.12,
  }
  rows = [("bike-packing_1", 0.6789, 0.7), ("bike-packing_2", 0.5, 0.25)]
  global_path, sequence_path = evaluate.write_csvs(
      str(tmp_path / "out"), "val", scores, rows
  )
  assert global_path == str(tmp_path / "out" / "global_results-val.csv")
  assert sequence_path == str(tmp_path / "out" / "per-sequence_results-val.csv")
  with open(global_path) as f:
    assert f.read() == (
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
        "0.812,0.790,0.900,-0.046,0.835,1.000,0.120\n"
    )
  with open(sequence_path) as f:
    assert f.read() == (
        "Sequence,J-Mean,F-Mean\n"
        "bike-packing_1,0.679,0.700\n"
        "bike-packing_2,0.500,0.250\n"
    )
  assert sorted(os.listdir(tmp_path / "out")) == [
      "global_results-val.csv",
      "per-sequence_results-val.csv",
  ]

  # A write that fails half-way leaves the previous file whole, no temp file.
  with pytest.raises(TypeError):
    evaluate.write_csvs(
        str(tmp_path / "out"),
        "val",
        scores,
        [("x_1", 0.5, 0.5), ("y_1", "bad", 0.5)],
    )
  with open(sequence_path) as f:
    assert f.read().startswith("Sequence,J-Mean,F-Mean\nbike-packing_1,")
  assert len(os.listdir(tmp_path / "out")) == 2


def test_format_table():
  scores, rows = evaluate.summarize([hand_result("cows", [0.5], [0.25])])
  text = evaluate.format_table(scores, rows, "val")
  lines = text.splitlines()
  assert lines[0] == "Global results for val"
  assert lines[1].split() == list(evaluate.GLOBAL_COLUMNS)
  assert lines[2].split() == [
      "0.375",
      "0.500",
      "0.500",
      "0.250",
      "0.250",
      "1.000",
      "-0.500",
  ]
  assert lines[-1].split() == ["cows_1", "0.500", "0.250"]


# ---------------------------------------------------------------- PNGs


def test_davis_palette():
  palette = masks.davis_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  expected = {
      0: (0, 0, 0),
      1: (128, 0, 0),
      2: (0, 128, 0),
      3: (128, 128, 0),
      4: (0, 0, 128),
      5: (128, 0, 128),
      7: (128, 128, 128),
      8: (64, 0, 0),
      9: (192, 0, 0),
      255: (224, 224, 192),
  }
  for index, colour in expected.items():
    assert tuple(palette[index]) == colour, index
  # All 256 colours differ, so ids survive a trip through colours.
  assert len({tuple(c) for c in palette}) == 256


def test_palette_png_round_trip(tmp_path):
  ids = np.array([[0, 1, 2], [3, 255, 1]], np.int64)
  paths = evaluate.write_sequence_pngs(
      str(tmp_path), "dogs-jump", ["00000", "00001"], np.stack([ids, ids[::-1]])
  )
  assert paths == [
      str(tmp_path / "dogs-jump" / "00000.png"),
      str(tmp_path / "dogs-jump" / "00001.png"),
  ]
  assert sorted(os.listdir(tmp_path / "dogs-jump")) == [
      "00000.png",
      "00001.png",
  ]
  with Image.open(paths[0]) as image:
    assert image.format == "PNG" and image.mode == "P"
    np.testing.assert_array_equal(np.array(image), ids)
    # Ids 0..3: black, (128, 0, 0), (0, 128, 0), (128, 128, 0).
    first_colours = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert image.getpalette()[:12] == first_colours
  np.testing.assert_array_equal(
      video_sources.read_palette_mask(paths[1]), ids[::-1]
  )
  with pytest.raises(ValueError, match=r"got \[1, 256\]"):
    video_sources.write_palette_mask(str(tmp_path / "bad.png"), ids + 1)
