"""Device meshes from config data, and the default logical-axis rules that map model axis names onto them.

Mesh axes are ('data', 'fsdp', 'sequence', 'tensor'). Sizes are given per axis name for ICI (within a
slice) and DCN (across slices); one −1 per level is filled from the device count. The rules are only
the default of `config.sharding_rules`: every caller takes them from the config.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from mmdit_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axis → mesh axes. Parameters: FSDP over the embedding axis, tensor parallelism over heads and
# MLP; activations: batch over data × fsdp, sequence over 'sequence', heads and MLP over 'tensor' — and
# inside attention the whole sequence with heads over tensor × sequence (all-to-alls in and out).
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("vocab", None),
    ("modulation", None),
    ("patch", None),
    ("context_in", None),
    ("vec_in", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_attn_heads", ("tensor", "sequence")),  # inside attention: Ulysses sequence parallelism
    ("act_mlp", "tensor"),
)


def axis_sizes(sizes: Mapping[str, int] | Sequence[int], what: str) -> tuple[int, ...]:
  """Sizes in MESH_AXES order from {axis: size} (missing axes are 1) or a full sequence."""
  if isinstance(sizes, Mapping):
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
      raise ConfigError(f"{what} names unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
    return tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
  sizes = tuple(int(s) for s in sizes)
  if len(sizes) != len(MESH_AXES):
    raise ConfigError(f"{what} needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {list(sizes)}")
  return sizes


def fill_sizes(sizes, total: int, what: str) -> tuple[int, ...]:
  """Replaces a single −1 so that the product equals `total`; errors name the sizes and the total."""
  sizes = list(axis_sizes(sizes, what))
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"{what} {named}: sizes must be positive, with at most one -1 to fill")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError(f"{what} {named}: {total} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ConfigError(f"{what} {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                      f"{total} are available; make the product {total} or use -1 on one axis")
  return tuple(sizes)


def num_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shape(ici, dcn, devices) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ICI sizes, DCN sizes) with −1 filled for these devices."""
  slices = num_slices(devices)
  return (fill_sizes(ici, len(devices) // slices, "config.mesh.ici"),
          fill_sizes(dcn if dcn is not None else {}, slices, "config.mesh.dcn"))


def make_mesh(ici: Mapping[str, int] | Sequence[int] = (-1, 1, 1, 1), dcn=None, devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default all) with Auto axis types; hybrid ICI × DCN for multi-slice.

  On TPU and GPU the devices are laid out along the physical topology; sizes it cannot realise fail
  with the topology's message rather than falling back to an arbitrary order. CPU devices have no
  topology, so their order is the mesh order.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shape(ici, dcn, devices)
  if devices[0].platform == "cpu":
    grid = np.asarray(devices).reshape(tuple(i * d for i, d in zip(ici, dcn)))
  else:
    try:
      if num_slices(devices) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
      else:
        grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError) as e:
      raise ConfigError(
          f"cannot lay out mesh ICI {dict(zip(MESH_AXES, ici))} × DCN {dict(zip(MESH_AXES, dcn))} on "
          f"{len(devices)} {devices[0].device_kind} devices: {e}. Choose sizes that tile the slice's "
          "physical topology (e.g. put -1 on one axis)") from e
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh) -> int:
  """How many ways the batch is split (the mesh axes that 'act_batch' maps to)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh, ndim: int = 1):
  """Sharding of a global batch array: leading axis over data × fsdp, the rest replicated."""
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1)))
  return jax.sharding.NamedSharding(mesh, spec)


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
