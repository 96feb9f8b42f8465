"""On-device operations on superpixel maps: majority labels and border splits.

Everything here is pure JAX with static shapes, so it runs under `jit` and
`vmap` inside the training and inference steps; no Python loop runs over
superpixels or pixels.

* `majority_labels`: the object id of every superpixel, the most common
  label-map value among its pixels (SPEC 4.1).
* `split_at_label_borders`: the first frame's superpixels cut along the
  object borders of its mask (SPEC 6.1): pixels whose label is not their
  superpixel's majority label become new superpixels, one per 4-connected
  component of pixels that share (superpixel, label).
* `valid_segments`: the validity mask of a padded superpixel axis.

Label maps come from 8-bit PNGs, so labels lie in [0, 256) (255 is DAVIS's
void value and counts as a label like any other).
"""

import jax
import jax.numpy as jnp

# Label maps are 8-bit PNGs.
NUM_LABEL_VALUES = 256


def valid_segments(num_valid: jax.Array, num_segments: int) -> jax.Array:
  """Which entries of a padded superpixel axis exist.

  Args:
    num_valid: int [...], the number of superpixels of each frame.
    num_segments: N_max, the padded size.

  Returns:
    bool [..., num_segments]: `arange(num_segments) < num_valid`.
  """
  num_valid = jnp.asarray(num_valid)
  return jnp.arange(num_segments) < num_valid[..., None]


def majority_labels(
    superpixels: jax.Array, labels: jax.Array, num_segments: int
) -> jax.Array:
  """The most common label of each superpixel.

  One `segment_sum` counts the pixels of every (frame, superpixel, label)
  triple; the argmax over labels picks the majority, the first (smallest)
  label on ties.

  Args:
    superpixels: int [..., height, width], ids in [0, num_segments).
    labels: int [..., height, width], values in [0, 256).
    num_segments: N_max, the number of superpixel ids.

  Returns:
    int32 [..., num_segments]: the majority label of each superpixel, -1 for
    an id without any pixel. Pixels with an id or a label out of range are
    ignored.
  """
  if superpixels.shape != labels.shape:
    raise ValueError(
        f"superpixels {superpixels.shape} and labels {labels.shape} must have"
        " the same shape [..., height, width]."
    )
  batch_shape = superpixels.shape[:-2]
  superpixels = superpixels.reshape(
      -1, superpixels.shape[-2] * superpixels.shape[-1]
  ).astype(jnp.int32)
  labels = labels.reshape(superpixels.shape).astype(jnp.int32)
  batch = superpixels.shape[0]
  num_buckets = batch * num_segments * NUM_LABEL_VALUES
  # Frame b's superpixel n and label l count in bucket (b * N + n) * 256 + l;
  # out-of-range pixels go to the bucket just past the end, which
  # segment_sum drops, so they cannot spill into a neighbouring frame.
  in_range = (
      (superpixels >= 0)
      & (superpixels < num_segments)
      & (labels >= 0)
      & (labels < NUM_LABEL_VALUES)
  )
  offsets = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_segments
  keys = (offsets + superpixels) * NUM_LABEL_VALUES + labels
  keys = jnp.where(in_range, keys, num_buckets)
  counts = jax.ops.segment_sum(
      jnp.ones(keys.size, jnp.int32),
      keys.reshape(-1),
      num_segments=num_buckets,
  ).reshape(batch, num_segments, NUM_LABEL_VALUES)
  majority = jnp.argmax(counts, axis=-1).astype(jnp.int32)
  majority = jnp.where(counts.max(-1) > 0, majority, -1)
  return majority.reshape(*batch_shape, num_segments)


def _shift(x: jax.Array, dy: int, dx: int, fill) -> jax.Array:
  """out[i, j] = x[i + dy, j + dx] on [height, width], `fill` off the map."""
  height, width = x.shape
  padded = jnp.pad(x, 1, constant_values=fill)
  return padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def connected_components(
    keys: jax.Array, active: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """4-connected components of active pixels with equal keys.

  Every pixel holds a pointer to a pixel of its component (initially itself,
  as a flat index). Each round takes the smallest pointer among the
  connected neighbours, hooks the pointed-to pixel onto it (scatter-min, so
  whole trees merge at once) and halves the paths by pointer jumping. A
  round that changes nothing means every pointer equals the minimum over its
  neighbours, i.e. it is constant on each component; since pointers only
  ever point into the component and never below its smallest index, that
  constant is the component's smallest flat index. The rounds needed grow
  like the log of the component size for most shapes, and never beyond
  its length.

  Args:
    keys: int [height, width]; pixels connect only to equal keys.
    active: bool [height, width]; inactive pixels stay alone.

  Returns:
    roots: int32 [height, width], the smallest flat index (row * width +
      col) of each pixel's component; an inactive pixel points to itself.
    num_rounds: int32 scalar, rounds until nothing changed (diagnostics).
  """
  height, width = keys.shape
  size = height * width
  # Linked[d][i, j]: pixel (i, j) and its neighbour in direction d connect.
  directions = ((-1, 0), (1, 0), (0, -1), (0, 1))
  linked = [
      active & _shift(active, dy, dx, False) & (keys == _shift(keys, dy, dx, 0))
      for dy, dx in directions
  ]
  flat_index = jnp.arange(size, dtype=jnp.int32)

  def one_round(pointers):
    grid = pointers.reshape(height, width)
    smallest = grid
    for (dy, dx), link in zip(directions, linked):
      smallest = jnp.minimum(
          smallest, jnp.where(link, _shift(grid, dy, dx, size), size)
      )
    smallest = smallest.reshape(size)
    # Hooking the pointed-to pixel lets a whole tree join the smaller one in
    # one round instead of creeping one pixel per round.
    pointers = pointers.at[pointers].min(smallest)
    pointers = jnp.minimum(pointers, smallest)
    return pointers[pointers]

  def cond(state):
    _, changed, _ = state
    return changed

  def body(state):
    pointers, _, rounds = state
    new = one_round(pointers)
    return new, jnp.any(new != pointers), rounds + 1

  # The first round runs outside the loop so that the carry derives from
  # the inputs: inside shard_map it then has their varying-axes type.
  first = one_round(flat_index)
  pointers, _, rounds = jax.lax.while_loop(
      cond, body, (first, jnp.any(first != flat_index), jnp.ones((), jnp.int32))
  )
  return pointers.reshape(height, width), rounds


def split_at_label_borders(
    superpixels: jax.Array,
    labels: jax.Array,
    num_superpixels: jax.Array | int,
    num_segments_out: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cuts one frame's superpixels along the borders of its label map.

  SPEC 6.1. Pixels whose label differs from their superpixel's majority
  label form new superpixels, one per 4-connected component of pixels with
  the same (superpixel, label). Old ids keep their numbers (the majority
  pixels of a superpixel may end up disconnected; they keep the old id
  anyway). New components get ids num_superpixels, num_superpixels + 1, ...
  in raster order of their first pixel. Components that would need an id
  >= num_segments_out stay in their superpixel and are counted in
  `overflow`, so every output id is < num_segments_out.

  For one frame; vmap over frames.

  Args:
    superpixels: int [height, width], ids in [0, num_superpixels).
    labels: int [height, width], values in [0, 256).
    num_superpixels: int scalar (may be traced), the frame's superpixel
      count; must be <= num_segments_out.
    num_segments_out: N_max of the output (static).

  Returns:
    split_map: int32 [height, width], ids in [0, num_out).
    num_out: int32 scalar, the superpixel count of `split_map`.
    overflow: int32 scalar, components left unsplit for lack of ids.
  """
  if superpixels.ndim != 2 or superpixels.shape != labels.shape:
    raise ValueError(
        "split_at_label_borders takes one frame: superpixels and labels of"
        f" shape [height, width], got {superpixels.shape} and"
        f" {labels.shape}; vmap it over frames."
    )
  height, width = superpixels.shape
  superpixels = superpixels.astype(jnp.int32)
  labels = labels.astype(jnp.int32)
  num_superpixels = jnp.asarray(num_superpixels, jnp.int32)
  majority = majority_labels(superpixels, labels, num_segments_out)
  minority = labels != majority[superpixels]
  keys = superpixels * NUM_LABEL_VALUES + labels
  roots, _ = connected_components(keys, minority)
  roots = roots.reshape(-1)
  flat_minority = minority.reshape(-1)
  is_root = flat_minority & (roots == jnp.arange(height * width))
  # Roots are the first pixels of their components, so ranking them in flat
  # order numbers the components in raster order.
  rank = jnp.cumsum(is_root.astype(jnp.int32)) - 1
  num_components = jnp.sum(is_root.astype(jnp.int32))
  free_ids = jnp.maximum(num_segments_out - num_superpixels, 0)
  component_rank = rank[roots]
  moves = flat_minority & (component_rank < free_ids)
  split_map = jnp.where(
      moves, num_superpixels + component_rank, superpixels.reshape(-1)
  )
  num_new = jnp.minimum(num_components, free_ids)
  return (
      split_map.reshape(height, width),
      num_superpixels + num_new,
      num_components - num_new,
  )
