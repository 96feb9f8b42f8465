"""Sharded, parallel, resumable TFDS dataset writing.

`write_dataset` turns a list of items per split (image paths, video
references) into TFRecord shards in the TFDS file layout, then writes the
TFDS metadata so `tfds.builder_from_directory` reads the result.

Guarantees:
* A shard file appears under its final name only when complete: workers
  write `.tmp-*` files and `os.replace` them. Next to each shard, a small
  record of its example count (in `.shards/`) is written before the rename,
  so a shard is finished exactly when both exist.
* Rerunning after an interruption keeps finished shards and redoes the rest.
  A `manifest.json` of the settings refuses to mix shards made with other
  settings.
* The TFDS metadata is written last: a half-written dataset is never
  readable by the readers, which open it through that metadata.
* Every item gets its own random seed, derived from the global seed and the
  item's key: the output does not depend on the number of workers or on
  which shards were finished before.
"""

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
import tqdm

from data_prep import superpixels

VERSION = "1.0.0"
_SHARD_TEMPLATE = "{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


class DatasetMismatchError(ValueError):
  """The output folder holds a dataset made with other settings."""


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of uint8 [H, W] / [H, W, 3] or uint16 [H, W]."""
  buffer = io.BytesIO()
  # A low zlib level: id maps compress well anyway and writing is faster.
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def superpixel_fields(frames, sp_config, source: str) -> dict:
  """Superpixels, counts and adjacency of frames uint8 [T, H, W, 3]."""
  maps, counts, edges = [], [], []
  for t, frame in enumerate(frames):
    seg = superpixels.compute(frame, sp_config, source=f"{source} frame {t}")
    pairs = superpixels.adjacency(seg)
    maps.append(encode_png(seg.astype(np.uint16)))
    counts.append(int(seg.max()) + 1)
    edges.append(
        np.concatenate([np.full((len(pairs), 1), t, np.int32), pairs], 1)
    )
  return {
      "superpixels": maps,
      "num_superpixels": np.asarray(counts, np.int32),
      "adjacency": np.concatenate(edges, 0).astype(np.int32).reshape(-1, 3),
  }


def summarize(dataset_dir: str) -> str:
  """A few lines about a prepared dataset: splits, examples, shards, size."""
  with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
    info = json.load(f)
  lines = [f"{dataset_dir}:"]
  for split in info.get("splits", []):
    lengths = [int(n) for n in split.get("shardLengths", [])]
    size = int(split.get("numBytes", 0)) / 2**20
    lines.append(
        f"  {split['name']}: {sum(lengths)} examples in {len(lengths)} shards,"
        f" {size:.1f} MiB"
    )
  return "\n".join(lines)


def item_seed(seed: int, key: str) -> np.random.SeedSequence:
  """A seed for one item that depends only on the global seed and its key."""
  return np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8"))])


def atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  raise TypeError(f"{type(value).__name__} cannot be written to JSON.")


def _to_json(value: Any) -> str:
  return json.dumps(value, indent=2, sort_keys=True, default=_jsonable)


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_bytes(path, _to_json(value).encode())


@dataclasses.dataclass(frozen=True)
class _Shard:
  split: str
  index: int
  count: int
  items: tuple
  filename: str


def _shards(name, splits, items_per_shard) -> list[_Shard]:
  shards = []
  for split, items in splits.items():
    count = max(1, -(-len(items) // items_per_shard))
    for index in range(count):
      chunk = tuple(
          items[index * items_per_shard : (index + 1) * items_per_shard]
      )
      filename = _SHARD_TEMPLATE.format(
          name=name, split=split, index=index, count=count
      )
      shards.append(_Shard(split, index, count, chunk, filename))
  return shards


def _write_shard(shard, dataset_dir, features_fn, make_examples):
  """Worker: writes one shard under a temporary name, then renames it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

  # Workers only serialise: they must not take accelerator memory.
  tf.config.set_visible_devices([], "GPU")
  features = features_fn()
  serializer = example_serializer.ExampleSerializer(
      features.get_serialized_info()
  )
  path = os.path.join(dataset_dir, shard.filename)
  tmp = os.path.join(dataset_dir, f".tmp-{shard.filename}-{os.getpid()}")
  num_examples = 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for item in shard.items:
        for example in make_examples(item):
          # deterministic=True: protobuf map order otherwise varies
          # between processes, and shards must not depend on the worker.
          proto = serializer.get_tf_example(features.encode_example(example))
          writer.write(proto.SerializeToString(deterministic=True))
          num_examples += 1
    info = {"num_examples": num_examples, "num_bytes": os.path.getsize(tmp)}
    atomic_write_json(_done_path(dataset_dir, shard.filename), info)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return shard.filename, len(shard.items)


def _done_path(dataset_dir, filename):
  return os.path.join(dataset_dir, ".shards", filename + ".json")


def _is_done(dataset_dir, filename):
  return os.path.exists(os.path.join(dataset_dir, filename)) and os.path.exists(
      _done_path(dataset_dir, filename)
  )


def _check_manifest(dataset_dir, manifest):
  path = os.path.join(dataset_dir, "manifest.json")
  manifest = json.loads(_to_json(manifest))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != manifest:
      keys = sorted(
          k
          for k in set(previous) | set(manifest)
          if previous.get(k) != manifest.get(k)
      )
      raise DatasetMismatchError(
          f"{dataset_dir} already holds a dataset prepared with other"
          f" settings (they differ in: {', '.join(keys)}). Nothing was"
          " changed. Choose another data_dir or dataset name, or delete that"
          " folder to rebuild it."
      )
  else:
    atomic_write_json(path, manifest)


def write_dataset(
    *,
    data_dir: str,
    name: str,
    splits: dict[str, Sequence[Any]],
    features_fn: Callable[[], Any],
    make_examples: Callable[[Any], Iterable[dict]] | dict[str, Callable],
    items_per_shard: int,
    manifest: dict,
    num_workers: int = 0,
    description: str = "",
    unit: str = "items",
) -> str:
  """Writes (or finishes writing) a TFDS dataset; returns its folder.

  Args:
    data_dir: root folder; the dataset goes to `<data_dir>/<name>/1.0.0`.
    name: dataset name (lower case, digits and underscores).
    splits: split name -> items (picklable; e.g. paths). Empty splits are
      left out.
    features_fn: module-level function returning the FeaturesDict (workers
      call it, so it must be picklable).
    make_examples: picklable function item -> iterable of example dicts in
      the form `features_fn().serialize_example` takes, or a dict of them by
      split. Exceptions stop the run; finished shards stay.
    items_per_shard: items per shard file.
    manifest: everything that determines the content (settings, item lists);
      a rerun with a different manifest is refused.
    num_workers: processes; 0 = one per CPU core, 1 = in this process.
    description: stored in the TFDS metadata.
    unit: name of an item in the progress bar.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = {k: list(v) for k, v in splits.items() if len(v)}
  if not splits:
    raise ValueError(f"Nothing to write for {name}: every split is empty.")
  dataset_dir = os.path.join(data_dir, name, VERSION)
  os.makedirs(os.path.join(dataset_dir, ".shards"), exist_ok=True)
  manifest = dict(manifest, items_per_shard=items_per_shard, splits=splits)
  _check_manifest(dataset_dir, manifest)
  # Leftovers of a killed run (one writer per folder at a time).
  for leftover in os.listdir(dataset_dir):
    if leftover.startswith(".tmp-"):
      os.remove(os.path.join(dataset_dir, leftover))

  if not isinstance(make_examples, dict):
    make_examples = {split: make_examples for split in splits}
  shards = _shards(name, splits, items_per_shard)
  todo = [s for s in shards if not _is_done(dataset_dir, s.filename)]
  total = sum(len(s.items) for s in shards)
  done_items = total - sum(len(s.items) for s in todo)
  num_workers = num_workers or os.cpu_count() or 1
  num_workers = max(1, min(num_workers, len(todo)))
  bar = tqdm.tqdm(
      total=total, initial=done_items, unit=unit, desc=f"Writing {name}"
  )
  with bar:
    if num_workers == 1:
      for shard in todo:
        _, n = _write_shard(
            shard, dataset_dir, features_fn, make_examples[shard.split]
        )
        bar.update(n)
    else:
      # spawn: TensorFlow in a forked child of a process that already
      # initialised it can hang.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=context
      ) as pool:
        futures = [
            pool.submit(
                _write_shard,
                shard,
                dataset_dir,
                features_fn,
                make_examples[shard.split],
            )
            for shard in todo
        ]
        try:
          for future in concurrent.futures.as_completed(futures):
            _, n = future.result()
            bar.update(n)
        except BaseException:
          for future in futures:
            future.cancel()
          raise

  split_infos = []
  for split in splits:
    lengths, num_bytes = [], 0
    for shard in (s for s in shards if s.split == split):
      with open(_done_path(dataset_dir, shard.filename)) as f:
        info = json.load(f)
      lengths.append(info["num_examples"])
      num_bytes += info["num_bytes"]
    split_infos.append(
        tfds.core.SplitInfo(
            name=split, shard_lengths=lengths, num_bytes=num_bytes
        )
    )
  tfds.folder_dataset.write_metadata(
      data_dir=dataset_dir,
      features=features_fn(),
      split_infos=split_infos,
      check_data=False,
      description=description,
  )
  return dataset_dir
