"""Tests of shls_jax/losses.py: NT-Xent vs a loop reference, on 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shls_jax import losses

AXIS = "batch"
MODES = [
    ("frame", True),
    ("frame", False),
    ("sequence", True),
    ("sequence", False),
]

# Eager dispatch op by op is slow on 2 cores; these tests run it compiled.
nt_xent = jax.jit(
    losses.nt_xent,
    static_argnames=(
        "temperature",
        "positives",
        "cross_batch_negatives",
        "axis_name",
    ),
)

# ---------------------------------------------------------------- reference


def np_nt_xent(x, ids, valid, *, t=0.07, positives="frame", cross=True):
  """Loops over anchors and pairs, float64; returns (loss, pairs, frames)."""
  x = np.asarray(x, np.float64)
  batch, time, num, _ = x.shape
  items = [
      (b, f, n)
      for b in range(batch)
      for f in range(time)
      for n in range(num)
      if valid[b, f, n]
  ]
  z = {}
  for item in items:
    norm = np.linalg.norm(x[item])
    z[item] = x[item] / norm if norm > 0 else np.zeros_like(x[item])
  total, num_frames, num_pairs = 0.0, 0, 0
  for b in range(batch):
    for f in range(time):
      frame_sum, frame_count = 0.0, 0
      for a in items:
        if a[:2] != (b, f):
          continue
        negatives = []
        for q in items:
          if q[0] != b:
            if cross:
              negatives.append(q)
          elif (positives == "sequence" or q[1] == f) and ids[q] != ids[a]:
            negatives.append(q)
        neg_logits = np.array([z[a] @ z[q] / t for q in negatives])
        for p in items:
          if p == a or p[0] != b or ids[p] != ids[a]:
            continue
          if positives == "frame" and p[1] != f:
            continue
          pos_logit = z[a] @ z[p] / t
          # -log(e^pos / (e^pos + sum e^neg)), in log space for small t.
          frame_sum += np.logaddexp.reduce(np.append(neg_logits, pos_logit))
          frame_sum -= pos_logit
          frame_count += 1
      if frame_count:
        total += frame_sum / frame_count
        num_frames += 1
        num_pairs += frame_count
  return (total / num_frames if num_frames else 0.0), num_pairs, num_frames


# ---------------------------------------------------------------- inputs


def make_batch(seed, batch=3, time=2, num=7, channels=5):
  """Random features, ids and validity with every awkward layout.

  Sequence 0, frame 0 has one class only; sequence 0, frame 1 has a class
  with a single superpixel; padding rows (invalid) hold garbage including
  NaN and huge values; one valid row is all zeros; some ids repeat across
  sequences (they are different objects there).
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, time, num, channels)).astype(np.float32)
  ids = rng.integers(0, 3, (batch, time, num)).astype(np.int32)
  valid = np.ones((batch, time, num), bool)
  valid[:, :, -2:] = rng.random((batch, time, 2)) < 0.3  # padding
  ids[0, 0] = 1
  ids[0, 1] = 0
  ids[0, 1, num // 2 :] = 2
  ids[0, 1, num - 1] = 5
  valid[0, 1, num - 1] = True  # class 5: one superpixel, no positive
  x[~valid] = 1e30
  x[1, 0, -1] = np.nan
  valid[1, 0, -1] = False
  x[-1, -1, 0] = 0.0  # a valid zero row
  valid[-1, -1, 0] = True
  return x, ids, valid


# ---------------------------------------------------------------- single device


@pytest.mark.parametrize("positives,cross", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_nt_xent_equals_loop_reference(positives, cross, seed):
  x, ids, valid = make_batch(seed)
  fn = jax.jit(
      functools.partial(
          losses.nt_xent, positives=positives, cross_batch_negatives=cross
      )
  )
  loss, aux = fn(x, ids, valid)
  want, pairs, frames = np_nt_xent(
      x, ids, valid, positives=positives, cross=cross
  )
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(aux["num_positive_pairs"]) == pairs
  assert int(aux["num_frames_with_pairs"]) == frames


def test_modes_differ():
  # Guards against an option that is silently ignored.
  x, ids, valid = make_batch(2)
  values = {
      mode: float(
          nt_xent(
              x, ids, valid, positives=mode[0], cross_batch_negatives=mode[1]
          )[0]
      )
      for mode in MODES
  }
  assert len(set(values.values())) == len(MODES)


def test_small_temperature_is_stable():
  x, ids, valid = make_batch(3)
  loss, _ = nt_xent(x, ids, valid, temperature=0.005)
  want, _, _ = np_nt_xent(x, ids, valid, t=0.005)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  grads = jax.grad(lambda v: nt_xent(v, ids, valid, temperature=0.005)[0])(x)
  assert np.isfinite(np.asarray(grads)).all()


def test_frame_with_one_class_gets_the_loss_of_its_cross_negatives():
  # One sequence, one frame, one class: no negatives at all, every pair
  # loss is -log(1) = 0 (and not NaN); with a second sequence as negatives
  # it becomes positive.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 1, 4, 3)).astype(np.float32)
  ids = np.zeros((2, 1, 4), np.int32)
  valid = np.ones((2, 1, 4), bool)
  alone, aux = nt_xent(x[:1], ids[:1], valid[:1])
  assert float(alone) == 0.0 and int(aux["num_positive_pairs"]) == 12
  paired, _ = nt_xent(x, ids, valid)
  np.testing.assert_allclose(
      float(paired), np_nt_xent(x, ids, valid)[0], rtol=1e-5
  )
  assert float(paired) > 0


def test_no_positive_pair_gives_zero_and_zero_gradients():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 2, 4, 3)).astype(np.float32)
  ids = np.arange(16, dtype=np.int32).reshape(2, 2, 4)  # all distinct
  valid = np.ones((2, 2, 4), bool)
  (loss, aux), grads = jax.value_and_grad(nt_xent, has_aux=True)(x, ids, valid)
  assert float(loss) == 0.0
  assert int(aux["num_positive_pairs"]) == 0
  assert int(aux["num_frames_with_pairs"]) == 0
  np.testing.assert_array_equal(np.asarray(grads), 0.0)
  # Nothing valid at all.
  loss, aux = nt_xent(x, ids, np.zeros_like(valid))
  assert float(loss) == 0.0


@pytest.mark.parametrize("positives,cross", MODES)
def test_gradients_finite_and_match_finite_differences(positives, cross):
  x, ids, valid = make_batch(6, batch=2, num=6)
  fn = lambda v: losses.nt_xent(
      v, ids, valid, positives=positives, cross_batch_negatives=cross
  )[0]
  grads = np.asarray(jax.jit(jax.grad(fn))(x), np.float64)
  assert np.isfinite(grads).all()
  # Invalid rows (garbage, NaN) get exactly zero gradient.
  np.testing.assert_array_equal(grads[~valid], 0.0)
  # Directional derivative of the float64 reference along a random
  # direction restricted to valid, non-zero rows.
  rng = np.random.default_rng(7)
  direction = rng.normal(size=x.shape) * valid[..., None]
  direction[-1, -1, 0] = 0.0  # |x| has a kink at the zero row
  x64 = np.where(valid[..., None], x, 0.0).astype(np.float64)
  step = 1e-5
  ref = lambda v: np_nt_xent(v, ids, valid, positives=positives, cross=cross)[0]
  numeric = (ref(x64 + step * direction) - ref(x64 - step * direction)) / (
      2 * step
  )
  np.testing.assert_allclose(
      np.sum(grads * direction), numeric, rtol=1e-3, atol=1e-5
  )


def test_zero_rows_have_finite_gradients():
  x = np.zeros((1, 1, 3, 4), np.float32)
  x[0, 0, 0] = [1.0, 0.0, 0.0, 0.0]
  ids = np.array([[[0, 0, 1]]], np.int32)
  valid = np.ones((1, 1, 3), bool)
  loss, _ = nt_xent(x, ids, valid)
  # Similarities are all 0 with a zero row: each of the 2 pairs has
  # loss log(1 + 1).
  np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
  grads = jax.jit(jax.grad(lambda v: nt_xent(v, ids, valid)[0]))(x)
  assert np.isfinite(np.asarray(grads)).all()


def test_argument_errors():
  x = np.zeros((1, 1, 3, 4), np.float32)
  ids = np.zeros((1, 1, 3), np.int32)
  with pytest.raises(ValueError, match="'frame' or 'sequence'"):
    losses.nt_xent(x, ids, ids > 0, positives="video")
  with pytest.raises(ValueError, match="first three axes"):
    losses.nt_xent(x, ids[..., :2], ids[..., :2] > 0)
  with pytest.raises(ValueError, match="batch, time"):
    losses.nt_xent(x[0], ids, ids > 0)


# ---------------------------------------------------------------- 8 devices


def _mesh():
  return jax.make_mesh(
      (jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def _projected_loss(x, ids, valid, weights, **kwargs):
  """The loss of features through a replicated matrix (a stand-in for the
  parameters of the network), [B, T, N, D] @ [D, D]."""
  return losses.nt_xent(x @ weights, ids, valid, **kwargs)


@pytest.mark.parametrize(
    "positives,cross", [("frame", True), ("sequence", True), ("frame", False)]
)
def test_sharded_loss_and_gradients_equal_single_device(positives, cross):
  assert jax.device_count() == 8
  x, ids, valid = make_batch(8, batch=16, num=6, channels=4)
  x = np.where(valid[..., None], x, 0.0)  # NaN would poison the comparison
  weights = np.random.default_rng(9).normal(size=(4, 4)).astype(np.float32)
  kwargs = dict(positives=positives, cross_batch_negatives=cross)

  single = jax.jit(
      jax.value_and_grad(
          lambda v, w: _projected_loss(v, ids, valid, w, **kwargs),
          argnums=(0, 1),
          has_aux=True,
      )
  )
  (loss0, aux0), (grad_x0, grad_w0) = single(x, weights)

  def per_device(x, ids, valid, weights):
    fn = lambda v, w: _projected_loss(
        v, ids, valid, w, axis_name=AXIS, **kwargs
    )
    (loss, aux), (grad_x, grad_w) = jax.value_and_grad(
        fn, argnums=(0, 1), has_aux=True
    )(x, weights)
    return loss, aux, grad_x, grad_w

  sharded = jax.jit(
      jax.shard_map(
          per_device,
          mesh=_mesh(),
          in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
          out_specs=(P(), P(), P(AXIS), P()),
          check_vma=True,
      )
  )
  loss, aux, grad_x, grad_w = sharded(x, ids, valid, weights)
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
  want = np_nt_xent(x @ weights, ids, valid, positives=positives, cross=cross)
  np.testing.assert_allclose(float(loss), want[0], rtol=1e-4)
  assert int(aux["num_positive_pairs"]) == int(aux0["num_positive_pairs"])
  assert int(aux["num_frames_with_pairs"]) == want[2]
  # Gradients of the global loss, with no psum or pmean afterwards.
  np.testing.assert_allclose(grad_x, grad_x0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_w, grad_w0, rtol=1e-4, atol=1e-6)
  if cross:
    # Other devices' anchors do reach this device's features.
    local_only = jax.grad(
        lambda v: _projected_loss(v, ids[:2], valid[:2], weights, **kwargs)[0]
    )(x[:2])
    assert np.abs(np.asarray(grad_x[:2]) - np.asarray(local_only)).max() > 1e-3


def test_sharded_gradients_without_vma_checks_need_rescaling():
  # Documents the pitfall: with check_vma=False, psum transposes to psum,
  # so per-device feature gradients come out `device_count` times too
  # large and the replicated weights' gradient differs per device (only
  # its pmean is right). Train with check_vma=True instead.
  x, ids, valid = make_batch(10, batch=8, num=5, channels=3)
  x = np.where(valid[..., None], x, 0.0)
  weights = np.eye(3, dtype=np.float32)
  grad_x0, grad_w0 = jax.grad(
      lambda v, w: _projected_loss(v, ids, valid, w)[0], argnums=(0, 1)
  )(x, weights)

  def per_device(x, ids, valid, weights):
    grad_x, grad_w = jax.grad(
        lambda v, w: _projected_loss(v, ids, valid, w, axis_name=AXIS)[0],
        argnums=(0, 1),
    )(x, weights)
    return grad_x, grad_w[None], jax.lax.pmean(grad_w, AXIS)

  grad_x, grad_w, grad_w_mean = jax.jit(
      jax.shard_map(
          per_device,
          mesh=_mesh(),
          in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
          out_specs=(P(AXIS), P(AXIS), P()),
          check_vma=False,
      )
  )(x, ids, valid, weights)
  np.testing.assert_allclose(grad_x, 8 * grad_x0, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_w_mean, grad_w0, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(grad_w[0]) - np.asarray(grad_w0)).max() > 1e-3


# ------------------------------------------------- cross-entropy (SPEC 4.2)


def _cross_entropy_reference(logits, labels):
  """Loop over pixels: -log softmax(logits)[label], ignored labels skipped."""
  logits = logits.reshape(-1, *logits.shape[-3:])
  labels = labels.reshape(-1, *labels.shape[-2:])
  total, count = 0.0, 0
  for f in range(logits.shape[0]):
    for y in range(logits.shape[2]):
      for x in range(logits.shape[3]):
        label = labels[f, y, x]
        if not 0 <= label < logits.shape[1]:
          continue
        z = logits[f, :, y, x].astype(np.float64)
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[label]
        count += 1
  return total / max(count, 1), count


def test_cross_entropy_matches_a_pixel_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 2, 4, 5, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 2, 5, 6))
  labels[0, 1, :2] = 7  # An object beyond the configured ones.
  labels[1, 0, 3] = 255  # Void.
  loss, count = losses.aggregated_cross_entropy(
      jnp.asarray(logits), jnp.asarray(labels)
  )
  want, want_count = _cross_entropy_reference(logits, labels)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert count == want_count == 2 * 2 * 5 * 6 - 12 - 6
  # Nothing to count: zero, not NaN.
  loss, count = losses.aggregated_cross_entropy(
      jnp.asarray(logits), jnp.full(labels.shape, 9)
  )
  assert loss == 0 and count == 0


def test_sharded_cross_entropy_is_the_global_mean():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(8, 3, 4, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(8, 4, 4)))
  labels = labels.at[:3].set(9)  # Devices 0-2 count nothing.
  mesh = jax.make_mesh((8,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(
      jax.shard_map(
          functools.partial(losses.aggregated_cross_entropy, axis_name=AXIS),
          mesh=mesh,
          in_specs=(P(AXIS), P(AXIS)),
          out_specs=(P(), P()),
      )
  )
  got, count = sharded(logits, labels)
  want, want_count = losses.aggregated_cross_entropy(logits, labels)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert count == want_count == 5 * 16
