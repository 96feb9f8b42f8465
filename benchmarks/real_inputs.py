r"""The paper config's sizes checked against real frames and photographs.

  python benchmarks/real_inputs.py --davis $DAVIS \
      --images $STILL/pascal_s/images,$STILL/sod/images
  python benchmarks/real_inputs.py --davis $DAVIS --max_videos 2 --no_write

Measures what the static shapes of `configs/davis.py` must hold, on every
frame of a DAVIS-layout folder (all sequences of ImageSets/2016/train.txt
and val.txt, or of ImageSets/2017 when there is no 2016 list) and on a
folder of still photographs:

1. ISEC superpixels per 480p frame (config.eval_superpixels, the paper
   setting): median, 95th / 99th percentile and maximum, with the frame
   that has the most (`eval_superpixels.max_superpixels` must hold them).
2. Frame 0 of every video split at its ground-truth mask's borders (the
   tracker's first step, SPEC 6.1 in docs/design.md): the superpixels it
   adds (`eval_superpixels.split_extra_superpixels`), N0 and N0 of the
   largest class (the memory's long-term part is 5 x N0_c, its cap 10 x
   N0, against `memory.capacity`).
3. The test box of the ground-truth object on every frame (tight box, each
   side enlarged by 0.3 / 2 of its extent, thin boxes take the full side):
   its height and width in pixels, against `model.decoder_crop_size` (the
   authors crop at the native box size).
4. On the photographs, resized to the training frame size: SLIC segments
   per frame (`train_superpixels.max_superpixels`) and the superpixels that
   splitting at the RBD pseudo mask adds (`loss.split_extra_superpixels`).

Counts from superpixel maps are exact, so they do not depend on the load of
the machine; the section records the seconds per frame as well.
"""

import argparse
import functools
import multiprocessing
import os
import runpy
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import skimage.measure  # pylint: disable=g-import-not-at-top,wrong-import-position
import skimage.transform  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import image_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import masks  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import saliency  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import superpixels  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import video_sources  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config() -> ml_collections.ConfigDict:
  return runpy.run_path(os.path.join(REPO, "configs", "davis.py"))[
      "get_config"
  ]()


def split_classes(segments: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Superpixels per class after cutting a map at a label map's borders.

  The rule of the tracker's first frame (`segments.split_at_label_borders`,
  written here in NumPy): pixels whose label differs from their
  superpixel's majority label become new superpixels, one per 4-connected
  component of pixels sharing (superpixel, label).

  Args:
    segments: int [H, W] ids 0..N-1.
    labels: int [H, W] values 0..255.

  Returns:
    int [256]: the superpixels of each label after the split (their sum is
    N0, the split map's count).
  """
  segments = segments.astype(np.int64)
  labels = labels.astype(np.int64)
  n = int(segments.max()) + 1
  counts = np.zeros((n, 256), np.int64)
  np.add.at(counts, (segments.ravel(), labels.ravel()), 1)
  majority = counts.argmax(1)
  per_class = np.bincount(majority[counts.sum(1) > 0], minlength=256)
  minority = labels != majority[segments]
  if minority.any():
    key = np.where(minority, segments * 256 + labels + 1, 0)
    components = skimage.measure.label(key, background=0, connectivity=1)
    first = np.zeros(components.max() + 1, np.int64)
    first[components.ravel()] = labels.ravel()
    per_class = per_class + np.bincount(first[1:], minlength=256)
  return per_class


def test_box(mask: np.ndarray, r: float, min_fraction: float):
  """(height, width) of the enlarged tight box of a mask (memory.object_box)."""
  h, w = mask.shape
  if not mask.any():
    return h, w
  rows = np.flatnonzero(mask.any(1))
  cols = np.flatnonzero(mask.any(0))
  sizes = []
  for lo, hi, size in ((rows[0], rows[-1] + 1, h), (cols[0], cols[-1] + 1, w)):
    extent = hi - lo
    lo = max(0, int(np.floor(lo - r / 2 * extent)))
    hi = min(size, int(np.ceil(hi + r / 2 * extent)))
    if hi - lo < min_fraction * size:
      lo, hi = 0, size
    sizes.append(hi - lo)
  return tuple(sizes)


def measure_video(ref, eval_data, sp_config, box_r, min_fraction) -> dict:
  """Worker: superpixel counts, the frame-0 split and boxes of one video."""
  video = video_sources.load_video(ref, eval_data)
  counts, seconds, boxes = [], [], []
  split = None
  for t, frame in enumerate(video.frames):
    start = time.perf_counter()
    segments = superpixels.compute(frame, sp_config, source=f"{ref.name}/{t}")
    seconds.append(time.perf_counter() - start)
    counts.append(int(segments.max()) + 1)
    labels = video.labels[t]
    if video.has_label[t]:
      objects = (labels > 0) & (labels < 255)
      boxes.append(test_box(objects, box_r, min_fraction))
    if t == 0:
      per_class = split_classes(segments, np.where(labels == 255, 0, labels))
      split = {
          "n": counts[0],
          "n0": int(per_class.sum()),
          "n0_classes": [int(c) for c in per_class[per_class > 0]],
      }
  return {
      "name": ref.name,
      "counts": counts,
      "seconds": seconds,
      "boxes": boxes,
      "split": split,
      "shape": video.frames.shape[1:3],
  }


def measure_photo(path, size, sp_config, rbd_superpixels) -> dict:
  """Worker: SLIC count and the pseudo-mask split of one resized photo."""
  image = image_io.load_image(path)
  soft = saliency.to_uint8(
      saliency.rbd_any_size(image, n_segments=rbd_superpixels)
  )
  ids = masks.object_ids_from_mask(soft > 0, min_region_fraction=0.001)
  frame = skimage.transform.resize(
      image, (size, size), order=1, preserve_range=True, anti_aliasing=True
  ).astype(np.uint8)
  labels = skimage.transform.resize(
      ids, (size, size), order=0, preserve_range=True, anti_aliasing=False
  ).astype(np.int64)
  segments = superpixels.compute(frame, sp_config, source=path)
  n = int(segments.max()) + 1
  return {"n": n, "n0": int(split_classes(segments, labels).sum())}


def _percentiles(values) -> str:
  values = np.asarray(values)
  return (
      f"median {np.median(values):.0f}, p95 {np.percentile(values, 95):.0f},"
      f" p99 {np.percentile(values, 99):.0f}, max {values.max()}"
  )


def davis_refs(root: str, max_videos: int, resize_height: int = 0):
  eval_data = _config().eval_data
  eval_data.path = root
  eval_data.resize_height = resize_height
  refs = []
  for split in ("train", "val"):
    eval_data.source = "davis2016"
    eval_data.split = split
    try:
      refs += video_sources.list_videos(eval_data)
    except video_sources.InputError:
      eval_data.source = "davis"
      refs += video_sources.list_videos(eval_data)
  if max_videos:
    refs = refs[:max_videos]
  return refs, eval_data


def run_davis(
    root: str, max_videos: int, workers: int, resize_height: int = 0
) -> list:
  config = _config()
  sp_config = config.eval_superpixels.copy_and_resolve_references()
  sp_config.max_superpixels = 1 << 16  # Measure, do not refuse.
  refs, eval_data = davis_refs(root, max_videos, resize_height)
  work = functools.partial(
      measure_video,
      eval_data=eval_data,
      sp_config=sp_config,
      box_r=config.memory.test_box_r,
      min_fraction=config.memory.min_box_fraction,
  )
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    videos = list(
        tqdm.tqdm(
            pool.imap(work, refs), total=len(refs), desc="DAVIS videos"
        )
    )
  counts = [c for v in videos for c in v["counts"]]
  names = [(c, v["name"], t) for v in videos for t, c in enumerate(v["counts"])]
  most = max(names)
  seconds = [s for v in videos for s in v["seconds"]]
  heights = [b[0] for v in videos for b in v["boxes"]]
  widths = [b[1] for v in videos for b in v["boxes"]]
  extra = [v["split"]["n0"] - v["split"]["n"] for v in videos]
  n0 = [v["split"]["n0"] for v in videos]
  largest_class = [max(v["split"]["n0_classes"]) for v in videos]
  shapes = sorted({tuple(v["shape"]) for v in videos})
  crop = config.model.decoder_crop_size
  return [
      (
          "DAVIS frames",
          f"{len(counts)} frames of {len(videos)} videos, sizes"
          f" {', '.join(f'{h}x{w}' for h, w in shapes)} (H x W)",
      ),
      (
          "ISEC superpixels per frame (f_order"
          f" {sp_config.isec_f_order}, nit {sp_config.isec_nit})",
          f"{_percentiles(counts)} ({most[1]} frame {most[2]}); mean"
          f" {np.mean(counts):.0f}; {np.mean(np.asarray(counts) > 1024):.1%}"
          " of frames above 1024",
      ),
      ("ISEC seconds per frame", f"median {statistics.median(seconds):.3f}"),
      (
          "frame 0 split at the mask: superpixels added",
          _percentiles(extra),
      ),
      ("frame 0 after the split: N0", _percentiles(n0)),
      (
          "frame 0 after the split: N0_c of the largest class",
          _percentiles(largest_class),
      ),
      (
          "memory rows a class may hold (cap 10 x N0; long-term part 5 x"
          " N0_c)",
          f"cap {_percentiles([10 * n for n in n0])}; long-term part"
          f" {_percentiles([5 * n for n in largest_class])}; config capacity"
          f" {config.memory.capacity}",
      ),
      (
          "test box height (px, r = 0.3)",
          f"{_percentiles(heights)}; config crop height {crop[0]}",
      ),
      (
          "test box width (px, r = 0.3)",
          f"{_percentiles(widths)}; config crop width {crop[1]}",
      ),
  ]


def run_photos(folders, max_photos: int, workers: int) -> list:
  config = _config()
  sp_config = config.train_superpixels.copy_and_resolve_references()
  sp_config.max_superpixels = 1 << 16
  paths = []
  for folder in folders:
    paths += [
        os.path.join(folder, n) for n in image_io.list_images(folder)
    ]
  if max_photos:
    paths = paths[:max_photos]
  work = functools.partial(
      measure_photo,
      size=config.prep.image_size,
      sp_config=sp_config,
      rbd_superpixels=config.prep.rbd_superpixels,
  )
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    photos = list(
        tqdm.tqdm(
            pool.imap(work, paths, chunksize=8),
            total=len(paths),
            desc="photos",
        )
    )
  size = config.prep.image_size
  return [
      (
          f"photos, resized to {size} x {size}",
          f"{len(photos)} from {', '.join(os.path.basename(os.path.dirname(f.rstrip('/'))) or f for f in folders)}",
      ),
      (
          f"SLIC superpixels per frame (n_segments {sp_config.slic_n_segments},"
          f" compactness {sp_config.slic_compactness})",
          f"{_percentiles([p['n'] for p in photos])}; config"
          f" max_superpixels {sp_config.max_superpixels and config.train_superpixels.max_superpixels}",
      ),
      (
          "frame 0 split at the RBD pseudo mask: superpixels added",
          f"{_percentiles([p['n0'] - p['n'] for p in photos])}; config"
          f" split room {config.loss.split_extra_superpixels}",
      ),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--davis", default="", help="DAVIS-layout root.")
  parser.add_argument(
      "--images", default="", help="Comma-separated folders of photographs."
  )
  parser.add_argument("--max_videos", type=int, default=0)
  parser.add_argument(
      "--resize_height",
      type=int,
      default=0,
      help="Frames resized to this height first (0 = 480p as stored).",
  )
  parser.add_argument("--max_photos", type=int, default=0)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument(
      "--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  args = parser.parse_args()
  if not (args.davis or args.images):
    parser.error("give --davis, --images or both")
  rows = []
  if args.davis:
    rows += run_davis(
        args.davis, args.max_videos, args.workers, args.resize_height
    )
  if args.images:
    rows += run_photos(
        [f for f in args.images.split(",") if f], args.max_photos, args.workers
    )
  command = "python benchmarks/real_inputs.py" + (
      " --davis $DAVIS" if args.davis else ""
  ) + (
      f" --resize_height {args.resize_height}" if args.resize_height else ""
  ) + (" --images $IMAGES" if args.images else "")
  lines = results.table_section(
      "Real inputs against the paper config's sizes"
      + (f" (frames at {args.resize_height}p)" if args.resize_height else ""),
      command,
      results.machine_description(),
      rows,
  )
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_write:
    results.prepend_section(args.results, text)


if __name__ == "__main__":
  main()
