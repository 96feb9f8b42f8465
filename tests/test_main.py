"""The README's first command, on the tiny test config: real entry point."""

import logging
import os
import subprocess
import sys

import imageio.v3 as iio

from shls_jax import input_pipeline
from shls_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_command(workdir):
  # The README's first command: mode "demo" builds the data, then trains.
  return [
      sys.executable,
      "-m",
      "shls_jax.main",
      f"--config={os.path.join(REPO, 'configs', 'test.py')}",
      "--config.mode=demo",
      f"--workdir={workdir}",
  ]


def test_main_builds_the_demo_dataset_and_trains(tmp_path):
  workdir = str(tmp_path / "work")
  result = subprocess.run(
      _demo_command(workdir),
      cwd=str(tmp_path),  # Not the repository: the installed package runs.
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "train:" in out and "validation:" in out
  assert "superpixel_valid: bool [8, 1, 3, 80]" in out  # 8 fake devices.
  assert "Trained to step 4;" in out
  for name in ("trained network", "untrained network", "mean colour"):
    assert name in out
  assert "nan" not in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  dataset_dir = os.path.join(workdir, "data", "shls_test", "1.0.0")
  info = input_pipeline.load_builder(dataset_dir).info
  train, val = info.splits["train"], info.splits["validation"]
  # Every bundled image gives 2 sequences; the split is by image.
  assert train.num_examples % 2 == 0 and val.num_examples % 2 == 0
  assert val.num_examples >= 4 and train.num_examples >= 16
  preview = iio.imread(os.path.join(workdir, "data", "demo_preview.png"))
  assert preview.shape[1] == 3 * 3 * 64 and preview.std() > 10
  # A second run reuses everything and prints the same summary.
  again = subprocess.run(
      _demo_command(workdir),
      cwd=str(tmp_path),
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      check=True,
  )
  assert again.stdout.splitlines()[:3] == out.splitlines()[:3]
  # ... and the finished training reports the same scores, floors included.
  report = lambda text: text[text.index("Trained to step") :]
  assert report(again.stdout) == report(out)


def test_library_info_is_kept_off_the_console():
  quiet = main._QuietLibraries()

  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", (), None)

  orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
  ours = os.path.join(os.sep, "repo", "shls_jax", "train.py")
  assert not quiet.filter(record(orbax, logging.INFO))
  assert quiet.filter(record(orbax, logging.WARNING))
  assert quiet.filter(record(ours, logging.INFO))
