"""Imagen's U-Nets (Saharia et al. 2022, App. B and F): the Efficient U-Net of its super-resolution stages and
the DDPM-ordered U-Net of its 64² base model, text-conditioned as Imagen conditions them.

Two layouts of the same blocks:
- "efficient" (Imagen Fig. A.27–A.30): per level a DBlock — downsampling *before* the level's convolutions
  (a stride-2 conv to the level's width), its residual blocks (more of them at lower resolutions), then
  attention — and a UBlock — the DBlock's output concatenated (one skip per level, scaled by 1/√2), residual
  blocks, attention, and upsampling *after* them. Cheaper at high resolution: the many blocks run on few pixels.
- "ddpm" (Nichol & Dhariwal's U-Net, Imagen's base model): a skip after every residual block, downsampling
  at the end of a level, a middle block (res → attention → res), num_res_blocks + 1 blocks per up level.

Every residual block takes the conditioning embedding (FiLM: GroupNorm · (1 + scale) + shift), which is
MLP(sinusoidal(t)) + MLP(pooled text) [+ MLP(sinusoidal(augmentation level)) for super-resolution].
Attention levels run a transformer block on the level's pixels as tokens: self-attention (optional),
cross-attention to the text sequence (projected once to `channels` wide; an optional `context_mask` keeps
padding tokens out), MLP. Super-resolution: the upsampled, noise-augmented low-resolution image is
concatenated to the input channels (`lowres_channels`). Same `forward` contract as every backbone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import layers
from mmdit_jax.model.attention import Attention, biased_attention, get_attention
from mmdit_jax.model.layers import ZERO, constrain, dense, get_dtype
from mmdit_jax.model.stack import Stack, check_remat, remat_policy

LAYOUTS = ("efficient", "ddpm")
TEXT_ATTENTION = ("cross", "joint")
TEXT_COND = ("context", "pooled")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  channels: int = 128  # width of the first level (Imagen 64→256 and 256→1024: 128; base 64²: 512)
  channel_mult: tuple[int, ...] = (1, 2, 4, 8)  # level i is channels · channel_mult[i] wide, at 1/2^i size
  num_res_blocks: tuple[int, ...] = (2, 4, 8, 8)  # residual blocks per level
  attn_levels: tuple[bool, ...] = (False, False, False, True)  # self-attention at these levels
  cross_attn_levels: tuple[bool, ...] = (False, False, False, True)  # cross-attention to the text
  num_heads: int = 8  # attention heads (head dim = the level's width / num_heads)
  ff_mult: float = 2.0  # the attention blocks' MLP width / level width (0: no MLP, as DDPM's attention blocks)
  # "cross": a cross-attention layer after the self-attention; "joint": the text tokens join the keys and
  # values of the self-attention (GLIDE's and the DDPM U-Net's text conditioning) — cross-attention alone
  # where a level has no self-attention
  text_attention: str = "cross"
  attn_every_block: bool = False  # efficient layout: attention after every residual block of an attention
  # level (the ddpm layout always does), instead of once per level
  layout: str = "efficient"  # one of LAYOUTS
  skip_scale: float = 2 ** -0.5  # the U-Net's skip connections are multiplied by this before concatenation
  norm_groups: int = 32  # GroupNorm groups (every level's width must divide by it)
  in_channels: int = 3  # pixels (Imagen is pixel-space) or latent channels
  out_channels: int | None = None  # None → in_channels
  lowres_channels: int = 0  # super-resolution: channels of the upsampled low-res input concatenated (0: base)
  context_dim: int = 4096  # width of the text sequence (T5-XXL: 4096)
  pooled_dim: int = 4096  # width of the pooled text vector added to the time embedding
  input_size: int = 64  # the native sample side (pixels or latent cells)
  dtype: str = "float32"
  attention: str = "xla"  # kernel (attention.ATTENTION_IMPLS); a context_mask uses the masked einsum
  splash_block_q: int = 512
  splash_block_kv: int = 512
  remat: str = "none"  # stack.REMAT_POLICIES, applied per residual / attention block
  remat_names: tuple[str, ...] = ()
  # Scan each level's run of same-width residual blocks (layout "efficient"): one compiled block per level.
  # Off by default: XLA's CPU backend runs conv gradients inside a scan ~7× slower (a demo U-Net's gradient:
  # 9.6 s scanned, 1.4 s unrolled), and a U-Net has few blocks per level to save compile time on.
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("channel_mult", "num_res_blocks", "attn_levels", "cross_attn_levels", "remat_names"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    levels = len(self.channel_mult)
    if levels < 1:
      raise ValueError("channel_mult needs at least one level")
    for name in ("num_res_blocks", "attn_levels", "cross_attn_levels"):
      if len(getattr(self, name)) != levels:
        raise ValueError(f"{name} has {len(getattr(self, name))} entries for {levels} levels (channel_mult "
                         f"{self.channel_mult}): one per level")
    if self.layout not in LAYOUTS:
      raise ValueError(f"unknown U-Net layout {self.layout!r}; valid: {list(LAYOUTS)}")
    if self.text_attention not in TEXT_ATTENTION:
      raise ValueError(f"unknown text_attention {self.text_attention!r}; valid: {list(TEXT_ATTENTION)}")
    if self.ff_mult < 0:
      raise ValueError(f"ff_mult must be >= 0 (0: no MLP), got {self.ff_mult}")
    if min(self.num_res_blocks) < 1:
      raise ValueError(f"num_res_blocks {self.num_res_blocks}: at least one per level")
    for c in self.level_widths:
      if c % self.norm_groups:
        raise ValueError(f"level width {c} is not divisible by norm_groups {self.norm_groups}")
    for c, a, x in zip(self.level_widths, self.attn_levels, self.cross_attn_levels):
      if (a or x) and c % self.num_heads:
        raise ValueError(f"level width {c} is not divisible by num_heads {self.num_heads}")
    get_dtype(self.dtype)
    get_attention(self.attention, self.splash_block_q, self.splash_block_kv)
    check_remat(self.remat, self.remat_names)

  @property
  def level_widths(self) -> tuple[int, ...]:
    return tuple(self.channels * m for m in self.channel_mult)

  @property
  def emb_dim(self) -> int:
    return 4 * self.channels  # the conditioning embedding's width (as DDPM / ADM)

  @property
  def width(self) -> int:
    return self.channels

  @property
  def heads(self) -> int:
    return self.num_heads

  @property
  def patch_size(self) -> int:
    """The side every input must be a multiple of (2^(levels − 1)); named as the other backbones' patch."""
    return 2 ** (len(self.channel_mult) - 1)

  @property
  def out_dim(self) -> int:
    return self.out_channels or self.in_channels

  cond_features = TEXT_COND
  optional_features = ("context_mask",)  # passed to the model when the batch has them

  def make(self, rngs: nnx.Rngs) -> "UNet":
    return UNet(self, rngs)

  def null_cond(self, text_null: dict) -> dict:
    """The unconditional input of classifier-free guidance: the empty prompt's embeddings."""
    return {k: text_null[k] for k in TEXT_COND}


# Imagen's published models (App. F): the 2B base U-Net at 64², the 600M 64→256 and the 400M 256→1024
# Efficient U-Nets, T5-XXL conditioned (4096 wide), at the paper's widths, levels, blocks and attention
# resolutions. What the paper leaves open is chosen as the DDPM U-Net and GLIDE do it — attention blocks
# without an MLP, the text joined to the self-attention's keys and values — and the counts then land on the
# paper's (model_test: 2014.5M for 2B, 586.0M for 600M). The 256→1024 model's 400M cannot be reached at the
# widths it shares with 64→256: without self-attention the same levels and blocks count 460.5M.
IMAGEN_UNETS = {
    "base64": dict(channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3), layout="ddpm",
                   attn_levels=(False, True, True, True), cross_attn_levels=(False, True, True, True),
                   ff_mult=0.0, text_attention="joint", input_size=64),
    "sr256": dict(channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8), layout="efficient",
                  attn_levels=(False, False, False, True), cross_attn_levels=(False, False, False, True),
                  attn_every_block=True, text_attention="joint", lowres_channels=3, input_size=256),
    "sr1024": dict(channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8), layout="efficient",
                   attn_levels=(False, False, False, False), cross_attn_levels=(False, False, False, True),
                   lowres_channels=3, input_size=1024),
}
IMAGEN_PARAMS = {"base64": 2.0e9, "sr256": 600e6, "sr1024": 400e6}  # the paper's stated sizes


def imagen_unet(name: str, **overrides) -> UNetConfig:
  """One of Imagen's U-Nets by name (IMAGEN_UNETS), e.g. 'sr256'."""
  if name not in IMAGEN_UNETS:
    raise ValueError(f"unknown Imagen U-Net {name!r}; valid: {sorted(IMAGEN_UNETS)}")
  return UNetConfig(**{**IMAGEN_UNETS[name], **overrides})


def _conv(cin, cout, rngs, dt, axes, *, kernel=3, stride=1, zero=False):
  init = ZERO if zero else nnx.initializers.lecun_normal()
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding="SAME", dtype=dt,
                  param_dtype=jnp.float32, kernel_init=nnx.with_partitioning(init, (None, None, *axes)),
                  bias_init=nnx.with_partitioning(ZERO, axes[-1:]), rngs=rngs)


def _images(x):
  return constrain(x, "act_batch", None, None, "act_embed")


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, C/groups) with a learnable scale and bias, in float32."""

  def __init__(self, c, groups, rngs, axis="embed", eps=1e-5):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), (axis,))(
        rngs.params(), (c,), jnp.float32))
    self.bias = nnx.Param(nnx.with_partitioning(ZERO, (axis,))(rngs.params(), (c,), jnp.float32))

  def __call__(self, x):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, (1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), (1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
  """GroupNorm → SiLU → conv → FiLM(emb) on GroupNorm → SiLU → conv (zero-init), plus the (1×1-projected) input."""

  def __init__(self, cfg: UNetConfig, cin: int, cout: int, rngs):
    dt, g = get_dtype(cfg.dtype), cfg.norm_groups
    self.norm1 = GroupNorm(cin, g, rngs, "embed")
    self.conv1 = _conv(cin, cout, rngs, dt, ("embed", "mlp"))
    self.film = dense(cfg.emb_dim, 2 * cout, ("embed", "modulation"), rngs, dtype=dt)
    self.norm2 = GroupNorm(cout, g, rngs, "mlp")
    self.conv2 = _conv(cout, cout, rngs, dt, ("mlp", "embed"), zero=True)
    self.proj = _conv(cin, cout, rngs, dt, ("embed", "mlp"), kernel=1) if cin != cout else None

  def __call__(self, x, emb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    scale, shift = jnp.split(self.film(jax.nn.silu(emb)), 2, axis=-1)  # (B, C) each
    h = self.norm2(h) * (1 + scale[:, None, None]) + shift[:, None, None]
    h = self.conv2(jax.nn.silu(h))
    return _images(h + (x if self.proj is None else self.proj(x)))


class AttnBlock(nnx.Module):
  """A level's pixels as tokens: [self-attention] → [cross-attention to the text] → MLP, each pre-LN residual."""

  def __init__(self, cfg: UNetConfig, c: int, rngs, *, self_attn: bool, cross: bool):
    dt = get_dtype(cfg.dtype)
    self.attend = get_attention(cfg.attention, cfg.splash_block_q, cfg.splash_block_kv)
    self.norm_attn = layers.LayerNorm(c, rngs) if self_attn else None
    self.attn = Attention(c, cfg.num_heads, rngs, dtype=dt) if self_attn else None
    self.joint = cfg.text_attention == "joint" and self_attn and cross
    if self.joint:  # the text's own key and value projections, joined to the image's in one attention
      self.text_k = dense(cfg.channels, c, ("embed", "heads"), rngs, dtype=dt)
      self.text_v = dense(cfg.channels, c, ("embed", "heads"), rngs, dtype=dt)
    cross = cross and not self.joint
    self.norm_cross = layers.LayerNorm(c, rngs) if cross else None
    self.cross = Attention(c, cfg.num_heads, rngs, dtype=dt, kv_dim=cfg.channels) if cross else None
    self.norm_mlp = layers.LayerNorm(c, rngs) if cfg.ff_mult else None
    self.mlp = layers.MLP(c, int(c * cfg.ff_mult), rngs, dt) if cfg.ff_mult else None

  def __call__(self, x, context, bias):
    b, h, w, c = x.shape
    t = constrain(x.reshape(b, h * w, c), "act_batch", "act_seq", "act_embed")
    if self.joint:
      t = t + self._joint(self.norm_attn(t), context, bias)
    elif self.attn is not None:
      t = t + self.attn(self.norm_attn(t), self.attend)
    if self.cross is not None:
      attend = self.attend if bias is None else (lambda q, k, v: biased_attention(q, k, v, bias))
      t = t + self.cross(self.norm_cross(t), attend, context)
    if self.mlp is not None:
      t = t + self.mlp(self.norm_mlp(t))
    return _images(t.reshape(b, h, w, c))


  def _joint(self, t, context, bias):
    """Self-attention whose keys and values are the image tokens' followed by the text tokens'."""
    q, k, v = self.attn.qkv(t)
    split = lambda y: y.reshape(*y.shape[:2], self.attn.heads, -1)
    k = jnp.concatenate([k, split(self.text_k(context))], axis=1)
    v = jnp.concatenate([v, split(self.text_v(context))], axis=1)
    if bias is None:
      o = self.attend(q, k, v)
    else:  # padding tokens masked; every image key kept
      image = jnp.zeros((*bias.shape[:3], t.shape[1]), bias.dtype)
      o = biased_attention(q, k, v, jnp.concatenate([image, bias], axis=-1))
    return self.attn.out(o.reshape(*t.shape[:-1], -1))


class LevelBlock(nnx.Module):
  """A residual block, followed by an attention block where the level has one per residual block."""

  def __init__(self, cfg: UNetConfig, level: int, cin: int, cout: int, rngs, *, attn: bool):
    self.res = ResBlock(cfg, cin, cout, rngs)
    self.attn = _attn(cfg, level, cout, rngs) if attn else None

  def __call__(self, x, emb, context, bias):
    x = self.res(x, emb)
    return x if self.attn is None else self.attn(x, context, bias)


class Downsample(nnx.Module):
  def __init__(self, cfg, cin, cout, rngs):
    self.conv = _conv(cin, cout, rngs, get_dtype(cfg.dtype), ("embed", "mlp"), stride=2)

  def __call__(self, x):
    return _images(self.conv(x))


class Upsample(nnx.Module):
  """Nearest-neighbour 2× then a 3×3 conv."""

  def __init__(self, cfg, cin, cout, rngs):
    self.conv = _conv(cin, cout, rngs, get_dtype(cfg.dtype), ("embed", "mlp"))

  def __call__(self, x):
    return _images(self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)))


def _attn(cfg, i, c, rngs):
  a, x = cfg.attn_levels[i], cfg.cross_attn_levels[i]
  return AttnBlock(cfg, c, rngs, self_attn=a, cross=x) if (a or x) else None


class UNet(nnx.Module):
  """Imagen's U-Net (see the module docstring): (z_t [‖ low-res], t, text [, aug level]) → prediction."""

  def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, c0, widths = get_dtype(cfg.dtype), cfg.channels, cfg.level_widths
    self.conv_in = _conv(cfg.in_channels + cfg.lowres_channels, c0, rngs, dt, ("patch", "embed"))
    self.t_embedder = layers.MLPEmbedder(c0, cfg.emb_dim, rngs, dt)
    self.y_embedder = layers.MLPEmbedder(cfg.pooled_dim, cfg.emb_dim, rngs, dt)
    self.aug_embedder = layers.MLPEmbedder(c0, cfg.emb_dim, rngs, dt) if cfg.lowres_channels else None
    self.context_embedder = dense(cfg.context_dim, c0, ("context_in", "embed"), rngs, dtype=dt)
    levels = range(len(widths))
    if cfg.layout == "efficient":
      prev = [c0, *widths[:-1]]
      each = lambda i: cfg.attn_every_block and (cfg.attn_levels[i] or cfg.cross_attn_levels[i])
      block = lambda i, cin: (lambda r: LevelBlock(cfg, i, cin, widths[i], r, attn=each(i)))
      once = lambda i: None if each(i) else _attn(cfg, i, widths[i], rngs)
      self.down = nnx.List([Downsample(cfg, prev[i], widths[i], rngs) if i else None for i in levels])
      self.down_blocks = nnx.List([Stack(block(i, widths[i]), cfg.num_res_blocks[i], rngs) for i in levels])
      self.down_attn = nnx.List([once(i) for i in levels])
      self.up_first = nnx.List([block(i, 2 * widths[i])(rngs) for i in levels])
      self.up_blocks = nnx.List([Stack(block(i, widths[i]), cfg.num_res_blocks[i] - 1, rngs)
                                 if cfg.num_res_blocks[i] > 1 else None for i in levels])
      self.up_attn = nnx.List([once(i) for i in levels])
      self.up = nnx.List([Upsample(cfg, widths[i], prev[i], rngs) if i else None for i in levels])
      out_width = c0
    else:  # ddpm: a skip per block, middle block, num_res_blocks + 1 blocks per up level
      down, skips, ch = [], [c0], c0
      for i in levels:
        for _ in range(cfg.num_res_blocks[i]):
          down.append((ResBlock(cfg, ch, widths[i], rngs), _attn(cfg, i, widths[i], rngs), None))
          ch = widths[i]
          skips.append(ch)
        if i < len(widths) - 1:
          down.append((None, None, Downsample(cfg, ch, ch, rngs)))
          skips.append(ch)
      self.down_path = nnx.List([nnx.List(list(d)) for d in down])
      self.mid = nnx.List([ResBlock(cfg, ch, ch, rngs),
                           AttnBlock(cfg, ch, rngs, self_attn=True, cross=cfg.cross_attn_levels[-1]),
                           ResBlock(cfg, ch, ch, rngs)])
      up = []
      for i in reversed(levels):
        for j in range(cfg.num_res_blocks[i] + 1):
          block = ResBlock(cfg, ch + skips.pop(), widths[i], rngs)
          ch = widths[i]
          up.append((block, _attn(cfg, i, ch, rngs),
                     Upsample(cfg, ch, ch, rngs) if i and j == cfg.num_res_blocks[i] else None))
      self.up_path = nnx.List([nnx.List(list(u)) for u in up])
      out_width = ch
    self.norm_out = GroupNorm(out_width, cfg.norm_groups, rngs)
    self.conv_out = _conv(out_width, cfg.out_dim, rngs, dt, ("embed", "patch"), zero=True)

  def _run(self, block, *args):
    """A residual or attention block, under the config's remat policy."""
    cfg = self.cfg
    if cfg.remat == "none":
      return block(*args)
    graphdef, state = nnx.split(block)  # a pure function of the block's state, as Stack's scan body is

    def pure(state, *args):
      return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(pure, policy=remat_policy(cfg.remat, cfg.remat_names))(state, *args)

  def _join(self, h, skip):
    """The up path's input: h and the skip connection scaled by skip_scale, concatenated on channels."""
    return jnp.concatenate([h, skip * jnp.asarray(self.cfg.skip_scale, h.dtype)], axis=-1)

  def __call__(self, x, t, cond):
    """x (B, H, W, C) and t (B,) in [0, 1]; cond {context (B, T, ·), pooled (B, ·)[, context_mask (B, T)]
    [, lowres (B, H, W, C_lr), aug_level (B,)]} → (B, H, W, out) float32."""
    cfg = self.cfg
    dt = get_dtype(cfg.dtype)
    b, h, w, _ = x.shape
    if h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(f"input {h}x{w} is not divisible by 2^(levels − 1) = {cfg.patch_size}")
    x = layers.with_lowres(x, cond)
    emb = self.t_embedder(layers.timestep_embedding(1000.0 * t, cfg.channels).astype(dt))
    emb = layers.add_aug_level(self.aug_embedder, emb + self.y_embedder(cond["pooled"].astype(dt)), cond, cfg.channels)
    context = self.context_embedder(cond["context"].astype(dt))  # (B, T, channels)
    mask = cond.get("context_mask")
    bias = None if mask is None else jnp.where(mask[:, None, None, :], 0.0, -1e9).astype(jnp.float32)
    h_ = _images(self.conv_in(x.astype(dt)))
    run = dict(remat=cfg.remat, remat_names=cfg.remat_names, scan=cfg.scan_layers)
    if cfg.layout == "efficient":
      skips = []
      for i in range(len(cfg.channel_mult)):
        if self.down[i] is not None:
          h_ = self.down[i](h_)
        h_, _ = self.down_blocks[i](h_, emb, context, bias, **run)
        if self.down_attn[i] is not None:
          h_ = self._run(self.down_attn[i], h_, context, bias)
        skips.append(h_)
      for i in reversed(range(len(cfg.channel_mult))):
        h_ = self._run(self.up_first[i], self._join(h_, skips.pop()), emb, context, bias)
        if self.up_blocks[i] is not None:
          h_, _ = self.up_blocks[i](h_, emb, context, bias, **run)
        if self.up_attn[i] is not None:
          h_ = self._run(self.up_attn[i], h_, context, bias)
        if self.up[i] is not None:
          h_ = self.up[i](h_)
    else:
      skips = [h_]
      for res, attn, down in self.down_path:
        if down is not None:
          h_ = down(h_)
        else:
          h_ = self._run(res, h_, emb)
          if attn is not None:
            h_ = self._run(attn, h_, context, bias)
        skips.append(h_)
      res1, attn, res2 = self.mid
      h_ = self._run(res2, self._run(attn, self._run(res1, h_, emb), context, bias), emb)
      for res, attn, up in self.up_path:
        h_ = self._run(res, self._join(h_, skips.pop()), emb)
        if attn is not None:
          h_ = self._run(attn, h_, context, bias)
        if up is not None:
          h_ = up(h_)
    return self.conv_out(jax.nn.silu(self.norm_out(h_))).astype(jnp.float32)
