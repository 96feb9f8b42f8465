"""Tests of data_prep/synthesis.py: synthetic sequences (SPEC 2.2)."""

import colorsys
import itertools

import numpy as np
import pytest
from scipy import ndimage
from skimage import transform

from data_prep import synthesis

GREY = (128, 128, 128)
# Hues 1/6 of a turn apart: the jitter (hue +-0.01) never confuses them.
RED, YELLOW, GREEN = (230, 0, 0), (230, 230, 0), (0, 230, 0)
CYAN, BLUE, MAGENTA = (0, 230, 230), (0, 0, 230), (230, 0, 230)


def _source(name, shape, boxes, colours=None, background=GREY, ids=None):
  """A solid-colour image; boxes[k] = (r0, r1, c0, c1) is object ids[k]."""
  image = np.empty(shape + (3,), np.uint8)
  image[:] = background
  id_map = np.zeros(shape, np.uint8)
  for k, (r0, r1, c0, c1) in enumerate(boxes):
    id_map[r0:r1, c0:c1] = k + 1 if ids is None else ids[k]
    if colours is not None:
      image[r0:r1, c0:c1] = colours[k]
  saliency = np.where(id_map > 0, 255, 0).astype(np.uint8)
  return synthesis.Source(name, image, id_map, saliency)


def _donor_pool(colours=(BLUE, YELLOW, CYAN, MAGENTA), shape=(60, 80)):
  """Donor images, each one solid-coloured object (an ellipse)."""
  rows, cols = np.mgrid[: shape[0], : shape[1]]
  ellipse = ((rows - 30) / 22.0) ** 2 + ((cols - 40) / 30.0) ** 2 <= 1
  pool = []
  for i, colour in enumerate(colours):
    image = np.zeros(shape + (3,), np.uint8)
    image[:] = (40, 40, 40)
    image[ellipse] = colour
    ids = ellipse.astype(np.uint8)
    pool.append(
        synthesis.Source(f"donor{i}", image, ids, (ids * 255).astype(np.uint8))
    )
  return pool


class _Drawer:
  """draw_donor that counts its calls."""

  def __init__(self, pool):
    self.pool = pool
    self.calls = 0

  def __call__(self, rng):
    self.calls += 1
    return self.pool[rng.integers(len(self.pool))]


def _never(rng):
  del rng
  raise AssertionError("no donor should be needed")


def _nearest_reference(ids, size):
  """Nearest resize with pixel centres aligned, written independently."""
  height, width = ids.shape
  rows = np.floor((np.arange(size) + 0.5) * height / size).astype(int)
  cols = np.floor((np.arange(size) + 0.5) * width / size).astype(int)
  return ids[rows][:, cols]


def _hue(rgb):
  return colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))[0]


def _hue_distance(a, b):
  d = abs(a - b) % 1.0
  return min(d, 1.0 - d)


def _synth(source, drawer, seed, prep):
  return synthesis.synthesize_sequence(
      source, drawer, np.random.default_rng(seed), prep
  )


def test_shapes_and_dtypes(test_config):
  prep = test_config.prep
  prep.seq_len = 4
  prep.image_size = 48
  source = _source("a", (70, 130), [(10, 40, 20, 60)], [RED])
  frames, labels = _synth(source, _Drawer(_donor_pool()), 0, prep)
  assert frames.shape == (4, 48, 48, 3) and frames.dtype == np.uint8
  assert labels.shape == (4, 48, 48) and labels.dtype == np.uint8


def test_same_seed_same_sequence_other_seed_other_sequence(test_config):
  prep = test_config.prep
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  ids = np.zeros((90, 120), np.uint8)
  ids[20:50, 30:80] = 1
  source = synthesis.Source("noise", image, ids, ids * 200)
  pool = _donor_pool()
  first = _synth(source, _Drawer(pool), 7, prep)
  again = _synth(source, _Drawer(pool), 7, prep)
  other = _synth(source, _Drawer(pool), 8, prep)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


def test_first_frame_is_the_plain_resize(test_config):
  prep = test_config.prep
  size = prep.image_size
  rng = np.random.default_rng(2)
  # Rows are upsampled and columns downsampled: both directions of the
  # pixel-centre convention are checked.
  image = rng.integers(0, 256, (50, 200, 3), dtype=np.uint8)
  boxes = [(5, 20, 10, 60), (25, 45, 70, 120), (10, 40, 140, 190)]
  source = _source("noise", (50, 200), boxes)
  source = synthesis.Source("noise", image, source.ids, source.saliency)
  expected = transform.resize(
      image.astype(float),
      (size, size),
      order=1,
      mode="edge",
      anti_aliasing=False,
      preserve_range=True,
  )
  expected_ids = _nearest_reference(source.ids, size)

  # Three objects: min_labels (4) is met, so nothing is pasted.
  frames, labels = _synth(source, _never, 0, prep)
  assert np.abs(frames[0].astype(float) - expected).max() <= 1
  np.testing.assert_array_equal(labels[0], expected_ids)

  # One object: donors are pasted; away from them frame 0 is unchanged.
  ids = np.where(source.ids == 1, 1, 0).astype(np.uint8)
  source = synthesis.Source("one", image, ids, ids * 255)
  expected_ids = _nearest_reference(ids, size)
  frames, labels = _synth(source, _Drawer(_donor_pool()), 3, prep)
  pasted = ndimage.binary_dilation(labels[0] > 1, iterations=3)
  assert 0 < pasted.mean() < 0.9
  diff = np.abs(frames[0].astype(float) - expected).max(-1)
  assert diff[~pasted].max() <= 1
  np.testing.assert_array_equal(labels[0][~pasted], expected_ids[~pasted])


def test_ids_follow_their_objects_in_every_frame(test_config):
  prep = test_config.prep
  prep.image_size = 96
  # Large donors: pastes in later frames fail now and then, and the ids
  # after a failed one must not shift.
  prep.donor_short_side_px = (30, 60)
  prep.min_labels = 5  # Three pasted objects, usually of distinct colours.
  prep.same_donor_prob = 0.0
  source = _source("one", (120, 160), [(10, 50, 10, 70)], [RED])
  pool = _donor_pool((BLUE, YELLOW, CYAN, MAGENTA, GREEN))
  checked = gaps = 0
  for seed in range(8):
    frames, labels = _synth(source, _Drawer(pool), seed, prep)
    for t in range(1, len(labels)):
      absent = set(range(labels[0].max() + 1)) - set(np.unique(labels[t]))
      gaps += bool(absent) and min(absent) < labels[t].max()
    hues = {}
    for t in range(len(frames)):
      for k in np.unique(labels[t])[1:]:
        core = ndimage.binary_erosion(labels[t] == k, iterations=2)
        if core.sum() < 10:
          continue  # Too small to have a clean colour.
        hue = _hue(np.median(frames[t][core], axis=0))
        if t == 0:
          hues[k] = hue
        elif k in hues:
          assert _hue_distance(hue, hues[k]) < 0.06, (seed, t, k)
          checked += 1
    # The source object keeps id 1 (red); the donors have other colours.
    assert _hue_distance(hues[1], _hue(RED)) < 0.06
    assert all(_hue_distance(hues[k], _hue(RED)) > 0.1 for k in hues if k > 1)
  assert checked >= 30 and gaps >= 2


def test_every_object_is_in_frame_0_and_ids_are_consecutive(test_config):
  prep = test_config.prep
  size = prep.image_size  # 64: frame 0 samples rows and columns 5 i + 2.
  # Object 9 (2x2 pixels) falls between the samples of frame 0, so it is
  # missing there; later frames sample elsewhere and would find it.
  source = _source(
      "ids", (320, 320), [(40, 200, 40, 200), (3, 5, 3, 5)], ids=[4, 9]
  )
  assert set(np.unique(_nearest_reference(source.ids, size))) == {0, 4}
  for seed in range(20):
    _, labels = _synth(source, _Drawer(_donor_pool()), seed, prep)
    first = set(np.unique(labels[0]))
    assert first == set(range(len(first))), (seed, first)
    assert len(first) >= prep.min_labels
    assert set(np.unique(labels)) == first, seed


def test_min_labels_reached_with_donors(test_config):
  prep = test_config.prep
  empty = _source("empty", (80, 100), [])
  for seed in range(6):
    drawer = _Drawer(_donor_pool())
    _, labels = _synth(empty, drawer, seed, prep)
    assert len(np.unique(labels[0])) >= prep.min_labels, seed
    assert drawer.calls >= 1
  prep.min_labels = 6
  for seed in range(3):
    _, labels = _synth(empty, _Drawer(_donor_pool()), seed, prep)
    assert len(np.unique(labels[0])) >= 6, seed


def test_same_donor_probability_one_reuses_the_first_donor(test_config):
  prep = test_config.prep
  prep.same_donor_prob = 1.0
  drawer = _Drawer(_donor_pool())
  _, labels = _synth(_source("empty", (80, 100), []), drawer, 0, prep)
  assert len(np.unique(labels[0])) >= prep.min_labels
  assert drawer.calls == 1
  prep.same_donor_prob = 0.0
  drawer = _Drawer(_donor_pool())
  _, labels = _synth(_source("empty", (80, 100), []), drawer, 0, prep)
  assert drawer.calls >= prep.min_labels - 1


def test_paste_rejected_above_max_occlusion():
  frame = np.zeros((3, 20, 20), np.float32)
  labels = np.zeros((20, 20), np.uint8)
  labels[5:15, 5:15] = 1  # 100 pixels.
  patch = np.full((3, 20, 20), 255, np.float32)
  alpha = np.zeros((20, 20), np.float32)
  alpha[5:10, 5:15] = 1.0  # Covers 50 of them: exactly the limit.
  alpha[10, 5] = 0.4  # Blended but below the label threshold.
  assert synthesis.paste(frame, labels, patch, alpha, 0, 0, 2, 0.5)
  assert (labels == 2).sum() == 50 and (labels == 1).sum() == 50
  np.testing.assert_allclose(frame[:, 10, 5], 0.4 * 255)
  assert labels[10, 5] == 1

  labels[:] = 0
  labels[5:15, 5:15] = 1
  frame[:] = 0
  alpha[10, 5] = 1.0  # 51 pixels: more than half.
  assert not synthesis.paste(frame, labels, patch, alpha, 0, 0, 2, 0.5)
  assert (labels == 1).sum() == 100 and not frame.any()


def test_paste_that_would_hide_an_object_is_rejected(test_config):
  prep = test_config.prep
  size = prep.image_size
  # A small object in the centre; every donor fills most of the frame, so
  # wherever it goes it hides the whole object.
  source = _source("small", (100, 100), [(40, 60, 40, 60)], [RED])
  prep.donor_short_side_px = (size - 4, size)
  ids = np.ones((50, 50), np.uint8)
  image = np.full((50, 50, 3), 200, np.uint8)
  huge = synthesis.Source("huge", image, ids, ids * 255)
  drawer = _Drawer([huge])
  frames, labels = _synth(source, drawer, 0, prep)
  assert set(np.unique(labels)) == {0, 1}
  np.testing.assert_array_equal(labels[0], _nearest_reference(source.ids, size))
  assert not (frames[0] == 200).all(-1).any()
  assert 1 <= drawer.calls <= 4 * prep.min_labels


def test_padded_pixels_are_black_background(test_config):
  size = 64
  image = np.full((size, size, 3), 255, np.uint8)
  ids = np.ones((size, size), np.uint8)
  centre = ((size - 1) / 2.0, (size - 1) / 2.0)
  rotation = synthesis.AffineParams(order=("rotation",), rotation_deg=30.0)
  forward = synthesis.affine_matrix(rotation, centre)
  warped, labels = synthesis.warp(image, ids, forward, size, size)
  for r, c in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
    assert labels[r, c] == 0 and not warped[r, c].any()
  assert labels[size // 2, size // 2] == 1
  np.testing.assert_allclose(warped[size // 2, size // 2], 255)

  # Whole sequences: a white image that is one object, every augmentation
  # on. A pixel is black exactly where its label is background.
  prep = test_config.prep
  prep.aug_prob = 1.0
  prep.min_labels = 2
  source = synthesis.Source("white", image, ids, ids * 255)
  padded = 0
  for seed in range(5):
    frames, labels = _synth(source, _never, seed, prep)
    black = (frames[1:] == 0).all(-1)
    np.testing.assert_array_equal(black, labels[1:] == 0)
    padded += black.sum()
  assert padded > 0


def test_brightness_factor_range_and_jitter_semantics():
  rng = np.random.default_rng(0)
  grey = np.full((4, 4, 3), 100, np.uint8)
  factors = []
  for _ in range(2000):
    params = synthesis.draw_color_jitter(rng, 0.2, 0.0, 0.0, 0.0)
    assert params.order == ("brightness",)
    out = synthesis.apply_color_jitter(grey, params)
    np.testing.assert_allclose(out, 100 * params.brightness, rtol=1e-5)
    factors.append(params.brightness)
  factors = np.array(factors)
  assert 0.8 <= factors.min() < 0.81 and 1.19 < factors.max() <= 1.2
  assert abs(factors.mean() - 1.0) < 0.01

  orders = set()
  for _ in range(2000):
    params = synthesis.draw_color_jitter(rng, 0.2, 0.2, 0.2, 0.01)
    orders.add(params.order)
    assert 0.8 <= params.contrast <= 1.2
    assert 0.8 <= params.saturation <= 1.2
    assert -0.01 <= params.hue <= 0.01
  assert len(orders) == 24  # Every order of the four ops occurs.

  colours = np.array([[[230, 0, 0], [0, 0, 230]]], np.uint8)
  luma = colours.astype(float) @ [0.299, 0.587, 0.114]
  grey_out = synthesis.apply_color_jitter(
      colours, synthesis.JitterParams(order=("saturation",), saturation=0.0)
  )
  np.testing.assert_allclose(grey_out, np.repeat(luma[..., None], 3, -1), 1e-4)
  flat = synthesis.apply_color_jitter(
      colours, synthesis.JitterParams(order=("contrast",), contrast=0.0)
  )
  np.testing.assert_allclose(flat, luma.mean(), rtol=1e-4)
  green = synthesis.apply_color_jitter(
      colours, synthesis.JitterParams(order=("hue",), hue=1.0 / 3.0)
  )
  np.testing.assert_allclose(green[0, 0], [0, 230, 0], atol=1e-3)
  np.testing.assert_allclose(green[0, 1], [230, 0, 0], atol=1e-3)
  bright = synthesis.apply_color_jitter(
      colours, synthesis.JitterParams(order=("brightness",), brightness=1.2)
  )
  assert bright.max() == 255  # Clamped, as torchvision does.


def test_affine_draws_respect_the_ranges():
  rng = np.random.default_rng(0)
  n = 4000
  draws = [
      synthesis.draw_affine(rng, 0.5, 30.0, 15.0, 15.0, (0.8, 1.2))
      for _ in range(n)
  ]
  for op in synthesis.AFFINE_OPS:
    fraction = np.mean([op in d.order for d in draws])
    assert 0.46 < fraction < 0.54, (op, fraction)
  rot = np.array([d.rotation_deg for d in draws if "rotation" in d.order])
  shear = np.array([d.shear_deg for d in draws if "shear" in d.order])
  shift = np.array([d.translate_xy for d in draws if "translation" in d.order])
  scale = np.array([d.scale_xy for d in draws if "scale" in d.order])
  for values, low, high in (
      (rot, -30, 30),
      (shear, -15, 15),
      (shift, -15, 15),
      (scale, 0.8, 1.2),
  ):
    assert values.min() >= low and values.max() <= high
    margin = 0.03 * (high - low)
    assert values.min() < low + margin and values.max() > high - margin
  assert np.mean(scale[:, 0] != scale[:, 1]) == 1.0  # Per-axis scale.
  full = {d.order for d in draws if len(d.order) == 4}
  assert len(full) > 12  # Random order.

  centre = (99.5, 74.5)
  rotation = synthesis.AffineParams(order=("rotation",), rotation_deg=20.0)
  matrix = synthesis.affine_matrix(rotation, centre)
  np.testing.assert_allclose(matrix @ [*centre, 1], [*centre, 1], atol=1e-9)
  np.testing.assert_allclose(
      matrix[:2, :2] @ matrix[:2, :2].T, np.eye(2), atol=1e-12
  )
  both = {"rotation_deg": 20.0, "scale_xy": (1.2, 0.8)}
  first = synthesis.affine_matrix(
      synthesis.AffineParams(order=("rotation", "scale"), **both), centre
  )
  second = synthesis.affine_matrix(
      synthesis.AffineParams(order=("scale", "rotation"), **both), centre
  )
  assert np.abs(first - second).max() > 0.1
  np.testing.assert_allclose(np.linalg.det(first[:2, :2]), 0.96)


def test_crop_window_and_perspective_ranges():
  rng = np.random.default_rng(0)
  height, width = 300, 400
  areas, offsets = [], []
  for _ in range(2000):
    _, left, h, w = synthesis.draw_crop_window(
        rng, height, width, (0.8, 1.1), 20.0
    )
    np.testing.assert_allclose(h / w, height / width)
    areas.append(h * w / (height * width))
    slack = abs(width - w) / 2 + 20.0
    offsets.append(abs(left + w / 2 - (width - 1) / 2) / slack)
  assert 0.8 <= min(areas) < 0.81 and 1.09 < max(areas) <= 1.1
  assert max(offsets) <= 1.0 and max(offsets) > 0.8

  corners = synthesis.rect_corners(50, 80)
  moves = []
  for _ in range(200):
    matrix = synthesis.draw_perspective(rng, 50, 80, 0.1)
    moved = np.c_[corners, np.ones(4)] @ matrix.T
    moves.append(np.abs(moved[:, :2] / moved[:, 2:] - corners) / [80, 50])
  moves = np.array(moves)
  assert moves.max() <= 0.1 + 1e-9 and moves.max() > 0.09


def test_pasted_objects_move_locally(test_config):
  prep = test_config.prep
  size = prep.image_size
  prep.min_labels = 2  # One pasted object on an empty image.
  empty = _source("empty", (80, 100), [])
  shifts = []
  for seed in range(30):
    _, labels = _synth(empty, _Drawer(_donor_pool()), seed, prep)
    boxes = []
    for t in range(len(labels)):
      rows, cols = np.nonzero(labels[t] == 1)
      if rows.size:
        boxes.append((t, rows.min(), rows.max(), cols.min(), cols.max()))
    for (_, *a), (t1, *b) in itertools.pairwise(boxes):
      # The patch box (margin, perspective) may exceed the label box by
      # about a fifth of the object plus two pixels.
      extent = max(a[1] - a[0], a[3] - a[2]) + 1
      slack = 0.5 * (prep.local_motion_base + t1 / 10.0) * size
      slack += 0.25 * extent + 2
      assert b[0] >= a[0] - slack and b[1] <= a[1] + slack, (seed, t1)
      assert b[2] >= a[2] - slack and b[3] <= a[3] + slack, (seed, t1)
      shifts.append(abs(b[0] - a[0]) + abs(b[2] - a[2]))
  assert len(shifts) > 30 and np.mean(np.array(shifts) > 0) > 0.5


def test_no_object_anywhere_is_an_error(test_config):
  empty = _source("empty", (40, 40), [])
  blank = _source("blank", (30, 30), [])
  with pytest.raises(ValueError, match="empty: the image has no object"):
    _synth(empty, lambda rng: blank, 0, test_config.prep)
