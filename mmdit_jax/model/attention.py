"""Multi-head attention kernels behind one signature, chosen by name.

q, k, v: (B, S, H, K) → (B, S, H, K). "xla" is a plain einsum/softmax (float32 logits) that runs
everywhere; "cudnn" is cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16);
"dot_product" lets JAX pick. A TPU Pallas splash-attention kernel plugs in here as another entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; valid: {sorted(ATTENTION_IMPLS)}")
  return ATTENTION_IMPLS[name]
