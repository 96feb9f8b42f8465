"""Superfeatures: CNN features averaged inside superpixels (SPEC 3.2, 3.3).

Per frame, the backbone gives `f2` (stride 2, 64 ch) and `f4` (stride 4,
256 ch). Three geometry channels per superpixel (its pixel count over the map
area, mean of row / (h - 1), mean of col / (w - 1)), computed at each map's own
resolution, are painted onto its pixels and appended:

    F1 = bilinear_up(f2) ++ geometry(superpixels)      [H, W, 67]
    F4 = f4 ++ geometry(superpixels4)                  [H/4, W/4, 259]

where `superpixels4` samples the full map with the floor rule. Each superpixel
averages F1 and F4 over its pixels (`jax.ops.segment_sum`, no loop over
superpixels), each average goes through Dense -> one-channel BatchNorm -> ReLU
(32 values), and a 1x1 conv fuses the two: `s = relu(w0 * a + w1 * b + c)`.

Superpixel ids are padded to a static `N_max` with a validity mask. A row with
no pixel at a resolution (at stride 4 small superpixels can vanish) is zero
there: the head is not applied to it and it takes no part in BatchNorm
statistics. Output rows of padding (or of ids without any pixel) are zero.

Names for the authors' checkpoint (SPEC 11). Every `nn.Sequential` index is
joined to its container's name with an underscore, every other dot is a level
of nesting, and `spx_embedding.` (a wrapper without weights) is dropped. Keys
below omit the DataParallel prefix `module.`; `torch_checkpoint_names` lists
them all for a given set of variables.

    PyTorch key (FE. = spx_embedding.feat_extractor.)  Flax path
    FE.conv1.0.weight                       params/feat_extractor/conv1_0/kernel
    FE.conv1.1.{weight,bias}                params/feat_extractor/conv1_1/
                                              {scale,bias}
    FE.conv1.1.{running_mean,running_var}   batch_stats/feat_extractor/conv1_1/
                                              {mean,var}
    FE.conv1.1.num_batches_tracked          (dropped, as for every BN)
    FE.layerL.B.left.{0,3}.weight           params/feat_extractor/layerL_B/
                                              left_{0,3}/kernel
    FE.layerL.B.left.{1,4}.<bn>             .../feat_extractor/layerL_B/
                                              left_{1,4}/<bn>
    FE.layer{2,3}.0.shortcut.0.weight       params/feat_extractor/layer{2,3}_0/
                                              shortcut_0/kernel
    FE.layer{2,3}.0.shortcut.1.<bn>         .../feat_extractor/layer{2,3}_0/
                                              shortcut_1/<bn>
    sf_head_L1.0.{weight,bias}              params/sf_head_L1_0/{kernel,bias}
    sf_head_L1.1.<bn>                       .../sf_head_L1_1/<bn>
    sf_head_L4.{0,1}.*                      likewise under sf_head_L4_{0,1}
    sf_conv_1x1.0.{weight,bias}             params/sf_conv_1x1_0/{kernel,bias}

where L = 1..4, B = 0, 1 and <bn> is weight -> params/.../scale, bias ->
params/.../bias, running_mean -> batch_stats/.../mean, running_var ->
batch_stats/.../var.

Layouts: conv weights OIHW -> HWIO (`transpose(2, 3, 1, 0)`), linear weights
[out, in] -> [in, out] (`.T`); BatchNorm vectors and biases as they are (the
one-channel BatchNorm keeps PyTorch's shape [1] for all four). `to_flax_layout`
does this. 109 Flax arrays for 130 PyTorch tensors (21 `num_batches_tracked`);
5,154,631 parameters of the authors' 13.95 M (the rest is the decoder).
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shls_jax.models import backbone as backbone_lib

GEOMETRY_CHANNELS = 3


def floor_downsample(
    superpixels: jax.Array, out_height: int, out_width: int
) -> jax.Array:
  """Samples id maps with the floor rule: output i takes input floor(i*in/out).

  This is PyTorch's `interpolate(mode='nearest')`, which the authors use, not
  half-pixel nearest.

  Args:
    superpixels: int [..., height, width].
    out_height: output height.
    out_width: output width.

  Returns:
    [..., out_height, out_width], same dtype.
  """
  height, width = superpixels.shape[-2:]
  rows = np.arange(out_height) * height // out_height
  cols = np.arange(out_width) * width // out_width
  return superpixels[..., rows[:, None], cols[None, :]]


def _segment_sums(
    values: jax.Array, ids: jax.Array, num_segments: int
) -> jax.Array:
  """[batch, pixels, c] summed per id of [batch, pixels] -> [batch, n, c]."""
  return jax.vmap(
      lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_segments)
  )(values, ids)


def segment_mean(
    features: jax.Array, superpixels: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
  """Means of features inside each superpixel.

  Args:
    features: float [batch, height, width, channels].
    superpixels: int [batch, height, width], ids in [0, num_segments); larger
      ids are dropped.
    num_segments: N_max, the padded number of superpixels.

  Returns:
    means: [batch, num_segments, channels], zero where a superpixel has no
      pixel.
    counts: float32 [batch, num_segments], pixels per superpixel.
  """
  batch, height, width, channels = features.shape
  ids = superpixels.reshape(batch, height * width)
  values = features.reshape(batch, height * width, channels)
  ones = jnp.ones((batch, height * width, 1), features.dtype)
  sums = _segment_sums(jnp.concatenate([values, ones], -1), ids, num_segments)
  counts = sums[..., -1]
  means = sums[..., :-1] / jnp.maximum(counts, 1.0)[..., None]
  return means, counts.astype(jnp.float32)


def geometry_channels(superpixels: jax.Array, num_segments: int) -> jax.Array:
  """Size and centre of each superpixel, painted onto its pixels.

  Computed at the map's own resolution, as the authors' `spx_info_map`.

  Args:
    superpixels: int [batch, height, width], ids in [0, num_segments).
    num_segments: N_max.

  Returns:
    float32 [batch, height, width, 3]: pixel count / (height * width), mean of
    row / (height - 1), mean of col / (width - 1) over the pixel's superpixel.
  """
  batch, height, width = superpixels.shape
  # A single row or column would divide by zero (the authors' code gives NaN).
  rows = jnp.arange(height, dtype=jnp.float32) / max(height - 1, 1)
  cols = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
  grid = jnp.stack(
      [
          jnp.broadcast_to(rows[:, None], (height, width)),
          jnp.broadcast_to(cols[None, :], (height, width)),
      ],
      -1,
  )
  grid = jnp.broadcast_to(grid, (batch, height, width, 2))
  centres, counts = segment_mean(grid, superpixels, num_segments)
  stats = jnp.concatenate([(counts / (height * width))[..., None], centres], -1)
  ids = superpixels.reshape(batch, height * width)
  painted = jnp.take_along_axis(stats, ids[..., None], axis=1)
  return painted.reshape(batch, height, width, GEOMETRY_CHANNELS)


def upsample_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """[batch, h, w, c] -> [batch, height, width, c], half-pixel centres.

  Equals PyTorch's `interpolate(mode='bilinear', align_corners=False)` when
  upsampling (no antialias).
  """
  shape = (x.shape[0], height, width, x.shape[-1])
  return jax.image.resize(x, shape, "bilinear", antialias=False)


class OneChannelBatchNorm(nn.Module):
  """The authors' `BatchNorm1d(1)` applied to one superpixel at a time.

  Their code loops over superpixels, so in training every call normalises the
  `channels` outputs of ONE superpixel by their own mean and biased variance;
  the affine map and the running statistics are scalars. Here all rows are
  normalised at once, each by its own statistics, which is the same function.
  Evaluation applies one scalar affine map with the running statistics.

  Running statistics: the authors update them once per superpixel (a
  sequence of momentum steps whose result is dominated by the last ~30
  superpixels of the last frame). The default `stat_update='mean'` takes ONE
  momentum step per call towards the mean over valid rows of the per-row mean
  and per-row unbiased variance: the same quantity in expectation, less
  noisy. `'sequential'` reproduces the authors' per-row steps exactly, rows in
  [batch, row] order. Rows outside `mask` never enter the statistics, and a
  call without any valid row leaves them unchanged.

  Attributes:
    momentum: Flax convention, running = momentum * running + (1 - momentum)
      * batch (PyTorch's 0.1 is 0.9 here).
    epsilon: added to the variance.
    stat_update: 'mean' or 'sequential', see above.
    axis_name: with 'mean', also average the row statistics over this device
      axis so replicas keep equal running statistics.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  stat_update: str = "mean"
  axis_name: str | None = None

  @nn.compact
  def __call__(
      self, x: jax.Array, mask: jax.Array, *, train: bool
  ) -> jax.Array:
    """Normalises every row.

    Args:
      x: float [..., rows, channels], one superpixel per row.
      mask: bool [..., rows], rows that exist (others give zeros and are left
        out of the statistics).
      train: per-row statistics and a running update if True (needs mutable
        'batch_stats'); running statistics otherwise.

    Returns:
      [..., rows, channels], zero on rows outside `mask`.
    """
    if self.stat_update not in ("mean", "sequential"):
      raise ValueError(
          "stat_update must be 'mean' or 'sequential', got"
          f" {self.stat_update!r}."
      )
    if self.stat_update == "sequential" and self.axis_name is not None:
      raise ValueError(
          "stat_update='sequential' has no order across devices; use"
          " stat_update='mean' with axis_name."
      )
    scale = self.param("scale", nn.initializers.ones, (1,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (1,), jnp.float32)
    ra_mean = self.variable(
        "batch_stats", "mean", lambda: jnp.zeros((1,), jnp.float32)
    )
    ra_var = self.variable(
        "batch_stats", "var", lambda: jnp.ones((1,), jnp.float32)
    )
    if train:
      channels = x.shape[-1]
      if channels < 2:
        raise ValueError(
            f"Per-row statistics need at least 2 channels, got {channels}."
        )
      mean = jnp.mean(x, -1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
      if not self.is_initializing():
        # PyTorch's running variance is unbiased.
        unbiased = var[..., 0] * (channels / (channels - 1))
        ra_mean.value, ra_var.value = self._update(
            ra_mean.value, ra_var.value, mean[..., 0], unbiased, mask
        )
    else:
      y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    y = y * scale + bias
    return jnp.where(mask[..., None], y, 0.0)

  def _update(self, old_mean, old_var, row_mean, row_var, mask):
    """New running (mean, var) [1] from row statistics [..., rows]."""
    row_mean = jax.lax.stop_gradient(row_mean).reshape(-1)
    row_var = jax.lax.stop_gradient(row_var).reshape(-1)
    weight = mask.reshape(-1).astype(jnp.float32)
    if self.stat_update == "sequential":
      n = jnp.sum(weight)
      # Row r is followed by `later` valid rows, each shrinking its step.
      later = n - jnp.cumsum(weight)
      step = weight * (1.0 - self.momentum) * self.momentum**later
      keep = self.momentum**n
      return (
          keep * old_mean + jnp.sum(step * row_mean),
          keep * old_var + jnp.sum(step * row_var),
      )
    sums = jnp.stack(
        [jnp.sum(weight), jnp.sum(weight * row_mean), jnp.sum(weight * row_var)]
    )
    if self.axis_name is not None:
      sums = jax.lax.psum(sums, self.axis_name)
    n, mean_sum, var_sum = sums[0], sums[1], sums[2]
    m = self.momentum
    new_mean = m * old_mean + (1 - m) * mean_sum / jnp.maximum(n, 1.0)
    new_var = m * old_var + (1 - m) * var_sum / jnp.maximum(n, 1.0)
    return (
        jnp.where(n > 0, new_mean, old_mean),
        jnp.where(n > 0, new_var, old_var),
    )


class SuperfeatureNet(nn.Module):
  """Backbone, feature maps F1 / F4 and superfeatures of a batch of frames.

  Attributes:
    sf_channels: length of a superfeature.
    stem_features, stage_features, stage_blocks, stage_strides: the backbone
      (see `backbone.Backbone`); f2 must be at stride 2 and f4 at stride 4.
    bn_momentum: Flax convention for every BatchNorm (PyTorch's 0.1 -> 0.9).
    bn_epsilon: epsilon of every BatchNorm.
    sf_stat_update: running-statistics rule of the heads' one-channel
      BatchNorm, 'mean' or 'sequential' (see `OneChannelBatchNorm`).
    axis_name: device axis to average BatchNorm statistics over, or None (the
      authors: each replica on its own).
  """

  sf_channels: int = 32
  stem_features: int = 64
  stage_features: Sequence[int] = (64, 128, 256, 256)
  stage_blocks: Sequence[int] = (2, 2, 2, 2)
  stage_strides: Sequence[int] = (1, 2, 1, 1)
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  sf_stat_update: str = "mean"
  axis_name: str | None = None

  def _head(self, pooled, mask, name, train):
    """Dense -> one-channel BN -> ReLU on [batch, n, c], zero off `mask`."""
    fan_in = pooled.shape[-1]
    x = nn.Dense(
        self.sf_channels,
        kernel_init=backbone_lib.torch_kernel_init,
        bias_init=backbone_lib.torch_bias_init(fan_in),
        name=f"{name}_0",
    )(pooled)
    x = OneChannelBatchNorm(
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        stat_update=self.sf_stat_update,
        axis_name=self.axis_name,
        name=f"{name}_1",
    )(x, mask, train=train)
    # The BN already zeroed rows off the mask and relu(0) = 0.
    return nn.relu(x)

  @nn.compact
  def __call__(
      self,
      frames: jax.Array,
      superpixels: jax.Array,
      valid: jax.Array,
      *,
      train: bool,
  ) -> dict[str, jax.Array]:
    """Computes superfeatures and the two feature maps.

    Args:
      frames: float32 [batch, height, width, 3], normalised
        (`backbone.normalize`); height and width multiples of 4.
      superpixels: int32 [batch, height, width], ids in [0, N_max); padding
        ids never appear.
      valid: bool [batch, N_max], the superpixels that exist.
      train: BatchNorm in training mode (needs mutable 'batch_stats').

    Returns:
      A dict with
        superfeatures: [batch, N_max, sf_channels], >= 0, zero on rows that
          are not valid or have no pixel.
        f1: [batch, height, width, 64 + 3], F1.
        f4: [batch, ceil(height/4), ceil(width/4), 256 + 3], F4 (any frame
          size: 480x854 gives 120x214, as the authors').
        superpixels4: [batch, ceil(height/4), ceil(width/4)], the
          floor-sampled ids.
        valid4: bool [batch, N_max], valid superpixels with a pixel at
          stride 4.
    """
    batch, height, width = superpixels.shape
    num_segments = valid.shape[-1]
    if frames.shape != (batch, height, width, 3):
      raise ValueError(
          f"frames {frames.shape} must be [batch, height, width, 3] with the"
          f" superpixel maps' [batch, height, width] = {superpixels.shape}."
      )
    if valid.shape != (batch, num_segments):
      raise ValueError(
          f"valid {valid.shape} must be [batch, N_max] with batch {batch}."
      )
    f2, f4 = backbone_lib.Backbone(
        stem_features=self.stem_features,
        stage_features=self.stage_features,
        stage_blocks=self.stage_blocks,
        stage_strides=self.stage_strides,
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
        name="feat_extractor",
    )(frames, train=train)
    # Two stride-2 convolutions with symmetric padding: ceil(ceil(n/2)/2) =
    # ceil(n/4), e.g. 854 -> 427 -> 214 at DAVIS 480p, as the authors'.
    if f4.shape[1:3] != (-(-height // 4), -(-width // 4)):
      raise ValueError(
          f"The backbone's last stage is {f4.shape[1:3]} for a"
          f" {height}x{width} frame; it must be at stride 4."
      )

    superpixels4 = floor_downsample(superpixels, *f4.shape[1:3])
    f1 = jnp.concatenate(
        [
            upsample_bilinear(f2, height, width),
            geometry_channels(superpixels, num_segments),
        ],
        -1,
    )
    f4 = jnp.concatenate(
        [f4, geometry_channels(superpixels4, num_segments)], -1
    )
    pooled1, counts1 = segment_mean(f1, superpixels, num_segments)
    pooled4, counts4 = segment_mean(f4, superpixels4, num_segments)
    valid1 = valid & (counts1 > 0)
    valid4 = valid & (counts4 > 0)

    a = self._head(pooled1, valid1, "sf_head_L1", train)
    b = self._head(pooled4, valid4, "sf_head_L4", train)
    # The authors' Conv2d(2, 1, 1) sees [1, 2, N, 32]: the two heads are the
    # channels, superpixels and superfeature entries the spatial axes.
    fused = nn.Conv(
        1,
        (1, 1),
        kernel_init=backbone_lib.torch_kernel_init,
        bias_init=backbone_lib.torch_bias_init(2),
        name="sf_conv_1x1_0",
    )(jnp.stack([a, b], -1))
    superfeatures = jnp.where(valid1[..., None], nn.relu(fused[..., 0]), 0.0)
    return {
        "superfeatures": superfeatures,
        "f1": f1,
        "f4": f4,
        "superpixels4": superpixels4,
        "valid4": valid4,
    }


_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_checkpoint_names(
    variables: Mapping[str, Any], prefix: str = "module."
) -> dict[str, tuple[str, ...]]:
  """Maps the authors' checkpoint keys to paths in SuperfeatureNet variables.

  Args:
    variables: SuperfeatureNet variables ('params' and 'batch_stats'; other
      collections are ignored).
    prefix: the checkpoint's key prefix (DataParallel's `module.`).

  Returns:
    {torch key: (collection, module, ..., leaf)}, one entry per Flax array.
    `num_batches_tracked` has no Flax counterpart.
  """
  names = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(variables.get(collection, {}))
    )
    for path in flat:
      parts = []
      for module in path[:-1]:
        if module == "feat_extractor":
          parts.append("spx_embedding.feat_extractor")
        else:
          parts.append(re.sub(r"_(\d+)$", r".\1", module))
      parts.append(_LEAF_TO_TORCH[path[-1]])
      names[prefix + ".".join(parts)] = (collection,) + tuple(path)
  return names


def to_flax_layout(array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in Flax's layout: OIHW -> HWIO, [out, in] -> [in, out]."""
  array = np.asarray(array)
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array
