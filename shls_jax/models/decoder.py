"""The refinement decoder of SHLS: crops, gate, segmenter, paste, aggregation.

SPEC 7. Per object, inside three boxes (the frame-0 box, the previous and the
current test boxes, see the memory's boxes), the decoder refines the coarse
memory prediction into background / object logits:

    crops       frame-0 mask and F1 (first box), previous maps, prediction
                and F1 (previous box), current maps and F1 (current box),
                all resampled to ONE fixed crop size (config); F4 of the three
                frames by RoIAlign to a quarter of it
    mem_select  g = convL2(F1) + convAM(maps), w = softmax(gate(g)) for the
                previous and the current frame; gated F4 = w * F4 crop
    segmenter   stride-2 branch on [mask0, previous prediction, F1 of frame 0]
                (69 ch, two basic blocks); stride-4 branch on [F4 frame 0,
                gated previous, gated current] (777 ch, convFM + res_L4);
                refine at stride 2 (RF2) and at full crop size (RF1, skip =
                the 69 channels plus the current maps); pred -> 2 logits
    paste       logits back to the frame inside the current box
    aggregate   soft aggregation over objects (background = prod(1 - p_o))

The authors crop at the native box size (every object and frame its own
shape); static shapes need one size, so every crop is resampled to
`crop_size` and pasted back bilinearly (a deliberate difference, SPEC 12).
With a crop as large as the box the two agree up to that resampling.

Resampling is separable: every output row (column) is a weighted sum of a few
input rows (columns), so crops, RoIAlign and pasting are two small gathers
each, never a dense matrix over the frame.

Boxes are int32 [y0, x0, y1, x1] in pixels of the full frame, ends exclusive.

Parameter names follow the authors' modules (`mem_select/convL2`,
`segmenter/layer2_0/left_0`, `segmenter/RF2/ResFS/conv1_0`, ...) with every
`nn.Sequential` index joined by an underscore, as in backbone.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from shls_jax.models import backbone as backbone_lib

# Channels of the inputs (SPEC 7): F1 = 64 + 3 geometry, F4 = 256 + 3, four
# memory maps per object.
F1_CHANNELS = 67
F4_CHANNELS = 259
NUM_MAPS = 4
# Aggregated probabilities are clamped to [EPS, 1 - EPS] before the logit.
EPS = 1e-7


# ------------------------------------------------------------- resampling


def _sample(image: jax.Array, rows, cols) -> jax.Array:
  """Separable resampling: out[p, q] = sum_k,l wr[p,k] wc[q,l] image[r, c].

  Args:
    image: [H, W, C].
    rows: (indices int32 [P, K], weights float [P, K]) into the H axis.
    cols: (indices int32 [Q, L], weights float [Q, L]) into the W axis.

  Returns:
    [P, Q, C].
  """
  row_index, row_weight = rows
  col_index, col_weight = cols
  x = jnp.einsum("pk,pkwc->pwc", row_weight, image[row_index])
  return jnp.einsum("ql,pqlc->pqc", col_weight, x[:, col_index])


def _bilinear_axis(start, length, size_out: int, size_in: int):
  """Taps of PyTorch's bilinear resize (align_corners=False) of a window.

  Output i of `size_out` reads the window [start, start + length) of an axis
  of `size_in` pixels at window coordinate (i + 0.5) * length / size_out -
  0.5, clamped below at 0, interpolating between its two neighbours (the
  upper one clamped to the window's last pixel).
  """
  start = jnp.asarray(start, jnp.float32)
  length = jnp.maximum(jnp.asarray(length, jnp.float32), 1.0)
  src = (jnp.arange(size_out) + 0.5) * (length / size_out) - 0.5
  src = jnp.maximum(src, 0.0)
  low = jnp.floor(src)
  frac = src - low
  high = jnp.minimum(low + 1, length - 1)
  index = jnp.stack([start + low, start + high], -1).astype(jnp.int32)
  index = jnp.clip(index, 0, size_in - 1)
  weight = jnp.stack([1.0 - frac, frac], -1)
  return index, weight


def _nearest_axis(start, length, size_out: int, size_in: int):
  """Taps of PyTorch's 'nearest' resize of a window: floor(i * length / out)."""
  start = jnp.asarray(start, jnp.int32)
  length = jnp.maximum(jnp.asarray(length, jnp.int32), 1)
  src = jnp.floor(
      jnp.arange(size_out) * (length.astype(jnp.float32) / size_out)
  ).astype(jnp.int32)
  src = jnp.minimum(src, length - 1)
  index = jnp.clip(start + src, 0, size_in - 1)[:, None]
  return index, jnp.ones((size_out, 1), jnp.float32)


def crop_resize(
    image: jax.Array,
    box: jax.Array,
    size: tuple[int, int],
    nearest: bool = False,
) -> jax.Array:
  """The box of an image resampled to `size` (the authors' crop + resize).

  Args:
    image: [H, W, C].
    box: int32 [4], y0, x0, y1, x1 (ends exclusive), inside the image.
    size: (height, width) of the crop.
    nearest: nearest-neighbour sampling (masks) instead of bilinear.

  Returns:
    [height, width, C], as PyTorch's `F.interpolate(image[y0:y1, x0:x1],
    size, mode='bilinear', align_corners=False)` (or mode='nearest').
  """
  axis = _nearest_axis if nearest else _bilinear_axis
  rows = axis(box[0], box[2] - box[0], size[0], image.shape[0])
  cols = axis(box[1], box[3] - box[1], size[1], image.shape[1])
  return _sample(image, rows, cols)


def _roi_align_axis(
    start, end, size_out: int, size_in: int, max_samples: int, scale: float
):
  """Taps of torchvision's RoIAlign (aligned=False, adaptive sampling).

  Bin p covers [roi_start + p * bin, roi_start + (p + 1) * bin) with bin =
  max(roi_end - roi_start, 1) / size_out; it averages ceil(roi / size_out)
  samples at the centres of equal sub-bins (here at most `max_samples`
  taps, the rest weighted 0). A sample below -1 or beyond `size_in`
  contributes 0; one in [-1, 0) reads pixel 0; one at or past the last pixel
  reads the last pixel.
  """
  roi_start = jnp.asarray(start, jnp.float32) * scale
  roi_len = jnp.maximum(jnp.asarray(end, jnp.float32) * scale - roi_start, 1.0)
  bin_len = roi_len / size_out
  grid = jnp.ceil(roi_len / size_out)
  k = jnp.arange(max_samples)
  y = (
      roi_start
      + jnp.arange(size_out)[:, None] * bin_len
      + (k[None, :] + 0.5) * bin_len / grid
  )  # [size_out, max_samples]
  used = (k[None, :] < grid) & (y >= -1.0) & (y <= size_in)
  y = jnp.maximum(y, 0.0)
  low = jnp.floor(y)
  at_end = low >= size_in - 1
  low = jnp.where(at_end, size_in - 1, low)
  high = jnp.where(at_end, size_in - 1, low + 1)
  frac = jnp.where(at_end, 0.0, y - low)
  weight = jnp.where(used, 1.0, 0.0) / grid
  index = jnp.concatenate([low, high], -1).astype(jnp.int32)
  weight = jnp.concatenate([weight * (1 - frac), weight * frac], -1)
  return index, weight


def roi_align(
    features: jax.Array,
    box: jax.Array,
    size: tuple[int, int],
    spatial_scale: float,
    frame_size: tuple[int, int],
) -> jax.Array:
  """torchvision `roi_align(..., aligned=False, sampling_ratio=-1)`, one box.

  Args:
    features: [h, w, C], a feature map at `spatial_scale` of the frame.
    box: int32 [4], y0, x0, y1, x1 in frame pixels (the authors pass the
      box's corners as given).
    size: (height, width) of the output.
    spatial_scale: feature pixels per frame pixel (0.25 for F4).
    frame_size: (H, W) of the frame; bounds the adaptive sample count
      statically (a box is never larger than the frame).

  Returns:
    [height, width, C].
  """
  h, w = features.shape[:2]
  rows = _roi_align_axis(
      box[0],
      box[2],
      size[0],
      h,
      max(1, math.ceil(frame_size[0] * spatial_scale / size[0])),
      spatial_scale,
  )
  cols = _roi_align_axis(
      box[1],
      box[3],
      size[1],
      w,
      max(1, math.ceil(frame_size[1] * spatial_scale / size[1])),
      spatial_scale,
  )
  return _sample(features, rows, cols)


def paste(
    crop: jax.Array, box: jax.Array, frame_size: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
  """A crop resampled back into its box of the frame (bilinear).

  Args:
    crop: [height, width, C], values for the box (e.g. logits).
    box: int32 [4], y0, x0, y1, x1 (ends exclusive).
    frame_size: (H, W).

  Returns:
    ([H, W, C] values, zero outside the box; bool [H, W], inside the box).
  """
  big_h, big_w = frame_size
  crop_h, crop_w = crop.shape[:2]

  def axis(start, end, size_in, size_out):
    length = jnp.maximum(end - start, 1).astype(jnp.float32)
    pos = jnp.arange(size_out) - start
    src = (pos + 0.5) * (size_in / length) - 0.5
    src = jnp.clip(src, 0.0, size_in - 1)
    low = jnp.floor(src)
    frac = src - low
    high = jnp.minimum(low + 1, size_in - 1)
    inside = (pos >= 0) & (pos < end - start)
    index = jnp.stack([low, high], -1).astype(jnp.int32)
    weight = jnp.stack([1 - frac, frac], -1) * inside[:, None]
    return (index, weight), inside

  rows, inside_y = axis(box[0], box[2], crop_h, big_h)
  cols, inside_x = axis(box[1], box[3], crop_w, big_w)
  return _sample(crop, rows, cols), inside_y[:, None] & inside_x[None, :]


def aggregate(
    object_logits: jax.Array, inside: jax.Array, object_valid: jax.Array
) -> jax.Array:
  """Soft aggregation of per-object logits into one logit map (SPEC 7.4).

  Args:
    object_logits: [K, H, W, 2], background / object logits per object.
    inside: bool [K, H, W], each object's current box.
    object_valid: bool [K], objects that exist (padding is False).

  Returns:
    [K + 1, H, W] logits log(q / (1 - q)) of q = (prod_o (1 - p_o), p_1, ...,
    p_K) clamped to [EPS, 1 - EPS]; p_o is the object's softmax probability
    inside its box and 0 outside it or when the object is padding. The mask
    is the argmax over the first axis.
  """
  p = jax.nn.softmax(object_logits, axis=-1)[..., 1]
  p = jnp.where(inside & object_valid[:, None, None], p, 0.0)
  background = jnp.prod(1.0 - p, axis=0, keepdims=True)
  q = jnp.clip(jnp.concatenate([background, p], 0), EPS, 1.0 - EPS)
  return jnp.log(q / (1.0 - q))


# ---------------------------------------------------------------- modules


def _conv_bias(
    x: jax.Array, features: int, kernel: int, strides: int = 1, *, name: str
) -> jax.Array:
  """A convolution with bias, PyTorch's symmetric padding and init, on x.

  Call inside a compact method: the submodule is named `name` directly.
  """
  pad = (kernel - 1) // 2
  fan_in = x.shape[-1] * kernel * kernel
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      kernel_init=backbone_lib.torch_kernel_init,
      bias_init=backbone_lib.torch_bias_init(fan_in),
      name=name,
  )(x)


class ResidualBlock(nn.Module):
  """relu, conv-BN-relu, conv-BN-relu, add (the authors' res_L4, ResFS, ResMM).

  Convolutions are 3x3 with bias; names conv1_0 / conv1_1 (conv, BN) and
  conv2_0 / conv2_1.
  """

  features: int = 256
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(
      self, x: jax.Array, *, train: bool, mask: jax.Array | None = None
  ) -> jax.Array:
    r = nn.relu(x)
    for i in (1, 2):
      r = _conv_bias(r, self.features, 3, name=f"conv{i}_0")
      r = nn.BatchNorm(
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=self.bn_epsilon,
          axis_name=self.axis_name,
          name=f"conv{i}_1",
      )(r, mask=None if mask is None else mask[:, None, None, None])
      r = nn.relu(r)
    return x + r


def _upsample2(x: jax.Array) -> jax.Array:
  """Bilinear x2 (align_corners=False) of [B, h, w, C]."""
  b, h, w, c = x.shape
  rows = _bilinear_axis(0, h, 2 * h, h)
  cols = _bilinear_axis(0, w, 2 * w, w)
  return jax.vmap(lambda im: _sample(im, rows, cols))(x)


class Refine(nn.Module):
  """convFS on the skip input, ResFS, + upsampled coarser output, ResMM."""

  features: int = 256
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, skip, coarse, *, train: bool, mask=None):
    kw = dict(
        features=self.features,
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
    )
    s = _conv_bias(skip, self.features, 3, name="convFS")
    s = ResidualBlock(**kw, name="ResFS")(s, train=train, mask=mask)
    up = _upsample2(coarse)
    if up.shape[1:3] != s.shape[1:3]:
      raise ValueError(
          f"Refine: the skip input is {s.shape[1:3]} but the coarser output"
          f" upsamples to {up.shape[1:3]}; crop sizes must be multiples of 4."
      )
    return ResidualBlock(**kw, name="ResMM")(s + up, train=train, mask=mask)


class MemSelect(nn.Module):
  """The gate: softmax attention over F4 channels from F1 crops and maps."""

  f4_channels: int = F4_CHANNELS
  features: int = 32

  @nn.compact
  def __call__(self, f1: jax.Array, maps: jax.Array) -> jax.Array:
    """[B, Hc, Wc, 67], [B, Hc, Wc, 4] -> weights [B, Hc/4, Wc/4, 259]."""
    g = _conv_bias(f1, self.features, 3, 2, name="convL2")
    g = g + _conv_bias(maps, self.features, 3, 2, name="convAM")
    return jax.nn.softmax(
        _conv_bias(g, self.f4_channels, 3, 2, name="gate"), -1
    )


class Segmenter(nn.Module):
  """Stride-2 and stride-4 branches, two refine steps, 2 output logits."""

  features: int = 256
  skip_features: int = 128
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, skip69, maps_now, f4_all, *, train: bool, mask=None):
    bn = dict(
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
    )
    run = dict(train=train, mask=mask)
    width, skip_width = self.features, self.skip_features
    s2 = backbone_lib.BasicBlock(skip_width, 2, **bn, name="layer2_0")(
        skip69, **run
    )
    s2 = backbone_lib.BasicBlock(skip_width, 1, **bn, name="layer2_1")(
        s2, **run
    )
    m4 = _conv_bias(f4_all, width, 3, name="convFM")
    m4 = ResidualBlock(width, **bn, name="res_L4")(m4, **run)
    m2 = Refine(width, **bn, name="RF2")(s2, m4, **run)
    skip73 = jnp.concatenate([skip69, maps_now], -1)
    m1 = Refine(width, **bn, name="RF1")(skip73, m2, **run)
    # SPEC 7.3: the output conv reads the refined map directly.
    return _conv_bias(m1, 2, 3, name="pred")


class Decoder(nn.Module):
  """mem_select + segmenter on crops of a batch of objects (SPEC 7.2, 7.3).

  Inputs are already cropped (`crop_inputs`); the batch axis is objects
  (of one or several frames).

  Attributes:
    features: width of the stride-4 branch and the refine blocks (256 in
      the paper; narrower for demos and tests).
    skip_features: width of the stride-2 branch (128).
    gate_features: width of the gate's hidden layer (32).
  """

  features: int = 256
  skip_features: int = 128
  gate_features: int = 32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(
      self,
      mask0: jax.Array,
      prev_pred: jax.Array,
      f1: jax.Array,
      maps: jax.Array,
      f4: jax.Array,
      *,
      train: bool,
      mask: jax.Array | None = None,
  ) -> jax.Array:
    """Background / object logits of each object's crop.

    Args:
      mask0: [B, Hc, Wc, 1], the object's frame-0 mask (first box).
      prev_pred: [B, Hc, Wc, 1], its previous prediction (previous box).
      f1: [B, 3, Hc, Wc, 67], F1 crops of frame 0 (first box), the previous
        (previous box) and the current frame (current box).
      maps: [B, 2, Hc, Wc, 4], the four memory maps of the previous and the
        current frame.
      f4: [B, 3, Hc/4, Wc/4, 259], F4 RoIAligned likewise.
      train: BatchNorm in training mode (needs mutable 'batch_stats').
      mask: bool [B], the rows that are real objects: training-mode
        BatchNorm statistics count only these (padding object slots are
        still computed, never counted).

    Returns:
      [B, Hc, Wc, 2] logits.
    """
    hc, wc = mask0.shape[1:3]
    if hc % 4 or wc % 4:
      raise ValueError(
          f"Decoder crops must be multiples of 4, got {hc}x{wc}"
          " (config.model.decoder_crop_size)."
      )
    # F4's channel count is the paper's 259; narrow test models have fewer.
    select = MemSelect(
        f4_channels=f4.shape[-1],
        features=self.gate_features,
        name="mem_select",
    )
    gated = [select(f1[:, t], maps[:, t - 1]) * f4[:, t] for t in (1, 2)]
    f4_all = jnp.concatenate([f4[:, 0]] + gated, -1)  # 777 channels.
    skip69 = jnp.concatenate([mask0, prev_pred, f1[:, 0]], -1)
    return Segmenter(
        features=self.features,
        skip_features=self.skip_features,
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
        name="segmenter",
    )(skip69, maps[:, 1], f4_all, train=train, mask=mask)


def reference_crops(
    box0: jax.Array,
    mask0: jax.Array,
    f1_0: jax.Array,
    f4_0: jax.Array,
    crop_size: tuple[int, int],
) -> dict[str, jax.Array]:
  """The crops of an object's reference frame, from its first box.

  The first box never changes, so these crops are the same on every later
  frame: the tracker takes them once, when the object is given (frame 0, or
  the frame where a late object first appears), and keeps them in its carry.

  Args:
    box0: int32 [4], the reference box.
    mask0: [H, W], the object's given mask.
    f1_0: [H, W, 67] and f4_0 [H/4, W/4, 259], the reference frame's maps.
    crop_size: (Hc, Wc), multiples of 4.

  Returns:
    mask0 [Hc, Wc, 1] (nearest), f1 [Hc, Wc, 67], f4 [Hc/4, Wc/4, 259].
  """
  quarter = (crop_size[0] // 4, crop_size[1] // 4)
  return {
      "mask0": crop_resize(
          mask0[..., None].astype(jnp.float32), box0, crop_size, True
      ),
      "f1": crop_resize(f1_0, box0, crop_size),
      "f4": roi_align(f4_0, box0, quarter, 0.25, mask0.shape),
  }


def later_crops(
    reference: dict[str, jax.Array],
    boxes: jax.Array,
    prev_pred: jax.Array,
    f1: jax.Array,
    maps: jax.Array,
    f4: jax.Array,
    crop_size: tuple[int, int],
) -> dict[str, jax.Array]:
  """The decoder's crops of one object given its `reference_crops`.

  Args:
    reference: `reference_crops` of the object.
    boxes: int32 [2, 4], the previous and the current box.
    prev_pred: [H, W] its previous prediction (probability or mask).
    f1: [2, H, W, 67], F1 of the previous and the current frame.
    maps: [2, H, W, 4], the previous and the current four maps.
    f4: [2, H/4, W/4, 259], F4 of the two frames.
    crop_size: (Hc, Wc), multiples of 4.

  Returns:
    The `Decoder` inputs without the batch axis: mask0, prev_pred, f1, maps,
    f4 (the reference frame first in f1 and f4).
  """
  frame_size = prev_pred.shape
  quarter = (crop_size[0] // 4, crop_size[1] // 4)
  return {
      "mask0": reference["mask0"],
      "prev_pred": crop_resize(
          prev_pred[..., None].astype(jnp.float32), boxes[0], crop_size
      ),
      "f1": jnp.stack(
          [reference["f1"]]
          + [crop_resize(f1[t], boxes[t], crop_size) for t in range(2)]
      ),
      "maps": jnp.stack(
          [crop_resize(maps[t], boxes[t], crop_size) for t in range(2)]
      ),
      "f4": jnp.stack(
          [reference["f4"]]
          + [
              roi_align(f4[t], boxes[t], quarter, 0.25, frame_size)
              for t in range(2)
          ]
      ),
  }


def crop_inputs(
    boxes: jax.Array,
    mask0: jax.Array,
    prev_pred: jax.Array,
    f1: jax.Array,
    maps: jax.Array,
    f4: jax.Array,
    crop_size: tuple[int, int],
) -> dict[str, jax.Array]:
  """The decoder's crops of one object (vmap over objects).

  Args:
    boxes: int32 [3, 4], the first, previous and current boxes.
    mask0: [H, W] frame-0 mask of the object.
    prev_pred: [H, W] its previous prediction (probability or mask).
    f1: [3, H, W, 67], F1 of frame 0, the previous and the current frame.
    maps: [2, H, W, 4], the previous and the current four maps.
    f4: [3, H/4, W/4, 259], F4 of the three frames.
    crop_size: (Hc, Wc), multiples of 4.

  Returns:
    The `Decoder` inputs without the batch axis: mask0, prev_pred, f1, maps,
    f4.
  """
  reference = reference_crops(boxes[0], mask0, f1[0], f4[0], crop_size)
  return later_crops(
      reference, boxes[1:], prev_pred, f1[1:], maps, f4[1:], crop_size
  )
