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
import skimage.data

from data_prep import image_io
from data_prep import still_images
from data_prep import synthesis
from data_prep import writer
from shls_jax import input_pipeline

# File names inside skimage's data folder. Left out: synthetic patterns
# (chessboard, phantom, color wheel), text pages and pure textures, which
# have no object for a saliency detector to find.
BUNDLED_IMAGES = (
    "astronaut.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "logo.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
MIN_IMAGES = 8


def export_bundled_images(out_dir: str) -> list[str]:
  """Copies the bundled images to out_dir as RGB PNGs; returns their names."""
  os.makedirs(out_dir, exist_ok=True)
  names = []
  for file_name in BUNDLED_IMAGES:
    src = os.path.join(skimage.data.data_dir, file_name)
    if not os.path.exists(src):
      continue  # Another scikit-image version may ship a different set.
    name = os.path.splitext(file_name)[0] + ".png"
    dst = os.path.join(out_dir, name)
    if not os.path.exists(dst):
      image = still_images.load_image(src)  # Grey / RGBA -> RGB.
      writer.atomic_write_bytes(dst, writer.encode_png(image))
    names.append(name)
  if len(names) < MIN_IMAGES:
    raise RuntimeError(
        f"Only {len(names)} demo images found in {skimage.data.data_dir};"
        f" the demo needs {MIN_IMAGES}. Install scikit-image>=0.26 from PyPI."
    )
  return names


def prepare(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Builds (or finishes) the demo dataset under data_dir."""
  images_dir = os.path.join(data_dir, "demo_images")
  export_bundled_images(images_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.prep.images_dir = images_dir
  config.prep.saliency_dir = ""
  return still_images.prepare(config, data_dir)


def _video_examples(file_name: str, ctx, num_videos: int):
  """Worker: the demo videos of one held-out image."""
  source = still_images._load_source(ctx, file_name)  # pylint: disable=protected-access
  draw_donor = still_images._donor_drawer(ctx, file_name)  # pylint: disable=protected-access
  for k in range(num_videos):
    rng = np.random.default_rng(
        writer.item_seed(ctx.seed, f"video/{file_name}/{k}")
    )
    frames, labels = synthesis.synthesize_sequence(
        source, draw_donor, rng, ctx.prep
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
  export_bundled_images(images_dir)
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
          if k not in ("images_dir", "saliency_dir", "num_workers")
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
