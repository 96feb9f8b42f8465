r"""Speed and memory of video inference (the per-frame tracker step).

  python benchmarks/inference.py               # writes a section to RESULTS.md
  python benchmarks/inference.py --quick       # tiny sizes, no writing
  python benchmarks/inference.py --long_frames=300 --long_height=240

Two phases, each in a fresh process (so that one's allocations and compiled
code do not count in the other's memory):

  A  The DAVIS 480p setting (854 x 480), always: about 1000 block
     superpixels (16 x 26 px blocks: 990), N = 1024 + 384 split room = 1408
     superpixel slots, memory capacity 4096 rows per class, decoder crops
     224 x 384, 2 objects. Reports the trace + lower and XLA compile times of
     `tracker.start` (frame 0) and `tracker.step` (one later frame), the
     first run of each, the median step, and a breakdown of the step into
     its four pieces jitted separately (backbone + superfeatures; memory
     prediction + decoder crops, with the prediction alone as a sub-row; the
     decoder; paste, aggregate, confidence and memory update). Each timed
     frame runs the pieces, then the fused step, on the same carry and
     frame, so that both see the same load; the sum of the pieces differs
     from the fused step (XLA fuses and schedules across the piece
     boundaries there, and the pieces pass their intermediates through
     memory).
  B  A long video: the compiled step in a Python loop over --long_frames
     frames, each timed (block_until_ready) with the process's current RSS
     and its peak RSS during that frame (the kernel's high-water mark, reset
     before each frame). Reports the median time (with the fastest frame
     and the process CPU time, less sensitive to other load) and the RSS in
     windows around frames 10, 100 and 1000 (or the last frame), their
     ratios to frame 10, and how full the memory is there; --series writes
     every frame's figures as CSV. The state has fixed shapes, so time
     and memory must stay flat. 1000 frames at 480p take over an hour on 2
     cores, so this phase runs at --long_height x --long_width (default
     240 x 427, 16 x 24 px blocks: 270 superpixels, N and capacity scaled).

Inputs are synthetic, built here: a smooth background of drifting sinusoids
and two moving textured ellipses (object 2 in front of object 1), whose
frame-0 masks are the given mask, so that the prediction, the boxes and the
memory change from frame to frame; block superpixels, the same every frame.
The networks have random weights (SuperfeatureNet() and Decoder(), the
paper's widths): the cost does not depend on the weights, only the
data-dependent parts (which superpixels are confident and stored) do, and
the memory's shapes are fixed anyway.

Every timed call ends with block_until_ready; inputs are put on the device
before the clock starts. The step donates its carry, as a video loop would.
Memory: the compiled executables' memory analysis, the process peak RSS and
the per-frame peak RSS (Linux; other systems report the process peak only).
The load average is recorded at the start and end of each phase, and the
process CPU time over wall time (about the core count when nothing else
runs), since other work on the machine inflates the timings.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax import tracker  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from shls_jax.models import superfeatures as sf_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_OBJECTS = 2
# configs/davis.py: config.model.pixel_mean / pixel_std.
PIXEL_MEAN = np.array([0.4532, 0.4335, 0.3921], np.float32)
PIXEL_STD = np.array([0.3025, 0.2918, 0.3122], np.float32)
# The targets on this CPU at 480p.
TARGET_STEP_S = 8.0
TARGET_FIRST_S = 10.0
TARGET_COMPILE_S = 60.0
TARGET_FLAT = 0.05
REFERENCE = (
    "For comparison, the authors' PyTorch code on the same 2 cores at 480p"
    " takes a median 43 s per frame (28 s superpixel pooling, 2 s geometry,"
    " 1.4 s backbone, 8.8 s decoder, 0.8 s memory predict, 1.4 s update) and"
    " 105 s for the first frame."
)


@dataclasses.dataclass(frozen=True)
class Size:
  """A tracked video's frame size and the tracker's static sizes."""

  height: int
  width: int
  block: tuple[int, int]  # Superpixel block (rows, columns) in pixels.
  segments: int  # N, superpixel slots (split room included).
  capacity: int  # Memory rows per class.
  crop: tuple[int, int]  # Decoder crop (Hc, Wc).

  @property
  def num_superpixels(self) -> int:
    return -(-self.height // self.block[0]) * -(-self.width // self.block[1])

  def settings(self) -> tracker.Settings:
    return tracker.Settings(
        max_objects=NUM_OBJECTS,
        num_segments=self.segments,
        capacity=self.capacity,
        crop_size=self.crop,
    )

  def describe(self) -> str:
    return (
        f"{self.width}x{self.height}, {self.num_superpixels} superpixels"
        f" ({self.block[0]}x{self.block[1]} px blocks), N={self.segments},"
        f" capacity {self.capacity}, crops {self.crop[0]}x{self.crop[1]},"
        f" {NUM_OBJECTS} objects"
    )


# --------------------------------------------------------------------------
# Synthetic video.


class Video:
  """A smooth drifting background and two moving textured ellipses."""

  def __init__(self, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.height, self.width = height, width
    self._yy, self._xx = np.mgrid[:height, :width].astype(np.float32)
    self._yy /= height
    self._xx /= width
    # Background: per channel, 3 plane waves drifting at their own speeds.
    self._waves = [
        (
            rng.uniform(2, 8, 3),  # cycles per frame height
            rng.uniform(2, 8, 3),  # cycles per frame width
            rng.uniform(0.01, 0.05, 3),  # cycles per video frame
            rng.uniform(0, 2 * np.pi, 3),
        )
        for _ in range(3)
    ]
    # Objects: centre (fraction of the frame) on Lissajous paths.
    self._objects = [
        dict(
            axes=(0.20, 0.12),
            periods=(97.0, 131.0),
            phase=(0.0, 1.0),
            colour=(220.0, 40.0, 40.0),
        ),
        dict(
            axes=(0.15, 0.09),
            periods=(113.0, 71.0),
            phase=(2.0, 4.0),
            colour=(40.0, 60.0, 230.0),
        ),
    ]

  def labels(self, t: int) -> np.ndarray:
    """int32 [H, W]: 0 background, objects 1 and 2 (2 in front)."""
    out = np.zeros((self.height, self.width), np.int32)
    for k, obj in enumerate(self._objects, 1):
      out[self._inside(obj, t)] = k
    return out

  def _inside(self, obj, t):
    (py, px), (qy, qx) = obj["periods"], obj["phase"]
    cy = 0.5 + 0.25 * np.sin(2 * np.pi * t / py + qy)
    cx = 0.5 + 0.3 * np.sin(2 * np.pi * t / px + qx)
    ay, ax = obj["axes"]
    return ((self._yy - cy) / ay) ** 2 + ((self._xx - cx) / ax) ** 2 <= 1.0

  def frame(self, t: int) -> np.ndarray:
    """f32 [H, W, 3], normalised as the network reads it."""
    rgb = np.empty((self.height, self.width, 3), np.float32)
    for c in range(3):
      fy, fx, ft, phase = self._waves[c]
      value = 128.0
      for i in range(3):
        value = value + 30.0 * np.sin(
            2 * np.pi * (fy[i] * self._yy + fx[i] * self._xx + ft[i] * t)
            + phase[i]
        )
      rgb[..., c] = value
    for obj in self._objects:
      inside = self._inside(obj, t)
      stripes = 25.0 * np.sin(2 * np.pi * (20 * self._yy + 0.02 * t))
      for c in range(3):
        rgb[..., c] = np.where(inside, obj["colour"][c] + stripes, rgb[..., c])
    rgb = np.clip(rgb, 0, 255) / 255.0
    return (rgb - PIXEL_MEAN) / PIXEL_STD


def block_superpixels(size: Size) -> np.ndarray:
  """int32 [H, W]: row-major ids of size.block blocks."""
  yy, xx = np.mgrid[: size.height, : size.width]
  per_row = -(-size.width // size.block[1])
  return ((yy // size.block[0]) * per_row + xx // size.block[1]).astype(
      np.int32
  )


# --------------------------------------------------------------------------
# Measurement helpers.


def _page_size():
  return os.sysconf("SC_PAGE_SIZE")


def rss_now():
  """Current resident set size in bytes (Linux), else None."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * _page_size()
  except OSError:
    return None


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss():
  """The RSS high-water mark in bytes (since the last reset)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux.


def cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn, *args):
  """(fn(*args) after block_until_ready, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def memory_analysis(compiled):
  a = compiled.memory_analysis()
  if a is None:
    return None
  return {
      "temp": a.temp_size_in_bytes,
      "argument": a.argument_size_in_bytes,
      "output": a.output_size_in_bytes,
      "alias": a.alias_size_in_bytes,
  }


class Tracker:
  """Networks with random weights and the jitted start and step."""

  def __init__(self, size: Size):
    self.size = size
    self.settings = size.settings()
    self.sf_model = sf_lib.SuperfeatureNet()
    self.decoder = decoder_lib.Decoder()
    n = size.segments
    self.sf_variables = jax.jit(
        functools.partial(self.sf_model.init, train=False)
    )(
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
        jnp.zeros((1, 32, 32), jnp.int32),
        jnp.ones((1, n), bool),
    )
    # The decoder's weights do not depend on the crop size.
    c, k = (16, 16), NUM_OBJECTS
    self.decoder_variables = jax.jit(
        functools.partial(self.decoder.init, train=False)
    )(
        jax.random.key(1),
        mask0=jnp.zeros((k,) + c + (1,)),
        prev_pred=jnp.zeros((k,) + c + (1,)),
        f1=jnp.zeros((k, 3) + c + (67,)),
        maps=jnp.zeros((k, 2) + c + (4,)),
        f4=jnp.zeros((k, 3, c[0] // 4, c[1] // 4, 259)),
    )
    settings = self.settings

    def start(sf_variables, frame, superpixels, num_superpixels, mask):
      return tracker.start(
          self.sf_model,
          sf_variables,
          frame,
          superpixels,
          num_superpixels,
          mask,
          jnp.int32(NUM_OBJECTS),
          settings,
      )

    def step(sf_variables, decoder_variables, carry, inputs):
      return tracker.step(
          carry,
          inputs,
          sf_model=self.sf_model,
          sf_variables=sf_variables,
          decoder=self.decoder,
          decoder_variables=decoder_variables,
          settings=settings,
      )

    self._start = jax.jit(start)
    self._step = jax.jit(step, donate_argnums=2)
    self.start = self.step = None
    self.compile_s = {}
    self.analysis = {}

  def compile(self, frame0, superpixels, mask0, inputs1):
    """Lowers and compiles start and step; records the times."""
    nsp = jnp.int32(self.size.num_superpixels)
    begin = time.perf_counter()
    lowered = self._start.lower(
        self.sf_variables, frame0, superpixels, nsp, mask0
    )
    self.compile_s["start_lower"] = time.perf_counter() - begin
    begin = time.perf_counter()
    self.start = lowered.compile()
    self.compile_s["start_compile"] = time.perf_counter() - begin
    carry_shape = jax.eval_shape(
        self._start, self.sf_variables, frame0, superpixels, nsp, mask0
    )[0]
    begin = time.perf_counter()
    lowered = self._step.lower(
        self.sf_variables, self.decoder_variables, carry_shape, inputs1
    )
    self.compile_s["step_lower"] = time.perf_counter() - begin
    begin = time.perf_counter()
    self.step = lowered.compile()
    self.compile_s["step_compile"] = time.perf_counter() - begin
    self.analysis = {
        "start": memory_analysis(self.start),
        "step": memory_analysis(self.step),
    }

  def run_start(self, frame0, superpixels, mask0):
    nsp = jnp.int32(self.size.num_superpixels)
    return self.start(self.sf_variables, frame0, superpixels, nsp, mask0)

  def run_step(self, carry, inputs):
    return self.step(self.sf_variables, self.decoder_variables, carry, inputs)


def _inputs(video, superpixels, num_superpixels, t):
  return jax.device_put({
      "frame": video.frame(t),
      "superpixels": superpixels,
      "num_superpixels": np.int32(num_superpixels),
      "frame_valid": np.bool_(True),
  })


def _fill(carry):
  """Per class (background, objects): stored entries and their limit."""
  m = jax.device_get(carry.memory)
  return [int(c) for c in m.count], [int(c) for c in m.limit]


# --------------------------------------------------------------------------
# Phase A: the step at 480p and its pieces.


def measure_breakdown(size: Size, rounds: int) -> dict:
  """Compile times, first frames, the step and its pieces; see the docstring.

  After frame 0 and frame 1, each round takes the next frame and times the
  pieces on it and the current carry, then the fused step on the same carry
  and frame (which advances the carry), so that both see the same load.

  Args:
    size: the setting.
    rounds: frames timed after frame 1.
  """
  load_start = os.getloadavg()
  rss_before = rss_now()
  video = Video(size.height, size.width)
  superpixels = jax.device_put(block_superpixels(size))
  mask0 = jax.device_put(video.labels(0))
  frame0 = jax.device_put(video.frame(0))
  nsp = size.num_superpixels
  t = Tracker(size)
  t.compile(frame0, superpixels, mask0, _inputs(video, superpixels, nsp, 1))
  rss_compiled = rss_now()

  reset_peak_rss()
  (carry, _), first_s = timed(t.run_start, frame0, superpixels, mask0)
  start_peak = peak_rss()
  fill0 = _fill(carry)
  inputs = _inputs(video, superpixels, nsp, 1)
  reset_peak_rss()
  (carry, mask), first_step_s = timed(t.run_step, carry, inputs)
  step_peaks = [peak_rss()]

  settings = t.settings
  features_fn = jax.jit(
      lambda v, frame, s, ok: tracker.frame_features(
          t.sf_model, v, frame, s, ok
      )
  )
  observe_fn = jax.jit(
      lambda c, feats, f1, f4, ok, s: tracker.observe(
          c,
          features=feats,
          f1=f1,
          f4=f4,
          valid=ok,
          superpixels=s,
          settings=settings,
      )
  )
  predict_fn = jax.jit(tracker.predict)
  decoder_fn = jax.jit(
      lambda v, crops: t.decoder.apply(v, **crops, train=False)
  )
  advance_fn = jax.jit(
      lambda c, pred, logits, feats, f1, f4, ok, s: tracker.advance(
          c,
          pred=pred,
          crop_logits=logits,
          features=feats,
          f1=f1,
          f4=f4,
          valid=ok,
          superpixels=s,
      )
  )

  def pieces(carry, inputs, clock):
    """Runs the four pieces (and predict alone), timing each into clock."""
    valid = jnp.arange(size.segments) < inputs["num_superpixels"]
    sp = inputs["superpixels"]
    (feats, f1, f4), clock["features"] = timed(
        features_fn, t.sf_variables, inputs["frame"], sp, valid
    )
    (pred, crops), clock["observe"] = timed(
        observe_fn, carry, feats, f1, f4, valid, sp
    )
    _, clock["predict"] = timed(
        predict_fn, carry.memory, feats, valid, sp, carry.mask_prev
    )
    logits, clock["decoder"] = timed(decoder_fn, t.decoder_variables, crops)
    _, clock["advance"] = timed(
        advance_fn, carry, pred, logits, feats, f1, f4, valid, sp
    )

  begin = time.perf_counter()
  pieces(carry, _inputs(video, superpixels, nsp, 2), {})  # Compiles.
  pieces_compile_s = time.perf_counter() - begin
  clocks, times = [], []
  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  for f in range(2, 2 + rounds):
    inputs = _inputs(video, superpixels, nsp, f)
    clocks.append({})
    pieces(carry, inputs, clocks[-1])
    reset_peak_rss()
    (carry, mask), s = timed(t.run_step, carry, inputs)
    times.append(s)
    step_peaks.append(peak_rss())
  cpu_ratio = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  mask = np.asarray(mask)
  return {
      "size": size,
      "compile_s": t.compile_s,
      "pieces_compile_s": pieces_compile_s,
      "analysis": t.analysis,
      "first_s": first_s,
      "first_step_s": first_step_s,
      "times": times,
      "pieces": {k: statistics.median(c[k] for c in clocks) for k in clocks[0]},
      "fill0": fill0,
      "fill": _fill(carry),
      "agreement": float((mask == video.labels(1 + rounds)).mean()),
      "rss_before": rss_before,
      "rss_compiled": rss_compiled,
      "start_peak": start_peak,
      "step_peak": max(step_peaks),
      "cpu_ratio": cpu_ratio,
      "load": (load_start, os.getloadavg()),
  }


# --------------------------------------------------------------------------
# Phase B: a long video.


def windows(last: int) -> list[tuple[int, int, int]]:
  """(frame, first, last) of each reported window, frames 1..last."""
  out = []
  for f in sorted({f for f in (10, 100, 1000) if f <= last} | {last}):
    lo, hi = max(1, f - 5), min(last, f + 5)
    if hi - lo < 10:  # Near the end: the last 11 frames.
      lo = max(1, hi - 10)
    out.append((f, lo, hi))
  return out


def measure_long(size: Size, frames: int) -> dict:
  """Per-frame time and RSS over a long video; see the module docstring."""
  load_start = os.getloadavg()
  video = Video(size.height, size.width, seed=1)
  superpixels = jax.device_put(block_superpixels(size))
  nsp = size.num_superpixels
  t = Tracker(size)
  frame0 = jax.device_put(video.frame(0))
  mask0 = jax.device_put(video.labels(0))
  t.compile(frame0, superpixels, mask0, _inputs(video, superpixels, nsp, 1))
  carry, _ = jax.block_until_ready(t.run_start(frame0, superpixels, mask0))
  sample = {f for f, _, _ in windows(frames)}
  # Index = frame; frame 0 unused.
  times, cpu, peaks, rss = [0.0], [0.0], [0], [0]
  fill, load, agreement = {0: _fill(carry)}, {}, {}
  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  for f in range(1, frames + 1):
    inputs = _inputs(video, superpixels, nsp, f)
    reset_peak_rss()
    before = cpu_seconds()
    (carry, mask), s = timed(t.run_step, carry, inputs)
    cpu.append(cpu_seconds() - before)
    times.append(s)
    peaks.append(peak_rss())
    rss.append(rss_now())
    if f in sample:
      fill[f] = _fill(carry)
      load[f] = os.getloadavg()
      agreement[f] = float((np.asarray(mask) == video.labels(f)).mean())
  cpu_ratio = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  return {
      "size": size,
      "frames": frames,
      "compile_s": t.compile_s,
      "times": times,
      "cpu": cpu,
      "peaks": peaks,
      "rss": rss,
      "fill": fill,
      "window_load": load,
      "agreement": agreement,
      "cpu_ratio": cpu_ratio,
      "load": (load_start, os.getloadavg()),
  }


def write_series(path: str, b: dict) -> None:
  """Phase B's per-frame wall and CPU seconds and RSS as CSV."""
  with open(path, "w") as f:
    f.write("frame,seconds,cpu_seconds,peak_rss_bytes,rss_bytes\n")
    for i in range(1, b["frames"] + 1):
      f.write(
          f"{i},{b['times'][i]:.4f},{b['cpu'][i]:.4f},{b['peaks'][i]},"
          f"{b['rss'][i]}\n"
      )


# --------------------------------------------------------------------------
# Report.


def _gib(n):
  return f"{n / 2**30:.2f} GiB"


def _load(pair):
  (a, _, _), (b, _, _) = pair
  return f"{a:.2f} -> {b:.2f}"


def _analysis(a):
  total = a["temp"] + a["argument"] + a["output"]
  return (
      f"temp {_gib(a['temp'])} + arguments {_gib(a['argument'])} + outputs"
      f" {_gib(a['output'])} = {_gib(total)} (outputs aliasing donated"
      f" arguments: {_gib(a['alias'])})"
  )


def _fill_text(fill):
  counts, limits = fill
  return ", ".join(f"{c}/{l}" for c, l in zip(counts, limits))


def _ids(classes):
  return ", ".join(map(str, classes)) if classes else "none"


def _verdict(ok):
  return "met" if ok else "**not met**"


def report(a, b, command, quick):
  """The RESULTS.md section (a table and notes) of the two phases."""
  device = jax.devices()[0]
  machine = (
      f"{results.machine_description()}, jax {jax.__version__},"
      f" {device.platform}"
  )
  rows, checks, notes = [], [], []
  if a is not None:
    c = a["compile_s"]
    median = statistics.median(a["times"])
    start_c = c["start_lower"] + c["start_compile"]
    step_c = c["step_lower"] + c["step_compile"]
    p = a["pieces"]
    total = p["features"] + p["observe"] + p["decoder"] + p["advance"]
    rows += [
        ("A: setting", a["size"].describe()),
        (
            "A: start (frame 0), trace + lower / XLA compile",
            f"{c['start_lower']:.2f} s / {c['start_compile']:.2f} s",
        ),
        (
            "A: step, trace + lower / XLA compile",
            f"{c['step_lower']:.2f} s / {c['step_compile']:.2f} s",
        ),
        ("A: first frame (start, after compile)", f"{a['first_s']:.3f} s"),
        ("A: frame 1 (first step run)", f"{a['first_step_s']:.3f} s"),
        (
            (
                f"A: step, median of {len(a['times'])} (frames 2-"
                f"{1 + len(a['times'])}; pieces: medians on the same frames)"
            ),
            (
                f"{median:.3f} s (min {min(a['times']):.3f}, max"
                f" {max(a['times']):.3f})"
            ),
        ),
        (
            "A: backbone + superfeatures (`frame_features`)",
            f"{p['features']:.3f} s",
        ),
        (
            "A: memory predict + decoder crops (`observe`)",
            f"{p['observe']:.3f} s",
        ),
        (
            "A: of which memory predict alone (`predict`)",
            f"{p['predict']:.3f} s",
        ),
        ("A: decoder (2 objects)", f"{p['decoder']:.3f} s"),
        (
            "A: paste, aggregate, confidence, memory update (`advance`)",
            f"{p['advance']:.3f} s",
        ),
        (
            "A: sum of the four pieces (jitted separately)",
            f"{total:.3f} s ({total / median:.2f} x the fused step)",
        ),
        (
            "A: compile + first run of the pieces (benchmark only)",
            f"{a['pieces_compile_s']:.1f} s",
        ),
    ]
    for name in ("start", "step"):
      if a["analysis"][name] is not None:
        rows.append((
            f"A: compiled memory analysis, {name}",
            _analysis(a["analysis"][name]),
        ))
    rows += [
        (
            "A: process RSS",
            (
                f"{_gib(a['rss_before'])} at start, {_gib(a['rss_compiled'])}"
                " after compiling"
            ),
        ),
        (
            "A: peak RSS during frame 0 / during a step (max)",
            f"{_gib(a['start_peak'])} / {_gib(a['step_peak'])}",
        ),
        (
            (
                "A: memory fill after frame 0 / last step (entries/limit per"
                " class)"
            ),
            f"{_fill_text(a['fill0'])} / {_fill_text(a['fill'])}",
        ),
        (
            "A: load average (1 min) start -> end; CPU / wall in the steps",
            f"{_load(a['load'])}; {a['cpu_ratio']:.2f}",
        ),
    ]
    compile_total = start_c + step_c
    checks += [
        (
            f"step <= {TARGET_STEP_S:g} s per frame at 480p",
            f"{median:.2f} s",
            median <= TARGET_STEP_S,
        ),
        (
            f"first frame < {TARGET_FIRST_S:g} s (excluding compilation)",
            f"frame 0 {a['first_s']:.2f} s, frame 1 {a['first_step_s']:.2f} s",
            max(a["first_s"], a["first_step_s"]) < TARGET_FIRST_S,
        ),
        (
            f"compilation < {TARGET_COMPILE_S:g} s (start + step)",
            f"{start_c:.1f} + {step_c:.1f} = {compile_total:.1f} s",
            compile_total < TARGET_COMPILE_S,
        ),
    ]
  if b is not None:
    frames = b["frames"]
    ws = windows(frames)
    c = b["compile_s"]
    rows += [
        (
            "B: setting",
            f"{b['size'].describe()}, {frames} frames after frame 0",
        ),
        (
            "B: compile (start + step, trace + lower + XLA)",
            f"{sum(c.values()):.1f} s",
        ),
    ]
    stats = {}
    for f, lo, hi in ws:
      span = range(lo, hi + 1)
      t = statistics.median(b["times"][i] for i in span)
      fastest = min(b["times"][i] for i in span)
      cpu = statistics.median(b["cpu"][i] for i in span)
      peak = max(b["peaks"][i] for i in span)
      rss = b["rss"][f]
      stats[f] = (t, peak, rss, fastest, cpu)
      rows.append((
          f"B: frame {f} (frames {lo}-{hi})",
          (
              f"median {t:.3f} s (min {fastest:.3f}, CPU {cpu:.3f} s); peak"
              f" RSS {_gib(peak)}; RSS at frame {f}"
              f" {_gib(rss)}; memory {_fill_text(b['fill'][f])}; load"
              f" {b['window_load'][f][0]:.2f}; mask agreement"
              f" {b['agreement'][f]:.2f}"
          ),
      ))
    first, last = ws[0][0], ws[-1][0]
    t_ratio = stats[last][0] / stats[first][0]
    peak_ratio = stats[last][1] / stats[first][1]
    rss_ratio = stats[last][2] / stats[first][2]
    min_ratio = stats[last][3] / stats[first][3]
    cpu_ratio = stats[last][4] / stats[first][4]
    all_times = b["times"][1:]
    rows += [
        (
            f"B: ratios frame {last} / frame {first}",
            (
                f"time {t_ratio:.3f} (min {min_ratio:.3f}, CPU time"
                f" {cpu_ratio:.3f}), peak RSS {peak_ratio:.3f}, RSS"
                f" {rss_ratio:.3f}"
            ),
        ),
        (
            f"B: all {frames} steps",
            (
                f"median {statistics.median(all_times):.3f} s, min"
                f" {min(all_times):.3f}, max {max(all_times):.3f}; RSS"
                f" {_gib(min(b['rss'][1:]))} - {_gib(max(b['rss'][1:]))}"
            ),
        ),
        (
            "B: load average (1 min) start -> end; CPU / wall in the loop",
            f"{_load(b['load'])}; {b['cpu_ratio']:.2f}",
        ),
    ]
    checks += [
        (
            f"time at frame {last} within {TARGET_FLAT:.0%} of frame {first}",
            (
                f"median ratio {t_ratio:.3f} (min {min_ratio:.3f}, CPU time"
                f" {cpu_ratio:.3f})"
            ),
            abs(t_ratio - 1) <= TARGET_FLAT,
        ),
        (
            f"memory at frame {last} within {TARGET_FLAT:.0%} of frame {first}",
            f"peak RSS ratio {peak_ratio:.3f}, RSS ratio {rss_ratio:.3f}",
            max(abs(peak_ratio - 1), abs(rss_ratio - 1)) <= TARGET_FLAT,
        ),
    ]
    notes.append(
        f"Phase B ran at {b['size'].width}x{b['size'].height}, not 480p"
        " (1000 frames at 480p take over an hour on 2 cores); its"
        f" frame-{last} figures are frame {last} of that video."
    )
    counts0, _ = b["fill"][0]
    counts, limits = b["fill"][last]
    full = [k for k in range(len(counts)) if counts[k] >= limits[k]]
    grew = [k for k in range(len(counts)) if counts[k] > counts0[k]]
    notes.append(
        f"Memory (phase B): classes {_ids(full)} full at frame {last},"
        f" classes {_ids(grew)} grew after frame 0 (with random weights"
        " few object superpixels pass the confidence rule); the step's"
        " shapes and work do not depend on the fill (every row of the"
        " capacity is scored, masked)."
    )
  loads = [x["load"] for x in (a, b) if x is not None]
  high = max(max(s[0], e[0]) for s, e in loads)
  if high > (os.cpu_count() or 1) + 0.5:
    notes.append(
        f"The 1-minute load average reached {high:.2f} on"
        f" {os.cpu_count()} cores: other work shared the CPUs, which"
        " inflates the times."
    )
  if quick:
    notes.append("--quick: tiny sizes, not the benchmark setting.")
  notes.append(REFERENCE)
  notes.append(
      "Random weights: the mask agreement with the synthetic objects is"
      " reported only as a sanity check that the step ran, not as accuracy."
  )
  lines = results.table_section(
      "Inference (tracker step)", command, machine, rows
  )
  lines += ["", "| target | measured | |", "|---|---|---|"]
  lines += [f"| {k} | {v} | {_verdict(ok)} |" for k, v, ok in checks]
  lines += ["", "Notes: " + " ".join(notes)]
  return "\n".join(lines) + "\n"


def _size(text):
  h, w = (int(x) for x in text.split("x"))
  return h, w


def _run_isolated(fn, *args):
  """fn(*args) in a fresh process (its own RSS and compilation caches)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(fn, *args).result()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
      "--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md")
  )
  parser.add_argument(
      "--phases", default="ab", help="a (480p breakdown), b (long video), ab"
  )
  parser.add_argument(
      "--rounds",
      type=int,
      default=5,
      help="phase A frames timed (pieces and step) after frame 1",
  )
  parser.add_argument(
      "--long_frames", type=int, default=1000, help="phase B frames"
  )
  parser.add_argument(
      "--series", default="", help="CSV of phase B's per-frame figures"
  )
  parser.add_argument("--long_height", type=int, default=240)
  parser.add_argument("--long_width", type=int, default=427)
  parser.add_argument(
      "--long_block", type=_size, default=(16, 24), help="rows x cols px"
  )
  parser.add_argument(
      "--long_segments", type=int, default=384, help="phase B's N"
  )
  parser.add_argument(
      "--long_capacity", type=int, default=1024, help="phase B's capacity"
  )
  parser.add_argument(
      "--long_crop", type=_size, default=(112, 192), help="phase B's crop"
  )
  args = parser.parse_args()
  if args.quick:
    size_a = Size(96, 160, (16, 16), 96, 256, (48, 80))
    size_b = size_a
    rounds, frames = 2, min(args.long_frames, 12)
  else:
    size_a = Size(480, 854, (16, 26), 1408, 4096, (224, 384))
    size_b = Size(
        args.long_height,
        args.long_width,
        args.long_block,
        args.long_segments,
        args.long_capacity,
        args.long_crop,
    )
    rounds, frames = args.rounds, args.long_frames
  for s in (size_a, size_b):
    if s.num_superpixels > s.segments:
      raise ValueError(f"{s.num_superpixels} superpixels exceed N in {s}.")
  a = b = None
  if "a" in args.phases:
    a = _run_isolated(measure_breakdown, size_a, rounds)
  if "b" in args.phases:
    b = _run_isolated(measure_long, size_b, frames)
  if b is not None and args.series:
    write_series(args.series, b)
  command = shlex.join(["python", "benchmarks/inference.py"] + sys.argv[1:])
  text = report(a, b, command, args.quick)
  print(text)
  if not args.quick:
    results.prepend_section(args.out, text)


if __name__ == "__main__":
  main()
