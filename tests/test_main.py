"""The README's first command, on the tiny test config: real entry point."""

import logging
import os
import subprocess
import sys

import imageio.v3 as iio

import flax
import jax
import numpy as np
import pytest

from shls_jax import input_pipeline
from shls_jax import main
from shls_jax import train
from tests.conftest import load_config

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


def _weights(run, config):
  """The parameters of a run's newest checkpoint, whatever its stage."""
  mesh = train.make_mesh()
  model = train.make_model(config)
  state = train.create_state(
      config, model, train.make_optimizer(config, 1), mesh
  )
  return jax.tree.map(
      np.asarray, train.load_weights(config, state, run, mesh).params
  )


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
  stage1 = os.path.join(workdir, "stage1", "checkpoints")
  assert sorted(os.listdir(stage1)) == ["2", "4"]
  # Stage 2 (decoder) started from stage 1's weights and moved only the
  # decoder.
  assert "Stage 2 (decoder, + cross-entropy): step 2" in out
  config = load_config("test")
  first, second = (
      _weights(os.path.join(workdir, stage), config)
      for stage in ("stage1", "stage2")
  )
  for path, value in flax.traverse_util.flatten_dict(first).items():
    new = flax.traverse_util.flatten_dict(second)[path]
    if train.param_group(path) == "superfeatures":
      np.testing.assert_array_equal(new, value, err_msg=str(path))
  assert not np.array_equal(
      first["segmenter"]["pred"]["kernel"],
      second["segmenter"]["pred"]["kernel"],
  )
  # J&F of the demo videos next to the two floors, and the official CSVs.
  for name in (
      "trained (both stages)",
      "untrained network",
      "copy the first mask",
  ):
    row = next(l for l in out.splitlines() if l.startswith(name))
    assert len(row.split()) >= 5 and "-" not in row.split()[-1]
  results = os.path.join(workdir, "eval", "trained")
  assert sorted(os.listdir(results)) == [
      "global_results-val.csv",
      "masks",
      "per-sequence_results-val.csv",
      "visuals",
  ]
  videos = os.listdir(os.path.join(results, "masks"))
  assert len(videos) >= 2
  frames = sorted(os.listdir(os.path.join(results, "masks", videos[0])))
  assert frames == [f"{t:05d}.png" for t in range(5)]
  # Ground truth | prediction per video, a J&F bar chart, J curves.
  visuals = os.path.join(results, "visuals")
  assert sorted(os.listdir(os.path.join(visuals, "side_by_side"))) == sorted(
      f"{v}.{ext}" for v in videos for ext in ("gif", "mp4")
  )
  gif = iio.imread(
      os.path.join(visuals, "side_by_side", f"{videos[0]}.gif"), index=None
  )
  assert gif.shape[:3] == (5, 64, 2 * 64 + 4)
  assert sorted(os.listdir(os.path.join(visuals, "j_per_frame"))) == sorted(
      f"{v}.png" for v in videos
  )
  chart = iio.imread(os.path.join(visuals, "jf_per_sequence-val.png"))
  assert chart.shape[0] >= 300 and chart[..., :3].std() > 10
  assert "Ground truth | prediction videos and J&F charts" in out
  dataset_dir = os.path.join(workdir, "data", "shls_test", "1.0.0")
  info = input_pipeline.load_builder(dataset_dir).info
  train_split, val = info.splits["train"], info.splits["validation"]
  # Every bundled image gives 2 sequences; the split is by image.
  assert train_split.num_examples % 2 == 0 and val.num_examples % 2 == 0
  assert val.num_examples >= 4 and train_split.num_examples >= 16
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
  report = lambda text: text[
      text.index("Trained to step") : text.index("Tracking:")
  ]
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


def _run(args, tmp_path):
  return subprocess.run(
      [sys.executable, "-m", "shls_jax.main", *args],
      cwd=str(tmp_path),
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      check=False,
  )


def _own_video(folder, num_frames=6, size=(40, 56)):
  """A folder of frames with a moving square, and its first-frame mask."""
  os.makedirs(folder)
  yy, xx = np.mgrid[: size[0], : size[1]]
  for t in range(num_frames):
    image = np.stack([xx * 4, yy * 4, np.full_like(xx, 90)], -1)
    image[8:20, 5 + 3 * t : 17 + 3 * t] = (240, 40, 40)
    iio.imwrite(os.path.join(folder, f"{t:03d}.png"), image.astype(np.uint8))
  mask = np.zeros(size, np.uint8)
  mask[8:20, 5:17] = 1
  return mask


def test_segment_mode_on_an_own_video(tmp_path):
  from data_prep import video_sources  # pylint: disable=g-import-not-at-top

  frames_dir = str(tmp_path / "clip")
  mask = _own_video(frames_dir)
  mask_path = str(tmp_path / "mask.png")
  video_sources.write_palette_mask(mask_path, mask)
  workdir = str(tmp_path / "work")
  common = [
      f"--config={os.path.join(REPO, 'configs', 'test.py')}",
      "--config.mode=segment",
      "--config.eval_data.source=video",
      f"--config.eval_data.path={frames_dir}",
      "--config.eval.checkpoint=untrained",
      f"--workdir={workdir}",
  ]
  result = _run(common + [f"--config.eval_data.mask={mask_path}"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out_dir = os.path.join(workdir, "segment", "video_clip")
  assert "Segmented 6 frames" in result.stdout
  assert "object 1:" in result.stdout
  masks = sorted(os.listdir(os.path.join(out_dir, "masks", "clip")))
  assert masks == [f"{t:03d}.png" for t in range(6)]
  first = video_sources.read_palette_mask(
      os.path.join(out_dir, "masks", "clip", "000.png")
  )
  np.testing.assert_array_equal(first, mask)
  import av  # pylint: disable=g-import-not-at-top

  with av.open(os.path.join(out_dir, "overlay.mp4")) as container:
    decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  assert len(decoded) == 6 and decoded[0].shape == (40, 56, 3)
  gif = iio.imread(os.path.join(out_dir, "preview.gif"), index=None)
  assert gif.shape[:3] == (6, 40, 56)
  # A mask of another size than the frames: a clear error, nothing written.
  bad = str(tmp_path / "bad.png")
  video_sources.write_palette_mask(bad, np.pad(mask, 1))
  result = _run(
      common
      + [f"--config.eval_data.mask={bad}", f"--workdir={tmp_path / 'w2'}"],
      tmp_path,
  )
  assert result.returncode != 0
  assert "bad.png: is 58x42 px (width x height)" in result.stderr
  assert "Traceback" not in result.stderr  # A user error, not a crash.
  assert "is 56x40 px" in result.stderr
  assert not os.path.exists(tmp_path / "w2" / "segment")


def test_evaluate_mode_needs_prepared_videos(tmp_path):
  result = _run(
      [
          f"--config={os.path.join(REPO, 'configs', 'test.py')}",
          "--config.mode=evaluate",
          "--config.eval.checkpoint=untrained",
          f"--config.data_dir={tmp_path / 'nothing'}",
          f"--workdir={tmp_path / 'work'}",
      ],
      tmp_path,
  )
  assert result.returncode != 0
  assert "No prepared evaluation videos" in result.stderr
  assert "data_prep.videos" in result.stderr
