"""Tests of the checkpoints: round trip, rotation and the resume order."""

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shls_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A restore that fails on damaged files leaves orbax's other read coroutines
# pending; Python reports each (with a TensorStore spec) when it is collected.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def collect_orbax_leftovers():
  yield
  gc.collect()  # Within the test, where the mark above silences them.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


@pytest.fixture(scope="module")
def replicated():
  mesh = jax.make_mesh(
      (8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def make_state(seed, sharding, step=0, extra=None, wide=64):
  """A TrainState-like tree with random values, placed with `sharding`.

  The 64x64 kernel makes the array files big enough that orbax keeps them
  out of its index file, so damaging a data file is a real loss.
  """
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {
      "backbone": {
          "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 8))},
          "bias": jax.random.normal(keys[1], (8,)).astype(jnp.bfloat16),
      },
      "head": {"kernel": jax.random.normal(keys[2], (wide, 64))},
  }
  if extra:
    params["head"][extra] = jnp.zeros((5,))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = tx.init(params)
  # Non-zero moments and count so that a restore of the template shows.
  _, opt_state = tx.update(params, opt_state, params)
  state = TrainState(
      step=jnp.int32(step),
      params=params,
      batch_stats={"bn": {"mean": jax.random.normal(keys[3], (8,))}},
      opt_state=opt_state,
  )
  return jax.device_put(state, sharding)


def assert_bit_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape
    assert a.tobytes() == e.tobytes()


def save_steps(directory, sharding, steps, **kwargs):
  """Saves make_state(seed=step) for each step and waits for the writes."""
  with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, make_state(step, sharding, step))


def step_files(directory, step):
  root = os.path.join(directory, str(step))
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def delete_largest_file(directory, step):
  os.remove(max(step_files(directory, step), key=os.path.getsize))


def truncate_largest_file(directory, step):
  path = max(step_files(directory, step), key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def corrupt_tree_metadata(directory, step):
  (path,) = [
      p
      for p in step_files(directory, step)
      if os.path.basename(p) == "_METADATA"
  ]
  with open(path, "w") as f:
    f.write('{"tree_metadata": {"step": ')


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARN]


# ------------------------------------------------------------------ round trip


def test_round_trip_is_bit_exact_with_dtypes_and_shardings(
    tmp_path, replicated
):
  state = make_state(0, replicated, step=7)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(7, state)

  template = make_state(1, replicated)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(template)
  assert step == 7
  assert isinstance(restored, TrainState)
  assert_bit_equal(restored, state)
  assert restored.step.dtype == jnp.int32
  assert restored.params["backbone"]["bias"].dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == replicated


def test_restore_places_arrays_like_the_template(tmp_path, replicated):
  state = make_state(0, replicated)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[5])
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(make_state(1, one_device))
  assert step == 3
  assert_bit_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == one_device


def test_state_may_be_deleted_as_soon_as_save_returns(tmp_path, replicated):
  state = make_state(0, replicated)
  expected = jax.tree.map(np.asarray, state)
  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(4, state)
    # What a train step with donated buffers does right after the save.
    for leaf in jax.tree.leaves(state):
      leaf.delete()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(make_state(1, replicated))
  assert step == 4
  assert_bit_equal(jax.tree.map(np.asarray, restored), expected)


# ---------------------------------------------------------------- bookkeeping


def test_max_to_keep_keeps_the_newest_steps(tmp_path, replicated):
  save_steps(tmp_path, replicated, [1, 2, 3, 4, 5], max_to_keep=3)
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    assert ckpt.all_steps() == [3, 4, 5]
    assert ckpt.latest_step() == 5
  assert sorted(os.listdir(tmp_path)) == ["3", "4", "5"]


def test_saving_an_existing_or_older_step_changes_nothing(tmp_path, replicated):
  first = make_state(0, replicated)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(2, first)
    assert not ckpt.save(2, make_state(1, replicated), force=True)
    ckpt.wait()
    assert not ckpt.save(jnp.int32(2), make_state(1, replicated))
    assert not ckpt.save(1, make_state(1, replicated))
    assert ckpt.all_steps() == [2]
    assert ckpt.save(1, make_state(1, replicated), force=True)
    assert ckpt.all_steps() == [1, 2]
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(make_state(3, replicated))
  assert step == 2
  assert_bit_equal(restored, first)


def test_nothing_saved_gives_the_template_and_no_step(
    tmp_path, replicated, caplog
):
  template = make_state(0, replicated)
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
    state, step = ckpt.restore_latest(template)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
  assert state is template and step is None
  assert not warnings_of(caplog)


# ---------------------------------------------------------------- resume order


@pytest.mark.parametrize(
    "damage",
    [delete_largest_file, truncate_largest_file, corrupt_tree_metadata],
)
def test_damaged_newest_falls_back_to_the_previous_step(
    tmp_path, replicated, caplog, damage
):
  save_steps(tmp_path, replicated, [1, 2, 3])
  damage(tmp_path, 3)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(make_state(9, replicated))
    assert ckpt.all_steps() == [1, 2]
  assert step == 2
  assert_bit_equal(restored, make_state(2, replicated, 2))
  (warning,) = warnings_of(caplog)
  # The step, the innermost error (not TensorStore's wrapper) and the new path.
  assert re.search(r"step 3 .* is damaged \(\w*Error: [^<]+\); moving", warning)
  assert "3.damaged-1" in warning
  # Kept for inspection, out of orbax's way.
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged-1"]
  assert step_files(tmp_path, "3.damaged-1")


def test_all_damaged_starts_fresh_with_a_warning(tmp_path, replicated, caplog):
  save_steps(tmp_path, replicated, [1, 2])
  truncate_largest_file(tmp_path, 2)
  corrupt_tree_metadata(tmp_path, 1)
  template = make_state(9, replicated)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    state, step = ckpt.restore_latest(template)
    assert ckpt.all_steps() == []
  assert state is template and step is None
  warnings = warnings_of(caplog)
  assert any("step 2" in w and "damaged" in w for w in warnings)
  assert any("step 1" in w and "damaged" in w for w in warnings)
  assert "starting fresh" in warnings[-1]
  assert sorted(os.listdir(tmp_path)) == ["1.damaged-1", "2.damaged-1"]


def test_saving_over_a_damaged_step_works(tmp_path, replicated):
  save_steps(tmp_path, replicated, [1, 2])
  for n in (1, 2):
    truncate_largest_file(tmp_path, 2)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
      _, step = ckpt.restore_latest(make_state(9, replicated))
      assert step == 1
      assert ckpt.save(2, make_state(20 + n, replicated))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
      restored, step = ckpt.restore_latest(make_state(9, replicated))
    assert step == 2
    assert_bit_equal(restored, make_state(20 + n, replicated))
  assert sorted(os.listdir(tmp_path)) == [
      "1",
      "2",
      "2.damaged-1",
      "2.damaged-2",
  ]


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from shls_jax import checkpoint

    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.full((64, 64), 1.0)})
    ckpt.wait()
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
      # SIGKILL at the commit: everything written, step not renamed yet.
      if os.path.basename(os.fspath(dst)) == "2":
        os.kill(os.getpid(), signal.SIGKILL)
      return real_rename(src, dst, *args, **kwargs)

    os.rename = rename
    ckpt.save(2, {"w": jnp.full((64, 64), 2.0)})
    ckpt.wait()
    print("finished without being killed")
""")


def test_a_save_killed_before_its_commit_is_ignored_then_replaced(
    tmp_path, caplog
):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  child = subprocess.run(
      [sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
  leftovers = [name for name in os.listdir(tmp_path) if name != "1"]
  assert len(leftovers) == 1 and leftovers[0].startswith("2.")

  template = {"w": jnp.zeros((64, 64))}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, step = ckpt.restore_latest(template)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], 1.0)
    (warning,) = warnings_of(caplog)
    assert leftovers[0] in warning and "never finished" in warning
    # The same step saved again replaces the unfinished directory.
    assert ckpt.save(2, {"w": jnp.full((64, 64), 3.0)})
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore_latest(template)
  assert step == 2
  np.testing.assert_array_equal(restored["w"], 3.0)


@pytest.mark.parametrize(
    "saved_kwargs, message",
    [
        ({"extra": "scale"}, "only in the checkpoint (3):\n    opt_state/1/0"),
        ({}, None),
        ({"wide": 32}, "params/head/kernel: checkpoint float32[32, 64], this"),
    ],
    ids=["extra key saved", "key not saved", "other shape saved"],
)
def test_structure_mismatch_is_an_error_not_damage(
    tmp_path, replicated, saved_kwargs, message
):
  # Step 1 fits the template; the newer step 2 was written by another config.
  template_kwargs = {} if saved_kwargs else {"extra": "offset"}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(1, replicated, **template_kwargs))
    ckpt.save(2, make_state(2, replicated, **saved_kwargs))
  template = make_state(9, replicated, **template_kwargs)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.StructureMismatchError) as error:
      ckpt.restore_latest(template)
    assert ckpt.all_steps() == [1, 2]
  text = str(error.value)
  assert f"{tmp_path / '2'} does not fit" in text
  assert "--workdir" in text and "left untouched" in text
  if message:
    assert message in text
  else:
    assert "only in this run (3):" in text and "params/head/offset" in text
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_failing_machine_is_not_taken_for_damage(
    tmp_path, replicated, monkeypatch
):
  save_steps(tmp_path, replicated, [1, 2])

  def out_of_memory(*args, **kwargs):
    # Wrapped the way orbax wraps TensorStore's errors.
    try:
      raise ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 1.0GiB")
    except ValueError as e:
      raise Exception("Encountered error while reading array index") from e

  with checkpoint.Checkpointer(tmp_path) as ckpt:
    monkeypatch.setattr(ckpt._manager, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="step 2 .* outside the checkpoint"):
      ckpt.restore_latest(make_state(9, replicated))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


_PROCESS = textwrap.dedent("""
    import json, os, sys, time
    import jax
    jax.distributed.initialize(
        coordinator_address=os.environ["COORDINATOR"],
        num_processes=2,
        process_id=int(os.environ["PROCESS_ID"]),
    )
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from shls_jax import checkpoint

    directory, results = sys.argv[1], sys.argv[2]
    mesh = jax.make_mesh(
        (4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def state(value):
      return jax.device_put({"w": jnp.full((64, 64), float(value))}, replicated)

    if jax.process_index() == 1:
      # A slow host: process 0 reaches the rename of a damaged step first.
      agree = checkpoint._on_every_process
      def late(ok):
        checkpoint._on_every_process = agree
        result = agree(ok)
        time.sleep(1.0)
        return result
      checkpoint._on_every_process = late

    def restore():
      with checkpoint.Checkpointer(directory) as ckpt:
        restored, step = ckpt.restore_latest(state(0))
      return step, float(restored["w"].addressable_data(0)[0, 0])

    with checkpoint.Checkpointer(directory) as ckpt:
      ckpt.save(1, state(1))
      ckpt.save(2, state(2))
    if jax.process_index() == 0:
      files = [os.path.join(d, f)
               for d, _, names in os.walk(os.path.join(directory, "2"))
               for f in names]
      largest = max(files, key=os.path.getsize)
      os.truncate(largest, os.path.getsize(largest) // 2)
    multihost_utils.sync_global_devices("damaged")
    fallback = restore()
    listed = sorted(os.listdir(directory))
    with checkpoint.Checkpointer(directory) as ckpt:
      ckpt.save(2, state(5))
    with open(os.path.join(results, f"{jax.process_index()}.json"), "w") as f:
      json.dump({"fallback": fallback, "listed": listed, "again": restore()}, f)
""")


def test_two_processes_agree_on_the_fallback(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  directory = tmp_path / "checkpoints"
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _PROCESS, str(directory), str(tmp_path)],
          env=dict(
              os.environ,
              PYTHONPATH=REPO,
              COORDINATOR=f"localhost:{port}",
              PROCESS_ID=str(index),
              XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu",
          ),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
      )
      for index in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  for index in range(2):
    with open(tmp_path / f"{index}.json") as f:
      result = json.load(f)
    assert result == {
        "fallback": [1, 1.0],
        "listed": ["1", "2.damaged-1"],
        "again": [2, 5.0],
    }
