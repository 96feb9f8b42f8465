"""Synthetic training sequences from one still image (SPEC 2.2).

A still image and its object ids become a short "video" whose label maps are
known exactly:

* frame 0 is the whole image resized to `image_size` x `image_size` (aspect
  not kept, bilinear; labels nearest), with no colour change;
* every later frame is made independently from the original-size image:
  colour jitter, then a random affine (rotation, shear, translation, per-axis
  scale, each with probability `aug_prob`, in random order) and a random
  resized crop. The geometry is composed into one matrix per frame, so the
  image is sampled once (bilinear) and the labels once (nearest); pixels that
  fall outside the image are black with label 0;
* while the sequence has fewer than `min_labels` labels (background
  included), objects cut from other images ("donors") are pasted with new
  ids; in later frames they move locally.

Coordinates: (x, y) = (column, row), pixel i covers [i - 0.5, i + 0.5), and
3x3 matrices act on column vectors (x, y, 1). A "forward" matrix maps source
coordinates to output coordinates; sampling uses its inverse.

Interpretations of the specification (the spec leaves these open):
* Pixel distances of the frame augmentations (`translate_px`,
  `crop_jitter_px`) are in pixels of the original-size image, where these
  augmentations act. Donor sizes (`donor_short_side_px`) are in output pixels.
* Shear is along x only (torchvision's `RandomAffine(shear=s)`).
* The crop window keeps the image's aspect ratio (its area is
  `U(crop_scale_range)` of the image); its position is uniform over the
  slack between the image and the window, then shifted by
  `U(-crop_jitter_px, crop_jitter_px)` per axis. The window is resized to a
  square, like frame 0.
* Colour jitter works on floats in [0, 255] and clamps after every step, as
  torchvision does on float tensors; results are rounded once at the end.
* Donors: the blob's box (with a 1 pixel transparent margin) is rescaled so
  its shorter side is `U(donor_short_side_px)` (capped so the longer side
  fits the frame), then every corner moves by up to `donor_perspective` of
  the patch's width and height, in either direction. The scale is drawn once
  per object; perspective and colour jitter are drawn anew in every frame
  (frame 0 included: the donor is a different image, the "no colour change"
  of frame 0 is about the source image). Contrast uses the alpha-weighted
  mean grey of the patch.
* A pasted pixel takes the donor's id when its alpha (the donor's soft
  saliency divided by the blob's maximum, resampled bilinearly) is at least
  0.5: where the donor dominates the colour. Occlusion is measured on
  labels.
* "The previous frame's box enlarged by (local_motion_base + t / 10) of the
  image size": the box grows by that fraction of the frame size in total per
  axis (half on each side); the new patch must lie inside it (and inside the
  frame, where it fits). An object absent from the previous frame uses its
  most recent box.
* Ids: source objects that survive the nearest resize of frame 0 are
  renumbered 1..K0 in their original order; pasted objects follow in paste
  order. Source objects missing from frame 0 (too small for the resize) are
  background in every frame.
"""

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np
from scipy import ndimage

# A pasted pixel is labelled with the donor's id from this alpha on.
ALPHA_LABEL_THRESHOLD = 0.5
# The donor loop of one sequence stops after this many draws per missing
# label; a degenerate split (donors without objects, or only huge donors next
# to tiny objects) would otherwise loop forever.
_DONOR_DRAWS_PER_LABEL = 4
# Independent of min_labels: a source without objects keeps drawing donors
# up to this many times before giving up.
_MAX_DONOR_DRAWS_FOR_FIRST_OBJECT = 64
# Donors shrunk by more than this factor are blurred first (aliasing).
_PREFILTER_BELOW_SCALE = 0.5

AFFINE_OPS = ("rotation", "shear", "translation", "scale")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class Source:
  """One still image with its pseudo masks.

  Attributes:
    name: file stem, for error messages.
    image: uint8 [H, W, 3].
    ids: uint8 [H, W]; 0 = background, 1..K = objects.
    saliency: uint8 [H, W]; soft saliency, > 0 inside the objects (the alpha
      of the image's objects when it serves as a donor).
  """

  name: str
  image: np.ndarray
  ids: np.ndarray
  saliency: np.ndarray

  def __post_init__(self):
    image, ids, sal = self.image, self.ids, self.saliency
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(
          f"{self.name}: image must be uint8 [H, W, 3], got {image.dtype} "
          f"{image.shape}."
      )
    for what, array in (("ids", ids), ("saliency", sal)):
      if array.shape != image.shape[:2] or array.dtype != np.uint8:
        raise ValueError(
            f"{self.name}: {what} must be uint8 {image.shape[:2]} like the "
            f"image, got {array.dtype} {array.shape}."
        )


# ----------------------------------------------------------------------------
# Colour jitter (torchvision ColorJitter semantics).


@dataclasses.dataclass(frozen=True)
class JitterParams:
  """One draw of the colour jitter.

  Attributes:
    order: the enabled ops of JITTER_OPS, in the order they are applied.
    brightness: multiplicative factor.
    contrast: blend factor towards the mean grey.
    saturation: blend factor towards the per-pixel grey.
    hue: shift of the HSV hue, in turns.
  """

  order: tuple[str, ...]
  brightness: float = 1.0
  contrast: float = 1.0
  saturation: float = 1.0
  hue: float = 0.0


def draw_color_jitter(
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> JitterParams:
  """Draws factors U(max(0, 1 - x), 1 + x), a hue U(-h, h), a random order.

  An op whose strength is 0 is disabled, as in torchvision.
  """
  strengths = {
      "brightness": brightness,
      "contrast": contrast,
      "saturation": saturation,
      "hue": hue,
  }
  order = tuple(
      JITTER_OPS[i]
      for i in rng.permutation(len(JITTER_OPS))
      if strengths[JITTER_OPS[i]] > 0
  )
  values = {}
  for op in order:
    x = strengths[op]
    if op == "hue":
      values[op] = float(rng.uniform(-x, x))
    else:
      values[op] = float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x))
  return JitterParams(order=order, **values)


def _grey(planes: np.ndarray) -> np.ndarray:
  return _LUMA[0] * planes[0] + _LUMA[1] * planes[1] + _LUMA[2] * planes[2]


def _shift_hue(planes: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the HSV hue of float RGB [3, ...] in [0, 255] by `shift` turns."""
  r, g, b = planes[0], planes[1], planes[2]
  value = np.maximum(np.maximum(r, g), b)
  chroma = value - np.minimum(np.minimum(r, g), b)
  inv = np.float32(1.0) / np.where(chroma > 0, chroma, np.float32(1.0))
  # Hue in sextants, from the channel holding the maximum (red wins ties).
  hue = np.where(
      value == r,
      (g - b) * inv,
      np.where(value == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv),
  )
  hue6 = hue + np.float32(6.0 * shift)
  out = np.empty_like(planes)
  # HSV -> RGB: channel n is v - c * clip(min(k, 4 - k), 0, 1) with
  # k = (n + 6 h) mod 6 and n = 5, 3, 1 for R, G, B.
  for channel, n in enumerate((5.0, 3.0, 1.0)):
    k = hue6 + np.float32(n)
    # A floor instead of np.mod, which is many times slower on floats.
    k -= np.float32(6.0) * np.floor(k * np.float32(1.0 / 6.0))
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    out[channel] = value - chroma * ramp
  return out


def _jitter_planes(
    planes: np.ndarray,
    params: JitterParams,
    weights: np.ndarray | None = None,
) -> np.ndarray:
  """apply_color_jitter on float32 planes [3, H, W] (the fast layout)."""
  out = planes
  for op in params.order:
    if op == "brightness":
      out = np.clip(out * np.float32(params.brightness), 0, 255)
    elif op == "contrast":
      grey = _grey(out)
      if weights is None:
        mean = grey.mean()
      else:
        mean = (grey * weights).sum() / max(float(weights.sum()), 1e-6)
      c = np.float32(params.contrast)
      out = np.clip(c * out + (1 - c) * np.float32(mean), 0, 255)
    elif op == "saturation":
      s = np.float32(params.saturation)
      out = np.clip(s * out + (1 - s) * _grey(out), 0, 255)
    elif op == "hue":
      out = _shift_hue(out, params.hue)
  return out.astype(np.float32, copy=False)


def apply_color_jitter(
    image: np.ndarray,
    params: JitterParams,
    weights: np.ndarray | None = None,
) -> np.ndarray:
  """Applies one jitter draw.

  Args:
    image: [H, W, 3] RGB, uint8 or float in [0, 255].
    params: from draw_color_jitter.
    weights: optional float [H, W]; the contrast op blends towards the mean
      grey weighted by them (for a pasted object, its alpha) instead of the
      plain mean.

  Returns:
    float32 [H, W, 3] in [0, 255].
  """
  planes = np.moveaxis(np.asarray(image, np.float32), -1, 0)
  return np.moveaxis(_jitter_planes(planes, params, weights), 0, -1)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    weights: np.ndarray | None = None,
) -> np.ndarray:
  """Draws and applies a colour jitter; float32 [H, W, 3] in [0, 255]."""
  params = draw_color_jitter(rng, brightness, contrast, saturation, hue)
  return apply_color_jitter(image, params, weights)


# ----------------------------------------------------------------------------
# Geometry: random affine, crop window, perspective, one warp.


@dataclasses.dataclass(frozen=True)
class AffineParams:
  """One draw of the random affine; ops not drawn keep identity values.

  Attributes:
    order: the applied ops of AFFINE_OPS, first applied first.
    rotation_deg: rotation angle in degrees.
    shear_deg: x-shear angle in degrees.
    translate_xy: (dx, dy) in source pixels.
    scale_xy: (sx, sy) per-axis scale.
  """

  order: tuple[str, ...]
  rotation_deg: float = 0.0
  shear_deg: float = 0.0
  translate_xy: tuple[float, float] = (0.0, 0.0)
  scale_xy: tuple[float, float] = (1.0, 1.0)


def draw_affine(
    rng: np.random.Generator,
    aug_prob: float,
    rotation_degrees: float,
    shear_degrees: float,
    translate_px: float,
    scale_range: tuple[float, float],
) -> AffineParams:
  """Draws the ops (each with probability aug_prob) in a random order."""
  values = {}
  order = []
  for i in rng.permutation(len(AFFINE_OPS)):
    op = AFFINE_OPS[i]
    if rng.random() >= aug_prob:
      continue
    order.append(op)
    if op == "rotation":
      values["rotation_deg"] = float(
          rng.uniform(-rotation_degrees, rotation_degrees)
      )
    elif op == "shear":
      values["shear_deg"] = float(rng.uniform(-shear_degrees, shear_degrees))
    elif op == "translation":
      dx, dy = rng.uniform(-translate_px, translate_px, size=2)
      values["translate_xy"] = (float(dx), float(dy))
    else:
      sx, sy = rng.uniform(scale_range[0], scale_range[1], size=2)
      values["scale_xy"] = (float(sx), float(sy))
  return AffineParams(order=tuple(order), **values)


def _translation(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def affine_matrix(
    params: AffineParams, centre_xy: tuple[float, float]
) -> np.ndarray:
  """Forward float64 [3, 3] of the draw; linear ops act about `centre_xy`."""
  to_centre = _translation(-centre_xy[0], -centre_xy[1])
  back = _translation(centre_xy[0], centre_xy[1])
  matrix = np.eye(3)
  for op in params.order:
    if op == "translation":
      step = _translation(*params.translate_xy)
    else:
      linear = np.eye(3)
      if op == "rotation":
        a = np.deg2rad(params.rotation_deg)
        linear[:2, :2] = [[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]
      elif op == "shear":
        linear[0, 1] = np.tan(np.deg2rad(params.shear_deg))
      else:
        linear[0, 0], linear[1, 1] = params.scale_xy
      step = back @ linear @ to_centre
    matrix = step @ matrix
  return matrix


def draw_crop_window(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale_range: tuple[float, float],
    jitter_px: float,
) -> tuple[float, float, float, float]:
  """Draws a crop window (top, left, window_height, window_width).

  The window has the image's aspect ratio and an area of U(scale_range) of
  the image's; scales above 1 reach past the border (padding). Top and left
  are continuous edge coordinates: the whole image is (-0.5, -0.5, H, W).
  """
  side = np.sqrt(rng.uniform(scale_range[0], scale_range[1]))
  win_h, win_w = height * side, width * side
  starts = []
  for extent, window in ((height, win_h), (width, win_w)):
    slack = extent - window  # Negative when the window is the larger.
    start = -0.5 + rng.uniform(min(0.0, slack), max(0.0, slack))
    starts.append(start + rng.uniform(-jitter_px, jitter_px))
  return float(starts[0]), float(starts[1]), float(win_h), float(win_w)


def window_matrix(
    window: tuple[float, float, float, float], out_h: int, out_w: int
) -> np.ndarray:
  """Forward [3, 3] that maps a window (top, left, h, w) onto [out_h, out_w]."""
  top, left, win_h, win_w = window
  sx, sy = out_w / win_w, out_h / win_h
  return np.array([
      [sx, 0.0, -left * sx - 0.5],
      [0.0, sy, -top * sy - 0.5],
      [0.0, 0.0, 1.0],
  ])


def resize_matrix(height: int, width: int, size: int) -> np.ndarray:
  """Forward [3, 3] of the plain resize of [height, width] to [size, size]."""
  return window_matrix((-0.5, -0.5, height, width), size, size)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The [3, 3] projective map taking 4 points src [4, 2] to dst [4, 2]."""
  a = np.zeros((8, 8))
  b = np.zeros(8)
  for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
    a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
    a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    b[2 * i], b[2 * i + 1] = u, v
  return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def rect_corners(height: float, width: float) -> np.ndarray:
  """Edge corners [4, 2] (x, y) of a [height, width] grid, clockwise."""
  x0, y0, x1, y1 = -0.5, -0.5, width - 0.5, height - 0.5
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def draw_perspective(
    rng: np.random.Generator, height: float, width: float, distortion: float
) -> np.ndarray:
  """Forward [3, 3] moving each corner by U(-d, d) of the width and height."""
  src = rect_corners(height, width)
  moves = rng.uniform(-distortion, distortion, size=(4, 2)) * [width, height]
  return homography(src, src + moves)


def frame_matrix(
    rng: np.random.Generator,
    height: int,
    width: int,
    config: ml_collections.ConfigDict,
) -> np.ndarray:
  """Forward [3, 3]: the random affine, then the crop resized to the frame."""
  params = draw_affine(
      rng,
      config.aug_prob,
      config.rotation_degrees,
      config.shear_degrees,
      config.translate_px,
      tuple(config.scale_range),
  )
  centre = ((width - 1) / 2.0, (height - 1) / 2.0)
  window = draw_crop_window(
      rng,
      height,
      width,
      tuple(config.crop_scale_range),
      config.crop_jitter_px,
  )
  size = config.image_size
  return window_matrix(window, size, size) @ affine_matrix(params, centre)


def _source_points(
    forward: np.ndarray, out_h: int, out_w: int
) -> tuple[np.ndarray, np.ndarray]:
  """Source (x, y) float64 [out_h, out_w] of every output pixel centre."""
  inv = np.linalg.inv(forward)
  x = np.arange(out_w, dtype=np.float64)[None, :]
  y = np.arange(out_h, dtype=np.float64)[:, None]
  sx = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]
  sy = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
  if np.any(inv[2, :2] != 0):
    w = inv[2, 0] * x + inv[2, 1] * y + inv[2, 2]
    sx, sy = sx / w, sy / w
  shape = (out_h, out_w)
  return np.broadcast_to(sx, shape), np.broadcast_to(sy, shape)


def _inside(sx, sy, height: int, width: int) -> np.ndarray:
  # The same test as "the nearest pixel exists", so a pixel is padded in the
  # image exactly where its label is padded.
  return (sx >= -0.5) & (sx < width - 0.5) & (sy >= -0.5) & (sy < height - 0.5)


def _bilinear(planes: np.ndarray, sx, sy) -> np.ndarray:
  """Bilinear samples float32 [C, h, w] of planes [C, H, W] (edge clamped)."""
  channels, height, width = planes.shape
  x0, y0 = np.floor(sx), np.floor(sy)
  fx = (sx - x0).astype(np.float32)
  fy = (sy - y0).astype(np.float32)
  x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
  xa, xb = np.clip(x0, 0, width - 1), np.clip(x0 + 1, 0, width - 1)
  ya = np.clip(y0, 0, height - 1) * width
  yb = np.clip(y0 + 1, 0, height - 1) * width
  corners = (
      (ya + xa, (1 - fx) * (1 - fy)),
      (ya + xb, fx * (1 - fy)),
      (yb + xa, (1 - fx) * fy),
      (yb + xb, fx * fy),
  )
  out = np.zeros((channels,) + sx.shape, np.float32)
  # One plane at a time: gathering scalars is much faster in NumPy than
  # gathering interleaved RGB rows.
  flat = planes.reshape(channels, -1)
  for c in range(channels):
    plane = flat[c]
    for index, weight in corners:
      out[c] += plane[index] * weight
  return out


def _nearest(ids: np.ndarray, sx, sy, inside) -> np.ndarray:
  """Nearest samples of ids [H, W]; 0 where the point is outside."""
  height, width = ids.shape
  xi = np.clip(np.floor(sx + 0.5).astype(np.intp), 0, width - 1)
  yi = np.clip(np.floor(sy + 0.5).astype(np.intp), 0, height - 1)
  return np.where(inside, ids.ravel()[yi * width + xi], 0).astype(ids.dtype)


def _warp_planes(
    planes: np.ndarray,
    ids: np.ndarray | None,
    forward: np.ndarray,
    out_h: int,
    out_w: int,
) -> tuple[np.ndarray, np.ndarray | None]:
  """warp on float32 planes [C, H, W]; returns planes [C, out_h, out_w]."""
  height, width = planes.shape[1:]
  sx, sy = _source_points(forward, out_h, out_w)
  inside = _inside(sx, sy, height, width)
  values = _bilinear(planes, sx, sy)
  values *= inside
  labels = None if ids is None else _nearest(ids, sx, sy, inside)
  return values, labels


def warp(
    image: np.ndarray,
    ids: np.ndarray | None,
    forward: np.ndarray,
    out_h: int,
    out_w: int,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Samples an image (bilinear) and its ids (nearest) through one map.

  Args:
    image: [H, W, C], any real dtype.
    ids: uint8 [H, W] or None.
    forward: [3, 3] map from source to output coordinates (affine or
      projective).
    out_h: output height.
    out_w: output width.

  Returns:
    float32 [out_h, out_w, C] (0 where padded) and uint8 [out_h, out_w]
    (0 where padded) or None.
  """
  planes = np.ascontiguousarray(np.moveaxis(image, -1, 0), np.float32)
  values, labels = _warp_planes(planes, ids, forward, out_h, out_w)
  return np.moveaxis(values, 0, -1), labels


# ----------------------------------------------------------------------------
# Donors: cut, render, paste.


@dataclasses.dataclass(frozen=True)
class Donor:
  """A blob cut from a donor image, ready to be rendered at its scale.

  Attributes:
    rgba: float32 [4, h, w] (channel-first); RGB in [0, 255] and alpha in
      [0, 1] of the blob's box plus a 1 pixel transparent margin (blurred
      when the scale shrinks it a lot).
    scale: output pixels per donor pixel.
  """

  rgba: np.ndarray
  scale: float


def cut_donor(
    source: Source,
    rng: np.random.Generator,
    short_side_px: tuple[float, float],
    max_side_px: float,
) -> Donor | None:
  """Cuts one random object of `source`; None if it has no object.

  Args:
    source: the donor image.
    rng: randomness (the blob, the size).
    short_side_px: range of the rescaled shorter side of the blob's box.
    max_side_px: cap of the rescaled longer side (the frame size).

  Returns:
    The Donor.
  """
  counts = np.bincount(source.ids.ravel(), minlength=256)
  object_ids = np.flatnonzero(counts[1:]) + 1
  if object_ids.size == 0:
    return None
  k = int(rng.choice(object_ids))
  blob = source.ids == k
  rows, cols = np.flatnonzero(blob.any(1)), np.flatnonzero(blob.any(0))
  r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  # A transparent margin so bilinear sampling fades the blob's edge out.
  rgba = np.zeros((4, r1 - r0 + 2, c1 - c0 + 2), np.float32)
  rgba[:3, 1:-1, 1:-1] = np.moveaxis(source.image[r0:r1, c0:c1], -1, 0)
  alpha = np.where(blob[r0:r1, c0:c1], source.saliency[r0:r1, c0:c1], 0)
  # Relative to the blob's strongest saliency: a detector whose maps are
  # weak everywhere (soft RBD output, say) still pastes a labelled object.
  rgba[3, 1:-1, 1:-1] = alpha / np.float32(max(int(alpha.max()), 1))
  short, long = min(r1 - r0, c1 - c0), max(r1 - r0, c1 - c0)
  scale = rng.uniform(short_side_px[0], short_side_px[1]) / short
  scale = min(scale, max_side_px / long)
  if scale < _PREFILTER_BELOW_SCALE:
    # The anti-aliasing sigma of skimage.transform.resize.
    sigma = (1.0 / scale - 1.0) / 2.0
    rgba = ndimage.gaussian_filter(rgba, (0, sigma, sigma), mode="constant")
  return Donor(rgba=rgba, scale=float(scale))


def _render_donor(
    donor: Donor, rng: np.random.Generator, config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray]:
  """Rescales, perspective-warps (one sampling) and colour-jitters a donor.

  Returns:
    patch float32 [3, ph, pw] in [0, 255] and alpha float32 [ph, pw] in
    [0, 1]; the patch is the bounding box of the warped corners.
  """
  h, w = donor.rgba.shape[1:]
  s = donor.scale
  # Pixel-area convention: the scaled grid covers the same extent.
  scaling = np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5], [0, 0, 1]])
  sh, sw = h * s, w * s
  perspective = draw_perspective(rng, sh, sw, config.donor_perspective)
  moved = np.c_[rect_corners(sh, sw), np.ones(4)] @ perspective.T
  moved = moved[:, :2] / moved[:, 2:]
  low = moved.min(0)
  out_w, out_h = np.maximum(np.ceil(moved.max(0) - low), 1).astype(int)
  forward = _translation(-0.5 - low[0], -0.5 - low[1]) @ perspective @ scaling
  rgba, _ = _warp_planes(donor.rgba, None, forward, out_h, out_w)
  alpha = np.clip(rgba[3], 0.0, 1.0)
  params = draw_color_jitter(
      rng, config.brightness, config.contrast, config.saturation, config.hue
  )
  return _jitter_planes(rgba[:3], params, weights=alpha), alpha


def paste(
    frame: np.ndarray,
    labels: np.ndarray,
    patch: np.ndarray,
    alpha: np.ndarray,
    top: int,
    left: int,
    object_id: int,
    max_occlusion: float,
) -> bool:
  """Alpha-blends a patch into a frame unless it hides too much of an object.

  Args:
    frame: float32 [3, S, S] (channel-first), updated in place when pasted.
    labels: uint8 [S, S], updated in place when pasted.
    patch: float32 [3, ph, pw].
    alpha: float32 [ph, pw] in [0, 1].
    top: row of the patch's first row in the frame (may be out of it).
    left: column of the patch's first column.
    object_id: the label of the pasted pixels.
    max_occlusion: the largest allowed fraction of any existing object's
      pixels that the paste may take over.

  Returns:
    Whether it was pasted: False when an object would lose more than
    max_occlusion of its pixels, or when no pasted pixel would be labelled.
  """
  height, width = labels.shape
  ph, pw = alpha.shape
  r0, c0 = max(top, 0), max(left, 0)
  r1, c1 = min(top + ph, height), min(left + pw, width)
  if r1 <= r0 or c1 <= c0:
    return False
  a = alpha[r0 - top : r1 - top, c0 - left : c1 - left]
  covered = a >= ALPHA_LABEL_THRESHOLD
  if not covered.any():
    return False
  region = labels[r0:r1, c0:c1]
  lost = np.bincount(region[covered], minlength=256)
  total = np.bincount(labels.ravel(), minlength=256)
  lost[0] = 0
  if np.any(lost > max_occlusion * total):
    return False
  view = frame[:, r0:r1, c0:c1]
  view *= 1 - a
  view += a * patch[:, r0 - top : r1 - top, c0 - left : c1 - left]
  region[covered] = object_id
  return True


def _draw_offset(rng: np.random.Generator, low: float, high: float) -> int:
  """A uniform integer in [ceil(low), floor(high)] (low if empty)."""
  lo, hi = int(np.ceil(low)), int(np.floor(high))
  return lo if hi < lo else int(rng.integers(lo, hi + 1))


def _local_offset(
    rng: np.random.Generator,
    previous: tuple[int, int, int, int],
    patch_hw: tuple[int, int],
    margin: float,
    size: int,
) -> tuple[int, int]:
  """Top-left of a patch inside the previous box grown by margin per side."""
  offset = []
  for start, extent, patch in (
      (previous[0], previous[2], patch_hw[0]),
      (previous[1], previous[3], patch_hw[1]),
  ):
    lo = max(start - margin, 0.0)
    hi = min(start + extent + margin, float(size)) - patch
    if hi < lo:
      # The patch is larger than the allowed box: let it cover the box.
      lo, hi = hi, lo
    if patch <= size:
      lo, hi = max(lo, 0.0), min(hi, float(size - patch))
    offset.append(_draw_offset(rng, lo, hi))
  return offset[0], offset[1]


# ----------------------------------------------------------------------------
# Sequences.


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.seq_len < 1 or config.image_size < 1:
    raise ValueError(
        f"prep.seq_len ({config.seq_len}) and prep.image_size "
        f"({config.image_size}) must be positive."
    )
  low, high = config.donor_short_side_px
  if not 0 < low <= high:
    raise ValueError(
        f"prep.donor_short_side_px must be 0 < low <= high, got {low, high}."
    )
  if not 0 <= config.max_occlusion <= 1:
    raise ValueError(
        f"prep.max_occlusion must be in [0, 1], got {config.max_occlusion}."
    )


def _paste_first_frame(
    frame: np.ndarray,
    labels: np.ndarray,
    num_objects: int,
    draw_donor: Callable[[np.random.Generator], Source],
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
) -> list[list]:
  """Pastes donors into frame 0 until the sequence has min_labels labels.

  Args:
    frame: float32 [3, S, S], updated in place.
    labels: uint8 [S, S] with ids 0..num_objects, updated in place.
    num_objects: the number of source objects in frame 0.
    draw_donor: returns a random other image.
    rng: randomness.
    config: the prep config.

  Returns:
    One [Donor, box] per pasted object, in id order (ids num_objects + 1,
    ...); box = (top, left, height, width) of its patch in frame 0.
  """
  size = config.image_size
  needed = max(config.min_labels - 1 - num_objects, 0)
  max_draws = _DONOR_DRAWS_PER_LABEL * needed
  if num_objects == 0:
    max_draws = max(max_draws, _MAX_DONOR_DRAWS_FOR_FIRST_OBJECT)
  pasted = []
  previous = None
  for _ in range(max_draws):
    if len(pasted) >= needed and num_objects + len(pasted) > 0:
      break
    if previous is not None and rng.random() < config.same_donor_prob:
      donor_source = previous  # A similar-looking distractor.
    else:
      donor_source = draw_donor(rng)
    donor = cut_donor(
        donor_source, rng, tuple(config.donor_short_side_px), size
    )
    if donor is None:
      continue  # An image without objects is no candidate for reuse either.
    previous = donor_source
    patch, alpha = _render_donor(donor, rng, config)
    object_id = num_objects + len(pasted) + 1
    for _ in range(config.max_paste_attempts):
      top = _draw_offset(rng, 0, size - alpha.shape[0])
      left = _draw_offset(rng, 0, size - alpha.shape[1])
      if paste(
          frame,
          labels,
          patch,
          alpha,
          top,
          left,
          object_id,
          config.max_occlusion,
      ):
        pasted.append([donor, (top, left) + alpha.shape])
        break
  return pasted


def _later_frame(
    t: int,
    planes: np.ndarray,
    source: Source,
    lut: np.ndarray,
    pasted: list[list],
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
  """Frame t > 0: jitter, one warp, then the pasted objects moved locally.

  Args:
    t: the frame index.
    planes: float32 [3, H, W], the source image channel-first.
    source: the source (for its ids).
    lut: uint8 [256], source id -> sequence id (0 = dropped).
    pasted: from _paste_first_frame; the boxes are updated in place.
    rng: randomness.
    config: the prep config.

  Returns:
    float32 [3, S, S] and uint8 [S, S].
  """
  size = config.image_size
  height, width = source.ids.shape
  params = draw_color_jitter(
      rng, config.brightness, config.contrast, config.saturation, config.hue
  )
  jittered = _jitter_planes(planes, params)
  forward = frame_matrix(rng, height, width, config)
  frame, ids = _warp_planes(jittered, source.ids, forward, size, size)
  labels = lut[ids]
  num_source_objects = int(lut.max())
  margin = 0.5 * (config.local_motion_base + t / 10.0) * size
  for i, entry in enumerate(pasted):
    donor, box = entry
    patch, alpha = _render_donor(donor, rng, config)
    for _ in range(config.max_paste_attempts):
      top, left = _local_offset(rng, box, alpha.shape, margin, size)
      if paste(
          frame,
          labels,
          patch,
          alpha,
          top,
          left,
          num_source_objects + i + 1,
          config.max_occlusion,
      ):
        entry[1] = (top, left) + alpha.shape
        break
    # Otherwise the object is absent here; its id stays reserved and its
    # latest box stays the reference of the next frame.
  return frame, labels


def synthesize_sequence(
    source: Source,
    draw_donor: Callable[[np.random.Generator], Source],
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
  """Turns one still image into a synthetic sequence with known labels.

  Args:
    source: the image and its object ids (any size).
    draw_donor: returns a random other image of the same split.
    rng: all randomness comes from it (the same state gives the same
      sequence).
    config: the `prep` fields of configs/davis.py.

  Returns:
    frames uint8 [T, S, S, 3] and labels uint8 [T, S, S], T = seq_len,
    S = image_size. Ids are 1..K over the sequence, every id is present in
    frame 0 and the same object has the same id in every frame.

  Raises:
    ValueError: a bad config, or no foreground object could be made (the
      source has none and no donor provided one).
  """
  _check_config(config)
  size = config.image_size
  height, width = source.ids.shape
  planes = np.ascontiguousarray(np.moveaxis(source.image, -1, 0), np.float32)

  # Frame 0: the plain resize; ids renumbered over what survives it.
  frame0, ids0 = _warp_planes(
      planes, source.ids, resize_matrix(height, width, size), size, size
  )
  present = np.bincount(ids0.ravel(), minlength=256)[1:] > 0
  num_source_objects = int(present.sum())
  lut = np.zeros(256, np.uint8)
  lut[1:][present] = np.arange(1, num_source_objects + 1)
  labels0 = lut[ids0]
  pasted = _paste_first_frame(
      frame0, labels0, num_source_objects, draw_donor, rng, config
  )
  if num_source_objects + len(pasted) == 0:
    raise ValueError(
        f"{source.name}: the image has no object and no donor could be"
        " pasted (every attempt covered too much of another object or was"
        " too small); check that the saliency maps of the split mark objects."
    )

  frames, labels = [frame0], [labels0]
  for t in range(1, config.seq_len):
    frame, frame_labels = _later_frame(
        t, planes, source, lut, pasted, rng, config
    )
    frames.append(frame)
    labels.append(frame_labels)
  frames = np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)
  return np.moveaxis(frames, 1, -1).copy(), np.stack(labels)
