"""The per-frame step's memory half: painting, outlier filter, maps, boxes."""

import jax
import jax.numpy as jnp
import numpy as np

from shls_jax import memory
from shls_jax import tracker

N, D, C = 20, 4, 4  # Superpixel slots, feature size, class slots.


def _scene():
  """16 x 16 frame of 4 x 4 block superpixels (ids 0..15, row-major).

  Object 1: block (0, 0); object 2: blocks (2..3, 2..3); the rest is
  background. Class slot 3 is unused.
  """
  superpixels = (np.arange(16) // 4)[:, None] * 4 + (np.arange(16) // 4)
  block_class = np.zeros(16, int)
  block_class[0] = 1
  block_class[[10, 11, 14, 15]] = 2
  labels = block_class[superpixels]
  return superpixels.astype(np.int32), labels.astype(np.int32), block_class


def _features(block_class, rng):
  features = rng.normal(size=(N, D)).astype(np.float32) * 50  # Padding.
  features[:16] = np.eye(D, dtype=np.float32)[block_class]
  return features


def test_predict_paints_filters_and_boxes():
  rng = np.random.default_rng(0)
  superpixels, labels, block_class = _scene()
  valid = np.arange(N) < 16
  ids = np.where(valid, np.pad(block_class, (0, N - 16)), -1)
  state = memory.fit(
      jnp.asarray(_features(block_class, rng)),
      jnp.asarray(valid),
      jnp.asarray(ids),
      3,
      first_labels=jnp.asarray(labels),
      max_classes=C,
      capacity=64,
  )
  # The next frame looks the same, except that block 12 (bottom-left, far
  # from object 1) now looks like object 1: a component of object 1 that does
  # not overlap its previous mask.
  later = block_class.copy()
  later[12] = 1
  out = jax.jit(tracker.predict)(
      state,
      jnp.asarray(_features(later, rng)),
      jnp.asarray(valid),
      jnp.asarray(superpixels),
      jnp.asarray(labels),
  )
  np.testing.assert_array_equal(out["labels"][:16], later)
  want = labels.copy()
  want[superpixels == 12] = memory.UNLABELLED
  np.testing.assert_array_equal(out["coarse"], want)

  # One-hot features: a superpixel's neighbours of its own class have
  # similarity 1, all others 0. kNN score of the own class: (1 + 0.5) / 1.5
  # = 1 with two own entries in memory, 1 / 1.5 for object 1 (one entry);
  # 0 for any other class. Centroid score: 1 for the own class, 0 otherwise.
  maps = np.asarray(out["maps"])
  assert maps.shape == (C - 1, 16, 16, 4)
  own_knn = np.array([1.0, 2.0 / 3.0, 1.0])[later[superpixels]]
  pixel_class = later[superpixels]
  for obj in (1, 2):
    own = pixel_class == obj
    want = np.stack(
        [
            np.where(own, own_knn, 0.0),
            np.where(own, 0.0, own_knn),
            own.astype(float),
            (~own).astype(float),
        ],
        -1,
    )
    np.testing.assert_allclose(maps[obj - 1], want, atol=1e-6)
  # The unused class slot scores as invalid everywhere.
  assert (maps[2][..., 0] == memory.INVALID_SCORE).all()

  # Test boxes (r = 0.3, edges rounded outwards): object 1's tight box
  # [0, 0, 4, 4] grows by 0.6 px a side -> [0, 0, 5, 5]; object 2's
  # [8, 8, 16, 16] by 1.2 px -> [6, 6, 16, 16] (clipped).
  np.testing.assert_array_equal(out["boxes"][0], [0, 0, 5, 5])
  np.testing.assert_array_equal(out["boxes"][1], [6, 6, 16, 16])


def test_paint_is_a_gather_by_id():
  values = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  ids = jnp.asarray([[2, 0], [1, 1]])
  np.testing.assert_array_equal(
      tracker.paint(values, ids),
      [[[5.0, 6.0], [1.0, 2.0]], [[3.0, 4.0], [3.0, 4.0]]],
  )
