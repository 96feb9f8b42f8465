"""The official DAVIS-2017 semi-supervised evaluation: J, F and the CSV reports.

A sequence is scored object by object (SPEC 9). The objects are ids 1..n, n
being the largest id of the first ground-truth frame; void pixels (255 in the
ground truth) count as background, as do ground-truth ids above n. Each object
gets, on every frame but the first and the last:

* region similarity J: the IoU of the predicted and true masks (1 when both
  are empty);
* boundary F: the F-measure of the two masks' one-pixel boundaries, a boundary
  pixel counting as matched when the other boundary has a pixel within
  `ceil(0.008 x image diagonal)` pixels (8 at 480x854).

Per object, each of J and F is summarised by its mean, its recall (the
fraction of frames above 0.5) and its decay (first quarter minus last quarter,
see `mean_recall_decay`). The global scores average the per-object summaries
over all objects of all sequences (a sequence with three objects weighs three
times one with one); J&F is the mean of J-Mean and F-Mean.

The reports have the shape of the official tool's (davis2017-evaluation,
`evaluation_method.py`): `global_results-<split>.csv` and
`per-sequence_results-<split>.csv`, floats written as "%.3f". Predictions are
written as indexed PNGs with the DAVIS palette, named like the ground truth, so
that the official tool can read them too.

The official tool dilates boundary maps with a disk; here the same matching is
computed as a nearest-neighbour query (a pixel lies in the disk dilation of a
boundary iff some boundary pixel is within the radius), which gives identical
sets and is an order of magnitude faster on 480p frames.
"""

import csv
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import spatial

from data_prep import video_sources

# The ground truth's "void" id (unlabelled pixels at object borders).
VOID_ID = 255
# The header of global_results-<split>.csv, in the official order.
GLOBAL_COLUMNS = (
    "J&F-Mean",
    "J-Mean",
    "J-Recall",
    "J-Decay",
    "F-Mean",
    "F-Recall",
    "F-Decay",
)
# The header of per-sequence_results-<split>.csv.
PER_SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
# As the official tool's `to_csv(float_format="%.3f")`.
FLOAT_FORMAT = "%.3f"

# ---------------------------------------------------------------- J and F


def region_similarity(predicted: np.ndarray, ground_truth: np.ndarray) -> float:
  """Region similarity J: intersection over union of two masks.

  Args:
    predicted: bool [H, W], the predicted mask of one object.
    ground_truth: bool [H, W], its true mask (void already removed).

  Returns:
    |predicted & ground_truth| / |predicted | ground_truth|, 1.0 when both
    masks are empty.
  """
  predicted, ground_truth = _same_shape_masks(predicted, ground_truth)
  union = np.count_nonzero(predicted | ground_truth)
  if union == 0:
    return 1.0
  return np.count_nonzero(predicted & ground_truth) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
  """One-pixel boundary of a mask, as the official `seg2bmap`.

  A pixel is on the boundary when it differs from its east, south or
  south-east neighbour. The last row compares only with the east neighbour,
  the last column only with the south one, and the bottom-right pixel is never
  on the boundary: the image border is not a boundary.

  Args:
    mask: bool [H, W].

  Returns:
    bool [H, W], the boundary pixels.
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"boundary_map expects a [H, W] mask, got {mask.shape}.")
  boundary = np.zeros_like(mask)
  boundary[:, :-1] |= mask[:, :-1] != mask[:, 1:]
  boundary[:-1, :] |= mask[:-1, :] != mask[1:, :]
  boundary[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]
  return boundary


def boundary_tolerance(height: int, width: int, bound_th: float = 0.008) -> int:
  """Radius in pixels within which boundary pixels match.

  Args:
    height: image height in pixels.
    width: image width in pixels.
    bound_th: below 1, a fraction of the image diagonal (rounded up, as the
      official tool); from 1 on, the radius itself in pixels (an integer).

  Returns:
    The radius: ceil(bound_th * sqrt(height^2 + width^2)), 8 at 480x854.
  """
  if height < 1 or width < 1:
    raise ValueError(f"Image size must be positive, got {height}x{width}.")
  if bound_th <= 0:
    raise ValueError(f"bound_th must be positive, got {bound_th}.")
  if bound_th >= 1:
    if bound_th != int(bound_th):
      raise ValueError(
          "bound_th >= 1 is a radius in pixels and must be an integer, got"
          f" {bound_th}."
      )
    return int(bound_th)
  return int(math.ceil(bound_th * math.hypot(height, width)))


def _matched(points: np.ndarray, others: np.ndarray, radius: int) -> int:
  """How many of `points` [N, 2] lie within `radius` of one of `others`.

  Equal to the count of `points` inside the dilation of `others` by
  skimage.morphology.disk(radius), the pixels at squared distance <= radius^2.
  """
  distances, _ = spatial.cKDTree(others).query(
      points, k=1, distance_upper_bound=radius + 0.5
  )
  # Squared distances are integers: compare them with a margin, not sqrt.
  return int(np.count_nonzero(np.square(distances) <= radius * radius + 0.5))


def boundary_precision_recall(
    predicted: np.ndarray, ground_truth: np.ndarray, bound_th: float = 0.008
) -> tuple[float, float]:
  """Boundary precision and recall of a predicted mask.

  Args:
    predicted: bool [H, W], the predicted mask of one object.
    ground_truth: bool [H, W], its true mask (void already removed).
    bound_th: matching tolerance, see `boundary_tolerance`.

  Returns:
    precision: fraction of predicted boundary pixels within the tolerance of
      a true boundary pixel.
    recall: fraction of true boundary pixels within the tolerance of a
      predicted boundary pixel.
    With empty boundaries (the official rules): both empty -> (1, 1);
    predicted empty only -> (1, 0); true empty only -> (0, 1). A mask that
    covers the whole image has an empty boundary too.
  """
  predicted, ground_truth = _same_shape_masks(predicted, ground_truth)
  radius = boundary_tolerance(*predicted.shape, bound_th=bound_th)
  predicted_points = np.argwhere(boundary_map(predicted))
  true_points = np.argwhere(boundary_map(ground_truth))
  if not len(predicted_points) and not len(true_points):
    return 1.0, 1.0
  if not len(predicted_points):
    return 1.0, 0.0
  if not len(true_points):
    return 0.0, 1.0
  precision = _matched(predicted_points, true_points, radius) / len(
      predicted_points
  )
  recall = _matched(true_points, predicted_points, radius) / len(true_points)
  return precision, recall


def boundary_f(
    predicted: np.ndarray, ground_truth: np.ndarray, bound_th: float = 0.008
) -> float:
  """Boundary measure F = 2PR / (P + R), 0 when P + R = 0.

  Args:
    predicted: bool [H, W], the predicted mask of one object.
    ground_truth: bool [H, W], its true mask (void already removed).
    bound_th: matching tolerance, see `boundary_tolerance`.

  Returns:
    F in [0, 1], from `boundary_precision_recall`.
  """
  precision, recall = boundary_precision_recall(
      predicted, ground_truth, bound_th
  )
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def _same_shape_masks(
    predicted: np.ndarray, ground_truth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  predicted = np.asarray(predicted, bool)
  ground_truth = np.asarray(ground_truth, bool)
  if predicted.ndim != 2 or predicted.shape != ground_truth.shape:
    raise ValueError(
        "Masks must be [H, W] of the same shape, got predicted"
        f" {predicted.shape} and ground truth {ground_truth.shape}."
    )
  return predicted, ground_truth


# ---------------------------------------------------------------- statistics


def decay_bins(num_frames: int) -> list[slice]:
  """The 4 bins of the decay over `num_frames` scored frames.

  The edges are ids = round(linspace(1, n, 5)) - 1 and bin i is
  values[ids[i] : ids[i + 1] + 1], both ends inclusive (neighbouring bins
  share a frame). Halves round up, as in the official `db_statistics`, which
  computes np.round(linspace(...) + 1e-10): numpy alone would round them to
  even and give other bins when n % 4 == 3 (n = 7: a first bin of frames
  0..2, not 0..1). linspace(1, n, 5) is exact in floating point (its step
  (n - 1) / 4 is), so floor(x + 0.5) is an exact half-up rounding. The
  official tool stores the edges as uint8, which wraps beyond 256 frames;
  here they are plain ints.

  Args:
    num_frames: n >= 1.

  Returns:
    4 slices into the per-frame values.
  """
  if num_frames < 1:
    raise ValueError(f"Decay needs at least one frame, got {num_frames}.")
  ids = np.floor(np.linspace(1, num_frames, 5) + 0.5).astype(int) - 1
  return [slice(ids[i], ids[i + 1] + 1) for i in range(4)]


def mean_recall_decay(values: np.ndarray) -> tuple[float, float, float]:
  """Summary of one object's per-frame J or F.

  Args:
    values: float [n], the per-frame scores over the n scored frames.

  Returns:
    mean: the mean of the values.
    recall: the fraction of values strictly above 0.5.
    decay: mean of the first decay bin minus mean of the last (`decay_bins`).
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or not values.size:
    raise ValueError(f"Expected a non-empty [n] vector, got {values.shape}.")
  bins = decay_bins(values.size)
  return (
      float(values.mean()),
      float(np.mean(values > 0.5)),
      float(values[bins[0]].mean() - values[bins[-1]].mean()),
  )


# ---------------------------------------------------------------- sequences


def evaluate_sequence(
    name: str,
    predicted: np.ndarray,
    ground_truth: np.ndarray,
    bound_th: float = 0.008,
) -> dict[str, Any]:
  """Scores one sequence's prediction per object (semi-supervised task).

  Frames 1..T-2 are scored (not the first, which is given, nor the last). As
  in the official tool, only those frames of the prediction are read: ids in
  its first and last frames are not checked.

  Args:
    name: the sequence name, for the report and error messages.
    predicted: int [T, H, W] predicted ids (0: background).
    ground_truth: int [T, H, W] true ids in [0, 255] (255: void).
    bound_th: boundary tolerance, see `boundary_tolerance`.

  Returns:
    A dict with
      "sequence": name;
      "object_ids": int [num_objects], 1..n (n = largest id of frame 0);
      "J", "F": float64 [num_objects, T - 2], the per-frame scores;
      "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay":
        float64 [num_objects], the summaries of `mean_recall_decay`.
    An object missing from the prediction is scored as an empty mask.

  Raises:
    ValueError: shapes differ or are not [T, H, W] with T >= 3, ids out of
      range, or a scored predicted frame holds an id above n.
  """
  predicted = np.asarray(predicted)
  ground_truth = np.asarray(ground_truth)
  if ground_truth.ndim != 3 or predicted.shape != ground_truth.shape:
    raise ValueError(
        f"Sequence {name!r}: prediction and ground truth must both be"
        f" [T, H, W], got {predicted.shape} and {ground_truth.shape}."
    )
  num_frames = ground_truth.shape[0]
  if num_frames < 3:
    raise ValueError(
        f"Sequence {name!r}: {num_frames} frames; the first and last are not"
        " scored, so at least 3 are needed."
    )
  for array, what in (
      (predicted, "prediction"),
      (ground_truth, "ground truth"),
  ):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(
          f"Sequence {name!r}: the {what} must hold integer ids, got"
          f" {array.dtype}."
      )
  if ground_truth.min() < 0 or ground_truth.max() > VOID_ID:
    raise ValueError(
        f"Sequence {name!r}: ground-truth ids must lie in [0, {VOID_ID}], got"
        f" [{ground_truth.min()}, {ground_truth.max()}]."
    )

  first = ground_truth[0]
  num_objects = int(first[first != VOID_ID].max(initial=0))
  scored = predicted[1:-1]
  # min/max first: np.unique sorts every pixel of the sequence.
  if scored.min() < 0 or scored.max() > num_objects:
    predicted_ids = np.unique(scored)
    extra = predicted_ids[(predicted_ids < 0) | (predicted_ids > num_objects)]
    raise ValueError(
        f"Sequence {name!r}: the prediction holds object ids"
        f" {extra.tolist()} but the ground truth's first frame has"
        f" {num_objects} object(s) (ids 1..{num_objects}); ids must be 0 or"
        " one of those."
    )

  object_ids = np.arange(1, num_objects + 1)
  j = np.zeros((num_objects, num_frames - 2))
  f = np.zeros((num_objects, num_frames - 2))
  for t in range(1, num_frames - 1):
    # Void (255) and ids above n are background for every object: no
    # object's mask contains them.
    for k, object_id in enumerate(object_ids):
      predicted_mask = predicted[t] == object_id
      true_mask = ground_truth[t] == object_id
      j[k, t - 1] = region_similarity(predicted_mask, true_mask)
      f[k, t - 1] = boundary_f(predicted_mask, true_mask, bound_th)

  result = {"sequence": name, "object_ids": object_ids, "J": j, "F": f}
  for measure, values in (("J", j), ("F", f)):
    stats = np.array([mean_recall_decay(v) for v in values]).reshape(-1, 3)
    for column, stat in enumerate(("Mean", "Recall", "Decay")):
      result[f"{measure}-{stat}"] = stats[:, column]
  return result


def summarize(
    results: Iterable[dict[str, Any]],
) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
  """Global scores (averaged over objects) and the per-object rows.

  Args:
    results: per-sequence dicts from `evaluate_sequence`.

  Returns:
    global_scores: {column: value} for the columns of GLOBAL_COLUMNS, each the
      mean over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean)/2.
    rows: one (f"{sequence}_{object id}", J-Mean, F-Mean) per object, in the
      order of `results`.
  """
  rows = []
  stats = {column: [] for column in GLOBAL_COLUMNS[1:]}
  for result in results:
    for k, object_id in enumerate(result["object_ids"]):
      rows.append((
          f"{result['sequence']}_{object_id}",
          float(result["J-Mean"][k]),
          float(result["F-Mean"][k]),
      ))
      for column in stats:
        stats[column].append(result[column][k])
  if not rows:
    raise ValueError("No objects to summarise: every sequence had none.")
  global_scores = {column: float(np.mean(v)) for column, v in stats.items()}
  global_scores = {
      "J&F-Mean": (global_scores["J-Mean"] + global_scores["F-Mean"]) / 2,
      **global_scores,
  }
  return global_scores, rows


# ---------------------------------------------------------------- reports


def _write_atomically(path: str, write_fn) -> None:
  """Writes text through `write_fn(file)` to a temporary file, then renames."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temp_path = tempfile.mkstemp(
      dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    # newline="": the csv module writes its own line ends.
    with os.fdopen(fd, "w", newline="") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file private (0600); reports are for everyone.
    os.chmod(temp_path, 0o644)
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def write_csvs(
    out_dir: str,
    split: str,
    global_scores: dict[str, float],
    rows: Sequence[tuple[str, float, float]],
) -> tuple[str, str]:
  """Writes the official tool's two CSV reports, each atomically.

  Args:
    out_dir: the folder to write in (created if missing).
    split: the split name in the file names, e.g. "val".
    global_scores: from `summarize`, keyed by GLOBAL_COLUMNS.
    rows: from `summarize`: (name, J-Mean, F-Mean) per object.

  Returns:
    The paths of global_results-<split>.csv and
    per-sequence_results-<split>.csv.
  """
  missing = [c for c in GLOBAL_COLUMNS if c not in global_scores]
  if missing:
    raise ValueError(f"global_scores lacks the columns {missing}.")
  global_path = os.path.join(out_dir, f"global_results-{split}.csv")
  sequence_path = os.path.join(out_dir, f"per-sequence_results-{split}.csv")

  def write_global(f):
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(GLOBAL_COLUMNS)
    writer.writerow([FLOAT_FORMAT % global_scores[c] for c in GLOBAL_COLUMNS])

  def write_sequences(f):
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(PER_SEQUENCE_COLUMNS)
    for name, j_mean, f_mean in rows:
      writer.writerow([name, FLOAT_FORMAT % j_mean, FLOAT_FORMAT % f_mean])

  _write_atomically(global_path, write_global)
  _write_atomically(sequence_path, write_sequences)
  return global_path, sequence_path


def format_table(
    global_scores: dict[str, float],
    rows: Sequence[tuple[str, float, float]],
    split: str = "val",
) -> str:
  """The two reports as a printable text table (3 decimals).

  Args:
    global_scores: from `summarize`.
    rows: from `summarize`.
    split: named in the titles.

  Returns:
    Multi-line text: the global scores, then one line per object.
  """
  lines = [f"Global results for {split}"]
  widths = [max(len(c), 8) for c in GLOBAL_COLUMNS]
  lines.append("  ".join(c.rjust(w) for c, w in zip(GLOBAL_COLUMNS, widths)))
  lines.append(
      "  ".join(
          (FLOAT_FORMAT % global_scores[c]).rjust(w)
          for c, w in zip(GLOBAL_COLUMNS, widths)
      )
  )
  lines.append("")
  lines.append(f"Per-sequence results for {split}")
  name_width = max([len(PER_SEQUENCE_COLUMNS[0])] + [len(r[0]) for r in rows])
  lines.append(
      f"{PER_SEQUENCE_COLUMNS[0].ljust(name_width)}  "
      f"{PER_SEQUENCE_COLUMNS[1]:>8}  {PER_SEQUENCE_COLUMNS[2]:>8}"
  )
  for name, j_mean, f_mean in rows:
    lines.append(
        f"{name.ljust(name_width)}  {FLOAT_FORMAT % j_mean:>8}  "
        f"{FLOAT_FORMAT % f_mean:>8}"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------- PNGs


def write_sequence_pngs(
    out_dir: str,
    sequence: str,
    frame_names: Sequence[str],
    ids: np.ndarray,
) -> list[str]:
  """Writes a sequence's predictions as <out_dir>/<sequence>/<frame>.png.

  Args:
    out_dir: the results folder.
    sequence: the sequence name (a sub-folder).
    frame_names: T names without extension, as the ground truth's ("00000").
    ids: int [T, H, W] predicted ids.

  Returns:
    The T paths written.
  """
  ids = np.asarray(ids)
  if ids.ndim != 3 or ids.shape[0] != len(frame_names):
    raise ValueError(
        f"Sequence {sequence!r}: {len(frame_names)} frame names for ids of"
        f" shape {ids.shape} (expected [T, H, W] with T = number of names)."
    )
  folder = os.path.join(out_dir, sequence)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, frame in zip(frame_names, ids):
    path = os.path.join(folder, f"{name}.png")
    video_sources.write_palette_mask(path, frame)
    paths.append(path)
  return paths
