"""Device meshes from config data and the logical-axis rules that map model axis names onto them.

Mesh axes are ('data', 'fsdp', 'sequence', 'tensor'). Sizes come per axis for ICI (within a slice) and
DCN (across slices); one −1 per list is filled from the device count.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axis → mesh axes. Parameters: FSDP over the embedding axis, tensor parallelism over heads and
# MLP; activations: batch over data × fsdp, sequence over 'sequence', heads and MLP over 'tensor'.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("vocab", None),
    ("cond", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def fill_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces a single −1 so that the product equals `total`; errors name the sizes and the total."""
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"{what} needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {sizes}")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{what} {sizes}: sizes must be positive, with at most one -1 to fill")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f"{what} {sizes}: {total} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"{what} {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{total} are available; make the product {total} or use -1 on one axis")
  return tuple(sizes)


def make_mesh(ici: Sequence[int] = (-1, 1, 1, 1), dcn: Sequence[int] | None = None,
              devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default all) with Auto axis types; hybrid ICI × DCN for multi-slice."""
  devices = list(jax.devices() if devices is None else devices)
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  dcn = (1,) * len(MESH_AXES) if dcn is None else dcn
  dcn = fill_sizes(dcn, n_slices, "mesh DCN sizes")
  ici = fill_sizes(ici, len(devices) // n_slices, "mesh ICI sizes")
  if n_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):  # topology-unaware fallback (CPU)
      grid = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh) -> int:
  """How many ways the batch is split (the mesh axes that 'act_batch' maps to)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh, ndim: int = 1):
  """Sharding of a global batch array: leading axis over data × fsdp, the rest replicated."""
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1)))
  return jax.sharding.NamedSharding(mesh, spec)


def put_batch(x, mesh):
  """A host array onto `mesh`: split over data × fsdp when the rows divide evenly, else replicated."""
  x = np.asarray(x)
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  return jax.device_put(x, batch_sharding(mesh, x.ndim) if x.shape[0] % n == 0 else replicated(mesh))


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed for multi-process runs: explicit flags (CPU: gloo collectives), or discovery on
  Cloud TPU VMs; a single process needs nothing."""
  if coordinator_address or num_processes:
    if jax.config.jax_platforms == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif jax.config.jax_platforms not in (None, "", "cpu"):  # Cloud TPU VMs: discover the other hosts
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # a single-host VM has nothing to discover
      print(f"jax.distributed not initialised ({e}); running as a single process")


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
