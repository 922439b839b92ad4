"""MM-DiT (SD3 §4): separate image and text weights, joined only inside attention.

Options: QK RMSNorm (SD3.5), MMDiT-X dual attention in chosen layers (SD3.5 Medium) and a 3-stream
variant with separate weights for CLIP and T5 tokens. Layers with the same structure are scanned.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import layers
from mmdit_jax.model.attention import Attention, get_attention
from mmdit_jax.model.layers import constrain, dense, get_dtype, layer_norm
from mmdit_jax.model.stack import Stack, check_remat

TEXT_COND = ("context", "pooled")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  depth: int = 24  # d: layers; width 64·d and d heads unless overridden (d=24 ≈ 2B, d=38 ≈ 8B)
  hidden_size: int | None = None  # D; None → 64·depth
  num_heads: int | None = None  # H; None → depth (head dim 64)
  mlp_ratio: float = 4.0  # F = mlp_ratio · D
  patch_size: int = 2  # P
  in_channels: int = 16  # C of the latents (SD3 VAE: 16)
  out_channels: int | None = None  # None → in_channels
  lowres_channels: int = 0  # super-resolution stage: channels of the upsampled low-res input concatenated
  context_dim: int = 4096  # width of the text context (CLIP ⊕ T5 padded to 4096)
  pooled_dim: int = 2048  # width of the pooled CLIP vector (768 + 1280)
  pos_embed_max_size: int = 192  # side of the extended sin-cos grid, centre-cropped to each h × w
  sample_size: int = 128  # latent side the position grid is scaled to (diffusers' sample_size)
  qk_norm: bool = False  # RMSNorm on q and k per head (needed for bf16 at high resolution)
  dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X: layers with an extra image self-attention
  text_streams: tuple[int, ...] = ()  # () one text stream; (77, 77): CLIP and T5 with separate weights
  dtype: str = "float32"  # compute dtype; parameters stay float32
  attention: str = "xla"  # key of attention.ATTENTION_IMPLS: xla | splash | cudnn | dot_product | cpu | auto
  splash_block_q: int = 512  # splash attention's query and key/value block sizes (multiples of 128)
  splash_block_kv: int = 512
  remat: str = "none"  # key of stack.REMAT_POLICIES: none | full | dots | dots_no_batch | names | offload
  remat_names: tuple[str, ...] = ()  # for names / offload: the tagged activations kept (stack.CHECKPOINT_NAMES)
  scan_layers: bool = True  # scan stacked layers (one compiled block) or unroll

  def __post_init__(self):
    get_dtype(self.dtype)
    get_attention(self.attention, self.splash_block_q, self.splash_block_kv)
    object.__setattr__(self, "remat_names", tuple(self.remat_names))
    check_remat(self.remat, self.remat_names)
    if self.width % self.heads:
      raise ValueError(f"hidden_size {self.width} is not divisible by num_heads {self.heads}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} outside 0..{self.depth - 1}")
    if len(self.text_streams) == 1:
      raise ValueError("text_streams: give () for one text stream or two or more token counts")

  @property
  def width(self) -> int:
    return self.hidden_size or 64 * self.depth

  @property
  def heads(self) -> int:
    return self.num_heads or self.depth

  @property
  def mlp_width(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def out_dim(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def num_text_streams(self) -> int:
    return max(1, len(self.text_streams))

  cond_features = TEXT_COND  # the batch features the backbone is conditioned on

  def make(self, rngs: nnx.Rngs) -> "MMDiT":
    return MMDiT(self, rngs)

  def null_cond(self, text_null: dict) -> dict:
    """The unconditional input of classifier-free guidance: the empty prompt's embeddings."""
    return {k: text_null[k] for k in TEXT_COND}

  def stages(self) -> tuple[tuple[int, int, bool], ...]:
    """Runs of consecutive non-final layers with the same structure: (first layer, count, dual)."""
    runs = []
    for i in range(self.depth - 1):
      dual = i in self.dual_attention_layers
      if runs and runs[-1][2] == dual:
        runs[-1][1] += 1
      else:
        runs.append([i, 1, dual])
    return tuple(tuple(r) for r in runs)


class Stream(nnx.Module):
  """One stream's weights in a joint block: modulation, attention projections and MLP.

  A pre-only stream (the last block's text) has a (scale, shift) modulation and no output or MLP.
  """

  def __init__(self, cfg: MMDiTConfig, rngs, *, pre_only=False, dual=False):
    d, dt = cfg.width, get_dtype(cfg.dtype)
    self.pre_only, self.dual = pre_only, dual
    chunks = 2 if pre_only else (9 if dual else 6)
    self.mod = dense(d, chunks * d, ("embed", "modulation"), rngs, dtype=dt, zero=True)
    self.attn = Attention(d, cfg.heads, rngs, dtype=dt, qk_norm=cfg.qk_norm, out=not pre_only)
    self.mlp = None if pre_only else layers.MLP(d, cfg.mlp_width, rngs, dt)
    self.attn2 = Attention(d, cfg.heads, rngs, dtype=dt, qk_norm=cfg.qk_norm) if dual else None

  def modulations(self, vec) -> list[layers.ModulationOut]:
    """[attention, MLP(, second attention)] modulations; a pre-only stream's one (scale, shift)."""
    if self.pre_only:
      return [layers.continuous_modulation(self.mod, vec, scale_first=True)]
    return layers.modulations(self.mod, vec, 3 if self.dual else 2)


def _joint_attention(streams, xs, attend):
  """Concatenates every stream's q, k, v on the sequence axis, attends once, splits back."""
  qkvs = [s.attn.qkv(x) for s, x in zip(streams, xs)]
  q, k, v = (jnp.concatenate(parts, axis=1) for parts in zip(*qkvs))  # (B, S, H, K)
  o = attend(q, k, v)
  b, s, h, kd = o.shape
  o = o.reshape(b, s, h * kd)
  bounds = [0]
  for x in xs:
    bounds.append(bounds[-1] + x.shape[1])
  return [o[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


class JointBlock(nnx.Module):
  """An MM-DiT block over the image stream and one or more text streams."""

  def __init__(self, cfg: MMDiTConfig, rngs, *, dual=False, pre_only=False):
    self.attend = get_attention(cfg.attention, cfg.splash_block_q, cfg.splash_block_kv)
    self.pre_only = pre_only
    self.img = Stream(cfg, rngs, dual=dual)
    self.txt = nnx.List([Stream(cfg, rngs, pre_only=pre_only) for _ in range(cfg.num_text_streams)])

  def __call__(self, carry, vec):
    img, txts = carry  # (B, L, D), [(B, T_i, D)]
    img_mods = self.img.modulations(vec)  # attention, MLP(, second attention)
    img_norm = layer_norm(img)
    txt_mods = [stream.modulations(vec) for stream in self.txt]
    xs = [img_mods[0](img_norm)] + [m[0](layer_norm(txt)) for m, txt in zip(txt_mods, txts)]

    outs = _joint_attention([self.img, *self.txt], xs, self.attend)
    img = img + img_mods[0].gated(self.img.attn.out(outs[0]))
    if self.img.dual:
      img = img + img_mods[2].gated(self.img.attn2(img_mods[2](img_norm), self.attend))
    img = img + img_mods[1].gated(self.img.mlp(img_mods[1](layer_norm(img))))
    img = constrain(img, "act_batch", "act_seq", "act_embed")
    if self.pre_only:
      return img, txts
    new_txts = []
    for stream, txt, m, o in zip(self.txt, txts, txt_mods, outs[1:]):
      txt = txt + m[0].gated(stream.attn.out(o))
      txt = txt + m[1].gated(stream.mlp(m[1](layer_norm(txt))))
      new_txts.append(constrain(txt, "act_batch", "act_seq", "act_embed"))
    return img, new_txts


class MMDiT(nnx.Module):
  """The SD3 transformer: patchify → joint blocks → adaLN final layer → unpatchify."""

  def __init__(self, cfg: MMDiTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt, p = cfg.width, get_dtype(cfg.dtype), cfg.patch_size
    self.x_embedder = dense(p * p * (cfg.in_channels + cfg.lowres_channels), d, ("patch", "embed"), rngs, dtype=dt)
    self.t_embedder = layers.MLPEmbedder(256, d, rngs, dt, init=nnx.initializers.normal(0.02))
    self.y_embedder = layers.MLPEmbedder(cfg.pooled_dim, d, rngs, dt)
    self.aug_embedder = layers.aug_embedder(cfg.lowres_channels, d, rngs, dt)
    self.context_embedder = nnx.List(
        [dense(cfg.context_dim, d, ("context_in", "embed"), rngs, dtype=dt) for _ in range(cfg.num_text_streams)])
    self.stages = nnx.List([
        Stack(lambda r, dual=dual: JointBlock(cfg, r, dual=dual), n, rngs) for _, n, dual in cfg.stages()])
    self.final_block = JointBlock(cfg, rngs, dual=(cfg.depth - 1) in cfg.dual_attention_layers,
                                  pre_only=True)
    self.norm_out = dense(d, 2 * d, ("embed", "modulation"), rngs, dtype=dt, zero=True)
    self.proj_out = dense(d, p * p * cfg.out_dim, ("embed", "patch"), rngs, dtype=dt, zero=True)

  def conditioning(self, t, pooled):
    """c = MLP(sinusoidal(1000·t)) + MLP(pooled), shape (B, D)."""
    dt = get_dtype(self.cfg.dtype)
    return self.t_embedder(layers.timestep_embedding(1000.0 * t).astype(dt)) + self.y_embedder(
        pooled.astype(dt))

  def split_context(self, context):
    if not self.cfg.text_streams:
      return [context]
    if sum(self.cfg.text_streams) != context.shape[1]:
      raise ValueError(f"context has {context.shape[1]} tokens; text_streams {self.cfg.text_streams} "
                       f"need {sum(self.cfg.text_streams)}")
    bounds = [0]
    for n in self.cfg.text_streams:
      bounds.append(bounds[-1] + n)
    return [context[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

  def __call__(self, latents, t, cond, *, skip_layers=None):
    """latents (B, h, w, C), t (B,) in [0, 1], cond {context (B, T, context_dim), pooled (B, pooled_dim)};
    skip_layers: layer indices passed through unchanged (SD3.5's skip-layer guidance)."""
    cfg = self.cfg
    context, pooled = cond["context"], cond["pooled"]
    dt = get_dtype(cfg.dtype)
    b, h, w, _ = latents.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
    pos = layers.sincos_pos_embed(cfg.width, h // p, w // p, cfg.pos_embed_max_size, cfg.sample_size // p)
    latents = layers.with_lowres(latents, cond)
    img = self.x_embedder(layers.patchify(latents.astype(dt), p)) + pos.astype(dt)  # (B, L, D)
    img = constrain(img, "act_batch", "act_seq", "act_embed")
    txts = [emb(c.astype(dt)) for emb, c in zip(self.context_embedder, self.split_context(context))]
    vec = layers.add_aug_level(self.aug_embedder, self.conditioning(t, pooled), cond)  # (B, D)
    active = None if skip_layers is None else jnp.ones((cfg.depth,), bool).at[jnp.asarray(
        skip_layers, jnp.int32)].set(False)
    carry = (img, txts)
    for stage, (first, n, _) in zip(self.stages, cfg.stages()):
      carry, _ = stage(carry, vec, remat=cfg.remat, remat_names=cfg.remat_names, scan=cfg.scan_layers,
                       active=None if active is None else active[first:first + n])
    img, _ = self.final_block(carry, vec)
    if active is not None:
      img = jnp.where(active[-1], img, carry[0])
    return layers.final_layer(self.norm_out, self.proj_out, img, vec, p, h, w, scale_first=True)
