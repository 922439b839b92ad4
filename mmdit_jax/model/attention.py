"""Multi-head attention: the kernels behind one signature, chosen by name, and the projection module.

Kernels take q, k, v (B, S, H, K) → (B, S, H, K). "xla" is a plain einsum/softmax (float32 logits) that
runs everywhere; "cudnn" is cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16);
"dot_product" lets JAX pick.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.model import layers
from mmdit_jax.model.layers import constrain, dense


def xla_attention(q, k, v):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale  # (B, H, S, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def biased_attention(q, k, v, bias=None, scale=None):
  """Attention with an additive logit bias (B|1, H|1, S, S): causal or padding masks (−inf where
  masked), T5's relative position bias. `scale` defaults to K^−0.5 (T5 uses 1)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale  # (B, H, S, S)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def dot_product_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v)


ATTENTION_IMPLS = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "dot_product": dot_product_attention,
}


def get_attention(name: str):
  """The kernel `name`, its output tagged "attn_out" (for remat "names" / "offload")."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; valid: {sorted(ATTENTION_IMPLS)}")
  impl = ATTENTION_IMPLS[name]
  return lambda q, k, v: checkpoint_name(impl(q, k, v), "attn_out")


class Attention(nnx.Module):
  """q, k, v projections (with optional RMSNorm on q and k) of one stream, and the output projection."""

  def __init__(self, d, heads, rngs, *, dtype, qk_norm=False, out=True, kv_dim=None):
    self.heads = heads
    self.q = dense(d, d, ("embed", "heads"), rngs, dtype=dtype)
    self.k = dense(kv_dim or d, d, ("embed", "heads"), rngs, dtype=dtype)
    self.v = dense(kv_dim or d, d, ("embed", "heads"), rngs, dtype=dtype)
    head_dim = d // heads
    self.q_norm = layers.RMSNorm(head_dim, rngs) if qk_norm else None
    self.k_norm = layers.RMSNorm(head_dim, rngs) if qk_norm else None
    self.out = dense(d, d, ("heads", "embed"), rngs, dtype=dtype) if out else None

  def _split(self, y):
    b, n, d = y.shape
    return constrain(y.reshape(b, n, self.heads, d // self.heads), "act_batch", "act_seq", "act_heads", None)

  def qkv(self, x, context=None):
    """(q, k, v), each (B, N, H, K); k and v from `context` for cross-attention."""
    kv = x if context is None else context
    q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return tuple(checkpoint_name(a, "qkv") for a in (q, k, v))  # (names for remat "names" / "offload")

  def __call__(self, x, attend, context=None):
    """Self-attention of x, or cross-attention from x to `context`; output projected, (B, N, D)."""
    o = attend(*self.qkv(x, context))  # (B, N, H, K)
    return self.out(o.reshape(x.shape))
