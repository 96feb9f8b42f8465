"""Tests of the backbone and the superfeatures (SPEC 3)."""

import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from shls_jax.models import backbone
from shls_jax.models import superfeatures as sf

BATCH, HEIGHT, WIDTH, N_MAX = 2, 32, 48, 20
# Tiny widths for the tests that only need the structure (compile time).
SMALL = {"stem_features": 8, "stage_features": (8, 16, 16, 16)}


# ---------------------------------------------------------------- references


def np_floor_downsample(ids, out_h, out_w):
  h, w = ids.shape
  out = np.zeros((out_h, out_w), ids.dtype)
  for i in range(out_h):
    for j in range(out_w):
      out[i, j] = ids[
          int(np.floor(i * h / out_h)), int(np.floor(j * w / out_w))
      ]
  return out


def np_geometry(ids):
  h, w = ids.shape
  out = np.zeros((h, w, 3))
  for n in np.unique(ids):
    where = ids == n
    rows, cols = np.nonzero(where)
    out[where, 0] = where.sum() / (h * w)
    out[where, 1] = np.mean(rows / (h - 1))
    out[where, 2] = np.mean(cols / (w - 1))
  return out


def np_pool(features, ids, num):
  out = np.zeros((num, features.shape[-1]))
  for n in range(num):
    where = ids == n
    if where.any():
      out[n] = features[where].mean(0)
  return out


def np_torch_bilinear(x, out_h, out_w):
  """PyTorch's upsample_bilinear2d, align_corners=False, on [h, w, c]."""

  def axis_weights(size_in, size_out):
    weights = np.zeros((size_out, size_in))
    for dst in range(size_out):
      src = max((dst + 0.5) * size_in / size_out - 0.5, 0.0)
      i0 = int(np.floor(src))
      i1 = min(i0 + 1, size_in - 1)
      frac = src - i0
      weights[dst, i0] += 1 - frac
      weights[dst, i1] += frac
    return weights

  rows = axis_weights(x.shape[0], out_h)
  cols = axis_weights(x.shape[1], out_w)
  return np.einsum("ih,jw,hwc->ijc", rows, cols, x)


# ------------------------------------------------------------------ fixtures


def make_inputs():
  """Two frames of superpixels with the interesting cases.

  Frame 0: a 4 x 4 grid of 8 x 12 blocks (ids 0..15), a one-pixel superpixel
  16 at (1, 1) that the stride-4 floor sampling misses and a one-pixel
  superpixel 17 at (4, 4) that it keeps; rows 18, 19 are padding.
  Frame 1: random ids 0..13; row 15 is marked valid but has no pixel.
  """
  rng = np.random.default_rng(0)
  frame0 = (np.arange(HEIGHT)[:, None] // 8) * 4 + np.arange(WIDTH)[None] // 12
  frame0[1, 1] = 16
  frame0[4, 4] = 17
  frame1 = rng.integers(0, 14, (HEIGHT, WIDTH))
  superpixels = np.stack([frame0, frame1]).astype(np.int32)
  valid = np.zeros((BATCH, N_MAX), bool)
  valid[0, :18] = True
  valid[1, :14] = True
  valid[1, 15] = True
  frames = rng.normal(size=(BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
  return frames, superpixels, valid


def with_fusion(variables, kernel, bias):
  """Variables with the fusion conv set (random init may give all zeros)."""
  params = flax.core.unfreeze(variables["params"])
  params["sf_conv_1x1_0"]["kernel"] = jnp.array(kernel).reshape(1, 1, 2, 1)
  params["sf_conv_1x1_0"]["bias"] = jnp.array([bias])
  return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.fixture(scope="module")
def full_model():
  """The default network, one training-mode call with intermediates."""
  frames, superpixels, valid = make_inputs()
  model = sf.SuperfeatureNet()
  variables = model.init(
      jax.random.key(0), frames, superpixels, valid, train=False
  )
  # Known fusion weights, so that the formula test does not depend on init.
  variables = with_fusion(variables, (0.7, -0.4), 0.1)
  outputs, state = model.apply(
      variables,
      frames,
      superpixels,
      valid,
      train=True,
      capture_intermediates=True,
      mutable=["batch_stats", "intermediates"],
  )
  return {
      "frames": frames,
      "superpixels": superpixels,
      "valid": valid,
      "variables": variables,
      "outputs": jax.tree.map(np.asarray, outputs),
      "inter": jax.tree.map(np.asarray, state["intermediates"]),
      "batch_stats": state["batch_stats"],
  }


# ------------------------------------------------------------------ backbone


def test_normalize():
  frames = np.array([[[[0, 128, 255]]]], np.uint8)
  mean, std = (0.4532, 0.4335, 0.3921), (0.3025, 0.2918, 0.3122)
  got = backbone.normalize(frames, mean, std)
  want = (np.array([0, 128, 255]) / 255.0 - mean) / std
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-6)


def test_backbone_shapes_and_structure():
  net = backbone.Backbone()
  frames = jnp.zeros((BATCH, HEIGHT, WIDTH, 3))
  variables = jax.eval_shape(
      lambda: net.init(jax.random.key(0), frames, train=False)
  )
  f2, f4 = jax.eval_shape(
      lambda v: net.apply(v, frames, train=False), variables
  )
  assert f2.shape == (BATCH, HEIGHT // 2, WIDTH // 2, 64)
  assert f4.shape == (BATCH, HEIGHT // 4, WIDTH // 4, 256)
  assert net.strides == (2, 4)
  params = variables["params"]
  assert params["conv1_0"]["kernel"].shape == (7, 7, 3, 64)
  assert "bias" not in params["conv1_0"]
  with_shortcut = sorted(k for k in params if "shortcut_0" in params[k])
  assert with_shortcut == ["layer2_0", "layer3_0"]
  assert params["layer2_0"]["shortcut_0"]["kernel"].shape == (1, 1, 64, 128)
  assert params["layer3_0"]["shortcut_0"]["kernel"].shape == (1, 1, 128, 256)
  assert params["layer4_1"]["left_3"]["kernel"].shape == (3, 3, 256, 256)
  assert sum(x.size for x in jax.tree.leaves(params)) == 5_144_128


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
  )


@pytest.mark.parametrize(
    "layer_input,path,pad",
    [
        ("frames", ("conv1_0",), 3),
        ("layer1_1", ("layer2_0", "left_0"), 1),
    ],
)
def test_stride2_convs_pad_symmetrically(full_model, layer_input, path, pad):
  extractor = full_model["inter"]["feat_extractor"]
  if layer_input == "frames":
    x = full_model["frames"]
  else:
    x = extractor[layer_input]["__call__"][0]
  kernel = full_model["variables"]["params"]["feat_extractor"]
  for name in path:
    kernel = kernel[name]
  kernel = kernel["kernel"]
  got = extractor
  for name in path:
    got = got[name]
  got = got["__call__"][0]
  symmetric = _conv(x, kernel, 2, ((pad, pad), (pad, pad)))
  same = _conv(x, kernel, 2, "SAME")
  assert got.shape == symmetric.shape == same.shape
  np.testing.assert_allclose(got, symmetric, atol=1e-4, rtol=1e-4)
  assert np.max(np.abs(np.asarray(same) - got)) > 1e-2


# ------------------------------------------------------------ map functions


@pytest.mark.parametrize(
    "in_hw,out_hw", [((32, 48), (8, 12)), ((10, 7), (3, 4))]
)
def test_floor_downsample(in_hw, out_hw):
  ids = np.random.default_rng(1).integers(0, 1000, in_hw).astype(np.int32)
  got = sf.floor_downsample(jnp.asarray(ids)[None], *out_hw)
  np.testing.assert_array_equal(got[0], np_floor_downsample(ids, *out_hw))
  # The floor rule, not half-pixel nearest (which would start at row 1).
  if in_hw == (32, 48):
    np.testing.assert_array_equal(got[0, 1], ids[4, ::4])


@pytest.mark.parametrize(
    "in_hw,out_hw", [((16, 24), (32, 48)), ((5, 7), (12, 9))]
)
def test_upsample_bilinear_matches_torch_convention(in_hw, out_hw):
  x = np.random.default_rng(2).normal(size=in_hw + (3,)).astype(np.float32)
  got = sf.upsample_bilinear(jnp.asarray(x)[None], *out_hw)[0]
  np.testing.assert_allclose(got, np_torch_bilinear(x, *out_hw), atol=1e-5)


def test_geometry_channels():
  _, superpixels, _ = make_inputs()
  got = sf.geometry_channels(jnp.asarray(superpixels), N_MAX)
  assert got.shape == (BATCH, HEIGHT, WIDTH, 3)
  for b in range(BATCH):
    np.testing.assert_allclose(got[b], np_geometry(superpixels[b]), atol=1e-6)
  # The one-pixel superpixel at (1, 1): size 1 / area, centre at its pixel.
  np.testing.assert_allclose(
      got[0, 1, 1],
      [1 / (HEIGHT * WIDTH), 1 / (HEIGHT - 1), 1 / (WIDTH - 1)],
      rtol=1e-6,
  )


def test_segment_mean():
  _, superpixels, _ = make_inputs()
  features = np.random.default_rng(3).normal(size=(BATCH, HEIGHT, WIDTH, 5))
  features = features.astype(np.float32)
  means, counts = sf.segment_mean(
      jnp.asarray(features), jnp.asarray(superpixels), N_MAX
  )
  assert means.shape == (BATCH, N_MAX, 5)
  for b in range(BATCH):
    np.testing.assert_allclose(
        means[b], np_pool(features[b], superpixels[b], N_MAX), atol=1e-5
    )
    np.testing.assert_array_equal(
        counts[b], np.bincount(superpixels[b].ravel(), minlength=N_MAX)
    )
  np.testing.assert_array_equal(means[0, 18:], 0.0)
  np.testing.assert_array_equal(means[1, 14:], 0.0)


# ------------------------------------------------------ the full network


def test_network_outputs(full_model):
  out = full_model["outputs"]
  superpixels, valid = full_model["superpixels"], full_model["valid"]
  assert out["superfeatures"].shape == (BATCH, N_MAX, 32)
  assert out["f1"].shape == (BATCH, HEIGHT, WIDTH, 67)
  assert out["f4"].shape == (BATCH, HEIGHT // 4, WIDTH // 4, 259)
  assert out["superpixels4"].shape == (BATCH, HEIGHT // 4, WIDTH // 4)
  assert out["valid4"].dtype == bool
  for b in range(BATCH):
    np.testing.assert_array_equal(
        out["superpixels4"][b], np_floor_downsample(superpixels[b], 8, 12)
    )
    np.testing.assert_allclose(
        out["f1"][b, ..., 64:], np_geometry(superpixels[b]), atol=1e-6
    )
    np.testing.assert_allclose(
        out["f4"][b, ..., 256:],
        np_geometry(out["superpixels4"][b]),
        atol=1e-6,
    )
  # f1 is f2 upsampled (f2 = layer1's output).
  f2 = full_model["inter"]["feat_extractor"]["layer1_1"]["__call__"][0]
  np.testing.assert_allclose(
      out["f1"][0, ..., :64],
      np_torch_bilinear(f2[0], HEIGHT, WIDTH),
      atol=1e-4,
  )
  # valid4: superpixel 16 vanished at stride 4, 17 survived; frame 1's row 15
  # has no pixel at all.
  want_valid4 = valid.copy()
  want_valid4[0, 16] = False
  want_valid4[1, 15] = False
  np.testing.assert_array_equal(out["valid4"], want_valid4)


def test_pooling_at_both_resolutions(full_model):
  out, inter = full_model["outputs"], full_model["inter"]
  params = full_model["variables"]["params"]
  superpixels = full_model["superpixels"]
  # Dense is affine, so its output shows the pooled means it received.
  for head, features, ids in [
      ("sf_head_L1", out["f1"], superpixels),
      ("sf_head_L4", out["f4"], out["superpixels4"]),
  ]:
    dense = params[f"{head}_0"]
    got = inter[f"{head}_0"]["__call__"][0]
    for b in range(BATCH):
      pooled = np_pool(features[b], ids[b], N_MAX)
      want = pooled @ dense["kernel"] + dense["bias"]
      np.testing.assert_allclose(got[b], want, atol=2e-4, rtol=1e-4)
  # The head is not applied to empty rows: the BN output is zero there.
  bn4 = inter["sf_head_L4_1"]["__call__"][0]
  np.testing.assert_array_equal(bn4[0, 16], 0.0)
  assert np.abs(bn4[0, 17]).max() > 0
  for head in ("sf_head_L1_1", "sf_head_L4_1"):
    bn = inter[head]["__call__"][0]
    np.testing.assert_array_equal(bn[0, 18:], 0.0)
    np.testing.assert_array_equal(bn[1, 14:], 0.0)


def test_fusion_and_masking(full_model):
  out, inter = full_model["outputs"], full_model["inter"]
  valid = full_model["valid"]
  a = np.maximum(inter["sf_head_L1_1"]["__call__"][0], 0)
  b = np.maximum(inter["sf_head_L4_1"]["__call__"][0], 0)
  want = np.maximum(0.7 * a - 0.4 * b + 0.1, 0)
  has_pixel = valid.copy()
  has_pixel[1, 15] = False
  want = np.where(has_pixel[..., None], want, 0)
  got = out["superfeatures"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(got >= 0)
  assert np.all(got[~has_pixel] == 0)
  # Superpixel 16 (no stride-4 pixel) still gets relu(0.7 a + 0.1) > 0.
  assert got[0, 16].max() > 0.1
  assert (got[has_pixel] > 0).mean() > 0.3


def test_parameter_count(full_model):
  params = full_model["variables"]["params"]
  assert sum(x.size for x in jax.tree.leaves(params)) == 5_154_631
  assert params["sf_head_L1_0"]["kernel"].shape == (67, 32)
  assert params["sf_head_L4_0"]["kernel"].shape == (259, 32)
  assert params["sf_head_L1_1"]["scale"].shape == (1,)


def test_train_mode_updates_running_statistics(full_model):
  old = full_model["variables"]["batch_stats"]
  new = full_model["batch_stats"]
  for head in ("sf_head_L1_1", "sf_head_L4_1"):
    assert not np.allclose(old[head]["mean"], new[head]["mean"])
  stem_old = old["feat_extractor"]["conv1_1"]["var"]
  stem_new = new["feat_extractor"]["conv1_1"]["var"]
  assert not np.allclose(stem_old, stem_new)


def test_frame_sizes_that_are_not_multiples_of_four():
  # DAVIS 480p is 854 wide: the strided convolutions give ceil(n / 4), as
  # PyTorch's do (854 -> 427 -> 214), and every map follows.
  model = sf.SuperfeatureNet(**SMALL)
  rng = np.random.default_rng(0)
  superpixels = (np.arange(30)[:, None] // 6) * 9 + np.arange(50) // 6
  out, _ = model.init_with_output(
      jax.random.key(0),
      jnp.asarray(rng.random((1, 30, 50, 3)), jnp.float32),
      jnp.asarray(superpixels[None], jnp.int32),
      jnp.ones((1, 45), bool),
      train=False,
  )
  assert out["f1"].shape == (1, 30, 50, SMALL["stage_features"][0] + 3)
  assert out["f4"].shape == (1, 8, 13, SMALL["stage_features"][-1] + 3)
  np.testing.assert_array_equal(
      out["superpixels4"][0], np_floor_downsample(superpixels, 8, 13)
  )
  assert np.isfinite(np.asarray(out["superfeatures"])).all()


def test_shape_errors():
  model = sf.SuperfeatureNet(**SMALL)
  with pytest.raises(ValueError, match="frames"):
    model.init(
        jax.random.key(0),
        jnp.zeros((1, 32, 48, 3)),
        jnp.zeros((1, 32, 44), jnp.int32),
        jnp.ones((1, 4), bool),
        train=False,
    )


def _count_equations(jaxpr):
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_equations(sub)
  return count


def test_jit_compiles_once_and_has_no_loop_over_superpixels():
  model = sf.SuperfeatureNet(**SMALL)
  frames, superpixels, valid = make_inputs()
  variables = model.init(
      jax.random.key(0), frames, superpixels, valid, train=False
  )
  variables = with_fusion(variables, (0.7, 0.4), 0.1)
  traces = []

  @jax.jit
  def run(variables, frames, superpixels, valid):
    traces.append(1)
    return model.apply(variables, frames, superpixels, valid, train=False)

  first = run(variables, frames, superpixels, valid)
  second = run(variables, frames + 1.0, superpixels[::-1], valid[::-1])
  assert len(traces) == 1
  assert first["superfeatures"].max() > 0
  assert not np.allclose(first["superfeatures"], second["superfeatures"])

  def equations(num):
    ids = np.minimum(superpixels, num - 1)
    mask = np.ones((BATCH, num), bool)
    jaxpr = jax.make_jaxpr(
        lambda v: model.apply(v, frames, ids, mask, train=False)
    )(variables)
    return _count_equations(jaxpr.jaxpr)

  # N_max only changes shapes, never the program.
  assert equations(8) == equations(64)


def test_gradients_finite():
  model = sf.SuperfeatureNet(**SMALL)
  frames, superpixels, valid = make_inputs()
  variables = model.init(
      jax.random.key(0), frames, superpixels, valid, train=False
  )

  def loss(params):
    out, _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        frames,
        superpixels,
        valid,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.sum(out["superfeatures"] ** 2) + jnp.mean(out["f4"] ** 2)

  grads = jax.grad(loss)(variables["params"])
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  for name, grad in flat.items():
    assert np.all(np.isfinite(grad)), name
  for name in (
      "feat_extractor/conv1_0/kernel",
      "sf_head_L1_0/kernel",
      "sf_head_L4_0/kernel",
      "sf_head_L1_1/scale",
      "sf_conv_1x1_0/kernel",
  ):
    assert np.abs(flat[name]).max() > 0, name


# --------------------------------------------------- one-channel BatchNorm


def _bn_inputs():
  rng = np.random.default_rng(4)
  x = rng.normal(2.0, 3.0, size=(2, 6, 32)).astype(np.float32)
  mask = np.ones((2, 6), bool)
  mask[0, 4:] = False
  mask[1, 5] = False
  # Padding rows with huge values would wreck any statistic they entered.
  x[~mask] = 1e4
  variables = {
      "params": {"scale": jnp.array([1.5]), "bias": jnp.array([-0.25])},
      "batch_stats": {"mean": jnp.array([0.3]), "var": jnp.array([2.0])},
  }
  return x, mask, variables


def test_one_channel_bn_training():
  x, mask, variables = _bn_inputs()
  y, state = sf.OneChannelBatchNorm().apply(
      variables, x, mask, train=True, mutable=["batch_stats"]
  )
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  want = (x - mean) / np.sqrt(var + 1e-5) * 1.5 - 0.25
  want[~mask] = 0
  np.testing.assert_allclose(y, want, atol=1e-5)
  rows = x[mask]
  want_mean = 0.9 * 0.3 + 0.1 * rows.mean(-1).mean()
  want_var = 0.9 * 2.0 + 0.1 * rows.var(-1, ddof=1).mean()
  np.testing.assert_allclose(state["batch_stats"]["mean"], [want_mean], 1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], [want_var], 1e-5)


def test_one_channel_bn_sequential_update_is_the_authors_loop():
  x, mask, variables = _bn_inputs()
  _, state = sf.OneChannelBatchNorm(stat_update="sequential").apply(
      variables, x, mask, train=True, mutable=["batch_stats"]
  )
  # The authors call BatchNorm1d(1) once per superpixel, frame by frame.
  mean, var = 0.3, 2.0
  for row in x[mask]:
    mean = 0.9 * mean + 0.1 * row.mean()
    var = 0.9 * var + 0.1 * row.var(ddof=1)
  np.testing.assert_allclose(state["batch_stats"]["mean"], [mean], rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], [var], rtol=1e-5)


def test_one_channel_bn_without_rows_keeps_statistics():
  x, _, variables = _bn_inputs()
  for update in ("mean", "sequential"):
    y, state = sf.OneChannelBatchNorm(stat_update=update).apply(
        variables,
        x,
        np.zeros(x.shape[:2], bool),
        train=True,
        mutable=["batch_stats"],
    )
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_allclose(state["batch_stats"]["mean"], [0.3])
    np.testing.assert_allclose(state["batch_stats"]["var"], [2.0])


def test_one_channel_bn_evaluation():
  x, mask, variables = _bn_inputs()
  y = sf.OneChannelBatchNorm().apply(variables, x, mask, train=False)
  want = (x - 0.3) / np.sqrt(2.0 + 1e-5) * 1.5 - 0.25
  want[~mask] = 0
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_one_channel_bn_init_does_not_update():
  x, mask, _ = _bn_inputs()
  variables = sf.OneChannelBatchNorm().init(
      jax.random.key(0), x, mask, train=True
  )
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], [0.0])
  np.testing.assert_array_equal(variables["batch_stats"]["var"], [1.0])
  np.testing.assert_array_equal(variables["params"]["scale"], [1.0])


# ------------------------------------------------------ checkpoint names


def test_torch_checkpoint_names(full_model):
  variables = full_model["variables"]
  names = sf.torch_checkpoint_names(variables)
  flat = {
      (collection,) + path
      for collection in ("params", "batch_stats")
      for path in flax.traverse_util.flatten_dict(variables[collection])
  }
  # One to one: 130 PyTorch tensors less 21 num_batches_tracked.
  assert len(names) == len(flat) == 109
  assert set(names.values()) == flat
  assert sum(k.endswith(".running_var") for k in names) == 21
  fe = "module.spx_embedding.feat_extractor."
  shortcuts = {k.split(".shortcut")[0] for k in names if ".shortcut." in k}
  assert shortcuts == {fe + "layer2.0", fe + "layer3.0"}
  # Layouts: PyTorch shapes from SPEC 11 land on the Flax shapes.
  torch_shapes = {
      fe + "conv1.0.weight": (64, 3, 7, 7),
      fe + "layer2.0.left.0.weight": (128, 64, 3, 3),
      fe + "layer3.0.shortcut.0.weight": (256, 128, 1, 1),
      fe + "layer4.1.left.4.running_var": (256,),
      "module.sf_head_L1.0.weight": (32, 67),
      "module.sf_head_L4.0.weight": (32, 259),
      "module.sf_head_L4.1.running_mean": (1,),
      "module.sf_conv_1x1.0.weight": (1, 2, 1, 1),
      "module.sf_conv_1x1.0.bias": (1,),
  }
  for key, shape in torch_shapes.items():
    leaf = variables
    for part in names[key]:
      leaf = leaf[part]
    assert sf.to_flax_layout(np.zeros(shape)).shape == leaf.shape, key
  # The layout moves entries, not just shapes.
  weight = np.arange(64 * 3 * 7 * 7).reshape(64, 3, 7, 7)
  np.testing.assert_array_equal(
      sf.to_flax_layout(weight)[1, 2, 0, 5], weight[5, 0, 1, 2]
  )
