"""Shared layers: compute dtypes, dense with logical axes, norms, adaLN modulation, MLP, timestep and
position embeddings.

Logical parameter axes, each named for what it is:
  embed       the model width D                  mlp         the MLP hidden width F
  heads       H·K of the q/k/v and output projections   kv   the head dim K (QK-norm scales)
  layers      the stacked-layer axis of a scan   vocab       rows of an embedding table
  modulation  the k·D outputs of an adaLN modulation
  patch       P·P·C pixels of a patch (patch embedder in, final projection out)
  context_in  the width of the text context      vec_in      the pooled-text / timestep-frequency input
Activation axes: act_batch, act_seq, act_embed, act_heads, act_mlp. The rules that map them onto mesh
axes are config data (config.sharding_rules). Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.ad_checkpoint import checkpoint_name

ZERO = nnx.initializers.zeros_init()
XAVIER = nnx.initializers.xavier_uniform()
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Every logical axis name a module may use; config.sharding_rules maps them onto mesh axes.
LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "layers", "vocab", "modulation", "patch", "context_in", "vec_in",
                "act_batch", "act_seq", "act_embed", "act_heads", "act_attn_heads", "act_mlp")


def get_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
  return DTYPES[name]


def mesh_in_use():
  """The (abstract) mesh of jax.set_mesh, or None; readable inside jit."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def platform() -> str:
  """The platform of the mesh in use (a compile-only TPU topology counts as TPU), else the default's."""
  mesh = mesh_in_use()
  device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  return device.platform if device is not None else jax.default_backend()


def linear_dot_general(x, kernel, dimension_numbers, precision=None, **kwargs):
  """nnx.Linear's product x·W, with (…, in) flattened to (N, in) on a single CPU device.

  The same matmul, but its transpose then gives the kernel gradient as one 2-D xᵀ·dy, which XLA's CPU
  backend runs as a fast (N, in)ᵀ·(N, out) product. From the (B, S, in)ᵀ·(B, S, out) form it instead copies
  dy transposed and runs a much slower (in, N)·(out, N)ᵀ product: 51 against 173 GFLOP/s on one core for
  (1024, 256)·(1024, 1024), and benchmarks/train_step_vs_diffusers.py's whole train step (width 256,
  4 layers) is 10 % faster (docs/performance.md). With a mesh of several devices the
  N-D form is kept, so that GSPMD never has to reshard a merged batch × sequence axis.
  """
  mesh = mesh_in_use()
  if x.ndim > 2 and platform() == "cpu" and (mesh is None or mesh.size == 1):
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), precision=precision,
                            **kwargs)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])
  return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision, **kwargs)


def dense(in_features, out_features, axes, rngs, *, dtype=jnp.float32, zero=False, bias=True, init=None):
  """A Linear whose kernel carries logical axis names; `zero` gives adaLN-Zero style zero init."""
  kernel_init = ZERO if zero else (init or XAVIER)
  return nnx.Linear(
      in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(kernel_init, axes),
      bias_init=nnx.with_partitioning(ZERO, axes[-1:]), rngs=rngs, dot_general=linear_dot_general)


def constrain(x, *axes):
  """Sharding constraint by logical activation axes; a no-op without a mesh and logical-axis rules."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  table = dict(rules)
  spec = jax.sharding.PartitionSpec(*(table.get(a) if a else None for a in axes))
  return jax.lax.with_sharding_constraint(x, spec)


def constrain_like_params(tree, specs):
  """FSDP for one layer's parameters inside a scan: each array is constrained to its stored sharding, then
  gathered over the batch axes (those 'act_batch' maps to: data, fsdp) and kept split over the others
  (tensor). A no-op without a mesh and rules.

  Without the gather, XLA may split the layer's matmuls over the embedding dimension (all-to-alls and
  full-size partial-sum all-reduces: the traffic of tensor parallelism on a batch axis). With it, the
  forward all-gathers the layer's weights just before use, and the transposes make the backward
  reduce-scatter that layer's gradient into its shards.
  """
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return tree
  table = dict(rules)
  batch_axes = table.get("act_batch") or ()
  batch_axes = {batch_axes} if isinstance(batch_axes, str) else set(batch_axes)

  def mesh_spec(spec, gathered):
    axes = []
    for name in spec:  # logical names, or mesh axes already (nnx resolves specs under active rules)
      mapped = table.get(name, name) if isinstance(name, str) else name
      if gathered and mapped is not None:
        kept = tuple(a for a in ((mapped,) if isinstance(mapped, str) else mapped) if a not in batch_axes)
        mapped = kept[0] if len(kept) == 1 else (kept or None)
      axes.append(mapped)
    return jax.sharding.PartitionSpec(*axes)

  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  stored = jax.tree.map(lambda s: mesh_spec(s, False), specs, is_leaf=is_spec)
  gathered = jax.tree.map(lambda s: mesh_spec(s, True), specs, is_leaf=is_spec)
  tree = jax.tree.map(jax.lax.with_sharding_constraint, tree, stored)
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, gathered)


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


class ModulationOut(NamedTuple):
  """One adaLN modulation, each (B, D): y = x · (1 + scale) + shift, and the residual gate (None: 1)."""
  shift: jax.Array
  scale: jax.Array
  gate: jax.Array | None = None

  def __call__(self, x):
    return modulate(x, self.shift, self.scale)

  def gated(self, y):
    """The residual branch y (B, N, D) times the gate."""
    return y if self.gate is None else self.gate[:, None] * y


def modulations(linear, vec, n: int, *, gated: bool = True) -> list[ModulationOut]:
  """adaLN(-Zero): Linear(SiLU(c)) cut into n (shift, scale[, gate]) groups, in that order (DiT, SD3)."""
  per = 3 if gated else 2
  chunks = jnp.split(linear(jax.nn.silu(vec)), per * n, axis=-1)
  return [ModulationOut(*chunks[per * i:per * (i + 1)]) for i in range(n)]


def continuous_modulation(linear, vec, *, scale_first: bool) -> ModulationOut:
  """Ungated (shift, scale) of a final or pre-only layer. diffusers' AdaLayerNormContinuous (SD3) chunks
  its output as (scale, shift), DiT as (shift, scale); `scale_first` keeps each loadable from its weights."""
  first, second = jnp.split(linear(jax.nn.silu(vec)), 2, axis=-1)
  return ModulationOut(shift=second, scale=first) if scale_first else ModulationOut(shift=first, scale=second)


class MLP(nnx.Module):
  """Linear → tanh-GELU → Linear (diffusers' "gelu-approximate" FeedForward)."""

  def __init__(self, dim, hidden, rngs, dtype):
    self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs, dtype=dtype)
    self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs, dtype=dtype)

  def __call__(self, x):
    h = constrain(jax.nn.gelu(self.fc1(x), approximate=True), "act_batch", "act_seq", "act_mlp")  # (B, N, F)
    return checkpoint_name(self.fc2(checkpoint_name(h, "mlp_in")), "mlp_out")  # (names for remat "names")


def timestep_embedding(t, dim=256, max_period=10000.0):
  """Sinusoidal embedding of t (B,), cosine half first (diffusers flip_sin_to_cos=True)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, dim)


class MLPEmbedder(nnx.Module):
  """Linear → SiLU → Linear: the timestep and pooled-text embedders."""

  def __init__(self, in_dim, dim, rngs, dtype, init=None):
    self.linear_1 = dense(in_dim, dim, ("vec_in", "embed"), rngs, dtype=dtype, init=init)
    self.linear_2 = dense(dim, dim, ("mlp", "embed"), rngs, dtype=dtype, init=init)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def aug_embedder(lowres_channels, dim, rngs, dtype):
  """A super-resolution stage's embedder of the augmentation level (as the timestep's); None for a base model."""
  return MLPEmbedder(256, dim, rngs, dtype, init=nnx.initializers.normal(0.02)) if lowres_channels else None


def add_aug_level(embedder, vec, cond, dim=256):
  """vec + MLP(sinusoidal_dim(1000 · aug_level)) for a super-resolution stage (Imagen: the noise-conditioning
  augmentation level enters like a second timestep); vec unchanged for a base model."""
  if embedder is None:
    return vec
  return vec + embedder(timestep_embedding(1000.0 * cond["aug_level"], dim).astype(vec.dtype))


def with_lowres(x, cond):
  """x (B, h, w, C) with the super-resolution stage's upsampled low-res input concatenated on channels."""
  return x if "lowres" not in cond else jnp.concatenate([x, cond["lowres"].astype(x.dtype)], axis=-1)


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
  """adaLN from c, Linear, unpatchify: (B, L, D) → (B, h, w, C) in float32."""
  mod = continuous_modulation(norm_out, vec, scale_first=scale_first)
  out = proj_out(mod(layer_norm(x)))  # (B, L, P·P·C)
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
