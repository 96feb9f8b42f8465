"""Evaluation records end to end: DAVIS folder -> records -> video reader."""

import os

import imageio.v3 as iio
import numpy as np
import pytest

from data_prep import superpixels
from data_prep import video_sources
from data_prep import videos
from shls_jax import input_pipeline

H, W = 24, 40


def _davis(root, names=("bear", "car"), num_frames=5):
  rng = np.random.default_rng(0)
  for split_name, split in (("val", names),):
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(
        os.path.join(root, "ImageSets", "2017", f"{split_name}.txt"), "w"
    ) as f:
      f.write("\n".join(split) + "\n")
  for v, name in enumerate(names):
    frames_dir = os.path.join(root, "JPEGImages", "480p", name)
    masks_dir = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(frames_dir)
    os.makedirs(masks_dir)
    for t in range(num_frames):
      frame = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
      frame[4 + t : 12 + t, 5:15] = (250, 20, 20)
      iio.imwrite(os.path.join(frames_dir, f"{t:05d}.jpg"), frame)
      ids = np.zeros((H, W), np.uint8)
      ids[4 + t : 12 + t, 5:15] = 1
      ids[15:20, 20 : 30 + v] = 2
      ids[0, :] = 255  # Void.
      video_sources.write_palette_mask(
          os.path.join(masks_dir, f"{t:05d}.png"), ids
      )
  return root


def _config(test_config, root):
  config = test_config
  config.eval_data.source = "davis"
  config.eval_data.path = root
  config.eval_data.split = "val"
  return config


def test_davis_folder_to_padded_videos(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"))
  config = _config(test_config, root)
  path = videos.prepare(config, str(tmp_path / "data"))
  assert os.path.basename(os.path.dirname(path)) == "davis_val"
  ds = input_pipeline.video_dataset(
      path, "val", max_superpixels=128, time_bucket=4
  )
  got = {v["video_name"].decode(): v for v in ds.as_numpy_iterator()}
  assert sorted(got) == ["bear", "car"]
  bear = got["bear"]
  assert bear["num_frames"] == 5
  assert bear["frames"].shape == (8, H, W, 3)
  assert bear["num_objects"] == 2
  np.testing.assert_array_equal(bear["frame_valid"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(bear["has_label"], [1] * 5 + [0] * 3)
  assert [n.decode() for n in bear["frame_names"]] == [
      f"{t:05d}" for t in range(5)
  ]
  # JPEG frames are stored as the original bytes: decoding them gives the
  # same pixels as decoding the file.
  first = iio.imread(
      os.path.join(root, "JPEGImages", "480p", "bear", "00000.jpg")
  )
  np.testing.assert_array_equal(bear["frames"][0], first)
  assert (bear["labels"][0, 0] == 255).all()
  assert bear["labels"][2, 8, 8] == 1
  for t in range(5):
    seg = bear["superpixels"][t]
    n = bear["num_superpixels"][t]
    np.testing.assert_array_equal(np.unique(seg), np.arange(n))
    edges = bear["edges"][t][bear["edge_valid"][t]]
    np.testing.assert_array_equal(edges, superpixels.adjacency(seg))


def test_too_many_superpixels_names_the_video(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"))
  config = _config(test_config, root)
  config.eval_superpixels.max_superpixels = 3
  with pytest.raises(superpixels.SuperpixelError, match="bear|car"):
    videos.prepare(config, str(tmp_path / "data"))


def test_bad_video_keeps_the_finished_ones(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"), names=("bear", "car", "dog"))
  # A truncated JPEG in the last video.
  broken = os.path.join(root, "JPEGImages", "480p", "dog", "00003.jpg")
  with open(broken, "r+b") as f:
    f.truncate(100)
  config = _config(test_config, root)
  with pytest.raises(video_sources.InputError, match="00003.jpg"):
    videos.prepare(config, str(tmp_path / "data"))
  dataset_dir = os.path.join(tmp_path, "data", "davis_val", "1.0.0")
  kept = sorted(n for n in os.listdir(dataset_dir) if ".tfrecord-" in n)
  assert len(kept) == 2  # bear and car were written and stay.
  # Fix the input, rerun: only the missing video is made.
  iio.imwrite(broken, np.zeros((H, W, 3), np.uint8))
  mtimes = {n: os.path.getmtime(os.path.join(dataset_dir, n)) for n in kept}
  videos.prepare(config, str(tmp_path / "data"))
  for n, m in mtimes.items():
    assert os.path.getmtime(os.path.join(dataset_dir, n)) == m
  info = input_pipeline.load_builder(dataset_dir).info
  assert info.splits["val"].num_examples == 3


def test_own_video_dataset_name(test_config):
  config = test_config
  config.eval_data.source = "video"
  config.eval_data.path = "clips/My Holiday.mp4"
  assert videos.dataset_name(config.eval_data) == "video_my_holiday"


def test_dataset_names_carry_the_split(test_config):
  config = test_config
  config.eval_data.source = "davis2016"
  config.eval_data.split = "train"
  assert videos.dataset_name(config.eval_data) == "davis2016_train"
  config.eval_data.split = "val"
  assert videos.dataset_name(config.eval_data) == "davis2016_val"
  config.eval_data.resize_height = 240
  assert videos.dataset_name(config.eval_data) == "davis2016_val_240p"
  config.eval_data.dataset_name = "mine"
  assert videos.dataset_name(config.eval_data) == "mine"


def test_resized_videos_keep_full_labels_and_score_at_full_size(
    tmp_path, test_config
):
  from shls_jax import inference  # pylint: disable=g-import-not-at-top
  from shls_jax import train  # pylint: disable=g-import-not-at-top

  root = _davis(str(tmp_path / "DAVIS"))
  config = _config(test_config, root)
  config.eval_data.resize_height = H // 2
  path = videos.prepare(config, str(tmp_path / "data"))
  ds = input_pipeline.video_dataset(
      path, "val", max_superpixels=128, time_bucket=4
  )
  video = next(ds.as_numpy_iterator())
  assert video["labels"].shape[1:] == (H // 2, W // 2)
  full = input_pipeline.decode_full_labels(video)
  assert full.shape == (5, H, W)
  name = video["video_name"].decode()
  masks_dir = os.path.join(root, "Annotations", "480p", name)
  for t in range(5):
    np.testing.assert_array_equal(
        full[t], video_sources.read_palette_mask(f"{masks_dir}/{t:05d}.png")
    )
  # The copy-first floor is scored on the full-size ground truth: on the
  # unresized records it is exactly the same.
  config.eval_data.resize_height = 0
  config.eval_data.dataset_name = "unresized"
  plain = videos.prepare(config, str(tmp_path / "data"))
  assert input_pipeline.decode_full_labels(
      next(
          input_pipeline.video_dataset(
              plain, "val", max_superpixels=128, time_bucket=4
          ).as_numpy_iterator()
      )
  ) is None
  assert inference.copy_first_mask_scores(
      path, config, "val"
  ) == inference.copy_first_mask_scores(plain, config, "val")
  # Tracking runs at the records' size; the PNGs and scores are full size.
  model = train.make_model(config)
  state = train.init_state(config, model, train.make_optimizer(config, 1))
  networks = inference.networks_from_state(
      config, state.params, state.batch_stats, "untrained"
  )
  out_dir = str(tmp_path / "eval")
  summary = inference.evaluate_dataset(config, networks, path, out_dir)
  written = video_sources.read_palette_mask(
      os.path.join(out_dir, "masks", name, "00001.png")
  )
  assert written.shape == (H, W)
  assert summary["masks"][name].shape == (5, H // 2, W // 2)
  assert 0 <= summary["global_scores"]["J&F-Mean"] <= 1
