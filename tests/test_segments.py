"""Tests of shls_jax/segments.py against NumPy and scipy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from shls_jax import segments

# ---------------------------------------------------------------- references


def np_majority(superpixels, labels, num_segments):
  """Loops over ids: most common label, smallest on ties, -1 if empty."""
  out = np.full(num_segments, -1, np.int64)
  for n in range(num_segments):
    values = labels[superpixels == n]
    if values.size:
      counts = np.bincount(values, minlength=256)
      out[n] = int(np.flatnonzero(counts == counts.max())[0])
  return out


def np_split(superpixels, labels, num_superpixels, num_segments_out):
  """scipy.ndimage.label per (superpixel, minority label) group."""
  majority = np_majority(superpixels, labels, num_segments_out)
  components = []  # (first flat index, boolean mask)
  for n in np.unique(superpixels):
    for value in np.unique(labels[superpixels == n]):
      if value == majority[n]:
        continue
      # scipy's default structure in 2-D is the 4-neighbour cross.
      group, count = ndi.label((superpixels == n) & (labels == value))
      for c in range(1, count + 1):
        mask = group == c
        components.append((int(np.flatnonzero(mask.ravel())[0]), mask))
  components.sort(key=lambda item: item[0])
  out = superpixels.copy()
  free = num_segments_out - num_superpixels
  for rank, (_, mask) in enumerate(components[:free]):
    out[mask] = num_superpixels + rank
  num_new = min(len(components), free)
  return out, num_superpixels + num_new, len(components) - num_new


# ---------------------------------------------------------------- inputs


def voronoi_superpixels(rng, height, width, num):
  """Irregular superpixels: nearest of `num` random seeds, ids 0..num-1."""
  seeds = rng.uniform([0, 0], [height, width], (num, 2))
  rows, cols = np.mgrid[:height, :width]
  dist = (rows[..., None] - seeds[:, 0]) ** 2 + (
      cols[..., None] - seeds[:, 1]
  ) ** 2
  ids = np.argmin(dist, -1)
  # Consecutive ids (a seed may own no pixel).
  _, ids = np.unique(ids, return_inverse=True)
  return ids.reshape(height, width).astype(np.int32)


def blob_labels(rng, height, width, values):
  """Smooth random label regions over the given values."""
  noise = rng.normal(size=(len(values), height, width))
  noise = ndi.gaussian_filter(noise, (0, 2, 2))
  return np.asarray(values, np.int32)[np.argmax(noise, 0)]


split_jit = jax.jit(segments.split_at_label_borders, static_argnums=3)


def assert_split_matches(superpixels, labels, num_superpixels, num_out):
  got_map, got_num, got_overflow = split_jit(
      superpixels, labels, num_superpixels, num_out
  )
  want_map, want_num, want_overflow = np_split(
      superpixels, labels, num_superpixels, num_out
  )
  np.testing.assert_array_equal(np.asarray(got_map), want_map)
  assert int(got_num) == want_num
  assert int(got_overflow) == want_overflow
  assert np.asarray(got_map).max() < num_out
  return want_num


# ---------------------------------------------------------------- majority


def test_valid_segments():
  got = segments.valid_segments(jnp.array([[0, 3], [5, 1]]), 4)
  want = np.arange(4) < np.array([[0, 3], [5, 1]])[..., None]
  assert got.shape == (2, 2, 4)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_majority_labels_random_batch():
  rng = np.random.default_rng(0)
  num = 12
  # Ids 9..11 are padding and never used; labels include DAVIS's void 255.
  superpixels = rng.integers(0, 9, (2, 3, 10, 14)).astype(np.int32)
  superpixels[0, 1, superpixels[0, 1] == 4] = 5  # an empty id mid-range
  labels = rng.choice([0, 1, 2, 7, 255], size=superpixels.shape)
  got = jax.jit(segments.majority_labels, static_argnums=2)(
      superpixels, labels.astype(np.int32), num
  )
  assert got.shape == (2, 3, num) and got.dtype == jnp.int32
  for b in range(2):
    for t in range(3):
      want = np_majority(superpixels[b, t], labels[b, t], num)
      np.testing.assert_array_equal(np.asarray(got[b, t]), want)
  assert np.all(np.asarray(got)[..., 9:] == -1)
  assert int(got[0, 1, 4]) == -1


def test_majority_labels_ties_go_to_the_smallest_label():
  superpixels = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.int32)
  labels = np.array([[9, 3, 200, 4], [3, 9, 4, 200]], np.uint8)
  got = segments.majority_labels(superpixels, labels, 3)
  np.testing.assert_array_equal(np.asarray(got), [3, 4, -1])


def test_majority_labels_out_of_range_pixels_do_not_leak():
  # Id 2 == num_segments in frame 0 would be bucket (0 * 2 + 2) * 256 + l,
  # i.e. frame 1's id 0, without the range check.
  superpixels = np.array([[[2, 2, 2, 0]], [[0, 1, 1, 1]]], np.int32)
  labels = np.array([[[7, 7, 7, 1]], [[5, 1, 1, 300]]], np.int32)
  got = segments.majority_labels(superpixels, labels, 2)
  np.testing.assert_array_equal(np.asarray(got), [[1, -1], [5, 1]])


def test_majority_labels_under_vmap_equals_batched():
  rng = np.random.default_rng(1)
  superpixels = rng.integers(0, 6, (4, 8, 8)).astype(np.int32)
  labels = rng.integers(0, 3, (4, 8, 8)).astype(np.int32)
  fn = functools.partial(segments.majority_labels, num_segments=7)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jax.vmap(fn))(superpixels, labels)),
      np.asarray(fn(superpixels, labels)),
  )


def test_majority_labels_shape_error():
  with pytest.raises(ValueError, match="same shape"):
    segments.majority_labels(np.zeros((4, 4), int), np.zeros((4, 5), int), 3)


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_random_frames(seed):
  rng = np.random.default_rng(seed)
  superpixels = voronoi_superpixels(rng, 40, 48, 30)
  labels = blob_labels(rng, 40, 48, [0, 1, 2, 5])
  num_superpixels = int(superpixels.max()) + 1
  num_out = assert_split_matches(superpixels, labels, num_superpixels, 400)
  assert num_out > num_superpixels  # the case splits something
  # Afterwards every superpixel lies inside one label; every split map has
  # one label per new id.
  split_map = np.asarray(
      split_jit(superpixels, labels, num_superpixels, 400)[0]
  )
  for n in range(num_superpixels, num_out):
    assert np.unique(labels[split_map == n]).size == 1


def test_split_vmap_over_frames_with_traced_counts():
  rng = np.random.default_rng(3)
  frames = []
  for num in (20, 12, 25):
    superpixels = voronoi_superpixels(rng, 24, 32, num)
    frames.append((
        superpixels,
        blob_labels(rng, 24, 32, [0, 3, 4]),
        superpixels.max() + 1,
    ))
  superpixels, labels, counts = (np.stack(x) for x in zip(*frames))
  num_out = 60
  fn = jax.jit(
      jax.vmap(
          functools.partial(
              segments.split_at_label_borders, num_segments_out=num_out
          )
      )
  )
  got_maps, got_nums, got_overflow = fn(
      superpixels, labels, counts.astype(np.int32)
  )
  for i in range(3):
    want_map, want_num, want_overflow = np_split(
        superpixels[i], labels[i], int(counts[i]), num_out
    )
    np.testing.assert_array_equal(np.asarray(got_maps[i]), want_map)
    assert int(got_nums[i]) == want_num
    assert int(got_overflow[i]) == want_overflow


def _snake(size):
  """A one-pixel-wide boustrophedon path filling a size x size square."""
  mask = np.zeros((size, size), bool)
  mask[::2] = True
  mask[1::4, -1] = True
  mask[3::4, 0] = True
  return mask


def _spiral(size):
  """A one-pixel-wide square spiral winding inwards from the top-left."""
  mask = np.zeros((size, size), bool)
  row, col, d_row, d_col = 0, 0, 0, 1
  mask[row, col] = True

  def inside(r, c):
    return 0 <= r < size and 0 <= c < size

  turns = 0
  while turns < 2:
    ahead = (row + d_row, col + d_col)
    beyond = (row + 2 * d_row, col + 2 * d_col)
    # Stop one cell short of the path's earlier turns so that it never
    # touches itself.
    if (
        inside(*ahead)
        and not mask[ahead]
        and not (inside(*beyond) and mask[beyond])
    ):
      row, col = ahead
      mask[row, col] = True
      turns = 0
    else:
      d_row, d_col = d_col, -d_row
      turns += 1
  return mask


@pytest.mark.parametrize("shape", ["snake", "spiral"])
def test_split_long_thin_components(shape):
  size = 31
  path = _snake(size) if shape == "snake" else _spiral(size)
  assert ndi.label(path)[1] == 1  # one connected path of 400-500 pixels
  # Superpixel 0 holds the path (label 3) and enough background (label 0)
  # below it to keep 0 its majority; superpixel 1, the last 5 columns, is
  # mostly label 3 with two label-0 parts, one on the image border.
  superpixels = np.zeros((size + 30, size + 5), np.int32)
  superpixels[:, size:] = 1
  labels = np.zeros_like(superpixels)
  labels[:size, :size][path] = 3
  labels[:, size:] = 3
  labels[5, size + 2] = 0
  labels[20:22, size:] = 0
  num_out = assert_split_matches(superpixels, labels, 2, 10)
  assert num_out == 5
  split_map = np.asarray(split_jit(superpixels, labels, 2, 10)[0])
  np.testing.assert_array_equal(split_map[:size, :size][path], 2)
  roots, rounds = jax.jit(segments.connected_components)(
      jnp.asarray(path, jnp.int32), jnp.asarray(path)
  )
  assert np.unique(np.asarray(roots)[path]).size == 1
  # Hooking and pointer jumping converge far faster than one pixel per
  # round along the path.
  assert int(rounds) < 40


def test_connected_components_equal_scipy_on_random_keys():
  rng = np.random.default_rng(4)
  keys = rng.integers(0, 3, (30, 37)).astype(np.int32)
  active = rng.random((30, 37)) < 0.8
  roots = np.asarray(jax.jit(segments.connected_components)(keys, active)[0])
  want = np.arange(keys.size).reshape(keys.shape)
  for k in range(3):
    group, count = ndi.label(active & (keys == k))
    for c in range(1, count + 1):
      mask = group == c
      want[mask] = np.flatnonzero(mask.ravel())[0]
  np.testing.assert_array_equal(roots, want)


def test_split_border_and_diagonal_components():
  superpixels = np.zeros((6, 7), np.int32)
  superpixels[:, 4:] = 1
  labels = np.zeros((6, 7), np.int32)
  labels[0, 0] = 2  # corner of the image
  labels[5, 2:4] = 2  # bottom border, touching superpixel 1's pixels below
  labels[2, 1] = labels[3, 2] = 2  # diagonal only: two components
  labels[5, 4:] = 2  # same label across the superpixel border: separate
  labels[0, 6] = 1
  num_out = assert_split_matches(superpixels, labels, 2, 20)
  split_map = np.asarray(split_jit(superpixels, labels, 2, 20)[0])
  assert num_out == 8
  # Raster order of first pixels.
  assert split_map[0, 0] == 2 and split_map[0, 6] == 3
  assert split_map[2, 1] == 4 and split_map[3, 2] == 5
  assert split_map[5, 2] == split_map[5, 3] == 6
  assert (split_map[5, 4:] == 7).all()


def test_split_single_label_changes_nothing():
  rng = np.random.default_rng(5)
  superpixels = voronoi_superpixels(rng, 16, 20, 10)
  labels = np.full((16, 20), 4, np.int32)
  num = int(superpixels.max()) + 1
  split_map, num_out, overflow = split_jit(superpixels, labels, num, 30)
  np.testing.assert_array_equal(np.asarray(split_map), superpixels)
  assert int(num_out) == num and int(overflow) == 0


def test_split_several_components_of_one_label_in_one_superpixel():
  superpixels = np.zeros((9, 9), np.int32)
  superpixels[:, 6:] = 1
  labels = np.zeros((9, 9), np.int32)
  labels[1:3, 3:5] = 2
  labels[4, 0:2] = 2
  labels[6:8, 4:6] = 2
  # A wall of label 1 cuts superpixel 0's majority pixels in two; both
  # parts keep id 0.
  labels[:, 2] = 1
  num_out = assert_split_matches(superpixels, labels, 2, 10)
  split_map = np.asarray(split_jit(superpixels, labels, 2, 10)[0])
  assert num_out == 6
  # Raster order of the first pixels: wall (0, 2), blobs (1, 3), (4, 0),
  # (6, 4).
  assert (split_map[:, 2] == 2).all()
  assert (split_map[1:3, 3:5] == 3).all()
  assert (split_map[4, 0:2] == 4).all()
  assert (split_map[6:8, 4:6] == 5).all()
  assert split_map[0, 0] == split_map[0, 5] == 0
  assert (split_map[:, 6:] == 1).all()


def test_split_overflow_keeps_the_rest_in_place():
  rng = np.random.default_rng(6)
  superpixels = voronoi_superpixels(rng, 20, 20, 8)
  labels = rng.integers(0, 3, (20, 20)).astype(np.int32)  # many tiny parts
  num = int(superpixels.max()) + 1
  full = np_split(superpixels, labels, num, 1000)
  assert full[1] - num > 12  # the case has more components than room
  assert_split_matches(superpixels, labels, num, num + 12)
  _, num_out, overflow = split_jit(superpixels, labels, num, num + 12)
  assert int(num_out) == num + 12
  assert int(overflow) == full[1] - num - 12
  # No room at all: nothing moves.
  split_map, num_out, overflow = split_jit(superpixels, labels, num, num)
  np.testing.assert_array_equal(np.asarray(split_map), superpixels)
  assert int(num_out) == num and int(overflow) == full[1] - num


def test_split_rejects_batches():
  with pytest.raises(ValueError, match="vmap"):
    segments.split_at_label_borders(
        np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int), 1, 4
    )
