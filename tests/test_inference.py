"""Tracking whole videos in compiled chunks, and the evaluate/segment jobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shls_jax import inference
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
  whole = jax.jit(
      lambda f: tracker.track(
          nets,
          f,
          jnp.asarray(video["superpixels"][:7]),
          jnp.asarray(video["num_superpixels"][:7]),
          jnp.asarray(masks[0], jnp.int32),
          2,
          jnp.ones(7, bool),
          settings,
      )
  )(normalized)
  np.testing.assert_array_equal(out, np.asarray(whole))
  # The tracker follows objects: not every later frame is empty.
  assert (out[1:] > 0).any()


def test_late_objects_and_too_many_objects_are_refused(setup):
  config, networks = setup
  frames, superpixels, masks = _video(4)
  segmenter = inference.VideoSegmenter(config, networks)
  video = _record(frames, superpixels, masks, bucket=3, n=64)
  video["object_first_frame"] = np.asarray([0, 2], np.int32)
  with pytest.raises(NotImplementedError, match=r"objects \[2\] are first"):
    segmenter(video)
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
