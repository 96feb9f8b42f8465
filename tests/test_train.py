"""The training system: stages, the distributed step, the loop, resuming."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf

from data_prep import demo
from shls_jax import checkpoint
from shls_jax import train
from shls_jax import visualize
from tests.conftest import REPO
from tests.conftest import load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The embedded demo dataset at the test config's tiny size."""
  path = str(tmp_path_factory.mktemp("data"))
  demo.prepare(load_config("test"), path)
  return path


def _params_of(workdir, config):
  """Final parameters in a workdir's newest checkpoint, as NumPy."""
  model = train.make_model(config)
  tx = train.make_optimizer(config, jax.device_count())
  template = train.create_state(config, model, tx, train.make_mesh())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, step = ckpt.restore_latest(template)
  ckpt.close()
  return step, jax.tree.map(np.asarray, state.params)


def _assert_trees_equal(a, b):
  flat_a = flax.traverse_util.flatten_dict(a)
  flat_b = flax.traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


# ---------------------------------------------------------------- optimizer


@pytest.mark.parametrize(
    "stage, moved",
    [
        ("superfeatures", {"feat_extractor", "sf_head_L1_0"}),
        ("decoder", {"segmenter"}),
        ("joint", {"feat_extractor", "sf_head_L1_0", "segmenter"}),
    ],
)
def test_stages_freeze_through_the_optimizer(test_config, stage, moved):
  test_config.train.stage = stage
  params = {
      "feat_extractor": {"conv1_0": {"kernel": jnp.ones((3, 3))}},
      "sf_head_L1_0": {"bias": jnp.ones(4)},
      "segmenter": {"pred": {"kernel": jnp.ones((2, 2))}},
  }
  tx = train.make_optimizer(test_config, num_replicas=1)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  changed = {
      name
      for name in params
      if any(
          not np.array_equal(a, b)
          for a, b in zip(
              jax.tree.leaves(params[name]), jax.tree.leaves(new[name])
          )
      )
  }
  assert changed == moved


def test_stage_without_its_parameters_is_refused(test_config):
  test_config.train.stage = "decoder"
  params = {"feat_extractor": {"k": jnp.ones(2)}}
  with pytest.raises(ValueError, match="stage='decoder'.*decoder"):
    train.check_stage(test_config, params)
  test_config.train.stage = "warmup"
  with pytest.raises(ValueError, match="not one of"):
    train.make_optimizer(test_config, 1)


def test_a_dead_fusion_is_refused(test_config):
  model = train.make_model(test_config)
  tx = train.make_optimizer(test_config, 1)
  state = train.init_state(test_config, model, tx)
  train.check_fusion_alive(test_config, state.params)  # Seed 0 is alive.
  fusion = state.params["sf_conv_1x1_0"]
  dead = dict(
      state.params,
      sf_conv_1x1_0={k: -jnp.abs(v) for k, v in fusion.items()},
  )
  # Dead means what the message says: zero superfeatures for any input.
  rng = np.random.default_rng(0)
  out = model.apply(
      {"params": dead, "batch_stats": state.batch_stats},
      jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32),
      jnp.asarray(rng.integers(0, 4, size=(1, 16, 16)), jnp.int32),
      jnp.arange(train.num_segments(test_config))[None] < 4,
      train=True,
      mutable=["batch_stats"],
  )[0]
  assert not np.asarray(out["superfeatures"]).any()
  with pytest.raises(ValueError, match="seed=0 .*Use another config.seed"):
    train.check_fusion_alive(test_config, dead)
  # A stage that does not train the superfeatures does not care.
  test_config.train.stage = "decoder"
  train.check_fusion_alive(test_config, dead)


def test_learning_rate_scales_with_replicas(test_config):
  assert train.learning_rate(test_config, 8) == pytest.approx(8e-4)
  test_config.train.scale_lr_by_replicas = False
  assert train.learning_rate(test_config, 8) == pytest.approx(1e-4)


# ---------------------------------------------------------------- the step


def _batch(rng, batch, t=3, size=16, n=12):
  """Random sequences: blocky superpixels and labels, random frames."""
  blocks = rng.integers(0, n, (batch, t, size // 4, size // 4))
  superpixels = np.kron(blocks, np.ones((4, 4), np.int32)).astype(np.int32)
  # Relabel to consecutive ids per frame, as the records guarantee.
  counts = np.zeros((batch, t), np.int32)
  for b in range(batch):
    for f in range(t):
      _, inv = np.unique(superpixels[b, f], return_inverse=True)
      superpixels[b, f] = inv.reshape(size, size)
      counts[b, f] = inv.max() + 1
  labels = (np.arange(size)[None, None, None, :] >= size // 2) * (
      1 + rng.integers(0, 2, (batch, t, 1, 1))
  )
  labels = np.broadcast_to(labels, superpixels.shape).astype(np.int32)
  frames = rng.integers(0, 256, (batch, t, size, size, 3), dtype=np.uint8)
  return {
      "frames": frames,
      "labels": np.ascontiguousarray(labels),
      "superpixels": superpixels,
      "num_superpixels": counts,
  }


def _step_once(config, mesh, batch):
  model = train.make_model(config)
  tx = train.make_optimizer(config, num_replicas=1)
  state = train.create_state(config, model, tx, mesh)
  step = train.make_train_step(model, tx, config, mesh)
  sharding = jax.sharding.NamedSharding(mesh, train.P(train.AXIS))
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  state, metrics = step(state, batch)
  return jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, metrics)


def test_sharded_step_equals_single_device(test_config):
  # Each of 8 devices gets the same 2 sequences, with no cross-device
  # negatives: every device's part of the loss, gradient and BatchNorm
  # statistics equals the single-device ones, so psum/pmean wiring errors
  # (a missing or doubled reduction) change the result by a factor.
  test_config.train_superpixels.max_superpixels = 16
  test_config.loss.split_extra_superpixels = 8
  test_config.loss.cross_batch_negatives = False
  one = _batch(np.random.default_rng(0), 2)
  eight = {k: np.concatenate([v] * 8) for k, v in one.items()}
  single_state, single_metrics = _step_once(
      test_config, train.make_mesh(jax.devices()[:1]), one
  )
  sharded_state, sharded_metrics = _step_once(
      test_config, train.make_mesh(), eight
  )
  assert single_metrics["loss"] > 0
  np.testing.assert_allclose(
      sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5
  )
  assert (
      sharded_metrics["positive_pairs"] == 8 * single_metrics["positive_pairs"]
  )
  for a, b in zip(
      jax.tree.leaves(single_state), jax.tree.leaves(sharded_state)
  ):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert int(sharded_state.step) == 1


def test_frame0_is_split_at_object_borders(test_config):
  test_config.train_superpixels.max_superpixels = 4
  test_config.loss.split_extra_superpixels = 4
  superpixels = np.zeros((1, 2, 4, 4), np.int32)
  superpixels[:, :, :, 2:] = 1
  labels = np.zeros((1, 2, 4, 4), np.int32)
  labels[:, :, 1:3, 1:3] = 5  # Straddles both superpixels.
  prepared = train.prepare_superpixels(
      {
          "labels": jnp.asarray(labels),
          "superpixels": jnp.asarray(superpixels),
          "num_superpixels": jnp.full((1, 2), 2, jnp.int32),
      },
      test_config,
  )
  split = np.asarray(prepared["superpixels"])
  # Frame 0: the object's halves became superpixels 2 and 3; frame 1 kept.
  assert set(np.unique(split[0, 0])) == {0, 1, 2, 3}
  np.testing.assert_array_equal(split[0, 1], superpixels[0, 1])
  np.testing.assert_array_equal(
      np.asarray(prepared["valid"][0]),
      [
          [True, True, True, True, False, False, False, False],
          [True, True, False, False, False, False, False, False],
      ],
  )
  np.testing.assert_array_equal(
      np.asarray(prepared["ids"][0, 0, :4]), [0, 0, 5, 5]
  )
  for sp in (2, 3):
    assert (labels[0, 0][split[0, 0] == sp] == 5).all()


def test_batch_size_not_divisible_by_devices_is_refused(
    test_config, data_dir, tmp_path
):
  test_config.batch_size = 12
  with pytest.raises(
      ValueError, match="batch_size=12 is not divisible by the 8"
  ):
    train.train_and_evaluate(test_config, str(tmp_path), data_dir)


# ---------------------------------------------------------------- the loop


def test_training_writes_everything_and_resumes(
    test_config, data_dir, tmp_path
):
  workdir = str(tmp_path / "run")
  test_config.train.image_every_steps = 3  # Step 3, and the last one.
  summary = first = train.train_and_evaluate(test_config, workdir, data_dir)
  assert summary["step"] == 4
  assert np.isfinite(summary["loss"])
  assert 0.0 <= summary["val_iou_mean_colour"] <= 1.0
  assert 0.0 <= summary["val_iou"] <= 1.0
  assert summary["val_objects"] > 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_train_steps"] == 4
  records = [
      json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
  ]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  assert {"val/iou_untrained", "val/iou_mean_colour"} <= records[0].keys()
  assert "val/iou" in records[-1]
  events = tf.io.gfile.glob(os.path.join(workdir, "tensorboard", "events.*"))
  tags = {
      v.tag
      for e in tf.compat.v1.train.summary_iterator(events[0])
      for v in e.summary.value
  }
  assert {
      "train/loss",
      "train/learning_rate",
      "train/steps_per_second",
      "val/iou",
      "val/iou_untrained",
      "val/iou_mean_colour",
      "val/samples",
  } <= tags
  # Sample pictures of two validation sequences, as TensorBoard PNGs.
  samples = [
      (e.step, tf.make_ndarray(v.tensor))
      for e in tf.compat.v1.train.summary_iterator(events[0])
      for v in e.summary.value
      if v.tag == "val/samples"
  ]
  assert [step for step, _ in samples] == [3, 4]
  width, height, *pngs = samples[-1][1]
  assert len(pngs) == train.NUM_IMAGE_SAMPLES
  picture = tf.io.decode_png(pngs[0]).numpy()
  # Three rows (superpixels, truth, transfer) of three 64 x 64 frames.
  assert picture.shape == (3 * 64 + 4, 3 * 64 + 4, 3)
  assert (int(width), int(height)) == (3 * 64 + 4, 3 * 64 + 4)

  # Six steps in the same workdir continue from step 4.
  step4, params4 = _params_of(workdir, test_config)
  test_config.train.num_train_steps = 6
  summary = train.train_and_evaluate(test_config, workdir, data_dir)
  assert summary["step"] == 6
  # The floors are measured once, at the fresh start, and read back.
  assert summary["val_iou_untrained"] == first["val_iou_untrained"]
  assert summary["val_iou_mean_colour"] == first["val_iou_mean_colour"]
  step6, params6 = _params_of(workdir, test_config)
  assert (step4, step6) == (4, 6)
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params6))
  )

  # A damaged newest checkpoint: the run falls back to step 4 (with a
  # warning), redoes steps 5 and 6 and reaches the same parameters.
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "6")):
    for name in files:
      if name.endswith(".json") or "ocdbt" in root:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(f.name) // 2, 1))
  summary = train.train_and_evaluate(test_config, workdir, data_dir)
  assert summary["step"] == 6
  _, params_again = _params_of(workdir, test_config)
  _assert_trees_equal(params6, params_again)

  # A finished run started again trains nothing and still reports its score.
  again = train.train_and_evaluate(test_config, workdir, data_dir)
  assert again["step"] == 6 and again["val_iou"] == summary["val_iou"]


def test_non_finite_loss_stops_with_the_step(test_config, data_dir, tmp_path):
  test_config.train.learning_rate = 1e30
  test_config.train.num_train_steps = 6
  with pytest.raises(FloatingPointError, match=r"at step \d"):
    train.train_and_evaluate(test_config, str(tmp_path), data_dir)


def _main_command(workdir, data_dir, *overrides):
  return [
      sys.executable,
      "-m",
      "shls_jax.main",
      f"--config={os.path.join(REPO, 'configs', 'test.py')}",
      "--config.mode=train",
      f"--config.data_dir={data_dir}",
      f"--workdir={workdir}",
      *overrides,
  ]


def test_sigkill_resumes_to_the_same_parameters(
    test_config, data_dir, tmp_path
):
  steps = ["--config.train.num_train_steps=8"]
  env = dict(os.environ, PYTHONPATH=REPO)
  straight = str(tmp_path / "straight")
  subprocess.run(
      _main_command(straight, data_dir, *steps),
      check=True,
      env=env,
      capture_output=True,
  )
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(
      _main_command(killed, data_dir, *steps),
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  ckpt_dir = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(
        name.isdigit() for name in os.listdir(ckpt_dir)
    ):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = [n for n in os.listdir(ckpt_dir) if n.isdigit()]
  assert "8" not in finished
  subprocess.run(
      _main_command(killed, data_dir, *steps),
      check=True,
      env=env,
      capture_output=True,
  )
  test_config.train.num_train_steps = 8
  step_a, params_a = _params_of(straight, test_config)
  step_b, params_b = _params_of(killed, test_config)
  assert step_a == step_b == 8
  _assert_trees_equal(params_a, params_b)


_WORKER = textwrap.dedent("""
    import os, sys
    import runpy
    from shls_jax import main
    config = runpy.run_path(sys.argv[1])["get_config"]()
    # The entry point's route: the environment names the coordinator.
    main.maybe_initialize_distributed(config)
    import jax
    import numpy as np
    import flax
    from shls_jax import train
    config.mode = "train"
    config.batch_size = 4
    config.eval_batch_size = 4
    config.train.num_train_steps = 2
    workdir, data_dir = sys.argv[2], sys.argv[3]
    assert jax.process_count() == 2 and jax.device_count() == 4
    summary = train.train_and_evaluate(config, workdir, data_dir)
    # Each process's own copy of the final parameters.
    state = summary["state"]
    flat = flax.traverse_util.flatten_dict(jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0)), state.params))
    np.savez(os.path.join(workdir, f"params_{jax.process_index()}.npz"),
             **{"/".join(k): v for k, v in flat.items()},
             step=int(state.step.addressable_data(0)))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_to_identical_parameters(data_dir, tmp_path):
  workdir = str(tmp_path / "multihost")
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = _free_port()
  procs = []
  for index in range(2):
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(index),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                os.path.join(REPO, "configs", "test.py"),
                workdir,
                data_dir,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    )
  outputs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  a = np.load(os.path.join(workdir, "params_0.npz"))
  b = np.load(os.path.join(workdir, "params_1.npz"))
  assert int(a["step"]) == int(b["step"]) == 2
  assert a.files == b.files and len(a.files) > 10
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_metrics_and_config_go_to_remote_filesystems(tmp_path):
  # ram:// stands for gs:// (no append, writes replace whole objects).
  workdir = f"ram://{tmp_path.name}/run"
  writer = train.MetricWriter(workdir)
  writer.write(1, {"train/loss": 2.0})
  writer.write(2, {"train/loss": 1.5})
  writer.close()
  writer = train.MetricWriter(workdir)  # A resumed run appends.
  writer.write(3, {"val/iou_untrained": 0.25})
  writer.close()
  with tf.io.gfile.GFile(f"{workdir}/metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3]
  assert train._last_logged(workdir, ("train/loss", "val/iou_untrained")) == {
      "train/loss": 1.5,
      "val/iou_untrained": 0.25,
  }
  config = ml_collections.ConfigDict({"seed": 0})
  train.save_config(config, workdir)
  train.save_config(config, workdir)  # Unchanged: nothing new.
  config.seed = 1
  train.save_config(config, workdir)
  assert sorted(
      n for n in tf.io.gfile.listdir(workdir) if n.startswith("config")
  ) == ["config.1.json", "config.json"]


# ---------------------------------------------------------------- stage 2


def _group_changed(before, after):
  changed = set()
  for path, value in flax.traverse_util.flatten_dict(before).items():
    new = flax.traverse_util.flatten_dict(after)[path]
    if not np.array_equal(value, new):
      changed.add(train.param_group(path))
  return changed


@pytest.mark.parametrize(
    "stage, moved",
    [("decoder", {"decoder"}), ("joint", {"decoder", "superfeatures"})],
)
def test_stage_two_steps_train_the_tracker(test_config, stage, moved):
  test_config.train.stage = stage
  mesh = train.make_mesh()
  model = train.make_model(test_config)
  tx = train.make_optimizer(test_config, 1)
  state = train.create_state(test_config, model, tx, mesh)
  before = jax.tree.map(np.asarray, state.params)
  step = train.make_train_step(model, tx, test_config, mesh)
  raw = _batch(np.random.default_rng(0), 8, size=32)
  sharding = jax.sharding.NamedSharding(mesh, train.P(train.AXIS))
  batch = {k: jax.device_put(v, sharding) for k, v in raw.items()}
  state, metrics = step(state, batch)
  metrics = jax.tree.map(float, metrics)
  # Both losses are there and finite; the pixels of frames 1..2 count
  # unless their object is absent from frame 0 (never given: void) or above
  # train.max_objects.
  assert np.isfinite(metrics["cross_entropy"]) and metrics["cross_entropy"] > 0
  assert metrics["loss"] == pytest.approx(
      metrics["nt_xent"] + metrics["cross_entropy"], rel=1e-5
  )
  labels = raw["labels"]
  k = test_config.train.max_objects
  known = np.stack([
      np.isin(seq[1:], [0] + [i for i in np.unique(seq[0]) if 0 < i <= k])
      for seq in labels
  ])
  assert 0 < known.sum() < known.size  # The batch has both cases.
  assert metrics["cross_entropy_pixels"] == known.sum()
  after = jax.tree.map(np.asarray, state.params)
  assert _group_changed(before, after) == moved
  # The decoder's BatchNorm statistics moved (training mode, pmean'ed).
  _, stats = train.split_variables(jax.tree.map(np.asarray, state.batch_stats))
  assert not np.allclose(stats["segmenter"]["res_L4"]["conv1_1"]["mean"], 0.0)
  step(state, batch)  # A second step runs with the updated state.


def test_tracker_loss_gradients_follow_the_rules_of_spec_5(test_config):
  # Gradient rules (SPEC 5): the memory and the maps carry none, frame 0's
  # features are constants, predictions fed forward carry none; the
  # cross-entropy reaches the current and previous frames' feature maps.
  config = test_config
  b, t, size = 2, 3, 32
  n = train.num_segments(config)
  model = train.make_model(config)
  state = train.init_state(config, model, train.make_optimizer(config, 1))
  raw = _batch(np.random.default_rng(1), b, size=size)
  prepared = train.prepare_superpixels(jax.tree.map(jnp.asarray, raw), config)
  out, _ = train._apply(
      model,
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(raw["frames"]),
      prepared,
      config,
      train=False,
      maps=True,
  )
  assert out["superfeatures"].shape[:3] == (b, t, n)
  out = {k: out[k] for k in ("superfeatures", "f1", "f4")}
  _, decoder_params = train.split_variables(state.params)
  _, decoder_stats = train.split_variables(state.batch_stats)

  def loss(out, params):
    ce, _, _ = train.tracker_loss(
        {"params": params, "batch_stats": decoder_stats},
        out,
        prepared,
        jnp.asarray(raw["labels"]),
        decoder=train.make_decoder(config),
        config=config,
    )
    return ce

  grads = jax.vmap(
      jax.grad(loss, argnums=(0, 1)),
      in_axes=None,
      axis_size=1,
      axis_name=train.AXIS,
  )(out, decoder_params)
  g_out, g_params = jax.tree.map(lambda x: np.asarray(x[0]), grads)
  norm = lambda x: float(np.abs(x).sum())
  assert norm(g_out["superfeatures"]) == 0.0  # Memory, maps: no gradient.
  assert norm(g_out["f1"][:, 0]) == 0.0 and norm(g_out["f4"][:, 0]) == 0.0
  for i in (1, 2):
    assert norm(g_out["f1"][:, i]) > 0 and norm(g_out["f4"][:, i]) > 0
  assert all(norm(g) > 0 for g in jax.tree.leaves(g_params["segmenter"]))


@pytest.mark.parametrize("stage", ["superfeatures", "decoder"])
def test_sample_pictures_show_each_stage(test_config, stage, tmp_path):
  test_config.train.stage = stage
  model = train.make_model(test_config)
  state = train.init_state(
      test_config, model, train.make_optimizer(test_config, 1)
  )
  raw = _batch(np.random.default_rng(2), 2, size=32)
  outputs = jax.device_get(
      jax.jit(
          functools.partial(
              train.sample_predictions, model=model, config=test_config
          )
      )(state.params, state.batch_stats, raw)
  )
  predicted, superpixels = outputs["predicted"], outputs["superpixels"]
  assert predicted.shape == superpixels.shape == raw["labels"].shape
  labels = raw["labels"]
  if stage == "superfeatures":
    # Whole superpixels take one frame-0 object id each.
    for b in range(2):
      for t in range(3):
        for s in np.unique(superpixels[b, t]):
          ids = np.unique(predicted[b, t][superpixels[b, t] == s])
          assert len(ids) == 1 and ids[0] in labels[b, 0]
  else:
    # The tracker starts from the given frame-0 mask.
    np.testing.assert_array_equal(predicted[:, 0], labels[:, 0])
  pictures, description = train.render_samples(raw, outputs, test_config)
  rows = 3 if stage == "superfeatures" else 2
  assert pictures.shape == (2, rows * 32 + 2 * (rows - 1), 3 * 32 + 4, 3)
  assert ("superpixels" in description) == (stage == "superfeatures")
  # The last row is the prediction over each frame, the one above the truth.
  top = (rows - 1) * 34
  for t in range(3):
    left = t * 34
    np.testing.assert_array_equal(
        pictures[1, top : top + 32, left : left + 32],
        visualize.overlay(raw["frames"][1, t], predicted[1, t]),
    )
    np.testing.assert_array_equal(
        pictures[1, top - 34 : top - 2, left : left + 32],
        visualize.overlay(raw["frames"][1, t], labels[1, t]),
    )
  # Through the metric writer into a TensorBoard event file and back.
  writer = train.MetricWriter(str(tmp_path))
  writer.write_images(7, {"val/samples": pictures}, description)
  writer.close()
  (events,) = tf.io.gfile.glob(str(tmp_path / "tensorboard" / "events.*"))
  (value,) = [
      (e.step, v)
      for e in tf.compat.v1.train.summary_iterator(events)
      for v in e.summary.value
  ]
  assert value[0] == 7 and value[1].tag == "val/samples"
  _, _, *pngs = tf.make_ndarray(value[1].tensor)
  for png, picture in zip(pngs, pictures, strict=True):
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), picture)
