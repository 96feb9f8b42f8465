"""The model shipped inside the package, and segmenting without a checkpoint."""

import json
import os

import numpy as np
import pytest

from data_prep import video_sources
from shls_jax import inference
from shls_jax import runs
from shls_jax import shipped
from shls_jax import train
from tests.conftest import load_config
from tests.test_inference import _record
from tests.test_inference import _video
from tests.test_main import _own_video


def _trained_state(config, seed=0):
  config.seed = seed
  model = train.make_model(config)
  return train.init_state(config, model, train.make_optimizer(config, 1))


def test_export_and_load_round_trip_in_float16(tmp_path):
  config = load_config("test")
  config.eval_data.time_bucket = 3
  state = _trained_state(config)
  path = str(tmp_path / "model")
  size = shipped.export(
      path, config.model, state.params, state.batch_stats, {"name": "tiny"}
  )
  assert size == os.path.getsize(path + ".npz") and shipped.available(path)
  model, params, stats, meta = shipped.load(path)
  assert meta["provenance"] == {"name": "tiny"}
  assert model["stage_features"] == list(config.model.stage_features)
  flat = dict(shipped._flatten(params))  # pylint: disable=protected-access
  want = dict(shipped._flatten(state.params))  # pylint: disable=protected-access
  assert flat.keys() == want.keys()
  for key, value in want.items():
    assert flat[key].dtype == np.float32
    np.testing.assert_allclose(flat[key], value, rtol=1e-3, atol=1e-4)
  # The float16 copy tracks a video like the float32 weights, mask by mask.
  frames, superpixels, masks = _video(7)
  video = _record(frames, superpixels, masks, bucket=3, n=64)
  full = inference.networks_from_state(
      config, state.params, state.batch_stats, "float32"
  )
  half = inference.load_networks(config, path + ".npz")
  assert half.source == "shipped tiny"
  out32 = inference.VideoSegmenter(config, full)(video)
  out16 = inference.VideoSegmenter(config, half)(video)
  assert np.mean(out32 == out16) > 0.99


def test_export_refuses_what_cannot_ship(tmp_path, monkeypatch):
  config = load_config("test")
  state = _trained_state(config)
  path = str(tmp_path / "model")
  shipped.export(path, config.model, state.params, state.batch_stats, {})
  before = open(path + ".npz", "rb").read()
  monkeypatch.setattr(shipped, "MAX_BYTES", 1000)
  with pytest.raises(ValueError, match="more than the 0 MiB"):
    shipped.export(path, config.model, state.params, state.batch_stats, {})
  monkeypatch.undo()
  huge = {"w": np.full(3, 1e6, np.float32)}
  with pytest.raises(ValueError, match="params/w is not finite in float16"):
    shipped.export(path, config.model, huge, {}, {})
  # Nothing was overwritten by the refused exports.
  assert open(path + ".npz", "rb").read() == before
  with open(path + ".json", "w", encoding="utf-8") as f:
    json.dump({"format": 99}, f)
  with pytest.raises(ValueError, match="model.json: format 99"):
    shipped.load(path)
  with pytest.raises(FileNotFoundError, match="--config.eval.checkpoint"):
    shipped.load(str(tmp_path / "absent"))


def test_with_model_takes_the_network_sizes():
  config = load_config("test")
  model = dict(config.model.to_dict(), stem_features=48, stage_features=[8, 8])
  out = shipped.with_model(config, model)
  assert out.model.stem_features == 48
  assert out.model.stage_features == (8, 8)
  assert config.model.stem_features != 48  # The caller's config is kept.


def test_segment_without_checkpoint_uses_the_shipped_model(
    tmp_path, monkeypatch
):
  config = load_config("test")
  state = _trained_state(config, seed=3)
  weights = tmp_path / "weights"
  shipped.export(
      str(weights / shipped.NAME),
      config.model,
      state.params,
      state.batch_stats,
      {"name": "tiny-test"},
  )
  monkeypatch.setattr(shipped, "WEIGHTS_DIR", str(weights))
  frames_dir = str(tmp_path / "clip")
  mask = _own_video(frames_dir)
  mask_path = str(tmp_path / "mask.png")
  video_sources.write_palette_mask(mask_path, mask)
  config.mode = "segment"
  config.eval_data.source = "video"
  config.eval_data.path = frames_dir
  config.eval_data.mask = mask_path
  workdir = str(tmp_path / "work")
  out = runs.segment(config, workdir, str(tmp_path / "data"))
  assert "Model: shipped tiny-test" in out
  assert "Segmented 6 frames" in out
  first = video_sources.read_palette_mask(
      os.path.join(workdir, "segment", "video_clip", "masks", "clip", "000.png")
  )
  np.testing.assert_array_equal(first, mask)
  # Mode evaluate never falls back silently: it names the way out.
  config.mode = "evaluate"
  with pytest.raises(FileNotFoundError, match="'shipped' for the model"):
    runs._checkpoint_path(config, workdir)  # pylint: disable=protected-access

