"""Reading still images: the one place that turns files into RGB arrays.

Bad files raise `InputError` with the file, the problem and the fix.
"""

import functools
import os

import imageio.v3 as iio
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# RBD works on superpixels; a larger input only costs time.
_RBD_MAX_SIDE = 400


class InputError(ValueError):
  """Bad input: the message names the file, the problem and the fix."""


def image_folders(images_dir: str) -> list[str]:
  """The folders of `config.prep.images_dir`: one, or several joined by ",".
  """
  return [f for f in str(images_dir).split(",") if f.strip()]


def _folder_names(folder: str) -> list[str]:
  if not folder or not os.path.isdir(folder):
    raise InputError(
        f"config.prep.images_dir names {folder!r}, which is not a folder."
        " Point it at a folder of .jpg/.png still images (several folders:"
        " join them with commas)."
    )
  return sorted(
      n
      for n in os.listdir(folder)
      if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
  )


def _index(images_dir: str) -> dict[str, str]:
  """{file name: its folder} over every folder of images_dir."""
  folders = image_folders(images_dir)
  if not folders:
    raise InputError(
        f"config.prep.images_dir={images_dir!r} names no folder. Point it at"
        " a folder of .jpg/.png still images."
    )
  index, stems = {}, {}
  for folder in folders:
    for n in _folder_names(folder):
      stem = os.path.splitext(n)[0]
      path = os.path.join(folder, n)
      if stem in stems:
        raise InputError(
            f"{stems[stem]} and {path} have the same file stem {stem!r}:"
            " stems must be unique over config.prep.images_dir (pseudo"
            " masks and records are named by them). If one of them is a"
            " mask (as in MSRA10K, where the .png files are ground-truth"
            " masks), move the masks to another folder and pass it as"
            " config.prep.saliency_dir; otherwise rename one of the images."
        )
      stems[stem] = path
      index[n] = folder
  return index


def list_images(images_dir: str) -> list[str]:
  """Sorted file names of the images in one folder or several (joined by
  ","), not recursive; file stems must be unique over all of them."""
  names = sorted(_index(images_dir))
  if not names:
    raise InputError(
        f"{images_dir} holds no image ({', '.join(IMAGE_SUFFIXES)})."
    )
  return names


@functools.lru_cache(maxsize=8)
def _cached_index(images_dir: str) -> dict[str, str]:
  return _index(images_dir)


def image_path(images_dir: str, name: str) -> str:
  """The path of image `name` (a file name from `list_images`)."""
  folders = image_folders(images_dir)
  if len(folders) == 1:
    return os.path.join(folders[0], name)
  index = _cached_index(images_dir)
  if name not in index:
    raise InputError(
        f"{name} is in none of the folders of config.prep.images_dir"
        f" ({images_dir})."
    )
  return os.path.join(index[name], name)


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
