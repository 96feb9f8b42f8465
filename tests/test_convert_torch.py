"""Tests of convert_torch: the authors' PyTorch checkpoint -> our variables.

The authors' keys and shapes are written out here from SPEC section 11 and
their model code (not taken from the converter), a random state dict with
exactly those keys is converted, and the converted networks are compared with
references computed from the state dict itself in PyTorch's conventions
(NCHW activations, OIHW kernels, symmetric padding, BatchNorm with running or
batch statistics): NumPy always, PyTorch functional ops (conv2d, batch_norm,
interpolate, torchvision's roi_align) when the optional extra is installed.
The reference networks follow the authors' forward passes (ResNet18,
SPX_embedding and the per-superpixel loop of My_Net.superfeat, Mem_select,
SegmenterN with ResBlock and Refine).
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from shls_jax import convert_torch
from shls_jax import inference
from shls_jax import train
from shls_jax.models import decoder as decoder_lib
from shls_jax.models import superfeatures as superfeatures_lib
from tests.conftest import REPO
from tests.conftest import load_config

PAPER_PARAMETERS = 13_946_572  # SPEC 11: "about 13.95 M".
EPS = 1e-5  # Every BatchNorm of the authors' model.
CROP = (16, 24)  # The decoder crop of the parity config (multiples of 4).


# --------------------------------------------------------------------------
# The authors' state dict, from SPEC 11.


def authors_shapes(
    stem=64,
    stages=(64, 128, 256, 256),
    blocks=(2, 2, 2, 2),
    sf=32,
    width=256,
    skip=128,
    gate=32,
):
  """{key without `module.`: shape} of the authors' My_Net state dict.

  Defaults are the paper's widths; narrower ones mirror a narrow config.
  """
  shapes = {}

  def conv(name, out, inp, k, bias=True):
    shapes[f"{name}.weight"] = (out, inp, k, k)
    if bias:
      shapes[f"{name}.bias"] = (out,)

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  def residual_block(name, inp, out, stride):  # ResidualBlock.
    conv(f"{name}.left.0", out, inp, 3, bias=False)
    bn(f"{name}.left.1", out)
    conv(f"{name}.left.3", out, out, 3, bias=False)
    bn(f"{name}.left.4", out)
    if stride != 1 or inp != out:
      conv(f"{name}.shortcut.0", out, inp, 1, bias=False)
      bn(f"{name}.shortcut.1", out)

  def res_block(name, c):  # ResBlock: conv-BN-ReLU twice, convs with bias.
    for i in (1, 2):
      conv(f"{name}.conv{i}.0", c, c, 3)
      bn(f"{name}.conv{i}.1", c)

  fe = "spx_embedding.feat_extractor"
  conv(f"{fe}.conv1.0", stem, 3, 7, bias=False)
  bn(f"{fe}.conv1.1", stem)
  inp = stem
  for layer, (c, n, stride) in enumerate(zip(stages, blocks, (1, 2, 1, 1)), 1):
    for b in range(n):
      residual_block(f"{fe}.layer{layer}.{b}", inp, c, stride if b == 0 else 1)
      inp = c
  f1, f4 = stages[0] + 3, stages[-1] + 3
  for head, fan_in in (("sf_head_L1", f1), ("sf_head_L4", f4)):
    shapes[f"{head}.0.weight"] = (sf, fan_in)
    shapes[f"{head}.0.bias"] = (sf,)
    bn(f"{head}.1", 1)
  conv("sf_conv_1x1.0", 1, 2, 1)
  conv("mem_select.convL2", gate, f1, 3)
  conv("mem_select.convAM", gate, 4, 3)
  conv("mem_select.gate", f4, gate, 3)
  residual_block("segmenter.layer2.0", f1 + 2, skip, 2)
  residual_block("segmenter.layer2.1", skip, skip, 1)
  conv("segmenter.convFM", width, 3 * f4, 3)
  res_block("segmenter.res_L4", width)
  for refine, inp in (("RF2", skip), ("RF1", f1 + 2 + 4)):
    conv(f"segmenter.{refine}.convFS", width, inp, 3)
    res_block(f"segmenter.{refine}.ResFS", width)
    res_block(f"segmenter.{refine}.ResMM", width)
  conv("segmenter.pred", 2, width, 3)
  return shapes


# configs/test.py's model, for the cheap end-to-end and error tests.
NARROW = dict(
    stem=8,
    stages=(8, 8, 16, 16),
    blocks=(1, 1, 1, 1),
    sf=8,
    width=8,
    skip=8,
    gate=4,
)


def random_state_dict(shapes, seed=0):
  """A state dict with PyTorch-like magnitudes, `module.` prefixed."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in shapes.items():
    name, leaf = key.rsplit(".", 1)
    is_bn = f"{name}.running_mean" in shapes
    if leaf == "num_batches_tracked":
      value = np.array(rng.integers(1, 10_000), np.int64)
    elif leaf == "running_var":
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "running_mean" or (is_bn and leaf == "bias"):
      value = rng.normal(0.0, 0.2, shape)
    elif is_bn:
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "weight":
      bound = np.sqrt(3.0 / np.prod(shape[1:]))
      value = rng.uniform(-bound, bound, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    if key.startswith("sf_conv_1x1.0."):
      value = np.abs(value) + 0.1  # A live fusion ReLU.
    if leaf != "num_batches_tracked":
      value = np.asarray(value, np.float32)
    state["module." + key] = value
  return state


def flax_location(key, keys):
  """Our (collection, path...) of an authors' key among `keys`.

  The naming rule of superfeatures.py, written again: `spx_embedding.` is
  dropped, a numeric part joins its container with an underscore, BatchNorm
  weight / bias are scale / bias, running statistics go to batch_stats.
  """
  parts = key.removeprefix("spx_embedding.").split(".")
  leaf = parts.pop()
  modules = []
  for part in parts:
    if part.isdigit():
      modules[-1] += f"_{part}"
    else:
      modules.append(part)
  collection = "batch_stats" if leaf.startswith("running_") else "params"
  is_bn = f"{key.rsplit('.', 1)[0]}.running_mean" in keys
  renamed = {
      "running_mean": "mean",
      "running_var": "var",
      "bias": "bias",
      "weight": "scale" if is_bn else "kernel",
  }[leaf]
  return (collection, *modules, renamed)


def flax_layout(value):
  value = np.asarray(value)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def lookup(tree, path):
  for part in path:
    tree = tree[part]
  return np.asarray(tree)


def assert_parity(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.max(np.abs(got - want))
  assert err < 1e-4, (
      f"{what}: max |difference| {err:.2e} (values up to"
      f" {np.max(np.abs(want)):.2f})"
  )


# --------------------------------------------------------------------------
# References in PyTorch's conventions.


def np_conv2d(x, w, b=None, stride=1, pad=0):
  """F.conv2d: x [N, C, H, W], w OIHW, zero padding `pad` on every side."""
  n, _, h, wd = x.shape
  out_c, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((out_c, n, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = xp[
          :,
          :,
          i : i + stride * (ho - 1) + 1 : stride,
          j : j + stride * (wo - 1) + 1 : stride,
      ]
      out += np.tensordot(w[:, :, i, j], patch, axes=([1], [1]))
  out = out.transpose(1, 0, 2, 3)
  return out if b is None else out + b[None, :, None, None]


def np_batch_norm(x, p, train):
  """BatchNorm (1d or 2d) over axis 1: batch statistics or running ones."""
  axes = (0,) + tuple(range(2, x.ndim))
  if train:
    mean, var = x.mean(axes), x.var(axes)
  else:
    mean, var = p["running_mean"], p["running_var"]
  shape = (1, -1) + (1,) * (x.ndim - 2)
  scale = p["weight"].reshape(shape) / np.sqrt(var.reshape(shape) + EPS)
  return (x - mean.reshape(shape)) * scale + p["bias"].reshape(shape)


def _bilinear_matrix(n_in, n_out):
  """Rows of F.interpolate(mode='bilinear', align_corners=False) on one axis."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(int), n_in - 1)
  high = np.minimum(low + 1, n_in - 1)
  frac = src - low
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), low), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), high), frac)
  return m


def np_resize_bilinear(x, size):
  rows = _bilinear_matrix(x.shape[2], size[0])
  cols = _bilinear_matrix(x.shape[3], size[1])
  return np.einsum("ph,nchw,qw->ncpq", rows, x, cols)


def np_resize_nearest(x, size):
  """F.interpolate(mode='nearest'): output i reads floor(i * in / out)."""
  rows = np.floor(np.arange(size[0]) * (x.shape[2] / size[0])).astype(int)
  cols = np.floor(np.arange(size[1]) * (x.shape[3] / size[1])).astype(int)
  return x[:, :, rows][:, :, :, cols]


def np_roi_align(features, box, size, scale):
  """torchvision roi_align(aligned=False, sampling_ratio=-1), one box.

  features [C, h, w]; box (y0, x0, y1, x1) in frame pixels.
  """
  c, h, w = features.shape
  y0, x0, y1, x1 = (v * scale for v in box)
  roi_h, roi_w = max(y1 - y0, 1.0), max(x1 - x0, 1.0)
  bin_h, bin_w = roi_h / size[0], roi_w / size[1]
  grid_h, grid_w = int(np.ceil(roi_h / size[0])), int(np.ceil(roi_w / size[1]))

  def sample(y, x):
    if y < -1.0 or y > h or x < -1.0 or x > w:
      return np.zeros(c)
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
      yl = yh = h - 1
      y = float(yl)
    else:
      yh = yl + 1
    if xl >= w - 1:
      xl = xh = w - 1
      x = float(xl)
    else:
      xh = xl + 1
    ly, lx = y - yl, x - xl
    return (
        (1 - ly) * (1 - lx) * features[:, yl, xl]
        + (1 - ly) * lx * features[:, yl, xh]
        + ly * (1 - lx) * features[:, yh, xl]
        + ly * lx * features[:, yh, xh]
    )

  out = np.zeros((c,) + tuple(size))
  for p in range(size[0]):
    for q in range(size[1]):
      total = np.zeros(c)
      for iy in range(grid_h):
        for ix in range(grid_w):
          total += sample(
              y0 + p * bin_h + (iy + 0.5) * bin_h / grid_h,
              x0 + q * bin_w + (ix + 0.5) * bin_w / grid_w,
          )
      out[:, p, q] = total / max(grid_h * grid_w, 1)
  return out


class NumpyOps:
  conv2d = staticmethod(np_conv2d)
  batch_norm = staticmethod(np_batch_norm)
  resize_bilinear = staticmethod(np_resize_bilinear)
  resize_nearest = staticmethod(np_resize_nearest)
  roi_align = staticmethod(np_roi_align)


class TorchOps:
  """The same primitives with torch.nn.functional and torchvision (float64)."""

  def __init__(self, torch, roi_align):
    self.torch = torch
    self.f = torch.nn.functional
    self._roi_align = roi_align

  def _t(self, x):
    return self.torch.from_numpy(np.array(x, np.float64))

  def conv2d(self, x, w, b=None, stride=1, pad=0):
    b = None if b is None else self._t(b)
    return self.f.conv2d(self._t(x), self._t(w), b, stride, pad).numpy()

  def batch_norm(self, x, p, train):
    return self.f.batch_norm(
        self._t(x),
        self._t(p["running_mean"]),
        self._t(p["running_var"]),
        self._t(p["weight"]),
        self._t(p["bias"]),
        training=train,
        momentum=0.1,
        eps=EPS,
    ).numpy()

  def resize_bilinear(self, x, size):
    return self.f.interpolate(
        self._t(x), size=tuple(size), mode="bilinear", align_corners=False
    ).numpy()

  def resize_nearest(self, x, size):
    return self.f.interpolate(
        self._t(x), size=tuple(size), mode="nearest"
    ).numpy()

  def roi_align(self, features, box, size, scale):
    y0, x0, y1, x1 = box
    rois = self._t([[0, x0, y0, x1, y1]])
    # (input, rois, spatial_scale, height, width, sampling_ratio, aligned)
    return self._roi_align(
        self._t(features)[None], rois, scale, size[0], size[1], -1, False
    )[0].numpy()


def _relu(x):
  return np.maximum(x, 0.0)


class AuthorsNet:
  """The authors' forward passes on a state dict (keys without `module.`)."""

  def __init__(self, state, ops):
    self.sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    self.ops = ops

  def conv(self, x, name, stride=1):
    w = self.sd[f"{name}.weight"]
    return self.ops.conv2d(
        x, w, self.sd.get(f"{name}.bias"), stride, (w.shape[-1] - 1) // 2
    )

  def bn(self, x, name, train):
    p = {
        k: self.sd[f"{name}.{k}"]
        for k in ("weight", "bias", "running_mean", "running_var")
    }
    return self.ops.batch_norm(x, p, train)

  def residual_block(self, x, name, stride, train):
    out = _relu(
        self.bn(self.conv(x, f"{name}.left.0", stride), f"{name}.left.1", train)
    )
    out = self.bn(self.conv(out, f"{name}.left.3"), f"{name}.left.4", train)
    if f"{name}.shortcut.0.weight" in self.sd:
      x = self.bn(
          self.conv(x, f"{name}.shortcut.0", stride),
          f"{name}.shortcut.1",
          train,
      )
    return _relu(out + x)

  def backbone(self, img, train):
    """ResNet18: img [N, 3, H, W] -> (f2 = layer1, f4 = layer4)."""
    fe = "spx_embedding.feat_extractor"
    x = _relu(
        self.bn(self.conv(img, f"{fe}.conv1.0", 2), f"{fe}.conv1.1", train)
    )
    f2 = None
    for layer, stride in zip(range(1, 5), (1, 2, 1, 1)):
      b = 0
      while f"{fe}.layer{layer}.{b}.left.0.weight" in self.sd:
        x = self.residual_block(
            x, f"{fe}.layer{layer}.{b}", stride if b == 0 else 1, train
        )
        b += 1
      if layer == 1:
        f2 = x
    return f2, x

  @staticmethod
  def info_map(spx):
    """spx_info_map: [H, W] ids 1..n -> [3, H, W] size, mean row, mean col."""
    h, w = spx.shape
    rows, cols = np.meshgrid(
        np.arange(h) / (h - 1), np.arange(w) / (w - 1), indexing="ij"
    )
    out = np.zeros((3, h, w))
    for n in range(1, spx.max() + 1):
      m = spx == n
      if m.any():
        out[:, m] = np.array(
            [[m.sum() / (h * w)], [rows[m].mean()], [cols[m].mean()]]
        )
    return out

  def head(self, feat, spx, name, num_spx, train, stats):
    """frame_superfeat: the loop over superpixels with Linear-BN1d(1)-ReLU."""
    out = np.zeros((num_spx, self.sd[f"{name}.0.bias"].shape[0]))
    for n in range(num_spx):
      m = spx == n + 1
      if not m.any():
        continue
      v = feat[:, m].mean(1)
      y = self.sd[f"{name}.0.weight"] @ v + self.sd[f"{name}.0.bias"]
      out[n] = _relu(self.bn(y[None, None], f"{name}.1", train)[0, 0])
      if train:  # PyTorch's running update: momentum 0.1, unbiased var.
        mean, var = stats
        stats[:] = (
            0.9 * mean + 0.1 * y.mean(),
            0.9 * var + 0.1 * y.var(ddof=1),
        )
    return out

  def superfeatures(self, img, spx, train):
    """SPX_embedding + My_Net.superfeat; spx [N, H, W] ids 1..n.

    Returns superfeatures [N][n, 32], F1 [N, 67, H, W], F4 [N, 259, h, w] and
    the heads' running statistics after the calls ([mean, var] each).
    """
    f2, f4 = self.backbone(img, train)
    big_h, big_w = img.shape[2:]
    f1 = self.ops.resize_bilinear(f2, (big_h, big_w))
    spx4 = self.ops.resize_nearest(
        spx[:, None].astype(np.float64), f4.shape[2:]
    )
    spx4 = spx4[:, 0].astype(int)
    stats = {
        name: np.array([
            self.sd[f"{name}.1.running_mean"][0],
            self.sd[f"{name}.1.running_var"][0],
        ])
        for name in ("sf_head_L1", "sf_head_L4")
    }
    feats, maps1, maps4 = [], [], []
    for b in range(img.shape[0]):
      m1 = np.concatenate([f1[b], self.info_map(spx[b])])
      m4 = np.concatenate([f4[b], self.info_map(spx4[b])])
      n = spx[b].max()
      a = self.head(m1, spx[b], "sf_head_L1", n, train, stats["sf_head_L1"])
      c = self.head(m4, spx4[b], "sf_head_L4", n, train, stats["sf_head_L4"])
      w, bias = (
          self.sd["sf_conv_1x1.0.weight"].ravel(),
          self.sd["sf_conv_1x1.0.bias"],
      )
      feats.append(_relu(w[0] * a + w[1] * c + bias[0]))
      maps1.append(m1)
      maps4.append(m4)
    return feats, np.stack(maps1), np.stack(maps4), stats

  def gate(self, f1, maps):
    """Mem_select's softmax weights [B, 259, Hc/4, Wc/4].

    From F1 crops [B, 67, Hc, Wc] and maps [B, 4, Hc, Wc].
    """
    g = self.conv(f1, "mem_select.convL2", 2) + self.conv(
        maps, "mem_select.convAM", 2
    )
    logits = self.conv(g, "mem_select.gate", 2)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  def res_block(self, x, name, train):
    r = _relu(
        self.bn(
            self.conv(_relu(x), f"{name}.conv1.0"), f"{name}.conv1.1", train
        )
    )
    r = _relu(
        self.bn(self.conv(r, f"{name}.conv2.0"), f"{name}.conv2.1", train)
    )
    return x + r

  def refine(self, f, pm, name, train):
    s = self.res_block(self.conv(f, f"{name}.convFS"), f"{name}.ResFS", train)
    up = self.ops.resize_bilinear(pm, (2 * pm.shape[2], 2 * pm.shape[3]))
    return self.res_block(s + up, f"{name}.ResMM", train)

  def segment_object(self, crops, train):
    """My_Net.segment for one object on crops of the native box size.

    crops: fs, ls [1, 1, Hc, Wc]; ff, lf, tf [1, 67, Hc, Wc]; lam, tam
    [1, 4, Hc, Wc]; ff4, lf4, tf4 [1, 259, Hc/4, Wc/4]. Returns [1, 2, Hc, Wc].
    """
    am = np.concatenate([crops["lam"], crops["tam"]])
    f_l1 = np.concatenate([crops["lf"], crops["tf"]])
    f_l4 = np.concatenate([crops["lf4"], crops["tf4"]])
    mem = (self.gate(f_l1, am) * f_l4).reshape(1, -1, *f_l4.shape[2:])
    l4 = np.concatenate([crops["ff4"], mem], 1)
    l1 = np.concatenate([crops["fs"], crops["ls"], crops["ff"]], 1)
    l2 = self.residual_block(l1, "segmenter.layer2.0", 2, train)
    l2 = self.residual_block(l2, "segmenter.layer2.1", 1, train)
    l4 = self.res_block(
        self.conv(l4, "segmenter.convFM"), "segmenter.res_L4", train
    )
    l2 = self.refine(l2, l4, "segmenter.RF2", train)
    l1 = self.refine(
        np.concatenate([l1, crops["tam"]], 1), l2, "segmenter.RF1", train
    )
    return self.conv(l1, "segmenter.pred")


# --------------------------------------------------------------------------
# Fixtures.


def paper_config():
  config = load_config("davis")
  config.model.decoder_crop_size = CROP
  return config


def _loaded_variables(config, out):
  """inference.load_networks(config, out) -> both networks' variables."""
  networks = inference.load_networks(config, out)
  assert networks.source == os.path.join(out, "checkpoints")
  return {
      c: jax.device_get(
          {**networks.sf_variables[c], **networks.decoder_variables[c]}
      )
      for c in ("params", "batch_stats")
  }


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
  """The paper-size random state dict, converted, loaded by the evaluator.

  `inference.load_networks` reads the checkpoint through
  `train.load_weights`, the loader of config.train.init_from, so both uses
  of a converted folder are exercised.
  """
  state = random_state_dict(authors_shapes(), seed=1)
  tmp = tmp_path_factory.mktemp("paper")
  path = str(tmp / "my_net_best.npz")
  np.savez(path, **state)
  out = str(tmp / "converted")
  config = paper_config()
  report = convert_torch.run(path, out, config)
  return {
      "state": {k.removeprefix("module."): v for k, v in state.items()},
      "variables": _loaded_variables(config, out),
      "report": report,
      "out": out,
      "config": config,
  }


@pytest.fixture(scope="module")
def narrow_npz(tmp_path_factory):
  state = random_state_dict(authors_shapes(**NARROW), seed=2)
  path = str(tmp_path_factory.mktemp("narrow") / "narrow.npz")
  np.savez(path, **state)
  return path, state


def _write_npz(tmp_path, state, name="broken.npz"):
  path = str(tmp_path / name)
  np.savez(path, **state)
  return path


def _assert_nothing_written(out):
  parent = os.path.dirname(out)
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(parent) if ".converting-" in n]


# --------------------------------------------------------------------------
# The mapping.


def test_authors_key_list_is_spec_11():
  shapes = authors_shapes()
  assert len(shapes) == 244
  assert sum(k.endswith(".num_batches_tracked") for k in shapes) == 36
  params = sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if not k.endswith(
          (".running_mean", ".running_var", ".num_batches_tracked")
      )
  )
  assert params == PAPER_PARAMETERS


def test_expected_tensors_are_the_authors_keys_and_shapes():
  expected = convert_torch.expected_tensors(paper_config())
  assert {k: s for k, (_, s) in expected.items()} == authors_shapes()


def test_every_tensor_round_trips_through_the_written_checkpoint(paper):
  variables = paper["variables"]
  flat = {
      (c,) + path
      for c in ("params", "batch_stats")
      for path in flax.traverse_util.flatten_dict(variables[c])
  }
  seen = set()
  for key, value in paper["state"].items():
    if key.endswith(".num_batches_tracked"):
      continue
    location = flax_location(key, paper["state"])
    seen.add(location)
    np.testing.assert_array_equal(
        lookup(variables, location), flax_layout(value), err_msg=key
    )
  assert seen == flat, "Flax arrays without a PyTorch tensor"
  report = paper["report"]
  assert report["tensors"] == 244
  assert report["flax_arrays"] == 208
  assert report["dropped_num_batches_tracked"] == 36
  assert report["parameters"] == PAPER_PARAMETERS
  with open(os.path.join(paper["out"], "conversion.json")) as f:
    written = json.load(f)
  assert len(written["mapping"]) == 244
  with open(os.path.join(paper["out"], "config.json")) as f:
    config = json.load(f)
  assert config["train"]["stage"] == convert_torch.STAGE
  assert config["model"]["stage_features"] == [64, 128, 256, 256]


def test_the_command_writes_what_load_networks_reads(narrow_npz, tmp_path):
  """The real entry point on the test config, read back by the evaluator."""
  path, state = narrow_npz
  out = str(tmp_path / "converted")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "shls_jax.convert_torch",
          f"--checkpoint={path}",
          f"--out={out}",
          f"--config={os.path.join(REPO, 'configs', 'test.py')}",
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensors" in result.stdout
  assert sorted(os.listdir(out)) == [
      "checkpoints",
      "config.json",
      "conversion.json",
  ]
  variables = _loaded_variables(load_config("test"), out)
  state_keys = {k.removeprefix("module.") for k in state}
  for key, value in state.items():
    key = key.removeprefix("module.")
    if not key.endswith(".num_batches_tracked"):
      np.testing.assert_array_equal(
          lookup(variables, flax_location(key, state_keys)),
          flax_layout(value),
          err_msg=key,
      )


# --------------------------------------------------------------------------
# Refusals: one message naming every problem, nothing written.


def test_missing_unexpected_and_misshaped_keys_are_all_listed(
    narrow_npz, tmp_path
):
  _, state = narrow_npz
  state = dict(state)
  shapes = authors_shapes(**NARROW)
  del state["module.segmenter.pred.bias"]
  del state["module.sf_head_L4.1.num_batches_tracked"]
  state["module.segmenter.extra.weight"] = np.zeros((2, 2), np.float32)
  state["module.mem_select.gate.weight"] = np.zeros((5, 4, 3, 3), np.float32)
  out = str(tmp_path / "out")
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.run(_write_npz(tmp_path, state), out, load_config("test"))
  message = str(e.value)
  assert "segmenter.pred.bias: expected shape [2]" in message
  assert "sf_head_L4.1.num_batches_tracked: expected shape []" in message
  assert "segmenter.extra.weight: shape [2, 2]" in message
  expected = list(shapes["mem_select.gate.weight"])
  assert (
      f"mem_select.gate.weight: shape [5, 4, 3, 3], expected {expected}"
      in message
  )
  assert "Nothing was written" in message
  _assert_nothing_written(out)


def test_paper_weights_with_a_narrow_config_name_the_config(paper):
  with pytest.raises(convert_torch.ConversionError, match="configs/davis.py"):
    convert_torch.convert(paper["state"], load_config("test"))


def test_non_finite_values_are_refused(narrow_npz, tmp_path):
  _, state = narrow_npz
  state = dict(state)
  state["module.sf_conv_1x1.0.bias"] = np.array([np.nan], np.float32)
  out = str(tmp_path / "out")
  with pytest.raises(convert_torch.ConversionError, match="non-finite"):
    convert_torch.run(_write_npz(tmp_path, state), out, load_config("test"))
  _assert_nothing_written(out)


def test_the_older_2022_layout_is_refused(tmp_path):
  """Keys of the authors' 2022 network (Models/get_model.py of their repo)."""
  shapes = {
      k: s
      for k, s in authors_shapes().items()
      if k.startswith("spx_embedding.feat_extractor.")
  }
  state = {
      "module."
      + k.replace("spx_embedding.", "spx_emb."): np.zeros(s, np.float32)
      for k, s in shapes.items()
  }
  state["module.spx_emb.post_convolution.weight"] = np.zeros((64, 256, 3, 3))
  state["module.spx_emb.deconv.weight"] = np.zeros((64, 64, 5, 5))
  state["module.spx_emb.conv_1x1.weight"] = np.zeros((30, 71, 1, 1))
  state["module.sf_conv_1x1.weight"] = np.zeros((1, 2, 1, 1))
  out = str(tmp_path / "out")
  with pytest.raises(convert_torch.ConversionError, match=r"older \(2022\)"):
    convert_torch.run(_write_npz(tmp_path, state), out, load_config("test"))
  _assert_nothing_written(out)


def test_a_superfeature_only_checkpoint_is_explained(narrow_npz, tmp_path):
  _, state = narrow_npz
  state = {
      k: v
      for k, v in state.items()
      if not k.startswith(("module.mem_select.", "module.segmenter."))
  }
  with pytest.raises(convert_torch.ConversionError, match="stage 1"):
    convert_torch.run(
        _write_npz(tmp_path, state), str(tmp_path / "out"), load_config("test")
    )


def test_an_existing_folder_is_never_written_over(narrow_npz, tmp_path):
  path, _ = narrow_npz
  out = tmp_path / "run"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(convert_torch.ConversionError, match="not an empty"):
    convert_torch.run(path, str(out), load_config("test"))
  assert os.listdir(out) == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing(
    narrow_npz, tmp_path, monkeypatch
):
  path, _ = narrow_npz

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(train, "save_config", fail)
  out = str(tmp_path / "out")
  with pytest.raises(OSError, match="disk full"):
    convert_torch.run(path, out, load_config("test"))
  _assert_nothing_written(out)


def test_a_pth_without_pytorch_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "my_net_best.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails.
  out = str(tmp_path / "out")
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.run(str(path), out, load_config("test"))
  assert "pip install -e '.[torch]'" in str(e.value)
  _assert_nothing_written(out)


# --------------------------------------------------------------------------
# Numerical parity with the NumPy references.


def _frames(seed=3, shape=(2, 18, 22)):
  """Frames [N, H, W, 3] and superpixel ids 1..n [N, H, W] (odd sizes).

  Each frame has a 3 x 3 grid of irregular superpixels plus a one-pixel one
  at (1, 1), which no stride-4 pixel samples (floor rule): its F4 row is
  empty.
  """
  rng = np.random.default_rng(seed)
  n, h, w = shape
  frames = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  spx = np.zeros((n, h, w), np.int64)
  for b in range(n):
    rows = np.sort(rng.choice(np.arange(3, h - 2), 2, replace=False))
    cols = np.sort(rng.choice(np.arange(3, w - 2), 2, replace=False))
    r = np.searchsorted(rows, np.arange(h), side="right")
    c = np.searchsorted(cols, np.arange(w), side="right")
    spx[b] = 1 + r[:, None] * 3 + c[None, :]
    spx[b, 1, 1] = 10
  return frames, spx


def _our_superfeatures(paper, frames, spx, train_mode, stat_update="mean"):
  model = superfeatures_lib.SuperfeatureNet(sf_stat_update=stat_update)
  variables = {
      c: train.split_variables(paper["variables"][c])[0]
      for c in ("params", "batch_stats")
  }
  n_max = 13  # 10 superpixels and 3 padding rows.
  valid = np.arange(n_max)[None] < spx.max((1, 2))[:, None]
  return _apply(
      model,
      variables,
      frames,
      (spx - 1).astype(np.int32),
      valid,
      train_mode=train_mode,
  )


def _apply(module, variables, *args, train_mode):
  """`module.apply` compiled as one program (faster than op by op on a CPU).

  Returns (output, mutated batch_stats) like `apply` with `mutable`.
  """

  def run(variables, *args):
    return module.apply(
        variables,
        *args,
        train=train_mode,
        mutable=["batch_stats"] if train_mode else [],
    )

  return jax.jit(run)(variables, *args)


def _nchw(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("train_mode", [False, True])
def test_backbone_matches_numpy(paper, train_mode):
  frames, _ = _frames()
  (f2, f4), _ = _apply(
      superfeatures_lib.backbone_lib.Backbone(),
      {
          c: paper["variables"][c]["feat_extractor"]
          for c in ("params", "batch_stats")
      },
      frames,
      train_mode=train_mode,
  )
  want2, want4 = AuthorsNet(paper["state"], NumpyOps).backbone(
      _nchw(frames), train_mode
  )
  # 18 x 22 -> 9 x 11 -> 5 x 6, as the authors' padded strided convolutions.
  assert f4.shape == (2, 5, 6, 256)
  assert_parity(_nchw(f2), want2, "f2")
  assert_parity(_nchw(f4), want4, "f4")


@pytest.mark.parametrize("train_mode", [False, True])
def test_superfeatures_match_numpy(paper, train_mode):
  frames, spx = _frames()
  out, mutated = _our_superfeatures(
      paper, frames, spx, train_mode, stat_update="sequential"
  )
  feats, f1, f4, stats = AuthorsNet(paper["state"], NumpyOps).superfeatures(
      _nchw(frames), spx, train_mode
  )
  assert_parity(_nchw(out["f1"]), f1, "F1")
  assert_parity(_nchw(out["f4"]), f4, "F4")
  for b, want in enumerate(feats):
    assert_parity(out["superfeatures"][b, : len(want)], want, f"frame {b}")
    assert np.all(np.asarray(out["superfeatures"][b, len(want) :]) == 0)
  # The one-pixel superpixel has no stride-4 pixel but a superfeature.
  assert not np.asarray(out["valid4"])[0, 9] and np.any(feats[0][9] > 0)
  if train_mode:
    for name in ("sf_head_L1", "sf_head_L4"):
      got = mutated["batch_stats"][f"{name}_1"]
      assert_parity(
          np.concatenate([got["mean"], got["var"]]), stats[name], name
      )


def test_gate_matches_numpy(paper):
  rng = np.random.default_rng(4)
  f1 = rng.normal(size=(2, *CROP, 67)).astype(np.float32)
  maps = rng.uniform(-1, 1, size=(2, *CROP, 4)).astype(np.float32)
  got = jax.jit(decoder_lib.MemSelect().apply)(
      {"params": paper["variables"]["params"]["mem_select"]}, f1, maps
  )
  want = AuthorsNet(paper["state"], NumpyOps).gate(_nchw(f1), _nchw(maps))
  assert got.shape == (2, CROP[0] // 4, CROP[1] // 4, 259)
  assert_parity(_nchw(got), want, "gate")


def _frame_inputs(seed=5, size=(40, 52)):
  """Full-frame decoder inputs and three boxes of exactly the crop size."""
  rng = np.random.default_rng(seed)
  h, w = size
  f1 = rng.normal(size=(3, h, w, 67)).astype(np.float32)
  f4 = rng.normal(size=(3, -(-h // 4), -(-w // 4), 259)).astype(np.float32)
  maps = rng.uniform(-1, 1, size=(2, h, w, 4)).astype(np.float32)
  mask0 = (rng.uniform(size=(h, w)) > 0.5).astype(np.float32)
  prev = rng.uniform(size=(h, w)).astype(np.float32)
  corners = [(4, 8), (10, 20), (21, 27)]
  boxes = np.array(
      [[y, x, y + CROP[0], x + CROP[1]] for y, x in corners], np.int32
  )
  return dict(mask0=mask0, prev=prev, f1=f1, maps=maps, f4=f4, boxes=boxes)


def _authors_crops(inputs, ops):
  """The authors' crops (slices; the box is the crop size) and RoIAligns."""
  boxes = inputs["boxes"]
  (fy0, fx0, fy1, fx1), (ly0, lx0, ly1, lx1), (ty0, tx0, ty1, tx1) = boxes
  quarter = (CROP[0] // 4, CROP[1] // 4)

  def nchw(x):
    return np.asarray(x, np.float64).transpose(2, 0, 1)[None]

  def align(t):
    f4 = np.asarray(inputs["f4"][t], np.float64).transpose(2, 0, 1)
    return ops.roi_align(f4, boxes[t], quarter, 0.25)[None]

  return {
      "fs": inputs["mask0"][None, None, fy0:fy1, fx0:fx1],
      "ff": nchw(inputs["f1"][0, fy0:fy1, fx0:fx1]),
      "ls": inputs["prev"][None, None, ly0:ly1, lx0:lx1],
      "lf": nchw(inputs["f1"][1, ly0:ly1, lx0:lx1]),
      "lam": nchw(inputs["maps"][0, ly0:ly1, lx0:lx1]),
      "tf": nchw(inputs["f1"][2, ty0:ty1, tx0:tx1]),
      "tam": nchw(inputs["maps"][1, ty0:ty1, tx0:tx1]),
      "ff4": align(0),
      "lf4": align(1),
      "tf4": align(2),
  }


def _our_decoder(paper, inputs, train_mode):
  """crop_inputs on the full frames, then the Decoder: [1, Hc, Wc, 2]."""
  crop_size = tuple(paper["config"].model.decoder_crop_size)
  decoder = train.make_decoder(paper["config"])

  def run(variables, inputs):
    crops = decoder_lib.crop_inputs(
        inputs["boxes"],
        inputs["mask0"],
        inputs["prev"],
        inputs["f1"],
        inputs["maps"],
        inputs["f4"],
        crop_size,
    )
    return decoder.apply(
        variables,
        **{k: v[None] for k, v in crops.items()},
        train=train_mode,
        mutable=["batch_stats"] if train_mode else [],
    )[0]

  variables = {
      c: train.split_variables(paper["variables"][c])[1]
      for c in ("params", "batch_stats")
  }
  return jax.jit(run)(variables, inputs)


@pytest.mark.parametrize("train_mode", [False, True])
def test_decoder_on_a_native_size_box_matches_numpy(paper, train_mode):
  """crop_inputs + mem_select + segmenter vs the authors' segment().

  With boxes of exactly config.model.decoder_crop_size, the resampling to the
  crop size is the identity, as the authors' crops at native size; one object
  per call, as their per-object segmenter (training-mode BatchNorm statistics
  come from that object's crop).
  """
  inputs = _frame_inputs()
  got = _our_decoder(paper, inputs, train_mode)
  want = AuthorsNet(paper["state"], NumpyOps).segment_object(
      _authors_crops(inputs, NumpyOps), train_mode
  )
  assert_parity(_nchw(got), want, "decoder logits")


# --------------------------------------------------------------------------
# With PyTorch installed: its own file format and functional ops.


def _torch():
  return pytest.importorskip(
      "torch",
      reason=(
          "PyTorch is the optional extra (pip install -e '.[torch]'); without"
          " it the .pth route and the PyTorch references are not tested."
      ),
  )


def _torchvision_roi_align(torch):
  """torchvision's compiled roi_align operator, or a skip.

  Only the operator library is loaded: the `torchvision` package imports its
  models and, in CUDA builds, triton, whose native module crashes a process
  that has loaded TensorFlow before it (as every test process has).
  """
  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    pytest.skip(
        "torchvision is not installed: no RoIAlign reference (pip install"
        " torchvision)."
    )
  try:
    return torch.ops.torchvision.roi_align
  except (AttributeError, RuntimeError):
    pass  # Not loaded yet.
  folder = spec.submodule_search_locations[0]
  libraries = sorted(glob.glob(os.path.join(folder, "_C*.so")))
  if not libraries:
    pytest.skip(f"torchvision in {folder} has no compiled operator library.")
  torch.ops.load_library(libraries[0])
  return torch.ops.torchvision.roi_align


def test_a_pth_converts_like_its_npz(narrow_npz, tmp_path):
  torch = _torch()
  _, state = narrow_npz
  path = str(tmp_path / "my_net_best.pth")
  torch.save(
      {
          "model": {
              k: torch.from_numpy(np.asarray(v)) for k, v in state.items()
          },
          "optimizer": {"state": {}, "param_groups": []},
          "epoch": 7,
      },
      path,
  )
  arrays, extras = convert_torch.read_state_dict(path)
  assert extras == {"epoch": 7}
  assert arrays.keys() == state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(arrays[key], value, err_msg=key)
  report = convert_torch.run(path, str(tmp_path / "out"), load_config("test"))
  assert report["source_entries"] == {"epoch": 7}


def test_the_network_matches_pytorch_functional_ops(paper):
  torch = _torch()
  ops = TorchOps(torch, _torchvision_roi_align(torch))
  net = AuthorsNet(paper["state"], ops)
  frames, spx = _frames(seed=6)
  for train_mode in (False, True):
    out, _ = _our_superfeatures(paper, frames, spx, train_mode)
    feats, f1, f4, _ = net.superfeatures(_nchw(frames), spx, train_mode)
    assert_parity(_nchw(out["f1"]), f1, "F1 (torch)")
    assert_parity(_nchw(out["f4"]), f4, "F4 (torch)")
    for b, want in enumerate(feats):
      assert_parity(out["superfeatures"][b, : len(want)], want, "sf (torch)")
    inputs = _frame_inputs(seed=7)
    got = _our_decoder(paper, inputs, train_mode)
    want = net.segment_object(_authors_crops(inputs, ops), train_mode)
    assert_parity(_nchw(got), want, "decoder logits (torch)")


def test_the_command_imports_next_to_main():
  """Its flags are defined only when it runs, so both modules import in one
  process (main defines --config too)."""
  subprocess.run(
      [sys.executable, "-c", "import shls_jax.convert_torch, shls_jax.main"],
      check=True,
      cwd=REPO,
  )
