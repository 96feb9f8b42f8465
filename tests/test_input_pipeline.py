"""The tf.data readers: batching per device, padding, host sharding."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from data_prep import writer
from shls_jax import input_pipeline

T, H, W = 3, 10, 14


def _sequence(item: str):
  rng = np.random.default_rng(writer.item_seed(1, item))
  counts = rng.integers(3, 9, T).astype(np.int32)
  sp = np.stack([rng.integers(0, n, (H, W)) for n in counts]).astype(np.uint16)
  edges = np.array([[t, 0, 1 + t] for t in range(T)] + [[2, 1, 2]], np.int32)
  return {
      "image_id": item,
      "sequence_index": 0,
      "frames": [
          writer.encode_png(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
          for _ in range(T)
      ],
      "labels": [
          writer.encode_png(np.full((H, W), t, np.uint8)) for t in range(T)
      ],
      "num_objects": T - 1,
      "superpixels": [writer.encode_png(s) for s in sp],
      "num_superpixels": counts,
      "adjacency": edges,
  }


def _sequences(item):
  yield _sequence(item)


def _video(item: str):
  num_frames = int(item.split("_")[1])
  return {
      "video_name": item,
      "source": "test",
      "frame_names": [f"{t:05d}" for t in range(num_frames)],
      "frames": [
          writer.encode_png(np.full((H, W, 3), t, np.uint8))
          for t in range(num_frames)
      ],
      "labels": [
          writer.encode_png(np.full((H, W), 255 if t else 1, np.uint8))
          for t in range(num_frames)
      ],
      "has_label": np.arange(num_frames) == 0,
      "num_objects": 1,
      "object_first_frame": np.array([0], np.int32),
      "original_size": np.array([H, W], np.int32),
      "full_labels": [],
      "superpixels": [
          writer.encode_png(np.zeros((H, W), np.uint16))
          for _ in range(num_frames)
      ],
      "num_superpixels": np.ones(num_frames, np.int32),
      "adjacency": np.zeros((0, 3), np.int32),
  }


def _videos(item):
  yield _video(item)


@pytest.fixture(scope="module")
def sequences_dir(tmp_path_factory):
  return writer.write_dataset(
      data_dir=str(tmp_path_factory.mktemp("seq")),
      name="toy_sequences",
      splits={"train": [f"im{i:02d}" for i in range(16)]},
      features_fn=input_pipeline.sequence_features,
      make_examples=_sequences,
      items_per_shard=4,
      manifest={},
      num_workers=1,
  )


def _read(path, **kwargs):
  args = dict(
      global_batch_size=8,
      num_local_devices=4,
      max_superpixels=10,
      shuffle=False,
      repeat=False,
  )
  args.update(kwargs)
  return list(
      input_pipeline.sequence_dataset(path, "train", **args).as_numpy_iterator()
  )


def test_batches_are_split_per_device_and_padded(sequences_dir):
  batches = _read(sequences_dir)
  assert len(batches) == 2
  batch = batches[0]
  assert batch["frames"].shape == (4, 2, T, H, W, 3)
  assert batch["superpixels"].shape == (4, 2, T, H, W)
  assert batch["superpixels"].dtype == np.int32
  assert batch["superpixel_valid"].shape == (4, 2, T, 10)
  assert batch["edges"].shape == (4, 2, T, 30, 2)
  np.testing.assert_array_equal(
      batch["superpixel_valid"].sum(-1), batch["num_superpixels"]
  )
  np.testing.assert_array_equal(batch["labels"][0, 0, :, 0, 0], [0, 1, 2])
  # Adjacency rows (t, a, b) become per-frame edge lists with a mask.
  edges, valid = batch["edges"][0, 0], batch["edge_valid"][0, 0]
  np.testing.assert_array_equal(valid.sum(-1), [1, 1, 2])
  np.testing.assert_array_equal(edges[0, 0], [0, 1])
  np.testing.assert_array_equal(edges[2, :2], [[0, 3], [1, 2]])
  assert not edges[0, 1:].any()


def test_each_host_reads_its_own_examples(sequences_dir):
  seen = []
  for index in range(2):
    batches = _read(
        sequences_dir,
        global_batch_size=4,
        num_local_devices=1,
        process_index=index,
        process_count=2,
    )
    ids = {
        tuple(b["frames"][i, j, 0, 0, 0])
        for b in batches
        for i in range(b["frames"].shape[0])
        for j in range(b["frames"].shape[1])
    }
    assert len(ids) == 8
    seen.append(ids)
  assert not seen[0] & seen[1]


def test_shuffle_is_a_function_of_the_seed(sequences_dir):
  def order(seed):
    batches = _read(sequences_dir, shuffle=True, seed=seed)
    return np.concatenate(
        [b["frames"][:, :, 0, 0, 0, 0].ravel() for b in batches]
    )

  np.testing.assert_array_equal(order(3), order(3))
  assert not np.array_equal(order(3), order(4))


def test_batch_size_must_divide_over_devices(sequences_dir):
  with pytest.raises(ValueError, match="not divisible by the 12 devices"):
    _read(
        sequences_dir, global_batch_size=8, num_local_devices=6, process_count=2
    )


def test_too_many_hosts_for_the_examples(sequences_dir):
  with pytest.raises(ValueError, match="every process needs at least one"):
    _read(
        sequences_dir,
        global_batch_size=20,
        num_local_devices=1,
        process_count=20,
    )


def test_epochs_are_addressable_and_resumable(sequences_dir):
  def first_pixels(batches):
    return [b["frames"][:, :, 0, 0, 0, 0].ravel().tolist() for b in batches]

  kwargs = dict(
      global_batch_size=4,
      num_local_devices=2,
      max_superpixels=10,
      shuffle_buffer=16,
      seed=5,
  )
  epoch0 = first_pixels(_read(sequences_dir, shuffle=True, epoch=0, **kwargs))
  epoch1 = first_pixels(_read(sequences_dir, shuffle=True, epoch=1, **kwargs))
  assert len(epoch0) == 4 == len(epoch1)
  assert epoch0 != epoch1
  assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
  assert (
      input_pipeline.steps_per_epoch(
          sequences_dir, "train", global_batch_size=4
      )
      == 4
  )
  stream = input_pipeline.training_batches(
      sequences_dir, start_step=0, **kwargs
  )
  uninterrupted = first_pixels(next(stream) for _ in range(7))
  assert uninterrupted == epoch0 + epoch1[:3]
  resumed = input_pipeline.training_batches(
      sequences_dir, start_step=3, **kwargs
  )
  assert first_pixels(next(resumed) for _ in range(4)) == uninterrupted[3:]


def test_superpixels_above_n_max_are_an_error(sequences_dir):
  with pytest.raises(tf.errors.InvalidArgumentError, match="max_superpixels"):
    _read(sequences_dir, max_superpixels=4)


def test_videos_are_padded_to_the_time_bucket(tmp_path):
  path = writer.write_dataset(
      data_dir=str(tmp_path),
      name="toy_videos",
      splits={"val": ["v_5", "v_8"]},
      features_fn=input_pipeline.video_features,
      make_examples=_videos,
      items_per_shard=1,
      manifest={},
      num_workers=1,
  )
  videos = {
      v["video_name"].decode(): v
      for v in input_pipeline.video_dataset(
          path, "val", max_superpixels=4, time_bucket=4
      ).as_numpy_iterator()
  }
  v5 = videos["v_5"]
  assert v5["frames"].shape == (8, H, W, 3)
  np.testing.assert_array_equal(v5["frame_valid"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(v5["has_label"], [1] + [0] * 7)
  assert v5["num_frames"] == 5
  assert v5["labels"][1, 0, 0] == 255  # Void survives.
  assert not v5["superpixel_valid"][5:].any()
  assert len(v5["frame_names"]) == 5
  assert videos["v_8"]["frames"].shape[0] == 8


def test_evaluation_batches_cover_every_example_once(sequences_dir):
  # 16 examples, 3 processes with 2 devices x 1: shares 6, 5, 5 -> 3 batches
  # of 2 on every process, the missing ones padded.
  seen = []
  for index in range(3):
    batches = _read(
        sequences_dir,
        global_batch_size=6,
        num_local_devices=2,
        process_index=index,
        process_count=3,
        pad_to_full_batches=True,
    )
    assert len(batches) == 3
    valid = np.concatenate([b["sequence_valid"].ravel() for b in batches])
    assert valid.sum() == (6 if index == 0 else 5)
    assert valid[: valid.sum()].all()
    for b in batches:
      pad = ~b["sequence_valid"]
      assert not b["frames"][pad].any()
      assert not b["superpixel_valid"][pad].any()
      seen += [tuple(f[:, 0, 0, 0]) for f in b["frames"][b["sequence_valid"]]]
  assert len(seen) == 16 == len(set(seen))
