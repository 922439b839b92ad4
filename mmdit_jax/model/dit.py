"""DiT (Peebles & Xie) and the text-conditioned baselines of SD3 Fig. 4, in one configurable transformer.

block × conditioning:
  adaln_zero / adaln, class   DiT (c = t + label embedding modulates every block)
  cross_attn, class           DiT cross-attention variant ([t, y] as a 2-token context)
  in_context, class           DiT in-context variant ([t, y] tokens prepended to the image)
  adaln_zero, text            SD3's "DiT": text tokens concatenated to image tokens, shared weights
  cross_attn, text            CrossDiT: image self-attention + cross-attention to the text sequence
  in_context + long_skip      U-ViT: everything as tokens, long skips from first to second half
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import layers
from mmdit_jax.model.attention import Attention, get_attention
from mmdit_jax.model.layers import constrain, dense, get_dtype, layer_norm
from mmdit_jax.model.stack import Stack, check_remat

# DiT Table 1: name → (layers, width, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context")
CONDITIONINGS = ("class", "text")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  depth: int = 28  # layers
  hidden_size: int = 1152  # D
  num_heads: int = 16  # H
  mlp_ratio: float = 4.0
  patch_size: int = 2  # 2, 4 or 8 in the DiT paper
  in_channels: int = 4  # SD-VAE latents
  out_channels: int | None = None  # None → in_channels (DiT's learned-σ checkpoints use 2·C)
  lowres_channels: int = 0  # super-resolution stage: channels of the upsampled low-res input concatenated
  input_size: int = 32  # latent side the sin-cos table is scaled to
  block: str = "adaln_zero"  # one of BLOCKS
  conditioning: str = "class"  # one of CONDITIONINGS
  num_classes: int = 1000  # class labels; label num_classes is the null class for guidance
  context_dim: int = 4096  # text conditioning: width of the context tokens
  pooled_dim: int = 2048  # text conditioning: width of the pooled vector
  long_skip: bool = False  # U-ViT long skip connections (first half → second half)
  qk_norm: bool = False
  dtype: str = "float32"
  attention: str = "xla"  # key of attention.ATTENTION_IMPLS: xla | splash | cudnn | dot_product | cpu | auto
  splash_block_q: int = 512  # splash attention's block sizes (multiples of 128)
  splash_block_kv: int = 512
  remat: str = "none"  # key of stack.REMAT_POLICIES
  remat_names: tuple[str, ...] = ()  # for remat names / offload (stack.CHECKPOINT_NAMES)
  scan_layers: bool = True

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ValueError(f"unknown DiT block {self.block!r}; valid: {list(BLOCKS)}")
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"unknown conditioning {self.conditioning!r}; valid: {list(CONDITIONINGS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.long_skip and self.depth < 2:
      raise ValueError("long_skip needs depth >= 2")
    get_dtype(self.dtype)
    get_attention(self.attention, self.splash_block_q, self.splash_block_kv)
    object.__setattr__(self, "remat_names", tuple(self.remat_names))
    check_remat(self.remat, self.remat_names)

  @property
  def width(self) -> int:
    return self.hidden_size

  @property
  def heads(self) -> int:
    return self.num_heads

  @property
  def out_dim(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def cond_features(self) -> tuple[str, ...]:
    """The batch features the backbone is conditioned on."""
    return ("label",) if self.conditioning == "class" else ("context", "pooled")

  def make(self, rngs: nnx.Rngs) -> "DiT":
    return DiT(self, rngs)

  def null_cond(self, text_null: dict | None = None) -> dict:
    """The unconditional input of classifier-free guidance: the null class, or the empty prompt."""
    if self.conditioning == "class":
      return {"label": jnp.asarray(self.num_classes, jnp.int32)}
    return {k: text_null[k] for k in ("context", "pooled")}

  @property
  def adaptive(self) -> bool:
    """Whether blocks are modulated by c (adaLN(-Zero)); CrossDiT on text is, class cross-attn isn't."""
    return self.block in ("adaln_zero", "adaln") or (self.block == "cross_attn" and self.conditioning == "text")


def dit_config(name: str = "XL/2", **overrides) -> DiTConfig:
  """A DiT of the paper by name, e.g. 'XL/2', 'B/4', 'S/8'."""
  size, _, patch = name.partition("/")
  if size not in DIT_SIZES or patch not in ("2", "4", "8"):
    raise ValueError(f"unknown DiT {name!r}; valid: sizes {list(DIT_SIZES)} × patch 2, 4, 8, e.g. 'XL/2'")
  depth, width, heads = DIT_SIZES[size]
  return DiTConfig(**{"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": int(patch),
                      **overrides})


class Block(nnx.Module):
  """One DiT block; `skip` adds U-ViT's long-skip projection (concat → Linear) at its input."""

  def __init__(self, cfg: DiTConfig, rngs, *, skip=False):
    d, dt = cfg.width, get_dtype(cfg.dtype)
    self.kind, self.adaptive = cfg.block, cfg.adaptive
    self.attend = get_attention(cfg.attention, cfg.splash_block_q, cfg.splash_block_kv)
    self.skip = dense(2 * d, d, ("mlp", "embed"), rngs, dtype=dt) if skip else None
    if self.adaptive:
      chunks = 4 if cfg.block == "adaln" else 6
      self.mod = dense(d, chunks * d, ("embed", "modulation"), rngs, dtype=dt, zero=cfg.block != "adaln")
    else:
      self.norm1, self.norm2 = layers.LayerNorm(d, rngs), layers.LayerNorm(d, rngs)
    self.attn = Attention(d, cfg.heads, rngs, dtype=dt, qk_norm=cfg.qk_norm)
    if cfg.block == "cross_attn":
      self.norm_cross = layers.LayerNorm(d, rngs)
      self.cross = Attention(d, cfg.heads, rngs, dtype=dt, qk_norm=cfg.qk_norm)
    self.mlp = layers.MLP(d, int(d * cfg.mlp_ratio), rngs, dt)

  def __call__(self, x, vec, context, skip_x=None):
    if self.skip is not None:
      x = self.skip(jnp.concatenate([x, skip_x], axis=-1))
    if self.adaptive:  # adaLN-Zero: (shift, scale, gate) per branch; adaLN: (shift, scale), no gates
      attn_mod, mlp_mod = layers.modulations(self.mod, vec, 2, gated=self.kind != "adaln")
      x = x + attn_mod.gated(self.attn(attn_mod(layer_norm(x)), self.attend))
      if self.kind == "cross_attn":
        x = x + self.cross(self.norm_cross(x), self.attend, context)
      x = x + mlp_mod.gated(self.mlp(mlp_mod(layer_norm(x))))
    else:
      x = x + self.attn(self.norm1(x), self.attend)
      if self.kind == "cross_attn":
        x = x + self.cross(self.norm_cross(x), self.attend, context)
      x = x + self.mlp(self.norm2(x))
    return constrain(x, "act_batch", "act_seq", "act_embed")


class DiT(nnx.Module):
  """Patchify → [condition tokens ⊕] image tokens → blocks → adaLN final layer → unpatchify."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt, p = cfg.width, get_dtype(cfg.dtype), cfg.patch_size
    self.x_embedder = dense(p * p * (cfg.in_channels + cfg.lowres_channels), d, ("patch", "embed"), rngs, dtype=dt)
    self.t_embedder = layers.MLPEmbedder(256, d, rngs, dt, init=nnx.initializers.normal(0.02))
    self.aug_embedder = layers.aug_embedder(cfg.lowres_channels, d, rngs, dt)
    if cfg.conditioning == "class":
      self.y_embedder = nnx.Embed(cfg.num_classes + 1, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs,
                                  embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                                       ("vocab", "embed")))
    else:
      self.y_embedder = layers.MLPEmbedder(cfg.pooled_dim, d, rngs, dt)
      self.context_embedder = dense(cfg.context_dim, d, ("context_in", "embed"), rngs, dtype=dt)
    block = lambda r, skip=False: Block(cfg, r, skip=skip)
    if cfg.long_skip:
      half = cfg.depth // 2
      self.in_blocks = Stack(block, half, rngs)
      self.mid_blocks = Stack(block, cfg.depth - 2 * half, rngs) if cfg.depth % 2 else None
      self.out_blocks = Stack(lambda r: block(r, skip=True), half, rngs)
    else:
      self.blocks = Stack(block, cfg.depth, rngs)
    self.norm_out = dense(d, 2 * d, ("embed", "modulation"), rngs, dtype=dt, zero=True)
    self.proj_out = dense(d, p * p * cfg.out_dim, ("embed", "patch"), rngs, dtype=dt, zero=True)

  def __call__(self, latents, t, cond):
    """latents (B, h, w, C), t (B,) in [0, 1]; cond {label (B,) int} or {context (B, T, ·), pooled (B, ·)}."""
    cfg = self.cfg
    dt, p = get_dtype(cfg.dtype), cfg.patch_size
    b, h, w, _ = latents.shape
    if h % p or w % p:
      raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
    pos = layers.sincos_pos_embed(cfg.width, h // p, w // p, base_size=cfg.input_size // p)
    latents = layers.with_lowres(latents, cond)
    x = self.x_embedder(layers.patchify(latents.astype(dt), p)) + pos.astype(dt)  # (B, L, D)
    t_emb = layers.add_aug_level(self.aug_embedder, self.t_embedder(
        layers.timestep_embedding(1000.0 * t).astype(dt)), cond)  # (B, D)
    missing = [k for k in cfg.cond_features if k not in cond]
    if missing:
      raise ValueError(f"{cfg.conditioning}-conditional DiT needs cond {list(cfg.cond_features)}; missing {missing}")
    if cfg.conditioning == "class":
      y_emb, txt = self.y_embedder(cond["label"]), None
    else:
      y_emb = self.y_embedder(cond["pooled"].astype(dt))
      txt = self.context_embedder(cond["context"].astype(dt))
    vec = t_emb + y_emb  # (B, D)
    cond_tokens = jnp.stack([t_emb, y_emb], axis=1)  # (B, 2, D)
    if txt is not None:
      cond_tokens = jnp.concatenate([cond_tokens, txt], axis=1)  # (B, 2 + T, D)
    # Which tokens enter the sequence, and what cross-attention sees.
    if cfg.block == "in_context":
      prefix, context_seq = cond_tokens, None
    elif cfg.block == "cross_attn":
      prefix, context_seq = None, (txt if txt is not None else cond_tokens)
    else:
      prefix, context_seq = txt, None
    n_prefix = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
      x = jnp.concatenate([prefix, x], axis=1)  # (B, n_prefix + L, D)
    x = constrain(x, "act_batch", "act_seq", "act_embed")
    run = dict(remat=cfg.remat, remat_names=cfg.remat_names, scan=cfg.scan_layers)
    if cfg.long_skip:
      x, skips = self.in_blocks(x, vec, context_seq, collect=True, **run)  # skips (half, B, S, D)
      if self.mid_blocks is not None:
        x, _ = self.mid_blocks(x, vec, context_seq, **run)
      x, _ = self.out_blocks(x, vec, context_seq, xs=skips[::-1], **run)
    else:
      x, _ = self.blocks(x, vec, context_seq, **run)
    x = x[:, n_prefix:]
    return layers.final_layer(self.norm_out, self.proj_out, x, vec, p, h, w, scale_first=False)
