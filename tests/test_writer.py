"""The sharded writer: round trip, resumability, atomic shards, manifest."""

import functools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import writer
from shls_jax import input_pipeline


def _example(item: str, fail_on: str = ""):
  """A small sequence example whose content is a function of the item."""
  if item == fail_on:
    raise ValueError(f"broken input {item}")
  rng = np.random.default_rng(writer.item_seed(0, item))
  frames = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, (3, 12, 16), dtype=np.uint8)
  sp = rng.integers(0, 700, (3, 12, 16)).astype(np.uint16)
  return {
      "image_id": item,
      "sequence_index": 0,
      "frames": [writer.encode_png(f) for f in frames],
      "labels": [writer.encode_png(l) for l in labels],
      "num_objects": int(labels.max()),
      "superpixels": [writer.encode_png(s) for s in sp],
      "num_superpixels": np.array([700, 700, 700], np.int32),
      "adjacency": np.array([[0, 1, 2], [2, 0, 5]], np.int32),
  }, (frames, labels, sp)


def _examples(item, fail_on=""):
  yield _example(item, fail_on)[0]


def _write(data_dir, items, fail_on="", workers=1, seed=0):
  return writer.write_dataset(
      data_dir=str(data_dir),
      name="toy",
      splits={"train": items[:-2], "validation": items[-2:]},
      features_fn=input_pipeline.sequence_features,
      make_examples=functools.partial(_examples, fail_on=fail_on),
      items_per_shard=2,
      manifest={"seed": seed},
      num_workers=workers,
  )


ITEMS = [f"img{i}" for i in range(7)]


def test_round_trip_is_bit_exact(tmp_path):
  path = _write(tmp_path, ITEMS)
  builder = tfds.builder_from_directory(path)
  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.splits["train"].num_shards == 3
  assert builder.info.splits["validation"].num_examples == 2
  read = {
      ex["image_id"].decode(): ex
      for ex in builder.as_dataset(split="train").as_numpy_iterator()
  }
  assert sorted(read) == ITEMS[:5]
  for item, ex in read.items():
    frames, labels, sp = _example(item)[1]
    np.testing.assert_array_equal(ex["frames"], frames)
    np.testing.assert_array_equal(ex["labels"][..., 0], labels)
    np.testing.assert_array_equal(ex["superpixels"][..., 0], sp)
    assert ex["superpixels"].dtype == np.uint16
    np.testing.assert_array_equal(ex["adjacency"], [[0, 1, 2], [2, 0, 5]])


def test_interrupted_run_resumes_without_redoing_shards(tmp_path):
  with pytest.raises(ValueError, match="broken input img4"):
    _write(tmp_path, ITEMS, fail_on="img4")
  dataset_dir = os.path.join(tmp_path, "toy", writer.VERSION)
  names = os.listdir(dataset_dir)
  # No metadata yet, so no reader accepts the half-written dataset.
  assert "dataset_info.json" not in names
  with pytest.raises(FileNotFoundError, match="not a complete"):
    input_pipeline.load_builder(dataset_dir)
  # The failing shard left no file under a final or temporary name.
  assert "toy-train.tfrecord-00002-of-00003" not in names
  assert not [n for n in names if n.startswith(".tmp")]
  done = {
      n: os.path.getmtime(os.path.join(dataset_dir, n))
      for n in names
      if n.startswith("toy-")
  }
  assert "toy-train.tfrecord-00000-of-00003" in done
  _write(tmp_path, ITEMS)
  for name, mtime in done.items():
    assert os.path.getmtime(os.path.join(dataset_dir, name)) == mtime
  builder = input_pipeline.load_builder(dataset_dir)
  assert builder.info.splits["train"].num_examples == 5


def test_a_shard_without_its_record_is_redone(tmp_path):
  """A crash between the rename and the bookkeeping never keeps a shard."""
  path = _write(tmp_path, ITEMS)
  shard = os.path.join(path, "toy-train.tfrecord-00001-of-00003")
  with open(shard, "r+b") as f:
    f.truncate(10)  # As if the file had been cut short.
  os.remove(os.path.join(path, ".shards", os.path.basename(shard) + ".json"))
  _write(tmp_path, ITEMS)
  builder = input_pipeline.load_builder(path)
  ids = [
      ex["image_id"]
      for ex in builder.as_dataset(split="train").as_numpy_iterator()
  ]
  assert len(ids) == 5


def test_other_settings_are_refused_and_nothing_changes(tmp_path):
  path = _write(tmp_path, ITEMS)
  before = sorted(os.listdir(path))
  with pytest.raises(writer.DatasetMismatchError, match="seed"):
    _write(tmp_path, ITEMS, seed=1)
  assert sorted(os.listdir(path)) == before


def test_parallel_workers_write_the_same_bytes(tmp_path):
  one = _write(tmp_path / "one", ITEMS, workers=1)
  two = _write(tmp_path / "two", ITEMS, workers=2)
  shards = sorted(n for n in os.listdir(one) if n.startswith("toy-"))
  assert shards == sorted(n for n in os.listdir(two) if n.startswith("toy-"))
  for name in shards:
    with open(os.path.join(one, name), "rb") as a:
      with open(os.path.join(two, name), "rb") as b:
        assert a.read() == b.read()
