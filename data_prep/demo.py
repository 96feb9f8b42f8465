"""The embedded demo dataset: still images that ship inside installed wheels.

scikit-image bundles about 27 sample images in its wheel (the others in
`skimage.data` need a download, which we never do). The natural and
object-like ones become the demo's still-image folder; the still-image
pipeline (RBD pseudo masks, synthesis, SLIC) then runs on them as on any
user folder, with a held-out validation split by image.

The held-out images also become short demo videos (`prepare_videos`): the
same synthesis with more frames, stored like evaluation videos (DAVIS-style
records with ground truth on every frame), so the demo can be evaluated with
the official protocol.
"""

import functools
import os

import ml_collections
import numpy as np
import skimage.transform

from data_prep import bundled
from data_prep import image_io
from data_prep import still_images
from data_prep import synthesis
from data_prep import writer
from shls_jax import input_pipeline

def prepare(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Builds (or finishes) the demo dataset under data_dir."""
  images_dir = os.path.join(data_dir, "demo_images")
  bundled.export_bundled_images(images_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.prep.images_dir = images_dir
  config.prep.saliency_dir = ""
  return still_images.prepare(config, data_dir)


def _resize(array: np.ndarray, shape, order: int) -> np.ndarray:
  out = skimage.transform.resize(
      array, shape, order=order, preserve_range=True, anti_aliasing=order > 0
  )
  return out.astype(array.dtype)


def _renumber(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Image ids of the kept objects -> 1..k in order, the rest -> 0."""
  table = np.zeros(256, np.uint8)
  table[keep] = np.arange(1, len(keep) + 1)
  return table[labels]


def smooth_video(
    source: synthesis.Source,
    draw_donor,
    rng: np.random.Generator,
    prep: ml_collections.ConfigDict,
    num_frames: int,
    max_attempts: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
  """A synthetic video with a real track, made from one still image.

  The camera pans smoothly across the image (a square window of
  `prep.image_size` pixels moving along a straight line with eased speed);
  the image's own objects (its pseudo masks) move with the scene, and one
  or two objects cut from other images (`draw_donor`, as in training)
  glide across it at constant velocity, bouncing off the frame's edges, in
  front of everything. Unlike the training sequences (independent
  augmentations of one image), consecutive frames differ by a few pixels,
  so the demo shows tracking.

  Args:
    source: the image and its object ids.
    draw_donor: rng -> a Source to cut a moving object from.
    rng: randomness.
    prep: config.prep (image_size, donor sizes, jitter of the donors).
    num_frames: T.
    max_attempts: drawings of the donors until one is visible on frame 0.

  Returns:
    frames uint8 [T, S, S, 3], labels uint8 [T, S, S]: every object is
    visible on frame 0, ids 1..K in a fixed order.
  """
  size = prep.image_size
  h, w = source.image.shape[:2]
  # The window covers 80 % of the image's shorter side: room to pan.
  scale = size / (0.8 * min(h, w))
  shape = (max(size, round(h * scale)), max(size, round(w * scale)))
  background = _resize(source.image, shape, 1).astype(np.float32)
  image_ids = _resize(source.ids, shape, 0)
  start = np.array([rng.integers(0, shape[0] - size + 1),
                    rng.integers(0, shape[1] - size + 1)], np.float64)
  end = np.array([rng.integers(0, shape[0] - size + 1),
                  rng.integers(0, shape[1] - size + 1)], np.float64)
  steps = np.linspace(0.0, 1.0, num_frames)
  eased = (1 - np.cos(np.pi * steps)) / 2
  windows = np.round(start + eased[:, None] * (end - start)).astype(int)
  keep = np.flatnonzero(
      np.bincount(
          image_ids[
              windows[0, 0] : windows[0, 0] + size,
              windows[0, 1] : windows[0, 1] + size,
          ].ravel(),
          minlength=256,
      )[1:]
  ) + 1
  for _ in range(max_attempts):
    movers = []
    for _ in range(int(rng.integers(1, 3))):
      donor = synthesis.cut_donor(
          draw_donor(rng), rng, tuple(prep.donor_short_side_px), 0.6 * size
      )
      if donor is None:
        continue
      patch, alpha = synthesis._render_donor(donor, rng, prep)  # pylint: disable=protected-access
      ph, pw = alpha.shape
      position = rng.uniform([0, 0], [max(size - ph, 1), max(size - pw, 1)])
      speed = rng.uniform(0.01, 0.03) * size
      angle = rng.uniform(0, 2 * np.pi)
      velocity = speed * np.array([np.sin(angle), np.cos(angle)])
      movers.append([patch, alpha, position, velocity])
    frames, labels = [], []
    for t in range(num_frames):
      r, c = windows[t]
      frame = np.moveaxis(background[r : r + size, c : c + size], -1, 0).copy()
      label = _renumber(image_ids[r : r + size, c : c + size], keep)
      for k, (patch, alpha, position, velocity) in enumerate(movers):
        if t:
          position += velocity
          for axis, extent in enumerate(alpha.shape):
            low, high = 0.0, float(max(size - extent, 0))
            if not low <= position[axis] <= high:
              velocity[axis] = -velocity[axis]
              position[axis] = np.clip(position[axis], low, high)
        synthesis.paste(
            frame,
            label,
            patch,
            alpha,
            int(round(position[0])),
            int(round(position[1])),
            len(keep) + k + 1,
            max_occlusion=1.0,
        )
      frames.append(np.clip(np.moveaxis(frame, 0, -1), 0, 255))
      labels.append(label)
    labels = np.stack(labels)
    present = np.unique(labels[0])
    wanted = np.arange(len(keep) + len(movers) + 1)
    if np.isin(wanted, present).all() and len(wanted) > 1:
      break
  else:
    # No donor made it onto frame 0 (or there is no object at all): keep
    # the objects frame 0 shows, renumbered.
    shown = present[present > 0]
    table = np.zeros(256, np.uint8)
    table[shown] = np.arange(1, len(shown) + 1)
    labels = table[labels]
  return np.round(np.stack(frames)).astype(np.uint8), labels


def _video_examples(file_name: str, ctx, num_videos: int):
  """Worker: the demo videos of one held-out image."""
  source = still_images._load_source(ctx, file_name)  # pylint: disable=protected-access
  draw_donor = still_images._donor_drawer(ctx, file_name)  # pylint: disable=protected-access
  for k in range(num_videos):
    rng = np.random.default_rng(
        writer.item_seed(ctx.seed, f"video/{file_name}/{k}")
    )
    frames, labels = smooth_video(
        source, draw_donor, rng, ctx.prep, ctx.prep.seq_len
    )
    num_objects = int(labels.max())
    yield {
        "video_name": f"{source.name}_{k}",
        "source": "demo",
        "frame_names": [f"{t:05d}" for t in range(len(frames))],
        "frames": [writer.encode_png(f) for f in frames],
        "labels": [writer.encode_png(l) for l in labels],
        "has_label": np.ones(len(frames), np.bool_),
        "num_objects": num_objects,
        "object_first_frame": np.zeros(num_objects, np.int32),
        "original_size": np.asarray(frames.shape[1:3], np.int32),
        "full_labels": [],
        **writer.superpixel_fields(
            frames, ctx.superpixels, f"demo video {source.name}_{k}"
        ),
    }


def prepare_videos(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Demo videos from the held-out images (after `prepare`); their folder.

  config.demo_videos sets the frame count and videos per image; the
  superpixels are config.eval_superpixels'. The dataset is
  `<data_dir>/<config.demo_videos.dataset_name>/1.0.0`, split "val".
  """
  images_dir = os.path.join(data_dir, "demo_images")
  bundled.export_bundled_images(images_dir)
  files = image_io.list_images(images_dir)
  held_out = still_images.split_by_image(
      files, config.prep.validation_fraction, config.seed
  )["validation"]
  prep = ml_collections.ConfigDict(config.prep.to_dict())
  prep.seq_len = config.demo_videos.num_frames
  name = config.prep.dataset_name
  ctx = still_images._Context(  # pylint: disable=protected-access
      images_dir=images_dir,
      # The RBD maps `prepare` cached for the still-image dataset.
      saliency_dir=os.path.join(data_dir, name, "pseudo_masks"),
      split_files=tuple(held_out),
      prep=prep,
      superpixels=config.eval_superpixels,
      seed=config.seed,
  )
  settings = {
      "prep": {
          k: v
          for k, v in prep.to_dict().items()
          if k not in still_images.NO_EFFECT
      },
      "superpixels": config.eval_superpixels.to_dict(),
      "videos_per_image": config.demo_videos.videos_per_image,
      "seed": config.seed,
  }
  return writer.write_dataset(
      data_dir=data_dir,
      name=config.demo_videos.dataset_name,
      splits={"val": held_out},
      features_fn=input_pipeline.video_features,
      make_examples=functools.partial(
          _video_examples,
          ctx=ctx,
          num_videos=config.demo_videos.videos_per_image,
      ),
      items_per_shard=1,
      manifest=settings,
      num_workers=config.prep.num_workers,
      description="SHLS demo videos synthesised from held-out still images.",
      unit="image",
  )
