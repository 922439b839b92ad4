"""Host-local numpy batches ↔ global jax.Arrays sharded over the mesh's batch axes."""

from __future__ import annotations

import jax
import numpy as np

from mmdit_jax.parallel.mesh import batch_sharding, data_parallel_size


def to_global(batch: dict, mesh) -> dict:
  """Assembles each process's rows into global arrays (leading axis split over data × fsdp)."""
  out = {}
  for name, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local, global_shape)
  return out


def to_host(x) -> np.ndarray:
  """A global array gathered to every host as numpy (for metrics, images and tests)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def pad_batch(rows, size: int) -> np.ndarray:
  """Pads a partial host batch to `size` rows by repeating its last row, so every batch has the one
  compiled shape; callers drop the padded outputs."""
  rows = np.asarray(rows)
  if len(rows) > size:
    raise ValueError(f"a batch of {len(rows)} rows does not fit the compiled batch of {size}")
  return rows if len(rows) == size else np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), 0)])


def put_rows(x, mesh) -> jax.Array:
  """Host rows (the same on every process) onto the mesh, split over data × fsdp. Rows that do not divide
  the data-parallel size are padded by repeating the last row: callers keep the first len(x) outputs."""
  x = np.asarray(x)
  dp = data_parallel_size(mesh)
  return jax.device_put(pad_batch(x, -(-len(x) // dp) * dp), batch_sharding(mesh, x.ndim))
