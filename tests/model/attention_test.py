"""Attention kernels against the plain XLA one: splash (Pallas, interpret mode on CPU) for joint
self-attention and cross-attention of lengths that are not multiples of its blocks, value and gradient;
the whole MM-DiT (QK-norm, MMDiT-X, skip-layer guidance) with splash under shard_map on a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdit_jax import model, parallel
from mmdit_jax.model import attention, layers
from tests.model.model_test import CFG, _inputs, _randomize


def test_splash_matches_xla(sq=16, skv=5):
  """Cross-attention lengths that are not block multiples (joint self-attention: the MM-DiT test below)."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, sq, 2, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, skv, 2, 16)), jnp.float32) for _ in range(2))
  splash = attention.get_attention("splash", 128, 128)
  xla = attention.get_attention("xla")
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=2e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-3)


def test_mmdit_with_splash_on_a_mesh_matches_xla():
  """Joint attention over 48 image + 5 text tokens, QK-norm and an MMDiT-X layer, sharded over data, fsdp and
  tensor (splash under shard_map). "auto" on a CPU mesh with this head dimension (8, not a multiple of 16: no
  native kernel) is xla."""
  latents, t, cond = _inputs(b=4)
  params = _randomize(model.init(CFG, jax.random.key(0)))
  want = jax.jit(lambda p: model.forward(CFG, p, latents, t, cond))(params)
  cfg = dataclasses.replace(CFG, attention="splash", splash_block_q=128, splash_block_kv=128)
  mesh = parallel.make_mesh((2, 2, 1, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    got = jax.jit(lambda p: model.forward(cfg, p, latents, t, cond))(params)
    assert layers.platform() == "cpu"
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  auto = dataclasses.replace(CFG, attention="auto")
  np.testing.assert_array_equal(jax.jit(lambda p: model.forward(auto, p, latents, t, cond))(params), want)


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="multiples of 128"):
    model.MMDiTConfig(depth=2, attention="splash", splash_block_q=100)


def test_sequence_parallel_matches_data_parallel(kernel="xla"):
  """Ulysses-style sequence parallelism: on a (data 2, sequence 4) mesh the layers hold a quarter of the
  tokens and attention a quarter of the heads over all tokens (all-to-alls between) — the same loss and
  gradients as 8-way data parallelism."""
  cfg = dataclasses.replace(CFG, depth=2, dual_attention_layers=(), attention=kernel)  # (one scanned stage)
  latents, t, cond = _inputs(b=8)
  params = _randomize(model.init(cfg, jax.random.key(0)))
  loss = lambda p: jnp.mean(model.forward(cfg, p, latents, t, cond) ** 2)
  out = {}
  for ici in ((8, 1, 1, 1), (2, 1, 4, 1)):
    mesh = parallel.make_mesh(ici)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
      step = jax.jit(jax.value_and_grad(loss))
      out[ici] = step(params)
      text = step.lower(params).compile().as_text()
    if ici[2] > 1:
      assert "all-to-all" in text  # the re-layouts around attention
  (l8, g8), (l4, g4) = out[(8, 1, 1, 1)], out[(2, 1, 4, 1)]
  np.testing.assert_allclose(l4, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g8), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
