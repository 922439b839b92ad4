"""The linear layers' matmul: flattened to 2-D on one CPU device (XLA's CPU backend then runs the kernel
gradient as a fast xᵀ·dy), the N-D product with a mesh of several devices; the same values either way."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax import parallel
from mmdit_jax.model import layers


def _dot_ranks(fn, *args):
  """The operand ranks of every dot_general in fn's jaxpr."""
  return [tuple(v.aval.ndim for v in eqn.invars) for eqn in jax.make_jaxpr(fn)(*args).eqns
          if eqn.primitive.name == "dot_general"]


def test_linear_is_flattened_on_one_cpu_device_only():
  linear = nnx.Linear(8, 16, rngs=nnx.Rngs(0), dot_general=layers.linear_dot_general)  # as layers.dense builds it
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
  w = linear.kernel[...]
  want = jnp.einsum("bsi,io->bso", x, w) + linear.bias[...]
  np.testing.assert_allclose(linear(x), want, rtol=1e-6, atol=1e-6)

  matmul = lambda x, w: layers.linear_dot_general(x, w, (((2,), (0,)), ((), ())))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  grad = jax.grad(loss(matmul), argnums=(0, 1))
  assert _dot_ranks(matmul, x, w) == [(2, 2)]
  assert _dot_ranks(grad, x, w) == [(2, 2)] * 3  # forward, dx = dy·Wᵀ and the kernel's xᵀ·dy: all 2-D
  want_grads = jax.grad(loss(lambda x, w: jnp.einsum("bsi,io->bso", x, w)), argnums=(0, 1))(x, w)
  for got, ref in zip(grad(x, w), want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

  with jax.set_mesh(parallel.make_mesh((-1, 1, 1, 1))):
    assert _dot_ranks(matmul, x, w) == [(3, 2)]
    assert _dot_ranks(grad, x, w) == [(3, 2), (3, 3), (3, 2)]
    np.testing.assert_allclose(jax.jit(matmul)(x, w), want - linear.bias[...], rtol=1e-6, atol=1e-6)
