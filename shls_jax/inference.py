"""Segmenting videos with a trained model: evaluation and own videos (SPEC 8, 9).

    networks = inference.load_networks(config, workdir)
    segmenter = inference.VideoSegmenter(config, networks)
    masks = segmenter(video)  # one element of input_pipeline.video_dataset

A video is tracked in chunks of `config.eval_data.time_bucket` frames: the
first frame starts the memory (`tracker.start`), then each chunk is one
`lax.scan` of `tracker.step`, the carry passing from chunk to chunk. Only two
programs are compiled per frame size and object count (start and one
chunk), whatever the video's length, and a progress bar moves chunk by
chunk. The last chunk is padded with frames that leave the carry alone.

`evaluate_dataset` runs every video of a prepared evaluation dataset
(data_prep.videos), writes palette PNGs named like the ground truth and, where
the records hold ground truth, the official DAVIS-2017 scores
(shls_jax.evaluate): the two CSVs and a printed table.

Objects first given after frame 0 (YouTube-VOS) join on the frame of their
mask (`tracker.admit`): only these given masks are read, never the ground
truth of later frames. Such videos are segmented but not scored (the DAVIS
protocol takes its objects from frame 0).
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import skimage.transform
import tqdm

from shls_jax import evaluate as evaluate_lib
from shls_jax import input_pipeline
from shls_jax import memory as memory_lib
from shls_jax import shipped
from shls_jax import tracker
from shls_jax import train
from shls_jax.models import backbone as backbone_lib


@dataclasses.dataclass
class Networks:
  """The two trained networks and their variables."""

  sf_model: Any
  sf_variables: Any
  decoder: Any
  decoder_variables: Any
  source: str  # What they were loaded from ("untrained" for fresh ones).


def networks_from_state(config, params, batch_stats, source: str) -> Networks:
  sf_params, decoder_params = train.split_variables(params)
  sf_stats, decoder_stats = train.split_variables(batch_stats)
  return Networks(
      sf_model=train.make_model(config),
      sf_variables={"params": sf_params, "batch_stats": sf_stats},
      decoder=train.make_decoder(config),
      decoder_variables={
          "params": decoder_params,
          "batch_stats": decoder_stats,
      },
      source=source,
  )


def load_networks(
    config: ml_collections.ConfigDict, path: str, step: int | None = None
) -> Networks:
  """The networks of the newest checkpoint under `path` (a workdir or its
  checkpoints folder), or of its checkpoint `step`, written by any training
  stage; "" or "untrained": the fresh initialisation from config.seed;
  "shipped" (or a path ending in .npz): the model inside the package
  (shls_jax.shipped), whose network sizes replace config.model."""
  if path == "shipped" or path.endswith(".npz"):
    model, params, batch_stats, meta = shipped.load(
        "" if path == "shipped" else path[: -len(".npz")]
    )
    config = shipped.with_model(config, model)
    name = meta.get("provenance", {}).get("name", shipped.NAME)
    return networks_from_state(config, params, batch_stats, f"shipped {name}")
  mesh = train.make_mesh(jax.local_devices()[:1])
  model = train.make_model(config)
  tx = train.make_optimizer(config, 1)
  if path and path != "untrained":
    # Every value comes from the checkpoint: restore onto shapes only.
    template = train.abstract_state(config, model, tx, mesh)
    state = train.load_weights(config, template, path, mesh, step=step)
    source = train.checkpoint_dir(path) + (
        f" (step {step})" if step is not None else ""
    )
  else:
    state = train.create_state(config, model, tx, mesh)
    source = "untrained"
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  return networks_from_state(config, params, batch_stats, source)


def settings_for(config, num_objects: int) -> tracker.Settings:
  return tracker.Settings(
      max_objects=max(int(num_objects), 1),
      num_segments=(
          config.eval_superpixels.max_superpixels
          + config.eval_data.split_extra_superpixels
      ),
      capacity=config.memory.capacity,
      crop_size=tuple(config.model.decoder_crop_size),
      hyper=memory_lib.Hyperparameters.from_config(config.memory),
  )


def _normalize(frames, mean, std):
  return backbone_lib.normalize(frames, mean, std)


@functools.partial(
    jax.jit, static_argnames=("sf_model", "settings", "mean", "std")
)
def _start(
    sf_variables,
    frame,
    superpixels,
    num_superpixels,
    mask,
    num_objects,
    *,
    sf_model,
    settings,
    mean,
    std,
):
  return tracker.start(
      sf_model,
      sf_variables,
      _normalize(frame, mean, std),
      superpixels,
      num_superpixels,
      mask,
      num_objects,
      settings,
  )


@functools.partial(
    jax.jit,
    static_argnames=("sf_model", "decoder", "settings", "mean", "std"),
    donate_argnums=2,
)
def _chunk(
    sf_variables,
    decoder_variables,
    carry,
    inputs,
    *,
    sf_model,
    decoder,
    settings,
    mean,
    std,
):
  body = functools.partial(
      tracker.step,
      sf_model=sf_model,
      sf_variables=sf_variables,
      decoder=decoder,
      decoder_variables=decoder_variables,
      settings=settings,
  )
  inputs = dict(inputs, frame=_normalize(inputs["frame"], mean, std))
  return jax.lax.scan(body, carry, inputs)


class VideoSegmenter:
  """Tracks whole videos.

  The variables are arguments of the compiled programs, so networks of the
  same architecture (trained, untrained, another checkpoint) share them:
  one start and one chunk program per frame size and object count.
  """

  def __init__(self, config: ml_collections.ConfigDict, networks: Networks):
    self.config = config
    self.networks = networks
    self.chunk = max(int(config.eval_data.time_bucket), 1)
    self._static = dict(
        mean=tuple(config.eval_data.pixel_mean),
        std=tuple(config.eval_data.pixel_std),
    )

  def __call__(self, video: dict[str, np.ndarray], progress=None) -> np.ndarray:
    """The masks of one video.

    Args:
      video: one element of `input_pipeline.video_dataset` as NumPy.
      progress: a tqdm bar to advance by frames, or None.

    Returns:
      uint8 [T, H, W] masks of the video's T real frames (frame 0 is the
      given mask).
    """
    name = _text(video["video_name"])
    num_frames = int(video["num_frames"])
    num_objects = int(video["num_objects"])
    given = given_masks(video)
    limit = self.config.eval_data.max_objects
    if num_objects > limit:
      raise ValueError(
          f"Video {name} has {num_objects} objects but"
          f" config.eval_data.max_objects={limit}; raise it."
      )
    nets = self.networks
    settings = settings_for(self.config, num_objects)
    carry, mask0 = _start(
        nets.sf_variables,
        video["frames"][0],
        video["superpixels"][0],
        video["num_superpixels"][0],
        given[0],
        np.int32(num_objects),
        sf_model=nets.sf_model,
        settings=settings,
        **self._static,
    )
    mask0 = np.asarray(mask0)
    masks = [np.where(mask0 > num_objects, 0, mask0)[None]]
    if progress is not None:
      progress.update(1)
    t = 1
    while t < num_frames:
      idx = np.arange(t, t + self.chunk)
      inside = idx < len(video["frames"])
      idx = np.minimum(idx, len(video["frames"]) - 1)
      inputs = {
          "frame": video["frames"][idx],
          "superpixels": video["superpixels"][idx],
          "num_superpixels": video["num_superpixels"][idx],
          "frame_valid": video["frame_valid"][idx] & inside,
      }
      if (np.asarray(video["object_first_frame"]) > 0).any():
        # Objects first given later join the memory on their frame
        # (tracker.admit); videos without them compile without that branch.
        inputs["given"] = given[idx] * inside[:, None, None]
      carry, out = _chunk(
          nets.sf_variables,
          nets.decoder_variables,
          carry,
          inputs,
          sf_model=nets.sf_model,
          decoder=nets.decoder,
          settings=settings,
          **self._static,
      )
      real = min(self.chunk, num_frames - t)
      masks.append(np.asarray(out)[:real])
      if progress is not None:
        progress.update(real)
      t += self.chunk
    return np.concatenate(masks).astype(np.uint8)


def given_masks(video: dict[str, np.ndarray]) -> np.ndarray:
  """int32 [T', H, W]: on each frame, the masks of the objects first given
  there (`object_first_frame`), 0 elsewhere; frame 0 also keeps its void
  (255) pixels, which the memory ignores.

  Only these annotations are inputs: ground truth of an object on later
  frames never reaches the tracker.
  """
  labels = np.asarray(video["labels"])
  first = np.asarray(video["object_first_frame"])
  given = np.zeros(labels.shape, np.int32)
  for k, t in enumerate(first, 1):
    if t < len(labels):
      given[t] = np.where(labels[t] == k, k, given[t])
  given[0] = np.where(labels[0] == 255, 255, given[0])
  return given


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def to_original_size(masks: np.ndarray, size) -> np.ndarray:
  """Masks [T, h, w] -> [T, H, W] (nearest), the source's own resolution."""
  size = tuple(int(s) for s in size)
  if masks.shape[1:] == size:
    return masks
  return np.stack([
      skimage.transform.resize(
          m, size, order=0, preserve_range=True, anti_aliasing=False
      ).astype(masks.dtype)
      for m in masks
  ])


def evaluate_dataset(
    config: ml_collections.ConfigDict,
    networks: Networks,
    dataset_dir: str,
    out_dir: str | None,
    *,
    split: str | None = None,
    write_masks: bool = True,
    on_video=None,
    videos: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Segments every video of a prepared dataset; scores those with labels.

  Args:
    config: the config (eval_data, eval_superpixels, memory, model).
    networks: from `load_networks`.
    dataset_dir: a dataset of data_prep.videos (or the demo videos).
    out_dir: results: <out_dir>/masks/<video>/<frame>.png, the CSVs; None:
      nothing is written (validation while training).
    split: defaults to config.eval_data.split.
    write_masks: write the palette PNGs.
    on_video: called as on_video(video, masks) after each video.
    videos: only these videos (by name), in the dataset's order; None: all.
    progress: show a progress bar over frames.

  Returns:
    global_scores and rows (`evaluate.summarize`; absent when no video has
    ground truth beyond frame 0), videos (names), frames (count), seconds
    per frame (after each program's first run), masks {video: uint8
    [T, H, W]} at the records' resolution.
  """
  import time  # pylint: disable=g-import-not-at-top

  split = split or config.eval_data.split
  segmenter = VideoSegmenter(config, networks)
  ds = input_pipeline.video_dataset(
      dataset_dir,
      split,
      max_superpixels=config.eval_superpixels.max_superpixels,
      time_bucket=config.eval_data.time_bucket,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      videos=videos,
  )
  results, names, all_masks = [], [], {}
  total_frames, timed_frames, timed_seconds = 0, 0, 0.0
  seen_objects = set()
  wanted = None if videos is None else set(videos)
  bar = tqdm.tqdm(
      desc="segment", unit="frame", dynamic_ncols=True, disable=not progress
  )
  for video in ds.as_numpy_iterator():
    name = _text(video["video_name"])
    if wanted is not None and name not in wanted:
      continue
    num_frames = int(video["num_frames"])
    bar.set_postfix(video=name)
    first_run = int(video["num_objects"]) not in seen_objects
    seen_objects.add(int(video["num_objects"]))
    t0 = time.perf_counter()
    masks = segmenter(video, progress=bar)
    if not first_run:
      timed_seconds += time.perf_counter() - t0
      timed_frames += num_frames
    total_frames += num_frames
    names.append(name)
    all_masks[name] = masks
    frame_names = [_text(f) for f in video["frame_names"][:num_frames]]
    full_size = to_original_size(masks, video["original_size"])
    if write_masks and out_dir is not None:
      evaluate_lib.write_sequence_pngs(
          os.path.join(out_dir, "masks"), name, frame_names, full_size
      )
    if on_video is not None:
      on_video(video, masks)
    has_label = video["has_label"][:num_frames]
    late = (np.asarray(video["object_first_frame"]) > 0).any()
    if late and has_label.all():
      logging.info(
          "%s: objects join after frame 0, which the DAVIS protocol does"
          " not score; its masks are written (YouTube-VOS is scored by its"
          " server).",
          name,
      )
    if has_label.all() and num_frames >= 3 and not late:
      # At the source's own resolution when the records were resized, as
      # the official tool scores the written PNGs.
      full_labels = input_pipeline.decode_full_labels(video)
      if full_labels is None:
        scored = (masks, video["labels"][:num_frames])
      else:
        scored = (full_size, full_labels[:num_frames])
      results.append(evaluate_lib.evaluate_sequence(name, *scored))
  bar.close()
  if not names:
    raise ValueError(
        f"{dataset_dir} has no video in split {split!r}"
        + (f" named {sorted(wanted)}." if wanted is not None else ".")
    )
  if wanted is not None and len(names) < len(wanted):
    raise ValueError(
        f"{dataset_dir} split {split!r} has no video named"
        f" {sorted(wanted - set(names))}; it has {names}."
    )
  summary = {
      "videos": names,
      "frames": total_frames,
      "seconds_per_frame": (
          timed_seconds / timed_frames if timed_frames else float("nan")
      ),
      "masks": all_masks,
  }
  if results:
    global_scores, rows = evaluate_lib.summarize(results)
    if out_dir is not None:
      evaluate_lib.write_csvs(out_dir, split, global_scores, rows)
    summary.update(global_scores=global_scores, rows=rows, results=results)
  logging.info(
      "Segmented %d videos (%d frames)%s.",
      len(names),
      total_frames,
      f" into {out_dir}" if out_dir is not None else "",
  )
  return summary


def copy_first_mask_scores(dataset_dir: str, config, split=None, videos=None):
  """The floor that copies the first-frame mask to every frame (of the
  named `videos` only, if given)."""
  split = split or config.eval_data.split
  ds = input_pipeline.video_dataset(
      dataset_dir,
      split,
      max_superpixels=config.eval_superpixels.max_superpixels,
      time_bucket=1,
      videos=videos,
  )
  results = []
  for video in ds.as_numpy_iterator():
    n = int(video["num_frames"])
    labels = input_pipeline.decode_full_labels(video)
    labels = video["labels"][:n] if labels is None else labels[:n]
    if n >= 3 and video["has_label"][:n].all():
      first = np.where(labels[0] == evaluate_lib.VOID_ID, 0, labels[0])
      results.append(
          evaluate_lib.evaluate_sequence(
              _text(video["video_name"]), np.repeat(first[None], n, 0), labels
          )
      )
  return evaluate_lib.summarize(results)[0] if results else None


class VideoValidation:
  """Official J&F on a few held-out videos while training (stages decoder
  and joint), next to the copy-the-first-mask floor.

  `config.train.video_eval`: `dataset`, a video dataset prepared by
  data_prep.videos under the data_dir (e.g. davis2016_train: DAVIS-2016
  train is the development set); `videos`, the names to track ("" = the
  first `num_videos` of the dataset). The tracker runs with the
  evaluation settings (config.eval_data, config.memory) and the networks'
  running BatchNorm statistics; nothing is written but the scores.
  """

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str):
    section = config.train.video_eval
    self.config = config
    self.dataset_dir = os.path.join(data_dir, section.dataset, "1.0.0")
    if not os.path.isdir(self.dataset_dir):
      raise FileNotFoundError(
          f"config.train.video_eval.dataset={section.dataset!r}: no prepared"
          f" videos at {self.dataset_dir}. Prepare them with `python -m"
          " data_prep.videos` (for DAVIS-2016 train:"
          " --config.eval_data.source=davis2016"
          " --config.eval_data.split=train), or set the field to '' to turn"
          " this validation off."
      )
    builder = input_pipeline.load_builder(self.dataset_dir)
    self.split = next(iter(builder.info.splits.keys()))
    names = [n for n in str(section.videos).split(",") if n]
    if not names:
      names = input_pipeline.video_names(self.dataset_dir, self.split)[
          : section.num_videos
      ]
    self.videos = tuple(names)
    self.floor = copy_first_mask_scores(
        self.dataset_dir, config, self.split, videos=self.videos
    )

  def floors(self) -> dict[str, float]:
    """The copy-first floor as metrics (computed once)."""
    if self.floor is None:
      return {}
    return {
        "val/video_jf_copy_first": self.floor["J&F-Mean"],
        "val/video_j_copy_first": self.floor["J-Mean"],
    }

  def __call__(self, params, batch_stats) -> dict[str, float]:
    """J&F, J and F of the networks with these variables (one device's)."""
    networks = networks_from_state(
        self.config, params, batch_stats, "training state"
    )
    summary = evaluate_dataset(
        self.config,
        networks,
        self.dataset_dir,
        None,
        split=self.split,
        videos=self.videos,
        progress=False,
    )
    scores = summary.get("global_scores")
    if scores is None:
      return {}
    return {
        "val/video_jf": scores["J&F-Mean"],
        "val/video_j": scores["J-Mean"],
        "val/video_f": scores["F-Mean"],
        "val/video_seconds_per_frame": summary["seconds_per_frame"],
    }

