"""Shared layers: dense with logical axes, norms, modulation, MLP, timestep and position embeddings.

Logical parameter axes: embed, mlp, heads, kv, layers, vocab, cond. Activation axes: act_batch, act_seq,
act_embed, act_heads, act_mlp. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

ZERO = nnx.initializers.zeros_init()
XAVIER = nnx.initializers.xavier_uniform()


def dense(in_features, out_features, axes, rngs, *, dtype=jnp.float32, zero=False, bias=True, init=None):
  """A Linear whose kernel carries logical axis names; `zero` gives adaLN-Zero style zero init."""
  kernel_init = ZERO if zero else (init or XAVIER)
  return nnx.Linear(
      in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(kernel_init, axes),
      bias_init=nnx.with_partitioning(ZERO, axes[-1:]), rngs=rngs)


def constrain(x, *axes):
  """Sharding constraint by logical activation axes; a no-op without a mesh and logical-axis rules."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  table = dict(rules)
  spec = jax.sharding.PartitionSpec(*(table.get(a) if a else None for a in axes))
  return jax.lax.with_sharding_constraint(x, spec)


def layer_norm(x, eps=1e-6):
  """LayerNorm without affine parameters, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learnable scale (QK-norm of SD3.5), computed in float32."""

  def __init__(self, dim, rngs, eps=1e-6):
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("kv",))(
        rngs.params(), (dim,), jnp.float32))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with learnable scale and bias (for the blocks that are not adaptively modulated)."""

  def __init__(self, dim, rngs, eps=1e-6):
    self.eps = eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))(
        rngs.params(), (dim,), jnp.float32))
    self.bias = nnx.Param(nnx.with_partitioning(ZERO, ("embed",))(rngs.params(), (dim,), jnp.float32))

  def __call__(self, x):
    return (layer_norm(x, self.eps) * self.scale[...] + self.bias[...]).astype(x.dtype)


def modulate(x, shift, scale):
  """x (B, N, D) · (1 + scale) + shift, with per-example (B, D) shift and scale."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class MLP(nnx.Module):
  """Linear → tanh-GELU → Linear (diffusers' "gelu-approximate" FeedForward)."""

  def __init__(self, dim, hidden, rngs, dtype):
    self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs, dtype=dtype)
    self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs, dtype=dtype)

  def __call__(self, x):
    h = constrain(jax.nn.gelu(self.fc1(x), approximate=True), "act_batch", "act_seq", "act_mlp")  # (B, N, F)
    return self.fc2(h)


def timestep_embedding(t, dim=256, max_period=10000.0):
  """Sinusoidal embedding of t (B,), cosine half first (diffusers flip_sin_to_cos=True)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, dim)


class MLPEmbedder(nnx.Module):
  """Linear → SiLU → Linear: the timestep and pooled-text embedders."""

  def __init__(self, in_dim, dim, rngs, dtype, init=None):
    self.linear_1 = dense(in_dim, dim, ("cond", "embed"), rngs, dtype=dtype, init=init)
    self.linear_2 = dense(dim, dim, ("mlp", "embed"), rngs, dtype=dtype, init=init)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def _sincos_1d(dim, pos):
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim, h, w, max_size=None, base_size=None):
  """Fixed 2-D sin-cos position embedding (h·w, dim) as SD3 computes it.

  The table is built on a max_size × max_size grid whose positions are scaled by base_size/max_size
  and centre-cropped to h × w; without max_size it is built on h × w directly (DiT). Width positions
  fill the first half of the channels, height positions the second.
  """
  if max_size is None:
    grid_h, grid_w, top, left = h, w, 0, 0
    scale_h = scale_w = 1.0 if base_size is None else base_size / h
  else:
    if h > max_size or w > max_size:
      raise ValueError(f"latent grid {h}x{w} patches exceeds pos_embed_max_size={max_size}")
    grid_h = grid_w = max_size
    top, left = (max_size - h) // 2, (max_size - w) // 2
    scale_h = scale_w = (base_size or max_size) / max_size
  ys = np.arange(grid_h, dtype=np.float64) * scale_h
  xs = np.arange(grid_w, dtype=np.float64) * scale_w
  yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (grid_h, grid_w)
  table = np.concatenate([_sincos_1d(dim // 2, xx), _sincos_1d(dim // 2, yy)], axis=1)
  table = table.reshape(grid_h, grid_w, dim)[top:top + h, left:left + w]
  return table.reshape(h * w, dim).astype(np.float32)


def final_layer(norm_out, proj_out, x, vec, p, h, w, *, scale_first: bool):
  """adaLN from c, Linear, unpatchify: (B, L, D) → (B, h, w, C) in float32.

  diffusers' AdaLayerNormContinuous (SD3) chunks its modulation as (scale, shift), DiT as (shift, scale);
  `scale_first` keeps each model loadable from its reference weights.
  """
  first, second = jnp.split(norm_out(jax.nn.silu(vec)), 2, axis=-1)
  scale, shift = (first, second) if scale_first else (second, first)
  out = proj_out(modulate(layer_norm(x), shift, scale))  # (B, L, P·P·C)
  return unpatchify(out, p, h, w).astype(jnp.float32)


def patchify(x, p):
  """(B, h, w, C) → (B, h/p · w/p, p·p·C) with patch-internal order (p, q, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, h, w):
  """(B, h/p · w/p, p·p·C) → (B, h, w, C), inverse of `patchify`."""
  b, _, ppc = x.shape
  c = ppc // (p * p)
  x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)
