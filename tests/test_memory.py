"""Tests of shls_jax/memory.py against NumPy references written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.morphology import convex_hull_image

from shls_jax import memory

# ---------------------------------------------------------------- references


def np_unit(x):
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


class NpClassMemory:
  """One class's memory as Python lists: long-term list plus a FIFO list."""

  def __init__(self, long_term, limit):
    self.long_term = long_term
    self.limit = limit
    self.long = []
    self.short = []

  def add(self, x):
    if len(self.long) < self.long_term:
      self.long.append(x)
    elif self.limit > self.long_term:
      self.short.append(x)
      if len(self.short) > self.limit - self.long_term:
        self.short.pop(0)

  def entries(self):
    return self.long + self.short


def np_seed(points, centroids, valid):
  """Missing slot m: first entry if none exists, else the farthest entry."""
  centroids = [None if not v else c for c, v in zip(centroids, valid)]
  for m in range(len(centroids)):
    if centroids[m] is not None or len(points) <= m:
      continue
    existing = [c for c in centroids if c is not None]
    if not existing:
      centroids[m] = points[0]
    else:
      nearest = [max(float(p @ c) for c in existing) for p in points]
      centroids[m] = points[int(np.argmin(nearest))]
  return centroids


def np_lloyd(points, centroids, iterations):
  """Spherical Lloyd loop over a list of unit points; None = no centroid."""
  centroids = list(centroids)
  for _ in range(iterations):
    members = {m: [] for m in range(len(centroids))}
    for p in points:
      sims = [-np.inf if c is None else float(p @ c) for c in centroids]
      members[int(np.argmax(sims))].append(p)
    for m, group in members.items():
      if centroids[m] is None or not group:
        continue
      total = np.sum(group, axis=0)
      if np.linalg.norm(total) > 1e-6:
        centroids[m] = total / np.linalg.norm(total)
  return centroids


def np_knn(entries, entry_classes, queries, num_classes, class_valid):
  """Top-2 cosine neighbours, per-class rank-weighted scores (SPEC 6.2)."""
  labels, scores = [], []
  for q in np_unit(queries):
    sims = np.array([float(q @ e) for e in entries])
    order = np.argsort(-sims, kind="stable")[:2]
    s = sims[order]
    cls = [entry_classes[i] for i in order]
    labels.append(cls[0] if len(cls) else -1)
    row = []
    for c in range(num_classes):
      if not class_valid[c]:
        row.append(memory.INVALID_SCORE)
        continue
      first = len(cls) > 0 and cls[0] == c
      second = len(cls) > 1 and cls[1] == c
      if first and second:
        row.append((s[0] + 0.5 * s[1]) / 1.5)
      elif first:
        row.append(s[0] / 1.5)
      elif second:
        row.append(s[1] / 1.5)
      else:
        row.append(0.0)
    scores.append(row)
  return np.array(labels), np.array(scores)


def np_tight_box(mask):
  ys, xs = np.nonzero(mask)
  if ys.size == 0:
    return np.zeros(4, np.int64)
  return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])


def np_object_box(mask, r, min_fraction=0.05):
  height, width = mask.shape
  y0, x0, y1, x1 = np_tight_box(mask)
  out = []
  for start, end, size in ((y0, y1, height), (x0, x1, width)):
    extent = end - start
    if extent < min_fraction * size:
      out.append((0, size))
    else:
      out.append((
          int(np.clip(np.floor(start - r / 2 * extent), 0, size)),
          int(np.clip(np.ceil(end + r / 2 * extent), 0, size)),
      ))
  return np.array([out[0][0], out[1][0], out[0][1], out[1][1]])


def state_entries(state, c):
  """Class c's entries oldest first, read back through the documented layout."""
  features = np.asarray(state.features[c])
  count = int(state.count[c])
  long_term = int(state.long_term[c])
  limit = int(state.limit[c])
  num_long = min(count, long_term)
  rows = list(range(num_long))
  num_short = count - num_long
  ring = limit - long_term
  if num_short:
    oldest = (int(state.ring_start[c]) - num_short) % ring
    rows += [long_term + (oldest + i) % ring for i in range(num_short)]
  return [features[i] for i in rows]


# ---------------------------------------------------------------- inputs


def random_frame(rng, num_rows, num_valid, dim, num_classes):
  """Non-negative superfeatures (as after the fusion's ReLU), ids, padding."""
  x = np.maximum(rng.normal(size=(num_rows, dim)), 0.0) + 0.01
  ids = rng.integers(0, num_classes, num_rows)
  valid = np.arange(num_rows) < num_valid
  return x.astype(np.float32), valid, ids.astype(np.int32)


def label_map(rng, height, width, num_classes):
  labels = np.zeros((height, width), np.int32)
  for c in range(1, num_classes):
    y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
    labels[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = c
  return labels


@functools.partial(
    jax.jit,
    static_argnames=(
        "max_classes",
        "capacity",
        "long_term_factor",
        "cap_factor",
        "kmeans_iterations",
    ),
)
def fit_jit(superfeatures, valid, ids, num_classes, first_labels, **kwargs):
  return memory.fit(
      superfeatures,
      valid,
      ids,
      num_classes,
      first_labels=first_labels,
      **kwargs
  )


update_jit = jax.jit(memory.update, static_argnames="kmeans_iterations")
knn_jit = jax.jit(memory.knn_scores)
centroid_jit = jax.jit(memory.centroid_scores)


def reference_fit(x, valid, ids, num_classes, capacity, lt_factor, cap_factor):
  n0 = [int(np.sum(valid & (ids == c))) for c in range(num_classes)]
  limit = min(cap_factor * sum(n0), capacity)
  mems = [NpClassMemory(min(lt_factor * n, limit), limit) for n in n0]
  for row in np.flatnonzero(valid):
    mems[ids[row]].add(np_unit(x[row]))
  return mems


def reference_centroids(mems, previous, iterations):
  out = []
  for c, mem in enumerate(mems):
    points = mem.entries()
    prev = previous[c] if previous is not None else [None, None]
    cents = np_seed(points, prev, [p is not None for p in prev])
    out.append(np_lloyd(points, cents, iterations))
  return out


def assert_centroids_match(state, ref, num_classes):
  for c in range(num_classes):
    for m, cent in enumerate(ref[c]):
      assert bool(state.centroid_valid[c, m]) == (cent is not None), (c, m)
      if cent is not None:
        np.testing.assert_allclose(
            np.asarray(state.centroids[c, m]), cent, atol=2e-5
        )


# ---------------------------------------------------------------- fit


def test_fit_layout_capacities_and_boxes():
  rng = np.random.default_rng(0)
  x, valid, ids = random_frame(rng, 20, 15, 6, 3)
  ids[:15] = np.array([0] * 8 + [1] * 5 + [2] * 2)[rng.permutation(15)]
  first_labels = label_map(rng, 16, 18, 3)
  state = fit_jit(
      x,
      valid,
      ids,
      3,
      first_labels,
      max_classes=5,
      capacity=48,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=4,
  )
  assert state.features.shape == (5, 48, 6)
  assert state.centroids.shape == (5, 2, 6)
  np.testing.assert_array_equal(state.class_valid, [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(state.count, [8, 5, 2, 0, 0])
  # limit = min(10 x 15, 48); long-term = min(5 x N0_c, limit).
  np.testing.assert_array_equal(state.limit, [48, 48, 48, 0, 0])
  np.testing.assert_array_equal(state.long_term, [40, 25, 10, 0, 0])
  np.testing.assert_array_equal(state.ring_start, 0)
  for c in range(3):
    want = np_unit(x[valid & (ids == c)])
    np.testing.assert_allclose(
        np.asarray(state.features[c, : len(want)]), want, atol=1e-6
    )
  for c in range(5):
    np.testing.assert_array_equal(
        state.first_boxes[c], np_tight_box(first_labels == c)
    )


def test_fit_kmeans_matches_numpy_lloyd():
  rng = np.random.default_rng(1)
  x, valid, ids = random_frame(rng, 40, 33, 5, 4)
  ids[valid & (ids == 3)] = 1
  ids[5] = 3  # class 3 has a single entry
  valid[5] = True
  state = fit_jit(
      x,
      valid,
      ids,
      5,  # class 4 exists but has no frame-0 superpixel
      np.zeros((8, 8), np.int32),
      max_classes=6,
      capacity=64,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=7,
  )
  mems = reference_fit(x, valid, ids, 5, 64, 5, 10)
  ref = reference_centroids(mems, None, 7)
  assert_centroids_match(state, ref, 5)
  np.testing.assert_array_equal(
      state.centroid_valid, [[1, 1], [1, 1], [1, 1], [1, 0], [0, 0], [0, 0]]
  )
  # The seeds alone: the first entry and the entry least similar to it.
  seeded = fit_jit(
      x,
      valid,
      ids,
      5,
      np.zeros((8, 8), np.int32),
      max_classes=6,
      capacity=64,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=0,
  )
  points = np_unit(x[valid & (ids == 0)])
  np.testing.assert_allclose(seeded.centroids[0, 0], points[0], atol=1e-6)
  far = points[np.argmin(points @ points[0])]
  np.testing.assert_allclose(seeded.centroids[0, 1], far, atol=1e-6)


def test_fit_caps_frame0_entries_at_capacity():
  rng = np.random.default_rng(2)
  x, valid, ids = random_frame(rng, 12, 12, 4, 1)
  state = fit_jit(
      x,
      valid,
      ids,
      1,
      np.zeros((4, 4), np.int32),
      max_classes=2,
      capacity=7,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=2,
  )
  assert int(state.count[0]) == 7
  assert int(state.long_term[0]) == int(state.limit[0]) == 7
  np.testing.assert_allclose(state.features[0], np_unit(x[:7]), atol=1e-6)


# ---------------------------------------------------------------- predict


def small_memory(seed, kmeans_iterations=3):
  rng = np.random.default_rng(seed)
  x, valid, ids = random_frame(rng, 30, 24, 6, 3)
  state = fit_jit(
      x,
      valid,
      ids,
      3,
      np.zeros((8, 8), np.int32),
      max_classes=4,
      capacity=40,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=kmeans_iterations,
  )
  return rng, state, x, valid, ids


def test_knn_scores_match_numpy():
  rng, state, x, valid, ids = small_memory(3)
  entries = [np_unit(x[i]) for i in np.flatnonzero(valid)]
  classes = [int(ids[i]) for i in np.flatnonzero(valid)]
  queries, qvalid, _ = random_frame(rng, 50, 44, 6, 3)
  labels, scores = knn_jit(state, queries, qvalid)
  want_labels, want_scores = np_knn(
      entries, classes, queries[:44], 4, [1, 1, 1, 0]
  )
  np.testing.assert_array_equal(labels[:44], want_labels)
  np.testing.assert_allclose(scores[:44], want_scores, atol=1e-5)
  np.testing.assert_array_equal(labels[44:], -1)
  np.testing.assert_array_equal(scores[44:], 0.0)
  # Every case of the rank rule occurs in this draw.
  cases = set()
  for row in np.asarray(scores[:44, :3]):
    cases.add(int(np.sum(row > 0)))
  assert cases == {1, 2}


def test_knn_rank_rule_on_hand_made_memory():
  dim = 3
  e = np.eye(dim, dtype=np.float32)
  # class 0: e0; class 1: e1 and a vector between e0 and e1.
  mid = np_unit(e[0] + 0.9 * e[1]).astype(np.float32)
  x = np.stack([e[0], e[1], mid])
  state = fit_jit(
      x,
      np.ones(3, bool),
      np.array([0, 1, 1]),
      2,
      np.zeros((4, 4), np.int32),
      max_classes=2,
      capacity=8,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=1,
  )
  q = np.stack([e[0], e[1], e[2] + 0.01 * e[0]]).astype(np.float32)
  labels, scores = knn_jit(state, q, np.ones(3, bool))
  s_mid0 = float(mid @ e[0])
  s_mid1 = float(mid @ e[1])
  # q0: nearest e0 (class 0), then mid (class 1): each alone in its class.
  np.testing.assert_allclose(scores[0], [1 / 1.5, s_mid0 / 1.5], atol=1e-6)
  # q1: e1 then mid, both class 1.
  np.testing.assert_allclose(
      scores[1], [0.0, (1 + 0.5 * s_mid1) / 1.5], atol=1e-6
  )
  np.testing.assert_array_equal(labels[:2], [0, 1])


def test_knn_with_fewer_entries_than_neighbours():
  x = np.array([[1.0, 0.0]], np.float32)
  state = fit_jit(
      x,
      np.ones(1, bool),
      np.zeros(1, np.int32),
      1,
      np.zeros((4, 4), np.int32),
      max_classes=2,
      capacity=4,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=1,
  )
  labels, scores = knn_jit(
      state, np.array([[1.0, 1.0]], np.float32), np.ones(1, bool)
  )
  assert int(labels[0]) == 0
  np.testing.assert_allclose(
      scores[0], [np.sqrt(0.5) / 1.5, memory.INVALID_SCORE], atol=1e-6
  )


def test_centroid_scores_match_numpy():
  rng, state, _, _, _ = small_memory(4)
  queries, qvalid, _ = random_frame(rng, 20, 17, 6, 3)
  got = centroid_jit(state, queries, qvalid)
  cents = np.asarray(state.centroids)
  cvalid = np.asarray(state.centroid_valid)
  want = np.full((17, 4), memory.INVALID_SCORE)
  for n, q in enumerate(np_unit(queries[:17])):
    for c in range(3):
      want[n, c] = max(float(q @ cents[c, m]) for m in range(2) if cvalid[c, m])
  np.testing.assert_allclose(got[:17], want, atol=1e-5)
  np.testing.assert_array_equal(got[17:], 0.0)


def test_best_other_class():
  scores = np.array([[0.1, 0.5, 0.3, 9.0], [0.7, 0.2, 0.4, 9.0]], np.float32)
  got = memory.best_other_class(scores, jnp.array([1, 1, 1, 0], bool))
  want = [[0.5, 0.3, 0.5, 0.5], [0.4, 0.7, 0.7, 0.7]]
  np.testing.assert_allclose(got, want)
  only = memory.best_other_class(scores[:, :1], jnp.array([True]))
  np.testing.assert_array_equal(only, memory.INVALID_SCORE)


# ---------------------------------------------------------------- update


@pytest.mark.parametrize(
    "capacity,lt_factor,cap_factor,rows",
    [
        (16, 2, 3, 8),  # long-term, then the FIFO within the cap
        (9, 1, 10, 24),  # the capacity is the limit; bursts > the ring
        (12, 5, 1, 6),  # limit = N0 = long-term: no ring at all
    ],
)
def test_update_long_term_and_fifo_over_many_frames(
    capacity, lt_factor, cap_factor, rows
):
  rng = np.random.default_rng(capacity)
  num_classes, dim, iters = 3, 4, 3
  x, valid, ids = random_frame(rng, 6, 5, dim, num_classes)
  ids[:5] = [0, 0, 1, 1, 1]
  first = np.zeros((4, 4), np.int32)
  state = fit_jit(
      x,
      valid,
      ids,
      2,
      first,
      max_classes=num_classes,
      capacity=capacity,
      long_term_factor=lt_factor,
      cap_factor=cap_factor,
      kmeans_iterations=iters,
  )
  mems = reference_fit(x, valid, ids, 2, capacity, lt_factor, cap_factor)
  ref = reference_centroids(mems, None, iters)
  assert_centroids_match(state, ref, 2)
  added = [0, 0]
  largest_burst = [0, 0]
  for _ in range(12):
    feats = np.maximum(rng.normal(size=(rows, dim)), 0).astype(np.float32)
    feats += 0.01
    confident = rng.random(rows) < 0.8
    # -1 unlabelled, 2 an invalid class: both skipped.
    labels = rng.choice([-1, 0, 1, 1, 2], rows).astype(np.int32)
    state = update_jit(state, feats, confident, labels, kmeans_iterations=iters)
    for c in range(2):
      burst = int(np.sum(confident & (labels == c)))
      added[c] += burst
      largest_burst[c] = max(largest_burst[c], burst)
    for n in range(rows):
      if confident[n] and labels[n] in (0, 1):
        mems[labels[n]].add(np_unit(feats[n]))
    for c in range(2):
      want = mems[c].entries()
      got = state_entries(state, c)
      assert len(got) == len(want) == int(state.count[c])
      assert int(state.count[c]) <= min(int(state.limit[c]), capacity)
      np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    assert int(state.count[2]) == 0
    ref = reference_centroids(mems, ref, iters)
    assert_centroids_match(state, ref, 2)
  # The regimes the parameters are meant to reach did occur.
  ring = np.asarray(state.limit - state.long_term)[:2]
  assert all(a > r for a, r in zip(added, ring))  # every ring wrapped
  if rows == 24:
    assert any(b > r for b, r in zip(largest_burst, ring))
  if cap_factor == 1:
    np.testing.assert_array_equal(ring, 0)


def test_update_fills_missing_centroids():
  x = np.array([[1.0, 0.0, 0.0]], np.float32)
  state = fit_jit(
      x,
      np.ones(1, bool),
      np.zeros(1, np.int32),
      1,
      np.zeros((4, 4), np.int32),
      max_classes=1,
      capacity=8,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=0,
  )
  np.testing.assert_array_equal(state.centroid_valid, [[True, False]])
  new = np.array([[0.0, 1.0, 0.0], [0.9, 0.1, 0.0]], np.float32)
  state = update_jit(
      state, new, np.ones(2, bool), np.zeros(2, np.int32), kmeans_iterations=0
  )
  np.testing.assert_array_equal(state.centroid_valid, [[True, True]])
  np.testing.assert_allclose(state.centroids[0, 1], [0.0, 1.0, 0.0])


def test_padding_never_leaks():
  rng = np.random.default_rng(5)
  x, valid, ids = random_frame(rng, 24, 18, 5, 3)
  kwargs = dict(
      max_classes=4,
      capacity=20,
      long_term_factor=1,
      cap_factor=10,
      kmeans_iterations=3,
  )
  first = np.zeros((8, 8), np.int32)
  garbage_x = x.copy()
  garbage_x[18:] = rng.normal(size=(6, 5)) * 1e6
  garbage_x[20] = np.nan
  garbage_ids = ids.copy()
  garbage_ids[18:] = rng.integers(-5, 9, 6)
  clean = fit_jit(x, valid, ids, 3, first, **kwargs)
  dirty = fit_jit(garbage_x, valid, garbage_ids, 3, first, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, clean, dirty)

  feats, qvalid, labels = random_frame(rng, 16, 11, 5, 3)
  confident = qvalid & (rng.random(16) < 0.7)
  dirty_feats = feats.copy()
  dirty_feats[11:] = np.nan
  dirty_labels = labels.copy()
  dirty_labels[11:] = 1
  clean = update_jit(clean, feats, confident, labels)
  dirty = update_jit(dirty, dirty_feats, confident, dirty_labels)
  jax.tree.map(np.testing.assert_array_equal, clean, dirty)
  assert np.all(np.isfinite(np.asarray(dirty.features)))

  got_clean = knn_jit(clean, feats, qvalid)
  got_dirty = knn_jit(clean, dirty_feats, qvalid)
  jax.tree.map(np.testing.assert_array_equal, got_clean, got_dirty)
  np.testing.assert_array_equal(
      centroid_jit(clean, feats, qvalid),
      centroid_jit(clean, dirty_feats, qvalid),
  )


def test_update_inside_scan_matches_python_loop():
  rng, state, _, _, _ = small_memory(6, kmeans_iterations=2)
  frames = 5
  feats = np.maximum(rng.normal(size=(frames, 30, 6)), 0).astype(np.float32)
  confident = rng.random((frames, 30)) < 0.6
  labels = rng.integers(-1, 4, (frames, 30)).astype(np.int32)

  @jax.jit
  def run(state, feats, confident, labels):
    def step(state, inputs):
      f, conf, lab = inputs
      new = memory.update(state, f, conf, lab, kmeans_iterations=2)
      out = memory.knn_scores(new, f, jnp.ones(f.shape[0], bool))
      return new, out

    return jax.lax.scan(step, state, (feats, confident, labels))

  final, (scan_labels, scan_scores) = run(state, feats, confident, labels)
  for t in range(frames):
    state = update_jit(
        state, feats[t], confident[t], labels[t], kmeans_iterations=2
    )
    want_labels, want_scores = knn_jit(state, feats[t], np.ones(30, bool))
    np.testing.assert_array_equal(scan_labels[t], want_labels)
    np.testing.assert_allclose(scan_scores[t], want_scores, atol=1e-6)
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, atol=1e-6), final, state
  )


# ---------------------------------------------------------------- boxes


def test_object_box_matches_numpy():
  rng = np.random.default_rng(7)
  box_jit = jax.jit(memory.object_box, static_argnums=(1, 2))
  for _ in range(30):
    # Two frame shapes: each compiles once.
    height, width = ((40, 56), (23, 61))[rng.integers(0, 2)]
    mask = np.zeros((height, width), bool)
    y, x = rng.integers(0, height), rng.integers(0, width)
    mask[y : y + rng.integers(1, 30), x : x + rng.integers(1, 30)] = True
    for r in (0.3, 0.5):
      got = box_jit(mask, r, 0.05)
      np.testing.assert_array_equal(got, np_object_box(mask, r))
  # Small along one axis: that axis takes the whole frame.
  mask = np.zeros((100, 100), bool)
  mask[40:44, 10:60] = True
  np.testing.assert_array_equal(memory.object_box(mask, 0.5), [0, 0, 100, 73])
  np.testing.assert_array_equal(
      memory.object_box(np.zeros((30, 40), bool), 0.3), [0, 0, 30, 40]
  )


def test_tracked_box_never_smaller_than_first_box():
  mask = np.zeros((50, 60), bool)
  mask[20:30, 30:40] = True  # object box with r = 0: [20, 30, 30, 40]
  first = np.array([0, 0, 16, 13])  # 16 high, 13 wide
  got = memory.tracked_box(mask, first, r=0.0)
  np.testing.assert_array_equal(got, [17, 29, 33, 42])
  # Near the border the grown box is shifted back inside the frame.
  mask = np.zeros((50, 60), bool)
  mask[0:10, 55:60] = True
  got = memory.tracked_box(mask, np.array([0, 0, 20, 20]), r=0.0)
  np.testing.assert_array_equal(got, [0, 40, 20, 60])
  # A larger box is left alone.
  got = memory.tracked_box(mask, np.array([0, 0, 2, 2]), r=0.0)
  np.testing.assert_array_equal(got, [0, 55, 10, 60])


# ---------------------------------------------------------------- confidence


def np_confident(logits, final, superpixels, boxes, class_valid, num, thr):
  height, width, num_classes = logits.shape
  in_any_box = np.zeros((height, width), bool)
  for c in range(1, num_classes):
    if class_valid[c]:
      y0, x0, y1, x1 = boxes[c]
      in_any_box[y0:y1, x0:x1] = True
  out = np.zeros(num, bool)
  for c in range(num_classes):
    where = final == c
    if c == 0:
      where &= in_any_box
    if not class_valid[c] or not where.any():
      continue
    reference = logits[..., c][where].mean()
    for n in range(num):
      pixels = superpixels == n
      if pixels.any() and logits[..., c][pixels].mean() >= thr * reference:
        out[n] = True
  return out


def test_confident_superpixels_match_numpy():
  rng = np.random.default_rng(8)
  height, width, num_classes, num = 12, 14, 4, 40
  superpixels = rng.integers(0, 30, (height, width)).astype(np.int32)
  superpixels[superpixels == 7] = 8  # an id without pixels
  final = rng.choice([0, 0, 1, 2], (height, width)).astype(np.int32)
  logits = rng.normal(size=(height, width, num_classes)).astype(np.float32)
  logits += 2.0 * np.eye(num_classes)[final]
  # Outside every box the background logit is a large constant.
  boxes = np.array([[0, 0, 0, 0], [1, 2, 8, 9], [3, 3, 11, 12], [0, 0, 5, 5]])
  logits[:1, :, 0] = 9.0
  class_valid = np.array([True, True, True, False])
  for thr in (0.4, 1.0, 1.4):
    got = memory.confident_superpixels(
        logits, final, superpixels, boxes, class_valid, num, thr
    )
    want = np_confident(
        logits, final, superpixels, boxes, class_valid, num, thr
    )
    np.testing.assert_array_equal(got, want)
    assert not bool(got[7]) and not np.any(np.asarray(got[30:]))
  assert 0 < int(np.sum(want)) < 29  # the threshold matters at 1.4


# ---------------------------------------------------------------- outliers


def np_outlier_filter(labels, previous, num_classes, overlap):
  """scipy components and skimage's exact convex hull (the authors' way)."""
  out = labels.copy()
  hulls = {}
  for c in range(1, num_classes):
    comp, count = ndi.label(labels == c)
    area = max(1, int(np.sum(previous == c)))
    kept = np.zeros(labels.shape, bool)
    for k in range(1, count + 1):
      if np.sum((comp == k) & (previous == c)) / area > overlap:
        kept |= comp == k
    if kept.any():
      hull = convex_hull_image(kept)
    else:
      hull = np.zeros(labels.shape, bool)
    hulls[c] = hull
    out[(labels == c) & ~hull] = memory.UNLABELLED
  return out, hulls


def blobs(rng, height, width, values, sigma=2.5):
  noise = rng.normal(size=(len(values), height, width))
  noise = ndi.gaussian_filter(noise, (0, sigma, sigma))
  return np.asarray(values, np.int32)[np.argmax(noise, 0)]


filter_jit = jax.jit(memory.outlier_filter, static_argnums=(2, 3, 4))


def test_outlier_filter_against_exact_hull():
  rng = np.random.default_rng(9)
  total_extra = total_hull = 0
  for trial in range(6):
    height, width = 40, 56
    labels = blobs(rng, height, width, [0, 0, 0, 1, 2, memory.UNLABELLED])
    previous = blobs(rng, height, width, [0, 0, 1, 2, 2])
    got = np.asarray(filter_jit(labels, previous, 4, 0.05, 64))
    want, hulls = np_outlier_filter(labels, previous, 4, 0.05)
    # Never touches background, unlabelled or classes out of range.
    np.testing.assert_array_equal(got[labels < 1], labels[labels < 1])
    # The polygon contains the exact hull: whatever the exact filter keeps,
    # this one keeps too; it may keep a few more pixels, next to the hull.
    kept_exact = want == labels
    assert np.all((got == labels)[kept_exact]), trial
    extra = (got == labels) & ~kept_exact
    for c in (1, 2):
      near = ndi.binary_dilation(hulls[c], iterations=1)
      assert np.all(near[extra & (labels == c)]), (trial, c)
      total_hull += int(hulls[c].sum())
    total_extra += int(extra.sum())
    assert np.all(got[~(got == labels)] == memory.UNLABELLED)
  assert total_extra <= 0.01 * total_hull
  assert np.sum(got == memory.UNLABELLED) > np.sum(labels == memory.UNLABELLED)


def test_outlier_filter_keeps_overlapping_components_exactly():
  labels = np.zeros((30, 40), np.int32)
  labels[2:10, 3:12] = 1  # overlaps the previous mask of 1
  labels[20:25, 30:38] = 1  # far away: outlier
  labels[12:14, 14:16] = 1  # inside the kept hull? no: outside, removed
  labels[4:8, 20:30] = 2  # previous mask of 2 is empty: all removed
  previous = np.zeros((30, 40), np.int32)
  previous[5:12, 5:14] = 1
  got = np.asarray(filter_jit(labels, previous, 3, 0.05, 32))
  want = labels.copy()
  want[20:25, 30:38] = memory.UNLABELLED
  want[12:14, 14:16] = memory.UNLABELLED
  want[4:8, 20:30] = memory.UNLABELLED
  np.testing.assert_array_equal(got, want)
  # Two kept rectangles: the hull spans the space between them.
  labels = np.zeros((30, 40), np.int32)
  labels[2:6, 2:30] = 1
  labels[10:14, 2:30] = 1
  labels[7:9, 5:8] = 1  # a third component inside the hull, not overlapping
  labels[20:22, 2:4] = 1  # and one outside
  previous = np.zeros((30, 40), np.int32)
  previous[2:14, 2:30] = 1
  got = np.asarray(filter_jit(labels, previous, 2, 0.05, 32))
  want = labels.copy()
  want[20:22, 2:4] = memory.UNLABELLED
  np.testing.assert_array_equal(got, want)
  # The overlap must exceed 5 % of the previous mask's area.
  labels = np.zeros((20, 20), np.int32)
  labels[0, 0:5] = 1  # 5 pixels, all inside the previous mask
  previous = np.zeros((20, 20), np.int32)
  previous[0:10, 0:10] = 1  # area 100: 5 is not more than 5 %
  got = np.asarray(filter_jit(labels, previous, 2, 0.05, 32))
  assert np.all(got[labels == 1] == memory.UNLABELLED)
  previous[9, 9] = 0  # area 99: 5 is more than 4.95
  got = np.asarray(filter_jit(labels, previous, 2, 0.05, 32))
  np.testing.assert_array_equal(got, labels)


def test_outlier_filter_rejects_too_few_directions():
  with pytest.raises(ValueError, match="32 directions"):
    memory.outlier_filter(
        np.zeros((4, 4), np.int32), np.zeros((4, 4)), 2, 0.05, 16
    )


# ---------------------------------------------------------------- admit


def test_admit_starts_late_classes_like_fit_and_keeps_the_others():
  """A class admitted on a later frame is fitted as `fit` would on that
  frame (entries, long-term part, cap from the frame's superpixel count,
  centroids, tight box); the tracked classes are untouched."""
  rng = np.random.default_rng(7)
  x0, valid0, ids0 = random_frame(rng, 24, 18, 6, 2)  # Classes 0, 1 only.
  state = fit_jit(
      x0,
      valid0,
      ids0,
      2,  # Objects 2 and 3 (slots up to 4) are not given on frame 0.
      label_map(rng, 16, 18, 2),
      max_classes=5,
      capacity=80,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=3,
  )
  state = update_jit(state, x0, valid0, ids0, kmeans_iterations=3)
  # Frame t: 14 superpixels, 3 of class 3 (new), the rest unlabelled for
  # the admission (0 = not a new object; ids of tracked classes ignored).
  x, valid, _ = random_frame(rng, 24, 14, 6, 2)
  ids = np.zeros(24, np.int32)
  ids[[2, 5, 9]] = 3
  ids[4] = 1  # A tracked class: must not be touched.
  given = np.zeros((16, 18), np.int32)
  given[3:6, 7:12] = 3
  new = np.array([False, False, False, True, False])
  admitted = jax.jit(
      memory.admit, static_argnames=("long_term_factor", "cap_factor")
  )(
      state,
      x,
      valid,
      ids,
      new,
      given_labels=given,
      long_term_factor=5,
      cap_factor=10,
      kmeans_iterations=3,
  )
  np.testing.assert_array_equal(admitted.class_valid, [1, 1, 0, 1, 0])
  assert int(admitted.count[3]) == 3
  assert int(admitted.long_term[3]) == 15  # 5 x 3.
  assert int(admitted.limit[3]) == 80  # min(10 x 14, capacity).
  np.testing.assert_allclose(
      np.asarray(admitted.features[3, :3]), np_unit(x[[2, 5, 9]]), atol=1e-6
  )
  points = np_unit(x[[2, 5, 9]])
  cents = np_lloyd(points, np_seed(points, [None, None], [False, False]), 3)
  for m, cent in enumerate(cents):
    assert bool(admitted.centroid_valid[3, m])
    np.testing.assert_allclose(
        np.asarray(admitted.centroids[3, m]), cent, atol=2e-5
    )
  np.testing.assert_array_equal(
      admitted.first_boxes[3], np_tight_box(given == 3)
  )
  # Every other class keeps its entries, layout and centroids exactly.
  for c in (0, 1, 2, 4):
    for field in (
        "count",
        "long_term",
        "limit",
        "ring_start",
        "class_valid",
        "first_boxes",
        "centroid_valid",
    ):
      np.testing.assert_array_equal(
          getattr(admitted, field)[c], getattr(state, field)[c], err_msg=field
      )
    np.testing.assert_array_equal(admitted.features[c], state.features[c])
    np.testing.assert_array_equal(admitted.centroids[c], state.centroids[c])
  # Later updates treat the admitted class like any other.
  later = update_jit(
      admitted, x, valid, np.where(valid, 3, -1), kmeans_iterations=3
  )
  assert int(later.count[3]) == 3 + 14
