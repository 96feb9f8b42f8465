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
from collections.abc import Sequence
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
      # The labels at original_size, only when preparation resized the
      # video (config.eval_data.resize_height), else no frames: results are
      # scored at the source's own resolution, as the official tools do.
      "full_labels": _id_maps(np.uint8),
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


# Image sequences stay encoded through the shuffle buffer (a decoded 256x256
# training example is ~2 MB, encoded ~0.1 MB) and are decoded by `_parse`.
_DECODERS = {
    "frames": tfds.decode.SkipDecoding(),
    "labels": tfds.decode.SkipDecoding(),
    "superpixels": tfds.decode.SkipDecoding(),
    "full_labels": tfds.decode.SkipDecoding(),
}


def _decoders(builder) -> dict:
  """_DECODERS for the features this dataset has (older datasets lack some)."""
  return {k: v for k, v in _DECODERS.items() if k in builder.info.features}


def _decode_maps(encoded, dtype):
  """string [T] of 1-channel PNGs -> int32 [T, H, W]."""
  maps = tf.map_fn(
      lambda x: tf.io.decode_png(x, channels=1, dtype=dtype),
      encoded,
      fn_output_signature=tf.TensorSpec([None, None, 1], dtype),
  )
  return tf.cast(maps[..., 0], tf.int32)


def _parse(example, max_superpixels: int):
  """Example with encoded images -> fixed-width tensors with validity masks."""
  frames = _decode_frames(example["frames"])
  num_frames = tf.shape(frames)[0]
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
      "frames": frames,
      "labels": _decode_maps(example["labels"], tf.uint8),
      "superpixels": _decode_maps(example["superpixels"], tf.uint16),
      "num_superpixels": counts,
      "superpixel_valid": tf.sequence_mask(counts, max_superpixels),
      "edges": edges,
      "edge_valid": edge_valid,
      "num_objects": example["num_objects"],
  }


def _epoch_seed(seed: int, epoch: int) -> int:
  """A shuffle seed per (seed, epoch): every epoch's order is addressable."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _process_split(
    builder, split, process_index, process_count, drop_remainder=True
):
  """This process's share of the examples of `split`.

  With `drop_remainder` every process gets exactly total // process_count
  examples (training: equal steps everywhere); without it every example is
  read by one process (evaluation).
  """
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(
        f"{builder.data_dir} has no split {split!r}; it has"
        f" {sorted(splits.keys())}."
    )
  total = splits[split].num_examples
  if total < process_count:
    raise ValueError(
        f"Split {split!r} of {builder.data_dir} has {total} examples but"
        f" {process_count} processes read it: every process needs at least"
        " one. Prepare more data or run on fewer hosts."
    )
  sub = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[
      process_index
  ]
  return sub, total // process_count


def batch_sizes(
    global_batch_size: int, num_local_devices: int, process_count: int
) -> tuple[int, int]:
  """(per-device, per-process) batch sizes; an error if they do not divide."""
  devices = process_count * num_local_devices
  if global_batch_size % devices:
    raise ValueError(
        f"config.batch_size={global_batch_size} is not divisible by the"
        f" {devices} devices ({process_count} processes x"
        f" {num_local_devices} local devices); use a multiple of {devices}."
    )
  per_device = global_batch_size // devices
  return per_device, per_device * num_local_devices


def steps_per_epoch(
    dataset_dir: str,
    split: str,
    *,
    global_batch_size: int,
    process_count: int = 1,
) -> int:
  """Full batches per epoch; the same on every process (each drops the rest)."""
  builder = load_builder(dataset_dir)
  _, per_process = _process_split(builder, split, 0, process_count)
  return per_process // (global_batch_size // process_count)


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
    repeat: bool = False,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    pad_to_full_batches: bool = False,
    shuffle_buffer: int = 1024,
    prefetch: int = 2,
) -> tf.data.Dataset:
  """Training sequences, batched per local device.

  Each element is a dict of arrays with leading axes
  [num_local_devices, per_device_batch, T, ...]:
    frames uint8 [.., T, S, S, 3]; labels, superpixels int32 [.., T, S, S];
    num_superpixels int32 [.., T]; superpixel_valid bool [.., T, N_max];
    edges int32 [.., T, E_max, 2] and edge_valid bool [.., T, E_max] with
    E_max = 3 N_max; num_objects int32 [..]; sequence_valid bool [..] (False
    on padding).

  Without `repeat` this is one epoch of `steps_per_epoch` batches whose order
  is a function of (seed, epoch) alone, so a resumed run can start any epoch
  at any batch and see exactly what an uninterrupted run saw.

  Args:
    dataset_dir: a prepared sequences dataset, `<data_dir>/<name>/<version>`.
    split: 'train' or 'validation'.
    global_batch_size: sequences per step over all processes and devices.
    num_local_devices: devices of this process (`jax.local_device_count()`).
    max_superpixels: N_max; a frame with more is an error.
    process_index: this process (`jax.process_index()`); it reads its own
      equal share of the examples (`tfds.even_splits`).
    process_count: `jax.process_count()`.
    shuffle: shuffle files and examples.
    repeat: repeat forever (benchmarks, previews); training chains epochs.
    seed: shuffle seed.
    epoch: which epoch's order to produce.
    skip_batches: batches of this epoch to leave out (resuming mid-epoch);
      the skipped examples are read but not decoded.
    pad_to_full_batches: evaluation: every example of the split is read once
      by one process and the last batches are completed with all-zero
      sequences (sequence_valid False), the same number of batches on every
      process.
    shuffle_buffer: examples in the shuffle buffer.
    prefetch: batches prepared ahead.
  """
  per_device, local_batch = batch_sizes(
      global_batch_size, num_local_devices, process_count
  )
  builder = load_builder(dataset_dir)
  sub_split, _ = _process_split(
      builder,
      split,
      process_index,
      process_count,
      drop_remainder=not pad_to_full_batches,
  )
  epoch_seed = _epoch_seed(seed, epoch)
  # Order: this process's share of the examples, interleave the shard files,
  # shuffle the encoded examples (before repeat), skip what a resumed run has
  # already seen, decode with the shared spec, batch with drop_remainder,
  # split the batch over local devices, prefetch.
  ds = builder.as_dataset(
      split=sub_split,
      shuffle_files=shuffle,
      read_config=tfds.ReadConfig(
          shuffle_seed=epoch_seed,
          # Parallel reads of several shards; the order is still a function
          # of the seed because interleave is deterministic by default.
          interleave_cycle_length=4,
      ),
      decoders=_decoders(builder),
  )
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=epoch_seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.skip(skip_batches * local_batch)
  ds = ds.map(
      lambda ex: dict(
          _parse(ex, max_superpixels), sequence_valid=tf.constant(True)
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  if pad_to_full_batches:
    # Every process runs the same number of batches (collectives would hang
    # otherwise): enough for the largest share, ceil(total / processes).
    total = builder.info.splits[split].num_examples
    largest_share = -(-total // process_count)
    padded = -(-largest_share // local_batch) * local_batch
    padding = ds.take(1).map(
        lambda ex: dict(
            tf.nest.map_structure(tf.zeros_like, ex),
            sequence_valid=tf.constant(False),
        )
    )
    ds = ds.concatenate(padding.repeat()).take(padded)
  ds = ds.batch(local_batch, drop_remainder=True)

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


def training_batches(
    dataset_dir: str,
    *,
    start_step: int,
    **kwargs,
):
  """Endless training batches (NumPy) from step `start_step` on.

  Epoch e is `sequence_dataset(..., epoch=e)`; step s is batch
  s % steps_per_epoch of epoch s // steps_per_epoch, so resuming at any step
  continues the exact stream of an uninterrupted run.

  Args:
    dataset_dir: a prepared sequences dataset.
    start_step: the first step to produce.
    **kwargs: `sequence_dataset` arguments (not split, epoch, skip_batches,
      repeat); split is 'train'.

  Yields:
    dicts of NumPy arrays as `sequence_dataset` describes.
  """
  per_epoch = steps_per_epoch(
      dataset_dir,
      "train",
      global_batch_size=kwargs["global_batch_size"],
      process_count=kwargs.get("process_count", 1),
  )
  if per_epoch < 1:
    raise ValueError(
        f"{dataset_dir} has too few training sequences for one batch of"
        f" {kwargs['global_batch_size']}; lower config.batch_size or prepare"
        " more data."
    )
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    ds = sequence_dataset(
        dataset_dir, "train", epoch=epoch, skip_batches=skip, **kwargs
    )
    yield from ds.as_numpy_iterator()
    epoch, skip = epoch + 1, 0


def video_dataset(
    dataset_dir: str,
    split: str,
    *,
    max_superpixels: int,
    time_bucket: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 1,
    videos: Sequence[str] | None = None,
) -> tf.data.Dataset:
  """Evaluation videos, one at a time, time padded to a multiple of a bucket.

  `videos`: only the videos of these names (filtered before decoding).

  Each element is one video: frames uint8 [T', H, W, 3] with T' the frame
  count rounded up to a multiple of `time_bucket` (so a compiled scan is
  reused across videos), frame_valid bool [T'], labels / superpixels int32
  [T', H, W], has_label bool [T'], num_superpixels int32 [T'],
  superpixel_valid bool [T', N_max], edges int32 [T', E_max, 2], edge_valid
  bool [T', E_max], plus num_frames, num_objects, object_first_frame [K],
  original_size [2], video_name and frame_names [T] (unpadded strings),
  full_labels_png string [T or 0]: the PNGs of the labels at original_size
  when the video was resized at preparation (decode with
  `decode_full_labels`; empty for datasets written before this field).
  Padded frames are all-zero with empty validity masks.
  """
  builder = load_builder(dataset_dir)
  sub_split, _ = _process_split(
      builder, split, process_index, process_count, drop_remainder=False
  )
  ds = builder.as_dataset(
      split=sub_split, shuffle_files=False, decoders=_decoders(builder)
  )
  if videos is not None:
    wanted = tf.constant(list(videos) or [""], tf.string)
    ds = ds.filter(
        lambda e: tf.reduce_any(tf.equal(e["video_name"], wanted))
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
    out["full_labels_png"] = (
        example["full_labels"]
        if "full_labels" in example
        else tf.zeros([0], tf.string)
    )
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


def video_names(dataset_dir: str, split: str) -> list[str]:
  """The names of a prepared video dataset's videos, in its order."""
  builder = load_builder(dataset_dir)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders=_decoders(builder)
  )
  return [
      name.decode()
      for name in ds.map(lambda e: e["video_name"]).as_numpy_iterator()
  ]


def decode_full_labels(video: dict[str, Any]) -> np.ndarray | None:
  """uint8 [T, H0, W0] labels at the original size, or None if not stored."""
  encoded = video.get("full_labels_png")
  if encoded is None or not len(encoded):
    return None
  return np.stack([
      tf.io.decode_png(png, channels=1).numpy()[..., 0] for png in encoded
  ])
