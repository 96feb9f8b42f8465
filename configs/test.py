r"""Tiny settings for the test suite (small images, few superpixels)."""

import os
import runpy

import ml_collections


def get_config():
  """Returns the test configuration."""
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "davis.py"))["get_config"]()
  config.mode = "prepare_demo"
  config.data_dir = ""
  config.prep.dataset_name = "shls_test"
  config.prep.sequences_per_image = 2
  config.prep.images_per_shard = 2
  config.prep.image_size = 64
  config.prep.validation_fraction = 0.25
  config.prep.num_workers = 1
  config.prep.rbd_superpixels = 60
  config.prep.donor_short_side_px = (10, 30)
  config.train_superpixels.slic_n_segments = 40
  config.train_superpixels.max_superpixels = 80
  config.eval_superpixels.method = "slic"
  config.eval_superpixels.slic_n_segments = 60
  config.eval_superpixels.max_superpixels = 128
  config.eval_data.time_bucket = 4
  config.eval_data.num_workers = 1
  config.batch_size = 8
  config.eval_batch_size = 8
  config.shuffle_buffer = 16
  config.prefetch = 1
  # A narrow network: compiles and steps in seconds on a CPU.
  config.model.sf_channels = 8
  config.model.stem_features = 8
  config.model.stage_features = (8, 8, 16, 16)
  config.model.stage_blocks = (1, 1, 1, 1)
  config.model.decoder_features = 8
  config.model.decoder_skip_features = 8
  config.model.decoder_gate_features = 4
  config.model.decoder_crop_size = (16, 16)
  config.memory.capacity = 256
  config.loss.split_extra_superpixels = 32
  config.eval_data.split_extra_superpixels = 32
  config.train.num_train_steps = 4
  config.train.log_every_steps = 2
  config.train.eval_every_steps = 0
  # Off: one more compiled program per run; tests that need it turn it on.
  config.train.image_every_steps = 0
  config.train.checkpoint_every_steps = 2
  config.demo = ml_collections.ConfigDict()
  config.demo.stage2 = "decoder"
  config.demo.stage2_steps = 2
  config.demo.stage2_learning_rate = 1e-3
  config.demo_videos = ml_collections.ConfigDict()
  config.demo_videos.dataset_name = "shls_test_videos"
  config.demo_videos.num_frames = 5
  config.demo_videos.videos_per_image = 1
  config.eval_data.pixel_mean = config.model.pixel_mean
  config.eval_data.pixel_std = config.model.pixel_std
  return config
