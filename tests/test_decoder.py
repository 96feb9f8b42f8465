"""The refinement decoder: resampling against NumPy references, the modules."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shls_jax.models import decoder as dec
from shls_jax.models import superfeatures as sf

# ------------------------------------------------- independent references


def _torch_bilinear_resize(image, out_h, out_w):
  """PyTorch F.interpolate(mode='bilinear', align_corners=False), loops."""
  in_h, in_w = image.shape[:2]
  out = np.zeros((out_h, out_w) + image.shape[2:])
  for i in range(out_h):
    sy = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
    y0 = int(sy)
    y1 = min(y0 + 1, in_h - 1)
    ly = sy - y0
    for j in range(out_w):
      sx = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
      x0 = int(sx)
      x1 = min(x0 + 1, in_w - 1)
      lx = sx - x0
      out[i, j] = (
          (1 - ly) * (1 - lx) * image[y0, x0]
          + (1 - ly) * lx * image[y0, x1]
          + ly * (1 - lx) * image[y1, x0]
          + ly * lx * image[y1, x1]
      )
  return out


def _torch_nearest_resize(image, out_h, out_w):
  in_h, in_w = image.shape[:2]
  ys = [min(int(math.floor(i * in_h / out_h)), in_h - 1) for i in range(out_h)]
  xs = [min(int(math.floor(j * in_w / out_w)), in_w - 1) for j in range(out_w)]
  return image[np.ix_(ys, xs)]


def _torchvision_roi_align(features, box, out_h, out_w, scale):
  """roi_align(aligned=False, sampling_ratio=-1) for one box, loops.

  `box` is (y0, x0, y1, x1); torchvision takes (x1, y1, x2, y2).
  """
  h, w, c = features.shape
  y_start, x_start = box[0] * scale, box[1] * scale
  roi_h = max(box[2] * scale - y_start, 1.0)
  roi_w = max(box[3] * scale - x_start, 1.0)
  bin_h, bin_w = roi_h / out_h, roi_w / out_w
  grid_h, grid_w = math.ceil(roi_h / out_h), math.ceil(roi_w / out_w)

  def bilinear(y, x):
    if y < -1.0 or y > h or x < -1.0 or x > w:
      return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
      y_high = y_low = h - 1
      y = float(y_low)
    else:
      y_high = y_low + 1
    if x_low >= w - 1:
      x_high = x_low = w - 1
      x = float(x_low)
    else:
      x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * features[y_low, x_low]
        + hy * lx * features[y_low, x_high]
        + ly * hx * features[y_high, x_low]
        + ly * lx * features[y_high, x_high]
    )

  out = np.zeros((out_h, out_w, c))
  for ph in range(out_h):
    for pw in range(out_w):
      acc = np.zeros(c)
      for iy in range(grid_h):
        y = y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          x = x_start + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          acc += bilinear(y, x)
      out[ph, pw] = acc / (grid_h * grid_w)
  return out


# ------------------------------------------------------------- resampling

BOXES = [
    (0, 0, 24, 40),  # The whole frame.
    (3, 5, 17, 30),  # Inside.
    (10, 31, 24, 40),  # Touching the bottom-right corner.
    (7, 8, 9, 11),  # Tiny: 2 x 3 pixels.
    (0, 20, 1, 21),  # One pixel.
]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("size", [(8, 12), (16, 16), (30, 44)])
def test_crop_resize_matches_pytorch_crop_then_interpolate(box, size):
  rng = np.random.default_rng(sum(box))
  image = rng.normal(size=(24, 40, 3)).astype(np.float32)
  y0, x0, y1, x1 = box
  got = dec.crop_resize(jnp.asarray(image), jnp.asarray(box), size)
  want = _torch_bilinear_resize(image[y0:y1, x0:x1], *size)
  np.testing.assert_allclose(got, want, atol=1e-5)
  labels = rng.integers(0, 5, size=(24, 40, 1)).astype(np.float32)
  got = dec.crop_resize(jnp.asarray(labels), jnp.asarray(box), size, True)
  want = _torch_nearest_resize(labels[y0:y1, x0:x1], *size)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "box",
    [
        (0, 0, 48, 80),
        (4, 6, 40, 70),
        (13, 27, 19, 33),  # Smaller than one output bin per pixel.
        (40, 70, 48, 80),
        (0, 0, 2, 2),
        (30, 2, 48, 79),  # Several adaptive samples per bin.
    ],
)
def test_roi_align_matches_torchvision_semantics(box):
  rng = np.random.default_rng(box[0] + 7 * box[1])
  features = rng.normal(size=(12, 20, 5)).astype(np.float32)
  got = dec.roi_align(
      jnp.asarray(features), jnp.asarray(box), (4, 6), 0.25, (48, 80)
  )
  want = _torchvision_roi_align(features, box, 4, 6, 0.25)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_roi_align_with_many_samples_per_bin():
  # A full 480p frame's F4 (120 x 214) into 8 x 8 bins: 15 x 27 samples each.
  rng = np.random.default_rng(0)
  features = rng.normal(size=(120, 214, 2)).astype(np.float32)
  box = (0, 0, 480, 854)
  got = dec.roi_align(
      jnp.asarray(features), jnp.asarray(box), (8, 8), 0.25, (480, 854)
  )
  want = _torchvision_roi_align(features, box, 8, 8, 0.25)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_paste_inverts_a_native_size_crop():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(20, 30, 2)).astype(np.float32)
  box = jnp.asarray([4, 7, 15, 26])
  crop = dec.crop_resize(jnp.asarray(image), box, (11, 19))
  pasted, inside = dec.paste(crop, box, (20, 30))
  want_inside = np.zeros((20, 30), bool)
  want_inside[4:15, 7:26] = True
  np.testing.assert_array_equal(inside, want_inside)
  np.testing.assert_allclose(pasted[want_inside], image[want_inside], atol=1e-6)
  assert not np.asarray(pasted)[~want_inside].any()


def test_paste_of_a_resized_crop_is_the_pytorch_resize_back():
  crop = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)
  box = (2, 3, 10, 15)
  pasted, _ = dec.paste(jnp.asarray(crop), jnp.asarray(box), (12, 20))
  want = _torch_bilinear_resize(crop, 8, 12)
  np.testing.assert_allclose(pasted[2:10, 3:15], want, atol=1e-5)


def test_aggregate_by_hand():
  # Two objects at one pixel: p1 = 0.8 (logits 0, log 4), p2 = 0.5; the
  # second object's box does not cover the second pixel; a third object is
  # padding.
  logits = np.zeros((3, 1, 2, 2), np.float32)
  logits[0, ..., 1] = np.log(4.0)
  inside = np.array([[[True, True]], [[True, False]], [[True, True]]])
  valid = np.array([True, True, False])
  out = np.asarray(dec.aggregate(logits, inside, valid))
  q = 1 / (1 + np.exp(-out))  # Back to probabilities.
  np.testing.assert_allclose(q[:, 0, 0], [0.2 * 0.5, 0.8, 0.5, 1e-7], atol=1e-6)
  np.testing.assert_allclose(q[:, 0, 1], [0.2, 0.8, 1e-7, 1e-7], atol=1e-6)
  assert np.argmax(out[:, 0, 0]) == 1


# ---------------------------------------------------------------- modules

CROP = (32, 48)


def _decoder_inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  hc, wc = CROP

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return dict(
      mask0=jnp.asarray(rng.random((batch, hc, wc, 1)) > 0.5, jnp.float32),
      prev_pred=jnp.asarray(rng.random((batch, hc, wc, 1)), jnp.float32),
      f1=normal(batch, 3, hc, wc, dec.F1_CHANNELS),
      maps=normal(batch, 2, hc, wc, dec.NUM_MAPS),
      f4=normal(batch, 3, hc // 4, wc // 4, dec.F4_CHANNELS),
  )


@pytest.fixture(scope="module")
def decoder_variables():
  return dec.Decoder().init(jax.random.key(0), **_decoder_inputs(), train=False)


def test_decoder_output_and_modes(decoder_variables):
  model = dec.Decoder()
  inputs = _decoder_inputs(seed=1)
  logits = jax.jit(lambda v, x: model.apply(v, **x, train=False))(
      decoder_variables, inputs
  )
  assert logits.shape == (2,) + CROP + (2,)
  assert np.isfinite(np.asarray(logits)).all()
  train_logits, mutated = model.apply(
      decoder_variables, **inputs, train=True, mutable=["batch_stats"]
  )
  assert not np.allclose(train_logits, logits)
  old = decoder_variables["batch_stats"]["segmenter"]["res_L4"]["conv1_1"]
  new = mutated["batch_stats"]["segmenter"]["res_L4"]["conv1_1"]
  assert not np.allclose(old["mean"], new["mean"])
  # Objects are independent in evaluation mode.
  one = model.apply(
      decoder_variables,
      **jax.tree.map(lambda x: x[1:], inputs),
      train=False,
  )
  np.testing.assert_allclose(one[0], logits[1], atol=1e-4)


def test_decoder_parameters_map_onto_the_authors_checkpoint(
    decoder_variables,
):
  params = flax.traverse_util.flatten_dict(decoder_variables["params"])
  shapes = {"/".join(k): v.shape for k, v in params.items()}
  # SPEC 11, one entry per PyTorch tensor kind (OIHW there, HWIO here).
  assert shapes["mem_select/convL2/kernel"] == (3, 3, 67, 32)
  assert shapes["mem_select/convAM/kernel"] == (3, 3, 4, 32)
  assert shapes["mem_select/gate/kernel"] == (3, 3, 32, 259)
  assert shapes["segmenter/layer2_0/left_0/kernel"] == (3, 3, 69, 128)
  assert shapes["segmenter/layer2_0/shortcut_0/kernel"] == (1, 1, 69, 128)
  assert "segmenter/layer2_1/shortcut_0/kernel" not in shapes
  assert shapes["segmenter/convFM/kernel"] == (3, 3, 777, 256)
  assert shapes["segmenter/res_L4/conv1_0/bias"] == (256,)
  assert shapes["segmenter/res_L4/conv2_1/scale"] == (256,)
  assert shapes["segmenter/RF2/convFS/kernel"] == (3, 3, 128, 256)
  assert shapes["segmenter/RF1/convFS/kernel"] == (3, 3, 73, 256)
  assert shapes["segmenter/RF1/ResMM/conv2_0/kernel"] == (3, 3, 256, 256)
  assert shapes["segmenter/pred/kernel"] == (3, 3, 256, 2)
  # Hand count (see the module table): 95,363 in mem_select, 8,696,578 in
  # the segmenter.
  assert sum(v.size for v in params.values()) == 8_791_941


def test_whole_model_has_the_authors_244_tensors(decoder_variables):
  net = sf.SuperfeatureNet()
  variables = net.init(
      jax.random.key(0),
      jnp.zeros((1, 32, 32, 3)),
      jnp.zeros((1, 32, 32), jnp.int32),
      jnp.ones((1, 8), bool),
      train=False,
  )

  def torch_tensors(v):
    params = flax.traverse_util.flatten_dict(v["params"])
    stats = flax.traverse_util.flatten_dict(v["batch_stats"])
    # PyTorch keeps num_batches_tracked next to every BatchNorm's statistics.
    batch_norms = {k[:-1] for k in stats}
    return len(params) + len(stats) + len(batch_norms), sum(
        x.size for x in params.values()
    )

  n_sf, p_sf = torch_tensors(variables)
  n_dec, p_dec = torch_tensors(decoder_variables)
  assert n_sf + n_dec == 244
  assert round((p_sf + p_dec) / 1e6, 2) == 13.95


def test_crop_inputs_shapes_and_values():
  rng = np.random.default_rng(3)
  h, w = 48, 64
  boxes = jnp.asarray([[0, 0, 48, 64], [8, 8, 40, 56], [4, 12, 36, 60]])
  mask0 = jnp.asarray(rng.random((h, w)) > 0.5)
  f1 = jnp.asarray(rng.normal(size=(3, h, w, 67)), jnp.float32)
  f4 = jnp.asarray(rng.normal(size=(3, h // 4, w // 4, 259)), jnp.float32)
  maps = jnp.asarray(rng.normal(size=(2, h, w, 4)), jnp.float32)
  crops = jax.jit(dec.crop_inputs, static_argnums=6)(
      boxes, mask0, mask0.astype(jnp.float32), f1, maps, f4, CROP
  )
  assert crops["f1"].shape == (3,) + CROP + (67,)
  assert crops["f4"].shape == (3, CROP[0] // 4, CROP[1] // 4, 259)
  assert crops["maps"].shape == (2,) + CROP + (4,)
  # The current frame's F1 comes from the current box.
  want = _torch_bilinear_resize(np.asarray(f1[2, 4:36, 12:60]), *CROP)
  np.testing.assert_allclose(crops["f1"][2], want, atol=1e-4)
  want = _torch_nearest_resize(np.asarray(mask0)[..., None], *CROP)
  np.testing.assert_array_equal(crops["mask0"], want)


def test_crop_size_must_divide_by_four():
  inputs = _decoder_inputs()
  inputs = {
      k: v[..., :30, :, :] if k in ("mask0", "prev_pred") else v
      for k, v in inputs.items()
  }
  with pytest.raises(ValueError, match="multiples of 4"):
    dec.Decoder().init(jax.random.key(0), **inputs, train=False)


def test_masked_rows_never_reach_the_batch_statistics():
  model = dec.Decoder(features=8, skip_features=8, gate_features=4)
  rng = np.random.default_rng(0)
  crop = (16, 16)

  def inputs(b):
    return dict(
        mask0=jnp.asarray(rng.random((b,) + crop + (1,)), jnp.float32),
        prev_pred=jnp.asarray(rng.random((b,) + crop + (1,)), jnp.float32),
        f1=jnp.asarray(rng.normal(size=(b, 3) + crop + (11,)), jnp.float32),
        maps=jnp.asarray(rng.normal(size=(b, 2) + crop + (4,)), jnp.float32),
        f4=jnp.asarray(rng.normal(size=(b, 3, 4, 4, 19)), jnp.float32),
    )

  real = inputs(3)
  garbage = jax.tree.map(lambda x: 100.0 * x, inputs(2))
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), real, garbage)
  variables = model.init(jax.random.key(0), **real, train=False)
  out, stats = model.apply(
      variables, **real, train=True, mutable=["batch_stats"]
  )
  out_masked, stats_masked = model.apply(
      variables,
      **both,
      train=True,
      mask=jnp.arange(5) < 3,
      mutable=["batch_stats"],
  )
  np.testing.assert_allclose(out_masked[:3], out, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_masked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Without the mask the garbage rows do change them.
  _, stats_all = model.apply(
      variables, **both, train=True, mutable=["batch_stats"]
  )
  assert any(
      not np.allclose(a, b, rtol=1e-3)
      for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_all))
  )
