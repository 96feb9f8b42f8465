"""Label maps: object ids from binary masks (SPEC 2.1) and the DAVIS palette."""

import numpy as np
from scipy import ndimage
import skimage.measure


def davis_palette() -> np.ndarray:
  """The DAVIS / PASCAL VOC colour map: id -> RGB.

  Returns:
    uint8 [256, 3]; id 0 is black, 1 red, 2 green, ..., 255 is the void colour
    (224, 224, 192) used by DAVIS.
  """
  ids = np.arange(256)
  palette = np.zeros((256, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      bit = (ids >> (3 * shift + channel)) & 1
      palette[:, channel] |= bit << (7 - shift)
  # The loop above interleaves the bits of the id over R, G, B, from the
  # most significant colour bit down: the colour map DAVIS ships with.
  return palette.astype(np.uint8)


# 3x3 and cross structuring elements: 8- and 4-connectivity.
_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)
_MAX_OBJECTS = 255


def object_ids_from_mask(
    mask: np.ndarray, *, min_region_fraction: float = 0.001
) -> np.ndarray:
  """Object ids from one binary (pseudo) mask, SPEC 2.1.

  1. Pixels outside the mask are background (id 0).
  2. The mask's 1-pixel inner boundary (the mask minus its 3x3 erosion) is set
     aside, so that blobs joined by a bridge of one or two pixels come apart;
     the 4-connected components of what remains are the objects 1..K. The
     image edge does not erode (as in OpenCV's `erode`): a mask touching the
     frame is not thinned there.
  3. Boundary pixels take the largest id among their 8 neighbours, repeated
     until no boundary pixel next to an object is left. Boundary pixels that
     can never reach an object (a mask only 1-2 pixels thin everywhere, which
     has no interior at all) stay background.
  4. Every 8-connected region of equal id, background included, smaller than
     `min_region_fraction` of the image is merged into the most common id on
     its outer border (8-neighbours). Votes from regions that are not small
     themselves count first, so that two adjacent specks cannot swap ids
     forever; a speck surrounded only by specks uses all its neighbours.
  5. Ids are renumbered 1..K in order of first appearance (row-major).

  Args:
    mask: bool [H, W]; anything nonzero counts as inside.
    min_region_fraction: regions with fewer pixels than this fraction of
      H * W are merged into their surroundings; 0 keeps every region.

  Returns:
    uint8 [H, W]: 0 = background, 1..K objects, K <= 255, consecutive.

  Raises:
    ValueError: if the mask is not 2-D, or if more than 255 objects remain
      (a uint8 label map holds no more).
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be [H, W], got shape {mask.shape}.")
  mask = mask.astype(bool)
  interior = ndimage.binary_erosion(mask, _EIGHT, border_value=1)
  ids, _ = ndimage.label(interior, _FOUR)
  ids = _fill_boundary(ids, mask & ~interior)
  min_area = min_region_fraction * mask.size
  if min_area > 0:
    ids = _merge_small_regions(ids, min_area)
  return _renumber(ids)


def _fill_boundary(ids: np.ndarray, boundary: np.ndarray) -> np.ndarray:
  """Grows ids into boundary pixels by the largest 8-neighbour id."""
  ids = ids.copy()
  todo = boundary.copy()
  # Each round fills one more ring of boundary pixels (a round per ring, not
  # per pixel); an inner boundary is one or two pixels deep, so this ends in
  # a few rounds. All pixels of a ring see the same state: the result does
  # not depend on a scan order.
  while todo.any():
    largest = ndimage.maximum_filter(ids, footprint=_EIGHT, mode="constant")
    grow = todo & (largest > 0)
    if not grow.any():
      break  # The rest cannot reach an object: it stays background.
    ids[grow] = largest[grow]
    todo &= ~grow
  return ids


def _regions(ids: np.ndarray) -> np.ndarray:
  """[H, W] int: 8-connected regions of equal id, numbered 0..R-1."""
  # background=-1: id 0 (background) is a region like any other.
  return skimage.measure.label(ids, background=-1, connectivity=2) - 1


def _span(shift: int, size: int) -> slice:
  """The indices i of an axis for which i - shift is also inside."""
  return slice(max(0, shift), size + min(0, shift))


def _outer_border_pairs(regions: np.ndarray) -> np.ndarray:
  """[P, 2] unique (region, outer-border pixel index) pairs, 8-neighbours."""
  h, w = regions.shape
  flat = np.arange(h * w).reshape(h, w)
  pairs = []
  for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1)]:
    # Pixel a = (r, c) and its neighbour b = (r + dr, c + dc); the other four
    # offsets are the same pairs seen from b.
    a = (_span(-dr, h), _span(-dc, w))
    b = (_span(dr, h), _span(dc, w))
    differ = regions[a] != regions[b]
    pairs.append(np.stack([regions[a][differ], flat[b][differ]], axis=1))
    pairs.append(np.stack([regions[b][differ], flat[a][differ]], axis=1))
  # A border pixel touching a region at several places votes once.
  return np.unique(np.concatenate(pairs), axis=0)


def _merge_small_regions(ids: np.ndarray, min_area: float) -> np.ndarray:
  """Gives every region smaller than min_area its surroundings' main id."""
  ids = ids.astype(np.int64)
  # Each round merges all small regions at once; a region next to small ones
  # only may need another round. The cap guards against degenerate images
  # made of specks only.
  for _ in range(32):
    regions = _regions(ids)
    small = np.bincount(regions.ravel()) < min_area
    if not small.any():
      break
    pairs = _outer_border_pairs(regions)
    pairs = pairs[small[pairs[:, 0]]]
    if not len(pairs):
      break  # A small region without border fills the whole image.
    region, pixel = pairs[:, 0], pairs[:, 1]
    voter_id = ids.ravel()[pixel]
    # Votes from large regions outweigh any number of votes from specks.
    weight = np.where(small[regions.ravel()[pixel]], 1, ids.size + 1)
    # Total weight per (region, id), then the heaviest id per region; ties
    # go to the smaller id (background first).
    keys, inverse = np.unique(
        np.stack([region, voter_id], 1), axis=0, return_inverse=True
    )
    total = np.bincount(inverse.ravel(), weights=weight)
    order = np.lexsort((keys[:, 1], -total, keys[:, 0]))
    keys = keys[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:, 0] != keys[:-1, 0]
    new_id = np.full(len(small), -1)
    new_id[keys[first, 0]] = keys[first, 1]
    change = new_id[regions]
    update = (change >= 0) & (change != ids)
    if not update.any():
      break
    ids[update] = change[update]
  return ids


def _renumber(ids: np.ndarray) -> np.ndarray:
  """Consecutive ids 1..K in row-major order of first appearance."""
  values, first = np.unique(ids.ravel(), return_index=True)
  objects = values[values > 0]
  if len(objects) > _MAX_OBJECTS:
    # Silently dropping objects would corrupt a training set without
    # anyone noticing; a map this fragmented is noise, not objects.
    raise ValueError(
        f"The mask has {len(objects)} separate objects after merging"
        f" regions; uint8 label maps hold at most {_MAX_OBJECTS}. Raise"
        " min_region_fraction or clean the saliency map."
    )
  order = objects[np.argsort(first[values > 0], kind="stable")]
  lookup = np.zeros(int(ids.max()) + 1, np.uint8)
  lookup[order] = np.arange(1, len(order) + 1)
  return lookup[ids]


def binarize_saliency(saliency: np.ndarray) -> np.ndarray:
  """The main object of a soft 8-bit saliency map (SPEC 2.1: `> 0`).

  The rule of external saliency maps, and of the built-in detector's maps,
  whose `data_prep.saliency.to_uint8` already zeroes what is not object.

  Args:
    saliency: uint8 [H, W] soft map (any numeric dtype works).

  Returns:
    bool [H, W], True where the map is nonzero.

  Raises:
    ValueError: if the map is not 2-D.
  """
  saliency = np.asarray(saliency)
  if saliency.ndim != 2:
    raise ValueError(
        f"A saliency map must be [H, W], got shape {saliency.shape}."
    )
  return saliency > 0
