"""The still-image pipeline end to end, on tiny folders made here."""

import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest

from data_prep import still_images
from data_prep import superpixels
from data_prep import writer
from shls_jax import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_folder(root, num_images=8, size=(48, 64), saliency=True):
  """Images with one or two bright shapes on a textured background."""
  rng = np.random.default_rng(0)
  images = os.path.join(root, "images")
  maps = os.path.join(root, "saliency")
  os.makedirs(images)
  os.makedirs(maps)
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  for i in range(num_images):
    image = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    soft = np.zeros((h, w), np.uint8)
    for _ in range(1 + i % 2):
      cy, cx = rng.integers(10, h - 10), rng.integers(10, w - 10)
      r = rng.integers(5, 9)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
      image[disc] = rng.integers(120, 256, 3)
      soft[disc] = 200
    ext = ".jpg" if i % 3 == 0 else ".png"
    iio.imwrite(os.path.join(images, f"im{i}{ext}"), image)
    iio.imwrite(os.path.join(maps, f"im{i}.png"), soft)
  return images, maps


def _config(test_config, images, maps):
  config = test_config
  config.prep.images_dir = images
  config.prep.saliency_dir = maps
  return config


def _read_all(dataset_dir, split):
  builder = input_pipeline.load_builder(dataset_dir)
  return list(builder.as_dataset(split=split).as_numpy_iterator())


def test_records_from_a_saliency_folder(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  config = _config(test_config, images, maps)
  path = still_images.prepare(config, str(tmp_path / "data"))
  builder = input_pipeline.load_builder(path)
  # The TFDS metadata: the shared feature spec, the splits, the name.
  assert builder.info.name == config.prep.dataset_name
  assert repr(builder.info.features) == repr(input_pipeline.sequence_features())
  splits = builder.info.splits
  assert set(splits.keys()) == {"train", "validation"}
  assert splits["validation"].num_examples == 2 * 2  # 2 images x 2 seqs.
  assert splits["train"].num_examples == 6 * 2
  train, val = _read_all(path, "train"), _read_all(path, "validation")
  train_ids = {e["image_id"] for e in train}
  val_ids = {e["image_id"] for e in val}
  assert not train_ids & val_ids
  assert len(train_ids | val_ids) == 8
  for ex in train + val:
    s = config.prep.image_size
    assert ex["frames"].shape == (3, s, s, 3)
    labels = ex["labels"][..., 0]
    assert ex["num_objects"] == labels.max() >= 1
    # Every object of the sequence is present in frame 0.
    assert set(np.unique(labels)) <= set(np.unique(labels[0]))
    for t in range(3):
      seg = ex["superpixels"][t, ..., 0].astype(np.int32)
      n = ex["num_superpixels"][t]
      assert n <= config.train_superpixels.max_superpixels
      np.testing.assert_array_equal(np.unique(seg), np.arange(n))
      rows = ex["adjacency"][ex["adjacency"][:, 0] == t, 1:]
      np.testing.assert_array_equal(rows, superpixels.adjacency(seg))


def test_output_is_reproducible_and_independent_of_workers(
    tmp_path, test_config
):
  images, maps = _make_folder(str(tmp_path))
  config = _config(test_config, images, maps)
  one = still_images.prepare(config, str(tmp_path / "one"))
  config.prep.num_workers = 2
  two = still_images.prepare(config, str(tmp_path / "two"))
  shards = sorted(n for n in os.listdir(one) if ".tfrecord-" in n)
  assert shards
  for name in shards:
    with open(os.path.join(one, name), "rb") as a:
      with open(os.path.join(two, name), "rb") as b:
        assert a.read() == b.read(), name


def test_rbd_pseudo_masks_are_cached(tmp_path, test_config):
  images, _ = _make_folder(str(tmp_path), num_images=5)
  config = _config(test_config, images, "")
  path = still_images.prepare(config, str(tmp_path / "data"))
  cache = os.path.join(
      tmp_path, "data", config.prep.dataset_name, "pseudo_masks"
  )
  assert sorted(os.listdir(cache)) == [f"im{i}.png" for i in range(5)]
  assert (
      sum(
          s.num_examples
          for s in input_pipeline.load_builder(path).info.splits.values()
      )
      == 10
  )


def test_truncated_image_is_named(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  with open(os.path.join(images, "im4.png"), "r+b") as f:
    f.truncate(60)
  config = _config(test_config, images, maps)
  with pytest.raises(ValueError, match="im4.png"):
    still_images.prepare(config, str(tmp_path / "data"))


def test_saliency_map_of_another_size_is_named(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  iio.imwrite(os.path.join(maps, "im2.png"), np.zeros((10, 10), np.uint8))
  config = _config(test_config, images, maps)
  with pytest.raises(ValueError, match="im2.png"):
    still_images.prepare(config, str(tmp_path / "data"))


def test_missing_saliency_map_is_named(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  os.remove(os.path.join(maps, "im5.png"))
  config = _config(test_config, images, maps)
  with pytest.raises(still_images.InputError, match="im5"):
    still_images.prepare(config, str(tmp_path / "data"))


def test_two_files_with_one_stem_are_refused(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  iio.imwrite(os.path.join(images, "im1.jpg"), np.zeros((8, 8, 3), np.uint8))
  config = _config(test_config, images, maps)
  with pytest.raises(still_images.InputError, match="saliency_dir"):
    still_images.prepare(config, str(tmp_path / "data"))


def test_too_many_superpixels_keeps_what_was_written(tmp_path, test_config):
  images, maps = _make_folder(str(tmp_path))
  config = _config(test_config, images, maps)
  path = still_images.prepare(config, str(tmp_path / "data"))
  before = {
      n: open(os.path.join(path, n), "rb").read()
      for n in os.listdir(path)
      if ".tfrecord-" in n
  }
  config.train_superpixels.max_superpixels = 5
  config.prep.dataset_name = "other"
  with pytest.raises(superpixels.SuperpixelError, match="max_superpixels"):
    still_images.prepare(config, str(tmp_path / "data"))
  for name, data in before.items():
    assert open(os.path.join(path, name), "rb").read() == data
  assert input_pipeline.load_builder(path).info.splits["train"].num_examples


def test_killed_run_resumes_to_the_same_bytes(tmp_path, test_config):
  """SIGKILL mid-run, rerun: identical to an uninterrupted run."""
  images, maps = _make_folder(str(tmp_path), num_images=16)
  args = [
      sys.executable,
      "-m",
      "data_prep.still_images",
      f"--config={os.path.join(REPO, 'configs', 'test.py')}",
      f"--config.prep.images_dir={images}",
      f"--config.prep.saliency_dir={maps}",
      "--config.prep.images_per_shard=1",
  ]
  env = dict(os.environ, PYTHONPATH=REPO)
  killed = str(tmp_path / "killed")
  dataset_dir = os.path.join(killed, "shls_test", writer.VERSION)
  proc = subprocess.Popen(
      args + [f"--config.data_dir={killed}"],
      env=env,
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while time.time() < deadline:
    done = os.path.join(dataset_dir, ".shards")
    if os.path.isdir(done) and len(os.listdir(done)) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = len(os.listdir(os.path.join(dataset_dir, ".shards")))
  assert 3 <= finished < 16, "kill came too late to test a resume"
  assert not os.path.exists(os.path.join(dataset_dir, "dataset_info.json"))
  subprocess.run(
      args + [f"--config.data_dir={killed}"],
      env=env,
      cwd=REPO,
      check=True,
      capture_output=True,
  )
  clean = str(tmp_path / "clean")
  subprocess.run(
      args + [f"--config.data_dir={clean}"],
      env=env,
      cwd=REPO,
      check=True,
      capture_output=True,
  )
  clean_dir = os.path.join(clean, "shls_test", writer.VERSION)
  shards = sorted(n for n in os.listdir(clean_dir) if ".tfrecord-" in n)
  assert (
      sorted(n for n in os.listdir(dataset_dir) if ".tfrecord-" in n) == shards
  )
  assert not [n for n in os.listdir(dataset_dir) if n.startswith(".tmp")]
  for name in shards:
    with open(os.path.join(dataset_dir, name), "rb") as a:
      with open(os.path.join(clean_dir, name), "rb") as b:
        assert a.read() == b.read(), name
