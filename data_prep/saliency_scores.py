"""Scores of saliency maps against ground-truth masks, as the literature does.

The two measures of the salient-object benchmarks (Achanta et al. CVPR 2009,
Borji et al. TIP 2015) that the RBD paper's successors report:

* MAE: the mean absolute difference between the map, scaled to [0, 1], and
  the binary ground truth, averaged over pixels, then over images.
* max F-beta (beta^2 = 0.3, which weighs precision more than recall): the
  map is binarised at every 8-bit threshold t = 0..255 (pixel >= t is
  object); precision and recall of each image at each threshold are
  averaged over the images of the dataset, F-beta is computed from the two
  mean curves, and its maximum over thresholds is reported.

An empty binarisation has precision 0; an image without object pixels has
recall 0 (neither happens for the t = 0 end of the curve, where everything is
object). `Accumulator` adds images one at a time from their histograms, so a
whole dataset never has to be in memory.
"""

import numpy as np

BETA_SQUARED = 0.3
NUM_THRESHOLDS = 256


def to_levels(saliency: np.ndarray) -> np.ndarray:
  """A map in [0, 1] (float) or 8-bit (uint8) as integer levels 0..255."""
  saliency = np.asarray(saliency)
  if saliency.dtype == np.uint8:
    return saliency
  if saliency.size and (saliency.min() < 0 or saliency.max() > 1):
    raise ValueError(
        f"A float saliency map must lie in [0, 1]; got [{saliency.min()},"
        f" {saliency.max()}]."
    )
  return np.round(saliency * 255).astype(np.uint8)


def image_curves(saliency: np.ndarray, truth: np.ndarray):
  """Precision, recall at thresholds 0..255 and the MAE of one image.

  Args:
    saliency: [H, W] float in [0, 1] or uint8.
    truth: bool [H, W], the object.

  Returns:
    precision float [256], recall float [256], mae float.
  """
  levels = to_levels(saliency)
  truth = np.asarray(truth, bool)
  if levels.shape != truth.shape:
    raise ValueError(
        f"Saliency map {levels.shape} and mask {truth.shape} differ in size."
    )
  inside = np.bincount(levels[truth], minlength=NUM_THRESHOLDS)
  outside = np.bincount(levels[~truth], minlength=NUM_THRESHOLDS)
  # Pixels at or above each threshold: reversed cumulative sums.
  hits = np.cumsum(inside[::-1])[::-1].astype(np.float64)
  detected = hits + np.cumsum(outside[::-1])[::-1]
  precision = np.divide(
      hits, detected, out=np.zeros_like(hits), where=detected > 0
  )
  positives = float(truth.sum())
  recall = hits / positives if positives else np.zeros_like(hits)
  mae = float(np.abs(levels / 255.0 - truth).mean())
  return precision, recall, mae


def f_beta(precision, recall, beta_squared: float = BETA_SQUARED):
  """F-beta of precision and recall (0 where both are 0)."""
  precision = np.asarray(precision, np.float64)
  recall = np.asarray(recall, np.float64)
  denominator = beta_squared * precision + recall
  return np.divide(
      (1 + beta_squared) * precision * recall,
      denominator,
      out=np.zeros_like(denominator),
      where=denominator > 0,
  )


class Accumulator:
  """Dataset scores from one image at a time."""

  def __init__(self):
    self.precision = np.zeros(NUM_THRESHOLDS)
    self.recall = np.zeros(NUM_THRESHOLDS)
    self.mae = 0.0
    self.count = 0

  def add(self, precision, recall, mae) -> None:
    self.precision += precision
    self.recall += recall
    self.mae += mae
    self.count += 1

  def scores(self) -> dict:
    """mae, max_f (beta^2 = 0.3), its threshold (0..255), images."""
    if not self.count:
      raise ValueError("No image was scored.")
    curve = f_beta(self.precision / self.count, self.recall / self.count)
    best = int(curve.argmax())
    return {
        "mae": self.mae / self.count,
        "max_f": float(curve[best]),
        "threshold": best,
        "images": self.count,
    }


def mask_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
  """Precision, recall, F-beta and IoU of one binary mask."""
  predicted = np.asarray(predicted, bool)
  truth = np.asarray(truth, bool)
  hits = float((predicted & truth).sum())
  precision = hits / predicted.sum() if predicted.any() else 0.0
  recall = hits / truth.sum() if truth.any() else 0.0
  union = float((predicted | truth).sum())
  return {
      "precision": precision,
      "recall": recall,
      "f_beta": float(f_beta(precision, recall)),
      "iou": hits / union if union else 1.0,
  }
