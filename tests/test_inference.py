"""Tracking whole videos in compiled chunks, and the evaluate/segment jobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shls_jax import inference
from shls_jax import memory
from shls_jax import tracker
from shls_jax import train
from shls_jax.models import backbone as backbone_lib
from tests.conftest import load_config
from tests.test_tracker import _video as tracker_video


def _video(num_frames):
  """test_tracker's two moving blocks as uint8 frames, one superpixel map."""
  frames, superpixels, masks = tracker_video(num_frames)
  return (frames * 255).astype(np.uint8), superpixels[0], masks


def _record(frames, superpixels, masks, bucket, n):
  """A video as `input_pipeline.video_dataset` yields it."""
  t = len(frames)
  padded = -(-t // bucket) * bucket
  pad = lambda x: np.concatenate(
      [x, np.zeros((padded - t,) + x.shape[1:], x.dtype)]
  )
  sp = np.broadcast_to(superpixels, (t,) + superpixels.shape)
  num_objects = int(np.where(masks[0] == 255, 0, masks[0]).max())
  return {
      "video_name": b"blocks",
      "frames": pad(frames),
      "labels": pad(masks.astype(np.int32)),
      "superpixels": pad(np.ascontiguousarray(sp)),
      "num_superpixels": pad(np.full(t, int(superpixels.max()) + 1, np.int32)),
      "frame_valid": np.arange(padded) < t,
      "has_label": np.arange(padded) < t,
      "num_frames": np.int32(t),
      "num_objects": np.int32(num_objects),
      "object_first_frame": np.zeros(num_objects, np.int32),
      "frame_names": np.asarray([f"{i:05d}".encode() for i in range(t)]),
      "original_size": np.asarray(frames.shape[1:3], np.int32),
  }


@pytest.fixture(scope="module")
def setup():
  config = load_config("test")
  config.eval_data.time_bucket = 3
  model = train.make_model(config)
  state = train.init_state(config, model, train.make_optimizer(config, 1))
  networks = inference.networks_from_state(
      config, state.params, state.batch_stats, "untrained"
  )
  return config, networks


def test_chunked_tracking_equals_one_scan(setup):
  config, networks = setup
  frames, superpixels, masks = _video(7)
  video = _record(frames, superpixels, masks, bucket=3, n=64)
  segmenter = inference.VideoSegmenter(config, networks)
  out = segmenter(video)
  assert out.shape == (7, 32, 32) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0], masks[0])
  # The same video as one lax.scan over all 7 frames (tracker.track).
  np.testing.assert_array_equal(
      out, _one_scan(config, networks, video, frames, 7, admit=False)
  )
  # The tracker follows objects: not every later frame is empty.
  assert (out[1:] > 0).any()


def _late_record(first, num_frames=7):
  """The blocks video where object 2 is only given on frame `first`."""
  frames, superpixels, masks = _video(num_frames)
  labels = masks.copy()
  labels[:first][labels[:first] == 2] = 0
  video = _record(frames, superpixels, labels, bucket=3, n=64)
  video["num_objects"] = np.int32(2)
  video["object_first_frame"] = np.asarray([0, first], np.int32)
  return video, frames, masks


def _one_scan(config, networks, video, frames, num_frames, admit=True):
  """`tracker.track` over the whole video; `admit`: with its given masks."""
  settings = inference.settings_for(config, 2)
  normalized = backbone_lib.normalize(
      jnp.asarray(frames),
      config.eval_data.pixel_mean,
      config.eval_data.pixel_std,
  )
  nets = {
      "sf_model": networks.sf_model,
      "sf_variables": networks.sf_variables,
      "decoder": networks.decoder,
      "decoder_variables": networks.decoder_variables,
  }
  given = inference.given_masks(video)[:num_frames]
  return np.asarray(
      jax.jit(
          lambda f, g: tracker.track(
              nets,
              f,
              jnp.asarray(video["superpixels"][:num_frames]),
              jnp.asarray(video["num_superpixels"][:num_frames]),
              g[0],
              2,
              jnp.ones(num_frames, bool),
              settings,
              given=g if admit else None,
          )
      )(normalized, jnp.asarray(given))
  )


@pytest.mark.parametrize("first", [2, 4])  # Inside a chunk; a chunk's start.
def test_late_object_joins_on_its_frame(setup, first):
  config, networks = setup
  video, frames, masks = _late_record(first)
  out = inference.VideoSegmenter(config, networks)(video)
  # Not before its frame; exactly its given mask on its frame; tracked after.
  assert not (out[:first] == 2).any()
  np.testing.assert_array_equal(out[first] == 2, masks[first] == 2)
  assert (out[first + 1 :] == 2).any()
  # Chunks (bucket 3) give what one scan over the whole video gives.
  np.testing.assert_array_equal(
      out, _one_scan(config, networks, video, frames, 7)
  )
  # Only the given masks are read: changing every other annotation (ground
  # truth of later frames) changes nothing.
  scrambled = dict(video, labels=video["labels"].copy())
  for t in range(1, 7):
    if t != first:
      scrambled["labels"][t] = np.roll(scrambled["labels"][t], 5, axis=1)
  np.testing.assert_array_equal(
      inference.VideoSegmenter(config, networks)(scrambled), out
  )


def test_admission_path_changes_nothing_without_late_objects(setup):
  """A video whose objects are all given on frame 0 tracks the same through
  the admission branch (given masks all zero after frame 0)."""
  config, networks = setup
  frames, superpixels, masks = _video(5)
  video = _record(frames, superpixels, masks, bucket=3, n=64)
  plain = inference.VideoSegmenter(config, networks)(video)
  np.testing.assert_array_equal(
      _one_scan(config, networks, video, frames, 5), plain
  )


def test_too_many_objects_are_refused(setup):
  config, networks = setup
  frames, superpixels, masks = _video(4)
  video = _record(frames, superpixels, masks, bucket=3, n=64)
  config = config.copy_and_resolve_references()
  config.eval_data.max_objects = 1
  with pytest.raises(ValueError, match="2 objects but.*max_objects=1"):
    inference.VideoSegmenter(config, networks)(video)


def test_first_mask_void_is_not_an_object(setup):
  config, networks = setup
  frames, superpixels, masks = _video(4)
  masks = masks.copy()
  masks[0, 0:2, :] = 255  # DAVIS-style void in the given mask.
  out = inference.VideoSegmenter(config, networks)(
      _record(frames, superpixels, masks, bucket=3, n=64)
  )
  assert out.max() <= 2
  assert (out[0, 0:2] == 0).all()


def test_memory_rules_come_from_the_config(setup):
  config, _ = setup
  config = config.copy_and_resolve_references()
  assert inference.settings_for(config, 2).hyper == memory.Hyperparameters()
  config.memory.kmeans_iterations = 3
  config.memory.test_box_r = 0.6
  hyper = inference.settings_for(config, 2).hyper
  assert (hyper.kmeans_iterations, hyper.test_box_r) == (3, 0.6)
  assert train.tracker_settings(config, 3).hyper == hyper
  config.memory.knn = 3
  with pytest.raises(ValueError, match=r"unknown fields \['knn'\]"):
    inference.settings_for(config, 2)
