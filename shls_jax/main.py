r"""Entry point: python -m shls_jax.main --config=configs/demo.py --workdir=DIR.

Modes (`config.mode`):
  prepare_demo  build the embedded demo dataset (still images bundled with
                scikit-image -> synthetic sequences) in <workdir>/data, read
                one batch back through the input pipeline and describe it.
Training and evaluation modes arrive with the model (see the README).
"""

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help is fast and TensorFlow sees no accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
  import jax  # pylint: disable=g-import-not-at-top

  from shls_jax import prepare_demo  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value
  logging.info(
      "process %d of %d, %d local devices of %d: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices(),
  )
  if config.mode == "prepare_demo":
    print(prepare_demo.run(config, resolve_data_dir(config, workdir)))
  else:
    raise app.UsageError(
        f"config.mode={config.mode!r} is not available yet; valid:"
        " prepare_demo."
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
