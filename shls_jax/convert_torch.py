r"""The authors' PyTorch checkpoint -> a checkpoint of this project (SPEC 11).

    python -m shls_jax.convert_torch --checkpoint my_net_best.pth --out DIR \
        [--config configs/davis.py]

DIR then holds what a training run of this project leaves behind, so it is
used like one: `--config.eval.checkpoint=DIR` for the evaluate and segment
modes (`inference.load_networks`), `--config.train.init_from=DIR` to
fine-tune from it (`train.load_weights`). DIR gets

    checkpoints/0/      the TrainState (orbax, via checkpoint.Checkpointer),
                        the optimizer state of stage 'joint' at its initial
                        value (Adam moments zero; loaders drop it)
    config.json         the config the weights belong to (as training writes)
    conversion.json     the report: every tensor, its Flax path and shapes,
                        the parameter counts and the source's sha256

The checkpoint is the authors' `torch.save` dict whose `model` entry is the
state dict of their `My_Net` under DataParallel (`module.` prefixes), or a
bare state dict; an `.npz` of the state dict (one array per key) is read
without PyTorch. PyTorch is imported only for a `.pth` file and only here
(`pip install -e '.[torch]'`).

Every one of the 244 tensors must be there with its exact shape: a missing,
unexpected or mis-shaped key stops the conversion with a list of every
problem, the key and the expected shape (the authors' own loader skipped
such keys silently, which gives a network with random parts). Mapping:
`module.` is stripped; `spx_embedding.` is dropped in front of
`feat_extractor`; every `nn.Sequential` index is joined to its container's
name with an underscore (`layer2.0.left.3` -> `layer2_0/left_3`); conv
weights OIHW -> HWIO, linear weights [out, in] -> [in, out]; BatchNorm
weight / bias -> params scale / bias, running_mean / running_var ->
batch_stats mean / var (shape [1] for the heads' one-feature BatchNorms);
`num_batches_tracked` is checked and dropped (Flax keeps no count).
superfeatures.py has the table of names.

The authors' older (2022) superfeature network, `spx_emb` with a
post-convolution, a transposed convolution and a shared 1x1 head, is another
architecture; its checkpoints are refused with a message saying so.

Nothing is written unless the whole conversion succeeds: DIR is assembled in
a temporary sibling folder and renamed into place at the end. DIR must not
exist yet or be empty; it is a local path.
"""

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from shls_jax import checkpoint
from shls_jax import train
from shls_jax.models import superfeatures as superfeatures_lib

# DataParallel's prefix on every key of the authors' state dict.
PREFIX = "module."
# The optimizer layout written with the weights: the one that trains all of
# them. Loaders drop the optimizer state; `train.load_weights` tries each
# stage's layout in turn ('superfeatures', 'decoder', then this one).
STAGE = "joint"
# The converted state's step (a run resumed from DIR starts here).
STEP = 0
# What `torch.save` wrote around the state dict, in the authors' code.
_STATE_DICT_ENTRIES = ("model", "state_dict")
# BatchNorm counters: checked, then dropped (Flax keeps no count).
_COUNTER = "num_batches_tracked"
# Keys that only the authors' older superfeature networks have: `spx_emb`
# (the 2023 model calls it `spx_embedding`) with post_convolution, deconv /
# deconv_part1 and a shared conv_1x1 head, sampled 1-d convolutions
# (sf_conv1d) and a fusion conv without nn.Sequential or with a BatchNorm.
_OLD_LAYOUT = re.compile(
    r"^(spx_emb\.|sf_conv1d\.|sf_conv_1x1\.(weight$|bias$|1\.))"
    r"|post_convolution|\.deconv"
)
# The authors' placeholder decoder (config.fake): another architecture.
_FAKE_DECODER = re.compile(r"^segmenter\.pred_L1\.")
# Problems listed per kind before "... and N more".
_MAX_LISTED = 40


class ConversionError(ValueError):
  """The checkpoint cannot become this project's model; nothing was written."""


# --------------------------------------------------------------------------
# Reading.


def read_state_dict(path: str, *, trust_pickle: bool = False):
  """The state dict of a checkpoint file as NumPy arrays.

  Args:
    path: a `.pth` / `.pt` written by `torch.save` (the authors' dict with a
      `model` entry, or a bare state dict) or an `.npz` with one array per
      state-dict key.
    trust_pickle: read a .pth with `weights_only=False` (runs code from it).

  Returns:
    ({key: array}, {name: value} of the scalar entries saved beside the
    state dict, such as the authors' `epoch`).

  Raises:
    ConversionError: unknown file type, unreadable file, PyTorch missing.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"--checkpoint={path}: no such file.")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {key: np.asarray(data[key]) for key in data.files}, {}
    except (OSError, ValueError) as e:
      raise ConversionError(
          f"--checkpoint={path} is not a readable .npz of arrays ({e}). Write"
          " one with np.savez(path, **{k: v.numpy() for k, v in"
          " state_dict.items()})."
      ) from e
  if extension in (".pth", ".pt", ".tar", ".ckpt"):
    return _read_torch(path, trust_pickle)
  raise ConversionError(
      f"--checkpoint={path}: unknown file type {extension!r}; give the"
      " authors' .pth or an .npz of its state dict."
  )


def _read_torch(path: str, trust_pickle: bool):
  """A torch.save file -> ({key: array}, scalar entries)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        f"Reading {path} needs PyTorch, which is not installed. Install the"
        " optional extra with `pip install -e '.[torch]'`, or convert the"
        " state dict to an .npz on a machine with PyTorch (README, 'Using"
        " the authors' weights') and pass that instead."
    ) from e
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # torch.load reports a refused or broken pickle with many types.
    hint = (
        ""
        if trust_pickle
        else (
            " If the file holds Python objects besides tensors and comes from"
            " a source you trust, add --trust_pickle (unpickling runs code"
            " from the file)."
        )
    )
    raise ConversionError(
        f"torch.load could not read {path}: {type(e).__name__}: {e}.{hint}"
    ) from e
  state, extras = loaded, {}
  if isinstance(loaded, dict):
    for entry in _STATE_DICT_ENTRIES:
      if isinstance(loaded.get(entry), dict):
        state = loaded[entry]
        extras = {
            k: v
            for k, v in loaded.items()
            if isinstance(v, (int, float, str, bool))
        }
        break
  if not isinstance(state, dict):
    raise ConversionError(
        f"{path} holds a {type(loaded).__name__}, not a state dict (nor a"
        f" dict with one of the entries {list(_STATE_DICT_ENTRIES)})."
    )
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(
          f"{path}: state-dict entry {key!r} is a {type(value).__name__}, not"
          " a tensor."
      )
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    arrays[str(key)] = value.numpy()
  return arrays, extras


def strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes DataParallel's `module.` from every key that has it."""
  stripped = {}
  for key, value in state.items():
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    if name in stripped:
      raise ConversionError(
          f"The checkpoint has {name!r} both with and without the"
          f" {PREFIX!r} prefix; keep one of them."
      )
    stripped[name] = value
  return stripped


# --------------------------------------------------------------------------
# The mapping.


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax array: HWIO -> OIHW, [in, out] -> [out, in]."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes and dtypes of this project's params and batch_stats for `config`.

  Both networks, as `train.init_state` builds them (nothing is computed).
  """
  model = train.make_model(config)
  tx = train.make_optimizer(config, 1)
  state = jax.eval_shape(lambda: train.init_state(config, model, tx))
  return {"params": state.params, "batch_stats": state.batch_stats}


def expected_tensors(
    config: ml_collections.ConfigDict,
) -> dict[str, tuple[tuple[str, ...] | None, tuple[int, ...]]]:
  """Every key of the authors' state dict for `config`'s model.

  Args:
    config: the config (its model widths fix the shapes; the paper's are in
      configs/davis.py).

  Returns:
    {key without `module.`: (Flax path ('params' | 'batch_stats', module,
    ..., leaf), or None for a dropped `num_batches_tracked`; PyTorch shape)}.
  """
  variables = abstract_variables(config)
  names = superfeatures_lib.torch_checkpoint_names(variables, prefix="")
  expected = {}
  for key, path in names.items():
    leaf = variables
    for part in path:
      leaf = leaf[part]
    expected[key] = (path, torch_shape(leaf.shape))
    if key.endswith(".running_mean"):
      counter = key[: -len("running_mean")] + _COUNTER
      expected[counter] = (None, ())
  return dict(sorted(expected.items()))


def _listed(title: str, lines: list[str]) -> list[str]:
  if not lines:
    return []
  out = [f"  {title} ({len(lines)}):"]
  out += [f"    {line}" for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    out.append(f"    ... and {len(lines) - _MAX_LISTED} more")
  return out


def _check_architecture(source: str, state: dict[str, np.ndarray]) -> None:
  """Refuses checkpoints of the authors' other architectures by their keys."""
  old = sorted(k for k in state if _OLD_LAYOUT.search(k))
  if old:
    raise ConversionError(
        f"{source} is a checkpoint of the authors' older (2022) superfeature"
        " network, a different architecture: it has"
        f" {', '.join(old[:6])}{' ...' if len(old) > 6 else ''} (an `spx_emb`"
        " with a post-convolution, a transposed convolution and a shared 1x1"
        " head, no gate or segmenter). This project implements the BMVC 2023"
        " model, whose checkpoint has spx_embedding.feat_extractor.*,"
        " sf_head_L1.*, sf_head_L4.*, sf_conv_1x1.0.*, mem_select.* and"
        " segmenter.*. Convert the authors' 2023 weights (my_net_best.pth)"
        " instead; nothing was written."
    )
  fake = sorted(k for k in state if _FAKE_DECODER.search(k))
  if fake:
    raise ConversionError(
        f"{source} has {', '.join(fake)}: the authors' placeholder decoder"
        " (their config.fake), not the gate and segmenter of the paper's"
        " model. Convert a checkpoint of the full model; nothing was written."
    )


def check_state_dict(
    source: str,
    state: dict[str, np.ndarray],
    expected: dict[str, tuple[Any, tuple[int, ...]]],
) -> None:
  """Raises ConversionError listing every missing, unexpected or bad tensor.

  Args:
    source: the file, for the message.
    state: the state dict without `module.` prefixes.
    expected: `expected_tensors(config)`.
  """
  _check_architecture(source, state)
  missing = [
      f"{k}: expected shape {list(shape)}"
      for k, (_, shape) in expected.items()
      if k not in state
  ]
  unexpected = [
      f"{k}: shape {list(np.shape(v))}"
      for k, v in sorted(state.items())
      if k not in expected
  ]
  misshaped, bad_values = [], []
  for key, (path, shape) in expected.items():
    if key not in state:
      continue
    value = np.asarray(state[key])
    if path is None:  # A BatchNorm counter: one integer.
      if value.size != 1:
        misshaped.append(f"{key}: shape {list(value.shape)}, expected []")
      continue
    if tuple(value.shape) != shape:
      misshaped.append(
          f"{key}: shape {list(value.shape)}, expected {list(shape)}"
      )
    elif not np.issubdtype(value.dtype, np.floating):
      bad_values.append(f"{key}: dtype {value.dtype}, expected floating point")
    elif not np.all(np.isfinite(value)):
      bad_values.append(f"{key}: non-finite values")
    elif key.endswith(".running_var") and np.any(value < 0):
      bad_values.append(f"{key}: negative running variance")
  if not (missing or unexpected or misshaped or bad_values):
    return
  lines = [
      f"{source} does not fit this project's model: every one of the"
      f" {len(expected)} tensors of SPEC section 11 must be there with its"
      " shape, and nothing else."
  ]
  lines += _listed("missing", missing)
  lines += _listed("unexpected", unexpected)
  lines += _listed("wrong shape", misshaped)
  lines += _listed("unusable values", bad_values)
  hints = []
  present = set(state)
  for module in ("mem_select.", "segmenter."):
    if not any(k.startswith(module) for k in present):
      hints.append(
          f"No {module}* key at all: a checkpoint of the superfeature network"
          " alone (the authors' stage 1)? The conversion needs the full"
          " model."
      )
  if not present & set(expected):
    hints.append(
        "None of the expected keys is there: this is not a checkpoint of the"
        " authors' SHLS model."
    )
  if misshaped:
    hints.append(
        "Wrong shapes usually mean a --config whose model widths are not the"
        " paper's: use configs/davis.py (or copy its config.model)."
    )
  lines += hints
  lines.append("Nothing was written.")
  raise ConversionError("\n".join(lines))


def convert(
    state: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
    source: str = "the checkpoint",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The authors' state dict -> this project's variables.

  Args:
    state: {key: array}, with or without the `module.` prefix, PyTorch
      layouts.
    config: the config of the model to fill (paper widths).
    source: the file, for error messages.

  Returns:
    ({'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy
    arrays, both networks; one report row per tensor: torch key, Flax path
    or None, the two shapes).

  Raises:
    ConversionError: see `check_state_dict`.
  """
  state = strip_prefix(state)
  expected = expected_tensors(config)
  check_state_dict(source, state, expected)
  flat, rows = {}, []
  for key, (path, shape) in expected.items():
    row = {"torch": PREFIX + key, "torch_shape": list(shape)}
    if path is None:
      row.update(flax=None, value=int(np.asarray(state[key]).reshape(())))
    else:
      value = superfeatures_lib.to_flax_layout(state[key]).astype(np.float32)
      flat[path] = np.ascontiguousarray(value)
      row.update(flax="/".join(path), flax_shape=list(value.shape))
    rows.append(row)
  variables = flax.traverse_util.unflatten_dict(flat)
  return {c: variables.get(c, {}) for c in ("params", "batch_stats")}, rows


def make_state(
    config: ml_collections.ConfigDict, variables: dict[str, Any]
) -> train.TrainState:
  """A TrainState of stage `STAGE` holding `variables`, step `STEP`.

  Its structure, shapes and dtypes are checked against `train.init_state`'s,
  so that every loader of this project accepts it.
  """
  stage_config = _with_stage(config)
  params = jax.tree.map(jnp.asarray, variables["params"])
  batch_stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
  tx = train.make_optimizer(stage_config, 1)
  state = train.TrainState(
      step=jnp.asarray(STEP, jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
  )
  model = train.make_model(stage_config)
  wanted = jax.eval_shape(lambda: train.init_state(stage_config, model, tx))
  got = jax.eval_shape(lambda: state)
  if jax.tree.structure(got) != jax.tree.structure(wanted) or any(
      (a.shape, a.dtype) != (b.shape, b.dtype)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(wanted))
  ):
    raise AssertionError(
        "The converted state differs from train.init_state's; the mapping in"
        " convert_torch.py is out of date with the models."
    )
  return state


def _with_stage(config: ml_collections.ConfigDict):
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.stage = STAGE
  return config


# --------------------------------------------------------------------------
# Writing.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_out(out: str) -> str:
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(
        f"--out={out} exists and is not an empty folder; give a new one (the"
        " conversion never writes over a run)."
    )
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    raise ConversionError(f"--out={out}: its parent folder does not exist.")
  return out


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def run(
    checkpoint_path: str,
    out: str,
    config: ml_collections.ConfigDict,
    *,
    trust_pickle: bool = False,
) -> dict[str, Any]:
  """Converts `checkpoint_path` into the new folder `out` (see module doc).

  Args:
    checkpoint_path: the authors' .pth, or an .npz of its state dict.
    out: a folder that does not exist yet (or is empty).
    config: the config of the model (paper widths: configs/davis.py).
    trust_pickle: see the --trust_pickle flag.

  Returns:
    The report written to <out>/conversion.json, without its per-tensor rows.

  Raises:
    ConversionError: the file or `out` cannot be used; nothing was written.
  """
  out = _check_out(out)
  state, extras = read_state_dict(checkpoint_path, trust_pickle=trust_pickle)
  variables, rows = convert(state, config, source=checkpoint_path)
  train_state = make_state(config, variables)
  sf_params, decoder_params = train.split_variables(variables["params"])
  report = {
      "source": os.path.basename(checkpoint_path),
      "source_sha256": _sha256(checkpoint_path),
      "source_entries": extras,
      "tensors": len(rows),
      "flax_arrays": sum(r["flax"] is not None for r in rows),
      "dropped_num_batches_tracked": sum(r["flax"] is None for r in rows),
      "parameters": _count(variables["params"]),
      "superfeature_parameters": _count(sf_params),
      "decoder_parameters": _count(decoder_params),
      "batch_stat_values": _count(variables["batch_stats"]),
      "stage_layout": STAGE,
      "step": STEP,
  }
  tmp = tempfile.mkdtemp(
      prefix=f".{os.path.basename(out)}.converting-", dir=os.path.dirname(out)
  )
  try:
    with checkpoint.Checkpointer(
        os.path.join(tmp, "checkpoints"), max_to_keep=None, async_save=False
    ) as ckpt:
      ckpt.save(STEP, train_state, force=True)
    train.save_config(_with_stage(config), tmp)
    with open(os.path.join(tmp, "conversion.json"), "w") as f:
      json.dump({**report, "mapping": rows}, f, indent=1)
    if os.path.isdir(out):
      os.rmdir(out)  # Empty, checked above.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("Converted %s into %s.", checkpoint_path, out)
  return report


def summary(report: dict[str, Any], out: str) -> str:
  """A few lines for the console."""
  return "\n".join([
      f"Converted {report['source']} -> {out}",
      (
          f"  {report['tensors']} tensors: {report['flax_arrays']} Flax arrays,"
          f" {report['dropped_num_batches_tracked']} num_batches_tracked"
          " dropped"
      ),
      (
          f"  {report['parameters']:,} parameters (superfeature network"
          f" {report['superfeature_parameters']:,}, decoder"
          f" {report['decoder_parameters']:,}),"
          f" {report['batch_stat_values']:,} BatchNorm statistics"
      ),
      (
          "  Use it with --config.eval.checkpoint=DIR (evaluate, segment) or"
          " --config.train.init_from=DIR."
      ),
  ])


def default_config() -> ml_collections.ConfigDict:
  """configs/davis.py of this checkout (the paper's model widths)."""
  path = os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      "configs",
      "davis.py",
  )
  if not os.path.isfile(path):
    raise app.UsageError(
        f"No {path} next to the package; pass --config=<a config with the"
        " paper's model widths>."
    )
  spec = importlib.util.spec_from_file_location("davis_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def define_flags() -> dict[str, Any]:
  """The command's flags, defined only when it runs as a program.

  Defining them at import would clash with shls_jax.main's `--config` in a
  process that imports both (the test suite, a notebook).
  """
  checkpoint_flag = flags.DEFINE_string(
      "checkpoint",
      None,
      "The authors' checkpoint: a .pth (needs PyTorch) or an .npz of its state"
      " dict.",
  )
  out = flags.DEFINE_string(
      "out", None, "New (or empty) folder for the converted checkpoint."
  )
  config = config_flags.DEFINE_config_file(
      "config",
      None,
      "Config the weights belong to; default configs/davis.py (the paper's"
      " widths, which the authors' weights need).",
      lock_config=True,
  )
  trust_pickle = flags.DEFINE_bool(
      "trust_pickle",
      False,
      "Read a .pth that torch.load refuses with weights_only=True (it holds"
      " Python objects besides tensors). Unpickling runs code from the file:"
      " only for a checkpoint from a source you trust.",
  )
  return {
      "checkpoint": checkpoint_flag,
      "out": out,
      "config": config,
      "trust_pickle": trust_pickle,
  }


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that --help is fast and TensorFlow (saving the config)
  # keeps off accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
  values = {name: f.value for name, f in flag_values.items()}
  config = (
      values["config"] if values["config"] is not None else default_config()
  )
  try:
    report = run(
        values["checkpoint"],
        values["out"],
        config,
        trust_pickle=values["trust_pickle"],
    )
  except ConversionError as e:
    logging.error("%s", e)
    sys.exit(f"Error: {e}")
  print(summary(report, os.path.abspath(values["out"])))


if __name__ == "__main__":
  _flag_values = define_flags()
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(functools.partial(main, flag_values=_flag_values))
