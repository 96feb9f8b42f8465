"""Is a tracker step's cost independent of how far into the video it is?

Phase B of `benchmarks/inference.py` times frames in order, so drift of the
host over a 20-minute run shows up as a change between frame 10 and frame
1000. This separates the two causes:

1. Phase B's video (427x240, N = 384, capacity 1024, 2 objects, random
   weights) is tracked for `frames` frames; the carries after frames 10,
   frames / 2 and `frames` are kept, and every step records the rounds of
   the outlier filter's connected components (the step's only loop whose
   length depends on the data).
2. The same input (frame 11) is then stepped from each kept carry,
   interleaved, `--repeats` times: the medians differ only through the
   state.

    python benchmarks/carry_flatness.py --frames 1000
"""

import argparse
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shls_jax import segments  # pylint: disable=g-import-not-at-top

ROUNDS = []
_COMPONENTS = segments.connected_components


def _recording_components(keys, active):
  roots, rounds = _COMPONENTS(keys, active)
  jax.debug.callback(lambda r: ROUNDS.append(int(r)), rounds)
  return roots, rounds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--frames", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  # Installed before the tracker is traced, so every step records.
  segments.connected_components = _recording_components
  from benchmarks import inference as bench  # pylint: disable=g-import-not-at-top

  size = bench.Size(240, 427, (16, 24), 384, 1024, (112, 192))
  video = bench.Video(size.height, size.width, seed=1)
  superpixels = jax.device_put(bench.block_superpixels(size))
  count = size.num_superpixels
  tracker = bench.Tracker(size)
  frame0 = jax.device_put(video.frame(0))
  mask0 = jax.device_put(video.labels(0))
  tracker.compile(
      frame0, superpixels, mask0, bench._inputs(video, superpixels, count, 1)
  )
  carry, _ = jax.block_until_ready(
      tracker.run_start(frame0, superpixels, mask0)
  )
  ROUNDS.clear()
  times, kept = [], {}
  for f in range(1, args.frames + 1):
    inputs = bench._inputs(video, superpixels, count, f)
    (carry, _), seconds = bench.timed(tracker.run_step, carry, inputs)
    times.append(seconds)
    if f in (10, args.frames // 2, args.frames):
      # The step donates its carry: keep a copy.
      kept[f] = jax.tree.map(lambda x: x.copy(), carry)
  jax.effects_barrier()
  rounds = np.asarray(ROUNDS[: len(times)])
  times = np.asarray(times)
  print(f"{len(times)} frames in order; 50-frame blocks:")
  for i in range(0, len(times), 50):
    print(
        f"  frames {i + 1}-{i + 50}: median {np.median(times[i:i + 50]):.3f}"
        f" s, component rounds {rounds[i:i + 50].min()}"
        f"-{rounds[i:i + 50].max()}"
    )
  inputs = bench._inputs(video, superpixels, count, 11)
  same = {f: [] for f in kept}
  for _ in range(args.repeats):
    for f, kept_carry in kept.items():
      copy = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), kept_carry))
      _, seconds = bench.timed(tracker.run_step, copy, inputs)
      same[f].append(seconds)
  print(f"The same input (frame 11) from each kept carry, {args.repeats}x:")
  for f, values in same.items():
    print(f"  carry after frame {f}: median {np.median(values):.3f} s")
  first = np.median(same[10])
  for f in kept:
    print(f"  ratio frame {f} / frame 10: {np.median(same[f]) / first:.3f}")


if __name__ == "__main__":
  main()
