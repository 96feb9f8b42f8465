"""The shared command line of the data_prep commands: --config, overrides."""

from typing import Callable

from absl import app
from ml_collections import config_flags

from data_prep import writer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/davis.py.", lock_config=True
)


def run(prepare: Callable[..., str]) -> None:
  """Runs `prepare(config, data_dir)` as a command and prints the summary."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not config.data_dir:
      raise app.UsageError(
          "Set --config.data_dir to the folder that receives the datasets."
      )
    print(writer.summarize(prepare(config, config.data_dir)))

  app.run(main)
