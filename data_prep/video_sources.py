"""Evaluation videos: list, load and validate them (SPEC 2.4).

`list_videos(config.eval_data)` checks a source's layout up front and returns
one cheap, picklable `VideoRef` per video; `load_video(ref, eval_data)` reads
one video (in a worker process) into a `Video` and validates it. Every bad
input raises `InputError` naming the file, what is wrong and how to fix it.
Sources (`eval_data.source`):

  davis        DAVIS-2017 folder: JPEGImages/480p/<video>/00000.jpg,
               Annotations/480p/<video>/00000.png (palette PNGs, 255 = void),
               ImageSets/2017/<split>.txt. Frames must be numbered 00000,
               00001, ... without gaps. Every annotation PNG but the first
               frame's may be missing (test-dev: only frame 0 is given).
  davis2016    Single object: the video list from ImageSets/2016/<split>.txt
               (or the DAVIS-2016 ImageSets/480p/<split>.txt, else the 2017
               list) and every object merged into id 1. DAVIS-2016 masks are
               binary 0/255 with 255 = the object: a video whose annotations
               hold no id in 1..254 is read that way (255 -> 1, no void);
               otherwise ids 1..254 -> 1 and 255 stays void.
  tfds_davis   The TFDS `davis` dataset, built offline from the archive the
               user downloaded (DAVIS-2017-trainval-480p.zip, or
               DAVIS-2017-trainval-Full-Resolution.zip) in `eval_data.path`;
               prepared once under `eval_data.tfds_data_dir` (default
               `<path>/tfds`). Splits: train, val (= TFDS validation).
  youtube_vos  <path>/<split>/JPEGImages/<video>/<frame>.jpg and
               <path>/<split>/Annotations/<video>/<frame>.png, optional
               <path>/<split>/meta.json. Only some frames are annotated and an
               object may first appear after frame 0.
  video        A user's video: `eval_data.path` is a folder of frames (sorted
               naturally by name) or a video file (decoded with PyAV), and
               `eval_data.mask` the first frame's mask PNG (palette or 8-bit
               grey ids; a binary 0/255 mask is one object).

Object semantics. For every source but youtube_vos the objects are those of
the first frame (SPEC 9): K is the largest id in frame 0's annotation, ids
absent there are empty objects (an error for own videos, whose ids must be
1..K), a larger id in a later annotation is an error, and
`object_first_frame` is all zeros. For youtube_vos K is the largest id in any
annotation and each object starts at the first annotated frame that shows
it. Id 255 is void (DAVIS), except in binary 0/255 masks (davis2016, video),
where it is the object.

Optional fields of `eval_data` read here with `.get`: `resolution` ("480p" or
"full_resolution", davis / davis2016 / tfds_davis) and `tfds_data_dir`.
`resize_height > 0` resizes the frames of any source (bilinear, aspect kept,
width rounded) and the labels (nearest); `original_size` keeps the source
size. Only the tfds_davis source writes files: the prepared TFDS dataset.
"""

import dataclasses
import functools
import io
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

import ml_collections
import numpy as np
from PIL import Image

from data_prep import image_io
from data_prep import masks

VOID = 255
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (
    ".mp4",
    ".avi",
    ".mov",
    ".mkv",
    ".webm",
    ".m4v",
    ".mpg",
    ".mpeg",
)
_DAVIS_HELP = (
    "a DAVIS-2017 folder holding JPEGImages/480p, Annotations/480p and"
    " ImageSets/2017 (unzip DAVIS-2017-trainval-480p.zip from"
    " https://davischallenge.org/davis2017/code.html and pass its DAVIS"
    " folder as --config.eval_data.path)"
)
_YTVOS_HELP = (
    "the YouTube-VOS layout <path>/<split>/JPEGImages/<video>/*.jpg and"
    " <path>/<split>/Annotations/<video>/*.png (unzip the challenge's"
    " <split>.zip into --config.eval_data.path)"
)
# The TFDS builder's splits under the names the configs use.
_TFDS_SPLITS = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
}
# How many offending colours an error message lists.
_MAX_LISTED = 5


class InputError(image_io.InputError):
  """Bad input: the message names the file, what is wrong, and the fix."""


def _fail(path: str, problem: str, fix: str) -> InputError:
  return InputError(f"{path}: {problem}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True)
class VideoRef:
  """What a worker process needs to load one video; picklable and cheap.

  Attributes:
    source: davis, davis2016, tfds_davis, youtube_vos or video.
    name: the video name (sequence folder name, or the video file stem).
    path: the dataset root (davis, davis2016), the split folder
      (youtube_vos), the video file or frames folder (video), or the
      prepared TFDS dataset folder (tfds_davis).
    mask_path: the first-frame mask PNG (video only).
    options: anything else, as sorted (key, value) pairs.
  """

  source: str
  name: str
  path: str
  mask_path: str = ""
  options: tuple = ()

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


@dataclasses.dataclass
class Video:
  """One loaded evaluation video.

  Attributes:
    name: the video name.
    frame_names: T file stems, e.g. "00000"; results go to "<stem>.png".
    frames: uint8 [T, H, W, 3].
    frame_bytes: T entries: the encoded JPEG/PNG bytes of the file on disk
      when `frames[t]` is exactly its decoding (no resize, RGB), else None.
    labels: uint8 [T, H, W] object ids 0..K, 255 = void; zeros where
      `has_label` is False.
    has_label: bool [T], frame t has a ground-truth or given annotation.
    num_objects: K.
    object_first_frame: int32 [K], the frame where object k + 1 is given.
    original_size: (height, width) of the source before any resize.
    full_labels: uint8 [T, H0, W0], the labels at original_size when the
      video was resized (`resize_height`), else None.
  """

  name: str
  frame_names: list[str]
  frames: np.ndarray
  frame_bytes: list
  labels: np.ndarray
  has_label: np.ndarray
  num_objects: int
  object_first_frame: np.ndarray
  original_size: tuple
  full_labels: Optional[np.ndarray] = None


# ----------------------------------------------------------------------------
# Masks and images.


def read_palette_mask(path: str) -> np.ndarray:
  """Reads object ids from a mask PNG.

  Accepted: an indexed (palette, mode "P") PNG, whose indices are the ids
  whatever its colours; an 8-bit greyscale PNG, whose values are the ids; a
  1-bit PNG (white = 255); an RGB(A) PNG whose colours are all DAVIS palette
  colours (converted to their ids) or all grey (R = G = B, read as greyscale).

  Args:
    path: the PNG file.

  Returns:
    uint8 [H, W] ids.

  Raises:
    InputError: unreadable file, or colours that are not ids.
  """
  image = _open_image(path, _read_file(path))
  mode = image.mode
  if mode in ("P", "L"):
    return np.array(image, np.uint8)
  if mode == "1":
    return np.array(image, np.uint8) * np.uint8(255)
  if mode in ("LA", "PA"):
    # The alpha channel carries no ids.
    return np.array(image.getchannel(0), np.uint8)
  if mode in ("RGB", "RGBA"):
    return _rgb_to_ids(np.array(image.convert("RGB")), path)
  raise _fail(
      path,
      f"has image mode {mode!r}, not an 8-bit id mask",
      "save it as an indexed (palette) PNG or an 8-bit greyscale PNG whose"
      " values are the object ids (0 = background, 255 = void)",
  )


def _rgb_to_ids(rgb: np.ndarray, path: str) -> np.ndarray:
  """uint8 [H, W, 3] DAVIS palette (or grey) colours -> uint8 [H, W] ids."""
  flat = rgb.reshape(-1, 3).astype(np.int64)
  codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
  colours, inverse, counts = np.unique(
      codes, return_inverse=True, return_counts=True
  )
  palette = masks.davis_palette().astype(np.int64)
  palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
  to_id = {int(c): i for i, c in enumerate(palette_codes)}
  if all(int(c) in to_id for c in colours):
    lut = np.array([to_id[int(c)] for c in colours], np.uint8)
    return lut[inverse.reshape(-1)].reshape(rgb.shape[:2])
  if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
    # A greyscale id mask saved as RGB (common for binary 0/255 masks).
    return np.ascontiguousarray(rgb[..., 0])
  bad = [
      (int(c), int(n)) for c, n in zip(colours, counts) if int(c) not in to_id
  ]
  bad.sort(key=lambda cn: -cn[1])
  listed = ", ".join(
      f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n} px"
      for c, n in bad[:_MAX_LISTED]
  )
  raise _fail(
      path,
      f"is an RGB mask with {len(bad)} colours that are not DAVIS palette"
      f" colours ({listed}), so its object ids cannot be read",
      "save the mask as an indexed (palette) PNG, or as an 8-bit greyscale"
      " PNG whose values are the object ids (0 = background), e.g. with"
      " data_prep.video_sources.write_palette_mask",
  )


def write_palette_mask(path: str, ids: np.ndarray) -> None:
  """Writes ids as an indexed PNG with the DAVIS palette, atomically.

  Args:
    path: the PNG file to write; its folder must exist.
    ids: integer [H, W] ids in 0..255 (255 = void).
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f"ids must be an integer [H, W] array, got {ids.dtype}"
        f" {ids.shape} for {path}."
    )
  if ids.size and (ids.min() < 0 or ids.max() > 255):
    raise ValueError(
        f"ids must be in 0..255 for {path}, got [{ids.min()}, {ids.max()}]."
    )
  image = Image.fromarray(ids.astype(np.uint8), mode="P")
  image.putpalette(masks.davis_palette().reshape(-1).tolist())
  folder = os.path.dirname(os.path.abspath(path))
  # A reader never sees half a file: write beside it, then rename.
  fd, tmp = tempfile.mkstemp(
      dir=folder, prefix="." + os.path.basename(path), suffix=".tmp"
  )
  try:
    with os.fdopen(fd, "wb") as f:
      image.save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise _fail(
        path,
        f"cannot be read ({e.strerror or e})",
        "check that the file exists and is readable",
    ) from None


def _open_image(path: str, data: bytes) -> Image.Image:
  """Decodes image bytes fully, so truncated files fail here."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise _fail(
        path,
        f"is not a readable image; it may be truncated or corrupt ({e})",
        "re-extract or re-download it, or replace it with a valid JPEG/PNG",
    ) from None
  return image


def _decode_frame(path: str, data: bytes) -> tuple[np.ndarray, Optional[bytes]]:
  """Encoded frame -> (uint8 [H, W, 3], the bytes if kept unchanged)."""
  image = _open_image(path, data)
  if image.mode == "RGB":
    return np.asarray(image), data
  if image.mode in ("I", "F") or image.mode.startswith("I;"):
    raise _fail(
        path,
        f"is a {image.mode} image (more than 8 bits)",
        "convert the frames to 8-bit RGB JPEG or PNG",
    )
  # Grey, palette, CMYK or alpha frames: other decoders may expand them
  # differently, so only the converted pixels are handed on.
  return np.asarray(image.convert("RGB")), None


def _read_frame(path: str) -> tuple[np.ndarray, Optional[bytes]]:
  return _decode_frame(path, _read_file(path))


def _check_size(
    mask_path: str, ids: np.ndarray, frame_path: str, frame: np.ndarray
) -> None:
  if ids.shape != frame.shape[:2]:
    raise _fail(
        mask_path,
        f"is {ids.shape[1]}x{ids.shape[0]} px (width x height) but its frame"
        f" {frame_path} is {frame.shape[1]}x{frame.shape[0]} px",
        "an annotation must have the size of its frame: export it again at"
        " the frame size (resize with nearest neighbour to keep the ids)",
    )


def _natural_key(name: str) -> list:
  # "frame2" before "frame10"; digits and text alternate after the split.
  return [
      int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)
  ]


def _stems(folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
  """{stem: file name} of the non-hidden files with these suffixes."""
  found = {}
  for name in os.listdir(folder):
    stem, suffix = os.path.splitext(name)
    if name.startswith(".") or suffix.lower() not in suffixes:
      continue
    if stem in found:
      raise _fail(
          os.path.join(folder, name),
          f"has the same stem as {found[stem]}",
          "keep one file per frame (results are named <stem>.png)",
      )
    found[stem] = name
  return found


# ----------------------------------------------------------------------------
# Objects, validation and resizing, shared by every source.


def _present(ids: np.ndarray) -> np.ndarray:
  """Sorted object ids (1..254) with at least one pixel."""
  counts = np.bincount(ids.reshape(-1), minlength=256)
  counts[0] = counts[VOID] = 0
  return np.flatnonzero(counts)


def _finish(
    name: str,
    frame_names: list[str],
    frames: np.ndarray,
    frame_bytes: list,
    annotations: dict[int, tuple[np.ndarray, str]],
    eval_data: ml_collections.ConfigDict,
    *,
    appear_later: bool,
    where: str,
) -> Video:
  """Counts the objects, checks them and resizes: the end of every loader.

  Args:
    name: the video name.
    frame_names: T stems.
    frames: uint8 [T, H, W, 3].
    frame_bytes: T bytes or None.
    annotations: {t: (uint8 [H, W] ids, file)} with the final id meaning.
    eval_data: `config.eval_data` (max_objects, resize_height).
    appear_later: objects may first appear after frame 0 (YouTube-VOS);
      otherwise they are all given in frame 0.
    where: how to name the video in messages (a folder or file).

  Returns:
    The video.
  """
  num_frames = len(frames)
  labels = np.zeros(frames.shape[:3], np.uint8)
  has_label = np.zeros([num_frames], bool)
  present = {}
  for t, (ids, _) in annotations.items():
    labels[t] = ids
    has_label[t] = True
    present[t] = _present(ids)
  if appear_later:
    ids_seen = [p for p in present.values() if p.size]
    num_objects = int(max(p.max() for p in ids_seen)) if ids_seen else 0
    first_seen = {}
    for t in sorted(present):
      for k in present[t]:
        first_seen.setdefault(int(k), t)
    if not num_objects:
      raise _fail(
          where,
          "no annotation shows any object (all pixels are 0 or 255)",
          "give each object's mask in the annotation of the frame where it"
          " first appears",
      )
    missing = [k for k in range(1, num_objects + 1) if k not in first_seen]
    if missing:
      raise _fail(
          where,
          f"object ids {missing} never appear in an annotation although"
          f" ids go up to {num_objects}",
          "number the objects 1..K without gaps",
      )
    first = [first_seen[k] for k in range(1, num_objects + 1)]
    first_file = annotations[first[-1]][1]  # Where the largest id starts.
  else:
    first_file = annotations[0][1]
    num_objects = int(present[0].max()) if present[0].size else 0
    if not num_objects:
      raise _fail(
          first_file,
          "the first frame's mask holds no object (only background 0 and"
          " void 255)",
          "draw at least one object with id 1..254 in the first-frame mask"
          " (for a binary DAVIS-2016 mask with 255 = object use"
          " source=davis2016)",
      )
    for t in sorted(present):
      if present[t].size and present[t].max() > num_objects:
        raise _fail(
            annotations[t][1],
            f"holds object id {int(present[t].max())} but the first frame"
            f" only has ids up to {num_objects}; objects are given in the"
            " first frame",
            "use the ids of the first-frame mask in every annotation",
        )
    first = [0] * num_objects
  max_objects = int(eval_data.get("max_objects", 0) or 0)
  if 0 < max_objects < num_objects:
    raise _fail(
        first_file,
        f"has {num_objects} objects (largest id) but"
        f" config.eval_data.max_objects is {max_objects}",
        "raise --config.eval_data.max_objects, or merge objects; a soft or"
        " anti-aliased greyscale mask must be thresholded to ids first",
    )
  original_size = tuple(int(s) for s in frames.shape[1:3])
  height = int(eval_data.get("resize_height", 0) or 0)
  full_labels = None
  if height > 0 and height != original_size[0]:
    full_labels = labels
    frames, labels = _resize(frames, labels, height)
    frame_bytes = [None] * num_frames
    for k, t in enumerate(first):
      if k + 1 in present[t] and not (labels[t] == k + 1).any():
        raise _fail(
            annotations[t][1],
            f"object {k + 1} vanishes when the video is resized to height"
            f" {height}",
            "use a larger --config.eval_data.resize_height, or 0 to keep the"
            " size",
        )
  return Video(
      name=name,
      frame_names=list(frame_names),
      frames=frames,
      frame_bytes=list(frame_bytes),
      labels=labels,
      has_label=has_label,
      num_objects=num_objects,
      object_first_frame=np.asarray(first, np.int32).reshape([num_objects]),
      original_size=original_size,
      full_labels=full_labels,
  )


def _resize(
    frames: np.ndarray, labels: np.ndarray, height: int
) -> tuple[np.ndarray, np.ndarray]:
  """Frames bilinear, labels nearest, to `height` with the aspect kept.

  Args:
    frames: uint8 [T, H, W, 3].
    labels: uint8 [T, H, W].
    height: the new height.

  Returns:
    uint8 [T, height, width, 3] and uint8 [T, height, width].
  """
  h, w = frames.shape[1:3]
  size = (max(1, round(w * height / h)), height)
  frames = np.stack([
      np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR))
      for f in frames
  ])
  labels = np.stack([
      np.asarray(Image.fromarray(l).resize(size, Image.Resampling.NEAREST))
      for l in labels
  ])
  return frames, labels


def _stack_frames(paths: list[str], images: list[np.ndarray]) -> np.ndarray:
  """uint8 [T, H, W, 3]; every frame must have the first one's size."""
  for path, image in zip(paths, images):
    if image.shape != images[0].shape:
      raise _fail(
          path,
          f"is {image.shape[1]}x{image.shape[0]} px but {paths[0]} is"
          f" {images[0].shape[1]}x{images[0].shape[0]} px",
          "all frames of a video must have one size; resize or remove it",
      )
  return np.stack(images)


# ----------------------------------------------------------------------------
# DAVIS folders (davis, davis2016).


def _resolution_folder(eval_data: ml_collections.ConfigDict) -> str:
  resolution = eval_data.get("resolution", "480p") or "480p"
  if resolution == "480p":
    return "480p"
  if resolution.lower().replace("-", "_") == "full_resolution":
    return "Full-Resolution"
  raise InputError(
      f"config.eval_data.resolution={resolution!r} is not a DAVIS"
      " resolution. Fix: use '480p' or 'full_resolution'."
  )


def _read_split(path: str) -> list[str]:
  """Video names from a split file, in order, without repeats.

  DAVIS-2017 lists one name per line; the DAVIS-2016 release lists frame
  and mask paths (/JPEGImages/480p/bear/00000.jpg ...), named by folder.

  Args:
    path: the split file.

  Returns:
    The video names.
  """
  names = []
  for line in _read_file(path).decode("utf-8", "replace").splitlines():
    line = line.strip()
    if not line:
      continue
    name = line.split()[0].strip("/").split("/")[-2] if "/" in line else line
    if name not in names:
      names.append(name)
  if not names:
    raise _fail(path, "lists no video", "write one video name per line")
  return names


def _davis_split_file(
    root: str, source: str, split: str, resolution: str
) -> str:
  candidates = [os.path.join(root, "ImageSets", "2017", f"{split}.txt")]
  if source == "davis2016":
    candidates[:0] = [
        os.path.join(root, "ImageSets", "2016", f"{split}.txt"),
        os.path.join(root, "ImageSets", resolution, f"{split}.txt"),
    ]
  for path in candidates:
    if os.path.isfile(path):
      return path
  found = []
  for year in ("2017", "2016"):
    folder = os.path.join(root, "ImageSets", year)
    if os.path.isdir(folder):
      found += sorted(os.path.join(folder, n) for n in os.listdir(folder))
  raise _fail(
      candidates[-1],
      f"the split file of split {split!r} is missing"
      + (
          " (also looked for " + ", ".join(candidates[:-1]) + ")"
          if len(candidates) > 1
          else ""
      )
      + (f"; found {', '.join(found)}" if found else ""),
      "set --config.eval_data.split to a listed split, or point"
      f" --config.eval_data.path at {_DAVIS_HELP}",
  )


def _list_davis(eval_data: ml_collections.ConfigDict) -> list[VideoRef]:
  root = eval_data.path
  resolution = _resolution_folder(eval_data)
  if not root or not os.path.isdir(root):
    raise _fail(
        repr(root),
        "config.eval_data.path is not a folder",
        f"point it at {_DAVIS_HELP}",
    )
  for kind in ("JPEGImages", "Annotations"):
    folder = os.path.join(root, kind, resolution)
    if not os.path.isdir(folder):
      raise _fail(
          folder, "folder is missing", f"point the path at {_DAVIS_HELP}"
      )
  split_file = _davis_split_file(
      root, eval_data.source, eval_data.split, resolution
  )
  refs = []
  for name in _read_split(split_file):
    for kind in ("JPEGImages", "Annotations"):
      folder = os.path.join(root, kind, resolution, name)
      if not os.path.isdir(folder):
        raise _fail(
            folder,
            f"folder of video {name!r}, listed in {split_file}, is missing",
            "restore it (re-extract the dataset archive) or remove the video"
            " from the split file",
        )
    refs.append(
        VideoRef(
            source=eval_data.source,
            name=name,
            path=root,
            options=(("resolution", resolution),),
        )
    )
  return refs


def _davis_files(
    frames_dir: str, masks_dir: str, *, strict: bool
) -> tuple[list[str], dict[str, str]]:
  """Checks a DAVIS sequence's file names.

  Args:
    frames_dir: JPEGImages/<resolution>/<video>.
    masks_dir: Annotations/<resolution>/<video>.
    strict: the TFDS builder's needs: only 00000.jpg... files in the frames
      folder (it counts every file) and an annotation for every frame.

  Returns:
    The frame stems in order and {stem: annotation file name}.
  """
  frames = _stems(frames_dir, FRAME_SUFFIXES)
  if strict:
    for name in sorted(os.listdir(frames_dir)):
      if not re.fullmatch(r"\d{5}\.jpg", name):
        raise _fail(
            os.path.join(frames_dir, name),
            "is not a frame named like 00000.jpg, and the TFDS davis builder"
            " counts every file of the folder as a frame",
            "remove it from the archive",
        )
  if not frames:
    raise _fail(frames_dir, "holds no frame", "restore the video's frames")
  for stem in frames:
    if not stem.isdigit():
      raise _fail(
          os.path.join(frames_dir, frames[stem]),
          "is not named by its frame number",
          "DAVIS frames are named 00000.jpg, 00001.jpg, ...; rename them",
      )
  stems = sorted(frames, key=int)
  for previous, stem in zip(stems, stems[1:]):
    if int(previous) == int(stem):
      raise _fail(
          os.path.join(frames_dir, frames[stem]),
          f"has the frame number of {frames[previous]}",
          "keep one file per frame number",
      )
  for expected, stem in enumerate(stems):
    if int(stem) != expected:
      width = len(stem)
      raise _fail(
          os.path.join(frames_dir, f"{expected:0{width}d}.jpg"),
          f"frame {expected} is missing: the numbering jumps to {stem} (the"
          " frames must be numbered 00000, 00001, ... without gaps)",
          "restore the missing frame (re-extract the dataset archive) or"
          " renumber the frames consecutively",
      )
  annotations = _stems(masks_dir, (".png",))
  for stem, mask in sorted(annotations.items()):
    if stem not in frames:
      raise _fail(
          os.path.join(masks_dir, mask),
          f"is an annotation without a frame (no {stem}.jpg in {frames_dir})",
          "restore the frame or remove the stray annotation",
      )
  for t, stem in enumerate(stems):
    if stem not in annotations and (strict or t == 0):
      which = "the first frame" if t == 0 else f"frame {stem}"
      raise _fail(
          os.path.join(masks_dir, f"{stem}.png"),
          f"the annotation of {which} is missing"
          + ("; the TFDS davis builder needs one per frame" if strict else ""),
          "restore it (re-extract the dataset archive)",
      )
    if strict and stem in annotations:
      path = os.path.join(masks_dir, annotations[stem])
      try:
        with Image.open(path) as image:
          mode = image.mode
      except OSError as e:
        raise _fail(
            path, f"is not a readable PNG ({e})", "re-download the archive"
        ) from None
      if mode not in ("P", "L"):
        raise _fail(
            path,
            f"is a mode {mode!r} PNG; the TFDS davis builder reads palette"
            " indices",
            "store the annotation as an indexed (palette) PNG",
        )
  return stems, annotations


def _load_davis(ref: VideoRef, eval_data: ml_collections.ConfigDict) -> Video:
  resolution = ref.option("resolution", "480p")
  frames_dir = os.path.join(ref.path, "JPEGImages", resolution, ref.name)
  masks_dir = os.path.join(ref.path, "Annotations", resolution, ref.name)
  stems, mask_files = _davis_files(frames_dir, masks_dir, strict=False)
  frame_files = _stems(frames_dir, FRAME_SUFFIXES)
  paths = [os.path.join(frames_dir, frame_files[s]) for s in stems]
  decoded = [_read_frame(p) for p in paths]
  frames = _stack_frames(paths, [f for f, _ in decoded])
  annotations = {}
  for t, stem in enumerate(stems):
    if stem in mask_files:
      path = os.path.join(masks_dir, mask_files[stem])
      ids = read_palette_mask(path)
      _check_size(path, ids, paths[t], frames[t])
      annotations[t] = (ids, path)
  if ref.source == "davis2016":
    annotations = _merge_to_one_object(annotations)
  return _finish(
      ref.name,
      stems,
      frames,
      [b for _, b in decoded],
      annotations,
      eval_data,
      appear_later=False,
      where=frames_dir,
  )


def _merge_to_one_object(
    annotations: dict[int, tuple[np.ndarray, str]],
) -> dict[int, tuple[np.ndarray, str]]:
  """DAVIS-2016: every object becomes id 1 (see the module docstring)."""
  binary = not any(
      ((ids > 0) & (ids < VOID)).any() for ids, _ in annotations.values()
  )
  merged = {}
  for t, (ids, path) in annotations.items():
    if binary:
      ids = (ids != 0).astype(np.uint8)
    else:
      ids = np.where((ids > 0) & (ids < VOID), 1, ids).astype(np.uint8)
    merged[t] = (ids, path)
  return merged


# ----------------------------------------------------------------------------
# YouTube-VOS.


def _list_youtube_vos(eval_data: ml_collections.ConfigDict) -> list[VideoRef]:
  split_dir = os.path.join(eval_data.path or "", eval_data.split)
  for kind in ("JPEGImages", "Annotations"):
    folder = os.path.join(split_dir, kind)
    if not os.path.isdir(folder):
      raise _fail(folder, "folder is missing", f"use {_YTVOS_HELP}")
  meta_path = os.path.join(split_dir, "meta.json")
  if os.path.isfile(meta_path):
    try:
      names = list(json.loads(_read_file(meta_path))["videos"])
    except (ValueError, KeyError, TypeError) as e:
      raise _fail(
          meta_path,
          f"is not a YouTube-VOS meta file with a 'videos' map ({e!r})",
          "restore the meta.json of the dataset archive, or delete it to"
          " list the JPEGImages folders instead",
      ) from None
    listed_in = meta_path
  else:
    frames_root = os.path.join(split_dir, "JPEGImages")
    names = sorted(
        n
        for n in os.listdir(frames_root)
        if os.path.isdir(os.path.join(frames_root, n)) and n[0] != "."
    )
    listed_in = frames_root
  if not names:
    raise _fail(listed_in, "lists no video", f"use {_YTVOS_HELP}")
  refs = []
  for name in sorted(names):
    for kind in ("JPEGImages", "Annotations"):
      folder = os.path.join(split_dir, kind, name)
      if not os.path.isdir(folder):
        raise _fail(
            folder,
            f"folder of video {name!r}, listed in {listed_in}, is missing",
            "restore it (re-extract the dataset archive) or remove the video"
            " from meta.json",
        )
    refs.append(VideoRef(source="youtube_vos", name=name, path=split_dir))
  return refs


def _load_youtube_vos(
    ref: VideoRef, eval_data: ml_collections.ConfigDict
) -> Video:
  frames_dir = os.path.join(ref.path, "JPEGImages", ref.name)
  masks_dir = os.path.join(ref.path, "Annotations", ref.name)
  frame_files = _stems(frames_dir, FRAME_SUFFIXES)
  if not frame_files:
    raise _fail(frames_dir, "holds no frame", "restore the video's frames")
  # Frames are every 5th of the source video: 00000, 00005, ...
  stems = sorted(frame_files, key=_natural_key)
  index = {s: t for t, s in enumerate(stems)}
  paths = [os.path.join(frames_dir, frame_files[s]) for s in stems]
  decoded = [_read_frame(p) for p in paths]
  frames = _stack_frames(paths, [f for f, _ in decoded])
  annotations = {}
  for stem, name in _stems(masks_dir, (".png",)).items():
    path = os.path.join(masks_dir, name)
    if stem not in index:
      raise _fail(
          path,
          f"is an annotation without a frame (no {stem}.jpg in {frames_dir})",
          "restore the frame or remove the stray annotation",
      )
    t = index[stem]
    ids = read_palette_mask(path)
    _check_size(path, ids, paths[t], frames[t])
    annotations[t] = (ids, path)
  if not annotations:
    raise _fail(
        masks_dir,
        "holds no annotation PNG",
        "give each object's mask in the frame where it first appears",
    )
  return _finish(
      ref.name,
      stems,
      frames,
      [b for _, b in decoded],
      annotations,
      eval_data,
      appear_later=True,
      where=masks_dir,
  )


# ----------------------------------------------------------------------------
# A user's own video.


def _list_own_video(eval_data: ml_collections.ConfigDict) -> list[VideoRef]:
  path = eval_data.path
  if not path or not os.path.exists(path):
    raise _fail(
        repr(eval_data.path),
        "config.eval_data.path is not a video file or a folder of frames",
        "pass --config.eval_data.path=clip.mp4 (or a folder of .jpg/.png"
        " frames)",
    )
  if not eval_data.mask or not os.path.isfile(eval_data.mask):
    raise _fail(
        repr(eval_data.mask),
        "config.eval_data.mask is not a file",
        "pass --config.eval_data.mask=first_frame_mask.png: a palette or"
        " greyscale PNG of the first frame's object ids (0 = background),"
        " or a binary 0/255 mask for one object",
    )
  if os.path.isfile(path) and not path.lower().endswith(VIDEO_SUFFIXES):
    raise _fail(
        path,
        "is not a folder and its suffix is not one of a video file ("
        + " ".join(VIDEO_SUFFIXES)
        + ")",
        "pass a video file or a folder of frames",
    )
  name = os.path.basename(os.path.normpath(path))
  if os.path.isfile(path):
    name = os.path.splitext(name)[0]
  return [
      VideoRef(source="video", name=name, path=path, mask_path=eval_data.mask)
  ]


def _decode_video_file(path: str) -> np.ndarray:
  """uint8 [T, H, W, 3] frames of a video file, decoded with PyAV."""
  import av  # pylint: disable=g-import-not-at-top

  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise _fail(path, "has no video stream", "pass a video file")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format="rgb24"))
  except av.FFmpegError as e:
    raise _fail(
        path,
        f"cannot be decoded ({e}); it may be truncated or in an unknown format",
        "re-export it (e.g. H.264 .mp4), or extract its frames into a"
        " folder and pass the folder",
    ) from None
  if not frames:
    raise _fail(
        path,
        "has no decodable frame",
        "re-export the video or pass a folder of frames",
    )
  return _stack_frames([path] * len(frames), frames)


def _load_own_video(
    ref: VideoRef, eval_data: ml_collections.ConfigDict
) -> Video:
  if os.path.isdir(ref.path):
    frame_files = _stems(ref.path, FRAME_SUFFIXES)
    if not frame_files:
      raise _fail(
          ref.path,
          "holds no .jpg/.png frame",
          "put the video's frames (e.g. 00000.jpg, 00001.jpg, ...) there",
      )
    stems = sorted(frame_files, key=_natural_key)
    paths = [os.path.join(ref.path, frame_files[s]) for s in stems]
    decoded = [_read_frame(p) for p in paths]
    frames = _stack_frames(paths, [f for f, _ in decoded])
    frame_bytes = [b for _, b in decoded]
    first_path = paths[0]
  else:
    frames = _decode_video_file(ref.path)
    stems = [f"{t:05d}" for t in range(len(frames))]
    frame_bytes = [None] * len(frames)
    first_path = f"the first frame of {ref.path}"
  ids = read_palette_mask(ref.mask_path)
  _check_size(ref.mask_path, ids, first_path, frames[0])
  present = _present(ids)
  if not present.size and (ids == VOID).any():
    # A binary 0/255 mask: 255 is the one object, not void.
    ids = (ids == VOID).astype(np.uint8)
    present = _present(ids)
  missing = sorted(
      set(range(1, int(present.max(initial=0)) + 1)) - set(present.tolist())
  )
  if missing:
    raise _fail(
        ref.mask_path,
        f"has object ids up to {int(present.max())} but ids {missing} have"
        " no pixel, so those objects could never be tracked",
        "number the objects 1..K without gaps",
    )
  return _finish(
      ref.name,
      stems,
      frames,
      frame_bytes,
      {0: (ids, ref.mask_path)},
      eval_data,
      appear_later=False,
      where=ref.path,
  )


# ----------------------------------------------------------------------------
# The TFDS `davis` dataset, built offline from the user's archive.
#
# The builder asks its DownloadManager for
# download_and_extract(<URL>/DAVIS-2017-trainval-480p.zip) and reads
# DAVIS/ImageSets/2017/{train,val}.txt below the result. A subclass hands its
# `_split_generators` a stand-in that maps each URL to the file of the same
# name in the user's folder and only *extracts* it with the real manager: no
# network, no checksum (the builder registers none), and the rest of the
# builder (features, split files, annotation decoding) is TFDS's own code.


def _tfds_split(eval_data: ml_collections.ConfigDict) -> str:
  if eval_data.split not in _TFDS_SPLITS:
    raise InputError(
        f"config.eval_data.split={eval_data.split!r}: the TFDS davis dataset"
        " has the splits train and val (validation). Fix: use one of them,"
        " or source=davis on an extracted folder for other splits."
    )
  return _TFDS_SPLITS[eval_data.split]


class _LocalArchives:
  """Stands in for the builder's DownloadManager: URL -> a local archive."""

  def __init__(self, dl_manager, archive_dir: str, resolution: str):
    self._dl_manager = dl_manager
    self._archive_dir = archive_dir
    self._resolution = resolution

  def _local(self, url: str) -> str:
    path = os.path.join(self._archive_dir, url.rstrip("/").split("/")[-1])
    if not os.path.isfile(path):
      raise _fail(
          path,
          "archive is missing; the TFDS davis builder (config"
          f" {'480p' if self._resolution == '480p' else 'full_resolution'})"
          " reads it and nothing is downloaded here",
          f"download {url} into {self._archive_dir} (unchanged, not extracted)",
      )
    return path

  def download(self, url_or_urls):
    return _map_urls(self._local, url_or_urls)

  def download_and_extract(self, url_or_urls):
    return _map_urls(self._extract, url_or_urls)

  def _extract(self, url: str):
    archive = self._local(url)
    extracted = self._dl_manager.extract(archive)
    try:
      _check_extracted_davis(str(extracted), self._resolution)
    except InputError as e:
      # Name the archive member, not the temporary extraction folder.
      raise InputError(
          str(e).replace(str(extracted) + os.sep, archive + ":")
      ) from None
    return extracted

  def __getattr__(self, name):
    return getattr(self._dl_manager, name)


def _map_urls(fn: Callable[[str], Any], urls):
  if isinstance(urls, dict):
    return {k: _map_urls(fn, v) for k, v in urls.items()}
  if isinstance(urls, (list, tuple)):
    return type(urls)(_map_urls(fn, v) for v in urls)
  return fn(urls)


def _check_extracted_davis(extracted: str, resolution: str) -> None:
  """What the builder assumes of the archive, checked with clear messages."""
  root = os.path.join(extracted, "DAVIS")
  if not os.path.isdir(root):
    raise _fail(
        root,
        "the archive has no top-level DAVIS folder (it holds "
        + ", ".join(sorted(os.listdir(extracted)))
        + ")",
        "use the official archive, whose members are DAVIS/JPEGImages/...,"
        " DAVIS/Annotations/..., DAVIS/ImageSets/2017/{train,val}.txt",
    )
  for split in ("train", "val"):
    split_file = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    if not os.path.isfile(split_file):
      raise _fail(
          split_file,
          "split file is missing",
          "use the official trainval archive",
      )
    for name in _read_split(split_file):
      frames_dir = os.path.join(root, "JPEGImages", resolution, name)
      masks_dir = os.path.join(root, "Annotations", resolution, name)
      for folder in (frames_dir, masks_dir):
        if not os.path.isdir(folder):
          raise _fail(
              folder,
              f"folder of video {name!r}, listed in {split_file}, is missing",
              "use the official trainval archive (re-download it)",
          )
      _davis_files(frames_dir, masks_dir, strict=True)


@functools.cache
def _offline_davis_class():
  """The TFDS davis builder with its download step replaced (lazy import)."""
  from tensorflow_datasets.video.davis import davis  # pylint: disable=g-import-not-at-top

  class OfflineDavis(davis.Davis, skip_registration=True):
    """tfds `davis`, extracting the user's archives instead of downloading."""

    # The name of the original, so the prepared folder is davis/<config>/...
    # and tfds.builder_from_directory reads it without this class.
    name = "davis"
    # TFDS looks for a checksums file beside the builder's code; davis has
    # none, and the lookup needs the optional importlib_resources package.
    code_path = None

    def __init__(self, *, archive_dir: str, **kwargs):
      self._archive_dir = archive_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      resolution = (
          "Full-Resolution" if self.builder_config.full_resolution else "480p"
      )
      return super()._split_generators(
          _LocalArchives(dl_manager, self._archive_dir, resolution)
      )

  return OfflineDavis


def _prepare_tfds_davis(eval_data: ml_collections.ConfigDict) -> str:
  """Builds the TFDS davis dataset once; returns its folder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  archive_dir = eval_data.path
  if not archive_dir or not os.path.isdir(archive_dir):
    raise _fail(
        repr(archive_dir),
        "config.eval_data.path is not a folder",
        "download DAVIS-2017-trainval-480p.zip (or"
        " DAVIS-2017-trainval-Full-Resolution.zip) from"
        " https://data.vision.ee.ethz.ch/csergi/share/davis/ into a folder"
        " and pass that folder",
    )
  config_name = (
      "full_resolution"
      if _resolution_folder(eval_data) == "Full-Resolution"
      else "480p"
  )
  data_dir = eval_data.get("tfds_data_dir", "") or os.path.join(
      archive_dir, "tfds"
  )
  os.makedirs(data_dir, exist_ok=True)
  builder = _offline_davis_class()(
      archive_dir=archive_dir, data_dir=data_dir, config=config_name
  )
  # Extracted archives only feed the build; they go when it is done.
  download_dir = tempfile.mkdtemp(prefix="davis_archives_", dir=data_dir)
  try:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _fail(
        archive_dir,
        f"the TFDS davis builder failed on the archive ({type(e).__name__}:"
        f" {e})",
        "check the archive (re-download it), then rerun",
    ) from e
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)
  return str(builder.data_dir)


def _tfds_examples(dataset_dir: str, split: str, skip_labels: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  decoders = {"video": {"frames": tfds.decode.SkipDecoding()}}
  if skip_labels:
    decoders["video"]["segmentations"] = tfds.decode.SkipDecoding()
  builder = tfds.builder_from_directory(dataset_dir)
  dataset = builder.as_dataset(
      split=split, decoders=decoders, shuffle_files=False
  )
  return dataset.as_numpy_iterator()


def _list_tfds_davis(eval_data: ml_collections.ConfigDict) -> list[VideoRef]:
  split = _tfds_split(eval_data)
  dataset_dir = _prepare_tfds_davis(eval_data)
  refs = []
  # The records hold the videos in TFDS's hashed order; `index` finds one.
  for index, example in enumerate(_tfds_examples(dataset_dir, split, True)):
    refs.append(
        VideoRef(
            source="tfds_davis",
            name=example["metadata"]["video_name"].decode(),
            path=dataset_dir,
            options=(("index", index), ("split", split)),
        )
    )
  if not refs:
    raise _fail(
        dataset_dir,
        f"split {split!r} holds no video",
        "check the split files of the archive",
    )
  return sorted(refs, key=lambda r: r.name)


def _load_tfds_davis(
    ref: VideoRef, eval_data: ml_collections.ConfigDict
) -> Video:
  index = ref.option("index")
  split = ref.option("split")
  examples = list(
      _tfds_examples(ref.path, f"{split}[{index}:{index + 1}]", False)
  )
  where = f"{ref.path} ({split} example {index})"
  name = examples[0]["metadata"]["video_name"].decode() if examples else None
  if name != ref.name:
    raise _fail(
        where,
        f"holds video {name!r}, not {ref.name!r}: the prepared dataset"
        " changed since the videos were listed",
        "list the videos again",
    )
  video = examples[0]["video"]
  paths = [f"{where} frame {t:05d}" for t in range(len(video["frames"]))]
  decoded = [_decode_frame(p, b) for p, b in zip(paths, video["frames"])]
  frames = _stack_frames(paths, [f for f, _ in decoded])
  annotations = {}
  for t, ids in enumerate(video["segmentations"][..., 0]):
    path = f"{where} annotation {t:05d}"
    _check_size(path, ids, paths[t], frames[t])
    annotations[t] = (ids, path)
  return _finish(
      ref.name,
      [f"{t:05d}" for t in range(len(frames))],
      frames,
      [b for _, b in decoded],
      annotations,
      eval_data,
      appear_later=False,
      where=where,
  )


# ----------------------------------------------------------------------------
# Entry points.

# source -> (lister, loader).
_SOURCES = {
    "davis": (_list_davis, _load_davis),
    "davis2016": (_list_davis, _load_davis),
    "tfds_davis": (_list_tfds_davis, _load_tfds_davis),
    "youtube_vos": (_list_youtube_vos, _load_youtube_vos),
    "video": (_list_own_video, _load_own_video),
}


def list_videos(eval_data: ml_collections.ConfigDict) -> list[VideoRef]:
  """Checks the layout of `eval_data.source` and lists its videos.

  Args:
    eval_data: `config.eval_data` (source, path, split, mask, ...).

  Returns:
    One VideoRef per video: in the split file's order for davis and
    davis2016, sorted by name otherwise.

  Raises:
    InputError: a missing folder, split file or video; the message says
      which path is expected and how to get it.
  """
  if eval_data.source not in _SOURCES:
    raise InputError(
        f"config.eval_data.source={eval_data.source!r} is unknown. Fix: use"
        f" one of {', '.join(_SOURCES)}."
    )
  return _SOURCES[eval_data.source][0](eval_data)


def load_video(ref: VideoRef, eval_data: ml_collections.ConfigDict) -> Video:
  """Reads and validates one video.

  Args:
    ref: from `list_videos`.
    eval_data: `config.eval_data` (max_objects, resize_height).

  Returns:
    The video, resized if `eval_data.resize_height` > 0.

  Raises:
    InputError: an unreadable or truncated image, a mask of the wrong size
      or with colours that are not ids, no object, a gap in the frame
      numbering, an annotation without a frame, too many objects.
  """
  return _SOURCES[ref.source][1](ref, eval_data)
