r"""Entry point: python -m shls_jax.main --config=configs/demo.py --workdir=DIR.

Modes (`config.mode`):
  train         train on the prepared still-image sequences in
                config.data_dir (stage from config.train.stage), resuming
                from <workdir>/checkpoints when there are any.
  recipe        the stages of config.recipe in turn (e.g. stage 1 then
                stage 2, configs/real.py), each in <workdir>/<i>_<stage>
                starting from the previous one's weights, then evaluate
                the last one on config.eval_data.
  evaluate      segment the prepared evaluation videos of config.eval_data
                (data_prep.videos) with the checkpoint config.eval.checkpoint
                (default: <workdir>'s), write palette PNGs and the official
                DAVIS CSVs to <workdir>/eval/<dataset>-<split>/, print J&F.
  segment       your own video: config.eval_data.path (a video file or a
                folder of frames) and config.eval_data.mask (the first
                frame's mask PNG) -> palette masks, overlay.mp4 and
                preview.gif in <workdir>/segment/<name>/.
  demo          the embedded default: build the demo data (still images
                bundled with scikit-image -> synthetic sequences and held-out
                demo videos) in <workdir>/data, train stage 1 then stage 2,
                and evaluate on the demo videos against two floors.
  prepare_demo  only build the demo dataset, read one batch back and
                describe it.

Multi-host: every process runs the same command; jax.distributed is
initialised when config.distributed.initialize is set or the environment
names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from data_prep.image_io import InputError

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

  logging.info(
      "process %d of %d, %d local devices of %d: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices(),
  )
  if config.mode in ("train", "recipe", "demo", "evaluate", "segment") and (
      not workdir
  ):
    raise app.UsageError(f"config.mode={config.mode!r} needs --workdir.")
  try:
    _run_mode(config, workdir)
  except (InputError, FileNotFoundError) as e:
    # Bad input or a missing prepared dataset: the message names the file
    # and the fix; a traceback would only bury it.
    logging.error("%s", e)
    sys.exit(f"Error: {e}")


def _run_mode(config, workdir) -> None:
  # pylint: disable=g-import-not-at-top
  from shls_jax import prepare_demo
  from shls_jax import runs

  # pylint: enable=g-import-not-at-top
  if config.mode == "prepare_demo":
    print(prepare_demo.run(config, resolve_data_dir(config, workdir)))
  elif config.mode == "demo":
    data_dir = resolve_data_dir(config, workdir)
    print(prepare_demo.run(config, data_dir))
    print(runs.demo(config, workdir, data_dir))
  elif config.mode == "evaluate":
    print(runs.evaluate(config, workdir, resolve_data_dir(config, workdir)))
  elif config.mode == "segment":
    print(runs.segment(config, workdir, resolve_data_dir(config, workdir)))
  elif config.mode == "recipe":
    print(runs.recipe(config, workdir, resolve_data_dir(config, workdir)))
  elif config.mode == "train":
    data_dir = resolve_data_dir(config, workdir)
    summary = runs.train_stage(config, workdir, data_dir)
    print(runs.report(summary, workdir))
  else:
    raise app.UsageError(
        f"config.mode={config.mode!r} is not a mode; valid: train, recipe,"
        " evaluate, segment, demo, prepare_demo."
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
