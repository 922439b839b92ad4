"""Meshes, logical-axis rules and host-local ↔ global arrays."""

from mmdit_jax.parallel.arrays import pad_batch, to_global, to_host
from mmdit_jax.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    data_parallel_size,
    fill_sizes,
    initialize_distributed,
    make_mesh,
    put_batch,
    replicated,
)
