"""The pictures of evaluation runs (runs.EvaluationVisuals)."""

import os

import av
import imageio.v3 as iio
import numpy as np

from shls_jax import evaluate
from shls_jax import runs
from shls_jax import visualize
from tests.test_tracker import _video

T = 6


def _scene():
  """A video record and a prediction that loses object 1 from frame 3 on.

  The record has the fields of `input_pipeline.video_dataset` that the
  pictures read, time padded to 8 frames as a time bucket would.
  """
  frames, _, masks = _video(T)
  pad = ((0, 2), (0, 0), (0, 0))
  video = {
      "video_name": b"blocks",
      "frames": np.pad((frames * 255).astype(np.uint8), pad + ((0, 0),)),
      "labels": np.pad(masks.astype(np.int32), pad),
      "has_label": np.arange(T + 2) < T,
  }
  predicted = masks.astype(np.uint8)
  predicted[3:][predicted[3:] == 1] = 0
  return video, masks, predicted


def test_side_by_side_shows_truth_left_and_prediction_right(tmp_path):
  video, truth, predicted = _scene()
  visuals = runs.EvaluationVisuals(str(tmp_path), fps=5.0)
  visuals.on_video(video, predicted)
  folder = tmp_path / "visuals" / "side_by_side"
  assert sorted(os.listdir(folder)) == ["blocks.gif", "blocks.mp4"]
  assert sorted(visuals.written) == sorted(
      str(folder / name) for name in ("blocks.gif", "blocks.mp4")
  )
  with av.open(str(folder / "blocks.mp4")) as container:
    decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  assert len(decoded) == T and decoded[0].shape == (32, 2 * 32 + 4, 3)
  gif = iio.imread(folder / "blocks.gif", index=None)
  assert gif.shape == (T, 32, 2 * 32 + 4, 3)
  frames = video["frames"][:T]
  left = visualize.overlay_video(frames, truth)
  right = visualize.overlay_video(frames, predicted)
  # Where object 1 is lost, the two halves differ; each matches its own.
  lost = truth[4] == 1
  assert np.abs(left[4][lost].astype(int) - right[4][lost]).mean() > 30
  assert np.abs(gif[4, :, :32][lost].astype(int) - left[4][lost]).mean() < 4
  assert np.abs(gif[4, :, 36:][lost].astype(int) - right[4][lost]).mean() < 4


def test_videos_without_ground_truth_show_the_prediction_alone(tmp_path):
  video, _, predicted = _scene()
  video["has_label"] = np.arange(len(video["has_label"])) < 1
  visuals = runs.EvaluationVisuals(str(tmp_path), fps=5.0)
  visuals.on_video(video, predicted)
  gif = iio.imread(
      tmp_path / "visuals" / "side_by_side" / "blocks.gif", index=None
  )
  assert gif.shape == (T, 32, 32, 3)
  expected = visualize.overlay_video(video["frames"][:T], predicted)
  assert np.abs(gif.astype(int) - expected).mean() < 3


def test_charts_are_written_from_the_scores(tmp_path):
  video, truth, predicted = _scene()
  results = [
      evaluate.evaluate_sequence("blocks", predicted, truth),
      evaluate.evaluate_sequence("exact", truth, truth),
  ]
  visuals = runs.EvaluationVisuals(str(tmp_path), fps=5.0)
  assert visuals.charts({}, "val") == []  # Nothing scored, nothing drawn.
  assert not os.path.exists(tmp_path / "visuals")
  paths = visuals.charts({"results": results}, "val")
  root = tmp_path / "visuals"
  assert paths == [
      str(root / "jf_per_sequence-val.png"),
      str(root / "j_per_frame" / "blocks.png"),
      str(root / "j_per_frame" / "exact.png"),
  ]
  for path in paths:
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400
    assert image[..., :3].std() > 10
  # The chart of a lost object differs from that of a perfect track.
  assert not np.array_equal(iio.imread(paths[1]), iio.imread(paths[2]))
  assert sorted(os.listdir(root / "j_per_frame")) == ["blocks.png", "exact.png"]
  # Scored frames 1..4: object 1 is tracked on 1, 2 and lost on 3, 4.
  np.testing.assert_allclose(results[0]["J"][0], [1.0, 1.0, 0.0, 0.0])
