r"""Evaluation records: videos with first-frame masks (SPEC 2.4).

  # DAVIS-2017 val from a local copy (JPEGImages/480p, Annotations/480p,
  # ImageSets/2017/val.txt), ISEC superpixels at 480p (the paper setting):
  python -m data_prep.videos --config=configs/davis.py \
    --config.eval_data.source=davis --config.eval_data.path=$DAVIS \
    --config.data_dir=$DATA

  # A video of your own (a file or a folder of frames) plus a first-frame
  # mask PNG:
  python -m data_prep.videos --config=configs/davis.py \
    --config.eval_data.source=video --config.eval_data.path=clip.mp4 \
    --config.eval_data.mask=first_mask.png --config.eval_data.resize_height=480

Sources: davis, davis2016 (single object), tfds_davis (the TFDS `davis`
dataset built from the archives you downloaded), youtube_vos, video. Each
video becomes one example of the TFDS dataset `<data_dir>/<name>/1.0.0`,
split `config.eval_data.split`, with superpixels from
`config.eval_superpixels`. Parallel over videos and resumable.
"""

import functools
import re

import ml_collections
import numpy as np

from data_prep import video_sources
from data_prep import writer
from shls_jax import input_pipeline


# config.eval_data fields that do not change the records.
_NO_EFFECT = (
    "num_workers",
    "time_bucket",
    "pixel_mean",
    "pixel_std",
    "split_extra_superpixels",
)


def dataset_name(eval_data: ml_collections.ConfigDict) -> str:
  """`eval_data.dataset_name`, or one made from the source and split.

  A dataset holds one split, so the split is in the name, and so is the
  height frames were resized to: the train and val videos of one source,
  at several sizes, can live in one data_dir (davis2016_train,
  davis2016_val_240p, youtube_vos_valid, ...). An own video is named after
  its file or folder (video_<stem>).
  """
  if eval_data.dataset_name:
    return eval_data.dataset_name
  if eval_data.source == "video":
    stem = re.sub(r"\.[^./]*$", "", eval_data.path.rstrip("/").split("/")[-1])
    name = f"video_{stem}"
  else:
    name = f"{eval_data.source}_{eval_data.split}"
    if eval_data.get("resize_height", 0):
      name += f"_{eval_data.resize_height}p"
  return re.sub(r"[^a-z0-9_]", "_", name.lower())


def video_example(ref, eval_data, sp_config) -> dict:
  """Loads one video and builds its example dict (worker side)."""
  video = video_sources.load_video(ref, eval_data)
  frames = [
      raw if raw is not None else writer.encode_png(frame)
      for raw, frame in zip(video.frame_bytes, video.frames)
  ]
  return {
      "video_name": video.name,
      "source": ref.source,
      "frame_names": list(video.frame_names),
      "frames": frames,
      "labels": [writer.encode_png(l) for l in video.labels],
      "has_label": np.asarray(video.has_label, np.bool_),
      "num_objects": int(video.num_objects),
      "object_first_frame": np.asarray(video.object_first_frame, np.int32),
      "original_size": np.asarray(video.original_size, np.int32),
      "full_labels": [
          writer.encode_png(l)
          for l in (() if video.full_labels is None else video.full_labels)
      ],
      **writer.superpixel_fields(
          video.frames, sp_config, f"{ref.path} video {video.name}"
      ),
  }


def _examples(ref, eval_data, sp_config):
  yield video_example(ref, eval_data, sp_config)


def prepare(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Writes the evaluation records of `config.eval_data`; returns the folder."""
  eval_data = config.eval_data
  refs = video_sources.list_videos(eval_data)
  settings = {
      "eval_data": {
          k: v
          for k, v in eval_data.to_dict().items()
          if k not in _NO_EFFECT
      },
      "superpixels": config.eval_superpixels.to_dict(),
  }
  return writer.write_dataset(
      data_dir=data_dir,
      name=dataset_name(eval_data),
      splits={eval_data.split: refs},
      features_fn=input_pipeline.video_features,
      make_examples=functools.partial(
          _examples, eval_data=eval_data, sp_config=config.eval_superpixels
      ),
      items_per_shard=1,
      manifest=settings,
      num_workers=eval_data.num_workers,
      description=f"SHLS evaluation videos from {eval_data.source}.",
      unit="video",
  )


if __name__ == "__main__":
  from data_prep import cli  # pylint: disable=g-import-not-at-top

  cli.run(prepare)
