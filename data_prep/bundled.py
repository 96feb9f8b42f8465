"""The still images that ship inside the scikit-image wheel (no download).

scikit-image bundles about 27 sample images in its wheel (the others in
`skimage.data` need a download, which we never do). The natural and
object-like ones are the embedded demo's images and may join any
still-image dataset (`config.prep.include_bundled`).
"""

import os

import skimage.data

from data_prep import image_io
from data_prep import writer

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
      image = image_io.load_image(src)  # Grey / RGBA -> RGB.
      writer.atomic_write_bytes(dst, writer.encode_png(image))
    names.append(name)
  if len(names) < MIN_IMAGES:
    raise RuntimeError(
        f"Only {len(names)} demo images found in {skimage.data.data_dir};"
        f" the demo needs {MIN_IMAGES}. Install scikit-image>=0.26 from PyPI."
    )
  return names
