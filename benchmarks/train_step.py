r"""Speed and memory of the stage-1 training step on one device.

  python benchmarks/train_step.py            # writes a section to RESULTS.md
  python benchmarks/train_step.py --quick    # fewer steps, no writing
  python benchmarks/train_step.py --per_device_batch=32

Runs the real step (`train.make_train_step`: shard_map over a mesh, state
donated) on a one-device mesh of the first device, in the paper setting of
configs/davis.py: the paper model, 256 x 256 frames, 3 frames per sequence,
N = max_superpixels 400 + 128 split room = 528 superpixel slots per frame.
The per-device batch defaults to 4 on CPU and to config.batch_size (32, the
paper's one-GPU batch) elsewhere. Figures are per device.

Inputs are synthetic, built here: random uint8 frames; superpixel maps of
about 300 compact segments (Voronoi cells of a jittered 17 x 17 grid of
seeds that drift from frame to frame, as SLIC 300 gives), consecutive ids;
label maps with 3-4 moving elliptic objects on a background. The step does
the frame-0 split at object borders, the network, NT-Xent and Adam.

Reports the trace + lower and XLA compile times (separately from the first
run), the first run, the steady-state step (median of several after warm-up,
each ended by block_until_ready; the batch stays on the device, so no
host-to-device copy is timed) as sequences per second, and memory: the
compiled executable's memory analysis, the device's peak bytes in use where
the backend keeps statistics (GPU, TPU; not CPU) and the process peak RSS.
"""

import argparse
import os
import platform
import resource
import runpy
import shlex
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import scipy.spatial  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = 17  # Seeds per side: 289 superpixels per frame, like SLIC 300.


def _config():
  path = os.path.join(REPO, "configs", "davis.py")
  return runpy.run_path(path)["get_config"]()


# --------------------------------------------------------------------------
# Synthetic sequences.


def _superpixels(rng, t, size):
  """Voronoi cells of drifting jittered grid seeds, ids 0..n-1 per frame."""
  cell = size / GRID
  centres = (np.arange(GRID) + 0.5) * cell
  seeds = np.stack(np.meshgrid(centres, centres, indexing="ij"), -1)
  seeds = seeds.reshape(-1, 2) + rng.uniform(-0.35, 0.35, (GRID**2, 2)) * cell
  yx = np.stack(np.mgrid[:size, :size], -1).reshape(-1, 2)
  maps, counts = [], []
  for _ in range(t):
    _, nearest = scipy.spatial.cKDTree(seeds).query(yx)
    _, ids = np.unique(nearest, return_inverse=True)
    maps.append(ids.reshape(size, size))
    counts.append(ids.max() + 1)
    seeds = seeds + rng.normal(0.0, 0.15 * cell, seeds.shape)
  return np.stack(maps).astype(np.int32), np.array(counts, np.int32)


def _labels(rng, t, size):
  """3-4 moving ellipses (ids 1..k, later ones in front) on background 0."""
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  maps = np.zeros((t, size, size), np.int32)
  for obj in range(1, 1 + rng.integers(3, 5)):
    centre = rng.uniform(0.2, 0.8, 2) * size
    axes = rng.uniform(0.08, 0.25, 2) * size
    velocity = rng.normal(0.0, 0.02 * size, 2)
    for f in range(t):
      cy, cx = centre + f * velocity
      inside = ((yy - cy) / axes[0]) ** 2 + ((xx - cx) / axes[1]) ** 2 <= 1
      maps[f][inside] = obj
  return maps


def make_batch(rng, batch, t, size):
  """One device's batch, as `train.train_step` reads it (host arrays)."""
  superpixels, counts = zip(*(_superpixels(rng, t, size) for _ in range(batch)))
  return {
      "frames": rng.integers(0, 256, (batch, t, size, size, 3), np.uint8),
      "labels": np.stack([_labels(rng, t, size) for _ in range(batch)]),
      "superpixels": np.stack(superpixels),
      "num_superpixels": np.stack(counts),
  }


# --------------------------------------------------------------------------
# Measurement.


def _peak_rss_bytes():
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux.


def _gib(n):
  return f"{n / 2**30:.2f} GiB"


def measure(config, per_device_batch, warmup, steps):
  """Times and memory of the step; see the module docstring."""
  device = jax.devices()[0]
  mesh = train.make_mesh([device])
  size, t = config.prep.image_size, config.prep.seq_len
  rng = np.random.default_rng(0)
  host = make_batch(rng, per_device_batch, t, size)
  sharding = jax.sharding.NamedSharding(mesh, train.P(train.AXIS))
  batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
  model = train.make_model(config)
  tx = train.make_optimizer(config, num_replicas=1)
  state = train.create_state(config, model, tx, mesh)
  jax.block_until_ready((state, batch))
  rss_before = _peak_rss_bytes()

  step = train.make_train_step(model, tx, config, mesh)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(state, batch))
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = jax.block_until_ready(compiled(state, batch))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  metrics = jax.tree.map(float, jax.device_get(metrics))
  if not np.isfinite(metrics["loss"]):
    raise FloatingPointError(f"The loss is {metrics['loss']}.")

  analysis = compiled.memory_analysis()
  stats = device.memory_stats()
  return {
      "device": device,
      "per_device_batch": per_device_batch,
      "superpixels": (
          int(host["num_superpixels"].min()),
          int(host["num_superpixels"].max()),
      ),
      "objects": (
          int(host["labels"].max(axis=(1, 2, 3)).min()),
          int(host["labels"].max(axis=(1, 2, 3)).max()),
      ),
      "lower_s": lower_s,
      "compile_s": compile_s,
      "first_s": first_s,
      "times": times,
      "metrics": metrics,
      "analysis": analysis,
      "peak_bytes_in_use": (
          stats.get("peak_bytes_in_use") if stats is not None else None
      ),
      "rss_before": rss_before,
      "rss_peak": _peak_rss_bytes(),
  }


def report(r, config, command):
  """The RESULTS.md section of a `measure` result."""
  device = r["device"]
  b = r["per_device_batch"]
  median = statistics.median(r["times"])
  n = train.num_segments(config)
  lo, hi = r["superpixels"]
  kind = (
      f" ({device.device_kind})"
      if device.device_kind.lower() != device.platform
      else ""
  )
  machine = (
      f"{results.machine_description()}, jax {jax.__version__},"
      f" {device.platform}{kind}, 1 of {jax.device_count()} devices"
  )
  rows = [
      (
          "setting",
          (
              f"paper model, {config.prep.image_size}x{config.prep.image_size},"
              f" T={config.prep.seq_len}, N={n} ({lo}-{hi} superpixels per"
              f" frame + split room), {r['objects'][0]}-{r['objects'][1]}"
              f" objects, per-device batch {b}"
          ),
      ),
      ("trace + lower", f"{r['lower_s']:.2f} s"),
      ("XLA compile", f"{r['compile_s']:.2f} s"),
      ("first run (after compile)", f"{r['first_s']:.3f} s"),
      (
          f"step, median of {len(r['times'])}",
          (
              f"{median:.3f} s (min {min(r['times']):.3f}, max"
              f" {max(r['times']):.3f})"
          ),
      ),
      ("throughput", f"{b / median:.2f} sequences/s per device"),
  ]
  a = r["analysis"]
  if a is not None:
    total = (
        a.temp_size_in_bytes + a.argument_size_in_bytes + a.output_size_in_bytes
    )
    rows.append((
        "compiled memory analysis",
        (
            f"temp {_gib(a.temp_size_in_bytes)} + arguments"
            f" {_gib(a.argument_size_in_bytes)} + outputs"
            f" {_gib(a.output_size_in_bytes)} = {_gib(total)} (outputs aliasing"
            f" donated arguments: {_gib(a.alias_size_in_bytes)})"
        ),
    ))
  if r["peak_bytes_in_use"] is not None:
    rows.append(("device peak bytes in use", _gib(r["peak_bytes_in_use"])))
  rows.append((
      "process peak RSS",
      (
          f"{_gib(r['rss_peak'])} ({_gib(r['rss_before'])} before the step was"
          " compiled)"
      ),
  ))
  m = r["metrics"]
  rows.append((
      "last step",
      (
          f"loss {m['loss']:.3f}, {m['positive_pairs']:.0f} positive pairs,"
          f" split overflow {m['split_overflow']:.0f}"
      ),
  ))
  lines = results.table_section("Training step", command, machine, rows)
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
      "--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  parser.add_argument(
      "--per_device_batch",
      type=int,
      default=0,
      help="sequences per device; 0 = 4 on CPU, config.batch_size elsewhere",
  )
  args = parser.parse_args()
  # TensorFlow (imported by the input pipeline) must not take the GPU.
  tf.config.set_visible_devices([], "GPU")
  config = _config()
  per_device_batch = args.per_device_batch or (
      4 if jax.devices()[0].platform == "cpu" else config.batch_size
  )
  r = measure(
      config,
      per_device_batch,
      warmup=1 if args.quick else 2,
      steps=3 if args.quick else 10,
  )
  command = shlex.join(["python", "benchmarks/train_step.py"] + sys.argv[1:])
  text = report(r, config, command)
  print(text)
  if not args.quick:
    results.prepend_section(args.out, text)


if __name__ == "__main__":
  main()
