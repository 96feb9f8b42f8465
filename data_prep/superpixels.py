"""Superpixel maps of RGB frames (SPEC 2.3) and their adjacency (SPEC 2.4).

Every method returns int32 [height, width] ids 0..N-1, consecutive in order of
first appearance in raster order, and every superpixel is one 4-connected
region: downstream, pixel components must equal components of the
superpixel adjacency graph (SPEC 6.2), and that graph must be planar.

* `slic`: scikit-image SLIC in Lab colour, the training default.
* `isec`: Iterative over-Segmentation via Edge Clustering (Mendonca and
  Oliveira, Image and Vision Computing 2018), written from SPEC 2.3. Binary
  area filters (component sizes from `ndi.label` + `np.bincount`) replace
  scikit-image's grey-level max-tree ones and thinning visits only pixels next
  to the background: about 0.2 s per 854 x 480 frame on one core, against
  2-3 s for the same steps with scikit-image (boundaries equal up to a few
  pixels, from float rounding in the box filter).
* `felzenszwalb`: scikit-image's graph-based segmentation, an option.

ISEC: the choices SPEC 2.3 leaves open.

1. Grey image: scikit-image's `rgb2gray` weights, values in [0, 1].
2. Gradient at scale sigma = 1 + it: Sobel derivatives of the grey image
   smoothed by a Gaussian of that sigma (replicated border); magnitude =
   hypot of the two. The magnitude is NOT normalised: the thresholds
   `exp(0.02 it) / 10` (high) and `0.1 x high` (low) are absolute, in Sobel
   units of a [0, 1] image (about 8 x the grey step per pixel), as in the
   authors' Python ISEC (scikit-image's Canny magnitude). Dividing by the
   frame's maximum instead (MATLAB's `edge`) makes the thresholds relative
   to the strongest edge: 1.5-2 x more segments on textured frames (1424
   instead of 875 on scikit-image's `chelsea` at 854 x 480), outside the
   330-880 that SPEC reports. Only the `nit` scales in use are computed.
3. Non-maximum suppression with the gradient direction quantised into four
   sectors (0, 45, 90, 135 degrees): a pixel survives when its magnitude is
   positive and at least that of both neighbours along the gradient.
4. Hysteresis: 8-connected components of the low mask holding a high pixel.
5. Edge density: box filter (`reflect` border), min-max rescaled to [0, 1];
   its support (> 0) is thinned by at most (size - 1) / 2 iterations of
   `skimage.morphology.thin` (reimplemented, same result) after padding by
   reflection, so that the frame border does not eat into it (as in the
   authors' code); the density is kept on the thinned support.
6. Area closing / opening of a binary map: fill background components
   (holes, also those touching the frame border) / remove foreground
   components of fewer pixels than the area, which is what scikit-image's
   `area_closing` / `area_opening` do on binary maps. The final closing
   (area 20) is 4-connected like the per-iteration ones; the final thinning
   runs (f_order - 1) / 2 = 5 iterations.
7. Inner shell and "3x3 neighbourhood all edge": a 3x3 erosion in which the
   outside of the frame counts as edge.
8. Boundary pixels take the largest id among their 4-neighbours that have
   one, repeated until all have one. SPEC says 8 neighbours; a diagonal
   neighbour's id can join a pixel to its superpixel only at a corner,
   splitting the superpixel into two 4-connected pieces (it happens, e.g.
   once on `astronaut` at 240 x 320), which this rule rules out. It moves
   about 1.5 % of boundary pixels to the other side of the boundary and
   never changes the count.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import skimage.measure
import skimage.segmentation

_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = ndi.generate_binary_structure(2, 2)
# scikit-image's rgb2gray weights (ITU-R 709 luma).
_LUMA = np.array([0.2125, 0.7154, 0.0721], np.float32)
# tan(22.5 degrees): the gradient direction sectors of non-maximum suppression.
_TAN_22_5 = np.float32(np.tan(np.pi / 8))


class SuperpixelError(ValueError):
  """A frame has more superpixels than the configuration allows."""


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        "Superpixels need an 8-bit RGB frame uint8 [height, width, 3]; got"
        f" {image.dtype} {list(image.shape)}."
    )
  return image


def make_consecutive(segments: np.ndarray) -> np.ndarray:
  """Renumbers ids to 0..N-1 in order of first appearance in raster order.

  Args:
    segments: integer [height, width] ids, any values.

  Returns:
    int32 [height, width]; the first pixel (row-major) gets id 0, the first
    pixel with another id gets 1, and so on.
  """
  segments = np.asarray(segments)
  flat = segments.ravel()
  values, first, inverse = np.unique(
      flat, return_index=True, return_inverse=True
  )
  rank = np.empty(len(values), np.int32)
  rank[np.argsort(first)] = np.arange(len(values), dtype=np.int32)
  return rank[inverse].reshape(segments.shape)


def _split_disconnected(segments: np.ndarray) -> np.ndarray:
  """Gives every 4-connected piece of a superpixel its own id, [H, W]."""
  # background=-1 never occurs, so every id (0 included) is labelled.
  return skimage.measure.label(segments, background=-1, connectivity=1)


def slic(
    image: np.ndarray,
    *,
    n_segments: int = 300,
    compactness: float = 20.0,
    sigma: float = 1.0,
) -> np.ndarray:
  """SLIC superpixels of an RGB frame, in Lab colour.

  Args:
    image: uint8 [height, width, 3].
    n_segments: the approximate number of superpixels wanted.
    compactness: colour versus space weight; larger is more square.
    sigma: Gaussian pre-smoothing, pixels.

  Returns:
    int32 [height, width] consecutive ids; each superpixel is 4-connected
    (`enforce_connectivity`).
  """
  image = _check_image(image)
  segments = skimage.segmentation.slic(
      image,
      n_segments=n_segments,
      compactness=compactness,
      sigma=sigma,
      convert2lab=True,
      enforce_connectivity=True,
      start_label=0,
      channel_axis=-1,
  )
  return make_consecutive(segments)


def felzenszwalb(
    image: np.ndarray,
    *,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 50,
) -> np.ndarray:
  """Felzenszwalb-Huttenlocher graph segmentation of an RGB frame.

  Args:
    image: uint8 [height, width, 3].
    scale: larger gives larger segments.
    sigma: Gaussian pre-smoothing, pixels.
    min_size: the smallest segment, pixels (before the connectivity split).

  Returns:
    int32 [height, width] consecutive ids, each superpixel 4-connected.
  """
  image = _check_image(image)
  segments = skimage.segmentation.felzenszwalb(
      image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1
  )
  # The graph is 8-connected: a segment may hang together only at corners.
  return make_consecutive(_split_disconnected(segments))


# ---------------------------------------------------------------------------
# ISEC.


def _gradient(grey: np.ndarray, sigma: float):
  """Sobel gradient of the Gaussian-smoothed grey image, float32 [H, W] each.

  Returns:
    (magnitude, d/drow, d/dcol), in Sobel units of the [0, 1] grey image
    (about 8 x the grey difference per pixel), not normalised.
  """
  smoothed = ndi.gaussian_filter(grey, sigma, mode="nearest")
  d_row = ndi.sobel(smoothed, axis=0, mode="nearest")
  d_col = ndi.sobel(smoothed, axis=1, mode="nearest")
  return np.hypot(d_row, d_col), d_row, d_col


def _non_maximum_suppression(magnitude, d_row, d_col) -> np.ndarray:
  """bool [H, W]: local maxima of magnitude across the edge direction."""
  height, width = magnitude.shape
  padded = np.pad(magnitude, 1, mode="edge")

  def neighbours(dr, dc):
    forward = padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]
    backward = padded[1 - dr : 1 - dr + height, 1 - dc : 1 - dc + width]
    return np.maximum(forward, backward)

  abs_row, abs_col = np.abs(d_row), np.abs(d_col)
  across_cols = abs_row <= _TAN_22_5 * abs_col  # Gradient along a row.
  across_rows = abs_col <= _TAN_22_5 * abs_row
  same_sign = (d_row * d_col) > 0
  rival = np.where(
      across_cols,
      neighbours(0, 1),
      np.where(
          across_rows,
          neighbours(1, 0),
          np.where(same_sign, neighbours(1, 1), neighbours(1, -1)),
      ),
  )
  return (magnitude > 0) & (magnitude >= rival)


def _hysteresis(magnitude, maxima, high: float, low: float) -> np.ndarray:
  """bool [H, W]: 8-connected low-threshold edges that hold a high pixel."""
  low_mask = maxima & (magnitude >= low)
  labels, count = ndi.label(low_mask, structure=_EIGHT)
  keep = np.zeros(count + 1, bool)
  keep[labels[low_mask & (magnitude >= high)]] = True
  keep[0] = False
  return keep[labels]


def _area_open(mask: np.ndarray, area: int, structure) -> np.ndarray:
  """Removes connected components of mask with fewer than area pixels."""
  labels, _ = ndi.label(mask, structure=structure)
  sizes = np.bincount(labels.ravel())
  keep = sizes >= area
  keep[0] = False
  return keep[labels]


def _area_close(mask: np.ndarray, area: int, structure) -> np.ndarray:
  """Fills background components of mask with fewer than area pixels."""
  return ~_area_open(~mask, area, structure)


def _guo_hall_tables() -> tuple[np.ndarray, np.ndarray]:
  """Deletion tables of the two Guo-Hall thinning sub-iterations, bool [256].

  A pixel's 8 neighbours x1..x8 (east, then anticlockwise) are bits 0..7 of
  the table index; these are the tables of scikit-image's `thin`.
  """
  code = np.arange(256)
  bits = [((code >> i) & 1).astype(bool) for i in range(8)]

  def x(k):  # x(1)..x(8), and x(9) = x(1).
    return bits[(k - 1) % 8]

  # One 8-connected run of foreground around the pixel (it is simple) ...
  crossings = sum(
      ~x(2 * i - 1) & (x(2 * i) | x(2 * i + 1)) for i in range(1, 5)
  )
  n1 = sum(x(2 * k - 1) | x(2 * k) for k in range(1, 5))
  n2 = sum(x(2 * k) | x(2 * k + 1) for k in range(1, 5))
  # ... and not the end of a line or an isolated pixel.
  ends = np.minimum(n1, n2)
  simple = (crossings == 1) & (ends >= 2) & (ends <= 3)
  # Each sub-iteration peels one side (south-east, then north-west).
  first = simple & ~((x(2) | x(3) | ~x(8)) & x(1))
  second = simple & ~((x(6) | x(7) | ~x(4)) & x(5))
  return first, second


_GUO_HALL = _guo_hall_tables()


def _thin(mask: np.ndarray, num_iter: int) -> np.ndarray:
  """At most num_iter Guo-Hall thinning iterations, bool [H, W].

  The result equals `skimage.morphology.thin(mask, max_num_iter=num_iter)`
  on the mask padded by reflection, so that the frame border is no border
  to thinning. Only pixels next to the background can be deleted, so each
  sub-iteration looks at those alone (a few % of the frame), not at every
  pixel: about 3 x faster than scikit-image on edge-density supports.

  Args:
    mask: bool [H, W].
    num_iter: at most this many iterations (each of two sub-iterations).
  """
  if num_iter <= 0:
    return mask
  # A sub-iteration moves information by one pixel, so 2 * num_iter + 1
  # mirrored pixels are as good as an endless mirror.
  pad = 2 * num_iter + 1
  padded = np.pad(mask, pad, mode="reflect")
  # One more zero ring: neighbour look-ups never leave the array.
  image = np.pad(padded, 1).astype(np.uint8)
  flat = image.ravel()
  stride = image.shape[1]
  offsets = np.array(
      [1, 1 - stride, -stride, -1 - stride, -1, stride - 1, stride, stride + 1]
  )
  shifts = np.arange(8, dtype=np.uint8)
  outside = ~ndi.binary_erosion(padded, structure=_EIGHT, border_value=0)
  rows, cols = np.nonzero(padded & outside)
  candidates = (rows + 1) * stride + (cols + 1)
  for _ in range(num_iter):
    changed = False
    for table in _GUO_HALL:
      neighbourhood = flat[candidates[:, None] + offsets] << shifts
      delete = table[np.bitwise_or.reduce(neighbourhood, axis=1)]
      if not delete.any():
        continue
      changed = True
      gone = candidates[delete]
      flat[gone] = 0
      # The next candidates: survivors, and what the deletions uncovered.
      uncovered = (gone[:, None] + offsets).ravel()
      uncovered = uncovered[flat[uncovered] == 1]
      keep = np.zeros(flat.size, bool)
      keep[candidates[~delete]] = True
      keep[uncovered] = True
      candidates = np.flatnonzero(keep)
    if not changed:
      break
  return image[1 + pad : -1 - pad, 1 + pad : -1 - pad].astype(bool)


def _interior(mask: np.ndarray) -> np.ndarray:
  """Pixels whose whole 3x3 neighbourhood is in mask (outside counts in)."""
  return ndi.binary_erosion(mask, structure=_EIGHT, border_value=1)


def _fill_edges(labels: np.ndarray) -> np.ndarray:
  """Gives every 0 pixel the largest id among its 4-neighbours, repeatedly.

  Args:
    labels: int32 [H, W], 0 on edge pixels, at least one non-zero pixel.

  Returns:
    int32 [H, W] without zeros.
  """
  height, width = labels.shape
  padded = np.pad(labels, 1)
  rows, cols = np.nonzero(labels == 0)
  rows, cols = rows + 1, cols + 1
  while rows.size:
    best = np.maximum(
        np.maximum(padded[rows - 1, cols], padded[rows + 1, cols]),
        np.maximum(padded[rows, cols - 1], padded[rows, cols + 1]),
    )
    # Updating only after all gathers keeps each round a function of the
    # previous one, independent of the pixel order.
    done = best > 0
    padded[rows[done], cols[done]] = best[done]
    rows, cols = rows[~done], cols[~done]
  return padded[1 : height + 1, 1 : width + 1]


def isec_boundaries(
    image: np.ndarray, *, f_order: int = 11, nit: int = 4
) -> np.ndarray:
  """ISEC's boundary map, before the regions are labelled.

  Args:
    image: uint8 [height, width, 3].
    f_order: see `isec`.
    nit: see `isec`.

  Returns:
    bool [height, width]: True on boundary pixels, thin lines that cut the
    frame into the superpixels' cores.
  """
  image = _check_image(image)
  grey = (image.astype(np.float32) @ _LUMA) / np.float32(255.0)
  boundaries = np.zeros(grey.shape, bool)
  for it in range(nit):
    magnitude, d_row, d_col = _gradient(grey, 1.0 + it)
    maxima = _non_maximum_suppression(magnitude, d_row, d_col)
    high = np.exp(0.02 * it) / 10.0
    edges = _hysteresis(magnitude, maxima, high, 0.1 * high)

    # Edge density: dense where edges cluster, so the support of the density
    # merges nearby edges before thinning draws one line through them.
    size = max(3, f_order - 2 * it)
    density = ndi.uniform_filter(
        edges.astype(np.float32), size=size, mode="reflect"
    )
    low, peak = density.min(), density.max()
    if peak > low:
      density = (density - low) / (peak - low)
    else:
      density = np.zeros_like(density)
    density *= _thin(density > 0, (size - 1) // 2)

    # Later iterations keep only denser (more reliable) boundaries.
    region = density > 0.05 * it
    region = _area_close(region, 10 + 5 * it, _FOUR)
    boundaries |= region & ~_interior(region)

  boundaries = _area_close(boundaries, 20, _FOUR)
  boundaries = _thin(boundaries, (f_order - 1) // 2)
  boundaries &= ~_interior(boundaries)
  return _area_open(boundaries, 20, _EIGHT)


def isec(image: np.ndarray, *, f_order: int = 11, nit: int = 4) -> np.ndarray:
  """ISEC superpixels of an RGB frame; no target count (see module doc).

  Args:
    image: uint8 [height, width, 3].
    f_order: the edge-density box filter size of the first iteration; it
      shrinks by 2 per iteration, down to 3.
    nit: iterations, one per Gaussian scale sigma = 1..nit.

  Returns:
    int32 [height, width] consecutive ids, each superpixel 4-connected:
    the 4-connected regions between boundaries, boundary pixels joined to a
    neighbouring region.
  """
  boundaries = isec_boundaries(image, f_order=f_order, nit=nit)
  labels, count = ndi.label(~boundaries, structure=_FOUR)
  if count == 0:
    return np.zeros(boundaries.shape, np.int32)
  return make_consecutive(_fill_edges(labels.astype(np.int32)))


# ---------------------------------------------------------------------------
# Configured use.


_METHODS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "slic": lambda image, c: slic(
        image,
        n_segments=c.slic_n_segments,
        compactness=c.slic_compactness,
        sigma=c.slic_sigma,
    ),
    "isec": lambda image, c: isec(
        image, f_order=c.isec_f_order, nit=c.isec_nit
    ),
    "felzenszwalb": lambda image, c: felzenszwalb(
        image, scale=c.fz_scale, sigma=c.fz_sigma, min_size=c.fz_min_size
    ),
}

# What lowers the count, per method, for the error message.
_FEWER = {
    "slic": "lower `slic_n_segments`",
    "isec": "raise `isec_f_order` or use smaller frames",
    "felzenszwalb": "raise `fz_scale` or `fz_min_size`",
}


def compute(image: np.ndarray, config, *, source: str = "<image>"):
  """The configured superpixel map of one frame.

  Args:
    image: uint8 [height, width, 3].
    config: the superpixel settings (`config.train_superpixels` or
      `config.eval_superpixels`): method, max_superpixels and the method's
      fields.
    source: the frame's name for error messages (file, video and frame).

  Returns:
    int32 [height, width] ids 0..N-1, N <= config.max_superpixels.

  Raises:
    ValueError: unknown method, or an image that is not uint8 RGB.
    SuperpixelError: more than config.max_superpixels superpixels.
  """
  method = config.method
  if method not in _METHODS:
    raise ValueError(
        f"Unknown superpixel method {method!r} in the config; valid methods:"
        f" {', '.join(sorted(_METHODS))}."
    )
  segments = _METHODS[method](image, config)
  count = int(segments.max()) + 1
  if count > config.max_superpixels:
    raise SuperpixelError(
        f"{source}: {method} gave {count} superpixels, more than"
        f" max_superpixels = {config.max_superpixels}. Raise"
        " `max_superpixels` in the superpixel config (e.g."
        " config.eval_superpixels.max_superpixels) or use fewer segments"
        f" ({_FEWER[method]})."
    )
  return segments


def adjacency(segments: np.ndarray) -> np.ndarray:
  """Pairs of superpixels that touch horizontally or vertically.

  Args:
    segments: integer [height, width] ids >= 0 (usually 0..N-1).

  Returns:
    int32 [E, 2]: each unordered pair of touching ids once, as (a, b) with
    a < b, sorted lexicographically; shape [0, 2] for a single superpixel.
    Diagonal contact alone does not count.
  """
  segments = np.asarray(segments).astype(np.int64)
  if segments.size and segments.min() < 0:
    raise ValueError(
        f"Superpixel ids must be >= 0; got {segments.min()} (use"
        " make_consecutive first)."
    )
  # Right and lower neighbours: each 4-adjacent pixel pair seen once.
  first = np.concatenate([segments[:, :-1].ravel(), segments[:-1].ravel()])
  second = np.concatenate([segments[:, 1:].ravel(), segments[1:].ravel()])
  differ = first != second
  low = np.minimum(first[differ], second[differ])
  high = np.maximum(first[differ], second[differ])
  # One key per pair that sorts like (low, high): unique sorts and dedupes.
  span = int(segments.max()) + 1 if segments.size else 1
  keys = np.unique(low * span + high)
  return np.stack([keys // span, keys % span], axis=1).astype(np.int32)
