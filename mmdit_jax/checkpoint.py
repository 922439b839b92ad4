"""Orbax checkpoints of the train state (params, optimizer, EMA, counters) and the data iterator.

Saves are asynchronous and keep the newest N; orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save is never restored. Restoring takes the abstract state
with the current run's shardings, so a checkpoint restores onto any mesh shape. A newest checkpoint that
cannot be read falls back to the one before it, with a warning; training moves the damaged one aside
(to `checkpoints_damaged/`, never deleting it) so that the step can be saved again.

Arrays are stored in OCDBT databases (few, large files: right for GCS). Object stores without GCS's
object generations, which OCDBT's manifest updates rely on (some S3-compatible stores, the local GCS
emulator the tests use), need MMDIT_JAX_CHECKPOINT_OCDBT=0: one zarr array per parameter instead.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from mmdit_jax.errors import UserError
from mmdit_jax.metrics import log, warn


class CheckpointMismatch(UserError):
  """A checkpoint whose tensors do not fit the configured model."""


class CheckpointError(UserError):
  """No intact checkpoint where one was expected."""


def _flat_shapes(tree):
  """{normalised path: shape}; orbax metadata spells nnx Variables and list indices differently."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]

  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  norm = lambda path: "/".join(n for n in map(name, path) if n != "value")
  return {norm(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _register_array_handler():
  """Replica-parallel saving (each replica of a replicated array writes a slice of it) exists so that
  hosts share the writing; in one process every replica is local and the same process writes all of it,
  so it only adds an eager slice per array per device before each save (2 s of a 2-s save of the tiny
  test model on 8 CPU devices). On pods it stays on, for arrays whose slices are at least 1 MiB."""
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                          min_slice_bytes_for_replica_parallel=1 << 20)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns on every override of its default handler
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  def __init__(self, directory, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    ocdbt = os.environ.get("MMDIT_JAX_CHECKPOINT_OCDBT", "1") != "0"
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt), "data": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def check_compatible(self, step: int, abstract_state, partial: bool = False):
    """Fails, naming the tensors, when the checkpoint at `step` holds another model's state (with `partial`,
    only the parts of the state that `abstract_state` has are compared). Metadata that cannot be read raises
    the reader's own error (a damaged checkpoint, not a mismatch)."""
    meta = self.manager.item_metadata(step)["state"]
    if meta is None:
      raise ValueError(f"checkpoint step {step} in {self.directory} has no readable state metadata")
    have, want = _flat_shapes(meta), _flat_shapes(abstract_state)
    if partial:
      have = {k: v for k, v in have.items() if k.split("/")[0] in abstract_state}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(have) & set(want))
             if have[k] != want[k]]
    if missing or extra or wrong:
      raise CheckpointMismatch(
          f"checkpoint step {step} in {self.directory} does not match the configured model: "
          f"missing {missing[:8]}, unexpected {extra[:8]}, shape mismatches {wrong[:8]}")

  def restore(self, step: int, abstract_state, shardings, keys=None):
    """(state, data_state) at `step`, laid out with `shardings` (any mesh). With `keys` (top-level entries of
    the state, e.g. ("params", "ema") for evaluation), only those are read, and data_state is None: the
    optimizer's moments, twice the parameters' size for Adam, are neither read nor held in memory."""
    if keys is not None:
      abstract_state, shardings = ({k: tree[k] for k in keys} for tree in (abstract_state, shardings))
    self.check_compatible(step, abstract_state, partial=keys is not None)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    if keys is not None:  # (the manager's StandardRestore reads whole trees; the PyTree handler can omit parts)
      reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
      try:
        return reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)), None
      finally:
        reader.close()
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state, shardings, *, set_aside_damaged: bool = False, keys=None):
    """(step, state, data_state) of the newest checkpoint that restores, or None when there is none (`keys`:
    only those parts of the state, as in `restore`).

    A checkpoint that fails to read is skipped with a warning (and, with `set_aside_damaged`, moved to
    checkpoints_damaged/ so the run can save that step again); another model's checkpoint is an error.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state, shardings, keys)
      except CheckpointMismatch:
        raise
      except Exception as e:  # tensorstore, orbax and JSON readers raise many types for damaged files
        failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        warn(f"checkpoint step {step} in {self.directory} cannot be restored ({failures[-1]}); "
             "falling back to the previous one")
        if set_aside_damaged:
          self._set_aside(step)
        continue
      return step, state, data_state
    if failures:
      raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(failures))
    return None

  def _set_aside(self, step: int):
    if jax.process_index() == 0:
      damaged = self.directory.parent / f"{self.directory.name}_damaged"
      damaged.mkdir(parents=True, exist_ok=True)
      target = damaged / str(step)
      if target.exists():
        target = damaged / f"{step}.{len(list(damaged.iterdir()))}"
      (self.directory / str(step)).rename(target)
      log(f"moved the damaged checkpoint of step {step} to {target}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mmdit_jax.checkpoint: step {step} set aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
