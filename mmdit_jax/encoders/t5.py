"""The T5 v1.1 encoder (SD3's third text encoder, XXL shape by default).

Pre-RMSNorm layers without biases; attention logits are unscaled and carry a learned relative position
bias (bidirectional log-spaced buckets) computed once from the first layer's table and shared by all
layers; the feed-forward is gated GELU (tanh approximation). SD3 takes the final RMSNorm's output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import layers
from mmdit_jax.model.attention import biased_attention
from mmdit_jax.model.layers import constrain, dense, get_dtype
from mmdit_jax.model.stack import Stack


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  width: int = 4096  # d_model
  depth: int = 24
  num_heads: int = 64
  head_dim: int = 64  # d_kv
  mlp_width: int = 10240  # d_ff
  num_buckets: int = 32  # relative_attention_num_buckets
  max_distance: int = 128  # relative_attention_max_distance
  eps: float = 1e-6
  dtype: str = "float32"  # compute dtype; bf16 is safe for T5, fp16 overflows
  remat: str = "none"

  def make(self, rngs: nnx.Rngs) -> "T5Encoder":
    return T5Encoder(self, rngs)


T5_XXL = T5Config()


def relative_buckets(n_q: int, n_k: int, num_buckets: int, max_distance: int):
  """(n_q, n_k) int bucket of key position − query position, bidirectional (HF/Mesh-TF rule)."""
  rel = jnp.arange(n_k)[None, :] - jnp.arange(n_q)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(jnp.int32) * half
  rel = jnp.abs(rel)
  exact = half // 2
  safe = jnp.maximum(rel, 1).astype(jnp.float32)
  large = exact + (jnp.log(safe / exact) / math.log(max_distance / exact) * (half - exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return buckets + jnp.where(rel < exact, rel, large)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: T5Config, rngs, dtype):
    inner = cfg.num_heads * cfg.head_dim
    self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.q = dense(cfg.width, inner, ("embed", "heads"), rngs, dtype=dtype, bias=False)
    self.k = dense(cfg.width, inner, ("embed", "heads"), rngs, dtype=dtype, bias=False)
    self.v = dense(cfg.width, inner, ("embed", "heads"), rngs, dtype=dtype, bias=False)
    self.o = dense(inner, cfg.width, ("heads", "embed"), rngs, dtype=dtype, bias=False)

  def __call__(self, x, bias):
    b, n, _ = x.shape
    q, k, v = (p(x).reshape(b, n, self.heads, self.head_dim) for p in (self.q, self.k, self.v))
    q = constrain(q, "act_batch", "act_seq", "act_heads", None)  # (B, T, H, K)
    return self.o(biased_attention(q, k, v, bias, scale=1.0).reshape(b, n, -1))


class GatedFeedForward(nnx.Module):
  def __init__(self, cfg: T5Config, rngs, dtype):
    self.wi_0 = dense(cfg.width, cfg.mlp_width, ("embed", "mlp"), rngs, dtype=dtype, bias=False)
    self.wi_1 = dense(cfg.width, cfg.mlp_width, ("embed", "mlp"), rngs, dtype=dtype, bias=False)
    self.wo = dense(cfg.mlp_width, cfg.width, ("mlp", "embed"), rngs, dtype=dtype, bias=False)

  def __call__(self, x):
    h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
    return self.wo(constrain(h, "act_batch", "act_seq", "act_mlp"))  # (B, T, F) → (B, T, D)


class T5Layer(nnx.Module):
  def __init__(self, cfg: T5Config, rngs):
    dt = get_dtype(cfg.dtype)
    self.attn_norm = layers.RMSNorm(cfg.width, rngs, eps=cfg.eps)
    self.attn = SelfAttention(cfg, rngs, dt)
    self.ff_norm = layers.RMSNorm(cfg.width, rngs, eps=cfg.eps)
    self.ff = GatedFeedForward(cfg, rngs, dt)

  def __call__(self, x, bias):
    x = x + self.attn(self.attn_norm(x), bias)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shared = nnx.Embed(cfg.vocab_size, cfg.width, param_dtype=jnp.float32, rngs=rngs,
                            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")))
    self.relative_attention_bias = nnx.Embed(
        cfg.num_buckets, cfg.num_heads, param_dtype=jnp.float32, rngs=rngs,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), (None, "heads")))
    self.layers = Stack(lambda r: T5Layer(cfg, r), cfg.depth, rngs)
    self.final_layer_norm = layers.RMSNorm(cfg.width, rngs, eps=cfg.eps)

  def __call__(self, ids, mask=None):
    """ids (B, T) int, optional mask (B, T) bool of real tokens → hidden states (B, T, D) float32.

    SD3 runs T5 without a mask (padding tokens attend and are attended to), which mask=None gives.
    """
    cfg = self.cfg
    n = ids.shape[1]
    x = constrain(self.shared(ids).astype(get_dtype(cfg.dtype)), "act_batch", "act_seq", "act_embed")
    bias = self.relative_attention_bias(relative_buckets(n, n, cfg.num_buckets, cfg.max_distance))  # (T, T, H)
    bias = bias.transpose(2, 0, 1)[None]  # (1, H, T, T)
    if mask is not None:
      bias = bias + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    x, _ = self.layers(x, bias, remat=cfg.remat)
    return self.final_layer_norm(x).astype(jnp.float32)
