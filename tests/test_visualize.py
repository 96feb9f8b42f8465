"""Overlays, side-by-side pictures, MP4 and GIF files of shls_jax.visualize."""

import fractions
import os

import av
import numpy as np
from PIL import Image
import pytest

from shls_jax import evaluate
from shls_jax import visualize

H, W = 8, 10
# DAVIS colours, written out rather than taken from davis_palette().
RED, GREEN = (128, 0, 0), (0, 128, 0)


def _frame():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _scene():
  """Object 1 a 5x5 block, object 2 a 1-pixel line, void between and above."""
  mask = np.zeros((H, W), np.uint8)
  mask[2:7, 2:7] = 1
  mask[2:7, 7] = 255
  mask[1:7, 8] = 2
  mask[0, :3] = 255
  return mask


def _expected(frame, mask, alpha, colours, contours=True):
  """The overlay computed pixel by pixel, as the docstring describes it."""
  out = frame.copy()
  for r in range(H):
    for c in range(W):
      obj = int(mask[r, c])
      if obj in (0, 255):
        continue
      neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
      border = any(
          0 <= rr < H and 0 <= cc < W and mask[rr, cc] != obj
          for rr, cc in neighbours
      )
      if contours and border:
        out[r, c] = colours[obj]
      else:
        out[r, c] = [
            round(f + alpha * (k - f))
            for f, k in zip(frame[r, c].tolist(), colours[obj])
        ]
  return out


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_overlay_matches_pixelwise_definition(alpha):
  frame, mask = _frame(), _scene()
  out = visualize.overlay(frame, mask, alpha=alpha)
  assert out.dtype == np.uint8 and out.shape == (H, W, 3)
  np.testing.assert_array_equal(
      out, _expected(frame, mask, alpha, {1: RED, 2: GREEN})
  )


def test_overlay_regions():
  frame, mask = _frame(), _scene()
  out = visualize.overlay(frame, mask, alpha=0.25)
  background = mask == 0
  np.testing.assert_array_equal(out[background], frame[background])
  # Void is left untouched, also where it borders an object.
  void = mask == 255
  np.testing.assert_array_equal(out[void], frame[void])
  # Interior of the block: a quarter of red blended in.
  interior = (3, 4)
  want = np.rint(0.75 * frame[interior] + 0.25 * np.array(RED))
  np.testing.assert_array_equal(out[interior], want)
  # Border of the block (next to background and to void), and the whole
  # 1-pixel line, in full colour.
  for r, c in [(2, 2), (4, 2), (6, 4), (4, 6)]:
    assert tuple(out[r, c]) == RED
  for r in range(1, 7):
    assert tuple(out[r, 8]) == GREEN
  assert not np.shares_memory(out, frame)


def test_overlay_without_contours_blends_borders_too():
  frame, mask = _frame(), _scene()
  out = visualize.overlay(frame, mask, alpha=0.5, contours=False)
  np.testing.assert_array_equal(
      out, _expected(frame, mask, 0.5, {1: RED, 2: GREEN}, contours=False)
  )


def test_overlay_custom_palette_and_bool_mask():
  frame = np.full((H, W, 3), 100, np.uint8)
  palette = np.zeros((3, 3), np.uint8)
  palette[1] = (200, 40, 0)
  mask = np.zeros((H, W), bool)
  mask[2:7, 2:7] = True
  out = visualize.overlay(frame, mask, alpha=0.5, palette=palette)
  assert tuple(out[4, 4]) == (150, 70, 50)
  assert tuple(out[2, 4]) == (200, 40, 0)
  assert tuple(out[0, 0]) == (100, 100, 100)


def test_overlay_errors():
  frame, mask = _frame(), _scene()
  with pytest.raises(ValueError, match=r"\(8, 10, 3\).*\(8, 9\)"):
    visualize.overlay(frame, mask[:, :9])
  with pytest.raises(ValueError, match="frame"):
    visualize.overlay(frame.astype(np.float32), mask)
  with pytest.raises(ValueError, match="mask"):
    visualize.overlay(frame, mask.astype(np.float32))
  with pytest.raises(ValueError, match="0..255"):
    visualize.overlay(frame, mask.astype(np.int32) + 300)
  with pytest.raises(ValueError, match="alpha"):
    visualize.overlay(frame, mask, alpha=1.5)
  with pytest.raises(ValueError, match="palette"):
    visualize.overlay(frame, mask, palette=np.zeros((2, 3), np.uint8))


def test_side_by_side():
  frame, truth = _frame(), _scene()
  prediction = np.zeros_like(truth)
  prediction[1:5, 1:6] = 1
  out = visualize.side_by_side(frame, truth, prediction, gap=3)
  assert out.shape == (H, 2 * W + 3, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :W], visualize.overlay(frame, truth))
  np.testing.assert_array_equal(out[:, W : W + 3], 255)
  np.testing.assert_array_equal(
      out[:, W + 3 :], visualize.overlay(frame, prediction)
  )
  with pytest.raises(ValueError, match="gap"):
    visualize.side_by_side(frame, truth, prediction, gap=-1)


def test_overlay_video():
  frames = np.stack([_frame(), 255 - _frame()])
  masks = np.stack([_scene(), np.flipud(_scene())])
  out = visualize.overlay_video(frames, masks, alpha=0.3)
  assert out.shape == (2, H, W, 3)
  for t in range(2):
    np.testing.assert_array_equal(
        out[t], visualize.overlay(frames[t], masks[t], alpha=0.3)
    )
  with pytest.raises(ValueError, match="as many"):
    visualize.overlay_video(frames, masks[:1])


# Video files: 33x50 frames (odd height), a coloured block on a background
# whose colour changes with t.
VH, VW, T = 33, 50, 5
BLOCK = (20, 200, 60)


def _video():
  frames = np.zeros((T, VH, VW, 3), np.uint8)
  for t in range(T):
    frames[t] = (200 - 30 * t, 40 + 20 * t, 90)
    frames[t, 8:24, 10 + 4 * t : 30 + 4 * t] = BLOCK
  return frames


def _decode(path):
  with av.open(path) as container:
    stream = container.streams.video[0]
    info = (stream.codec_context.name, stream.average_rate)
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
  return info, np.stack(frames)


@pytest.fixture(params=["libx264", "mpeg4"])
def codec(request, monkeypatch):
  """Runs a test with libx264 and with the mpeg4 fallback."""
  if request.param == "libx264":
    if "libx264" not in av.codecs_available:
      pytest.skip("This PyAV build has no libx264.")
    return "h264"
  monkeypatch.setattr(
      av, "codecs_available", set(av.codecs_available) - {"libx264"}
  )
  return "mpeg4"


def test_write_video_round_trip(tmp_path, codec):
  frames = _video()
  path = str(tmp_path / "clip.mp4")
  visualize.write_video(path, frames, fps=25)
  (name, rate), decoded = _decode(path)
  assert name == codec
  assert rate == 25
  # Padded to even size, never cropped.
  assert decoded.shape == (T, VH + 1, VW, 3)
  for t in range(T):
    got = decoded[t].astype(float)
    block = got[11:21, 14 + 4 * t : 26 + 4 * t].mean((0, 1))
    np.testing.assert_allclose(block, BLOCK, atol=12)
    corner = got[:5, -6:].mean((0, 1))
    np.testing.assert_allclose(corner, frames[t, 0, -1], atol=12)
    # The added row repeats the last one.
    np.testing.assert_allclose(got[-1], got[-2], atol=12)
  assert os.listdir(tmp_path) == ["clip.mp4"]


def test_write_video_fractional_fps_and_list_input(tmp_path):
  path = str(tmp_path / "clip.mp4")
  visualize.write_video(path, list(_video()[:2, :32, :49]), fps=29.97)
  (_, rate), decoded = _decode(path)
  assert rate == fractions.Fraction(2997, 100)
  assert decoded.shape == (2, 32, 50, 3)


@pytest.mark.parametrize(
    "frames, message",
    [
        ([], "frames is empty"),
        (np.zeros((0, 4, 4, 3), np.uint8), "frames is empty"),
        (np.zeros((2, 4, 4, 3), np.float32), "frames must be uint8"),
        (np.zeros((2, 4, 4), np.uint8), "frames must be uint8"),
        (
            [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)],
            "frames must all have the same shape",
        ),
    ],
)
def test_bad_frames_write_nothing(tmp_path, frames, message):
  for write, name in [
      (visualize.write_video, "v.mp4"),
      (visualize.write_gif, "v.gif"),
  ]:
    with pytest.raises(ValueError, match=message):
      write(str(tmp_path / name), frames)
  assert not os.listdir(tmp_path)


def test_bad_fps_writes_nothing(tmp_path):
  for fps in (0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="fps"):
      visualize.write_video(str(tmp_path / "v.mp4"), _video(), fps=fps)
    with pytest.raises(ValueError, match="fps"):
      visualize.write_gif(str(tmp_path / "v.gif"), _video(), fps=fps)
  assert not os.listdir(tmp_path)


def test_write_video_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "clip.mp4"
  path.write_bytes(b"old")
  real = av.VideoFrame

  class _Failing:
    calls = 0

    @classmethod
    def from_ndarray(cls, *args, **kwargs):
      cls.calls += 1
      if cls.calls == 3:
        raise RuntimeError("encoder broke")
      return real.from_ndarray(*args, **kwargs)

  monkeypatch.setattr(av, "VideoFrame", _Failing)
  with pytest.raises(RuntimeError, match="encoder broke"):
    visualize.write_video(str(path), _video())
  assert _Failing.calls == 3
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["clip.mp4"]


def _read_gif(path):
  """(size, loop, [(rgb frame, duration ms)]) of a GIF."""
  with Image.open(path) as image:
    size, loop = image.size, image.info.get("loop")
    frames = []
    for i in range(image.n_frames):
      image.seek(i)
      frames.append((np.asarray(image.convert("RGB")), image.info["duration"]))
  return size, loop, frames


def test_write_gif_downscales_and_keeps_speed(tmp_path):
  # 12 frames of 40x100, one flat colour each (distinct, so none merge).
  colours = [(20 * t, 250 - 20 * t, (60 * t) % 256) for t in range(12)]
  frames = np.stack([np.full((40, 100, 3), c, np.uint8) for c in colours])
  path = str(tmp_path / "preview.gif")
  visualize.write_gif(path, frames, fps=10, max_side=50, max_frames=5)
  size, loop, got = _read_gif(path)
  assert size == (50, 20)
  assert loop == 0
  # ceil(12 / 5) = 3: frames 0, 3, 6, 9, each shown 3 / 10 s.
  assert len(got) == 4
  for (image, duration), t in zip(got, [0, 3, 6, 9]):
    assert image.shape == (20, 50, 3)
    np.testing.assert_allclose(image.mean((0, 1)), colours[t], atol=4)
    assert duration == 300
  assert os.listdir(tmp_path) == ["preview.gif"]


def test_write_gif_small_and_short_unchanged(tmp_path):
  frames = _video()
  path = str(tmp_path / "preview.gif")
  visualize.write_gif(path, frames, fps=20)
  size, loop, got = _read_gif(path)
  assert size == (VW, VH)
  assert loop == 0
  assert len(got) == T
  assert [d for _, d in got] == [50] * T
  for (image, _), frame in zip(got, frames):
    # 256 colours per frame: the flat regions come back almost exactly.
    assert np.abs(image.astype(int) - frame).mean() < 3


def test_write_gif_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "preview.gif"
  path.write_bytes(b"old")

  def _broken_save(self, fp, *args, **kwargs):
    with open(fp, "wb") as f:
      f.write(b"GIF89a half")
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", _broken_save)
  with pytest.raises(OSError, match="disk full"):
    visualize.write_gif(str(path), _video())
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["preview.gif"]


# ---------------------------------------------------------------- pictures


def test_mark_boundaries_paints_only_segment_borders():
  frame = _frame()
  segments = np.zeros((H, W), np.int32)
  segments[:, 5:] = 7  # One vertical border between columns 4 and 5.
  out = visualize.mark_boundaries(frame, segments, colour=(1, 2, 3))
  border = np.zeros((H, W), bool)
  border[:, 4:6] = True
  assert (out[border] == (1, 2, 3)).all()
  np.testing.assert_array_equal(out[~border], frame[~border])
  with pytest.raises(ValueError, match="sizes differ"):
    visualize.mark_boundaries(frame, segments[:, :-1])


def test_tile_places_images_in_rows_with_gaps():
  a, b = _frame(), 255 - _frame()
  out = visualize.tile([[a, b, a], [b, a, b]], gap=3)
  assert out.shape == (2 * H + 3, 3 * W + 6, 3)
  np.testing.assert_array_equal(out[:H, :W], a)
  np.testing.assert_array_equal(out[:H, W + 3 : 2 * W + 3], b)
  np.testing.assert_array_equal(out[H + 3 :, 2 * (W + 3) :], b)
  assert (out[H : H + 3] == 255).all()
  with pytest.raises(ValueError, match="equally many"):
    visualize.tile([[a, b], [a]])


# ---------------------------------------------------------------- charts


def _results():
  """Scores of two sequences from evaluate_sequence: real per-frame J."""
  truth = np.zeros((7, 12, 16), np.uint8)
  truth[:, 2:8, 2:8] = 1
  truth[:, 6:11, 9:15] = 2
  worse = truth.copy()
  worse[3:, 2:8, 2:5] = 0  # Object 1 loses half of itself from frame 3 on.
  worse[5, 6:11, 9:15] = 0  # Object 2 vanishes on frame 5.
  return [
      evaluate.evaluate_sequence("bear", worse, truth),
      evaluate.evaluate_sequence("car", truth[:, :, ::-1].copy(), truth),
  ]


def test_jf_values_are_the_evaluation_means():
  results = _results()
  values = visualize.jf_per_sequence(results)
  assert values["sequences"] == ["bear", "car"]
  for i, r in enumerate(results):
    expected = np.mean((r["J-Mean"] + r["F-Mean"]) / 2)
    assert values["J&F"][i] == pytest.approx(expected)
  global_scores, _ = evaluate.summarize(results)
  assert values["global J&F"] == pytest.approx(global_scores["J&F-Mean"])
  assert values["J&F"][0] < 1.0 and values["J&F"][0] != values["J&F"][1]


def test_jf_bar_chart_has_one_bar_per_sequence():
  results = _results() * 3  # Six sequences.
  fig = visualize.jf_bar_chart(results)
  (ax,) = fig.axes
  heights = [patch.get_height() for patch in ax.patches]
  np.testing.assert_allclose(heights, visualize.jf_per_sequence(results)["J&F"])
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert labels == ["bear", "car"] * 3
  with pytest.raises(ValueError, match="nothing to chart"):
    visualize.jf_bar_chart([])


def test_j_curve_lines_are_the_per_frame_j():
  result = _results()[0]
  fig = visualize.j_curve_chart(result)
  (ax,) = fig.axes
  lines = ax.get_lines()
  assert len(lines) == 2  # One per object.
  palette = visualize.masks_lib.davis_palette()
  for k, line in enumerate(lines):
    # Frames 1..T-2 are the scored ones.
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 6))
    np.testing.assert_array_equal(line.get_ydata(), result["J"][k])
    np.testing.assert_allclose(line.get_color(), palette[k + 1] / 255.0)
  # The scores the chart shows are the evaluation's: a loss and a vanishing.
  assert lines[0].get_ydata()[2] == pytest.approx(0.5)
  assert lines[1].get_ydata()[4] == 0.0


def test_write_chart_is_a_decodable_png(tmp_path):
  path = str(tmp_path / "chart.png")
  visualize.write_chart(path, visualize.jf_bar_chart(_results()))
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape[0] >= 300 and image.shape[1] >= 400
  assert image.std() > 10  # Not a blank canvas.
  assert os.listdir(tmp_path) == ["chart.png"]  # No temporary file left.
