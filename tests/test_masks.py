"""Tests of data_prep.masks: object ids from a binary mask (SPEC 2.1)."""

import numpy as np
import pytest

from data_prep import masks


def _two_squares(bridge: bool) -> np.ndarray:
  mask = np.zeros((40, 60), bool)
  mask[5:20, 5:20] = True
  mask[5:20, 30:45] = True
  if bridge:
    mask[12, 20:30] = True  # One pixel high.
  return mask


def test_two_blobs_are_objects_one_and_two():
  ids = masks.object_ids_from_mask(_two_squares(bridge=False))
  assert ids.dtype == np.uint8
  assert ids.shape == (40, 60)
  np.testing.assert_array_equal(np.unique(ids), [0, 1, 2])
  # Row-major order of appearance: the left square comes first.
  assert (ids[5:20, 5:20] == 1).all()
  assert (ids[5:20, 30:45] == 2).all()
  assert (ids[~_two_squares(bridge=False)] == 0).all()


def test_one_pixel_bridge_splits_the_blobs():
  mask = _two_squares(bridge=True)
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0)
  np.testing.assert_array_equal(np.unique(ids), [0, 1, 2])
  assert (ids[6:19, 6:19] == 1).all()
  assert (ids[6:19, 31:44] == 2).all()
  # The bridge belongs to the mask: its pixels take an object's id.
  assert (ids[12, 20:30] > 0).all()
  assert (ids[~mask] == 0).all()


def test_boundary_pixels_take_largest_neighbouring_id():
  # Two interiors (ids 1 and 2) joined by a one-pixel link: the link is
  # filled last, when both its sides carry ids, and must take the larger.
  mask = np.zeros((30, 30), bool)
  mask[5:25, 5:25] = True
  mask[14, 5:25] = False  # Splits the interior, not the mask.
  mask[14, 14] = True  # One pixel link, boundary of both halves.
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0)
  # Interiors: rows 6..12 -> 1, rows 16..23 -> 2.
  assert ids[8, 10] == 1 and ids[20, 10] == 2
  assert ids[14, 14] == 2
  # Its neighbours above and below touched one interior only.
  assert ids[13, 14] == 1 and ids[15, 14] == 2
  # Outer boundary pixels far from the link keep their own side's id.
  assert ids[5, 10] == 1 and ids[24, 10] == 2


def test_thin_mask_without_interior_is_background():
  mask = np.zeros((30, 30), bool)
  mask[10, 2:28] = True  # A 1-pixel line: no interior, no object.
  mask[15:25, 5:15] = True
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0)
  assert (ids[10] == 0).all()
  assert (ids[15:25, 5:15] == 1).all()


def test_all_false_mask_gives_zeros():
  ids = masks.object_ids_from_mask(np.zeros((17, 23), bool))
  assert ids.dtype == np.uint8
  np.testing.assert_array_equal(ids, np.zeros((17, 23), np.uint8))


def test_full_mask_is_one_object():
  ids = masks.object_ids_from_mask(np.ones((12, 9), bool))
  np.testing.assert_array_equal(ids, np.ones((12, 9), np.uint8))


def test_tiny_blob_is_merged_into_background():
  mask = np.zeros((100, 100), bool)
  mask[10:60, 10:60] = True
  mask[80:83, 80:83] = True  # 9 pixels < 0.1 % of 10,000.
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0.001)
  np.testing.assert_array_equal(np.unique(ids), [0, 1])
  assert (ids[80:83, 80:83] == 0).all()
  # Kept with min_region_fraction=0: its 1-pixel interior grows back.
  kept = masks.object_ids_from_mask(mask, min_region_fraction=0)
  np.testing.assert_array_equal(np.unique(kept), [0, 1, 2])


def test_background_hole_is_merged_into_object():
  mask = np.zeros((100, 100), bool)
  mask[10:90, 10:90] = True
  mask[50:52, 50:52] = False  # A 4-pixel hole.
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0.001)
  assert (ids[50:52, 50:52] == 1).all()
  assert (ids[10:90, 10:90] == 1).all()
  assert (ids[:10] == 0).all()
  # A large hole stays background.
  mask[30:70, 30:70] = False
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0.001)
  assert (ids[40:60, 40:60] == 0).all()


def test_speck_takes_most_common_id_on_its_border():
  # A 4x4 blob hanging off a large square by a 1-pixel neck: its own object
  # (its interior is apart from the square's), with a border of mostly
  # background and a little of the square.
  mask = np.zeros((100, 100), bool)
  mask[10:90, 10:90] = True
  mask[41, 90:92] = True
  mask[40:44, 92:96] = True
  kept = masks.object_ids_from_mask(mask, min_region_fraction=0)
  np.testing.assert_array_equal(np.unique(kept), [0, 1, 2])
  assert (kept[40:44, 92:96] == 2).all()
  # 16 pixels < 0.3 % of 10,000: background is the majority on its border.
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0.003)
  np.testing.assert_array_equal(np.unique(ids), [0, 1])
  assert (ids[40:44, 92:96] == 0).all()
  assert (ids[10:90, 10:90] == 1).all()


def test_ids_are_consecutive():
  rng = np.random.default_rng(0)
  mask = np.zeros((120, 120), bool)
  for _ in range(12):
    r, c = rng.integers(0, 110, 2)
    size = rng.integers(3, 12)
    mask[r : r + size, c : c + size] = True
  ids = masks.object_ids_from_mask(mask)
  values = np.unique(ids)
  np.testing.assert_array_equal(values, np.arange(len(values)))
  assert values.max() >= 2


def _grid_of_squares(n: int) -> np.ndarray:
  """n x n separated 4x4 squares, each its own object."""
  mask = np.zeros((6 * n, 6 * n), bool)
  for r in range(n):
    for c in range(n):
      mask[6 * r + 1 : 6 * r + 5, 6 * c + 1 : 6 * c + 5] = True
  return mask


def test_255_objects_fit_and_more_raise():
  mask = _grid_of_squares(16)
  mask[6 * 15 :, 6 * 15 :] = False  # 256 squares minus the last: 255.
  ids = masks.object_ids_from_mask(mask, min_region_fraction=0)
  np.testing.assert_array_equal(np.unique(ids), np.arange(256))
  # Row-major order of appearance: the first square is 1, the last 255.
  assert ids[1, 1] == 1 and ids[6 * 15 + 1, 6 * 14 + 1] == 255
  assert (ids[~mask] == 0).all()
  with pytest.raises(ValueError, match="289 separate objects.*at most 255"):
    masks.object_ids_from_mask(_grid_of_squares(17), min_region_fraction=0)


def test_binarize_saliency_is_nonzero():
  soft = np.array([[0, 1, 255], [0, 0, 128]], np.uint8)
  np.testing.assert_array_equal(
      masks.binarize_saliency(soft), [[False, True, True], [False, False, True]]
  )
  with pytest.raises(ValueError, match="saliency map must be"):
    masks.binarize_saliency(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("shape", [(5,), (3, 4, 2)])
def test_rejects_non_2d(shape):
  with pytest.raises(ValueError, match="mask must be"):
    masks.object_ids_from_mask(np.zeros(shape, bool))


def test_davis_palette_unchanged():
  palette = masks.davis_palette()
  np.testing.assert_array_equal(
      palette[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
  )
  np.testing.assert_array_equal(palette[255], [224, 224, 192])
