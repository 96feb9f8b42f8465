"""Tests of data_prep.saliency: RBD, 8-bit maps, loading, the command."""

import os

import imageio.v3 as iio
import numpy as np
import pytest

from data_prep import saliency


def _disc_image(seed=0, h=120, w=160, radius=28):
  """uint8 [H, W, 3]: a bright red disc on a noisy green-grey texture."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:h, :w]
  disc = (rows - h / 2) ** 2 + (cols - w / 2) ** 2 < radius**2
  # Texture: stripes plus noise, everywhere up to the image edge.
  texture = 20 * np.sin(cols / 3.0)[..., None] + rng.normal(0, 12, (h, w, 3))
  background = np.array([90, 110, 90]) + texture
  foreground = np.array([235, 60, 50]) + rng.normal(0, 6, (h, w, 3))
  image = np.where(disc[..., None], foreground, background)
  return np.clip(image, 0, 255).astype(np.uint8), disc


def _border(h, w, width=8):
  border = np.ones((h, w), bool)
  border[width:-width, width:-width] = False
  return border


def test_rbd_finds_the_disc():
  image, disc = _disc_image()
  soft = saliency.rbd(image, n_segments=150)
  assert soft.dtype == np.float32
  assert soft.shape == disc.shape
  assert soft.min() >= 0 and soft.max() <= 1
  # Away from the disc's edge, where superpixels may straddle it.
  inner = (
      np.add.reduce([np.roll(disc, s, a) for s in (-4, 4) for a in (0, 1)]) == 4
  ) & disc
  border = _border(*disc.shape)
  assert soft[inner].mean() > 0.7
  assert soft[border].mean() < 0.2
  assert soft[inner].mean() > soft[border].mean() + 0.5


def test_rbd_rejects_wrong_input():
  with pytest.raises(ValueError, match="uint8"):
    saliency.rbd(np.zeros((20, 20, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    saliency.rbd(np.zeros((20, 20), np.uint8))


def test_to_uint8_zeroes_the_background():
  image, disc = _disc_image(seed=1)
  soft = saliency.rbd(image, n_segments=150)
  out = saliency.to_uint8(soft)
  assert out.dtype == np.uint8 and out.shape == disc.shape
  threshold = saliency.binarisation_threshold(soft)
  assert 0 < threshold < 1
  np.testing.assert_array_equal(out > 0, soft > threshold)
  # Kept pixels keep their soft value.
  kept = out > 0
  np.testing.assert_allclose(out[kept], np.round(soft[kept] * 255), atol=1)
  assert (out[_border(*disc.shape)] == 0).mean() > 0.95
  assert (out[disc] > 0).mean() > 0.8
  np.testing.assert_array_equal(saliency.pseudo_mask(out), out > 0)


def test_pseudo_mask_rejects_the_raw_float_map():
  image, _ = _disc_image(seed=2)
  soft = saliency.rbd(image, n_segments=150)
  with pytest.raises(ValueError, match="to_uint8"):
    saliency.pseudo_mask(soft)


def test_to_uint8_threshold_floor_and_flat_map():
  soft = np.zeros((10, 10))
  soft[:, 5:] = 0.05  # Faint: below the floor of 0.1, not object.
  soft[:5, 5:] = 1.0
  soft[:5, :2] = 0.6  # A second mode, above Otsu's threshold.
  out = saliency.to_uint8(soft)
  assert (out[:5, 5:] == 255).all()
  assert (out[:5, :2] == 153).all()
  assert (out[5:] == 0).all()
  assert (out[:, 2:5] == 0).all()
  # A flat map has no object.
  np.testing.assert_array_equal(
      saliency.to_uint8(np.full((4, 4), 0.7)), np.zeros((4, 4), np.uint8)
  )


def test_load_saliency_roundtrip_and_rgb(tmp_path):
  grey = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
  path = str(tmp_path / "grey.png")
  iio.imwrite(path, grey)
  np.testing.assert_array_equal(saliency.load_saliency(path), grey)
  rgb = np.stack([grey, grey + 3, grey + 6], -1)
  path = str(tmp_path / "rgb.png")
  iio.imwrite(path, rgb)
  loaded = saliency.load_saliency(path, expected_shape=(12, 7))
  assert loaded.dtype == np.uint8 and loaded.shape == (12, 7)
  np.testing.assert_array_equal(loaded, grey + 3)


def test_load_saliency_errors_name_the_file(tmp_path):
  path = str(tmp_path / "map.png")
  iio.imwrite(path, np.zeros((12, 7), np.uint8))
  with pytest.raises(ValueError, match="map.png.*12x7.*20x30"):
    saliency.load_saliency(path, expected_shape=(20, 30))
  # Truncated file.
  data = open(path, "rb").read()
  broken = str(tmp_path / "broken.png")
  with open(broken, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="broken.png"):
    saliency.load_saliency(broken)
  # Not an image at all.
  text = str(tmp_path / "notes.png")
  with open(text, "w") as f:
    f.write("not a png")
  with pytest.raises(ValueError, match="notes.png"):
    saliency.load_saliency(text)
  missing = str(tmp_path / "missing.png")
  with pytest.raises(ValueError, match="missing.png"):
    saliency.load_saliency(missing)


def test_command_writes_maps_and_skips_existing(tmp_path, capsys):
  images = tmp_path / "images"
  out = tmp_path / "out"
  images.mkdir()
  for k in range(2):
    iio.imwrite(str(images / f"img{k}.jpg"), _disc_image(seed=k)[0])
  (images / "readme.txt").write_text("not an image")
  saliency.main(["--images", str(images), "--out", str(out)])
  assert sorted(os.listdir(out)) == ["img0.png", "img1.png"]
  first = saliency.load_saliency(
      str(out / "img0.png"), expected_shape=(120, 160)
  )
  assert first.max() > 0 and (first == 0).any()
  assert "Wrote 2" in capsys.readouterr().out
  # A second run keeps what exists and writes only what is missing.
  marker = np.full((120, 160), 7, np.uint8)
  iio.imwrite(str(out / "img0.png"), marker)
  os.remove(out / "img1.png")
  saliency.main(["--images", str(images), "--out", str(out)])
  assert "Wrote 1" in capsys.readouterr().out
  np.testing.assert_array_equal(iio.imread(str(out / "img0.png")), marker)
  assert os.path.exists(out / "img1.png")
  assert not [n for n in os.listdir(out) if "tmp" in n]


def test_rbd_flat_image_has_no_object():
  # Rounding noise on a flat image must not be stretched into a map.
  soft = saliency.rbd(np.full((50, 60, 3), 128, np.uint8))
  np.testing.assert_array_equal(soft, np.zeros((50, 60), np.float32))
  assert not saliency.to_uint8(soft).any()


def test_figure_rows(tmp_path, monkeypatch):
  # One bundled image keeps the test fast; the layout is the same for five.
  monkeypatch.setattr(saliency, "_FIGURE_IMAGES", ("coffee.png",))
  path = str(tmp_path / "figure" / "rbd.png")
  saliency.main(["--figure", path])
  figure = iio.imread(path)
  # coffee.png is 400 x 600: three 160 x 240 panels and two 4-pixel gaps.
  assert figure.shape == (160, 3 * 240 + 2 * 4, 3)
  soft = figure[:, 244:484]
  # The map panel is grey; the cup in the middle outshines the table.
  np.testing.assert_array_equal(soft[..., 0], soft[..., 2])
  assert soft[60:100, 100:140, 0].mean() > 3 * soft[:, :20, 0].mean()
