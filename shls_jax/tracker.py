"""The per-frame step of SHLS, shared by training and inference (SPEC 8).

A video is a `lax.scan` of one pure function over its frames. This module
holds that function's pieces; so far the memory-side half:

  predict   superfeatures of a frame -> the memory's hard labels painted on
            pixels and filtered for outliers (SPEC 6.2), the four score maps
            per object the decoder reads, and each object's test box (6.4).

Next to come (issue 4): the decoder crops, aggregation and the memory update
chained into `step(carry, frame)`, the scan over a video with a frame mask,
and the same step inside the stage-2 train step.
"""

import jax
import jax.numpy as jnp

from shls_jax import memory


def paint(per_superpixel: jax.Array, superpixels: jax.Array) -> jax.Array:
  """Per-superpixel values [N, ...] onto pixels [H, W, ...] by a gather."""
  return jnp.take(per_superpixel, superpixels, axis=0, mode="clip")


def predict(
    state: memory.MemoryState,
    superfeatures: jax.Array,
    valid: jax.Array,
    superpixels: jax.Array,
    previous: jax.Array,
    *,
    box_r: float = memory.TEST_BOX_R,
    outlier_overlap: float = memory.OUTLIER_OVERLAP,
    num_directions: int = memory.HULL_DIRECTIONS,
) -> dict[str, jax.Array]:
  """The memory's prediction for one later frame (SPEC 6.2, 6.4).

  Args:
    state: the memory (C class slots; class 0 is the background).
    superfeatures: f32 [N, D] of the frame.
    valid: bool [N], superpixels that exist.
    superpixels: int32 [H, W], ids in [0, N).
    previous: int [H, W], the previous frame's final mask.
    box_r: enlargement of the test boxes.
    outlier_overlap: see `memory.outlier_filter`.
    num_directions: hull polygon directions.

  Returns:
    coarse: int32 [H, W], the nearest entry's class per pixel, after the
      outlier filter (memory.UNLABELLED where filtered out).
    maps: f32 [C - 1, H, W, 4], per object 1..C-1: its kNN score, the best
      kNN score of any other class, its centroid score, the best centroid
      score of any other class (unfiltered, as the decoder reads them).
    boxes: int32 [C - 1, 4], each object's test box from its filtered
      coarse mask (never smaller than its frame-0 box).
    labels: int32 [N], the per-superpixel hard labels (before the filter).
  """
  num_classes = state.class_valid.shape[0]
  labels, knn = memory.knn_scores(state, superfeatures, valid)
  centroid = memory.centroid_scores(state, superfeatures, valid)
  scores = jnp.stack(
      [
          knn,
          memory.best_other_class(knn, state.class_valid),
          centroid,
          memory.best_other_class(centroid, state.class_valid),
      ],
      -1,
  )  # [N, C, 4]
  maps = jnp.moveaxis(paint(scores[:, 1:], superpixels), 2, 0)
  coarse = memory.outlier_filter(
      paint(labels, superpixels),
      previous,
      num_classes,
      overlap=outlier_overlap,
      num_directions=num_directions,
  )
  objects = jnp.arange(1, num_classes)
  boxes = jax.vmap(
      lambda c, first: memory.tracked_box(coarse == c, first, box_r)
  )(objects, state.first_boxes[1:])
  return {"coarse": coarse, "maps": maps, "boxes": boxes, "labels": labels}
