"""Tests of data_prep/superpixels.py: the map contract, ISEC, adjacency."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data
import skimage.measure
import skimage.morphology
import skimage.transform

from data_prep import superpixels

METHODS = {
    "slic": superpixels.slic,
    "isec": superpixels.isec,
    "felzenszwalb": superpixels.felzenszwalb,
}


def _bundled(name: str, height: int, width: int) -> np.ndarray:
  """A scikit-image sample (shipped, never downloaded) as uint8 [H, W, 3]."""
  image = getattr(skimage.data, name)()[..., :3]
  image = skimage.transform.resize(
      image, (height, width), anti_aliasing=True, preserve_range=True
  )
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def astronaut():
  return _bundled("astronaut", 240, 320)


@pytest.fixture(scope="module")
def maps(astronaut):
  """Each method's map of the same frame, computed twice (determinism)."""
  return {
      name: (method(astronaut), method(astronaut))
      for name, method in METHODS.items()
  }


def _num_pieces(segments: np.ndarray) -> int:
  """Number of 4-connected pieces of equal id."""
  pieces = skimage.measure.label(segments, background=-1, connectivity=1)
  return int(pieces.max())


def _brute_force_adjacency(segments: np.ndarray) -> np.ndarray:
  pairs = set()
  height, width = segments.shape
  for r in range(height):
    for c in range(width):
      for dr, dc in ((0, 1), (1, 0)):
        if r + dr < height and c + dc < width:
          a, b = int(segments[r, c]), int(segments[r + dr, c + dc])
          if a != b:
            pairs.add((min(a, b), max(a, b)))
  return np.array(sorted(pairs), np.int64).reshape(-1, 2)


def _config(test_config, **fields):
  config = test_config.train_superpixels.copy_and_resolve_references()
  for key, value in fields.items():
    setattr(config, key, value)
  return config


# --- The contract of every method.


@pytest.mark.parametrize("name", sorted(METHODS))
def test_map_contract(maps, astronaut, name):
  segments, again = maps[name]
  assert segments.dtype == np.int32
  assert segments.shape == astronaut.shape[:2]
  count = int(segments.max()) + 1
  np.testing.assert_array_equal(np.unique(segments), np.arange(count))
  # Ids in order of first appearance: renumbering changes nothing.
  renumbered = superpixels.make_consecutive(segments)
  np.testing.assert_array_equal(renumbered, segments)
  # Every superpixel is one 4-connected region.
  assert _num_pieces(segments) == count
  np.testing.assert_array_equal(segments, again)


@pytest.mark.parametrize(
    "name, low, high",
    [("slic", 200, 330), ("isec", 80, 400), ("felzenszwalb", 100, 1000)],
)
def test_count_is_sane(maps, name, low, high):
  count = int(maps[name][0].max()) + 1
  assert low <= count <= high, count


def test_slic_training_setting_count():
  # SPEC 2.2: n_segments 300 on 256 x 256 frames gives about 250-290.
  frame = _bundled("coffee", 256, 256)
  count = int(superpixels.slic(frame).max()) + 1
  assert 230 <= count <= 300, count


def test_isec_count_at_480p():
  # SPEC 2.3: 330-880 segments on natural 480p frames, no target count.
  frame = _bundled("coffee", 480, 854)
  segments = superpixels.isec(frame)
  count = int(segments.max()) + 1
  assert 330 <= count <= 880, count
  assert _num_pieces(segments) == count


def test_bad_image_is_refused():
  with pytest.raises(ValueError, match="uint8"):
    superpixels.isec(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="height, width, 3"):
    superpixels.slic(np.zeros((8, 8), np.uint8))


# --- ISEC.


def _rectangles_frame():
  """Flat rectangles on a flat background, uint8 [120, 160, 3], and boxes."""
  frame = np.full((120, 160, 3), 40, np.uint8)
  boxes = [(10, 50, 10, 70), (60, 110, 20, 60), (30, 100, 90, 150)]
  colours = [(220, 60, 60), (60, 200, 90), (120, 120, 250)]
  for (r0, r1, c0, c1), colour in zip(boxes, colours):
    frame[r0:r1, c0:c1] = colour
  return frame, boxes


def test_isec_follows_flat_rectangles():
  frame, boxes = _rectangles_frame()
  segments = superpixels.isec(frame)
  for r0, r1, c0, c1 in boxes:
    inside = np.zeros(segments.shape, bool)
    inside[r0:r1, c0:c1] = True
    margin = 3
    core = segments[r0 + margin : r1 - margin, c0 + margin : c1 - margin]
    ids, counts = np.unique(core, return_counts=True)
    best = ids[np.argmax(counts)]
    # One segment covers the rectangle's interior ...
    assert counts.max() >= 0.95 * core.size
    # ... and stays inside it, up to the boundary pixels it absorbed.
    grown = ndi.binary_dilation(inside, iterations=margin)
    assert np.all(grown[segments == best])
    assert (segments == best)[inside].mean() >= 0.9


def test_isec_flat_frame_is_one_segment():
  frame = np.full((50, 70, 3), 128, np.uint8)
  segments = superpixels.isec(frame)
  assert segments.dtype == np.int32
  np.testing.assert_array_equal(segments, np.zeros((50, 70), np.int32))


@pytest.mark.parametrize("step, count", [(3, 1), (60, 2)])
def test_isec_thresholds_are_absolute(step, count):
  # A faint step is no edge even when it is the frame's strongest one
  # (thresholds are not relative to the maximum gradient).
  frame = np.full((60, 80, 3), 100, np.uint8)
  frame[:, 40:] += np.uint8(step)
  segments = superpixels.isec(frame)
  assert int(segments.max()) + 1 == count
  if count == 2:
    assert np.all(segments[:, :36] == segments[0, 0])
    assert np.all(segments[:, 44:] != segments[0, 0])


def test_isec_boundaries_are_thin_closed_lines():
  frame, _ = _rectangles_frame()
  boundaries = superpixels.isec_boundaries(frame)
  assert boundaries.dtype == bool and boundaries.any()
  # No boundary pixel has a 3x3 neighbourhood made only of boundary.
  inner = ndi.binary_erosion(boundaries, np.ones((3, 3)), border_value=1)
  assert not inner.any()


def test_thinning_equals_scikit_image():
  rng = np.random.default_rng(0)
  for trial in range(40):
    shape = tuple(rng.integers(4, 40, size=2))
    mask = rng.random(shape) < rng.uniform(0.3, 0.9)
    if trial % 2:
      mask = ndi.binary_dilation(mask)
    num_iter = int(rng.integers(1, 7))
    # Our thinning pads by reflection; scikit-image sees the padding too.
    pad = 2 * num_iter + 1
    expected = skimage.morphology.thin(
        np.pad(mask, pad, mode="reflect"), max_num_iter=num_iter
    )[pad:-pad, pad:-pad]
    np.testing.assert_array_equal(
        superpixels._thin(mask, num_iter), expected, err_msg=str(trial)
    )


@pytest.mark.parametrize("connectivity", [1, 2])
def test_binary_area_filters_equal_scikit_image(connectivity):
  structure = ndi.generate_binary_structure(2, connectivity)
  rng = np.random.default_rng(connectivity)
  for trial in range(40):
    shape = tuple(rng.integers(3, 30, size=2))
    mask = rng.random(shape) < rng.uniform(0.2, 0.8)
    area = int(rng.integers(2, 30))
    np.testing.assert_array_equal(
        superpixels._area_close(mask, area, structure),
        skimage.morphology.area_closing(mask, area, connectivity) > 0,
        err_msg=str(trial),
    )
    np.testing.assert_array_equal(
        superpixels._area_open(mask, area, structure),
        skimage.morphology.area_opening(mask, area, connectivity) > 0,
        err_msg=str(trial),
    )


def test_boundary_fill_keeps_superpixels_connected():
  # The boundary pixel (1, 1) touches region 2 only at its corner (2, 2):
  # the largest id among 8 neighbours would make it a detached piece of 2.
  labels = np.array(
      [
          [1, 1, 1, 1],
          [1, 0, 1, 1],
          [1, 1, 2, 2],
          [1, 1, 2, 2],
      ],
      np.int32,
  )
  filled = superpixels._fill_edges(labels.copy())
  assert filled[1, 1] == 1
  assert _num_pieces(filled) == 2
  # A 3-pixel-wide boundary: its middle column has no labelled 4-neighbour
  # in the first round and takes the larger id in the second.
  band = np.array([[1, 0, 0, 0, 3]] * 3, np.int32)
  np.testing.assert_array_equal(
      superpixels._fill_edges(band.copy()), [[1, 1, 3, 3, 3]] * 3
  )


# --- make_consecutive.


def test_make_consecutive_hand_cases():
  np.testing.assert_array_equal(
      superpixels.make_consecutive(np.array([[5, 5, 2], [2, 7, 5]])),
      [[0, 0, 1], [1, 2, 0]],
  )
  np.testing.assert_array_equal(
      superpixels.make_consecutive(np.array([[-3, 9], [9, 0]])),
      [[0, 1], [1, 2]],
  )
  single = superpixels.make_consecutive(np.full((2, 3), 42))
  assert single.dtype == np.int32
  np.testing.assert_array_equal(single, np.zeros((2, 3)))
  ordered = np.array([[0, 1], [2, 2]], np.int64)
  result = superpixels.make_consecutive(ordered)
  assert result.dtype == np.int32
  np.testing.assert_array_equal(result, ordered)


# --- adjacency.


def test_adjacency_matches_brute_force():
  rng = np.random.default_rng(7)
  for shape in [(1, 9), (9, 1), (5, 5), (12, 17), (30, 8)]:
    for num_ids in (2, 5, 40):
      segments = rng.integers(0, num_ids, size=shape)
      # Blocky maps too, where most neighbours share an id.
      blocky = np.kron(segments, np.ones((2, 3), np.int64))
      for case in (segments, blocky):
        pairs = superpixels.adjacency(case)
        assert pairs.dtype == np.int32 and pairs.shape[1] == 2
        np.testing.assert_array_equal(pairs, _brute_force_adjacency(case))


def test_adjacency_checker_and_diagonals():
  checker = np.array([[0, 1], [1, 0]])
  np.testing.assert_array_equal(superpixels.adjacency(checker), [[0, 1]])
  quad = np.array([[0, 1], [2, 3]])
  # 0-3 and 1-2 meet only at the centre corner: not adjacent.
  np.testing.assert_array_equal(
      superpixels.adjacency(quad), [[0, 1], [0, 2], [1, 3], [2, 3]]
  )
  corner = np.array([
      [0, 0, 2, 2],
      [0, 0, 2, 2],
      [2, 2, 1, 1],
      [2, 2, 1, 1],
  ])
  np.testing.assert_array_equal(superpixels.adjacency(corner), [[0, 2], [1, 2]])


def test_adjacency_single_superpixel_is_empty():
  pairs = superpixels.adjacency(np.zeros((4, 6), np.int32))
  assert pairs.shape == (0, 2) and pairs.dtype == np.int32


def test_adjacency_of_a_real_map(maps):
  segments = maps["slic"][0]
  pairs = superpixels.adjacency(segments)
  np.testing.assert_array_equal(pairs, _brute_force_adjacency(segments))
  # Connected regions of the plane: a planar graph, every node has an edge.
  count = int(segments.max()) + 1
  assert len(pairs) <= 3 * count - 6
  assert set(np.unique(pairs)) == set(range(count))


# --- compute.


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compute_dispatches(test_config, maps, astronaut, name):
  config = _config(test_config, method=name, max_superpixels=10_000)
  config.slic_n_segments = 300
  np.testing.assert_array_equal(
      superpixels.compute(astronaut, config), maps[name][0]
  )


def test_too_many_superpixels_names_source_and_field(test_config, astronaut):
  config = _config(
      test_config, method="slic", slic_n_segments=300, max_superpixels=50
  )
  with pytest.raises(superpixels.SuperpixelError) as error:
    superpixels.compute(astronaut, config, source="bear/00042.jpg")
  message = str(error.value)
  assert "bear/00042.jpg" in message
  assert "max_superpixels" in message and "50" in message
  count = int(superpixels.slic(astronaut).max()) + 1
  assert str(count) in message
  assert isinstance(error.value, ValueError)


def test_unknown_method_lists_valid_names(test_config, astronaut):
  config = _config(test_config, method="watershed")
  with pytest.raises(ValueError, match="watershed") as error:
    superpixels.compute(astronaut, config)
  for name in METHODS:
    assert name in str(error.value)
