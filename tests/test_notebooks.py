"""The notebooks, executed headlessly on the tiny config: a broken one fails.

Each notebook runs in a fresh kernel of this interpreter (so the package and
the test extra's ipykernel are the ones installed here), from a temporary
folder, its "parameters" cell given the test's values (appended to the cell,
as papermill injects them after it) on configs/test.py.
"""

import json
import os
import sys
import zipfile

import imageio.v3 as iio
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
import numpy as np

from data_prep import video_sources
from tests.test_main import _own_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "shls-jax-test"
CELL_TIMEOUT_S = 300


def _kernel_manager(tmp_path) -> KernelManager:
  """A kernel of sys.executable, whatever kernels the machine has installed."""
  kernels = tmp_path / "kernels"
  spec = kernels / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
      json.dumps({
          "argv": [
              sys.executable,
              "-m",
              "ipykernel_launcher",
              "-f",
              "{connection_file}",
          ],
          "display_name": "shls_jax tests",
          "language": "python",
      })
  )
  return KernelManager(
      kernel_name=KERNEL,
      kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
  )


def _execute(name: str, parameters: dict, tmp_path):
  """Runs notebooks/<name> with `parameters`; returns the executed notebook."""
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: one cell tagged 'parameters' expected"
  defined = {
      line.split("=")[0].strip()
      for line in cells[0].source.splitlines()
      if "=" in line and not line.startswith((" ", "#"))
  }
  assert set(parameters) <= defined, set(parameters) - defined
  cells[0].source += "\n" + "\n".join(
      f"{key} = {value!r}" for key, value in parameters.items()
  )
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  client = nbclient.NotebookClient(
      nb,
      km=_kernel_manager(tmp_path),
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(run_dir)}},
  )
  client.execute()  # A cell that raises fails here, with its traceback.
  return nb


def _outputs(nb, cell_id: str) -> list:
  return next(c for c in nb.cells if c.get("id") == cell_id).outputs


def _text(outputs, streams=("stdout",)) -> str:
  """What the cell printed (progress bars and logs go to stderr)."""
  return "".join(
      o.text for o in outputs if o.output_type == "stream" and o.name in streams
  )


def _mime_types(outputs) -> set:
  return {
      mime
      for o in outputs
      if o.output_type == "display_data"
      for mime in o.data
  }


def _no_errors(nb):
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"]
      printed = _text(cell.outputs, ("stdout", "stderr"))
      assert "Traceback" not in printed, cell.id


def test_demo_notebook_trains_segments_and_shows(tmp_path):
  workdir = str(tmp_path / "work")
  nb = _execute(
      "shls_demo.ipynb",
      {
          "CONFIG": "configs/test.py",
          "WORKDIR": workdir,
          "CHECKPOINT": "",
          "OVERRIDES": {"train.num_train_steps": 2},
          "VIDEO_INDEX": 1,
      },
      tmp_path,
  )
  _no_errors(nb)
  setup = _text(_outputs(nb, "setup"))
  assert "shls_jax from" in setup and "cpu device(s)" in setup
  assert "image/png" in _mime_types(_outputs(nb, "data"))  # The preview.
  train = _text(_outputs(nb, "train"))
  assert "Trained to step 2;" in train  # OVERRIDES reached stage 1.
  assert "Stage 2 (decoder, + cross-entropy): step 2" in train
  assert f"Model: {os.path.join(workdir, 'stage2', 'checkpoints')}" in train
  segment = _text(_outputs(nb, "segment"))
  assert "5 frames of 64x64 px" in segment
  assert "image/png" in _mime_types(_outputs(nb, "frames"))
  assert "image/gif" in _mime_types(_outputs(nb, "animation"))
  gif = iio.imread(
      os.path.join(workdir, segment.split(":")[0] + ".gif"), index=None
  )
  assert gif.shape[0] == 5 and gif.shape[2] > 2 * 64  # Truth | prediction.
  # The J&F table: the trained model and both floors, every column a number.
  table = _text(_outputs(nb, "scores")).splitlines()
  assert "J&F-Mean" in table[0]
  for name in (
      "trained (both stages)",
      "untrained network",
      "copy the first mask",
  ):
    row = next(line for line in table if line.startswith(name))
    values = [float(v) for v in row[len(name) :].split()]
    assert len(values) == 5 and all(0 <= v <= 1 for v in values), row
  assert "image/png" in _mime_types(_outputs(nb, "curves"))
  assert "No metrics.jsonl" not in _text(_outputs(nb, "curves"))


def test_segment_notebook_on_a_generated_video(tmp_path):
  frames_dir = str(tmp_path / "clip")
  mask = _own_video(frames_dir)
  mask_path = str(tmp_path / "mask.png")
  video_sources.write_palette_mask(mask_path, mask)
  workdir = str(tmp_path / "work")
  nb = _execute(
      "segment_your_video.ipynb",
      {
          "CONFIG": "configs/test.py",
          "CHECKPOINT": "untrained",
          "VIDEO": frames_dir,
          "MASK": mask_path,
          "RESIZE_HEIGHT": 0,
          "WORKDIR": workdir,
      },
      tmp_path,
  )
  _no_errors(nb)
  segment = _outputs(nb, "segment")
  assert "Segmented 6 frames" in _text(segment)
  assert "object 1:" in _text(segment)
  assert "image/gif" in _mime_types(segment)
  assert "image/png" in _mime_types(_outputs(nb, "frames"))
  archive = os.path.join(workdir, "masks.zip")
  assert f"{archive} (6 masks)" in _text(_outputs(nb, "download"))
  with zipfile.ZipFile(archive) as masks:
    names = sorted(n for n in masks.namelist() if n.endswith(".png"))
    assert names == [f"clip/{t:03d}.png" for t in range(6)]
    masks.extract("clip/000.png", tmp_path / "unzipped")
  first = video_sources.read_palette_mask(
      str(tmp_path / "unzipped" / "clip" / "000.png")
  )
  np.testing.assert_array_equal(first, mask)
