"""Checkpoints of the training state: every orbax call of the project.

Nothing else imports orbax (its API changes often). One `Checkpointer` wraps
an `orbax.checkpoint.CheckpointManager` over `<directory>/<step>/`, each step
one pytree (the `TrainState`) written with `StandardSave`.

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, step = ckpt.restore_latest(state)  # (state, None): start fresh
    ckpt.save(step, state)  # returns once the arrays are copied to host
    ckpt.close()  # waits for the background writes

How a save becomes a checkpoint (orbax 0.12): it is written into
`<step>.orbax-checkpoint-tmp/` (on GCS: straight into `<step>/`), and only
after every process has finished writing does the primary process commit it
by writing `commit_success.txt` and renaming the directory to `<step>/` (on
GCS: by writing `commit_success.txt` alone). A process killed mid-save, even
by SIGKILL, leaves a directory that orbax never lists as a step.

Resume order (`restore_latest(template)`):

1. Candidates are the committed steps, newest first. Directories of a save
   that never finished are not candidates; they are logged and left for orbax
   to replace when that step is saved again.
2. For each candidate, its tree metadata is read and compared with the
   template: every key, shape and dtype must match. A difference raises
   `StructureMismatchError` (a config change, not damage: no fallback, nothing
   is touched).
3. The candidate is restored onto the template's shapes, dtypes and shardings.
   The first one that restores completely is returned with its step.
4. A candidate whose metadata or array files cannot be read (missing or
   truncated files, unparsable JSON) is damaged: a WARNING names its step
   and the error, the directory is renamed to `<step>.damaged-<n>` (kept for
   inspection, never deleted) and the next older step is tried. Moving it
   aside matters: orbax would otherwise still count it, so it would refuse to
   save that step again, skip every save up to it, and give it a place among
   the `max_to_keep` newest (then delete it in rotation).
5. If none restores: the template unchanged and step None, with a WARNING
   when damaged steps were moved aside.

Errors that say nothing about the files (out of memory, permission denied,
storage unavailable or timing out) are raised, not taken for damage, so that
a failing machine never moves good checkpoints aside.

Multi-host: every process creates the `Checkpointer` and makes the same calls
in the same order. Orbax synchronises the processes itself: each writes the
shards it holds (replicated arrays once), the primary process writes the
metadata and commits the directory, and old steps are deleted once. The one
write made here, moving a damaged step aside, is done by process 0 after all
processes agree that the step is damaged (a step counts as restored only if
it restored on every process), followed by a barrier. Steps are judged
alike everywhere because every process reads the same files.
"""

from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

# Orbax's name for the single item of a step directory.
_ITEM = "default"
# Substrings of errors from a failing machine or storage, not from the files.
_ENVIRONMENT_ERRORS = (
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED",
)
# How many differing keys a mismatch error lists per kind.
_MAX_LISTED = 12


class StructureMismatchError(ValueError):
  """A checkpoint holds other keys, shapes or dtypes than the template."""


class _DamagedError(Exception):
  """A committed step whose files cannot be read back."""


class Checkpointer:
  """Saves and restores one pytree (the training state) per step.

  Not thread-safe: call it from the training loop only, on every process.
  """

  def __init__(
      self,
      directory: str | epath.PathLike,
      *,
      max_to_keep: int | None = 3,
      async_save: bool = True,
  ):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: the root of the step directories, local or `gs://`.
      max_to_keep: how many of the newest steps to keep; None keeps all.
      async_save: whether `save` returns once the arrays are on the host and
        writes them in a background thread (`wait` blocks until done).
    """
    self.directory = epath.Path(directory)
    handler = ocp.StandardCheckpointHandler()
    # Registered up front so that metadata can be read before any save.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_ITEM, ocp.args.StandardSave, handler)
    registry.add(_ITEM, ocp.args.StandardRestore, handler)
    options = ocp.CheckpointManagerOptions(
        # The caller picks the steps to save: any step newer than the latest.
        save_interval_steps=1,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry
    )

  def all_steps(self) -> list[int]:
    """The committed steps (and the one being saved), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed (or being saved) step, None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` as `step`; a step that exists already is left as it is.

    With `async_save` this returns once the arrays are copied to host memory,
    so the caller may donate or delete them right after.

    Args:
      step: the step number, an int or a scalar array.
      state: a pytree of arrays.
      force: also save a step older than the latest one (normally skipped).

    Returns:
      Whether a checkpoint was started.
    """
    step = int(step)
    if step in self._manager.all_steps():
      logging.info(
          "Checkpoint for step %d exists already in %s; not saving it again.",
          step,
          self.directory,
      )
      return False
    saved = self._manager.save(
        step, args=ocp.args.StandardSave(state), force=force
    )
    if saved:
      logging.info("Saving checkpoint for step %d in %s.", step, self.directory)
    else:
      logging.info(
          "Not saving step %d: older than the latest checkpoint (step %s).",
          step,
          self._manager.latest_step(),
      )
    return saved

  def restore_latest(self, template: PyTree) -> tuple[PyTree, int | None]:
    """The newest checkpoint that restores completely (see module docstring).

    Args:
      template: a pytree of arrays with the structure, shapes, dtypes and
        shardings to restore onto, e.g. a freshly initialised state.

    Returns:
      (restored state, its step), or (template, None) when nothing restores.

    Raises:
      StructureMismatchError: a checkpoint does not fit the template.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    for tmp in ocp.path.step.all_temporary_paths(self.directory):
      logging.warning(
          "Ignoring %s: a save that never finished (its process was killed),"
          " not a checkpoint; orbax replaces it when that step is saved again.",
          tmp.get(),
      )
    target = jax.tree.map(_abstract, template)
    moved_aside = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      state, error = None, None
      try:
        state = self._restore_step(step, target)
      except _DamagedError as e:
        error = e
      if _on_every_process(error is None):
        logging.info("Restored step %d from %s.", step, path)
        return state, step
      if error is None:
        error = "it failed to restore on another process"
      moved_aside.append(self._move_aside(step, error))
    if moved_aside:
      logging.warning(
          "No checkpoint in %s restores; starting fresh. Damaged checkpoints"
          " were moved aside to %s.",
          self.directory,
          ", ".join(str(p) for p in moved_aside),
      )
    return template, None

  def restore(self, step: int, template: PyTree) -> PyTree:
    """One given step (a learning curve reads several); nothing is moved.

    Raises:
      FileNotFoundError: no such step.
      StructureMismatchError: it does not fit the template.
      ValueError: it is damaged.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint of step {step} in {self.directory}; it has steps"
          f" {sorted(self._manager.all_steps())}."
      )
    try:
      return self._restore_step(step, jax.tree.map(_abstract, template))
    except _DamagedError as e:
      raise ValueError(
          f"Checkpoint {self.directory / str(step)} is damaged: {e}"
      ) from e

  def wait(self) -> None:
    """Blocks until the background writes of earlier saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the background writes and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _restore_step(self, step: int, target: PyTree) -> PyTree:
    """Restores one step; raises _DamagedError or StructureMismatchError."""
    path = self.directory / str(step)
    try:
      saved = getattr(self._manager.item_metadata(step), "tree", None)
      # Missing metadata files read back as None or an empty container.
      if not isinstance(saved, Mapping) or not saved:
        raise _DamagedError(f"no readable tree metadata in {path}")
      _check_structure(path, saved, target)
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (StructureMismatchError, _DamagedError):
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax and TensorStore report unreadable files with many types
      # (ValueError, JSONDecodeError, bare Exception); all mean damage unless
      # the machine or storage is at fault.
      chain = _chain(e)
      if any(map(_is_environment_error, chain)):
        raise RuntimeError(
            f"Restoring step {step} from {path} failed for a reason outside"
            f" the checkpoint files: {_summary(chain[-1])}. Nothing was moved;"
            " fix the cause and run again."
        ) from e
      raise _DamagedError(_summary(chain[-1])) from e

  def _move_aside(self, step: int, error: Any) -> epath.Path:
    """Renames a damaged step to `<step>.damaged-<n>`; returns the new path."""
    path = self.directory / str(step)
    n = 1
    while (self.directory / f"{step}.damaged-{n}").exists():
      n += 1
    if jax.process_count() > 1:
      # Process 0's choice, made before it renames anything: a process that
      # looked after the rename would pick the next free name.
      n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
    new_path = self.directory / f"{step}.damaged-{n}"
    logging.warning(
        "Checkpoint for step %d in %s is damaged (%s); moving it aside to %s"
        " and trying the previous step.",
        step,
        path,
        error,
        new_path,
    )
    if jax.process_index() == 0:
      path.rename(new_path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}_{n}")
    self._manager.reload()
    return new_path


def _abstract(leaf: Any) -> Any:
  """A restore target for one leaf: arrays keep shape, dtype and sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _check_structure(path: epath.Path, saved: PyTree, target: PyTree) -> None:
  """Raises StructureMismatchError unless keys, shapes and dtypes all match."""
  saved = _flat(saved)
  wanted = _flat(target)
  only_saved = sorted(saved.keys() - wanted.keys())
  only_wanted = sorted(wanted.keys() - saved.keys())
  changed = []
  for key in sorted(saved.keys() & wanted.keys()):
    was, now = _describe(saved[key]), _describe(wanted[key])
    if was and now and was != now:
      changed.append(f"{key}: checkpoint {was}, this run {now}")
  if not (only_saved or only_wanted or changed):
    return
  lines = [
      f"The checkpoint {path} does not fit the training state of this run:"
      " its model or optimizer config differs from the run that wrote it."
  ]
  for title, keys in (
      ("only in the checkpoint", only_saved),
      ("only in this run", only_wanted),
      ("different shape or dtype", changed),
  ):
    if keys:
      lines.append(f"  {title} ({len(keys)}):")
      lines += [f"    {key}" for key in keys[:_MAX_LISTED]]
      if len(keys) > _MAX_LISTED:
        lines.append(f"    ... and {len(keys) - _MAX_LISTED} more")
  lines.append(
      "Resume with the config that wrote it, or start a fresh run with a new"
      " --workdir. The checkpoint was left untouched."
  )
  raise StructureMismatchError("\n".join(lines))


def _flat(tree: PyTree) -> dict[str, Any]:
  # Orbax's flattening names dataclass fields and tuple indices the same way
  # in a state and in the metadata read back, e.g. "opt_state/0/mu/w".
  return {
      "/".join(str(k) for k in keys): leaf
      for keys, leaf in ocp.tree.to_flat_dict(tree).items()
  }


def _describe(leaf: Any) -> str | None:
  """E.g. "float32[3, 4]"; None for leaves without shape and dtype."""
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    return None
  return f"{np.dtype(dtype).name}{list(shape)}"


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = [error]
  while (cause := chain[-1].__cause__) is not None and cause not in chain:
    chain.append(cause)
  return chain


def _summary(error: BaseException, limit: int = 400) -> str:
  # The innermost TensorStore error says which file failed and how; the
  # outer ones wrap it with a full JSON spec.
  text = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _is_environment_error(error: BaseException) -> bool:
  if isinstance(error, (MemoryError, PermissionError, TimeoutError)):
    return True
  return any(code in str(error) for code in _ENVIRONMENT_ERRORS)


def _on_every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.array([ok], np.int32))
  return bool(np.all(flags))
