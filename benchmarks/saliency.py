r"""The built-in RBD detector scored on real salient-object benchmarks.

  python benchmarks/saliency.py --datasets \
      pascal_s=$STILL/pascal_s,sod=$STILL/sod
  python benchmarks/saliency.py --datasets sod=$STILL/sod --max_images 20 \
      --no_write

Each dataset folder holds `images/` (photographs) and `masks/` (ground
truth with the same stems; 8-bit, object where the value is > 127: PASCAL-S
masks are graded by the fraction of annotators, SOD's are 0 / 255). For every
image the detector (`data_prep.saliency.rbd_any_size`, the settings of
`configs/davis.py`: `prep.rbd_superpixels`) gives a soft map, scored with the
salient-object literature's measures (`data_prep.saliency_scores`): MAE and
max F-beta (beta^2 = 0.3, mean precision / recall curve over 256
thresholds). The pseudo mask that training uses (`saliency.to_uint8` > 0:
Otsu's threshold, at least 0.1) is scored too: its mean F-beta, IoU, and how
many images get no object at all.

Published figures for RBD on these sets (the authors' MATLAB code, run by
later benchmark papers) are written next to ours in RESULTS.md; see
PUBLISHED below for their sources.
"""

import argparse
import functools
import multiprocessing
import os
import runpy
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import imageio.v3 as iio  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import image_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import saliency  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import saliency_scores  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ground truth: object where the 8-bit mask exceeds this.
MASK_THRESHOLD = 127
# RBD (Zhu et al., CVPR 2014) as published on these sets: (max F-beta, MAE),
# or None where we have no figure we can attribute.
PUBLISHED = {
    "pascal_s": None,
    "sod": None,
}
PUBLISHED_SOURCE = ""


def score_image(stem_paths, n_segments: int):
  """Worker: (precision, recall, mae) of the soft map, mask scores."""
  image_path, mask_path = stem_paths
  image = image_io.load_image(image_path)
  truth = np.asarray(iio.imread(mask_path))
  if truth.ndim == 3:
    truth = truth[..., 0]
  truth = truth > MASK_THRESHOLD
  if truth.shape != image.shape[:2]:
    raise ValueError(
        f"{mask_path} is {truth.shape} but {image_path} is {image.shape[:2]}."
    )
  start = time.perf_counter()
  soft = saliency.rbd_any_size(image, n_segments=n_segments)
  seconds = time.perf_counter() - start
  curves = saliency_scores.image_curves(soft, truth)
  pseudo = saliency.pseudo_mask(saliency.to_uint8(soft))
  return curves, saliency_scores.mask_scores(pseudo, truth), seconds


def dataset_pairs(folder: str, max_images: int):
  images = os.path.join(folder, "images")
  masks = os.path.join(folder, "masks")
  pairs = []
  for name in image_io.list_images(images):
    stem = os.path.splitext(name)[0]
    mask = os.path.join(masks, stem + ".png")
    if not os.path.exists(mask):
      raise FileNotFoundError(f"{mask}: no ground-truth mask for {name}.")
    pairs.append((os.path.join(images, name), mask))
  return pairs[:max_images] if max_images else pairs


def score_dataset(folder, n_segments, max_images, workers):
  pairs = dataset_pairs(folder, max_images)
  accumulator = saliency_scores.Accumulator()
  masks, seconds = [], []
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    work = functools.partial(score_image, n_segments=n_segments)
    for curves, mask, t in tqdm.tqdm(
        pool.imap(work, pairs, chunksize=4),
        total=len(pairs),
        desc=os.path.basename(folder.rstrip("/")),
    ):
      accumulator.add(*curves)
      masks.append(mask)
      seconds.append(t)
  scores = accumulator.scores()
  scores["pseudo_f"] = float(np.mean([m["f_beta"] for m in masks]))
  scores["pseudo_iou"] = float(np.mean([m["iou"] for m in masks]))
  scores["pseudo_empty"] = float(np.mean([m["precision"] == 0 for m in masks]))
  scores["seconds"] = float(np.median(seconds))
  return scores


def rows_for(name: str, scores: dict, n_segments: int) -> list:
  published = PUBLISHED.get(name)
  rows = [
      (
          f"{name}: RBD soft map ({scores['images']} images, SLIC"
          f" {n_segments})",
          f"max F-beta {scores['max_f']:.3f} (at threshold"
          f" {scores['threshold']}/255), MAE {scores['mae']:.3f}",
      ),
      (
          f"{name}: published RBD",
          (
              f"max F-beta {published[0]:.3f}, MAE {published[1]:.3f}"
              f" ({PUBLISHED_SOURCE})"
              if published
              else "no attributable figure found (see the notes)"
          ),
      ),
      (
          f"{name}: pseudo mask used for training (Otsu, >= 0.1)",
          f"mean F-beta {scores['pseudo_f']:.3f}, mean IoU"
          f" {scores['pseudo_iou']:.3f}, {scores['pseudo_empty']:.1%}"
          " of pseudo masks miss the object entirely (precision 0)",
      ),
      (f"{name}: seconds per image", f"median {scores['seconds']:.3f}"),
  ]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--datasets",
      required=True,
      help="Comma-separated name=folder pairs (folder/images, folder/masks).",
  )
  parser.add_argument("--max_images", type=int, default=0)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument(
      "--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  args = parser.parse_args()
  config = runpy.run_path(os.path.join(REPO, "configs", "davis.py"))[
      "get_config"
  ]()
  n_segments = config.prep.rbd_superpixels
  rows = []
  for item in args.datasets.split(","):
    name, _, folder = item.partition("=")
    if not folder:
      parser.error(f"--datasets entry {item!r} is not name=folder")
    scores = score_dataset(folder, n_segments, args.max_images, args.workers)
    rows += rows_for(name, scores, n_segments)
  names = ",".join(
      f"{i.partition('=')[0]}=$STILL/{i.partition('=')[0]}"
      for i in args.datasets.split(",")
  )
  lines = results.table_section(
      "Saliency: RBD on real photographs",
      f"python benchmarks/saliency.py --datasets {names}",
      results.machine_description(),
      rows,
  )
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_write:
    results.prepend_section(args.results, text)


if __name__ == "__main__":
  main()
