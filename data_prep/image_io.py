"""Reading still images: the one place that turns files into RGB arrays.

Bad files raise `InputError` with the file, the problem and the fix.
"""

import os

import imageio.v3 as iio
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# RBD works on superpixels; a larger input only costs time.
_RBD_MAX_SIDE = 400


class InputError(ValueError):
  """Bad input: the message names the file, the problem and the fix."""


def list_images(images_dir: str) -> list[str]:
  """Sorted file names of the images in a folder (not recursive)."""
  if not images_dir or not os.path.isdir(images_dir):
    raise InputError(
        f"config.prep.images_dir={images_dir!r} is not a folder. Point it at"
        " a folder of .jpg/.png still images."
    )
  names = sorted(
      n
      for n in os.listdir(images_dir)
      if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
  )
  stems = {}
  for n in names:
    stem = os.path.splitext(n)[0]
    if stem in stems:
      raise InputError(
          f"{images_dir} holds both {stems[stem]} and {n}: file stems must be"
          " unique. If one of them is a mask (as in MSRA10K, where the .png"
          " files are ground-truth masks), move the masks to another folder"
          " and pass it as config.prep.saliency_dir."
      )
    stems[stem] = n
  if not names:
    raise InputError(
        f"{images_dir} holds no image ({', '.join(IMAGE_SUFFIXES)})."
    )
  return names


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] from an image file; a clear error when unreadable."""
  try:
    image = np.asarray(iio.imread(path))
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(
        f"{path} cannot be read as an image ({type(e).__name__}: {e}). It is"
        " truncated or not an image: replace or delete it."
    ) from e
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise InputError(
        f"{path} has shape {image.shape}; expected a greyscale, RGB or RGBA"
        " image."
    )
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.dtype == np.uint16:
    image = (image >> 8).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise InputError(f"{path} has pixel type {image.dtype}; expected 8 bit.")
  return image
