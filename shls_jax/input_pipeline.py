"""The one TFRecord feature spec and the tf.data readers.

Two record kinds, both stored as TFDS datasets (sharded TFRecords plus the
`dataset_info.json` / `features.json` metadata that
`tfds.builder_from_directory` reads):

* sequences (training): one example per synthetic frame-mask sequence made
  from one still image (SPEC 2.2);
* videos (evaluation): one example per video with its first-frame (and any
  other) annotations (SPEC 2.4).

`sequence_features()` and `video_features()` are the single definition of what
is on disk: the writers in `data_prep/` serialise with them and the readers
below decode with them. README.md documents every field.

This module does not import jax: the offline phase uses it in worker
processes. Device and process counts are arguments.
"""

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# A superpixel adjacency graph is planar (regions of the plane touching along
# 4-connected borders), so it has at most 3N - 6 edges for N superpixels.
EDGES_PER_SUPERPIXEL = 3


def _frames(encoding: str) -> tfds.features.Sequence:
  # The writers pass already-encoded bytes; the decoder reads JPEG and PNG
  # alike, so `encoding` only names the usual format.
  return tfds.features.Sequence(
      tfds.features.Image(shape=(None, None, 3), encoding_format=encoding)
  )


def _id_maps(dtype) -> tfds.features.Sequence:
  return tfds.features.Sequence(
      tfds.features.Image(
          shape=(None, None, 1), dtype=dtype, encoding_format="png"
      )
  )


def _superpixel_fields() -> dict[str, Any]:
  return {
      # uint16 PNG per frame: superpixel ids 0..N_t-1.
      "superpixels": _id_maps(np.uint16),
      # int32 [T]: N_t.
      "num_superpixels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      # int32 [E, 3]: rows (frame t, a, b) with a < b for every pair of
      # superpixels of frame t that touch with 4-connectivity.
      "adjacency": tfds.features.Tensor(shape=(None, 3), dtype=np.int32),
  }


def sequence_features() -> tfds.features.FeaturesDict:
  """Features of one training sequence (T frames of S x S pixels)."""
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Text(),  # Stem of the source image.
      "sequence_index": tfds.features.Scalar(dtype=np.int32),
      "frames": _frames("png"),  # uint8 [T, S, S, 3], lossless.
      "labels": _id_maps(np.uint8),  # Object ids, 0 = background.
      "num_objects": tfds.features.Scalar(dtype=np.int32),  # Max id.
      **_superpixel_fields(),
  })


def video_features() -> tfds.features.FeaturesDict:
  """Features of one evaluation video (T frames of H x W pixels)."""
  return tfds.features.FeaturesDict({
      "video_name": tfds.features.Text(),
      "source": tfds.features.Text(),  # davis, youtube_vos, video, ...
      "frame_names": tfds.features.Sequence(tfds.features.Text()),
      # The original JPEG bytes where the frame is an unchanged file, PNG
      # otherwise.
      "frames": _frames("jpeg"),
      # Object ids, 0 = background, 255 = void; zeros where has_label is
      # False.
      "labels": _id_maps(np.uint8),
      "has_label": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "num_objects": tfds.features.Scalar(dtype=np.int32),
      # int32 [K]: first annotated frame of object k + 1 (YouTube-VOS
      # objects may appear after frame 0).
      "object_first_frame": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      # int32 [2]: (height, width) before any resize at preparation.
      "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
      **_superpixel_fields(),
  })


def load_builder(dataset_dir: str) -> tfds.core.DatasetBuilder:
  """Opens a prepared dataset folder (`<data_dir>/<name>/<version>`)."""
  if not tf.io.gfile.exists(os.path.join(dataset_dir, "dataset_info.json")):
    raise FileNotFoundError(
        f"{dataset_dir} is not a complete prepared dataset (no"
        " dataset_info.json). Prepare it with `python -m"
        " data_prep.still_images` or `python -m data_prep.videos`; if a"
        " preparation was interrupted, run the same command again to finish"
        " it."
    )
  return tfds.builder_from_directory(dataset_dir)


def _edges_per_frame(adjacency, num_frames, max_edges):
  """[E, 3] (frame, a, b) rows -> int32 [T, max_edges, 2] and bool mask."""
  ragged = tf.RaggedTensor.from_value_rowids(
      adjacency[:, 1:], adjacency[:, 0], nrows=num_frames
  )
  counts = ragged.row_lengths()
  tf.debugging.assert_less_equal(
      counts,
      tf.cast(max_edges, counts.dtype),
      message=(
          "a frame has more superpixel adjacency edges than"
          f" {EDGES_PER_SUPERPIXEL} x max_superpixels"
      ),
  )
  edges = ragged.to_tensor(default_value=0, shape=[num_frames, max_edges, 2])
  valid = tf.sequence_mask(counts, max_edges)
  return edges, valid


def _decode_frame(encoded):
  # INTEGER_ACCURATE decodes JPEG exactly as PIL does, which computed the
  # superpixels at preparation; TensorFlow's default IDCT differs by up to
  # 4 grey levels.
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(
          encoded, channels=3, dct_method="INTEGER_ACCURATE"
      ),
      lambda: tf.io.decode_png(encoded, channels=3),
  )


def _decode_frames(encoded):
  """string [T] -> uint8 [T, H, W, 3]."""
  return tf.map_fn(
      _decode_frame,
      encoded,
      fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
  )


# Frames are decoded by `_decode_frames`, everything else by TFDS.
_DECODERS = {"frames": tfds.decode.SkipDecoding()}


def _parse(example, max_superpixels: int):
  """Decoded TFDS example -> fixed-width tensors with validity masks."""
  example = dict(example, frames=_decode_frames(example["frames"]))
  num_frames = tf.shape(example["frames"])[0]
  counts = example["num_superpixels"]
  tf.debugging.assert_less_equal(
      tf.reduce_max(counts),
      max_superpixels,
      message=(
          "a frame has more superpixels than max_superpixels; raise"
          " config.*_superpixels.max_superpixels or prepare the data with"
          " fewer segments"
      ),
  )
  edges, edge_valid = _edges_per_frame(
      example["adjacency"], num_frames, EDGES_PER_SUPERPIXEL * max_superpixels
  )
  return {
      "frames": example["frames"],
      "labels": tf.cast(example["labels"][..., 0], tf.int32),
      "superpixels": tf.cast(example["superpixels"][..., 0], tf.int32),
      "num_superpixels": counts,
      "superpixel_valid": tf.sequence_mask(counts, max_superpixels),
      "edges": edges,
      "edge_valid": edge_valid,
      "num_objects": example["num_objects"],
  }


def _read_config(seed, process_index, process_count):
  return tfds.ReadConfig(
      shuffle_seed=seed,
      input_context=tf.distribute.InputContext(
          num_input_pipelines=process_count, input_pipeline_id=process_index
      ),
      # Parallel reads of several shards; the order is still a function of
      # the seed because interleave is deterministic by default.
      interleave_cycle_length=4,
  )


def _check_split(builder, split, process_count):
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(
        f"{builder.data_dir} has no split {split!r}; it has"
        f" {sorted(splits.keys())}."
    )
  num_shards = splits[split].num_shards
  if num_shards < process_count:
    raise ValueError(
        f"Split {split!r} of {builder.data_dir} has {num_shards} shard files"
        f" but {process_count} processes read it: every process needs at"
        " least one file. Prepare the data with a smaller images_per_shard"
        " (config.prep.images_per_shard) or run on fewer hosts."
    )


def sequence_dataset(
    dataset_dir: str,
    split: str,
    *,
    global_batch_size: int,
    num_local_devices: int,
    max_superpixels: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    repeat: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    prefetch: int = 2,
) -> tf.data.Dataset:
  """Training sequences, batched per local device.

  Each element is a dict of arrays with leading axes
  [num_local_devices, per_device_batch, T, ...]:
    frames uint8 [.., T, S, S, 3]; labels, superpixels int32 [.., T, S, S];
    num_superpixels int32 [.., T]; superpixel_valid bool [.., T, N_max];
    edges int32 [.., T, E_max, 2] and edge_valid bool [.., T, E_max] with
    E_max = 3 N_max; num_objects int32 [..].

  Args:
    dataset_dir: a prepared sequences dataset, `<data_dir>/<name>/<version>`.
    split: 'train' or 'validation'.
    global_batch_size: sequences per step over all processes and devices.
    num_local_devices: devices of this process (`jax.local_device_count()`).
    max_superpixels: N_max; a frame with more is an error.
    process_index: this process (`jax.process_index()`); it reads its own
      subset of the shard files.
    process_count: `jax.process_count()`.
    shuffle: shuffle files and examples.
    repeat: repeat forever (training) or read once.
    seed: shuffle seed.
    shuffle_buffer: examples in the shuffle buffer.
    prefetch: batches prepared ahead.
  """
  devices = process_count * num_local_devices
  if global_batch_size % devices:
    raise ValueError(
        f"config.batch_size={global_batch_size} is not divisible by the"
        f" {devices} devices ({process_count} processes x"
        f" {num_local_devices} local devices); use a multiple of {devices}."
    )
  per_device = global_batch_size // devices
  builder = load_builder(dataset_dir)
  _check_split(builder, split, process_count)
  # Order: shard files per process (input_context), interleave, decode with
  # the shared spec, shuffle before repeat, batch with drop_remainder, split
  # the batch over local devices, prefetch.
  ds = builder.as_dataset(
      split=split,
      shuffle_files=shuffle,
      read_config=_read_config(seed, process_index, process_count),
      decoders=_DECODERS,
  )
  ds = ds.map(
      lambda ex: _parse(ex, max_superpixels),
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(per_device * num_local_devices, drop_remainder=True)

  def per_device_split(batch):
    return tf.nest.map_structure(
        lambda x: tf.reshape(
            x,
            tf.concat([[num_local_devices, per_device], tf.shape(x)[1:]], 0),
        ),
        batch,
    )

  ds = ds.map(per_device_split, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(prefetch)


def video_dataset(
    dataset_dir: str,
    split: str,
    *,
    max_superpixels: int,
    time_bucket: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 1,
) -> tf.data.Dataset:
  """Evaluation videos, one at a time, time padded to a multiple of a bucket.

  Each element is one video: frames uint8 [T', H, W, 3] with T' the frame
  count rounded up to a multiple of `time_bucket` (so a compiled scan is
  reused across videos), frame_valid bool [T'], labels / superpixels int32
  [T', H, W], has_label bool [T'], num_superpixels int32 [T'],
  superpixel_valid bool [T', N_max], edges int32 [T', E_max, 2], edge_valid
  bool [T', E_max], plus num_frames, num_objects, object_first_frame [K],
  original_size [2], video_name and frame_names [T] (unpadded strings).
  Padded frames are all-zero with empty validity masks.
  """
  builder = load_builder(dataset_dir)
  _check_split(builder, split, process_count)
  ds = builder.as_dataset(
      split=split,
      shuffle_files=False,
      read_config=_read_config(0, process_index, process_count),
      decoders=_DECODERS,
  )

  def parse(example):
    out = _parse(example, max_superpixels)
    num_frames = tf.shape(example["frames"])[0]
    padded = (num_frames + time_bucket - 1) // time_bucket * time_bucket
    pad = padded - num_frames

    def pad_time(x):
      paddings = tf.concat(
          [[[0, pad]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], 0
      )
      return tf.pad(x, paddings)

    out = {k: pad_time(v) for k, v in out.items() if k != "num_objects"}
    out["has_label"] = pad_time(example["has_label"])
    out["frame_valid"] = tf.sequence_mask(num_frames, padded)
    out["num_frames"] = num_frames
    for key in (
        "num_objects",
        "object_first_frame",
        "original_size",
        "video_name",
        "frame_names",
        "source",
    ):
      out[key] = example[key]
    return out

  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(prefetch)
