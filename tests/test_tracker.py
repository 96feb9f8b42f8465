"""The per-frame step's memory half: painting, outlier filter, maps, boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shls_jax import memory
from shls_jax import tracker
from shls_jax.models import decoder as decoder_lib
from shls_jax.models import superfeatures as sf_lib

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


def test_refine_is_the_decoder_per_object_pasted_and_aggregated():
  rng = np.random.default_rng(1)
  h, w, k, crop = 24, 32, 3, (8, 12)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  boxes = jnp.asarray([
      [[0, 0, 24, 32], [2, 4, 20, 28], [4, 8, 16, 24]],
      [[8, 0, 24, 16], [6, 0, 24, 20], [10, 2, 22, 18]],
      [[0, 0, 24, 32]] * 3,  # Padding object.
  ])
  mask0 = jnp.asarray(rng.random((k, h, w)) > 0.5, jnp.float32)
  prev_pred = jnp.asarray(rng.random((k, h, w)), jnp.float32)
  f1 = normal(3, h, w, 67)
  f4 = normal(3, h // 4, w // 4, 259)
  maps = normal(2, k, h, w, 4)
  valid = jnp.asarray([True, True, False])
  model = decoder_lib.Decoder()
  first = decoder_lib.crop_inputs(
      boxes[0], mask0[0], prev_pred[0], f1, maps[:, 0], f4, crop
  )
  variables = model.init(
      jax.random.key(0),
      **jax.tree.map(lambda x: x[None], first),
      train=False,
  )
  logits, stats = jax.jit(
      lambda v: tracker.refine(
          model,
          v,
          boxes=boxes,
          mask0=mask0,
          prev_pred=prev_pred,
          f1=f1,
          f4=f4,
          maps=maps,
          object_valid=valid,
          crop_size=crop,
      )
  )(variables)
  assert logits.shape == (k + 1, h, w) and stats is None

  # The same by hand, one object at a time.
  probs = []
  for o in range(2):
    crops = decoder_lib.crop_inputs(
        boxes[o], mask0[o], prev_pred[o], f1, maps[:, o], f4, crop
    )
    out = model.apply(
        variables, **jax.tree.map(lambda x: x[None], crops), train=False
    )[0]
    pasted, inside = decoder_lib.paste(out, boxes[o, 2], (h, w))
    p = np.asarray(jax.nn.softmax(pasted, -1)[..., 1])
    probs.append(np.where(np.asarray(inside), p, 0.0))
  q = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  np.testing.assert_allclose(q[1], np.clip(probs[0], 1e-7, 1), atol=1e-5)
  np.testing.assert_allclose(q[2], np.clip(probs[1], 1e-7, 1), atol=1e-5)
  np.testing.assert_allclose(q[3], 1e-7, rtol=1e-3)  # Padding.
  background = np.clip((1 - probs[0]) * (1 - probs[1]), 1e-7, 1 - 1e-7)
  np.testing.assert_allclose(q[0], background, atol=1e-5)
  # Outside every box only the background remains.
  assert np.argmax(np.asarray(logits)[:, 0, 0]) == 0


# ------------------------------------------------------------ whole videos


def _video(num_frames, size=32):
  """A square (object 1) and a bar (object 2) moving over a gradient."""
  yy, xx = np.mgrid[:size, :size]
  frames, masks = [], []
  for t in range(num_frames):
    mask = np.zeros((size, size), np.int32)
    mask[4 + t : 14 + t, 6 + 2 * t : 16 + 2 * t] = 1
    mask[20:26, 2 + t : 28] = 2
    image = np.stack([xx / size, yy / size, 0.5 * np.ones_like(xx)], -1)
    image[mask == 1] = (0.9, 0.1, 0.1)
    image[mask == 2] = (0.1, 0.8, 0.2)
    frames.append(image.astype(np.float32))
    masks.append(mask)
  superpixels = (yy // 4) * (size // 4) + xx // 4
  return (
      np.stack(frames),
      np.broadcast_to(superpixels, (num_frames, size, size)).astype(np.int32),
      np.stack(masks),
  )


@pytest.fixture(scope="module")
def networks():
  sf_model = sf_lib.SuperfeatureNet(
      sf_channels=8,
      stem_features=8,
      stage_features=(8, 8, 16, 16),
      stage_blocks=(1, 1, 1, 1),
  )
  n = 96
  sf_variables = sf_model.init(
      jax.random.key(0),
      jnp.zeros((1, 32, 32, 3)),
      jnp.zeros((1, 32, 32), jnp.int32),
      jnp.ones((1, n), bool),
      train=False,
  )
  decoder = decoder_lib.Decoder()
  crop = (16, 16)
  k = 3
  decoder_variables = decoder.init(
      jax.random.key(1),
      mask0=jnp.zeros((k,) + crop + (1,)),
      prev_pred=jnp.zeros((k,) + crop + (1,)),
      f1=jnp.zeros((k, 3) + crop + (8 + 3,)),
      maps=jnp.zeros((k, 2) + crop + (4,)),
      f4=jnp.zeros((k, 3, 4, 4, 16 + 3)),
      train=False,
  )
  return {
      "sf_model": sf_model,
      "sf_variables": sf_variables,
      "decoder": decoder,
      "decoder_variables": decoder_variables,
  }


SETTINGS = tracker.Settings(
    max_objects=3, num_segments=96, capacity=256, crop_size=(16, 16)
)


def _track(networks, frames, superpixels, first_mask, frame_valid):
  fn = jax.jit(
      lambda f, s, m, v: tracker.track(
          networks, f, s, jnp.full(f.shape[0], 64), m, 2, v, SETTINGS
      )
  )
  return np.asarray(fn(frames, superpixels, first_mask, frame_valid))


def test_track_a_video_and_its_time_padding(networks):
  frames, superpixels, masks = _video(4)
  out = _track(networks, frames, superpixels, masks[0], np.ones(4, bool))
  assert out.shape == (4, 32, 32)
  np.testing.assert_array_equal(out[0], masks[0])
  assert set(np.unique(out)) <= {0, 1, 2}  # Slot 3 is padding.
  # The same video padded to 6 frames: the same masks, zeros on padding.
  pad = lambda x: np.concatenate([x, np.zeros_like(x[:2])])
  padded = _track(
      networks,
      pad(frames),
      pad(superpixels),
      masks[0],
      np.arange(6) < 4,
  )
  np.testing.assert_array_equal(padded[:4], out)
  assert not padded[4:].any()


def test_step_carry_has_fixed_shapes(networks):
  frames, superpixels, masks = _video(2)
  carry, _ = tracker.start(
      networks["sf_model"],
      networks["sf_variables"],
      jnp.asarray(frames[0]),
      jnp.asarray(superpixels[0]),
      64,
      jnp.asarray(masks[0]),
      2,
      SETTINGS,
  )
  # Frame 0 split at the mask borders: each object is whole superpixels
  # plus border pieces, all in memory.
  assert int(carry.memory.count.sum()) > 64
  np.testing.assert_array_equal(carry.object_valid, [True, True, False])
  new, mask = tracker.step(
      carry,
      {
          "frame": jnp.asarray(frames[1]),
          "superpixels": jnp.asarray(superpixels[1]),
          "num_superpixels": 64,
          "frame_valid": True,
      },
      sf_model=networks["sf_model"],
      sf_variables=networks["sf_variables"],
      decoder=networks["decoder"],
      decoder_variables=networks["decoder_variables"],
      settings=SETTINGS,
  )
  assert mask.shape == (32, 32)
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), c)
  assert shapes(new) == shapes(carry)
