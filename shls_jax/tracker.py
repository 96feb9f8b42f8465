"""The per-frame step of SHLS, shared by training and inference (SPEC 8).

A video is a `lax.scan` of one pure function over its frames. This module
holds that function and its pieces:

  predict   superfeatures of a frame -> the memory's hard labels painted on
            pixels and filtered for outliers (SPEC 6.2), the four score maps
            per object the decoder reads, and each object's test box (6.4).
  refine    the decoder on every object's crops, pasted back and soft-
            aggregated into one logit map (SPEC 7).

  start     frame 0: split its superpixels at the mask, fit the memory, the
            carry of the scan.
  step      one later frame: superfeatures, predict, refine, update, and
            `admit` for objects first given on that frame (YouTube-VOS).
  track     `start`, then `lax.scan` of `step` over the remaining frames
            (padded frames, `frame_valid` False, leave the carry alone).

A step is `observe` (memory prediction, decoder crops), the decoder, and
`advance` (paste, aggregate, update). Inference runs the three in order per
frame (`step`); the stage-2 train step (train.py) runs `observe` and
`advance` vmapped over its sequences and the decoder once on all their
object crops, so that training-mode BatchNorm sees every object of the
device's batch.

Open choices made here (SPEC is silent): the "previous" maps fed to frame 1
are the memory's own prediction on frame 0 right after `fit`; frame 1's
previous box is the test-box rule applied to the frame-0 mask; a superpixel
is written to the memory under its majority coarse label counting unlabelled
pixels as a label of their own (a superpixel mostly unlabelled is skipped).
Each object's reference crops (its given mask, F1 and F4 in its first box)
are taken once, when it is given, and carried: the first box never moves.
A late object's given mask wins over the tracked objects on its frame; the
memory's update of that frame (made before the object was known) stays.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from shls_jax import memory
from shls_jax import segments
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
    hyper: memory.Hyperparameters = memory.Hyperparameters(),
) -> dict[str, jax.Array]:
  """The memory's prediction for one later frame (SPEC 6.2, 6.4).

  Args:
    state: the memory (C class slots; class 0 is the background).
    superfeatures: f32 [N, D] of the frame.
    valid: bool [N], superpixels that exist.
    superpixels: int32 [H, W], ids in [0, N).
    previous: int [H, W], the previous frame's final mask.
    hyper: the memory's rules (kNN, test box r, outlier filter).

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
  labels, knn = memory.knn_scores(
      state,
      superfeatures,
      valid,
      num_neighbours=hyper.num_neighbours,
      rank_weight_base=hyper.rank_weight_base,
  )
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
      overlap=hyper.outlier_overlap,
      num_directions=hyper.hull_directions,
  )
  objects = jnp.arange(1, num_classes)
  boxes = jax.vmap(
      lambda c, first: memory.tracked_box(
          coarse == c, first, hyper.test_box_r, hyper.min_box_fraction
      )
  )(objects, state.first_boxes[1:])
  return {"coarse": coarse, "maps": maps, "boxes": boxes, "labels": labels}


def combine(
    crop_logits: jax.Array,
    current_boxes: jax.Array,
    object_valid: jax.Array,
    frame_size: tuple[int, int],
) -> jax.Array:
  """Per-object crop logits [K, Hc, Wc, 2] -> aggregated [K + 1, H, W]."""
  pasted, inside = jax.vmap(
      lambda lg, box: decoder_lib.paste(lg, box, frame_size)
  )(crop_logits, current_boxes)
  return decoder_lib.aggregate(pasted, inside, object_valid)


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
    train: BatchNorm mode (training returns the updated batch_stats; only
      valid objects count in the statistics).

  Returns:
    (logits [K + 1, H, W] as `decoder.aggregate`, the updated batch_stats or
    None when not training).
  """
  crops = decoder_crops(boxes, mask0, prev_pred, f1, f4, maps, crop_size)
  if train:
    logits, mutated = model.apply(
        variables,
        **crops,
        train=True,
        mask=object_valid,
        mutable=["batch_stats"],
    )
    batch_stats = mutated["batch_stats"]
  else:
    logits, batch_stats = model.apply(variables, **crops, train=False), None
  return (
      combine(logits, boxes[:, 2], object_valid, mask0.shape[1:]),
      batch_stats,
  )


def decoder_crops(
    boxes, mask0, prev_pred, f1, f4, maps, crop_size
) -> dict[str, jax.Array]:
  """Every object's decoder inputs (`refine`'s arguments), batch axis K."""
  return jax.vmap(
      lambda b, m0, pp, mp: decoder_lib.crop_inputs(
          b, m0, pp, f1, mp, f4, crop_size
      ),
      in_axes=(0, 0, 0, 1),
  )(boxes, mask0, prev_pred, maps)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static sizes of a tracked video (from the config).

  Attributes:
    max_objects: K, object slots (memory classes are K + 1).
    num_segments: N, superpixel slots per frame, room for the frame-0 split
      included.
    capacity: S, memory rows per class.
    crop_size: the decoder's (Hc, Wc).
    first_box_r: enlargement of the frame-0 reference box (SPEC 6.4).
    hyper: the memory's rules (config.memory).
  """

  max_objects: int
  num_segments: int
  capacity: int
  crop_size: tuple[int, int]
  first_box_r: float = 0.5
  hyper: memory.Hyperparameters = memory.Hyperparameters()


@flax.struct.dataclass
class Carry:
  """What one frame passes to the next (fixed shapes)."""

  memory: memory.MemoryState
  object_valid: jax.Array  # bool [K], objects given so far
  box0: jax.Array  # int32 [K, 4], reference boxes (where each was given)
  # Each object's reference crops (`decoder.reference_crops`, batch axis K):
  # its given mask, F1 and F4 inside its reference box.
  reference: dict[str, jax.Array]
  f1_prev: jax.Array
  f4_prev: jax.Array
  maps_prev: jax.Array  # f32 [K, H, W, 4]
  prob_prev: jax.Array  # f32 [K, H, W], previous object probabilities
  mask_prev: jax.Array  # int32 [H, W], previous final mask
  box_prev: jax.Array  # int32 [K, 4]


def frame_features(sf_model, sf_variables, frame, superpixels, valid):
  """Superfeatures [N, D], F1 [H, W, 67] and F4 of one normalised frame."""
  out = sf_model.apply(
      sf_variables, frame[None], superpixels[None], valid[None], train=False
  )
  return out["superfeatures"][0], out["f1"][0], out["f4"][0]


def start(
    sf_model,
    sf_variables,
    frame: jax.Array,
    superpixels: jax.Array,
    num_superpixels: jax.Array,
    mask: jax.Array,
    num_objects: jax.Array,
    settings: Settings,
) -> tuple[Carry, jax.Array]:
  """Frame 0: split, fit the memory, the scan's first carry.

  Args:
    sf_model: the SuperfeatureNet.
    sf_variables: its variables.
    frame: f32 [H, W, 3], normalised.
    superpixels: int32 [H, W] and num_superpixels int32 scalar.
    mask: int32 [H, W], the given first-frame mask (ids 0..num_objects).
    num_objects: int32 scalar (<= settings.max_objects).
    settings: the static sizes.

  Returns:
    (the carry, the frame-0 mask as given).
  """
  n = settings.num_segments
  split, count, _ = segments.split_at_label_borders(
      superpixels, mask, num_superpixels, n
  )
  valid = jnp.arange(n) < count
  features, f1, f4 = frame_features(sf_model, sf_variables, frame, split, valid)
  carry = start_from_features(
      features=features,
      f1=f1,
      f4=f4,
      valid=valid,
      superpixels=split,
      ids=segments.majority_labels(split, mask, n),
      mask=mask,
      num_objects=num_objects,
      settings=settings,
  )
  return carry, mask.astype(jnp.int32)


def start_from_features(
    *,
    features: jax.Array,
    f1: jax.Array,
    f4: jax.Array,
    valid: jax.Array,
    superpixels: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    num_objects: jax.Array,
    settings: Settings,
) -> Carry:
  """The first carry from frame 0's features (superpixels already split).

  Training calls this with the features of its batched network pass; they
  are constants here (SPEC 5: frame 0's features carry no gradient).

  Args:
    features: f32 [N, D] superfeatures of the split frame 0.
    f1, f4: its feature maps.
    valid: bool [N]; superpixels: int32 [H, W], the split map; ids: int32
      [N], each superpixel's label.
    mask: int32 [H, W], the frame-0 label map (ids above num_objects are
      ignored).
    num_objects: int32 scalar (<= settings.max_objects).
    settings: the static sizes.
  """
  k = settings.max_objects
  features, f1, f4 = jax.lax.stop_gradient((features, f1, f4))
  objects = jnp.arange(1, k + 1)
  masks = (mask[None] == objects[:, None, None]) & (objects <= num_objects)[
      :, None, None
  ]
  # An object is tracked once it has been given: objects absent from frame 0
  # join later (`admit`) or never.
  object_valid = masks.any((1, 2))
  # Ids of objects beyond num_objects are void for the memory.
  mask = jnp.where((mask > num_objects) | (mask < 0), -1, mask)
  state = memory.fit(
      features,
      valid,
      jnp.where(ids > num_objects, -1, ids),
      num_objects + 1,
      first_labels=mask,
      max_classes=k + 1,
      capacity=settings.capacity,
      num_centroids=settings.hyper.num_centroids,
      long_term_factor=settings.hyper.long_term_factor,
      cap_factor=settings.hyper.cap_factor,
      kmeans_iterations=settings.hyper.kmeans_iterations,
  )
  state = state.replace(
      class_valid=state.class_valid
      & jnp.concatenate([jnp.ones(1, bool), object_valid])
  )
  own = predict(state, features, valid, superpixels, mask, hyper=settings.hyper)
  box0 = jax.vmap(lambda m: memory.object_box(m, settings.first_box_r))(masks)
  return Carry(
      memory=state,
      object_valid=object_valid,
      box0=box0,
      reference=jax.vmap(
          lambda b, m: decoder_lib.reference_crops(
              b, m, f1, f4, settings.crop_size
          )
      )(box0, masks),
      f1_prev=f1,
      f4_prev=f4,
      maps_prev=own["maps"][:k],
      prob_prev=masks.astype(jnp.float32),
      mask_prev=jnp.maximum(mask, 0).astype(jnp.int32),
      box_prev=jax.vmap(
          lambda m, first: memory.tracked_box(
              m,
              first,
              settings.hyper.test_box_r,
              settings.hyper.min_box_fraction,
          )
      )(masks, state.first_boxes[1:]),
  )


def observe(
    carry: Carry,
    *,
    features: jax.Array,
    f1: jax.Array,
    f4: jax.Array,
    valid: jax.Array,
    superpixels: jax.Array,
    settings: Settings,
    boxes: jax.Array | None = None,
):
  """The first half of a step: the memory's prediction and decoder crops.

  Args:
    carry: from `start` or the previous step.
    features, f1, f4: the current frame's features.
    valid: bool [N]; superpixels: int32 [H, W].
    settings: the static sizes.
    boxes: int32 [K, 3, 4], the first, previous and current box of every
      object; None: the test boxes (carry's first and previous boxes, the
      memory's current box, SPEC 6.4). Training passes ground-truth boxes.
      The first box only labels the output: the crops of each object's
      reference frame were taken once, from `carry.box0`.

  Returns:
    (pred from `predict` with the boxes used under "boxes", the decoder
    crops [K, ...]).
  """
  pred = predict(
      carry.memory,
      jax.lax.stop_gradient(features),
      valid,
      superpixels,
      carry.mask_prev,
      hyper=settings.hyper,
  )
  if boxes is None:
    boxes = jnp.stack([carry.box0, carry.box_prev, pred["boxes"]], 1)
  pred["boxes"] = boxes
  f1_pair = jnp.stack([carry.f1_prev, f1])
  f4_pair = jnp.stack([carry.f4_prev, f4])
  maps = jnp.stack([carry.maps_prev, pred["maps"]])
  crops = jax.vmap(
      lambda ref, b, pp, mp: decoder_lib.later_crops(
          ref, b, pp, f1_pair, mp, f4_pair, settings.crop_size
      ),
      in_axes=(0, 0, 0, 1),
  )(carry.reference, boxes[:, 1:], carry.prob_prev, maps)
  return pred, crops


def advance(
    carry: Carry,
    *,
    pred: dict[str, jax.Array],
    crop_logits: jax.Array,
    features: jax.Array,
    f1: jax.Array,
    f4: jax.Array,
    valid: jax.Array,
    superpixels: jax.Array,
    hyper: memory.Hyperparameters = memory.Hyperparameters(),
) -> tuple[Carry, jax.Array]:
  """The second half of a step: paste, aggregate, update the memory.

  Args:
    carry: as given to `observe`.
    pred: `observe`'s prediction.
    crop_logits: f32 [K, Hc, Wc, 2], the decoder's output on its crops.
    features, f1, f4, valid, superpixels: the current frame, as given to
      `observe`.
    hyper: the memory's rules (confidence, k-means steps).

  Returns:
    (the next carry, the aggregated logits [K + 1, H, W]). The carry holds
    no gradient of the memory, the maps or the prediction (SPEC 5); it keeps
    F1 and F4, which the next frame's decoder reads as its previous frame.
  """
  n = valid.shape[0]
  boxes = pred["boxes"]
  logits = combine(
      crop_logits, boxes[:, 2], carry.object_valid, superpixels.shape
  )
  fixed = jax.lax.stop_gradient(logits)
  final = jnp.argmax(fixed, 0).astype(jnp.int32)
  class_boxes = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), boxes[:, 2]])
  confident = memory.confident_superpixels(
      jnp.moveaxis(fixed, 0, -1),
      final,
      superpixels,
      class_boxes,
      carry.memory.class_valid,
      n,
      threshold=hyper.confidence,
  )
  # Unlabelled pixels vote as label 255: a mostly unlabelled superpixel is
  # skipped (its majority is not a class).
  coarse = jnp.where(pred["coarse"] == memory.UNLABELLED, 255, pred["coarse"])
  update_labels = segments.majority_labels(superpixels, coarse, n)
  update_labels = jnp.where(update_labels == 255, -1, update_labels)
  new = carry.replace(
      memory=memory.update(
          carry.memory,
          jax.lax.stop_gradient(features),
          confident & valid,
          update_labels,
          kmeans_iterations=hyper.kmeans_iterations,
      ),
      f1_prev=f1,
      f4_prev=f4,
      maps_prev=pred["maps"],
      prob_prev=jax.nn.sigmoid(fixed[1:]),
      mask_prev=final,
      box_prev=boxes[:, 2],
  )
  return new, logits


def admit(
    carry: Carry,
    *,
    given: jax.Array,
    final: jax.Array,
    frame: jax.Array,
    superpixels: jax.Array,
    num_superpixels: jax.Array,
    sf_model,
    sf_variables,
    settings: Settings,
) -> tuple[Carry, jax.Array]:
  """Objects first given on this frame join the tracking (YouTube-VOS).

  SPEC 6.1 on a later frame, for the new objects only: the frame's
  superpixels are split at the given masks' borders, the superfeatures of
  the split frame fit each new object's memory class (`memory.admit`), and
  its reference crops, reference box and "previous" maps come from this
  frame as they come from frame 0 for the others. The given masks overwrite
  the frame's output (they are the answer for those pixels), and the
  tracked objects' previous probabilities are cleared under them.

  Args:
    carry: after `advance` on this frame.
    given: int32 [H, W], the masks given on this frame (object ids, 0
      elsewhere); ids of objects already tracked are ignored.
    final: int32 [H, W], the frame's mask from the tracked objects.
    frame: f32 [H, W, 3], normalised; superpixels int32 [H, W];
      num_superpixels int32.
    sf_model, sf_variables: the superfeature network.
    settings: the static sizes.

  Returns:
    (the carry with the new objects, the frame's final mask).
  """
  k, n = settings.max_objects, settings.num_segments
  hyper = settings.hyper
  objects = jnp.arange(1, k + 1)
  masks = given[None] == objects[:, None, None]  # [K, H, W]
  new = masks.any((1, 2)) & ~carry.object_valid
  masks = masks & new[:, None, None]
  given = jnp.sum(masks * objects[:, None, None], 0).astype(jnp.int32)
  split, count, _ = segments.split_at_label_borders(
      superpixels, given, num_superpixels, n
  )
  valid = jnp.arange(n) < count
  features, f1, f4 = frame_features(sf_model, sf_variables, frame, split, valid)
  state = memory.admit(
      carry.memory,
      features,
      valid,
      segments.majority_labels(split, given, n),
      jnp.concatenate([jnp.zeros(1, bool), new]),
      given_labels=given,
      long_term_factor=hyper.long_term_factor,
      cap_factor=hyper.cap_factor,
      kmeans_iterations=hyper.kmeans_iterations,
  )
  final = jnp.where(given > 0, given, final)
  own = predict(state, features, valid, split, final, hyper=hyper)
  box0 = jax.vmap(lambda m: memory.object_box(m, settings.first_box_r))(masks)
  reference = jax.vmap(
      lambda b, m: decoder_lib.reference_crops(b, m, f1, f4, settings.crop_size)
  )(box0, masks)
  box_prev = jax.vmap(
      lambda m, first: memory.tracked_box(
          m, first, hyper.test_box_r, hyper.min_box_fraction
      )
  )(masks, state.first_boxes[1:])

  def pick(fresh, old):
    return jnp.where(new.reshape((k,) + (1,) * (old.ndim - 1)), fresh, old)

  carry = carry.replace(
      memory=state,
      object_valid=carry.object_valid | new,
      box0=pick(box0, carry.box0),
      reference=jax.tree.map(pick, reference, carry.reference),
      maps_prev=pick(own["maps"], carry.maps_prev),
      prob_prev=pick(
          masks.astype(jnp.float32), carry.prob_prev * (given == 0)[None]
      ),
      mask_prev=final,
      box_prev=pick(box_prev, carry.box_prev),
  )
  return carry, final


def step(
    carry: Carry,
    inputs: dict[str, jax.Array],
    *,
    sf_model,
    sf_variables,
    decoder,
    decoder_variables,
    settings: Settings,
) -> tuple[Carry, jax.Array]:
  """One later frame (SPEC 8): predict, refine, update.

  Args:
    carry: from `start` or the previous `step`.
    inputs: frame f32 [H, W, 3] (normalised), superpixels int32 [H, W],
      num_superpixels int32, frame_valid bool (False: padding, the carry
      passes unchanged), optionally given int32 [H, W]: masks of objects
      first given on this frame (0 elsewhere; see `admit`).
    sf_model, sf_variables, decoder, decoder_variables: the networks.
    settings: the static sizes.

  Returns:
    (the new carry, the frame's final mask int32 [H, W]).
  """
  n = settings.num_segments
  superpixels = inputs["superpixels"]
  valid = jnp.arange(n) < inputs["num_superpixels"]
  features, f1, f4 = frame_features(
      sf_model, sf_variables, inputs["frame"], superpixels, valid
  )
  frame = dict(
      features=features, f1=f1, f4=f4, valid=valid, superpixels=superpixels
  )
  pred, crops = observe(carry, **frame, settings=settings)
  crop_logits = decoder.apply(decoder_variables, **crops, train=False)
  new, logits = advance(
      carry,
      pred=pred,
      crop_logits=crop_logits,
      **frame,
      hyper=settings.hyper,
  )
  final = jnp.argmax(logits, 0).astype(jnp.int32)
  if "given" in inputs:
    objects = jnp.arange(1, settings.max_objects + 1)
    arrives = jnp.any(
        (inputs["given"][None] == objects[:, None, None]).any((1, 2))
        & ~carry.object_valid
    )
    new, final = jax.lax.cond(
        arrives,
        lambda: admit(
            new,
            given=inputs["given"],
            final=final,
            frame=inputs["frame"],
            superpixels=superpixels,
            num_superpixels=inputs["num_superpixels"],
            sf_model=sf_model,
            sf_variables=sf_variables,
            settings=settings,
        ),
        lambda: (new, final),
    )
  keep = inputs["frame_valid"]
  carry = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
  return carry, jnp.where(keep, final, 0)


def track(
    networks: dict[str, Any],
    frames: jax.Array,
    superpixels: jax.Array,
    num_superpixels: jax.Array,
    first_mask: jax.Array,
    num_objects: jax.Array,
    frame_valid: jax.Array,
    settings: Settings,
    given: jax.Array | None = None,
) -> jax.Array:
  """A whole video: `start` on frame 0, `lax.scan` of `step` over the rest.

  Args:
    networks: sf_model, sf_variables, decoder, decoder_variables.
    frames: f32 [T, H, W, 3], normalised, time padded to a bucket.
    superpixels: int32 [T, H, W]; num_superpixels int32 [T].
    first_mask: int32 [H, W], the given frame-0 mask.
    num_objects: int32 scalar.
    frame_valid: bool [T], False on time padding.
    settings: the static sizes.
    given: int32 [T, H, W] or None: per later frame, the masks of objects
      first given there (see `admit`); frame 0's entry is not read.

  Returns:
    int32 [T, H, W], the masks (frame 0 as given, 0 on padding).
  """
  carry, mask0 = start(
      networks["sf_model"],
      networks["sf_variables"],
      frames[0],
      superpixels[0],
      num_superpixels[0],
      first_mask,
      num_objects,
      settings,
  )
  body = functools.partial(
      step,
      sf_model=networks["sf_model"],
      sf_variables=networks["sf_variables"],
      decoder=networks["decoder"],
      decoder_variables=networks["decoder_variables"],
      settings=settings,
  )
  inputs = {
      "frame": frames[1:],
      "superpixels": superpixels[1:],
      "num_superpixels": num_superpixels[1:],
      "frame_valid": frame_valid[1:],
  }
  if given is not None:
    inputs["given"] = given[1:]
  _, masks = jax.lax.scan(body, carry, inputs)
  return jnp.concatenate([mask0[None], masks])
