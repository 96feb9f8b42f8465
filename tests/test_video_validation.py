"""J&F on held-out videos while training (inference.VideoValidation)."""

import json
import os

import numpy as np
import pytest

from data_prep import demo
from data_prep import videos
from shls_jax import evaluate as evaluate_lib
from shls_jax import inference
from shls_jax import runs
from shls_jax import train
from tests.conftest import load_config
from tests.test_videos import _davis


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Three tiny DAVIS videos prepared as davis_val, plus the demo data."""
  root = str(tmp_path_factory.mktemp("davis"))
  _davis(root, names=("bear", "car", "dog"))
  data_dir = str(tmp_path_factory.mktemp("data"))
  config = load_config("test")
  config.eval_data.source = "davis"
  config.eval_data.path = root
  config.eval_data.split = "val"
  videos.prepare(config, data_dir)
  demo.prepare(load_config("test"), data_dir)
  return data_dir


def _config(num_videos=2, names=""):
  config = load_config("test")
  config.train.video_eval.dataset = "davis_val"
  config.train.video_eval.num_videos = num_videos
  config.train.video_eval.videos = names
  return config


def _untrained(config):
  model = train.make_model(config)
  state = train.init_state(config, model, train.make_optimizer(config, 1))
  return state.params, state.batch_stats


def test_scores_equal_the_evaluation_of_the_same_videos(prepared):
  config = _config(num_videos=2)
  validation = inference.VideoValidation(config, prepared)
  assert validation.videos == ("bear", "car")
  params, batch_stats = _untrained(config)
  scores = validation(params, batch_stats)
  dataset_dir = os.path.join(prepared, "davis_val", "1.0.0")
  networks = inference.networks_from_state(
      config, params, batch_stats, "untrained"
  )
  full = inference.evaluate_dataset(
      config, networks, dataset_dir, None, split="val"
  )
  # Only the two selected videos count, scored by the official protocol.
  chosen = [r for r in full["results"] if r["sequence"] in ("bear", "car")]
  expected, _ = evaluate_lib.summarize(chosen)
  assert scores["val/video_jf"] == pytest.approx(expected["J&F-Mean"])
  assert scores["val/video_j"] == pytest.approx(expected["J-Mean"])
  assert len(full["results"]) == 3 and 0 <= scores["val/video_jf"] <= 1
  # The floor is the copy-first score of the same two videos.
  copy = inference.copy_first_mask_scores(
      dataset_dir, config, "val", videos=("bear", "car")
  )
  assert validation.floors()["val/video_jf_copy_first"] == pytest.approx(
      copy["J&F-Mean"]
  )


def test_named_videos_and_clear_errors(prepared):
  validation = inference.VideoValidation(_config(names="dog,bear"), prepared)
  assert validation.videos == ("dog", "bear")
  params, batch_stats = _untrained(_config())
  with pytest.raises(ValueError, match="no video named"):
    inference.VideoValidation(_config(names="bear,cow"), prepared)(
        params, batch_stats
    )
  config = _config()
  config.train.video_eval.dataset = "davis2016_train"
  with pytest.raises(FileNotFoundError, match="data_prep.videos"):
    inference.VideoValidation(config, prepared)


def test_stage_two_writes_video_scores_and_floor(prepared, tmp_path):
  stage1 = str(tmp_path / "stage1")
  first = _config(num_videos=2)  # Stage 1 ignores the video validation.
  first.train.num_train_steps = 2
  runs.train_stage(first, stage1, prepared)
  config = _config(num_videos=2)
  config.train.stage = "decoder"
  config.train.init_from = stage1
  config.train.num_train_steps = 2
  config.train.eval_every_steps = 1
  workdir = str(tmp_path / "stage2")
  summary = runs.train_stage(config, workdir, prepared)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  jf = [(r["step"], r["val/video_jf"]) for r in records if "val/video_jf" in r]
  assert [s for s, _ in jf] == [1, 2]
  floor = [r for r in records if "val/video_jf_copy_first" in r]
  assert len(floor) == 1 and floor[0]["step"] == 0
  assert summary["val_video_jf"] == pytest.approx(jf[-1][1])
  report = runs.report(summary, workdir)
  assert "copy the first mask" in report and "Held-out videos" in report
  # Stage 1 runs no video validation (its decoder is untrained).
  with open(os.path.join(stage1, "metrics.jsonl")) as f:
    assert not any("val/video_jf" in line for line in f)
  assert np.isfinite(summary["val_video_jf_copy_first"])
