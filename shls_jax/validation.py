"""Stage-1 validation: label transfer from frame 0 by the nearest superfeature.

For each held-out synthetic sequence, every superpixel of a later frame takes
the object id of its most similar frame-0 superpixel (cosine similarity, one
nearest neighbour); the labels are painted onto pixels and compared with the
ground truth as IoU per object (J of SPEC 9 on frames 1..T-1; both masks
empty -> 1). Objects are the non-zero ids of frame 0; background is a class
for the transfer but is not scored.

The same score from an untrained network's superfeatures (its BatchNorm on
per-superpixel statistics, see `train.eval_step`) and from plain mean colours
(normalised RGB averaged per superpixel) are the floors a trained network
must beat.
"""

import jax
import jax.numpy as jnp

# Label maps are 8-bit: ids 0..255.
NUM_IDS = 256


def nearest_frame0_labels(
    features: jax.Array, valid: jax.Array, ids0: jax.Array
) -> jax.Array:
  """Object id of each superpixel's nearest frame-0 superpixel.

  Args:
    features: float [T, N, D] superfeatures of one sequence.
    valid: bool [T, N], superpixels that exist (frame 0: after the split).
    ids0: int32 [N], frame 0's object id per superpixel (-1: none).

  Returns:
    int32 [T, N]: the transferred ids (0 where frame 0 has no candidate).
  """
  norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
  unit = features / jnp.maximum(norms, 1e-12)
  sims = jnp.einsum("tnd,md->tnm", unit, unit[0])
  candidates = valid[0] & (ids0 >= 0)
  sims = jnp.where(candidates[None, None, :], sims, -jnp.inf)
  return jnp.where(candidates.any(), ids0[jnp.argmax(sims, axis=-1)], 0).astype(
      jnp.int32
  )


def _counts(ids: jax.Array, weights: jax.Array) -> jax.Array:
  return jax.ops.segment_sum(weights.ravel(), ids.ravel(), NUM_IDS)


def object_iou(
    predicted: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mean IoU over frames 1..T-1 of each object of frame 0.

  Args:
    predicted: int32 [T, H, W] ids in [0, 256).
    labels: int32 [T, H, W] ground truth ids in [0, 256).

  Returns:
    iou: float32 [256], per id the mean over frames 1..T-1 of IoU (1 when
      both masks are empty in a frame).
    present: bool [256], the ids scored: non-zero ids of frame 0.
  """

  def frame_iou(pred, gt):
    inter = _counts(gt, (pred == gt).astype(jnp.float32))
    union = (
        _counts(pred, jnp.ones(pred.shape))
        + _counts(gt, jnp.ones(gt.shape))
        - inter
    )
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)

  iou = jax.vmap(frame_iou)(predicted[1:], labels[1:]).mean(0)
  present = _counts(labels[0], jnp.ones(labels[0].shape)) > 0
  present = present.at[0].set(False)
  return iou, present


def transfer_iou(
    features: jax.Array,
    valid: jax.Array,
    ids0: jax.Array,
    superpixels: jax.Array,
    labels: jax.Array,
    sequence_valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Sum of per-object IoUs and number of objects over a batch.

  Args:
    features: float [B, T, N, D].
    valid: bool [B, T, N].
    ids0: int32 [B, N], frame-0 ids of the (split) frame-0 superpixels.
    superpixels: int32 [B, T, H, W] (frame 0: the split map).
    labels: int32 [B, T, H, W].
    sequence_valid: bool [B], False on padding sequences.

  Returns:
    (sum of IoU over scored objects, number of scored objects), float32
    scalars; their ratio is the mean IoU per object.
  """

  def one(f, v, i0, sp, gt):
    transferred = nearest_frame0_labels(f, v, i0)
    predicted = jnp.take_along_axis(
        transferred, sp.reshape(sp.shape[0], -1), axis=1
    ).reshape(sp.shape)
    iou, present = object_iou(predicted, gt)
    return jnp.sum(jnp.where(present, iou, 0.0)), present.sum()

  sums, counts = jax.vmap(one)(features, valid, ids0, superpixels, labels)
  weight = sequence_valid.astype(jnp.float32)
  return jnp.sum(sums * weight), jnp.sum(counts * weight)
