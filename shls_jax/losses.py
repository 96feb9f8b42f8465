"""Losses: NT-Xent with cross-device negatives (SPEC 4.1), cross-entropy (4.2).

`nt_xent` scores every positive pair of superpixels (same object id) against
all negatives of its anchor at once, with masks: the authors sample 16
triplets per anchor instead, which has the same expectation. Negatives from
other sequences can come from every device of the batch (`axis_name`): the
superfeatures are gathered once and compared with the local anchors one
frame at a time, so no [global, global] matrix is ever built.
"""

from typing import Any

import jax
import jax.numpy as jnp

# A zero feature row (a superpixel without pixels) stays zero after
# normalisation instead of dividing by zero.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
  """x / max(|x|, eps) along the last axis; zero rows stay zero.

  The clamp sits inside the square root's argument, so the gradient at a
  zero row is zero, not NaN.
  """
  squared = jnp.sum(jnp.square(x), -1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def _masked_logsumexp(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """log(sum(exp(logits) where mask)) over the last axis; -inf if none.

  Shifted by the largest kept logit, so any temperature is safe. An empty
  row gives -inf with zero (not NaN) gradients: masked logits are -inf
  before the exponential and the log only ever sees a positive number.
  """
  masked = jnp.where(mask, logits, -jnp.inf)
  # The result does not depend on the shift, so its gradient may be cut.
  peak = jax.lax.stop_gradient(jnp.max(masked, -1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.exp(masked - peak), -1)
  nonempty = total > 0
  return jnp.where(
      nonempty,
      jnp.log(jnp.where(nonempty, total, 1.0)) + peak[..., 0],
      -jnp.inf,
  )


def _negative_logsumexp(
    anchors: tuple[jax.Array, ...],
    candidates: tuple[jax.Array, ...],
    *,
    temperature: float,
    same_frame: bool,
    other_sequences: bool,
) -> jax.Array:
  """log(sum_n exp(s_an / t)) over the negatives n of each anchor a.

  Args:
    anchors: (features [M, D] normalised, ids [M], sequence [M], frame [M]).
    candidates: (features [G, D] normalised, ids [G], sequence [G], frame
      [G], valid [G]).
    temperature: t.
    same_frame: inside the anchor's sequence, only its own frame holds
      negatives (positives='frame'); otherwise all frames do.
    other_sequences: every valid candidate of another sequence is a negative.

  Returns:
    float32 [M], -inf for an anchor without negatives.
  """
  z_a, id_a, seq_a, frame_a = anchors
  z_c, id_c, seq_c, frame_c, valid_c = candidates
  logits = (z_a @ z_c.T) / temperature
  same_seq = seq_a[:, None] == seq_c[None, :]
  context = same_seq
  if same_frame:
    context &= frame_a[:, None] == frame_c[None, :]
  negative = context & (id_a[:, None] != id_c[None, :])
  if other_sequences:
    negative |= ~same_seq
  return _masked_logsumexp(logits, negative & valid_c[None, :])


def nt_xent(
    superfeatures: jax.Array,
    ids: jax.Array,
    valid: jax.Array,
    *,
    temperature: float = 0.07,
    positives: str = "frame",
    cross_batch_negatives: bool = True,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """NT-Xent on superfeatures with cosine similarity (SPEC 4.1).

  Superpixels are indexed by (sequence, frame, row); `s_ab` is the cosine
  similarity of the L2-normalised superfeatures (an all-zero row stays zero
  and has similarity 0 with everything). Invalid rows take no part at all,
  whatever their features (even NaN).

  * Positive pair (a, p): a != p, both valid, same sequence, same id, and
    the same frame (positives='frame', the paper) or any frames of the
    sequence (positives='sequence').
  * Negatives of anchor a: the valid superpixels of a's context (its frame
    for 'frame', its sequence for 'sequence') with an id different from
    a's; and, if `cross_batch_negatives`, every valid superpixel of every
    other sequence of the batch: the other local sequences and, with
    `axis_name`, those of all devices. In 'frame' mode, superpixels of a's
    sequence in other frames are neither positives nor negatives.
  * Pair loss: -log(exp(s_ap/t) / (exp(s_ap/t) + sum_n exp(s_an/t))),
    computed as softplus(logsumexp_n(s_an/t) - s_ap/t). The log-sum-exp
    is shifted by the anchor's largest negative logit, so no temperature
    overflows; an anchor without negatives has pair loss 0.
  * Loss: per frame, the mean over the positive pairs whose anchor lies in
    that frame; then the mean over the frames that have at least one such
    pair, over the whole global batch when `axis_name` is given (the frame
    sums and counts are psum'ed). No positive pair anywhere gives 0, with
    zero gradients.

  Memory: positives live inside one frame ([N, N] blocks) or one sequence
  ([T*N, T*N] blocks); the negatives' sums compare one local frame at a
  time with the G gathered superpixels ([N, G] blocks, recomputed in the
  backward pass).

  Under `shard_map`, call it with the device axis name: the loss and the
  counts are the same (global) values on every device, and `jax.grad` of
  that loss inside the mapped function with `check_vma=True` gives the
  gradient of the global loss w.r.t. each device's inputs and parameters,
  with no further psum/pmean (tests/test_losses.py checks this).

  Args:
    superfeatures: float [B, T, N, D], the local batch of sequences.
    ids: int [B, T, N], the object id of every superpixel (its majority
      label).
    valid: bool [B, T, N], the superpixels that exist.
    temperature: t.
    positives: 'frame' or 'sequence'.
    cross_batch_negatives: other sequences of the batch serve as negatives.
    axis_name: the device axis, inside `shard_map` (or pmap), to share
      negatives and average over the global batch; None for one device.

  Returns:
    loss: float32 scalar.
    aux: {'num_positive_pairs': int32, 'num_frames_with_pairs': int32},
      global when `axis_name` is given.
  """
  if positives not in ("frame", "sequence"):
    raise ValueError(
        f"positives must be 'frame' or 'sequence', got {positives!r}."
    )
  if superfeatures.ndim != 4:
    raise ValueError(
        "superfeatures must be [batch, time, superpixels, channels], got"
        f" shape {superfeatures.shape}."
    )
  if ids.shape != superfeatures.shape[:3] or valid.shape != ids.shape:
    raise ValueError(
        f"ids {ids.shape} and valid {valid.shape} must both be"
        f" {superfeatures.shape[:3]}, the first three axes of superfeatures."
    )
  batch, time, num, channels = superfeatures.shape
  valid = valid.astype(bool)
  ids = ids.astype(jnp.int32)
  # Zeroed before normalising: garbage (even NaN) in padding rows must reach
  # neither the loss nor the gradients.
  features = jnp.where(valid[..., None], superfeatures.astype(jnp.float32), 0.0)
  z = l2_normalize(features)

  first_seq = 0
  if axis_name is not None:
    first_seq = jax.lax.axis_index(axis_name) * batch
  seq = jnp.broadcast_to(
      (first_seq + jnp.arange(batch))[:, None, None], (batch, time, num)
  )
  frame = jnp.broadcast_to(jnp.arange(time)[None, :, None], (batch, time, num))
  by_frame = positives == "frame"
  options = dict(
      temperature=temperature,
      same_frame=by_frame,
      other_sequences=cross_batch_negatives,
  )

  # Negatives: log(sum_n exp(s_an / t)) for every anchor, [B, T, N].
  if cross_batch_negatives:
    candidates = (z, ids, seq, frame, valid)
    if axis_name is not None:
      candidates = tuple(
          jax.lax.all_gather(c, axis_name, tiled=True) for c in candidates
      )
    candidates = (candidates[0].reshape(-1, channels),) + tuple(
        c.reshape(-1) for c in candidates[1:]
    )

    # One local frame at a time, recomputed in the backward pass, so at
    # most one [N, G] block of similarities is alive.
    @jax.checkpoint
    def frame_negatives(anchors):
      return _negative_logsumexp(anchors, candidates, **options)

    per_frame = lambda x: x.reshape(batch * time, num, *x.shape[3:])
    neg_lse = jax.lax.map(
        frame_negatives, tuple(map(per_frame, (z, ids, seq, frame)))
    ).reshape(batch, time, num)
  else:
    # Only the anchor's own sequence holds negatives: [T*N, T*N] blocks.
    def sequence_negatives(z_s, id_s, seq_s, frame_s, valid_s):
      flat = lambda x: x.reshape(time * num, *x.shape[2:])
      anchors = tuple(map(flat, (z_s, id_s, seq_s, frame_s)))
      return _negative_logsumexp(anchors, anchors + (flat(valid_s),), **options)

    neg_lse = jax.vmap(sequence_negatives)(z, ids, seq, frame, valid)
    neg_lse = neg_lse.reshape(batch, time, num)

  # Positive pairs inside blocks of one frame or one sequence.
  block = (batch * time, num) if by_frame else (batch, time * num)
  z_b = z.reshape(*block, channels)
  id_b = ids.reshape(block)
  valid_b = valid.reshape(block)
  logits = jnp.einsum("kad,kpd->kap", z_b, z_b) / temperature
  pair = (
      valid_b[:, :, None]
      & valid_b[:, None, :]
      & (id_b[:, :, None] == id_b[:, None, :])
      & ~jnp.eye(block[1], dtype=bool)
  )
  pair_loss = jax.nn.softplus(neg_lse.reshape(block)[:, :, None] - logits)
  # Per anchor, then per anchor's frame: [B, T].
  anchor_sum = jnp.sum(jnp.where(pair, pair_loss, 0.0), -1)
  anchor_count = jnp.sum(pair, -1, dtype=jnp.int32)
  frame_sum = anchor_sum.reshape(batch, time, num).sum(-1)
  frame_count = anchor_count.reshape(batch, time, num).sum(-1)
  has_pairs = frame_count > 0
  frame_mean = jnp.where(
      has_pairs, frame_sum / jnp.maximum(frame_count, 1), 0.0
  )
  total = jnp.sum(frame_mean)
  num_frames = jnp.sum(has_pairs, dtype=jnp.int32)
  num_pairs = jnp.sum(frame_count)
  if axis_name is not None:
    total, num_frames, num_pairs = jax.lax.psum(
        (total, num_frames, num_pairs), axis_name
    )
  loss = total / jnp.maximum(num_frames, 1)
  aux = {"num_positive_pairs": num_pairs, "num_frames_with_pairs": num_frames}
  return loss, aux


def aggregated_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Pixel-wise cross-entropy of soft-aggregated logits (SPEC 4.2).

  Args:
    logits: float [..., C, H, W], the decoder's aggregated logits per frame
      (class 0 background, 1..C-1 the objects; see decoder.aggregate). Pass
      frames 1..T-1 only: frame 0 is given.
    labels: int [..., H, W], the frames' label maps. Pixels whose label is
      not in [0, C) (an object beyond the configured maximum, void) are left
      out of the mean.
    axis_name: device axis; if set, the mean is over the pixels of every
      device (sums and counts psum'ed), like `nt_xent`'s.

  Returns:
    (mean cross-entropy over the counted pixels, 0 when there are none;
    number of counted pixels), float32 scalars.
  """
  num_classes = logits.shape[-3]
  log_p = jax.nn.log_softmax(logits, axis=-3)
  counted = (labels >= 0) & (labels < num_classes)
  index = jnp.where(counted, labels, 0)[..., None, :, :]
  picked = jnp.take_along_axis(log_p, index, axis=-3)[..., 0, :, :]
  total = -jnp.sum(jnp.where(counted, picked, 0.0))
  count = jnp.sum(counted).astype(jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0), count
