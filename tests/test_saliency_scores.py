"""Tests of the saliency measures against hand-computed cases."""

import numpy as np
import pytest

from data_prep import saliency_scores


def _image():
  # 2 x 4 map: levels 0, 64, 128, 255; the object is the right half.
  saliency = np.array([[0, 64, 128, 255], [0, 64, 128, 255]], np.uint8)
  truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], bool)
  return saliency, truth


def test_image_curves_by_hand():
  saliency, truth = _image()
  precision, recall, mae = saliency_scores.image_curves(saliency, truth)
  # t = 0: everything is object: P = 4/8, R = 1.
  assert precision[0] == pytest.approx(0.5) and recall[0] == 1.0
  # t in (0, 64]: levels 64, 128, 255 -> 6 pixels, 4 hits.
  assert precision[64] == pytest.approx(4 / 6) and recall[64] == 1.0
  # t in (64, 128]: exactly the object.
  assert precision[100] == 1.0 and recall[128] == 1.0
  # t in (128, 255]: the 255 column only.
  assert precision[200] == 1.0 and recall[255] == pytest.approx(0.5)
  # MAE: |0-0|, |64/255-0|, |128/255-1|, |1-1| over both rows.
  expected = (64 / 255 + (1 - 128 / 255)) / 4
  assert mae == pytest.approx(expected)


def test_float_maps_are_quantised_like_8_bit_ones():
  saliency, truth = _image()
  as_float = saliency.astype(np.float64) / 255
  for a, b in zip(
      saliency_scores.image_curves(as_float, truth),
      saliency_scores.image_curves(saliency, truth),
  ):
    np.testing.assert_allclose(a, b)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    saliency_scores.image_curves(as_float * 2, truth)


def test_empty_cases():
  truth = np.zeros((3, 3), bool)
  precision, recall, _ = saliency_scores.image_curves(
      np.full((3, 3), 10, np.uint8), truth
  )
  # No object: recall 0 everywhere; above level 10 nothing is detected.
  assert not recall.any()
  assert precision[11] == 0.0
  with pytest.raises(ValueError, match="differ in size"):
    saliency_scores.image_curves(np.zeros((2, 2), np.uint8), truth)


def test_f_beta_weights_precision():
  # beta^2 = 0.3: (1.3 P R) / (0.3 P + R).
  assert saliency_scores.f_beta(1.0, 0.5) == pytest.approx(0.65 / 0.8)
  assert saliency_scores.f_beta(0.5, 1.0) == pytest.approx(0.65 / 1.15)
  assert saliency_scores.f_beta(0.0, 0.0) == 0.0


def test_accumulator_averages_curves_before_the_maximum():
  saliency, truth = _image()
  accumulator = saliency_scores.Accumulator()
  accumulator.add(*saliency_scores.image_curves(saliency, truth))
  # A second image whose map is inverted: its best threshold is elsewhere.
  accumulator.add(*saliency_scores.image_curves(255 - saliency, truth))
  scores = accumulator.scores()
  p1, r1, m1 = saliency_scores.image_curves(saliency, truth)
  p2, r2, m2 = saliency_scores.image_curves(255 - saliency, truth)
  curve = saliency_scores.f_beta((p1 + p2) / 2, (r1 + r2) / 2)
  assert scores["max_f"] == pytest.approx(curve.max())
  assert scores["threshold"] == int(curve.argmax())
  assert scores["mae"] == pytest.approx((m1 + m2) / 2)
  assert scores["images"] == 2
  # The mean of per-image maxima is a different (larger) number.
  per_image = max(saliency_scores.f_beta(p1, r1).max(), 0)
  assert per_image == pytest.approx(1.0)
  assert scores["max_f"] < 1.0
  with pytest.raises(ValueError):
    saliency_scores.Accumulator().scores()


def test_mask_scores():
  predicted = np.array([[1, 1, 0, 0]], bool)
  truth = np.array([[0, 1, 1, 0]], bool)
  scores = saliency_scores.mask_scores(predicted, truth)
  assert scores["precision"] == 0.5 and scores["recall"] == 0.5
  assert scores["iou"] == pytest.approx(1 / 3)
  assert scores["f_beta"] == pytest.approx(0.5)
  empty = saliency_scores.mask_scores(np.zeros((2, 2)), np.zeros((2, 2)))
  assert empty["iou"] == 1.0 and empty["precision"] == 0.0
