"""Meshes, logical-axis rules, host-local ↔ global arrays and multi-process start-up."""

from mmdit_jax.parallel.arrays import pad_batch, put_rows, to_global, to_host
from mmdit_jax.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    axis_sizes,
    batch_sharding,
    data_parallel_size,
    fill_sizes,
    make_mesh,
    mesh_shape,
    num_slices,
    replicated,
)
