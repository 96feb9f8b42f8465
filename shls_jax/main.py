r"""Entry point: python -m shls_jax.main --config=configs/demo.py --workdir=DIR.

Modes (`config.mode`):
  train         train on the prepared still-image sequences in
                config.data_dir (stage from config.train.stage), resuming
                from <workdir>/checkpoints when there are any.
  demo          the embedded default: build the demo dataset (still images
                bundled with scikit-image -> synthetic sequences) in
                <workdir>/data, then train on it.
  prepare_demo  only build the demo dataset, read one batch back and
                describe it.

Multi-host: every process runs the same command; jax.distributed is
initialised when config.distributed.initialize is set or the environment
names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs are written.")


def resolve_data_dir(config, workdir: str) -> str:
  """config.data_dir, or <workdir>/data when it is empty."""
  if config.data_dir:
    return config.data_dir
  if not workdir:
    raise app.UsageError("Set --workdir or --config.data_dir.")
  return os.path.join(workdir, "data")


class _QuietLibraries(std_logging.Filter):
  """Keeps INFO chatter of orbax and TFDS off the console (warnings stay)."""

  _SOURCES = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        source in record.pathname for source in self._SOURCES
    )


def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize when the config or the environment asks."""
  cfg = config.distributed
  env_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not (cfg.initialize or env_address):
    return
  import jax  # pylint: disable=g-import-not-at-top

  kwargs = {}
  address = cfg.coordinator_address or env_address
  if address:
    kwargs["coordinator_address"] = address
  num_processes = cfg.num_processes or int(
      os.environ.get("JAX_NUM_PROCESSES", "0")
  )
  if num_processes:
    kwargs["num_processes"] = num_processes
  process_id = cfg.process_id
  if process_id < 0 and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if process_id >= 0:
    kwargs["process_id"] = process_id
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help is fast and TensorFlow sees no accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  workdir = _WORKDIR.value
  maybe_initialize_distributed(config)
  import jax  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from shls_jax import prepare_demo
  from shls_jax import train

  # pylint: enable=g-import-not-at-top
  logging.info(
      "process %d of %d, %d local devices of %d: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices(),
  )
  if config.mode in ("train", "demo") and not workdir:
    raise app.UsageError(f"config.mode={config.mode!r} needs --workdir.")
  if config.mode == "prepare_demo":
    print(prepare_demo.run(config, resolve_data_dir(config, workdir)))
  elif config.mode == "demo":
    data_dir = resolve_data_dir(config, workdir)
    print(prepare_demo.run(config, data_dir))
    print(report(train.train_and_evaluate(config, workdir, data_dir), workdir))
  elif config.mode == "train":
    data_dir = resolve_data_dir(config, workdir)
    print(report(train.train_and_evaluate(config, workdir, data_dir), workdir))
  else:
    raise app.UsageError(
        f"config.mode={config.mode!r} is not a mode; valid: train, demo,"
        " prepare_demo."
    )


def report(summary: dict, workdir: str) -> str:
  """The console summary of a training run."""
  lines = [
      (
          f"Trained to step {summary['step']}; loss {summary['loss']:.4f} (mean"
          " of the last logging interval)."
      ),
      (
          "Validation, frame-0 label transfer by nearest superfeature, mean"
          f" IoU over {summary.get('val_objects', 0)} objects:"
      ),
      f"  trained network   {summary.get('val_iou', float('nan')):.4f}",
  ]
  if "val_iou_untrained" in summary:
    lines += [
        f"  untrained network {summary['val_iou_untrained']:.4f}",
        f"  mean colour       {summary['val_iou_mean_colour']:.4f}",
    ]
  lines.append(
      f"Checkpoints, TensorBoard events and metrics.jsonl in {workdir}."
  )
  return "\n".join(lines)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
