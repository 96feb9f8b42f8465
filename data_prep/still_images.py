r"""Training records from a folder of still images (SPEC 2.1, 2.2, 2.4).

  python -m data_prep.still_images --config=configs/davis.py \
    --config.prep.images_dir=$IMAGES --config.data_dir=$DATA

Steps, each parallel over images and resumable:
1. pseudo masks: soft saliency maps from `config.prep.saliency_dir` (matched
   by file stem) or from the built-in RBD detector, cached as 8-bit PNGs in
   `<data_dir>/<name>/pseudo_masks/`;
2. a split by image (train / validation, never sharing an image, donors too);
3. `sequences_per_image` synthetic sequences per image, their superpixels and
   adjacency, written as the TFDS dataset `<data_dir>/<name>/1.0.0`.
"""

import dataclasses
import functools
import os
from typing import Sequence

import ml_collections
import numpy as np
import skimage.transform

from data_prep import bundled
from data_prep import image_io
from data_prep import masks
from data_prep import saliency
from data_prep import synthesis
from data_prep import writer
from shls_jax import input_pipeline

InputError = image_io.InputError
load_image = image_io.load_image


def _shrink(image, max_side, order):
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  scale = max_side / max(h, w)
  shape = (max(1, round(h * scale)), max(1, round(w * scale)))
  out = skimage.transform.resize(
      image, shape, order=order, preserve_range=True, anti_aliasing=order > 0
  )
  return out.astype(image.dtype)


@dataclasses.dataclass(frozen=True)
class _Context:
  """What a worker needs; picklable."""

  images_dir: str
  saliency_dir: str  # External maps or the RBD cache.
  split_files: tuple  # File names of the item's split (donor pool).
  prep: ml_collections.ConfigDict
  superpixels: ml_collections.ConfigDict
  seed: int


def _saliency_path(saliency_dir, file_name):
  return os.path.join(saliency_dir, os.path.splitext(file_name)[0] + ".png")


def _load_source(ctx: _Context, file_name: str) -> synthesis.Source:
  return _load_source_cached(
      ctx.images_dir,
      ctx.saliency_dir,
      file_name,
      ctx.prep.max_source_side,
      ctx.prep.min_region_fraction,
  )


# Donors are drawn again and again from the same pool: keep recent ones.
@functools.lru_cache(maxsize=64)
def _load_source_cached(
    images_dir, saliency_dir, file_name, max_side, min_region_fraction
) -> synthesis.Source:
  image = load_image(image_io.image_path(images_dir, file_name))
  path = _saliency_path(saliency_dir, file_name)
  if not os.path.exists(path):
    raise InputError(
        f"No saliency map for {file_name}: expected {path} (same stem, .png)."
        " Add it, or leave config.prep.saliency_dir empty to use the"
        " built-in RBD detector."
    )
  soft = saliency.load_saliency(path, expected_shape=image.shape[:2])
  image = _shrink(image, max_side, order=1)
  soft = _shrink(soft, max_side, order=1)
  try:
    ids = masks.object_ids_from_mask(
        soft > 0, min_region_fraction=min_region_fraction
    )
  except ValueError as e:
    raise InputError(f"{path}: {e}") from e
  return synthesis.Source(
      name=os.path.splitext(file_name)[0], image=image, ids=ids, saliency=soft
  )


def _donor_drawer(ctx: _Context, exclude: str):
  pool = [f for f in ctx.split_files if f != exclude]

  def draw(rng: np.random.Generator) -> synthesis.Source:
    if not pool:
      raise InputError(
          f"{exclude} is the only image of its split: donors (pasted objects)"
          " need at least two images per split."
      )
    # A donor without object is fine: synthesis draws again.
    return _load_source(ctx, pool[rng.integers(len(pool))])

  return draw


def sequence_examples(file_name: str, ctx: _Context):
  """Worker: all sequences of one image, as example dicts."""
  source = _load_source(ctx, file_name)
  draw_donor = _donor_drawer(ctx, file_name)
  for k in range(ctx.prep.sequences_per_image):
    rng = np.random.default_rng(writer.item_seed(ctx.seed, f"{file_name}/{k}"))
    frames, labels = synthesis.synthesize_sequence(
        source, draw_donor, rng, ctx.prep
    )
    yield {
        "image_id": source.name,
        "sequence_index": k,
        "frames": [writer.encode_png(f) for f in frames],
        "labels": [writer.encode_png(l) for l in labels],
        "num_objects": int(labels.max()),
        **writer.superpixel_fields(
            frames, ctx.superpixels, f"{source.name} sequence {k}"
        ),
    }


def split_by_image(
    files: Sequence[str], validation_fraction: float, seed: int
) -> dict[str, list[str]]:
  """Deterministic train / validation split of file names."""
  files = sorted(files)
  order = np.random.default_rng(seed).permutation(len(files))
  num_val = int(round(validation_fraction * len(files)))
  if validation_fraction > 0 and len(files) >= 4:
    num_val = max(num_val, 2)  # Donors need two images per split.
  val = sorted(files[i] for i in order[:num_val])
  train = sorted(files[i] for i in order[num_val:])
  return {"train": train, "validation": val}


def prepare(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """Runs the whole still-image pipeline; returns the dataset folder."""
  prep = config.prep
  name = prep.dataset_name
  images_dir = prep.images_dir
  if prep.get("include_bundled", False):
    # The photographs scikit-image ships join the user's folders.
    folder = os.path.join(data_dir, name, "bundled_images")
    bundled.export_bundled_images(folder)
    images_dir = ",".join(image_io.image_folders(images_dir) + [folder])
  files = image_io.list_images(images_dir)
  if prep.saliency_dir:
    saliency_dir, mask_source = prep.saliency_dir, "folder"
    if not os.path.isdir(saliency_dir):
      raise InputError(
          f"config.prep.saliency_dir={saliency_dir!r} is not a folder."
      )
  else:
    saliency_dir, mask_source = (
        os.path.join(data_dir, name, "pseudo_masks"),
        "rbd",
    )
    saliency.write_maps(
        files,
        images_dir,
        saliency_dir,
        n_segments=prep.rbd_superpixels,
        num_workers=prep.num_workers,
    )
  splits = split_by_image(files, prep.validation_fraction, config.seed)
  settings = {
      "prep": {k: v for k, v in prep.to_dict().items() if k not in NO_EFFECT},
      "superpixels": config.train_superpixels.to_dict(),
      "seed": config.seed,
      "mask_source": mask_source,
  }

  def make(split_files):
    return functools.partial(
        sequence_examples,
        ctx=_Context(
            images_dir=images_dir,
            saliency_dir=saliency_dir,
            split_files=tuple(split_files),
            prep=prep,
            superpixels=config.train_superpixels,
            seed=config.seed,
        ),
    )

  # Each split's donors come from its own images only.
  return writer.write_dataset(
      data_dir=data_dir,
      name=name,
      splits=splits,
      features_fn=input_pipeline.sequence_features,
      make_examples={split: make(files) for split, files in splits.items()},
      items_per_shard=prep.images_per_shard,
      manifest=settings,
      num_workers=prep.num_workers,
      description=_DESCRIPTION,
      unit="image",
  )


# Prep fields left out of the manifest: they do not change the records
# (include_bundled shows there as the file lists of the splits).
NO_EFFECT = ("images_dir", "saliency_dir", "num_workers", "include_bundled")
_DESCRIPTION = (
    "SHLS synthetic frame-mask sequences made from still images with pseudo"
    " masks (shls_jax data_prep.still_images)."
)


if __name__ == "__main__":
  from data_prep import cli  # pylint: disable=g-import-not-at-top

  cli.run(prepare)
