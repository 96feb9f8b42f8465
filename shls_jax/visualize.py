"""Pictures of segmentation results: overlays, MP4s, GIF previews, charts.

Masks are integer [H, W] maps of object ids as everywhere in the project:
0 is background, 1..K are objects and 255 is void (DAVIS' "don't care"
label). An overlay tints each object with its colour from the DAVIS palette
and outlines it, so that thin objects stay visible; background and void
pixels keep the frame's own colour.

The charts of an evaluation run (`jf_bar_chart`, `j_curve_chart`) plot the
per-sequence dicts of `shls_jax.evaluate.evaluate_sequence` with matplotlib's
object-oriented API on an Agg canvas: no display and no global pyplot state.

Files are written atomically, in the style of
`data_prep.video_sources.write_palette_mask`: into a hidden temporary file in
the destination folder that is renamed over `path` only once it is complete,
so an interrupted or failed write never leaves a half-written file at `path`.
"""

import contextlib
import fractions
import math
import numbers
import os
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from data_prep import masks as masks_lib

VOID = 255

Frames = Union[np.ndarray, Sequence[np.ndarray]]


def _check_frame(frame: np.ndarray, name: str) -> np.ndarray:
  """The frame as an array, or a ValueError if it is not uint8 [H, W, 3]."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(
        f"{name} must be a uint8 [H, W, 3] RGB image, got {frame.dtype}"
        f" {frame.shape}."
    )
  return frame


def _check_mask(mask: np.ndarray, name: str) -> np.ndarray:
  """The mask as an int64 array, or a ValueError if it is not ids [H, W]."""
  mask = np.asarray(mask)
  if mask.ndim != 2 or not (
      np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool
  ):
    raise ValueError(
        f"{name} must be an integer [H, W] map of object ids, got"
        f" {mask.dtype} {mask.shape}."
    )
  mask = mask.astype(np.int64)
  if mask.size and (mask.min() < 0 or mask.max() > VOID):
    raise ValueError(
        f"{name} must hold ids in 0..{VOID}, got [{mask.min()}, {mask.max()}]."
    )
  return mask


def _borders(mask: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose id differs from one of their 4-neighbours."""
  border = np.zeros(mask.shape, bool)
  vertical = mask[1:, :] != mask[:-1, :]
  horizontal = mask[:, 1:] != mask[:, :-1]
  # A differing pair marks both of its pixels.
  border[1:, :] |= vertical
  border[:-1, :] |= vertical
  border[:, 1:] |= horizontal
  border[:, :-1] |= horizontal
  return border


def overlay(
    frame: np.ndarray,
    mask: np.ndarray,
    *,
    alpha: float = 0.5,
    palette: Optional[np.ndarray] = None,
    contours: bool = True,
) -> np.ndarray:
  """A frame with its objects tinted in their palette colours.

  Every object pixel (id 1..254) becomes `(1 - alpha) * frame + alpha *
  palette[id]`, rounded to the nearest integer (halves to even). Background
  (id 0) and void (id 255) pixels are returned untouched: void is "don't
  care", and leaving it as the plain frame shows it neutrally, neither as an
  object nor as a coloured region. With `contours`, object pixels whose id
  differs from one of their 4-neighbours (another object, the background or
  void; the image edge does not count) are painted fully in the object's
  colour, so that objects one or two pixels thin stay visible.

  Args:
    frame: uint8 [H, W, 3] RGB image.
    mask: integer (or bool) [H, W] object ids in 0..255.
    alpha: weight of the object colour in the blend, in [0, 1].
    palette: uint8 [N, 3] colours by id, N > the largest object id; defaults
      to the DAVIS palette (`data_prep.masks.davis_palette()`).
    contours: whether to outline objects in their full colour.

  Returns:
    uint8 [H, W, 3], a new array.

  Raises:
    ValueError: if the frame or mask is malformed, their sizes differ, alpha
      is outside [0, 1] or the palette has no colour for an id of the mask.
  """
  frame = _check_frame(frame, "frame")
  mask = _check_mask(mask, "mask")
  if frame.shape[:2] != mask.shape:
    raise ValueError(
        f"frame and mask sizes differ: frame {frame.shape}, mask {mask.shape}."
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  if palette is None:
    palette = masks_lib.davis_palette()
  palette = np.asarray(palette)
  if palette.ndim != 2 or palette.shape[1] != 3:
    raise ValueError(f"palette must be [N, 3], got {palette.shape}.")
  objects = (mask > 0) & (mask != VOID)
  if objects.any() and mask[objects].max() >= len(palette):
    raise ValueError(
        f"palette has {len(palette)} colours, mask has id"
        f" {mask[objects].max()}."
    )
  out = frame.copy()
  colours = palette[mask[objects]].astype(np.float64)
  blend = (1.0 - alpha) * frame[objects].astype(np.float64) + alpha * colours
  out[objects] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
  if contours:
    edge = objects & _borders(mask)
    out[edge] = np.clip(palette[mask[edge]], 0, 255).astype(np.uint8)
  return out


def side_by_side(
    frame: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    *,
    gap: int = 4,
    **overlay_kwargs: Any,
) -> np.ndarray:
  """Ground truth and prediction overlaid on the same frame, side by side.

  Args:
    frame: uint8 [H, W, 3] RGB image.
    truth: integer [H, W] ground-truth ids (left).
    prediction: integer [H, W] predicted ids (right).
    gap: width in pixels of the white column between the two.
    **overlay_kwargs: passed on to `overlay` (alpha, palette, contours).

  Returns:
    uint8 [H, 2 * W + gap, 3].

  Raises:
    ValueError: as `overlay` does, or if gap is negative.
  """
  if gap < 0:
    raise ValueError(f"gap must be >= 0, got {gap}.")
  left = overlay(frame, truth, **overlay_kwargs)
  right = overlay(frame, prediction, **overlay_kwargs)
  white = np.full((left.shape[0], gap, 3), 255, np.uint8)
  return np.concatenate([left, white, right], axis=1)


def overlay_video(
    frames: Frames, masks: Frames, **overlay_kwargs: Any
) -> np.ndarray:
  """`overlay` of every frame of a video with its mask.

  Args:
    frames: uint8 [T, H, W, 3] RGB frames (or a sequence of [H, W, 3]).
    masks: integer [T, H, W] object ids (or a sequence of [H, W]).
    **overlay_kwargs: passed on to `overlay` (alpha, palette, contours).

  Returns:
    uint8 [T, H, W, 3].

  Raises:
    ValueError: if the numbers of frames and masks differ, there are none,
      or `overlay` rejects a pair.
  """
  if len(frames) != len(masks):
    raise ValueError(
        f"frames and masks must be as many, got {len(frames)} frames and"
        f" {len(masks)} masks."
    )
  if not len(frames):
    raise ValueError("frames is empty: there is nothing to overlay.")
  return np.stack([
      overlay(frame, mask, **overlay_kwargs)
      for frame, mask in zip(frames, masks)
  ])


def _check_frames(frames: Frames) -> np.ndarray:
  """frames as uint8 [T, H, W, 3], T > 0, or a ValueError naming them."""
  if frames is None or not len(frames):
    raise ValueError("frames is empty: a video needs at least one frame.")
  try:
    array = np.asarray(frames)
  except ValueError:
    shapes = sorted({np.shape(f) for f in frames})
    raise ValueError(
        f"frames must all have the same shape [H, W, 3], got {shapes}."
    ) from None
  if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
    raise ValueError(
        f"frames must be uint8 [T, H, W, 3] RGB, got {array.dtype}"
        f" {array.shape}."
    )
  if not array.shape[1] or not array.shape[2]:
    raise ValueError(f"frames must not be empty images, got {array.shape}.")
  return array


def _check_fps(fps: float) -> float:
  """fps as a float, or a ValueError if it is not a positive number."""
  if not (
      isinstance(fps, numbers.Real)
      and not isinstance(fps, bool)
      and math.isfinite(fps)
      and fps > 0
  ):
    raise ValueError(f"fps must be a positive number, got {fps!r}.")
  return float(fps)


@contextlib.contextmanager
def _atomic_path(path: str, suffix: str) -> Iterator[str]:
  """Yields a fresh temporary path beside `path`; renames it over on success.

  The temporary file is created with the usual permissions (0o666 less the
  umask), not the 0o600 of `tempfile.mkstemp`, since the result is meant to
  be shared. It ends in `suffix`, so that writers choosing a format by the
  file name extension see the right one. On any error it is removed.

  Args:
    path: the final file; its folder must exist.
    suffix: the temporary file name's ending, e.g. ".mp4".

  Yields:
    The temporary file's path.
  """
  folder = os.path.dirname(os.path.abspath(path))
  base = os.path.basename(path)
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
  while True:
    tmp = os.path.join(
        folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp{suffix}"
    )
    try:
      os.close(os.open(tmp, flags, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _pad_even(frames: np.ndarray) -> np.ndarray:
  """Pads odd heights and widths by one edge-replicated row or column."""
  _, h, w, _ = frames.shape
  if not h % 2 and not w % 2:
    return frames
  return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(path: str, frames: Frames, *, fps: float = 24.0) -> None:
  """Writes frames as a video file (H.264 in MP4 by default), atomically.

  The codec is libx264 when this PyAV build has it, MPEG-4 part 2 otherwise,
  in pixel format yuv420p. That format needs even sizes: an odd height or
  width is padded (never cropped) by one row or column repeating the last
  one, so the file's frames may be one pixel taller or wider than `frames`.
  The container follows the extension of `path` (.mp4 when it has none).

  Args:
    path: the video file to write; its folder must exist. An existing file
      is replaced only once the new one is complete.
    frames: uint8 [T, H, W, 3] RGB frames, T >= 1 (or a sequence of
      [H, W, 3] frames of one shape).
    fps: frames per second; fractional rates are kept as a fraction with a
      denominator of at most 1001 (29.97 -> 2997/100).

  Raises:
    ValueError: if frames is empty or not uint8 [T, H, W, 3], or fps is not
      positive; nothing is written then.
  """
  import av  # pylint: disable=g-import-not-at-top

  array = _pad_even(_check_frames(frames))
  fps = _check_fps(fps)
  rate = fractions.Fraction(fps).limit_denominator(1001)
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  suffix = os.path.splitext(path)[1] or ".mp4"
  _, h, w, _ = array.shape
  with _atomic_path(path, suffix) as tmp:
    with av.open(tmp, mode="w") as container:
      stream = container.add_stream(codec, rate=rate)
      stream.width = w
      stream.height = h
      stream.pix_fmt = "yuv420p"
      if codec == "mpeg4":
        # The default (200 kb/s) smears small frames; ~1.5 bits per pixel is
        # near visually lossless for MPEG-4 part 2.
        stream.bit_rate = max(1_000_000, int(1.5 * w * h * float(rate)))
      for image in array:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        for packet in stream.encode(frame):
          container.mux(packet)
      for packet in stream.encode():  # Flush the encoder.
        container.mux(packet)


def write_gif(
    path: str,
    frames: Frames,
    *,
    fps: float = 10.0,
    max_side: int = 480,
    max_frames: int = 150,
) -> None:
  """Writes an animated GIF preview of frames, looping forever, atomically.

  Frames are downscaled (bilinear) so that their longer side is at most
  `max_side`. When there are more than `max_frames`, every n-th frame is kept,
  n = ceil(T / max_frames), and each is shown n times as long, so the preview
  plays at the original speed. GIF stores delays in hundredths of a second:
  the delay is rounded to 10 ms, and viewers commonly slow delays under 20 ms
  (fps > 50 after skipping) down. Colours are reduced to 256 per frame. PIL
  merges consecutive identical frames into one longer frame, so the file may
  hold fewer frames than were kept, with the same total duration.

  Args:
    path: the GIF file to write; its folder must exist.
    frames: uint8 [T, H, W, 3] RGB frames, T >= 1 (or a sequence of
      [H, W, 3] frames of one shape).
    fps: frames per second of `frames`.
    max_side: the longest side of the preview, in pixels.
    max_frames: the most frames the preview holds.

  Raises:
    ValueError: if frames is empty or not uint8 [T, H, W, 3], or fps,
      max_side or max_frames is not positive; nothing is written then.
  """
  array = _check_frames(frames)
  fps = _check_fps(fps)
  if max_side < 1:
    raise ValueError(f"max_side must be >= 1, got {max_side}.")
  if max_frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}.")
  step = math.ceil(len(array) / max_frames)
  array = array[::step]
  _, h, w, _ = array.shape
  scale = min(1.0, max_side / max(h, w))
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  images = []
  for image in array:
    image = Image.fromarray(image)
    if size != (w, h):
      image = image.resize(size, Image.Resampling.BILINEAR)
    images.append(image)
  duration = 1000.0 * step / fps
  with _atomic_path(path, ".gif") as tmp:
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration,
        loop=0,
    )


def mark_boundaries(
    frame: np.ndarray,
    segments: np.ndarray,
    colour: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
  """A frame with the borders of its segments (superpixels) painted.

  Args:
    frame: uint8 [H, W, 3] RGB image.
    segments: integer [H, W] segment ids (any non-negative values).
    colour: RGB of the border pixels: those whose id differs from one of
      their 4-neighbours.

  Returns:
    uint8 [H, W, 3], a new array.
  """
  frame = _check_frame(frame, "frame")
  segments = np.asarray(segments)
  if segments.shape != frame.shape[:2]:
    raise ValueError(
        f"frame and segments sizes differ: frame {frame.shape}, segments"
        f" {segments.shape}."
    )
  out = frame.copy()
  out[_borders(segments)] = np.asarray(colour, np.uint8)
  return out


def tile(rows: Sequence[Sequence[np.ndarray]], *, gap: int = 2) -> np.ndarray:
  """Images of one size in a grid, rows top to bottom, white gaps between.

  Args:
    rows: R sequences of C uint8 [H, W, 3] images each.
    gap: pixels of white between neighbouring images.

  Returns:
    uint8 [R H + (R - 1) gap, C W + (C - 1) gap, 3].
  """
  if not rows or not rows[0]:
    raise ValueError("tile needs at least one row of at least one image.")
  images = [[_check_frame(i, "image") for i in row] for row in rows]
  shapes = {i.shape for row in images for i in row}
  if len(shapes) != 1 or len({len(row) for row in images}) != 1:
    raise ValueError(
        "tile needs rows of equally many images of one shape, got shapes"
        f" {sorted(shapes)} in rows of {[len(r) for r in images]} images."
    )
  h, w, _ = shapes.pop()
  cols = len(images[0])
  out = np.full(
      (len(images) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8
  )
  for r, row in enumerate(images):
    for c, image in enumerate(row):
      out[
          r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w
      ] = image
  return out


# ---------------------------------------------------------------- charts


def jf_per_sequence(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The values of the per-sequence bar chart.

  Args:
    results: per-sequence dicts of `evaluate.evaluate_sequence` (J-Mean and
      F-Mean per object).

  Returns:
    sequences: the names, in the order of `results`; "J&F", "J", "F":
    float64 [num_sequences], each sequence's mean over its objects of
    (J-Mean + F-Mean) / 2, J-Mean and F-Mean; "global J&F": the
    evaluation's J&F-Mean (all objects of all sequences weigh the same, so
    it is not the mean of the bars).
  """
  if not results:
    raise ValueError("No scored sequence: there is nothing to chart.")
  j = np.array([np.mean(r["J-Mean"]) for r in results], np.float64)
  f = np.array([np.mean(r["F-Mean"]) for r in results], np.float64)
  all_j = np.concatenate([np.asarray(r["J-Mean"]) for r in results])
  all_f = np.concatenate([np.asarray(r["F-Mean"]) for r in results])
  return {
      "sequences": [str(r["sequence"]) for r in results],
      "J&F": (j + f) / 2,
      "J": j,
      "F": f,
      "global J&F": float((all_j.mean() + all_f.mean()) / 2),
  }


def _figure(width: float, height: float):
  """A matplotlib Figure on an Agg canvas (no pyplot, no display)."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top

  fig = figure_lib.Figure(
      figsize=(width, height), dpi=100, layout="constrained"
  )
  backend_agg.FigureCanvasAgg(fig)
  return fig


def jf_bar_chart(results: Sequence[dict[str, Any]], title: str = ""):
  """One bar per sequence: its J&F, with the global J&F-Mean as a line.

  Args:
    results: per-sequence dicts of `evaluate.evaluate_sequence`.
    title: the chart's title; defaults to "J&F per sequence".

  Returns:
    A matplotlib Figure (write it with `write_chart`); its one Axes holds
    the bars in the order of `jf_per_sequence`.
  """
  values = jf_per_sequence(results)
  n = len(values["sequences"])
  fig = _figure(max(4.0, 1.5 + 0.3 * n), 4.0)
  ax = fig.add_subplot()
  x = np.arange(n)
  ax.bar(x, values["J&F"], color="#4c72b0", label="J&F (sequence)")
  ax.axhline(
      values["global J&F"],
      color="#c44e52",
      linestyle="--",
      label=f"J&F-Mean {values['global J&F']:.3f}",
  )
  ax.set_xticks(x, values["sequences"], rotation=90, fontsize=8)
  ax.set_xlim(-0.6, n - 0.4)
  # Room above the bars for the legend.
  ax.set_ylim(0.0, 1.15)
  ax.set_yticks(np.linspace(0.0, 1.0, 6))
  ax.set_ylabel("J&F")
  ax.set_title(title or "J&F per sequence")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper right", fontsize=8, ncols=2)
  return fig


def j_curve_chart(result: dict[str, Any], palette: Optional[np.ndarray] = None):
  """Per-frame J of each object of one sequence, one line per object.

  Args:
    result: one dict of `evaluate.evaluate_sequence`: its "J" [num_objects,
      T - 2] holds the scores of frames 1..T-2 (the first and last frames
      are not scored).
    palette: uint8 [N, 3] line colours by object id; the DAVIS palette by
      default, as in the overlays.

  Returns:
    A matplotlib Figure whose Axes holds one line per object, in the order
    of result["object_ids"], x the frame index and y the J of that frame.
  """
  if palette is None:
    palette = masks_lib.davis_palette()
  j = np.asarray(result["J"], np.float64)
  if j.ndim != 2 or j.shape[0] != len(result["object_ids"]):
    raise ValueError(
        f"Sequence {result.get('sequence')!r}: J must be [num_objects, frames]"
        f" with {len(result['object_ids'])} objects, got {j.shape}."
    )
  fig = _figure(6.0, 3.5)
  ax = fig.add_subplot()
  frames = np.arange(1, j.shape[1] + 1)
  for object_id, values, mean in zip(result["object_ids"], j, result["J-Mean"]):
    ax.plot(
        frames,
        values,
        color=np.asarray(palette[int(object_id)], np.float64) / 255.0,
        marker="." if len(frames) <= 40 else None,
        label=f"object {int(object_id)} (J-Mean {float(mean):.3f})",
    )
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("frame")
  ax.set_ylabel("J (IoU)")
  ax.set_title(f"{result['sequence']}: J per frame")
  ax.grid(alpha=0.3)
  if len(j):
    ax.legend(loc="lower left", fontsize=8)
  return fig


def write_chart(path: str, figure) -> None:
  """Writes a matplotlib Figure as a PNG file, atomically.

  Args:
    path: the PNG file; its folder must exist.
    figure: from `jf_bar_chart` or `j_curve_chart`.
  """
  with _atomic_path(path, ".png") as tmp:
    figure.savefig(tmp, format="png")
