"""Mesh construction from config sizes: −1 fill, errors that name the sizes, batch shardings."""

import jax
import pytest

from mmdit_jax import parallel


def test_fill_and_shape():
  mesh = parallel.make_mesh((-1, 2, 1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert parallel.data_parallel_size(mesh) == 4
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes,match", [
    ((2, 2, 1, 1), "has 4 devices but 8"),
    ((-1, -1, 1, 1), "at most one -1"),
    ((3, -1, 1, 1), "not divisible by 3"),
    ((8, 1, 1), "needs 4 sizes"),
])
def test_bad_sizes_name_the_problem(sizes, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(sizes)


def test_batch_sharding_splits_leading_axis():
  mesh = parallel.make_mesh((2, 4, 1, 1))
  x = jax.device_put(jax.numpy.zeros((16, 3)), parallel.batch_sharding(mesh, 2))
  assert x.sharding.shard_shape(x.shape) == (2, 3)
