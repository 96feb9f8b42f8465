r"""Built-in saliency: robust background detection (RBD), SPEC 2.1.

Zhu, Liang, Wei and Sun, "Saliency Optimization from Robust Background
Detection", CVPR 2014. On a graph of SLIC superpixels, a region is background
when it touches the image boundary a lot for its size (boundary
connectivity); the contrast of each region to the likely background and the
background probability are then combined by a small least-squares problem.

Saliency maps for a folder of images (8-bit PNGs with the same stems, ready
for `config.prep.saliency_dir`; existing outputs are kept):

  python -m data_prep.saliency --images $IMAGES --out $SALIENCY

A figure of the detector on images bundled with scikit-image:

  python -m data_prep.saliency --figure docs/images/rbd.png
"""

import argparse
import functools
import multiprocessing
import os
from typing import Optional, Sequence

import imageio.v3 as iio
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse import linalg as sparse_linalg
import skimage.color
import skimage.filters
import skimage.segmentation
import skimage.transform
import tqdm

from data_prep import image_io
from data_prep import masks

# SLIC as in the authors' code (compactness 20 in Lab units), after a light
# blur: on pixel noise an unblurred SLIC returns fragments that its
# connectivity step then merges into very few superpixels, or one.
_SLIC_COMPACTNESS = 20.0
_SLIC_SIGMA = 1.0
# The settings of the authors' released code (Zhu et al.'s MATLAB
# `SaliencyOptimization`), which the published figures come from; where the
# paper gives other values, the code's are used (README of benchmarks,
# "Saliency"):
# - superpixels within this many pixels of the image's edge are the boundary
#   (the paper: those touching it);
_BOUNDARY_BAND_PX = 8
# - bounds of the adaptive sigma of geodesic distances (the paper: 10);
_GEO_SIGMA_RANGE = (5.0, 10.0)
# - upper bound of the adaptive sigma of the smoothness term (the paper: 10);
_NEI_SIGMA_MAX = 20.0
_SIGMA_BND_CON = 1.0
# - spatial sigma of the weighted contrast, coordinates in [0, 1] (the
#   paper: 0.25);
_SIGMA_SPA = 0.4
_MU = 0.1  # Smoothness weight floor on direct neighbours.
# - the background term weighs this much more than the foreground term, and
#   a superpixel of boundary connectivity above _SURE_BACKGROUND gets weight
#   _SURE_WEIGHT (not in the paper);
_BG_LAMBDA = 5.0
_SURE_BACKGROUND = 3.0
_SURE_WEIGHT = 1000.0
# - the neighbour colour distances whose mean measures the contrast of the
#   image: the largest 1 %.
_TOP_RATE = 0.01
# scipy's graph routines read a weight of 0 as "no edge": identical colours
# must stay connected.
_MIN_EDGE = 1e-6
# Superpixels make RBD's cost nearly independent of the image size, but SLIC
# itself is not: the command line works at this size, maps are resized back.
_MAX_SIDE = 400
_FIGURE_IMAGES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "horse.png",
)
_FIGURE_ROW_HEIGHT = 160


def _superpixel_graph(image: np.ndarray, n_segments: int):
  """SLIC superpixels and their statistics.

  Args:
    image: uint8 [H, W, 3].
    n_segments: about this many superpixels.

  Returns:
    segments: int [H, W], consecutive ids 0..N-1.
    colour: float [N, 3], mean Lab colour.
    position: float [N, 2], mean (row / H, col / W).
    adjacent: int [E, 2], 4-adjacent pairs (i < j), each once.
    boundary: int [B], the superpixels within _BOUNDARY_BAND_PX of the
      image's edge.
  """
  h, w = image.shape[:2]
  lab = skimage.color.rgb2lab(image)
  segments = skimage.segmentation.slic(
      image,
      n_segments=n_segments,
      compactness=_SLIC_COMPACTNESS,
      sigma=_SLIC_SIGMA,
      start_label=0,
      convert2lab=True,
      channel_axis=-1,
  )
  # SLIC may leave unused ids after enforcing connectivity.
  _, segments = np.unique(segments, return_inverse=True)
  segments = segments.reshape(h, w)
  n = int(segments.max()) + 1
  flat = segments.ravel()
  count = np.bincount(flat, minlength=n).astype(np.float64)
  colour = (
      np.stack([np.bincount(flat, lab[..., c].ravel(), n) for c in range(3)], 1)
      / count[:, None]
  )
  rows, cols = np.mgrid[:h, :w]
  position = (
      np.stack(
          [
              np.bincount(flat, rows.ravel() / h, n),
              np.bincount(flat, cols.ravel() / w, n),
          ],
          1,
      )
      / count[:, None]
  )
  pairs = np.concatenate([
      np.stack([segments[:, :-1].ravel(), segments[:, 1:].ravel()], 1),
      np.stack([segments[:-1].ravel(), segments[1:].ravel()], 1),
  ])
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  adjacent = np.unique(np.sort(pairs, axis=1), axis=0)
  band = _BOUNDARY_BAND_PX
  boundary = np.unique(
      np.concatenate([
          segments[:band].ravel(),
          segments[-band:].ravel(),
          segments[:, :band].ravel(),
          segments[:, -band:].ravel(),
      ])
  )
  return segments, colour, position, adjacent, boundary


def _pairwise_distance(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, N] Euclidean distances."""
  return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def _weights(distance: np.ndarray, sigma: float) -> np.ndarray:
  """exp(-d^2 / (2 sigma^2)), and 0 beyond 3 sigma (as the authors' code)."""
  weight = np.exp(-(distance**2) / (2 * sigma**2))
  return np.where(distance > 3 * sigma, 0.0, weight)


def _mean_nearest(d_app: np.ndarray, near: np.ndarray) -> float:
  """Mean over superpixels of the colour distance to the nearest `near` one."""
  nearest = np.where(near, d_app, np.inf).min(1)
  nearest = nearest[np.isfinite(nearest)]
  return float(nearest.mean()) if len(nearest) else 0.0


def _image_statistics(d_app: np.ndarray, link: np.ndarray):
  """The colour statistics that set RBD's clip value and sigmas.

  Following the authors' code (the paper uses fixed values): the mean colour
  distance of each superpixel to its most similar direct neighbour (`min1`)
  and to its most similar neighbour at most two steps away (`min2`), and
  the mean of the largest 1 % of neighbour distances (`top`, the image's
  contrast). `min2` is taken off every edge of the geodesic graph: without
  it, a smooth gradient (a sky, a blurred wall) adds up small steps into a
  large geodesic distance and splits one background into many regions.

  Args:
    d_app: [N, N] colour distances.
    link: bool [N, N], spatial adjacency, no self-loops.

  Returns:
    clip, geodesic sigma, smoothness sigma (Lab units).
  """
  two_steps = link | (link.astype(np.float32) @ link.astype(np.float32) > 0)
  np.fill_diagonal(two_steps, False)
  min1 = _mean_nearest(d_app, link)
  min2 = _mean_nearest(d_app, two_steps)
  edges = np.sort(d_app[np.triu(link, 1)])[::-1]
  top = float(edges[: max(1, round(_TOP_RATE * len(edges)))].mean()) if len(
      edges
  ) else 0.0
  low, high = _GEO_SIGMA_RANGE
  geo_sigma = max(min(high, 3 * min1, top / 10), low)
  # A flat image has no contrast at all: keep the smoothness finite.
  nei_sigma = max(min(3 * min1, 0.2 * top, _NEI_SIGMA_MAX), 1e-3)
  return min2, geo_sigma, nei_sigma


def rbd(image: np.ndarray, *, n_segments: int = 200) -> np.ndarray:
  """Saliency of an image by robust background detection.

  Args:
    image: uint8 [H, W, 3] RGB.
    n_segments: about this many SLIC superpixels (the authors' code uses
      one per 600 pixels: 200 on an image of 400 x 300 pixels).

  Returns:
    float32 [H, W] in [0, 1]: each superpixel's optimised saliency, stretched
    to the full range as in the authors' code (so an image without a clear
    object still has a maximum of 1: the binarisation in `to_uint8` decides).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"rbd expects uint8 [H, W, 3], got {image.dtype} {image.shape}."
    )
  segments, colour, position, adjacent, boundary = _superpixel_graph(
      image, n_segments
  )
  n = len(colour)
  d_app = _pairwise_distance(colour)  # [N, N]
  i, j = adjacent[:, 0], adjacent[:, 1]
  link = np.zeros((n, n), bool)
  link[i, j] = True
  link[j, i] = True
  clip, geo_sigma, nei_sigma = _image_statistics(d_app, link)

  # Geodesic distances on the graph of neighbours plus a clique on the
  # boundary superpixels: the whole boundary counts as one background region
  # even when it is split by an object touching the edge. Every edge is
  # shortened by the clip value, down to (almost) free: an exact 0 would read
  # as "no edge".
  geo_link = link.copy()
  geo_link[np.ix_(boundary, boundary)] = True
  np.fill_diagonal(geo_link, False)
  graph = np.where(geo_link, np.maximum(d_app - clip, _MIN_EDGE), 0)
  d_geo = csgraph.dijkstra(graph, directed=False)  # [N, N]

  # Boundary connectivity: the boundary length of the soft region around
  # each superpixel over the square root of its area, both in superpixels.
  similarity = _weights(d_geo, geo_sigma)  # [N, N]
  area = similarity.sum(1)
  length = similarity[:, boundary].sum(1)
  bnd_con = length / np.sqrt(area)
  bg_prob = 1 - np.exp(-(bnd_con**2) / (2 * _SIGMA_BND_CON**2))  # [N]
  bg_weight = np.where(bnd_con > _SURE_BACKGROUND, _SURE_WEIGHT, bg_prob)

  # Contrast to nearby regions, each weighted by its background probability.
  w_spa = _weights(_pairwise_distance(position), _SIGMA_SPA)
  w_ctr = (d_app * w_spa * bg_prob[None, :]).sum(1)
  span = w_ctr.max() - w_ctr.min()
  # Below 1e-6 (Lab units) the contrast is rounding noise of a flat image,
  # which must not be stretched into an object.
  w_fg = np.zeros(n)
  if span > 1e-6:
    w_fg = (w_ctr - w_ctr.min()) / span
    # Contrast below Otsu's threshold is no foreground evidence at all,
    # which keeps cluttered backgrounds dark.
    w_fg[w_fg < skimage.filters.threshold_otsu(w_fg)] = 0

  # min sum lambda w_bg s^2 + sum w_fg (s - 1)^2 + sum_{i~j} w_ij (s_i -
  # s_j)^2: setting the gradient to zero gives (diag(lambda w_bg + w_fg) + L)
  # s = w_fg with L the graph Laplacian of the smoothness weights. Those
  # link superpixels up to two steps apart and the boundary superpixels among
  # themselves (colour weights, cut at 3 sigma), plus _MU between direct
  # neighbours. The system is sparse; a sparse solve also stays clear of
  # multithreaded BLAS, whose start-up dwarfs a 200 x 200 problem.
  smooth_link = link | (link.astype(np.float32) @ link.astype(np.float32) > 0)
  smooth_link[np.ix_(boundary, boundary)] = True
  np.fill_diagonal(smooth_link, False)
  smooth = np.where(smooth_link, _weights(d_app, nei_sigma), 0.0)
  smooth = smooth + _MU * link
  rows, cols = np.nonzero(np.triu(smooth, 1))
  w_ij = smooth[rows, cols]
  degree = np.bincount(rows, w_ij, n) + np.bincount(cols, w_ij, n)
  # A tiny ridge keeps the system regular if some superpixel has no weight
  # at all (w_bg = w_fg = 0 and no neighbour: a one-superpixel image).
  diagonal = degree + _BG_LAMBDA * bg_weight + w_fg + 1e-9
  system = sparse.coo_matrix(
      (
          np.concatenate([diagonal, -w_ij, -w_ij]),
          (
              np.concatenate([np.arange(n), rows, cols]),
              np.concatenate([np.arange(n), cols, rows]),
          ),
      ),
      shape=(n, n),
  ).tocsc()
  s = sparse_linalg.spsolve(system, w_fg)
  span = s.max() - s.min()
  s = (s - s.min()) / span if span > 1e-6 else np.zeros(n)
  return s[segments].astype(np.float32)


def binarisation_threshold(saliency: np.ndarray) -> float:
  """The built-in detector's object threshold: Otsu's, at least 0.1.

  Otsu's threshold splits the histogram of the map into its two modes; RBD
  maps are close to bimodal, and unlike the "twice the mean" rule it keeps
  large objects (those over half the image, where twice the mean exceeds
  the maximum). The floor of 0.1 keeps faint noise out of the object when a
  map is almost flat.

  Args:
    saliency: float [H, W] in [0, 1].

  Returns:
    The threshold; pixels strictly above it are object.
  """
  saliency = np.asarray(saliency, np.float64)
  if saliency.max() - saliency.min() < 1e-6:
    return 1.0  # A flat map has no object.
  return max(float(skimage.filters.threshold_otsu(saliency)), 0.1)


def to_uint8(saliency: np.ndarray) -> np.ndarray:
  """A soft 8-bit saliency map whose zero means "not the object".

  Args:
    saliency: float [H, W] in [0, 1], e.g. from `rbd`.

  Returns:
    uint8 [H, W]: 0 at or below `binarisation_threshold`, above it the soft
    value times 255, at least 1 (so that `map > 0` is exactly the object,
    the rule applied to external saliency maps too).
  """
  saliency = np.clip(np.asarray(saliency, np.float64), 0, 1)
  keep = saliency > binarisation_threshold(saliency)
  soft = np.maximum(np.round(saliency * 255), 1)
  return np.where(keep, soft, 0).astype(np.uint8)


def pseudo_mask(saliency_uint8: np.ndarray) -> np.ndarray:
  """The object mask of an 8-bit map from `to_uint8` (or any detector).

  `to_uint8` has already zeroed everything at or below the RBD threshold
  (Otsu's, at least 0.1, see `binarisation_threshold`), so the built-in
  detector's maps follow the rule SPEC 2.1 sets for external maps: object
  where the map is nonzero.

  Args:
    saliency_uint8: uint8 [H, W], as `to_uint8` returns and
      `load_saliency` reads.

  Returns:
    bool [H, W].

  Raises:
    ValueError: for a float map: `rbd`'s raw output is almost nowhere
      exactly 0, so `> 0` would take the whole image as the object.
  """
  saliency_uint8 = np.asarray(saliency_uint8)
  if saliency_uint8.dtype != np.uint8:
    raise ValueError(
        f"pseudo_mask expects a uint8 map, got {saliency_uint8.dtype}. Pass"
        " rbd's float map through to_uint8 first: it applies the threshold."
    )
  return masks.binarize_saliency(saliency_uint8)


def load_saliency(
    path: str, *, expected_shape: Optional[Sequence[int]] = None
) -> np.ndarray:
  """Reads an 8-bit saliency map, e.g. from an external detector.

  Args:
    path: an image file (PNG, JPEG, ...): greyscale, or RGB(A) whose
      channels are averaged (alpha dropped); 16-bit maps keep their top 8
      bits, boolean maps become 0 / 255.
    expected_shape: (H, W) of the image the map belongs to, if known.

  Returns:
    uint8 [H, W].

  Raises:
    ValueError: naming the file, when it cannot be read, is not a 2-D map,
      or its size differs from expected_shape.
  """
  try:
    saliency = np.asarray(iio.imread(path))
  except Exception as e:  # pylint: disable=broad-except
    raise image_io.InputError(
        f"Saliency map {path} cannot be read ({type(e).__name__}: {e}). It"
        " is truncated or not an image: regenerate or delete it."
    ) from e
  if saliency.ndim == 3 and saliency.shape[-1] in (1, 2, 3, 4):
    # Greyscale + alpha has 2 channels, RGB(A) 3 or 4: drop alpha, average.
    colour = saliency[..., :1] if saliency.shape[-1] <= 2 else saliency[..., :3]
    saliency = colour.astype(np.float64).mean(-1)
    if np.issubdtype(colour.dtype, np.integer):
      saliency = np.round(saliency).astype(colour.dtype)
    else:
      saliency = saliency.astype(colour.dtype)
  if saliency.ndim != 2:
    raise image_io.InputError(
        f"Saliency map {path} has shape {saliency.shape}; expected a"
        " greyscale [H, W] or RGB [H, W, 3] image."
    )
  if saliency.dtype == bool:
    saliency = saliency.astype(np.uint8) * 255
  elif saliency.dtype == np.uint16:
    saliency = (saliency >> 8).astype(np.uint8)
  elif saliency.dtype != np.uint8:
    raise image_io.InputError(
        f"Saliency map {path} has pixel type {saliency.dtype}; expected 8"
        " bit. Save it as an 8-bit greyscale PNG."
    )
  if expected_shape is not None:
    expected = tuple(int(x) for x in expected_shape[:2])
    if saliency.shape != expected:
      raise image_io.InputError(
          f"Saliency map {path} is {saliency.shape[0]}x{saliency.shape[1]}"
          f" (HxW) but its image is {expected[0]}x{expected[1]}: saliency"
          " maps must have the size of their image. Resize the map or"
          " recompute it on the full-size image."
      )
  return saliency


def _resize(array: np.ndarray, shape, order: int) -> np.ndarray:
  out = skimage.transform.resize(
      array, shape, order=order, preserve_range=True, anti_aliasing=order > 0
  )
  return out.astype(array.dtype)


def rbd_any_size(image: np.ndarray, *, n_segments: int = 200) -> np.ndarray:
  """`rbd` on a copy of at most 400 pixels a side, resized back.

  Args:
    image: uint8 [H, W, 3].
    n_segments: about this many superpixels.

  Returns:
    float32 [H, W] in [0, 1].
  """
  h, w = image.shape[:2]
  if max(h, w) <= _MAX_SIDE:
    return rbd(image, n_segments=n_segments)
  scale = _MAX_SIDE / max(h, w)
  shape = (max(1, round(h * scale)), max(1, round(w * scale)))
  small = _resize(image, shape, 1)
  soft = rbd(small, n_segments=n_segments)
  return np.clip(_resize(soft, (h, w), 1), 0, 1)


def _write_map(name, images_dir, out_dir, n_segments):
  out = os.path.join(out_dir, os.path.splitext(name)[0] + ".png")
  image = image_io.load_image(image_io.image_path(images_dir, name))
  soft = to_uint8(rbd_any_size(image, n_segments=n_segments))
  # Written under a temporary name first: an interrupted run never leaves a
  # half-written map that a rerun would take as done.
  tmp = f"{out}.tmp-{os.getpid()}.png"
  iio.imwrite(tmp, soft)
  os.replace(tmp, out)


def write_maps(
    names: Sequence[str],
    images_dir: str,
    out_dir: str,
    *,
    n_segments: int = 200,
    num_workers: int = 1,
) -> int:
  """One 8-bit RBD map `<stem>.png` per image, skipping existing outputs.

  Args:
    names: image file names from `image_io.list_images(images_dir)`.
    images_dir: the folder of the images (or several, joined by ",").
    out_dir: receives `<stem>.png` per image (created if needed).
    n_segments: superpixels per image.
    num_workers: processes; 0 = one per CPU core.

  Returns:
    The number of maps written (existing ones are not counted).
  """
  os.makedirs(out_dir, exist_ok=True)
  todo = [
      n
      for n in names
      if not os.path.exists(
          os.path.join(out_dir, os.path.splitext(n)[0] + ".png")
      )
  ]
  work = functools.partial(
      _write_map, images_dir=images_dir, out_dir=out_dir, n_segments=n_segments
  )
  workers = min(num_workers or os.cpu_count() or 1, max(len(todo), 1))
  with tqdm.tqdm(
      total=len(names),
      initial=len(names) - len(todo),
      unit="image",
      desc="RBD pseudo masks",
  ) as bar:
    if workers == 1:
      for name in todo:
        work(name)
        bar.update()
    else:
      # spawn: the parent may hold TensorFlow, which forks badly.
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(work, todo, chunksize=4):
          bar.update()
  return len(todo)


def figure(path: str, *, n_segments: int = 200) -> None:
  """Rows of [image | RBD map | object ids over the image], as one PNG.

  Uses images shipped inside scikit-image (read from its data folder: no
  download).

  Args:
    path: the PNG to write.
    n_segments: superpixels per image.
  """
  import skimage.data  # pylint: disable=g-import-not-at-top

  palette = masks.davis_palette()
  rows = []
  for name in _FIGURE_IMAGES:
    image = image_io.load_image(os.path.join(skimage.data.data_dir, name))
    # The detector sees the image at the command line's working size, the
    # figure shows it smaller.
    soft = rbd_any_size(image, n_segments=n_segments)
    ids = masks.object_ids_from_mask(pseudo_mask(to_uint8(soft)))
    h, w = image.shape[:2]
    shape = (_FIGURE_ROW_HEIGHT, round(w * _FIGURE_ROW_HEIGHT / h))
    image = _resize(image, shape, 1)
    soft = _resize(soft, shape, 1)
    ids = _resize(ids, shape, 0)
    overlay = np.where(
        ids[..., None] > 0,
        0.45 * image + 0.55 * palette[ids],
        0.6 * image,  # Dimmed background: the objects stand out.
    ).astype(np.uint8)
    grey = np.repeat(np.round(soft * 255).astype(np.uint8)[..., None], 3, -1)
    gap = np.full((shape[0], 4, 3), 255, np.uint8)
    # 6 bits per channel for the photographs: invisible here, and the PNG
    # shrinks by a third (the figure lives in the repository).
    image, overlay = [(x & 0xFC) + 2 for x in (image, overlay)]
    rows.append(np.concatenate([image, gap, grey, gap, overlay], 1))
  width = max(r.shape[1] for r in rows)
  padded = []
  for r in rows:
    pad = np.full((r.shape[0], width - r.shape[1], 3), 255, np.uint8)
    padded.append(np.concatenate([r, pad], 1))
    padded.append(np.full((4, width, 3), 255, np.uint8))
  canvas = np.concatenate(padded[:-1], 0)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  iio.imwrite(path, canvas, compress_level=9)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.saliency",
      description="RBD saliency maps (8-bit PNGs) for a folder of images.",
  )
  parser.add_argument("--images", help="Folder of input images.")
  parser.add_argument("--out", help="Folder for the <stem>.png maps.")
  parser.add_argument(
      "--figure", help="Write a demo figure to this PNG path instead."
  )
  parser.add_argument(
      "--n_segments", type=int, default=200, help="SLIC superpixels per image."
  )
  args = parser.parse_args(argv)
  if args.figure:
    figure(args.figure, n_segments=args.n_segments)
    print(f"Wrote {args.figure}")
    return
  if not args.images or not args.out:
    parser.error("Give --images and --out, or --figure.")
  if not os.path.isdir(args.images):
    parser.error(f"--images={args.images} is not a folder.")
  names = image_io.list_images(args.images)
  written = write_maps(
      names, args.images, args.out, n_segments=args.n_segments, num_workers=0
  )
  print(f"Wrote {written} saliency maps to {args.out}")


if __name__ == "__main__":
  main()
