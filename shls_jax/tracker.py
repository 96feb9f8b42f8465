"""The per-frame step of SHLS, shared by training and inference (SPEC 8).

A video is a `lax.scan` of one pure function over its frames. This module
holds that function's pieces; so far the memory-side half:

  predict   superfeatures of a frame -> the memory's hard labels painted on
            pixels and filtered for outliers (SPEC 6.2), the four score maps
            per object the decoder reads, and each object's test box (6.4).
  refine    the decoder on every object's crops, pasted back and soft-
            aggregated into one logit map (SPEC 7).

Next to come (issue 4): these and the memory update chained into
`step(carry, frame)`, the scan over a video with a frame mask, and the same
step inside the stage-2 train step.
"""

import jax
import jax.numpy as jnp

from shls_jax import memory
from shls_jax.models import decoder as decoder_lib


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


def refine(
    model: decoder_lib.Decoder,
    variables,
    *,
    boxes: jax.Array,
    mask0: jax.Array,
    prev_pred: jax.Array,
    f1: jax.Array,
    f4: jax.Array,
    maps: jax.Array,
    object_valid: jax.Array,
    crop_size: tuple[int, int],
    train: bool = False,
):
  """The decoder's aggregated logits for one frame (SPEC 7).

  Args:
    model: the Decoder.
    variables: its params and batch_stats.
    boxes: int32 [K, 3, 4], per object the first, previous and current box.
    mask0: [K, H, W], each object's frame-0 mask.
    prev_pred: [K, H, W], each object's previous prediction (probability).
    f1: [3, H, W, 67], F1 of frame 0, the previous and the current frame.
    f4: [3, H/4, W/4, 259], F4 likewise.
    maps: [2, K, H, W, 4], the four maps of the previous and the current
      frame per object.
    object_valid: bool [K], objects that exist.
    crop_size: (Hc, Wc), multiples of 4.
    train: BatchNorm mode (training returns the updated batch_stats).

  Returns:
    (logits [K + 1, H, W] as `decoder.aggregate`, the updated batch_stats or
    None when not training).
  """
  crops = jax.vmap(
      lambda b, m0, pp, mp: decoder_lib.crop_inputs(
          b, m0, pp, f1, mp, f4, crop_size
      ),
      in_axes=(0, 0, 0, 1),
  )(boxes, mask0, prev_pred, maps)
  if train:
    logits, mutated = model.apply(
        variables, **crops, train=True, mutable=["batch_stats"]
    )
    batch_stats = mutated["batch_stats"]
  else:
    logits, batch_stats = model.apply(variables, **crops, train=False), None
  frame_size = mask0.shape[1:]
  pasted, inside = jax.vmap(
      lambda lg, box: decoder_lib.paste(lg, box, frame_size)
  )(logits, boxes[:, 2])
  return decoder_lib.aggregate(pasted, inside, object_valid), batch_stats
