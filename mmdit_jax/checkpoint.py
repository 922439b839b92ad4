"""Orbax checkpoints of the train state (params, optimizer, EMA, counters) and the data iterator.

Saves are asynchronous and keep the newest N; orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save is never restored. Restoring takes the abstract state
with the current run's shardings, so a checkpoint restores onto any mesh shape.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """A checkpoint whose tensors do not fit the configured model."""


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


class Checkpointer:
  def __init__(self, directory, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    saved = self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    if saved:
      logging.info("checkpoint: saving step %d (asynchronously)", step)
    return saved

  def check_compatible(self, step: int, abstract_state):
    """Fails, naming the tensors, when the checkpoint at `step` holds another model's state."""
    meta = self.manager.item_metadata(step)["state"]
    if meta is None:
      raise CheckpointMismatch(f"checkpoint step {step} in {self.manager.directory} has no readable state")
    have, want = _flat_shapes(meta), _flat_shapes(abstract_state)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(have) & set(want))
             if have[k] != want[k]]
    if missing or extra or wrong:
      raise CheckpointMismatch(
          f"checkpoint step {step} in {self.manager.directory} does not match the configured model: "
          f"missing {missing[:8]}, unexpected {extra[:8]}, shape mismatches {wrong[:8]}")

  def restore(self, step: int, abstract_state, shardings):
    """(state, data_state) at `step`, laid out with `shardings` (any mesh)."""
    self.check_compatible(step, abstract_state)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def tree_equal(a, b) -> bool:
  """Bitwise equality of two pytrees of arrays (for resume checks)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
