r"""Learning curve of a real-data recipe run: J&F on DAVIS-2016 train videos.

  python benchmarks/real_accuracy.py --workdir $RUN --data_dir $DATA
  python benchmarks/real_accuracy.py --workdir $RUN --data_dir $DATA \
      --fractions 0.1,0.3,1 --videos bear,boat --no_write

For the run that `python -m shls_jax.main --config=configs/real.py
--workdir=$RUN` made (mode recipe: one folder per stage, $RUN/1_superfeatures
and $RUN/2_decoder), evaluates the checkpoints nearest to the given
fractions of each stage's steps with the official J&F on DAVIS-2016 train
videos (the development set: `--dataset`, prepared by data_prep.videos;
never val), next to the floors: the untrained networks and copying the
first mask. Training seconds come from the `train/steps_per_second` lines
of each stage's metrics.jsonl (time spent in training steps, without the
validation passes). The section goes to benchmarks/RESULTS.md.

The run's own config (<stage dir>/config.json) sets the networks and the
evaluation sizes, so the curve measures exactly what was trained.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_folders(workdir: str) -> list[str]:
  """The recipe's stage folders (<i>_<stage>, in order) that hold a config."""
  names = sorted(
      n
      for n in os.listdir(workdir)
      if n.split("_", 1)[0].isdigit()
      and os.path.exists(os.path.join(workdir, n, "config.json"))
  )
  if not names:
    raise FileNotFoundError(
        f"--workdir={workdir}: no stage folders (<i>_<stage>/config.json)."
        " Give the workdir of a `--config=configs/real.py` (mode recipe) run."
    )
  return [os.path.join(workdir, n) for n in names]


def read_config(stage_dir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(stage_dir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def pick_steps(steps: list[int], total: int, fractions) -> list[int]:
  """The saved steps nearest to each fraction of `total`, without repeats."""
  chosen = []
  for fraction in fractions:
    target = fraction * total
    best = min(steps, key=lambda s: (abs(s - target), -s))
    if best not in chosen:
      chosen.append(best)
  return sorted(chosen)


def training_seconds(stage_dir: str, log_every: int) -> tuple[float, int]:
  """Seconds in training steps and the last logged step, from metrics.jsonl."""
  path = os.path.join(stage_dir, "metrics.jsonl")
  seconds, last, previous = 0.0, 0, 0
  if not os.path.exists(path):
    return 0.0, 0
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rate = row.get("train/steps_per_second")
      if rate:
        steps = row["step"] - previous if row["step"] > previous else log_every
        seconds += steps / rate
        previous = last = row["step"]
  return seconds, last


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a recipe run")
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="", help="default: the run's"
                      " config.train.video_eval.dataset")
  parser.add_argument("--videos", default="", help="comma-separated;"
                      " default: all videos of --dataset")
  parser.add_argument("--fractions", default="0.1,0.3,1")
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument(
      "--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  args = parser.parse_args()
  fractions = [float(x) for x in args.fractions.split(",") if x]
  stages = stage_folders(args.workdir)
  first = read_config(stages[0])
  dataset = args.dataset or first.train.video_eval.dataset
  dataset_dir = os.path.join(args.data_dir, dataset, "1.0.0")
  if not os.path.isdir(dataset_dir):
    raise FileNotFoundError(
        f"--dataset={dataset}: no prepared videos at {dataset_dir}. Prepare"
        " DAVIS-2016 train with `python -m data_prep.videos"
        " --config=configs/real.py --config.eval_data.split=train ...`."
    )
  split = next(iter(inference.input_pipeline.load_builder(dataset_dir)
                    .info.splits.keys()))
  videos = [v for v in args.videos.split(",") if v] or None
  names = videos or inference.input_pipeline.video_names(dataset_dir, split)

  def score(config, checkpoint, step=None):
    networks = inference.load_networks(config, checkpoint, step=step)
    start = time.perf_counter()
    summary = inference.evaluate_dataset(
        config, networks, dataset_dir, None, split=split, videos=videos
    )
    return summary["global_scores"], time.perf_counter() - start

  rows = []
  copy = inference.copy_first_mask_scores(
      dataset_dir, first, split, videos=videos
  )
  rows.append(("copy the first mask", "-", "-", copy))
  untrained, _ = score(read_config(stages[-1]), "untrained")
  rows.append(("untrained networks", "-", "-", untrained))
  total_seconds = 0.0
  for stage_dir in stages:
    config = read_config(stage_dir)
    seconds, _ = training_seconds(stage_dir, config.train.log_every_steps)
    directory = train.checkpoint_dir(stage_dir)
    steps = sorted(
        int(n) for n in os.listdir(directory) if n.isdigit()
    ) if os.path.isdir(directory) else []
    if not steps:
      print(f"{stage_dir}: no checkpoints yet; skipped.")
      continue
    total = int(config.train.num_train_steps) or max(steps)
    for step in pick_steps(steps, total, fractions):
      scores, eval_seconds = score(config, stage_dir, step)
      share = seconds * step / max(max(steps), 1)
      rows.append((
          f"{os.path.basename(stage_dir)} step {step} of {total}",
          f"{total_seconds + share:.0f}",
          f"{eval_seconds:.0f}",
          scores,
      ))
      print(rows[-1][0], f"J&F {scores['J&F-Mean']:.3f}", flush=True)
    total_seconds += seconds

  header = (
      "| model | training s | eval s | J&F | J | F |\n|---|---|---|---|---|---|"
  )
  table = [header] + [
      f"| {name} | {t} | {e} | {s['J&F-Mean']:.3f} | {s['J-Mean']:.3f} |"
      f" {s['F-Mean']:.3f} |"
      for name, t, e, s in rows
  ]
  frames = first.eval_data.resize_height or "full"
  section = [
      f"## Learning curve on DAVIS-2016 train ({time.strftime('%Y-%m-%d')})",
      "",
      f"Command: `python benchmarks/real_accuracy.py --workdir RUN"
      f" --data_dir DATA --fractions {args.fractions}"
      + (f" --videos {args.videos}" if args.videos else "")
      + f"`; machine: {results.machine_description()}.",
      "",
      f"Videos: {len(names)} of {dataset} ({', '.join(names)}), frames at"
      f" {frames} rows, scored at full resolution; training s: time in"
      " training steps up to that checkpoint (metrics.jsonl), both stages"
      " together; eval s: the evaluation of that row.",
      "",
  ] + table
  text = "\n".join(section) + "\n"
  print(text)
  if not args.no_write:
    results.prepend_section(args.results, text)


if __name__ == "__main__":
  main()
