"""The model that ships inside the package: segment a video without training.

    python -m shls_jax.shipped --checkpoint=$RUN/2_decoder \
        --config=configs/real.py --out=shls_jax/weights/shls_real

writes `<out>.npz` (every parameter and BatchNorm statistic in float16,
keyed by its path in the variable tree) and `<out>.json` (the `model`
section of the config that trained it, and where it came from: data,
stages, steps, the scores measured on it). `load_networks(config,
"shipped")` in shls_jax.inference reads it back, taking the network's
sizes from the JSON, so any config segments with it.

float16 keeps every weight to 3 significant digits: the masks of the
float16 copy and of the float32 checkpoint are compared in
tests/test_shipped.py and in the export's log.
"""

import json
import os

from absl import logging
import ml_collections
import numpy as np

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
NAME = "shls_real"
FORMAT = 1
# Shipped files are at most this large (issue: inside the package).
MAX_BYTES = 20 * 1024 * 1024


def default_path() -> str:
  """`<package>/weights/shls_real` (without extension)."""
  return os.path.join(WEIGHTS_DIR, NAME)


def available(path: str = "") -> bool:
  path = path or default_path()
  return os.path.exists(path + ".npz") and os.path.exists(path + ".json")


def _flatten(tree, prefix=()):
  for key, value in dict(tree).items():
    path = prefix + (str(key),)
    if hasattr(value, "items"):
      yield from _flatten(value, path)
    else:
      yield "/".join(path), np.asarray(value)


def _unflatten(arrays: dict) -> dict:
  tree = {}
  for key, value in arrays.items():
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def export(
    path: str,
    model_config: ml_collections.ConfigDict,
    params,
    batch_stats,
    provenance: dict,
) -> int:
  """Writes `<path>.npz` and `<path>.json`; returns the bytes written.

  Raises ValueError (and writes nothing) when the weights would exceed
  MAX_BYTES: a narrower network is needed to ship it."""
  arrays = {}
  for group, tree in (("params", params), ("batch_stats", batch_stats)):
    for key, value in _flatten(tree):
      arrays[f"{group}/{key}"] = value.astype(np.float16)
  size = sum(a.nbytes for a in arrays.values())
  if size > MAX_BYTES:
    raise ValueError(
        f"The weights take {size / 2**20:.1f} MiB in float16, more than the"
        f" {MAX_BYTES / 2**20:.0f} MiB that ship with the package: narrow"
        " config.model (stem_features, stage_features, decoder_*)."
    )
  bad = [k for k, a in arrays.items() if not np.isfinite(a).all()]
  if bad:
    raise ValueError(
        f"{bad[0]} is not finite in float16 (a weight above 65504?):"
        " nothing was written."
    )
  meta = {
      "format": FORMAT,
      "model": model_config.to_dict(),
      "provenance": provenance,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Written beside the target first: an interrupted export leaves the old
  # files whole.
  np.savez_compressed(path + ".tmp.npz", **arrays)
  with open(path + ".tmp.json", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1, default=_json_default)
  os.replace(path + ".tmp.npz", path + ".npz")
  os.replace(path + ".tmp.json", path + ".json")
  return os.path.getsize(path + ".npz")


def _json_default(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"not JSON: {type(value)}")


def _read_meta(path: str) -> dict:
  if not available(path):
    raise FileNotFoundError(
        f"No shipped model at {path}.npz / .json. Reinstall shls_jax (the"
        " files are package data), or give a trained run with"
        " --config.eval.checkpoint."
    )
  with open(path + ".json", encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(
        f"{path}.json: format {meta.get('format')}, this shls_jax reads"
        f" format {FORMAT}. Reinstall shls_jax or export the model again."
    )
  return meta


def metadata(path: str = "") -> dict:
  """The shipped model's JSON: its `model` config and `provenance`."""
  return _read_meta(path or default_path())


def load(path: str = ""):
  """-> (model config dict, params, batch_stats, metadata), all float32."""
  path = path or default_path()
  meta = _read_meta(path)
  with np.load(path + ".npz") as data:
    arrays = {k: data[k].astype(np.float32) for k in data.files}
  tree = _unflatten(arrays)
  return meta["model"], tree["params"], tree.get("batch_stats", {}), meta


def with_model(
    config: ml_collections.ConfigDict, model: dict
) -> ml_collections.ConfigDict:
  """`config` with its `model` section replaced by the shipped one's."""
  config = ml_collections.ConfigDict(config.to_dict())
  changed = [
      k for k, v in model.items() if _as_list(config.model.get(k)) != _as_list(v)
  ]
  if changed:
    logging.info(
        "The shipped model sets config.model.%s.", ", ".join(sorted(changed))
    )
  for key, value in model.items():
    config.model[key] = tuple(value) if isinstance(value, list) else value
  return config


def _as_list(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def main(argv):
  del argv
  from shls_jax import inference  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  networks = inference.load_networks(config, FLAGS.checkpoint)
  params = {**networks.sf_variables["params"], **networks.decoder_variables["params"]}
  stats = {
      **networks.sf_variables["batch_stats"],
      **networks.decoder_variables["batch_stats"],
  }
  provenance = json.loads(FLAGS.provenance) if FLAGS.provenance else {}
  provenance.setdefault("checkpoint", os.path.basename(networks.source))
  size = export(FLAGS.out, config.model, params, stats, provenance)
  print(f"Wrote {FLAGS.out}.npz ({size / 2**20:.2f} MiB) and {FLAGS.out}.json")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "The config that trained it.")
  flags.DEFINE_string("checkpoint", None, "Workdir of the trained run.")
  flags.DEFINE_string("out", default_path(), "Output path, no extension.")
  flags.DEFINE_string("provenance", "", "JSON: data, steps, scores.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
