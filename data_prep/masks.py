"""Label maps: object ids from binary masks (SPEC 2.1) and the DAVIS palette."""

import numpy as np


def davis_palette() -> np.ndarray:
  """The DAVIS / PASCAL VOC colour map: id -> RGB.

  Returns:
    uint8 [256, 3]; id 0 is black, 1 red, 2 green, ..., 255 is the void colour
    (224, 224, 192) used by DAVIS.
  """
  ids = np.arange(256)
  palette = np.zeros((256, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      bit = (ids >> (3 * shift + channel)) & 1
      palette[:, channel] |= bit << (7 - shift)
  # The loop above interleaves the bits of the id over R, G, B, from the
  # most significant colour bit down: the colour map DAVIS ships with.
  return palette.astype(np.uint8)
