"""The CLIP text transformer (OpenAI CLIP-L/14 and OpenCLIP bigG/14 shapes) as SD3 uses it.

SD3 takes the penultimate layer's hidden states (before the final LayerNorm) as context and the EOS
token's final-LayerNorm state as the pooled vector: unprojected for CLIP-L, through the text projection
for bigG. Module and attribute names follow transformers' CLIPTextModelWithProjection, so the converter
is a name map. Layers 0..n−2 are a scanned Stack; the last layer stands alone because only the pooled
output passes through it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import layers
from mmdit_jax.model.attention import biased_attention
from mmdit_jax.model.layers import constrain, dense, get_dtype
from mmdit_jax.model.stack import Stack

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP
}
POOLED = ("projected", "unprojected")


def check_layer_fields(cfg):
  """The fields CLIPLayer reads (activation, width, num_heads), checked for the text and image towers alike."""
  name = type(cfg).__name__
  if cfg.activation not in ACTIVATIONS:
    raise ValueError(f"{name}.activation={cfg.activation!r}; valid: {sorted(ACTIVATIONS)}")
  if cfg.width % cfg.num_heads:
    raise ValueError(f"{name}.width {cfg.width} is not divisible by num_heads {cfg.num_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_width: int = 3072
  max_tokens: int = 77  # learned position table length
  activation: str = "quick_gelu"  # key of ACTIVATIONS: quick_gelu (CLIP-L) | gelu (bigG)
  projection_dim: int | None = 768  # text_projection (no bias); None: the checkpoint has none
  pooled: str = "unprojected"  # the pooled vector SD3 takes: unprojected (CLIP-L) | projected (bigG)
  eos_token_id: int = 49407  # pooled at the first EOS; 2 (old HF configs) → at argmax(ids), as HF does
  eps: float = 1e-5
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def make(self, rngs: nnx.Rngs) -> "CLIPText":
    return CLIPText(self, rngs)

  def __post_init__(self):
    check_layer_fields(self)
    if self.pooled not in POOLED:
      raise ValueError(f"CLIPTextConfig.pooled={self.pooled!r}; valid: {POOLED}")
    if self.pooled == "projected" and self.projection_dim is None:
      raise ValueError("CLIPTextConfig.pooled='projected' needs projection_dim")
    if self.depth < 2:
      raise ValueError(f"CLIPTextConfig.depth={self.depth}: SD3 takes the penultimate layer, so depth ≥ 2")

  @property
  def pooled_dim(self) -> int:
    return self.projection_dim if self.pooled == "projected" else self.width


CLIP_L = CLIPTextConfig()
CLIP_G = CLIPTextConfig(width=1280, depth=32, num_heads=20, mlp_width=5120, activation="gelu",
                        projection_dim=1280, pooled="projected")


class SelfAttention(nnx.Module):
  def __init__(self, d, heads, rngs, dtype):
    self.heads = heads
    self.q_proj = dense(d, d, ("embed", "heads"), rngs, dtype=dtype)
    self.k_proj = dense(d, d, ("embed", "heads"), rngs, dtype=dtype)
    self.v_proj = dense(d, d, ("embed", "heads"), rngs, dtype=dtype)
    self.out_proj = dense(d, d, ("heads", "embed"), rngs, dtype=dtype)

  def __call__(self, x, bias):
    b, n, d = x.shape
    q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    q = constrain(q, "act_batch", "act_seq", "act_heads", None)  # (B, T, H, K)
    return self.out_proj(biased_attention(q, k, v, bias).reshape(b, n, d))


class MLP(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs, dtype):
    self.act = cfg.activation
    self.fc1 = dense(cfg.width, cfg.mlp_width, ("embed", "mlp"), rngs, dtype=dtype)
    self.fc2 = dense(cfg.mlp_width, cfg.width, ("mlp", "embed"), rngs, dtype=dtype)

  def __call__(self, x):
    h = constrain(ACTIVATIONS[self.act](self.fc1(x)), "act_batch", "act_seq", "act_mlp")  # (B, T, F)
    return self.fc2(h)


class CLIPLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg: CLIPTextConfig, rngs):
    dt = get_dtype(cfg.dtype)
    self.layer_norm1 = layers.LayerNorm(cfg.width, rngs, eps=cfg.eps)
    self.self_attn = SelfAttention(cfg.width, cfg.num_heads, rngs, dt)
    self.layer_norm2 = layers.LayerNorm(cfg.width, rngs, eps=cfg.eps)
    self.mlp = MLP(cfg, rngs, dt)

  def __call__(self, x, bias):
    x = x + self.self_attn(self.layer_norm1(x), bias)
    return x + self.mlp(self.layer_norm2(x))


class CLIPText(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, param_dtype=jnp.float32, rngs=rngs,
                                     embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))
    self.position_embedding = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(
        rngs.params(), (cfg.max_tokens, cfg.width), jnp.float32))
    self.layers = Stack(lambda r: CLIPLayer(cfg, r), cfg.depth - 1, rngs)
    self.last_layer = CLIPLayer(cfg, rngs)
    self.final_layer_norm = layers.LayerNorm(cfg.width, rngs, eps=cfg.eps)
    self.text_projection = (None if cfg.projection_dim is None else dense(
        cfg.width, cfg.projection_dim, ("embed", None), rngs, bias=False))

  def __call__(self, ids, clip_skip: int = 0):
    """ids (B, T) int → (penultimate hidden states (B, T, D), pooled (B, pooled_dim)), float32.

    clip_skip = k takes the states k layers before the penultimate instead (diffusers' SD3 pipeline:
    hidden_states[−(k + 2)]; k = depth − 1 is the embeddings); the pooled vector is unchanged."""
    cfg = self.cfg
    b, n = ids.shape
    if n > cfg.max_tokens:
      raise ValueError(f"{n} tokens exceed the CLIP position table ({cfg.max_tokens})")
    if not 0 <= clip_skip < cfg.depth:
      raise ValueError(f"clip_skip={clip_skip}: this CLIP has {cfg.depth} layers, so 0..{cfg.depth - 1}")
    x = self.token_embedding(ids) + self.position_embedding[...][:n]  # (B, T, D)
    x = constrain(x.astype(get_dtype(cfg.dtype)), "act_batch", "act_seq", "act_embed")
    causal = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf)[None, None]  # (1, 1, T, T)
    hidden, every = self.layers(x, causal, collect=clip_skip > 0)  # every: (depth − 1, B, T, D) layer outputs
    last = self.final_layer_norm(self.last_layer(hidden, causal))
    if clip_skip:
      index = cfg.depth - 2 - clip_skip
      hidden = x if index < 0 else every[index]
    eos = jnp.argmax(ids, -1) if cfg.eos_token_id == 2 else jnp.argmax(ids == cfg.eos_token_id, -1)
    pooled = last[jnp.arange(b), eos].astype(jnp.float32)  # (B, D)
    if cfg.pooled == "projected":
      pooled = self.text_projection(pooled)
    return hidden.astype(jnp.float32), pooled
