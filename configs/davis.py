r"""The paper setting: train on still images, evaluate on DAVIS-2017 val.

Offline phase (once; SPEC section 2), for an MSRA10K-style image folder and a
local DAVIS-2017 copy:

  python -m data_prep.still_images --config=configs/davis.py \
    --config.prep.images_dir=$IMAGES --config.data_dir=$DATA
  python -m data_prep.videos --config=configs/davis.py \
    --config.eval_data.source=davis --config.eval_data.path=$DAVIS \
    --config.data_dir=$DATA

Then `python -m shls_jax.main --config=configs/davis.py --workdir=$WORKDIR`.
Hardware: written for one TPU v3-8 / one GPU; any device count works, the
learning rate scales with the number of replicas. Every number here is a
reference default of SPEC.md (section 10 lists them).
"""

import ml_collections


def get_config():
  """Returns the paper configuration."""
  config = ml_collections.ConfigDict()
  config.mode = "train"
  config.seed = 0
  # Root of the prepared TFDS datasets: <data_dir>/<dataset name>/<version>.
  config.data_dir = "data"

  # --- Offline phase: synthetic sequences from still images (SPEC 2.1, 2.2).
  config.prep = ml_collections.ConfigDict()
  # A folder of jpg/png still images, or several joined by ",".
  config.prep.images_dir = ""
  # Add the photographs that ship inside scikit-image (data_prep/bundled.py).
  config.prep.include_bundled = False
  # Soft 8-bit saliency maps with the same file stems; "" = built-in RBD.
  config.prep.saliency_dir = ""
  config.prep.dataset_name = "shls_sequences"
  config.prep.sequences_per_image = 4  # Each with its own augmentations.
  config.prep.validation_fraction = 0.05  # Of the images, never shared.
  config.prep.images_per_shard = 64
  config.prep.num_workers = 0  # Processes; 0 = one per CPU core.
  config.prep.seq_len = 3
  config.prep.image_size = 256  # Frames are image_size x image_size.
  # Larger images are shrunk first (longer side, px); MSRA10K is ~400.
  config.prep.max_source_side = 800
  config.prep.rbd_superpixels = 200  # SLIC segments used by the detector.
  config.prep.min_region_fraction = 0.001  # Smaller blobs are merged.
  # Colour jitter of frames 1..T-1 (torchvision ColorJitter semantics).
  config.prep.brightness = 0.2
  config.prep.contrast = 0.2
  config.prep.saturation = 0.2
  config.prep.hue = 0.01
  # Geometric augmentations, each applied with probability aug_prob.
  config.prep.aug_prob = 0.5
  config.prep.rotation_degrees = 30.0
  config.prep.shear_degrees = 15.0
  config.prep.translate_px = 15.0
  config.prep.scale_range = (0.8, 1.2)
  # Random resized crop to image_size, plus a jitter of the window.
  config.prep.crop_scale_range = (0.8, 1.1)
  config.prep.crop_jitter_px = 20.0
  # Multi-object synthesis with pasted donors.
  config.prep.min_labels = 4  # Background included.
  config.prep.donor_short_side_px = (26, 154)
  config.prep.donor_perspective = 0.1
  config.prep.same_donor_prob = 1.0 / 3.0
  config.prep.max_occlusion = 0.5
  config.prep.max_paste_attempts = 3
  config.prep.local_motion_base = 0.2  # Box enlarged by base + t / 10.

  # --- Superpixels (SPEC 2.3). Training frames: SLIC.
  config.train_superpixels = ml_collections.ConfigDict()
  config.train_superpixels.method = "slic"  # slic | isec | felzenszwalb
  config.train_superpixels.max_superpixels = 400  # N_max; more is an error.
  config.train_superpixels.slic_n_segments = 300
  config.train_superpixels.slic_compactness = 20.0
  config.train_superpixels.slic_sigma = 1.0
  config.train_superpixels.isec_f_order = 11
  config.train_superpixels.isec_nit = 4
  config.train_superpixels.fz_scale = 100.0
  config.train_superpixels.fz_sigma = 0.8
  config.train_superpixels.fz_min_size = 50

  # --- Evaluation videos (SPEC 2.4): ISEC at 480p is the paper setting.
  config.eval_data = ml_collections.ConfigDict()
  # davis | davis2016 | tfds_davis | youtube_vos | video
  config.eval_data.source = "davis"
  config.eval_data.path = ""  # Dataset root, archive folder or video.
  config.eval_data.split = "val"
  config.eval_data.mask = ""  # First-frame mask PNG (source=video only).
  # "" = named after the source: davis, youtube_vos, video_<file stem>, ...
  config.eval_data.dataset_name = ""
  config.eval_data.resolution = "480p"  # davis*: 480p | full_resolution
  config.eval_data.tfds_data_dir = ""  # tfds_davis: "" = <path>/tfds
  config.eval_data.max_objects = 10
  config.eval_data.resize_height = 0  # 0 = keep; own videos: e.g. 480.
  # Room for the superpixels that splitting frame 0 at the given mask's
  # borders adds (docs/design.md, the first frame): measured on DAVIS-2016,
  # median 202, p99 529, at most 602. A split component without a free slot
  # stays merged into its superpixel.
  config.eval_data.split_extra_superpixels = 640
  # Frames per compiled scan chunk (the last chunk of a video is padded).
  config.eval_data.time_bucket = 16
  # Input normalisation of evaluation frames (SPEC 3.1: DAVIS statistics).
  config.eval_data.pixel_mean = (0.4512, 0.4448, 0.4111)
  config.eval_data.pixel_std = (0.2485, 0.2403, 0.2617)
  config.eval_data.num_workers = 0
  config.eval_superpixels = (
      config.train_superpixels.copy_and_resolve_references()
  )
  config.eval_superpixels.method = "isec"
  # Measured on all 3455 frames of DAVIS-2016 (train + val, 480p,
  # benchmarks/real_inputs.py): ISEC gives a median of 1028 superpixels per
  # frame, p99 1711, at most 1795 (goat, frame 61); half the frames exceed
  # 1024. 2048 holds every one of them with 14 % to spare.
  config.eval_superpixels.max_superpixels = 2048
  config.eval_superpixels.slic_n_segments = 1000

  # --- Input pipeline.
  config.batch_size = 32  # Sequences, global over all devices.
  config.eval_batch_size = 32  # Validation sequences, global.
  config.shuffle_buffer = 1024
  config.prefetch = 2

  # --- Network (SPEC 3).
  config.model = ml_collections.ConfigDict()
  config.model.sf_channels = 32
  config.model.stem_features = 64
  config.model.stage_features = (64, 128, 256, 256)
  config.model.stage_blocks = (2, 2, 2, 2)
  # Running statistics of the heads' one-channel BatchNorm: 'mean' (one
  # update per batch) or 'sequential' (the authors' per-superpixel loop).
  config.model.sf_stat_update = "mean"
  # Input normalisation: the still-image set (DAVIS has its own, SPEC 3.1).
  config.model.pixel_mean = (0.4532, 0.4335, 0.3921)
  config.model.pixel_std = (0.3025, 0.2918, 0.3122)
  # Refinement decoder (SPEC 7): every object crop is resampled to this
  # (height, width), multiples of 4; the authors crop at native box size
  # (at 480p their boxes cover about 23 % of the frame, ~230 x 410).
  config.model.decoder_crop_size = (224, 384)
  # Decoder widths: refine blocks and stride-4 branch, stride-2 branch, gate.
  config.model.decoder_features = 256
  config.model.decoder_skip_features = 128
  config.model.decoder_gate_features = 32

  # --- Evaluation and own videos (modes evaluate, segment).
  config.eval = ml_collections.ConfigDict()
  # The trained model: a workdir or its checkpoints folder; "" = --workdir's
  # own; "untrained" = a fresh initialisation (a floor).
  config.eval.checkpoint = ""
  config.eval.write_masks = True
  # <eval dir>/visuals: ground truth | prediction MP4 and GIF per video, a
  # J&F bar chart and per-frame J curves (runs.EvaluationVisuals).
  config.eval.write_visuals = True
  config.eval.overlay_fps = 24.0  # Frame rate of overlay videos and GIFs.

  # --- Memory clustering at evaluation (SPEC 6). Rows per class. On the
  # DAVIS-2016 frames 0 (split at the mask), N0 has a median of 1231 (at
  # most 1776) and the largest class's N0_c of 1012 (at most 1526): the
  # long-term part 5 x N0_c needs at most 7630 rows, which 8192 holds on
  # every video, with at least 560 rows of recent entries. SPEC's cap of
  # 10 x N0 (median 12310, at most 17760) would need 16384 rows and double
  # the kNN matrix (N x classes x capacity); beyond the capacity the newest
  # short-term rows are replaced first (docs, "Static shapes"). Training
  # needs (T - 1) x N rows and sizes itself.
  config.memory = ml_collections.ConfigDict()
  config.memory.capacity = 8192
  # The memory's rules (SPEC 6, 10); training uses them too.
  config.memory.num_neighbours = 2  # kNN neighbours.
  config.memory.rank_weight_base = 0.5  # Rank weights (1, 0.5, ...).
  config.memory.num_centroids = 2  # Spherical k-means centroids per class.
  config.memory.kmeans_iterations = 10  # Lloyd steps per fit (SPEC 12).
  config.memory.long_term_factor = 5  # Long-term part: 5 x N0_c entries.
  config.memory.cap_factor = 10  # A class holds at most 10 x N0 entries.
  config.memory.confidence = 0.4  # Confident superpixel threshold (6.3).
  config.memory.outlier_overlap = 0.05  # Outlier filter overlap (6.2).
  config.memory.hull_directions = 64  # Hull polygon sides (>= 32).
  config.memory.test_box_r = 0.3  # Test box enlargement (6.4).
  config.memory.min_box_fraction = 0.05  # Thin boxes take the full side.

  # --- Loss (SPEC 4.1).
  config.loss = ml_collections.ConfigDict()
  config.loss.temperature = 0.07
  config.loss.positives = "frame"  # frame (the paper) | sequence
  # Superpixels of other sequences, gathered from all devices, as negatives.
  config.loss.cross_batch_negatives = True
  # Room for the superpixels that splitting frame 0 at object borders adds
  # (SPEC 6.1): frame maps are padded to max_superpixels + this. Measured on
  # the 1150 PASCAL-S and SOD photographs at 256 x 256 (SLIC 300, RBD
  # pseudo masks): median 144, p99 317, at most 450; the overflow is
  # counted in train/split_overflow.
  config.loss.split_extra_superpixels = 320

  # --- Training (SPEC 5).
  config.train = ml_collections.ConfigDict()
  config.train.stage = "superfeatures"  # superfeatures | decoder | joint
  # A checkpoint to start from (a workdir or its checkpoints/ folder), e.g.
  # stage 1's for stage 2: its parameters and BatchNorm statistics are
  # loaded; the step and the optimizer start afresh. Ignored when this run's
  # own workdir has a checkpoint (then that one is resumed).
  config.train.init_from = ""
  # Object slots of the tracker in stages decoder/joint; objects with larger
  # ids are void in the cross-entropy.
  config.train.max_objects = 4
  config.train.learning_rate = 1e-4  # Adam, per replica (see next line).
  config.train.scale_lr_by_replicas = True  # lr x device count.
  config.train.num_epochs = 200
  config.train.num_train_steps = 0  # > 0 overrides num_epochs.
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 1000  # Also at the end; 0 = only there.
  # Sample pictures to TensorBoard (two validation sequences, eval mode):
  # also at the end; 0 = never.
  config.train.image_every_steps = 1000
  config.train.checkpoint_every_steps = 1000  # Also at the end.
  # Official J&F on held-out real videos in stages decoder and joint
  # (inference.VideoValidation), at every validation, next to the
  # copy-the-first-mask floor (TensorBoard and metrics.jsonl: val/video_*).
  config.train.video_eval = ml_collections.ConfigDict()
  # A dataset of data_prep.videos under data_dir, e.g. davis2016_train
  # (DAVIS-2016 train is the development set); "" = off.
  config.train.video_eval.dataset = ""
  config.train.video_eval.videos = ""  # Comma-separated names; "" = first N.
  config.train.video_eval.num_videos = 3
  config.train.max_checkpoints = 3

  # --- Mode recipe (shls_jax/runs.py): stages trained one after the other,
  # each starting from the previous one's weights, then an evaluation on
  # config.eval_data. The paper: stage 1, then stage 2 (SPEC 5).
  config.recipe = ml_collections.ConfigDict()
  config.recipe.stages = ("superfeatures", "decoder")
  config.recipe.steps = (0, 0)  # 0 = config.train.num_epochs.
  config.recipe.learning_rates = (1e-4, 1e-4)
  config.recipe.evaluate = True

  # --- Multi-host (TPU pods, GPU clusters). jax.distributed is initialised
  # when `initialize` is True or the environment sets JAX_COORDINATOR_ADDRESS
  # (with JAX_NUM_PROCESSES and JAX_PROCESS_ID); empty fields are left to
  # JAX's cluster detection (Cloud TPU, SLURM, Open MPI, Kubernetes).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  return config
