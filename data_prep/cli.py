"""The shared command line of the data_prep commands: --config, overrides."""

import json
import os
from typing import Callable

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/davis.py.", lock_config=True
)


def summarize(dataset_dir: str) -> str:
  """A few lines about a prepared dataset: splits, examples, shards, size."""
  with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
    info = json.load(f)
  lines = [f"{dataset_dir}:"]
  for split in info.get("splits", []):
    lengths = [int(n) for n in split.get("shardLengths", [])]
    size = int(split.get("numBytes", 0)) / 2**20
    lines.append(
        f"  {split['name']}: {sum(lengths)} examples in {len(lengths)} shards,"
        f" {size:.1f} MiB"
    )
  return "\n".join(lines)


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
    print(summarize(prepare(config, config.data_dir)))

  app.run(main)
