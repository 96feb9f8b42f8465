"""The demo data step of the embedded default: build, read back, show."""

import os

import imageio.v3 as iio
import jax
import numpy as np
import skimage.segmentation

from data_prep import demo
from data_prep import writer
from data_prep import masks
from shls_jax import input_pipeline


def preview(batch: dict, num_sequences: int = 4) -> np.ndarray:
  """A picture of sequences: rows of [frame | labels | superpixels] per frame.

  Args:
    batch: one element of `input_pipeline.sequence_dataset`, as NumPy.
    num_sequences: rows to draw.

  Returns:
    uint8 [rows * S, 3 * T * S, 3].
  """
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  palette = masks.davis_palette()
  rows = []
  for i in range(min(num_sequences, len(flat["frames"]))):
    tiles = []
    for t in range(flat["frames"].shape[1]):
      frame = flat["frames"][i, t]
      labels = palette[flat["labels"][i, t]]
      overlay = (0.5 * frame + 0.5 * labels).astype(np.uint8)
      bounds = skimage.segmentation.mark_boundaries(
          frame, flat["superpixels"][i, t], color=(1, 1, 0)
      )
      tiles += [frame, overlay, (bounds * 255).astype(np.uint8)]
    rows.append(np.concatenate(tiles, axis=1))
  return np.concatenate(rows, axis=0)


def run(config, data_dir: str) -> str:
  """Builds the demo dataset, reads a batch back, writes a preview."""
  dataset_dir = demo.prepare(config, data_dir)
  ds = input_pipeline.sequence_dataset(
      dataset_dir,
      "train",
      global_batch_size=config.batch_size,
      num_local_devices=jax.local_device_count(),
      max_superpixels=config.train_superpixels.max_superpixels,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      seed=config.seed,
      shuffle_buffer=config.shuffle_buffer,
  )
  batch = next(iter(ds.as_numpy_iterator()))
  path = os.path.join(data_dir, "demo_preview.png")
  iio.imwrite(path, preview(batch))
  shapes = "\n".join(
      f"    {k}: {v.dtype} {list(v.shape)}" for k, v in sorted(batch.items())
  )
  counts = batch["num_superpixels"]
  return (
      f"{writer.summarize(dataset_dir)}\n"
      f"  one training batch [devices, per-device batch, ...]:\n{shapes}\n"
      f"  superpixels per frame: {counts.min()}..{counts.max()}, objects per"
      f" sequence: {batch['num_objects'].min()}..{batch['num_objects'].max()}\n"
      f"  preview (frame | labels | superpixels): {path}"
  )
