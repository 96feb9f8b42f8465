"""Stage-1 validation: frame-0 label transfer and IoU per object."""

import jax.numpy as jnp
import numpy as np

from shls_jax import validation


def test_nearest_frame0_labels_use_cosine_and_skip_invalid():
  f0 = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.0, 0.0]])
  # Frame 1: one row close in angle to each frame-0 row; magnitude is
  # irrelevant to cosine similarity.
  f1 = np.array([[10.0, 1.0], [0.1, 3.0], [1.0, 1.1], [2.0, 2.0]])
  features = jnp.asarray(np.stack([f0, f1]))
  valid = jnp.asarray([[True, True, False, False], [True] * 4])
  ids0 = jnp.asarray([0, 2, 7, -1])
  labels = validation.nearest_frame0_labels(features, valid, ids0)
  # Row 2 of frame 0 is invalid: [1, 1.1] goes to the nearer valid one.
  np.testing.assert_array_equal(labels[1], [0, 2, 2, 0])


def test_object_iou_by_hand():
  gt = np.zeros((3, 4, 4), np.int32)
  gt[0, :2, :2] = 1
  gt[0, 2:, 2:] = 3
  gt[1:, :2, :2] = 1  # Object 3 disappears after frame 0.
  pred = gt.copy()
  pred[1, 0, :] = 1  # Frame 1: object 1 over 6 pixels, 4 true -> 4 / 6.
  pred[2, 3, 3] = 3  # Frame 2: object 3 predicted where it is absent -> 0.
  iou, present = validation.object_iou(jnp.asarray(pred), jnp.asarray(gt))
  assert np.flatnonzero(present).tolist() == [1, 3]
  np.testing.assert_allclose(iou[1], (4 / 6 + 1.0) / 2, rtol=1e-6)
  # Frame 1: both empty -> 1; frame 2: one false pixel -> 0.
  np.testing.assert_allclose(iou[3], 0.5, rtol=1e-6)


def test_transfer_iou_perfect_and_padding():
  # Two superpixels per frame (left / right halves), object 1 on the right.
  superpixels = np.zeros((1, 3, 4, 4), np.int32)
  superpixels[..., 2:] = 1
  labels = superpixels.copy()
  features = np.tile(np.eye(2)[None, None], (1, 3, 1, 1))
  valid = np.ones((1, 3, 2), bool)
  ids0 = np.array([[0, 1]])
  args = [jnp.asarray(x) for x in (features, valid, ids0, superpixels, labels)]
  total, objects = validation.transfer_iou(*args, jnp.asarray([True]))
  assert (float(total), float(objects)) == (1.0, 1.0)
  # Swapped features in later frames: every pixel of object 1 is lost.
  swapped = features.copy()
  swapped[:, 1:] = swapped[:, 1:, ::-1]
  args[0] = jnp.asarray(swapped)
  total, objects = validation.transfer_iou(*args, jnp.asarray([True]))
  assert (float(total), float(objects)) == (0.0, 1.0)
  # A padding sequence counts for nothing.
  total, objects = validation.transfer_iou(*args, jnp.asarray([False]))
  assert (float(total), float(objects)) == (0.0, 0.0)
