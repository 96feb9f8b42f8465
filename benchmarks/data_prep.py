r"""Speed of the offline phase and of the readers.

  python benchmarks/data_prep.py            # writes a section to RESULTS.md
  python benchmarks/data_prep.py --quick    # fewer repetitions, no writing

Measures, on this machine:
1. the still-image pipeline at 256 x 256 (synthesis of a 3-frame sequence,
   SLIC 300 on every frame, adjacency, PNG encoding and serialisation), in
   sequences per second on one core, plus the RBD pseudo mask per image;
2. seconds per 480p (854 x 480) frame for SLIC (1000 segments), ISEC (f_order
   11, nit 4) and felzenszwalb, with the segment counts;
3. training records per second decoded and batched by the input pipeline.
Inputs are the images bundled with scikit-image (no download).
"""

import argparse
import datetime
import os
import runpy
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import skimage.transform  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import bundled  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import saliency  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import still_images  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import superpixels  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  path = os.path.join(REPO, "configs", "davis.py")
  config = runpy.run_path(path)["get_config"]()
  config.prep.num_workers = 1
  config.prep.images_per_shard = 4
  return config


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def bench_superpixels(images, repeats):
  config = _config().eval_superpixels
  config.max_superpixels = 100000
  rows = []
  for method, extra in (
      ("slic", {"slic_n_segments": 1000}),
      ("isec", {}),
      ("felzenszwalb", {}),
  ):
    config.method = method
    for k, v in extra.items():
      config[k] = v
    seconds, counts = [], []
    for image in images:
      t, seg = _timed(lambda: superpixels.compute(image, config), repeats)
      seconds.append(t)
      counts.append(int(seg.max()) + 1)
    rows.append((method, statistics.median(seconds), min(counts), max(counts)))
  return rows


def bench_pipeline(tmp, num_images, repeats):
  config = _config()
  images_dir = os.path.join(tmp, "images")
  all_files = bundled.export_bundled_images(images_dir)
  files = all_files[:num_images]
  sal_dir = os.path.join(tmp, "saliency")
  start = time.perf_counter()
  saliency.write_maps(all_files, images_dir, sal_dir, num_workers=1)
  rbd_seconds = (time.perf_counter() - start) / len(all_files)
  config.prep.images_dir = images_dir
  config.prep.saliency_dir = sal_dir
  config.prep.sequences_per_image = 4
  features = input_pipeline.sequence_features()
  ctx = still_images._Context(  # pylint: disable=protected-access
      images_dir=images_dir,
      saliency_dir=sal_dir,
      split_files=tuple(files),
      prep=config.prep,
      superpixels=config.train_superpixels,
      seed=0,
  )
  # Warm the source cache: decoding inputs is not what we measure.
  for f in files:
    still_images._load_source(ctx, f)  # pylint: disable=protected-access

  def run():
    n = 0
    for f in files:
      for example in still_images.sequence_examples(f, ctx):
        features.serialize_example(example)
        n += 1
    return n

  seconds, n = _timed(run, repeats)
  data_dir = os.path.join(tmp, "data")
  dataset_dir = still_images.prepare(config, data_dir)
  return n / seconds, rbd_seconds, dataset_dir


def bench_reader(dataset_dir, num_batches):
  """Records per second in steady state (after the first batch)."""
  ds = input_pipeline.sequence_dataset(
      dataset_dir,
      "train",
      global_batch_size=8,
      num_local_devices=1,
      max_superpixels=400,
      shuffle_buffer=64,
  )
  it = ds.as_numpy_iterator()
  next(it)  # Start-up: opening files, tracing the map functions.
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return 8 * num_batches / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
      "--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  args = parser.parse_args()
  repeats = 1 if args.quick else 3
  with tempfile.TemporaryDirectory() as tmp:
    names = bundled.export_bundled_images(os.path.join(tmp, "frames"))
    frames = []
    for name in names[: 3 if args.quick else 6]:
      image = still_images.load_image(os.path.join(tmp, "frames", name))
      frames.append(
          (skimage.transform.resize(image, (480, 854), order=1) * 255).astype(
              np.uint8
          )
      )
    sp_rows = bench_superpixels(frames, repeats)
    seq_per_s, rbd_s, dataset_dir = bench_pipeline(
        tmp, 4 if args.quick else 12, repeats
    )
    records_per_s = bench_reader(dataset_dir, 10 if args.quick else 60)

  machine = results.machine_description()
  lines = [
      f"## Offline phase ({datetime.date.today().isoformat()})",
      "",
      "Command: `python benchmarks/data_prep.py`; machine: "
      + machine
      + "; one process (per core).",
      "",
      "| what | result |",
      "|---|---|",
      (
          "| still-image pipeline, 256x256, 3 frames, SLIC 300 |"
          f" {seq_per_s:.1f} sequences/s per core |"
      ),
      (
          f"| RBD pseudo mask (image shrunk to <= 400 px) | {rbd_s:.3f} s per"
          " image |"
      ),
  ]
  for method, seconds, lo, hi in sp_rows:
    lines.append(
        f"| {method} at 854x480 | {seconds:.3f} s per frame, {lo}-{hi}"
        " segments |"
    )
  lines.append(
      "| input pipeline, training records decoded and batched |"
      f" {records_per_s:.0f} records/s |"
  )
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.quick:
    results.prepend_section(args.out, text)


if __name__ == "__main__":
  main()
