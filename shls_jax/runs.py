"""The jobs behind `python -m shls_jax.main` modes: demo, evaluate, segment."""

import os

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from data_prep import demo as demo_data
from data_prep import videos as videos_data
from shls_jax import evaluate as evaluate_lib
from shls_jax import inference
from shls_jax import shipped
from shls_jax import train
from shls_jax import visualize


def report(summary: dict, workdir: str) -> str:
  """The console summary of a training run."""
  lines = [
      (
          f"Trained to step {summary['step']}; loss {summary['loss']:.4f} (mean"
          " of the last logging interval)."
      ),
      (
          "Validation, frame-0 label transfer by nearest superfeature, mean"
          f" IoU over {summary.get('val_objects', 0)} objects:"
      ),
      f"  trained network   {summary.get('val_iou', float('nan')):.4f}",
  ]
  if "val_iou_untrained" in summary:
    lines += [
        f"  untrained network {summary['val_iou_untrained']:.4f}",
        f"  mean colour       {summary['val_iou_mean_colour']:.4f}",
    ]
  if "val_video_jf" in summary:
    lines += [
        "Held-out videos, official J&F (J-Mean, F-Mean):",
        (
            f"  trained             {summary['val_video_jf']:.4f}"
            f" ({summary['val_video_j']:.4f}, {summary['val_video_f']:.4f})"
        ),
    ]
    if "val_video_jf_copy_first" in summary:
      lines.append(
          "  copy the first mask"
          f" {summary['val_video_jf_copy_first']:.4f}"
          f" ({summary['val_video_j_copy_first']:.4f}, -)"
      )
  lines.append(
      f"Checkpoints, TensorBoard events and metrics.jsonl in {workdir}."
  )
  return "\n".join(lines)


def train_stage(config: ml_collections.ConfigDict, workdir: str, data_dir: str):
  """`train.train_and_evaluate`, with J&F on held-out videos in stages
  decoder and joint when config.train.video_eval.dataset names them."""
  video_validation = None
  if config.train.video_eval.dataset and config.train.stage in (
      "decoder",
      "joint",
  ):
    video_validation = inference.VideoValidation(config, data_dir)
  return train.train_and_evaluate(
      config, workdir, data_dir, video_validation=video_validation
  )


def _checkpoint_path(config, workdir: str, allow_shipped: bool = False) -> str:
  """config.eval.checkpoint, else the workdir's own checkpoints; with
  `allow_shipped` (mode segment) the shipped model when there are none."""
  path = config.eval.checkpoint or workdir
  if path in ("untrained", "shipped"):
    return path
  directory = train.checkpoint_dir(path)
  if not _holds_steps(directory):
    if allow_shipped and not config.eval.checkpoint and shipped.available():
      logging.info("No checkpoints in %s: using the shipped model.", workdir)
      return "shipped"
    raise FileNotFoundError(
        f"No checkpoints at {directory}. Set --config.eval.checkpoint to the"
        " workdir of a training run ('shipped' for the model inside the"
        " package, 'untrained' for the floor)."
    )
  return path


def _holds_steps(directory: str) -> bool:
  """Whether `directory` holds checkpoint steps (Orbax names them by step)."""
  if not tf.io.gfile.isdir(directory):
    return False
  return any(name.rstrip("/").isdigit() for name in tf.io.gfile.listdir(directory))


def _model_config(config, checkpoint: str):
  """`config` with the shipped model's network sizes when it is used."""
  if checkpoint == "shipped":
    return shipped.with_model(config, shipped.metadata()["model"])
  return config


def _eval_dataset_dir(config, data_dir: str) -> str:
  name = videos_data.dataset_name(config.eval_data)
  path = os.path.join(data_dir, name, "1.0.0")
  if not tf.io.gfile.isdir(path):
    raise FileNotFoundError(
        f"No prepared evaluation videos at {path}. Prepare them with"
        " `python -m data_prep.videos --config=...` (config.eval_data names"
        " the source; config.data_dir the root)."
    )
  return path


def score_table(rows: list[tuple[str, dict | None]]) -> str:
  """A J&F table of several runs: (name, global_scores or None) rows."""
  columns = ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall")
  width = max(len(name) for name, _ in rows) + 2
  lines = [" " * width + "".join(f"{c:>10}" for c in columns)]
  for name, scores in rows:
    values = "".join(
        f"{scores[c]:>10.3f}" if scores else f"{'-':>10}" for c in columns
    )
    lines.append(f"{name:<{width}}{values}")
  return "\n".join(lines)


class EvaluationVisuals:
  """The pictures of an evaluation run, under <out_dir>/visuals:

    side_by_side/<video>.mp4 and .gif  ground truth (left) and prediction
        (right) overlaid on the frames in the DAVIS palette; the prediction
        alone for videos without ground truth after frame 0 (frames without
        ground truth show the plain frame on the left);
    j_per_frame/<video>.png  the per-frame J of each object;
    jf_per_sequence-<split>.png  one J&F bar per scored sequence.

  `on_video` is the callback of `inference.evaluate_dataset`; `charts` reads
  the per-frame scores of its summary.
  """

  def __init__(self, out_dir: str, fps: float):
    self.folder = os.path.join(out_dir, "visuals")
    self.fps = fps
    self.written = []

  def on_video(self, video: dict[str, np.ndarray], masks: np.ndarray) -> None:
    """Writes the side-by-side MP4 and GIF of one segmented video."""
    name = video["video_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    n = len(masks)
    frames = video["frames"][:n]
    if video["has_label"][1:n].any():
      images = np.stack([
          visualize.side_by_side(frame, truth, mask)
          for frame, truth, mask in zip(frames, video["labels"][:n], masks)
      ])
    else:
      images = visualize.overlay_video(frames, masks)
    folder = os.path.join(self.folder, "side_by_side")
    os.makedirs(folder, exist_ok=True)
    for path, write in (
        (os.path.join(folder, f"{name}.mp4"), visualize.write_video),
        (os.path.join(folder, f"{name}.gif"), visualize.write_gif),
    ):
      write(path, images, fps=self.fps)
      self.written.append(path)

  def charts(self, summary: dict, split: str) -> list[str]:
    """Writes the charts of `evaluate_dataset`'s scores; their paths."""
    results = summary.get("results", [])
    if not results:
      return []
    folder = os.path.join(self.folder, "j_per_frame")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(self.folder, f"jf_per_sequence-{split}.png")]
    visualize.write_chart(
        paths[0],
        visualize.jf_bar_chart(results, title=f"J&F per sequence ({split})"),
    )
    for result in results:
      paths.append(os.path.join(folder, f"{result['sequence']}.png"))
      visualize.write_chart(paths[-1], visualize.j_curve_chart(result))
    self.written.extend(paths)
    return paths


def evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str):
  """Mode evaluate: segment the prepared videos, write masks and CSVs."""
  dataset_dir = _eval_dataset_dir(config, data_dir)
  checkpoint = _checkpoint_path(config, workdir)
  config = _model_config(config, checkpoint)
  networks = inference.load_networks(config, checkpoint)
  name = videos_data.dataset_name(config.eval_data)
  out_dir = os.path.join(workdir, "eval", name)
  visuals = EvaluationVisuals(out_dir, config.eval.overlay_fps)
  summary = inference.evaluate_dataset(
      config,
      networks,
      dataset_dir,
      out_dir,
      write_masks=config.eval.write_masks,
      on_video=visuals.on_video if config.eval.write_visuals else None,
  )
  if config.eval.write_visuals:
    visuals.charts(summary, config.eval_data.split)
  lines = [
      f"Model: {networks.source}",
      (
          f"Segmented {len(summary['videos'])} videos, {summary['frames']}"
          f" frames ({summary['seconds_per_frame']:.3f} s per frame after"
          " compilation)."
      ),
  ]
  if "global_scores" in summary:
    lines.append(
        evaluate_lib.format_table(
            summary["global_scores"], summary["rows"], config.eval_data.split
        )
    )
  else:
    lines.append("No ground truth beyond the first frame: nothing to score.")
  lines.append(f"Masks and CSVs in {out_dir}.")
  if visuals.written:
    lines.append(
        f"Ground truth | prediction videos and J&F charts in {visuals.folder}."
    )
  return "\n".join(lines)


def segment(config: ml_collections.ConfigDict, workdir: str, data_dir: str):
  """Mode segment: your own video and first-frame mask -> masks, overlays."""
  if config.eval_data.source != "video":
    raise ValueError(
        "config.mode='segment' segments one video of your own: set"
        " --config.eval_data.source=video, --config.eval_data.path (a video"
        " file or a folder of frames) and --config.eval_data.mask (the first"
        " frame's mask PNG). For datasets use config.mode='evaluate'."
    )
  checkpoint = _checkpoint_path(config, workdir, allow_shipped=True)
  config = _model_config(config, checkpoint)
  dataset_dir = videos_data.prepare(config, data_dir)
  networks = inference.load_networks(config, checkpoint)
  name = videos_data.dataset_name(config.eval_data)
  out_dir = os.path.join(workdir, "segment", name)
  written = []

  def on_video(video, masks):
    n = len(masks)
    overlays = visualize.overlay_video(video["frames"][:n], masks)
    video_path = os.path.join(out_dir, "overlay.mp4")
    gif_path = os.path.join(out_dir, "preview.gif")
    visualize.write_video(video_path, overlays, fps=config.eval.overlay_fps)
    visualize.write_gif(gif_path, overlays)
    written.extend([video_path, gif_path])

  os.makedirs(out_dir, exist_ok=True)
  summary = inference.evaluate_dataset(
      config, networks, dataset_dir, out_dir, on_video=on_video
  )
  masks = next(iter(summary["masks"].values()))
  areas = [(masks == k).mean(axis=(1, 2)) for k in range(1, masks.max() + 1)]
  lines = [
      f"Model: {networks.source}",
      (
          f"Segmented {summary['frames']} frames"
          f" ({summary['seconds_per_frame']:.3f} s per frame after"
          " compilation)."
      ),
  ]
  for k, area in enumerate(areas, 1):
    lines.append(
        f"  object {k}: on {np.mean(area > 0) * 100:.0f} % of the frames,"
        f" mean area {np.mean(area) * 100:.1f} % of the frame"
    )
  lines.append(f"Masks in {os.path.join(out_dir, 'masks')}")
  lines += [f"  {path}" for path in written]
  return "\n".join(lines)


def demo(config: ml_collections.ConfigDict, workdir: str, data_dir: str):
  """Mode demo: stage 1, stage 2, then J&F on the demo videos vs floors."""
  videos_dir = demo_data.prepare_videos(config, data_dir)
  stage1_dir = os.path.join(workdir, "stage1")
  stage2_dir = os.path.join(workdir, "stage2")
  first = ml_collections.ConfigDict(config.to_dict())
  first.train.stage = "superfeatures"
  summary1 = train_stage(first, stage1_dir, data_dir)
  second = ml_collections.ConfigDict(config.to_dict())
  second.train.stage = config.demo.stage2
  second.train.init_from = stage1_dir
  second.train.num_train_steps = config.demo.stage2_steps
  second.train.learning_rate = config.demo.stage2_learning_rate
  second.train.eval_every_steps = 0
  summary2 = train_stage(second, stage2_dir, data_dir)

  out_dir = os.path.join(workdir, "eval")
  trained = inference.networks_from_state(
      config,
      jax.device_get(summary2["state"].params),
      jax.device_get(summary2["state"].batch_stats),
      stage2_dir,
  )
  visuals = EvaluationVisuals(
      os.path.join(out_dir, "trained"), config.eval.overlay_fps
  )
  scores = inference.evaluate_dataset(
      config,
      trained,
      videos_dir,
      os.path.join(out_dir, "trained"),
      split="val",
      on_video=visuals.on_video if config.eval.write_visuals else None,
  )
  if config.eval.write_visuals:
    visuals.charts(scores, "val")
  untrained = inference.load_networks(config, "untrained")
  floor = inference.evaluate_dataset(
      config,
      untrained,
      videos_dir,
      os.path.join(out_dir, "untrained"),
      split="val",
      write_masks=False,
  )
  copy = inference.copy_first_mask_scores(videos_dir, config, split="val")
  results = scores.get("results", [])
  objects = sum(len(r["object_ids"]) for r in results)
  lines = [
      "Stage 1 (superfeatures, NT-Xent):",
      "  " + report(summary1, stage1_dir).replace("\n", "\n  "),
      (
          f"Stage 2 ({config.demo.stage2}, + cross-entropy): step"
          f" {summary2['step']}, loss {summary2['loss']:.4f}."
      ),
      (
          f"Demo videos (held-out images, {len(scores['videos'])} videos,"
          f" {objects} objects), official DAVIS-2017 protocol:"
      ),
      score_table([
          ("trained (both stages)", scores.get("global_scores")),
          ("untrained network", floor.get("global_scores")),
          ("copy the first mask", copy),
      ]),
      (
          f"Tracking: {scores['seconds_per_frame']:.3f} s per frame after"
          " compilation."
      ),
      f"Masks and CSVs in {out_dir}.",
  ]
  if visuals.written:
    lines.append(
        "Ground truth | prediction videos and J&F charts of the trained"
        f" model in {visuals.folder}."
    )
  logging.info("Demo finished.")
  return "\n".join(lines)


def stage_dirs(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The workdir of each stage of config.recipe: <workdir>/<i>_<stage>."""
  return [
      os.path.join(workdir, f"{i}_{stage}")
      for i, stage in enumerate(config.recipe.stages, 1)
  ]


def stage_config(
    config: ml_collections.ConfigDict, workdir: str, index: int
) -> ml_collections.ConfigDict:
  """The config of stage `index` of the recipe (0-based)."""
  recipe = config.recipe
  if not len(recipe.stages) == len(recipe.steps) == len(
      recipe.learning_rates
  ):
    raise ValueError(
        "config.recipe.stages, steps and learning_rates must have one entry"
        f" per stage; got {len(recipe.stages)}, {len(recipe.steps)} and"
        f" {len(recipe.learning_rates)}."
    )
  stage = ml_collections.ConfigDict(config.to_dict())
  stage.mode = "train"
  stage.train.stage = recipe.stages[index]
  stage.train.num_train_steps = int(recipe.steps[index])
  stage.train.learning_rate = float(recipe.learning_rates[index])
  if index > 0:
    stage.train.init_from = stage_dirs(config, workdir)[index - 1]
  return stage


def recipe(config: ml_collections.ConfigDict, workdir: str, data_dir: str):
  """Mode recipe: the stages of config.recipe in turn, each starting from the
  previous one's weights (and resuming its own checkpoints), then the
  evaluation of the last one on config.eval_data (config.recipe.evaluate)."""
  lines = []
  dirs = stage_dirs(config, workdir)
  for index, stage_dir in enumerate(dirs):
    stage = stage_config(config, workdir, index)
    logging.info(
        "Recipe stage %d of %d: %s, %d steps, in %s.",
        index + 1,
        len(dirs),
        stage.train.stage,
        stage.train.num_train_steps,
        stage_dir,
    )
    summary = train_stage(stage, stage_dir, data_dir)
    lines += [
        f"Stage {index + 1} ({stage.train.stage}):",
        "  " + report(summary, stage_dir).replace("\n", "\n  "),
    ]
  if config.recipe.evaluate:
    final = ml_collections.ConfigDict(config.to_dict())
    final.eval.checkpoint = dirs[-1]
    lines.append(evaluate(final, workdir, data_dir))
    copy = inference.copy_first_mask_scores(
        _eval_dataset_dir(final, data_dir), final
    )
    if copy:
      lines.append(score_table([("copy the first mask", copy)]))
  return "\n".join(lines)
