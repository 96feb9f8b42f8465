"""TrainState, the per-device train step and the training loop (SPEC 4, 5).

The step is a per-device program (`train_step`): it sees its own slice of the
global batch, gathers superfeatures over the device axis `AXIS` for the
NT-Xent negatives, and computes the global loss, whose gradient is the
gradient of the whole batch; BatchNorm statistics are averaged with `pmean`. `make_train_step` wraps it once with `jax.shard_map` over a
one-axis mesh of every device of every process, so the same code runs on one
CPU, on a GPU and on a TPU pod (one process per host, `jax.distributed`).

Stages (SPEC 5) choose which parameters the optimizer moves: top-level
parameter groups are 'superfeatures' (backbone and heads) and 'decoder'
(everything else); a frozen group gets zero updates from `optax.set_to_zero`
and keeps no Adam moments. The state always holds both networks. Stages
'decoder' and 'joint' add the tracker's cross-entropy (`tracker_loss`): the
per-frame step of tracker.py over frames 1..T-1 of every sequence.
"""

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tqdm

from shls_jax import checkpoint
from shls_jax import input_pipeline
from shls_jax import losses
from shls_jax import memory as memory_lib
from shls_jax import segments
from shls_jax import tracker
from shls_jax import validation
from shls_jax import visualize
from shls_jax.models import backbone as backbone_lib
from shls_jax.models import decoder as decoder_lib
from shls_jax.models import superfeatures as superfeatures_lib

P = jax.sharding.PartitionSpec
# The one device axis: data parallelism over every device of every process.
AXIS = "batch"
# Top-level parameter names that belong to the superfeature network; any
# other top-level name is the decoder (the next stage of the model).
SUPERFEATURE_MODULES = ("feat_extractor", "sf_head_", "sf_conv_1x1_")
STAGES = {
    "superfeatures": ("superfeatures",),
    "decoder": ("decoder",),
    "joint": ("superfeatures", "decoder"),
}
# Fields of a training batch the step reads.
BATCH_KEYS = ("frames", "labels", "superpixels", "num_superpixels")
# Training boxes: ground-truth boxes enlarged by 50 % (SPEC 5).
TRAIN_BOX_R = 0.5
EVAL_BATCH_KEYS = BATCH_KEYS + ("sequence_valid",)
# Validation sequences in TensorBoard's sample pictures.
NUM_IMAGE_SAMPLES = 2


@flax.struct.dataclass
class TrainState:
  """What crosses step boundaries; always rebind with `state.replace`."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# --------------------------------------------------------------------------
# Model, optimizer, state.


def make_model(config: ml_collections.ConfigDict):
  """The superfeature network of `config.model` (SPEC 3).

  The training state holds its parameters and the decoder's (`make_decoder`)
  side by side under their top-level names (the authors' module names), so a
  checkpoint of any stage restores into any other stage's state.
  """
  return superfeatures_lib.SuperfeatureNet(
      sf_channels=config.model.sf_channels,
      stem_features=config.model.stem_features,
      stage_features=tuple(config.model.stage_features),
      stage_blocks=tuple(config.model.stage_blocks),
      sf_stat_update=config.model.sf_stat_update,
  )


def make_decoder(config: ml_collections.ConfigDict):
  """The refinement decoder of `config.model` (SPEC 7)."""
  return decoder_lib.Decoder(
      features=config.model.decoder_features,
      skip_features=config.model.decoder_skip_features,
      gate_features=config.model.decoder_gate_features,
  )


def split_variables(tree) -> tuple[Any, Any]:
  """A params / batch_stats tree -> (superfeature part, decoder part)."""
  tree = dict(flax.core.unfreeze(tree))
  parts = ({}, {})
  for name, value in tree.items():
    parts[param_group((name,)) == "decoder"][name] = value
  return parts


def tracker_settings(config, seq_len: int) -> tracker.Settings:
  """The tracker's static sizes inside the train step.

  The memory holds frame 0 and the updates after frames 1..T-2, at most
  N rows each, so (T - 1) N rows per class never overflow: training sees
  the exact capacity rule of SPEC 6.1.
  """
  n = num_segments(config)
  return tracker.Settings(
      max_objects=config.train.max_objects,
      num_segments=n,
      capacity=max(seq_len - 1, 1) * n,
      crop_size=tuple(config.model.decoder_crop_size),
      hyper=memory_lib.Hyperparameters.from_config(config.memory),
  )


def num_segments(config: ml_collections.ConfigDict) -> int:
  """N of every frame in the step: N_max plus room for the frame-0 split."""
  return (
      config.train_superpixels.max_superpixels
      + config.loss.split_extra_superpixels
  )


def param_group(path: tuple[str, ...]) -> str:
  """'superfeatures' or 'decoder' for a parameter path."""
  return (
      "superfeatures" if path[0].startswith(SUPERFEATURE_MODULES) else "decoder"
  )


def learning_rate(
    config: ml_collections.ConfigDict, num_replicas: int
) -> float:
  scale = num_replicas if config.train.scale_lr_by_replicas else 1
  return config.train.learning_rate * scale


def make_optimizer(
    config: ml_collections.ConfigDict, num_replicas: int
) -> optax.GradientTransformation:
  """Adam on the stage's parameter groups, zero updates for the others."""
  stage = config.train.stage
  if stage not in STAGES:
    raise ValueError(
        f"config.train.stage={stage!r} is not one of {sorted(STAGES)}."
    )
  trained = STAGES[stage]

  def labels(params):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict({
        path: "train" if param_group(path) in trained else "freeze"
        for path in flat
    })

  return optax.multi_transform(
      {
          "train": optax.adam(learning_rate(config, num_replicas)),
          "freeze": optax.set_to_zero(),
      },
      labels,
  )


def check_stage(config: ml_collections.ConfigDict, params) -> None:
  """Refuses a stage whose trained groups have no parameters.

  A state from `init_state` always has both groups; this guards hand-made
  states and checkpoints of other models.
  """
  groups = {
      param_group(path)
      for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  }
  missing = set(STAGES[config.train.stage]) - groups
  if missing:
    raise ValueError(
        f"config.train.stage={config.train.stage!r} trains the"
        f" {sorted(missing)} parameters, which this model does not have."
        " Build the state with train.init_state (it holds the superfeature"
        " network and the decoder)."
    )


def check_fusion_alive(config: ml_collections.ConfigDict, params) -> None:
  """Refuses a network whose fusion ReLU is zero for every input.

  The heads end in a ReLU, so both fused channels a, b are >= 0 and
  relu(w0 a + w1 b + c) is 0 everywhere when w0, w1 and c are all <= 0: the
  superfeatures are zero and no gradient ever reaches any parameter. With
  PyTorch's initialisation this happens for about one seed in eight (for
  example seed 3).
  """
  if "superfeatures" not in STAGES[config.train.stage]:
    return
  # This process's copy (replicated parameters; works on multi-host too).
  fusion = jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0))
      if isinstance(x, jax.Array)
      else np.asarray(x),
      params["sf_conv_1x1_0"],
  )
  if bool(
      (np.asarray(fusion["kernel"]) <= 0).all()
      and (np.asarray(fusion["bias"]) <= 0).all()
  ):
    raise ValueError(
        f"With config.seed={config.seed} the 2 -> 1 fusion of the"
        " superfeature heads starts with non-positive weights and bias"
        f" (kernel {np.asarray(fusion['kernel']).ravel()}, bias"
        f" {np.asarray(fusion['bias']).ravel()}): its ReLU outputs zero for"
        " every superpixel and training could never move it. Use another"
        " config.seed."
    )


def init_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
) -> TrainState:
  """Fresh parameters from `config.seed` (not jitted; see `create_state`)."""
  n = num_segments(config)
  # No parameter depends on the frame or crop size: initialise on small ones.
  size = 32
  # The superfeature network draws from the seed's key itself (as before
  # the decoder joined the state), the decoder from a key folded from it.
  sf_key = jax.random.key(config.seed)
  decoder_key = jax.random.fold_in(sf_key, 1)
  inputs = (
      jnp.zeros((1, size, size, 3)),
      jnp.zeros((1, size, size), jnp.int32),
      jnp.ones((1, n), bool),
  )
  variables = model.init(sf_key, *inputs, train=False)
  out = model.apply(variables, *inputs, train=False)
  f1, f4 = out["f1"].shape[-1], out["f4"].shape[-1]
  crop = 16
  decoder_variables = make_decoder(config).init(
      decoder_key,
      mask0=jnp.zeros((1, crop, crop, 1)),
      prev_pred=jnp.zeros((1, crop, crop, 1)),
      f1=jnp.zeros((1, 3, crop, crop, f1)),
      maps=jnp.zeros((1, 2, crop, crop, 4)),
      f4=jnp.zeros((1, 3, crop // 4, crop // 4, f4)),
      train=False,
  )
  params = {**variables["params"], **decoder_variables["params"]}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={
          **variables["batch_stats"],
          **decoder_variables["batch_stats"],
      },
      opt_state=tx.init(params),
  )


def create_state(config, model, tx, mesh) -> TrainState:
  """`init_state` compiled with replicated outputs on every device."""
  replicated = jax.sharding.NamedSharding(mesh, P())
  init = jax.jit(
      functools.partial(init_state, config, model, tx),
      out_shardings=replicated,
  )
  return init()


def abstract_state(config, model, tx, mesh) -> TrainState:
  """`create_state`'s shapes, dtypes and shardings, without computing it.

  A restore target: tracing the initialisation costs a fraction of compiling
  it (tens of seconds for the paper-size networks on a CPU).
  """
  replicated = jax.sharding.NamedSharding(mesh, P())
  shapes = jax.eval_shape(functools.partial(init_state, config, model, tx))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      shapes,
  )


# --------------------------------------------------------------------------
# The per-device programs.


def prepare_superpixels(batch, config) -> dict[str, jax.Array]:
  """Frame-0 split at object borders, validity and majority ids.

  Args:
    batch: labels, superpixels int32 [b, T, H, W] and num_superpixels int32
      [b, T] of one device.
    config: the config.

  Returns:
    superpixels int32 [b, T, H, W] (frame 0 split, SPEC 6.1), valid bool
    [b, T, N], ids int32 [b, T, N] (majority label, -1 for ids without a
    pixel), split_overflow int32 [b] (border components left unsplit because
    N was full).
  """
  n = num_segments(config)
  labels, superpixels = batch["labels"], batch["superpixels"]
  split0, count0, overflow = jax.vmap(
      lambda s, l, c: segments.split_at_label_borders(s, l, c, n)
  )(superpixels[:, 0], labels[:, 0], batch["num_superpixels"][:, 0])
  superpixels = superpixels.at[:, 0].set(split0)
  counts = batch["num_superpixels"].at[:, 0].set(count0)
  valid = jnp.arange(n) < counts[..., None]
  ids = segments.majority_labels(superpixels, labels, n)
  return {
      "superpixels": superpixels,
      "valid": valid & (ids >= 0),
      "ids": ids,
      "split_overflow": overflow,
  }


def _apply(model, variables, frames, prepared, config, train, maps=False):
  """The network on [b, T] frames -> superfeatures [b, T, N, D] (+ stats).

  `variables` may hold the decoder's too (they are left out). With maps,
  the first output is a dict of superfeatures [b, T, N, D], f1 and f4
  [b, T, h, w, c].
  """
  variables = {k: split_variables(v)[0] for k, v in variables.items()}
  b, t, h, w, _ = frames.shape
  x = backbone_lib.normalize(
      frames.reshape(b * t, h, w, 3),
      config.model.pixel_mean,
      config.model.pixel_std,
  )
  out, mutated = model.apply(
      variables,
      x,
      prepared["superpixels"].reshape(b * t, h, w),
      prepared["valid"].reshape(b * t, -1),
      train=train,
      mutable=["batch_stats"] if train else [],
  )
  out = {k: v.reshape(b, t, *v.shape[1:]) for k, v in out.items()}
  if maps:
    return out, mutated
  return out["superfeatures"], mutated


def training_boxes(labels: jax.Array, max_objects: int) -> jax.Array:
  """Ground-truth boxes enlarged by 50 % (SPEC 5): [..., H, W] -> [..., K, 4]."""
  objects = jnp.arange(1, max_objects + 1)
  flat = labels.reshape(-1, *labels.shape[-2:])
  boxes = jax.vmap(
      lambda l: jax.vmap(lambda c: memory_lib.object_box(l == c, TRAIN_BOX_R))(
          objects
      )
  )(flat)
  return boxes.reshape(*labels.shape[:-2], max_objects, 4)


def tracker_loss(
    decoder_variables, out, prepared, labels, *, decoder, config
) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """Cross-entropy of the tracked frames 1..T-1 (SPEC 4.2, 5, 8).

  The tracker's step runs on every sequence of this device (`observe` and
  `advance` vmapped over them) with the decoder applied once per frame to
  all their object crops, so training-mode BatchNorm sees the device's whole
  batch of objects (padding object slots are masked out of the statistics).
  Frame 0 starts the memory (its features are constants); boxes are the
  ground truth's (r = 0.5); frame 1's previous prediction is the one-hot
  frame-0 mask. Objects beyond config.train.max_objects, and objects absent
  from frame 0, are void in the loss.

  Args:
    decoder_variables: the decoder's params and batch_stats.
    out: the network's superfeatures [b, T, N, D], f1, f4 [b, T, h, w, c].
    prepared: `prepare_superpixels` of the batch.
    labels: int32 [b, T, H, W].
    decoder: the Decoder.
    config: the config.

  Returns:
    (mean cross-entropy over frames 1..T-1, global over devices; the
    decoder's new batch_stats; metrics).
  """
  b, t = labels.shape[:2]
  k = config.train.max_objects
  settings = tracker_settings(config, t)
  num_objects = jnp.minimum(labels[:, 0].max((1, 2)), k)
  carry = jax.vmap(
      functools.partial(tracker.start_from_features, settings=settings)
  )(
      features=out["superfeatures"][:, 0],
      f1=out["f1"][:, 0],
      f4=out["f4"][:, 0],
      valid=prepared["valid"][:, 0],
      superpixels=prepared["superpixels"][:, 0],
      ids=prepared["ids"][:, 0],
      mask=labels[:, 0],
      num_objects=num_objects,
  )
  boxes = training_boxes(labels, k)  # [b, T, K, 4]
  params = decoder_variables["params"]
  batch_stats = decoder_variables["batch_stats"]
  ce_frames, pixels = [], []
  for i in range(1, t):
    frame = {
        "features": out["superfeatures"][:, i],
        "f1": out["f1"][:, i],
        "f4": out["f4"][:, i],
        "valid": prepared["valid"][:, i],
        "superpixels": prepared["superpixels"][:, i],
    }
    frame_boxes = jnp.stack([boxes[:, 0], boxes[:, i - 1], boxes[:, i]], 2)
    pred, crops = jax.vmap(
        functools.partial(tracker.observe, settings=settings)
    )(carry, **frame, boxes=frame_boxes)
    crop_logits, mutated = decoder.apply(
        {"params": params, "batch_stats": batch_stats},
        **jax.tree.map(lambda x: x.reshape(b * k, *x.shape[2:]), crops),
        train=True,
        mask=carry.object_valid.reshape(-1),
        mutable=["batch_stats"],
    )
    batch_stats = mutated["batch_stats"]
    carry, logits = jax.vmap(
        functools.partial(tracker.advance, hyper=settings.hyper)
    )(
        carry,
        pred=pred,
        crop_logits=crop_logits.reshape(b, k, *crop_logits.shape[1:]),
        **frame,
    )
    # Void: ids above max_objects or not in frame 0 (objects never given).
    given = jnp.concatenate(
        [jnp.ones((b, 1), bool), carry.object_valid], axis=1
    )
    target = labels[:, i]
    target = jnp.where(
        (target > num_objects[:, None, None])
        | ~jnp.take_along_axis(
            given, jnp.clip(target, 0, k).reshape(b, -1), axis=1
        ).reshape(target.shape),
        -1,
        target,
    )
    ce, count = losses.aggregated_cross_entropy(logits, target, axis_name=AXIS)
    ce_frames.append(ce)
    pixels.append(count)
  metrics = {
      "cross_entropy_pixels": sum(pixels),
      "objects": jax.lax.psum(num_objects.sum(), AXIS),
  }
  return sum(ce_frames) / len(ce_frames), batch_stats, metrics


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, model, tx, config
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's slice of the batch.

  Stage 'superfeatures' minimises NT-Xent; stages 'decoder' and 'joint'
  minimise NT-Xent + the tracker's cross-entropy (SPEC 4.2), the optimizer
  moving only the stage's parameter groups.

  Args:
    state: replicated TrainState.
    batch: this device's sequences: frames uint8 [b, T, H, W, 3], labels and
      superpixels int32 [b, T, H, W], num_superpixels int32 [b, T].
    model: the SuperfeatureNet.
    tx: the optimizer of `make_optimizer`.
    config: the config.

  Returns:
    The new state (identical on every device) and metrics averaged over
    devices: loss, positive_pairs, split_overflow; with the decoder also
    nt_xent and cross_entropy.
  """
  prepared = prepare_superpixels(batch, config)
  with_decoder = "decoder" in STAGES[config.train.stage]

  def loss_fn(params):
    out, mutated = _apply(
        model,
        {"params": params, "batch_stats": state.batch_stats},
        batch["frames"],
        prepared,
        config,
        train=True,
        maps=True,
    )
    if "superfeatures" not in STAGES[config.train.stage]:
      # Frozen network: its zero updates need no backward pass through it.
      out = jax.lax.stop_gradient(out)
    loss, aux = losses.nt_xent(
        out["superfeatures"],
        prepared["ids"],
        prepared["valid"],
        temperature=config.loss.temperature,
        positives=config.loss.positives,
        cross_batch_negatives=config.loss.cross_batch_negatives,
        axis_name=AXIS,
    )
    batch_stats = dict(mutated["batch_stats"])
    if with_decoder:
      decoder_params = split_variables(params)[1]
      decoder_stats = split_variables(state.batch_stats)[1]
      ce, decoder_stats, tracked = tracker_loss(
          {"params": decoder_params, "batch_stats": decoder_stats},
          out,
          prepared,
          batch["labels"],
          decoder=make_decoder(config),
          config=config,
      )
      aux = {**aux, **tracked, "nt_xent": loss, "cross_entropy": ce}
      loss = loss + ce
      batch_stats.update(decoder_stats)
    else:
      batch_stats.update(split_variables(state.batch_stats)[1])
    return loss, (aux, batch_stats)

  # The loss is already the global one (sums and counts psum'ed over AXIS).
  # With shard_map's varying-axes checking on, the gradient of a value
  # replicated over AXIS w.r.t. the replicated parameters is the global
  # gradient: the transpose of the implicit broadcast sums the devices'
  # contributions, so no psum/pmean of gradients follows (one would count
  # them 8 times on 8 devices; tests/test_train.py checks this).
  (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  # Each device normalised its own slice; running statistics are averaged.
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )
  metrics = {
      "loss": loss,
      "positive_pairs": aux["num_positive_pairs"],
      "split_overflow": jax.lax.psum(prepared["split_overflow"].sum(), AXIS),
  }
  if with_decoder:
    metrics.update({
        k: aux[k]
        for k in ("nt_xent", "cross_entropy", "cross_entropy_pixels", "objects")
    })
  return state, metrics


def eval_step(
    params, batch_stats, batch, *, model, config, per_row_batch_norm=False
) -> dict[str, jax.Array]:
  """Stage-1 validation sums on this device's sequences, summed over devices.

  Args:
    params: the network's parameters.
    batch_stats: its BatchNorm running statistics.
    batch: this device's validation sequences (`EVAL_BATCH_KEYS`).
    model: the SuperfeatureNet.
    config: the config.
    per_row_batch_norm: normalise the heads' outputs with each superpixel's
      own statistics (the training behaviour) instead of the running ones.
      The untrained floor uses it: an untrained network has never estimated
      running statistics, and with the initial ones (0, 1) the fused ReLU is
      zero everywhere for many seeds, which would make the floor a constant
      labelling rather than the network's features.

  Returns:
    iou_sum / objects for the network's superfeatures and colour_iou_sum /
    objects for mean-colour features.
  """
  prepared = prepare_superpixels(batch, config)
  features, _ = _apply(
      model,
      {"params": params, "batch_stats": batch_stats},
      batch["frames"],
      prepared,
      config,
      # Training-mode BatchNorm also updates running statistics; they are
      # dropped here.
      train=per_row_batch_norm,
  )
  b, t, h, w, _ = batch["frames"].shape
  colours, _ = superfeatures_lib.segment_mean(
      backbone_lib.normalize(
          batch["frames"].reshape(b * t, h, w, 3),
          config.model.pixel_mean,
          config.model.pixel_std,
      ),
      prepared["superpixels"].reshape(b * t, h, w),
      features.shape[2],
  )
  colours = colours.reshape(b, t, *colours.shape[1:])
  common = (
      prepared["valid"],
      prepared["ids"][:, 0],
      prepared["superpixels"],
      batch["labels"],
      batch["sequence_valid"],
  )
  iou_sum, objects = validation.transfer_iou(features, *common)
  colour_sum, _ = validation.transfer_iou(colours, *common)
  return jax.lax.psum(
      {"iou_sum": iou_sum, "colour_iou_sum": colour_sum, "objects": objects},
      AXIS,
  )


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """One data-parallel axis over every device of every process."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
      (len(devices),),
      (AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices,
  )


def make_train_step(model, tx, config, mesh):
  """`train_step` wrapped once for the mesh and compiled (state donated)."""
  step = jax.shard_map(
      functools.partial(train_step, model=model, tx=tx, config=config),
      mesh=mesh,
      in_specs=(P(), P(AXIS)),
      out_specs=(P(), P()),
  )
  return jax.jit(step, donate_argnums=0)


def make_eval_step(model, config, mesh, per_row_batch_norm=False):
  step = jax.shard_map(
      functools.partial(
          eval_step,
          model=model,
          config=config,
          per_row_batch_norm=per_row_batch_norm,
      ),
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS)),
      out_specs=P(),
  )
  return jax.jit(step)


# --------------------------------------------------------------------------
# Host side: batches, metrics, the loop.


def global_batch(
    local: dict[str, np.ndarray], mesh, keys
) -> dict[str, jax.Array]:
  """Process-local [local_devices, per_device, ...] -> global [batch, ...]."""
  sharding = jax.sharding.NamedSharding(mesh, P(AXIS))
  return {
      k: jax.make_array_from_process_local_data(
          sharding, local[k].reshape(-1, *local[k].shape[2:])
      )
      for k in keys
  }


class MetricWriter:
  """TensorBoard event files and a metrics.jsonl; only process 0 writes.

  The workdir may be a local path or any filesystem TensorFlow knows (gs://
  on TPU pods). Locally metrics.jsonl is appended to; object stores cannot
  append, so there the whole (small) file is rewritten at every write.
  """

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._writer = tf.summary.create_file_writer(
        os.path.join(workdir, "tensorboard")
    )
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._remote = "://" in workdir
    if self._remote:
      self._text = ""
      if tf.io.gfile.exists(self._path):
        with tf.io.gfile.GFile(self._path) as f:
          self._text = f.read()
    else:
      self._jsonl = open(self._path, "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, value, step=step)
    self._writer.flush()
    line = (
        json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
        + "\n"
    )
    if self._remote:
      self._text += line
      _write_text(self._path, self._text)
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def write_images(
      self, step: int, images: dict[str, np.ndarray], description: str = ""
  ) -> None:
    """TensorBoard images: {tag: uint8 [n, H, W, 3]}, all n of each kept."""
    if not self._active:
      return
    with self._writer.as_default():
      for name, value in images.items():
        tf.summary.image(
            name,
            value,
            step=step,
            max_outputs=len(value),
            description=description or None,
        )
    self._writer.flush()

  def close(self) -> None:
    if self._active:
      self._writer.close()
      if not self._remote:
        self._jsonl.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json once; a resumed run with another config keeps both."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  path = os.path.join(workdir, "config.json")
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      if f.read() == text:
        return
    index = 1
    while tf.io.gfile.exists(os.path.join(workdir, f"config.{index}.json")):
      index += 1
    path = os.path.join(workdir, f"config.{index}.json")
    logging.warning(
        "The config differs from %s/config.json of the run being resumed;"
        " writing it to %s.",
        workdir,
        path,
    )
  _write_text(path, text)


def _write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` whole: a reader never sees half of it."""
  tmp = path + ".tmp"
  if tf.io.gfile.exists(tmp):
    tf.io.gfile.remove(tmp)  # Left by a killed run.
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def dataset_dir(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """The prepared training dataset: <data_dir>/<name>/<version>."""
  root = os.path.join(data_dir, config.prep.dataset_name)
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(
        f"No prepared dataset at {root}. Prepare it with `python -m"
        " data_prep.still_images --config=...` (config.data_dir and"
        " config.prep.dataset_name name it)."
    )
  versions = sorted(
      v for v in tf.io.gfile.listdir(root) if v.rstrip("/")[0].isdigit()
  )
  if not versions:
    raise FileNotFoundError(
        f"{root} holds no dataset version folder; run the preparation again."
    )
  return os.path.join(root, versions[-1].rstrip("/"))


def _num_train_steps(config, data) -> tuple[int, int]:
  per_epoch = input_pipeline.steps_per_epoch(
      data,
      "train",
      global_batch_size=config.batch_size,
      process_count=jax.process_count(),
  )
  if per_epoch < 1:
    raise ValueError(
        f"{data} has too few training sequences for one batch of"
        f" config.batch_size={config.batch_size}."
    )
  if config.train.num_train_steps > 0:
    return config.train.num_train_steps, per_epoch
  return config.train.num_epochs * per_epoch, per_epoch


def evaluate(params, batch_stats, eval_fn, config, data, mesh) -> dict:
  """Mean IoU per object on the validation split (network, mean colour)."""
  sums = None
  ds = input_pipeline.sequence_dataset(
      data,
      "validation",
      global_batch_size=config.eval_batch_size,
      num_local_devices=jax.local_device_count(),
      max_superpixels=config.train_superpixels.max_superpixels,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shuffle=False,
      pad_to_full_batches=True,
  )
  for local in ds.as_numpy_iterator():
    out = eval_fn(
        params, batch_stats, global_batch(local, mesh, EVAL_BATCH_KEYS)
    )
    out = jax.tree.map(np.asarray, out)
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  objects = max(float(sums["objects"]), 1.0)
  return {
      "iou": float(sums["iou_sum"]) / objects,
      "colour_iou": float(sums["colour_iou_sum"]) / objects,
      "objects": int(sums["objects"]),
  }


def sample_predictions(
    params, batch_stats, batch, *, model, config
) -> dict[str, jax.Array]:
  """Eval-mode predictions on a few sequences, for the sample pictures.

  Stage 'superfeatures': every superpixel takes the object id of its
  nearest frame-0 superfeature (the validation's transfer). Stages
  'decoder' and 'joint': the tracker's masks (`tracker.track` from the
  frame-0 labels, objects beyond config.train.max_objects left out).
  BatchNorm uses running statistics; nothing here touches the train step.

  Args:
    params: the network's parameters (one device's copy).
    batch_stats: its BatchNorm running statistics.
    batch: frames uint8 [b, T, H, W, 3]; labels, superpixels int32 [b, T, H,
      W]; num_superpixels int32 [b, T].
    model: the SuperfeatureNet.
    config: the config.

  Returns:
    predicted: int32 [b, T, H, W] object ids; superpixels: int32 [b, T, H,
    W], frame 0 split at the object borders as in training.
  """
  prepared = prepare_superpixels(batch, config)
  labels = batch["labels"]
  b, t = labels.shape[:2]
  if "decoder" not in STAGES[config.train.stage]:
    features, _ = _apply(
        model,
        {"params": params, "batch_stats": batch_stats},
        batch["frames"],
        prepared,
        config,
        train=False,
    )
    transferred = jax.vmap(validation.nearest_frame0_labels)(
        features, prepared["valid"], prepared["ids"][:, 0]
    )
    superpixels = prepared["superpixels"]
    predicted = jnp.take_along_axis(
        transferred, superpixels.reshape(b, t, -1), axis=2
    ).reshape(superpixels.shape)
    return {"predicted": predicted, "superpixels": superpixels}
  settings = tracker_settings(config, t)
  num_objects = jnp.minimum(labels[:, 0].max((1, 2)), settings.max_objects)
  sf_params, decoder_params = split_variables(params)
  sf_stats, decoder_stats = split_variables(batch_stats)
  networks = {
      "sf_model": model,
      "sf_variables": {"params": sf_params, "batch_stats": sf_stats},
      "decoder": make_decoder(config),
      "decoder_variables": {
          "params": decoder_params,
          "batch_stats": decoder_stats,
      },
  }
  frames = backbone_lib.normalize(
      batch["frames"], config.model.pixel_mean, config.model.pixel_std
  )
  masks = jax.vmap(
      lambda f, sp, n, m, k: tracker.track(
          networks, f, sp, n, m, k, jnp.ones(t, bool), settings
      )
  )(
      frames,
      batch["superpixels"],
      batch["num_superpixels"],
      labels[:, 0],
      num_objects,
  )
  predicted = jnp.where(masks > num_objects[:, None, None, None], 0, masks)
  return {"predicted": predicted, "superpixels": prepared["superpixels"]}


def image_samples(config, data: str) -> dict[str, np.ndarray]:
  """The first NUM_IMAGE_SAMPLES validation sequences (BATCH_KEYS), NumPy."""
  ds = input_pipeline.sequence_dataset(
      data,
      "validation",
      global_batch_size=NUM_IMAGE_SAMPLES,
      num_local_devices=1,
      max_superpixels=config.train_superpixels.max_superpixels,
      shuffle=False,
      pad_to_full_batches=True,
      prefetch=1,
  )
  local = next(ds.as_numpy_iterator())
  real = local["sequence_valid"][0]
  return {k: local[k][0][real] for k in BATCH_KEYS}


def render_samples(
    samples: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, str]:
  """The sample pictures: uint8 [b, H', W', 3], and what their rows show.

  One picture per sequence, its frames left to right. Stage
  'superfeatures': the frames with their superpixels' borders, the ground
  truth, and the labels transferred from frame 0 by nearest superfeature.
  Stages 'decoder' and 'joint': the ground truth (objects the tracker
  does not follow are left uncoloured) and the tracked masks. Objects in
  the DAVIS palette.
  """
  with_decoder = "decoder" in STAGES[config.train.stage]
  pictures = []
  for i, frames in enumerate(samples["frames"]):
    labels = samples["labels"][i]
    predicted = outputs["predicted"][i]
    if with_decoder:
      # Void (255) is left uncoloured: the tracker has no slot for them.
      labels = np.where(labels > config.train.max_objects, 255, labels)
    truth = [visualize.overlay(f, l) for f, l in zip(frames, labels)]
    rows = [truth, [visualize.overlay(f, p) for f, p in zip(frames, predicted)]]
    if not with_decoder:
      borders = [
          visualize.mark_boundaries(f, s)
          for f, s in zip(frames, outputs["superpixels"][i])
      ]
      rows.insert(0, borders)
    pictures.append(visualize.tile(rows))
  if with_decoder:
    description = "Rows: ground truth; tracked masks (frame 0 is given)."
  else:
    description = (
        "Rows: superpixels (frame 0 split at the objects); ground truth;"
        " each superpixel's nearest frame-0 superfeature's object."
    )
  return np.stack(pictures), description


def _last_logged(workdir: str, tags) -> dict[str, float]:
  """The last value of each of `tags` in <workdir>/metrics.jsonl, if any."""
  path = os.path.join(workdir, "metrics.jsonl")
  values = {}
  if not tf.io.gfile.exists(path):
    return values
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by a kill.
      values.update({tag: record[tag] for tag in tags if tag in record})
  return values


def checkpoint_dir(path: str) -> str:
  """A workdir or its checkpoints/ folder -> the checkpoints folder."""
  path = path.rstrip("/")
  if os.path.basename(path) != "checkpoints" and tf.io.gfile.isdir(
      os.path.join(path, "checkpoints")
  ):
    return os.path.join(path, "checkpoints")
  return path


def load_weights(
    config, state: TrainState, path: str, mesh, step: int | None = None
) -> TrainState:
  """`state` with the parameters and BatchNorm statistics of another run.

  The newest checkpoint under `path` (a workdir or its checkpoints folder),
  or its checkpoint of `step`, written by any stage: its optimizer state is
  read along (each stage's layout is tried) and dropped. Step and optimizer
  state stay `state`'s.
  """
  directory = checkpoint_dir(path)
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(
        f"config.train.init_from={path!r}: no such folder. Give the workdir"
        " of an earlier run (or its checkpoints folder)."
    )
  model = make_model(config)
  errors = []
  with checkpoint.Checkpointer(directory) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"config.train.init_from={path!r}: {directory} holds no complete"
          " checkpoint."
      )
    for stage in STAGES:
      other = ml_collections.ConfigDict(config.to_dict())
      other.train.stage = stage
      tx = make_optimizer(other, jax.device_count())
      template = abstract_state(other, model, tx, mesh)
      try:
        if step is None:
          restored, found = ckpt.restore_latest(template)
        else:
          restored, found = ckpt.restore(step, template), step
      except checkpoint.StructureMismatchError as e:
        errors.append(f"as stage {stage!r}: {e}")
        continue
      if found is not None:
        logging.info(
            "Starting from the weights of %s, step %d (a stage-%r run).",
            directory,
            found,
            stage,
        )
        return state.replace(
            params=restored.params, batch_stats=restored.batch_stats
        )
  raise ValueError(
      f"config.train.init_from={path!r}: the checkpoint in {directory} does"
      " not fit this config's model (check config.model against that run's"
      " config.json).\n"
      + "\n".join(errors)
  )


def _check_finite(step_metrics: list[tuple[int, dict]]) -> None:
  for step, metrics in step_metrics:
    if not np.isfinite(metrics["loss"]):
      raise FloatingPointError(
          f"The loss became {metrics['loss']} at step {step}. Training"
          " stopped; the last checkpoint before it is intact. Lower"
          " config.train.learning_rate or check the data of this run."
      )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    data_dir: str,
    video_validation=None,
) -> dict:
  """Trains the config's stage and returns the final metrics; resumes.

  Args:
    config: the config (`configs/davis.py` documents the fields).
    workdir: checkpoints, TensorBoard events, metrics.jsonl, config.json.
    data_dir: root of the prepared datasets (config.prep.dataset_name).
    video_validation: None, or a callable (params, batch_stats) -> {metric:
      value} with a `floors()` method (`inference.VideoValidation`: J&F on
      held-out videos), run by process 0 at every validation; its floors
      are written at a fresh start.

  Returns:
    step, loss (mean of the last logging interval), val_iou and val_objects
    (final validation), on a fresh start val_iou_untrained and
    val_iou_mean_colour (the floors), and the final TrainState as state.
  """
  for batch_size in (config.batch_size, config.eval_batch_size):
    input_pipeline.batch_sizes(
        batch_size, jax.local_device_count(), jax.process_count()
    )
  tf.io.gfile.makedirs(workdir)
  data = dataset_dir(config, data_dir)
  mesh = make_mesh()
  num_devices = jax.device_count()
  num_steps, per_epoch = _num_train_steps(config, data)
  model = make_model(config)
  tx = make_optimizer(config, num_devices)
  state = create_state(config, model, tx, mesh)
  check_stage(config, state.params)
  untrained = (state.params, state.batch_stats)
  save_config(config, workdir)

  # Resume order: the newest complete checkpoint in <workdir>/checkpoints
  # (falling back to older ones if it is damaged, see checkpoint.py), else
  # the weights of config.train.init_from, else the fresh initialisation
  # from config.seed.
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.train.max_checkpoints,
  )
  state, restored_step = ckpt.restore_latest(state)
  if restored_step is None and config.train.init_from:
    state = load_weights(config, state, config.train.init_from, mesh)
  check_fusion_alive(config, state.params)
  start_step = int(state.step)
  if restored_step is not None:
    logging.info("Resuming from step %d.", start_step)

  train_fn = make_train_step(model, tx, config, mesh)
  eval_fn = make_eval_step(model, config, mesh)
  writer = MetricWriter(workdir)
  image_every = config.train.image_every_steps
  # Sample pictures: process 0 alone, on its first device, outside the step.
  samples = None
  if image_every > 0 and jax.process_index() == 0:
    samples = image_samples(config, data)
    sample_fn = jax.jit(
        functools.partial(sample_predictions, model=model, config=config)
    )
  batches = input_pipeline.training_batches(
      data,
      start_step=start_step,
      global_batch_size=config.batch_size,
      num_local_devices=jax.local_device_count(),
      max_superpixels=config.train_superpixels.max_superpixels,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      seed=config.seed,
      shuffle_buffer=config.shuffle_buffer,
      prefetch=config.prefetch,
  )
  lr = learning_rate(config, num_devices)
  logging.info(
      "%d steps (%d per epoch), batch %d on %d devices, lr %g.",
      num_steps,
      per_epoch,
      config.batch_size,
      num_devices,
      lr,
  )

  summary = {}
  last_loss = math.nan
  if restored_step is not None:
    # What the run being resumed measured: its floors (at its fresh start)
    # and its last loss, for the report when nothing is left to train.
    logged = _last_logged(
        workdir, ("val/iou_untrained", "val/iou_mean_colour", "train/loss")
    )
    last_loss = logged.pop("train/loss", math.nan)
    summary.update({k.replace("/", "_"): v for k, v in logged.items()})
  else:
    floors = evaluate(
        *untrained,
        make_eval_step(model, config, mesh, per_row_batch_norm=True),
        config,
        data,
        mesh,
    )
    summary["val_iou_untrained"] = floors["iou"]
    summary["val_iou_mean_colour"] = floors["colour_iou"]
    writer.write(
        start_step,
        {
            "val/iou_untrained": floors["iou"],
            "val/iou_mean_colour": floors["colour_iou"],
        },
    )
    logging.info("Validation floors: %s", floors)
  if video_validation is not None and jax.process_index() == 0:
    video_floors = video_validation.floors()
    if restored_step is None:
      writer.write(start_step, video_floors)
    summary.update({k.replace("/", "_"): v for k, v in video_floors.items()})

  pending = []  # (step, device metrics) since the last log.
  bar = tqdm.tqdm(
      total=num_steps,
      initial=start_step,
      desc="train",
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
  )
  interval_start = time.perf_counter()
  interval_steps = 0
  step = start_step
  while step < num_steps:
    state, metrics = train_fn(
        state, global_batch(next(batches), mesh, BATCH_KEYS)
    )
    step += 1
    interval_steps += 1
    pending.append((step, metrics))
    bar.update(1)
    is_last = step == num_steps
    log_now = step % config.train.log_every_steps == 0 or is_last
    save_now = step % config.train.checkpoint_every_steps == 0 or is_last
    eval_every = config.train.eval_every_steps
    eval_now = is_last or (eval_every > 0 and step % eval_every == 0)
    image_now = samples is not None and (step % image_every == 0 or is_last)
    if log_now or save_now or eval_now:
      fetched = [
          (s, jax.tree.map(float, jax.device_get(m))) for s, m in pending
      ]
      pending = []
      _check_finite(fetched)
      elapsed = time.perf_counter() - interval_start
      means = {
          f"train/{k}": float(np.mean([m[k] for _, m in fetched]))
          for k in fetched[0][1]
      }
      means["train/learning_rate"] = lr
      means["train/steps_per_second"] = interval_steps / max(elapsed, 1e-9)
      writer.write(step, means)
      last_loss = means["train/loss"]
      bar.set_postfix(loss=f"{last_loss:.4f}")
      interval_start, interval_steps = time.perf_counter(), 0
    if save_now:
      ckpt.save(step, state, force=is_last)
    if eval_now:
      scores = evaluate(
          state.params, state.batch_stats, eval_fn, config, data, mesh
      )
      writer.write(step, {"val/iou": scores["iou"]})
      summary["val_iou"] = scores["iou"]
      summary["val_objects"] = scores["objects"]
      bar.write(f"step {step}: validation mean IoU {scores['iou']:.4f}")
      if video_validation is not None and jax.process_index() == 0:
        # This process's copy of the replicated state, on one device.
        video_scores = video_validation(
            *jax.tree.map(
                lambda x: np.asarray(x.addressable_data(0)),
                (state.params, state.batch_stats),
            )
        )
        writer.write(step, video_scores)
        summary.update({k.replace("/", "_"): v for k, v in video_scores.items()})
        if "val/video_jf" in video_scores:
          bar.write(
              f"step {step}: J&F {video_scores['val/video_jf']:.4f} on"
              f" {len(video_validation.videos)} held-out videos"
          )
      # Steps per second measure training only.
      interval_start = time.perf_counter()
    if image_now:
      # This process's copy of the replicated state (one device; works on
      # multi-host too); the NumPy samples follow it there.
      params, batch_stats = jax.tree.map(
          lambda x: x.addressable_data(0), (state.params, state.batch_stats)
      )
      outputs = jax.device_get(sample_fn(params, batch_stats, samples))
      pictures, description = render_samples(samples, outputs, config)
      writer.write_images(step, {"val/samples": pictures}, description)
      interval_start = time.perf_counter()
  bar.close()
  if "val_iou" not in summary:
    # Nothing left to train (a finished run started again): score it anyway.
    scores = evaluate(
        state.params, state.batch_stats, eval_fn, config, data, mesh
    )
    summary["val_iou"] = scores["iou"]
    summary["val_objects"] = scores["objects"]
  ckpt.wait()
  ckpt.close()
  writer.close()
  summary["step"] = step
  summary["loss"] = last_loss
  summary["state"] = state
  return summary
