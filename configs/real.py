r"""Real-data recipe: real photographs -> stage 1 -> stage 2, DAVIS-2016 dev.

Sized for 2 CPU cores (about 3 hours in all, benchmarks/RESULTS.md
"Learning curve"); on a GPU or TPU only steps, batch and widths change
(the fields under "Scale" below). Offline phase, once:

  python -m data_prep.still_images --config=configs/real.py \
    --config.prep.images_dir=$STILL/pascal_s/images,$STILL/sod/images \
    --config.data_dir=$DATA
  for split in train val; do
    python -m data_prep.videos --config=configs/real.py \
      --config.eval_data.path=$DAVIS --config.eval_data.split=$split \
      --config.data_dir=$DATA
  done

Then both stages and the evaluation on DAVIS-2016 val in one command
(`config.mode = "recipe"`, shls_jax/runs.py):

  python -m shls_jax.main --config=configs/real.py --workdir=$RUN \
    --config.data_dir=$DATA

Training images: the 1150 PASCAL-S and SOD photographs plus the 17 that
ship with scikit-image, with RBD pseudo masks (never the ground-truth
masks). Validation while training: official J&F on four DAVIS-2016 train
videos (the development set), next to the copy-the-first-mask floor.
"""

import os
import runpy


def get_config():
  """Returns the real-data recipe."""
  here = os.path.dirname(os.path.abspath(__file__))
  config = runpy.run_path(os.path.join(here, "davis.py"))["get_config"]()
  config.mode = "recipe"
  config.prep.dataset_name = "shls_real"
  config.prep.include_bundled = True
  config.eval_data.source = "davis2016"

  # --- Scale: what changes between 2 CPU cores and an accelerator.
  config.batch_size = 8
  config.eval_batch_size = 8
  # A network with a quarter of the paper's backbone parameters and a
  # decoder a quarter as wide (README, "Training on real data": measured).
  config.model.stem_features = 32
  config.model.stage_features = (32, 64, 128, 128)
  config.model.decoder_features = 64
  config.model.decoder_skip_features = 32
  config.model.decoder_gate_features = 16
  config.recipe.steps = (3000, 3000)
  config.recipe.learning_rates = (1e-3, 1e-3)

  # Frames of 192 x 192 (the paper: 256): 200 + 192 superpixel slots per
  # frame instead of 400 + 320, which the all-pairs NT-Xent pays for
  # quadratically. SLIC 170 keeps the paper's ~1.3 superpixels per 1000 px.
  config.prep.image_size = 192
  config.prep.donor_short_side_px = (20, 115)  # The paper's, x 0.75.
  config.train_superpixels.slic_n_segments = 170
  config.train_superpixels.max_superpixels = 200
  config.loss.split_extra_superpixels = 192
  # Evaluation at 240p (frames resized to 240 rows, scored at 480p against
  # the full-size ground truth). Measured on all 3455 DAVIS-2016 frames at
  # 240p (benchmarks/RESULTS.md, "Real inputs ... at 240p"): ISEC gives a
  # median of 314 superpixels, at most 517 (480p: 1028, at most 1795);
  # splitting frame 0 at the mask adds at most 320; the memory's long-term
  # part needs at most 2395 rows (5 x N0_c), SPEC's cap 10 x N0 a median of
  # 4115; test boxes have a median of 172 x 181 px.
  config.eval_data.resize_height = 240
  config.eval_superpixels.max_superpixels = 640
  config.eval_data.split_extra_superpixels = 384
  config.memory.capacity = 4096
  config.model.decoder_crop_size = (176, 192)

  config.loss.positives = "sequence"
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 500
  config.train.image_every_steps = 500
  config.train.checkpoint_every_steps = 500
  config.train.max_checkpoints = 20
  config.train.video_eval.dataset = "davis2016_train_240p"
  # Four short, varied development videos (151 frames in all).
  config.train.video_eval.videos = "dog-agility,rollerblade,motorbike,soccerball"
  return config
