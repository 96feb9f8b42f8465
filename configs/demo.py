r"""The embedded default: a few minutes on a laptop CPU, no download.

  python -m shls_jax.main --config=configs/demo.py --workdir=/tmp/shls_demo

Builds the demo dataset from the still images bundled with scikit-image
(held-out images for validation) under <workdir>/data, then works on it.
"""

import os
import runpy


def get_config():
  """Returns the demo configuration (paper values, smaller sizes)."""
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "davis.py"))["get_config"]()
  config.mode = "demo"
  config.data_dir = ""  # Empty: <workdir>/data.
  config.prep.dataset_name = "shls_demo"
  config.prep.sequences_per_image = 6
  config.prep.images_per_shard = 4
  config.prep.image_size = 128
  config.prep.validation_fraction = 0.2
  config.train_superpixels.slic_n_segments = 100
  config.train_superpixels.max_superpixels = 160
  config.batch_size = 8
  config.eval_batch_size = 6  # 18 validation sequences: 3 full batches.
  config.shuffle_buffer = 64
  # A narrower network than the paper's (a quarter of the parameters) and a
  # larger step size, so that it learns within minutes on a CPU.
  config.model.stem_features = 32
  config.model.stage_features = (32, 64, 128, 128)
  # The frame-0 split makes ~125 new superpixels per 128 x 128 frame here
  # (up to ~205; most are border slivers of a few pixels).
  config.loss.split_extra_superpixels = 224
  # Positives across the frames of a sequence (an option of SPEC 4.1; the
  # paper's is "frame"): with minutes of training instead of the paper's 200
  # epochs it is what makes the validation transfer from frame 0 to later
  # frames beat the floors (README, "Training": measured both ways).
  config.loss.positives = "sequence"
  config.train.learning_rate = 1e-3
  config.train.num_train_steps = 150
  config.train.log_every_steps = 10
  config.train.eval_every_steps = 50
  config.train.checkpoint_every_steps = 50
  return config
