"""The native CPU attention kernel (mmdit_jax/model/cpu_attention.cc) against XLA's einsums: values and
gradients for self- and cross-attention of lengths that are not multiples of its blocks or vectors, the MM-DiT
on a mesh (the kernel per device under shard_map), remat without a second forward, the fallbacks and the build."""

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdit_jax import model, parallel
from mmdit_jax.model import attention, cpu_attention, stack
from tests.model.model_test import TINY, _inputs, _randomize


def _qkv(b, sq, skv, h, k, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, sq, h, k)), jnp.float32)
  return (q, *(jnp.asarray(rng.standard_normal((b, skv, h, k)), jnp.float32) for _ in range(2)))


def test_the_kernel_builds_here():
  """CI's machine has g++: a build failure must fail the suite, not silently fall back to XLA."""
  assert cpu_attention.available(), "the CPU attention kernel did not build (see the warning)"


@pytest.mark.parametrize("shape", [(2, 37, 37, 3, 16), (4, 333, 333, 2, 64), (1, 70, 130, 2, 32), (3, 5, 77, 2, 48),
                                   (1, 130, 9, 1, 16)])
def test_matches_xla_attention(shape):
  """Query blocks of 64 with a remainder, key lengths off the 32-wide panels and the 16-wide vectors, head
  dimensions 16-64, one and several threads' worth of (batch, head) tasks."""
  b, sq, skv, h, k = shape
  q, key, v = _qkv(b, sq, skv, h, k)
  g = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  np.testing.assert_allclose(jax.jit(cpu_attention.attention)(q, key, v), attention.xla_attention(q, key, v),
                             rtol=1e-5, atol=2e-6)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2)))(q, key, v)
  for got, want in zip(grads(cpu_attention.attention), grads(attention.xla_attention), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_avx2_build_matches_xla(tmp_path):
  """The kernel built for AVX2 (-march=x86-64-v3: 8-lane vectors, 6-row tiles), as on machines without
  AVX-512, in a process of its own: the same values and gradients."""
  import subprocess
  import sys

  from tests import helpers
  code = """
import jax, jax.numpy as jnp, numpy as np
from mmdit_jax.model import attention, cpu_attention
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, s, 3, 32)), jnp.float32) for s in (45, 70, 70))
np.testing.assert_allclose(jax.jit(cpu_attention.attention)(q, k, v), attention.xla_attention(q, k, v), rtol=1e-5,
                           atol=2e-6)
grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
for a, b in zip(grads(cpu_attention.attention), grads(attention.xla_attention)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("ok", cpu_attention.library())
"""
  env = dict(helpers.env(devices=1), MMDIT_JAX_CPU_ARCH="x86-64-v3", MMDIT_JAX_CACHE=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
  assert str(tmp_path) in done.stdout  # its own build, not the session's native one


def test_scale_and_vmap():
  q, k, v = _qkv(2, 20, 20, 2, 16)
  np.testing.assert_allclose(cpu_attention.attention(q, k, v, scale=1.0),
                             attention.biased_attention(q, k, v, scale=1.0), rtol=1e-5, atol=2e-6)
  stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]  # vmapped: one kernel call per slice
  f = lambda q, k, v: jnp.sum(jnp.sin(cpu_attention.attention(q, k, v)))
  got = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1, 2))))(*stacked)
  for i in range(2):
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(attention.xla_attention(*a))), argnums=(0, 1, 2))(
        *(x[i] for x in stacked))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5)


def _calls(text):
  return text.count(cpu_attention.FORWARD), text.count(cpu_attention.BACKWARD)


def test_mmdit_on_a_mesh_and_remat():
  """The whole MM-DiT (joint attention, QK-norm, an MMDiT-X layer), head dimension 16: the same loss and
  gradients as xla, and the same output sharded over data, fsdp and tensor (the kernel per device under
  shard_map; the tiny train tests compare whole steps on meshes with one device's). With remat dots_no_batch
  the backward reuses the forward's output and log-sum-exp: one forward kernel for each backward one."""
  base = model.MMDiTConfig(**dict(TINY, hidden_size=64, depth=2), dual_attention_layers=(0,), qk_norm=True,
                           remat="dots_no_batch")
  cfg = dataclasses.replace(base, attention="cpu")
  latents, t, cond = _inputs(b=4)
  params = _randomize(model.init(base, jax.random.key(0)))
  grad = lambda cfg: jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.forward(cfg, p, latents, t, cond) ** 2)))
  step = grad(cfg)
  fwd, bwd = _calls(step.lower(params).as_text())
  assert fwd == bwd == 3  # the MMDiT-X layer's two attentions and the last layer's: none recomputed
  (want_loss, want), (loss, got) = grad(base)(params), step(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
  want = jax.jit(lambda p: model.forward(base, p, latents, t, cond))(params)
  with jax.set_mesh(parallel.make_mesh((2, 2, 1, 2))), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    forward = jax.jit(lambda p: model.forward(cfg, p, latents, t, cond))
    assert cpu_attention.FORWARD in forward.lower(params).as_text()
    np.testing.assert_allclose(forward(params), want, rtol=1e-4, atol=1e-5)
  # Without the kernel's residuals among the saved names, remat runs its forward again in a scan's backward.
  def scanned(policy):
    layer = jax.checkpoint(lambda x, k, v: cpu_attention.attention(x, k, v), policy=policy)
    f = lambda q, k, v: jnp.sum(jax.lax.scan(lambda x, _: (layer(x, k, v), None), q, length=2)[0])
    return _calls(jax.jit(jax.grad(f)).lower(*_qkv(1, 8, 8, 1, 16)).as_text())
  assert scanned(jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims) == (2, 1)
  assert scanned(stack.remat_policy("dots_no_batch")) == (1, 1)


def test_falls_back_to_xla_where_it_does_not_apply(monkeypatch):
  """bfloat16, a head dimension off 16, or no kernel: "cpu" is xla's einsums (no custom call)."""
  cpu = attention.get_attention("cpu")
  for q, k, v in (tuple(x.astype(jnp.bfloat16) for x in _qkv(1, 8, 8, 2, 16)), _qkv(1, 8, 8, 2, 8)):
    text = jax.jit(cpu).lower(q, k, v).as_text()
    assert cpu_attention.FORWARD not in text
    np.testing.assert_array_equal(jax.jit(cpu)(q, k, v), jax.jit(attention.get_attention("xla"))(q, k, v))
  monkeypatch.setattr(cpu_attention, "available", lambda: False)
  assert cpu_attention.FORWARD not in jax.jit(cpu).lower(*_qkv(1, 8, 8, 2, 16)).as_text()
  with pytest.raises(ValueError, match="multiple of 16"):
    cpu_attention.attention(*_qkv(1, 8, 8, 2, 8))


def test_a_failed_build_warns_and_is_reported(tmp_path, monkeypatch, caplog):
  """The build is cached by key (a second build is the same file, not rebuilt). A compiler that fails:
  build() raises with its command and errors and leaves no file; library() warns and returns None
  (attention 'cpu' / 'auto' then use XLA's einsums)."""
  built, compiler = cpu_attention.library(), cpu_attention._compiler()
  mtime = os.path.getmtime(built)
  assert cpu_attention.build(os.path.dirname(built), compiler) == built and os.path.getmtime(built) == mtime
  fake = tmp_path / "bad-c++"
  fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'no such header' >&2\nexit 1\n")
  fake.chmod(0o755)
  with pytest.raises(RuntimeError, match="no such header"):
    cpu_attention.build(str(tmp_path / "kernels"), str(fake))
  assert not os.listdir(tmp_path / "kernels")  # no partial file left behind
  monkeypatch.setattr(cpu_attention, "_compiler", lambda: str(fake))
  with caplog.at_level(logging.WARNING):
    assert cpu_attention.library.__wrapped__() is None
  assert "not available" in caplog.text
