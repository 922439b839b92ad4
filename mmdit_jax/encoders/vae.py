"""The SD3 autoencoder (diffusers AutoencoderKL, 16 latent channels), NHWC, and the latent normalisation.

`to_latents` / `from_latents` are the one place where SD3's latent scale (1.5305) and shift (0.0609)
are applied: datasets store normalised latents, z = (mean − shift) · scale, and sampling decodes
z / scale + shift. Attribute names follow diffusers, so the converter is a name map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model import api
from mmdit_jax.model.layers import get_dtype


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_groups: int = 32
  use_quant_conv: bool = False  # SD3: no 1×1 quant convs
  use_post_quant_conv: bool = False
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609
  dtype: str = "float32"

  def make(self, rngs: nnx.Rngs) -> "AutoencoderKL":
    return AutoencoderKL(self, rngs)

  def __post_init__(self):
    bad = [c for c in self.block_out_channels if c % self.norm_groups]
    if bad:
      raise ValueError(f"VAEConfig.block_out_channels {self.block_out_channels} are not all divisible by "
                       f"norm_groups={self.norm_groups}")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


SD3_VAE = VAEConfig()


def to_latents(cfg: VAEConfig, z):
  """Raw autoencoder latents → the normalised latents the diffusion model is trained on."""
  return (z - cfg.shift_factor) * cfg.scaling_factor


def from_latents(cfg: VAEConfig, latents):
  return latents / cfg.scaling_factor + cfg.shift_factor


def _conv(cin, cout, rngs, dt, k=3, stride=1, padding="SAME"):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dt, param_dtype=jnp.float32,
                  rngs=rngs)


def _norm(c, cfg, rngs):
  return nnx.GroupNorm(c, num_groups=cfg.norm_groups, epsilon=1e-6, use_fast_variance=False,
                       param_dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
  def __init__(self, cin, cout, cfg, rngs):
    dt = get_dtype(cfg.dtype)
    self.norm1, self.conv1 = _norm(cin, cfg, rngs), _conv(cin, cout, rngs, dt)
    self.norm2, self.conv2 = _norm(cout, cfg, rngs), _conv(cout, cout, rngs, dt)
    self.conv_shortcut = _conv(cin, cout, rngs, dt, k=1) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions, with a residual connection."""

  def __init__(self, c, cfg, rngs):
    dt = get_dtype(cfg.dtype)
    self.group_norm = _norm(c, cfg, rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = (
        nnx.Linear(c, c, dtype=dt, param_dtype=jnp.float32, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)  # (B, L, C)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, -1).astype(v.dtype), v)
    return x + self.to_out(y).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, c, cfg, rngs):
    self.resnets = nnx.List([ResnetBlock(c, c, cfg, rngs), ResnetBlock(c, c, cfg, rngs)])
    self.attentions = nnx.List([AttnBlock(c, cfg, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  def __init__(self, c, cfg, rngs):  # diffusers pads right/bottom by one, then a stride-2 3×3 conv
    self.conv = _conv(c, c, rngs, get_dtype(cfg.dtype), stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  def __init__(self, c, cfg, rngs):
    self.conv = _conv(c, c, rngs, get_dtype(cfg.dtype))

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest 2×


class DownBlock(nnx.Module):
  """DownEncoderBlock2D: resnets, then a downsampler except in the last block."""

  def __init__(self, cin, cout, n, resample: bool, cfg, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs) for i in range(n)])
    self.downsamplers = nnx.List([Downsample(cout, cfg, rngs)] if resample else [])

  def __call__(self, x):
    for layer in (*self.resnets, *self.downsamplers):
      x = layer(x)
    return x


class UpBlock(nnx.Module):
  """UpDecoderBlock2D: resnets, then an upsampler except in the last block."""

  def __init__(self, cin, cout, n, resample: bool, cfg, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs) for i in range(n)])
    self.upsamplers = nnx.List([Upsample(cout, cfg, rngs)] if resample else [])

  def __call__(self, x):
    for layer in (*self.resnets, *self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs):
    ch, dt = cfg.block_out_channels, get_dtype(cfg.dtype)
    self.conv_in = _conv(cfg.in_channels, ch[0], rngs, dt)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, i < len(ch) - 1, cfg, rngs)
        for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], cfg, rngs)
    self.conv_norm_out = _norm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, rngs, dt)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs):
    ch, dt = cfg.block_out_channels[::-1], get_dtype(cfg.dtype)
    self.conv_in = _conv(cfg.latent_channels, ch[0], rngs, dt)
    self.mid_block = MidBlock(ch[0], cfg, rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, i < len(ch) - 1, cfg, rngs)
        for i, c in enumerate(ch)])
    self.conv_norm_out = _norm(ch[-1], cfg, rngs)
    self.conv_out = _conv(ch[-1], cfg.in_channels, rngs, dt)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    c2 = 2 * cfg.latent_channels
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)
    dt = get_dtype(cfg.dtype)
    self.quant_conv = _conv(c2, c2, rngs, dt, k=1) if cfg.use_quant_conv else None
    self.post_quant_conv = (_conv(cfg.latent_channels, cfg.latent_channels, rngs, dt, k=1)
                            if cfg.use_post_quant_conv else None)

  def encode(self, images):
    """images (B, H, W, 3) in [−1, 1] → posterior (mean, logvar), each (B, H/f, W/f, C), float32."""
    moments = self.encoder(images.astype(get_dtype(self.cfg.dtype)))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Raw (unnormalised) latents (B, h, w, C) → images (B, h·f, w·f, 3), float32, about [−1, 1]."""
    z = z.astype(get_dtype(self.cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    return self.decode(self.encode(images)[0])


def encode_images(cfg: VAEConfig, params, images, noise=None):
  """Images in [−1, 1] → normalised latents: the posterior mean, or mean + σ · noise given `noise`
  (standard normal, latent-shaped; drawn by the caller so that it can be keyed per example)."""
  mean, logvar = api.apply(cfg, params, images, method="encode")
  z = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise
  return to_latents(cfg, z)


def decode_latents(cfg: VAEConfig, params, latents):
  """Normalised latents → images in [−1, 1] (clipped)."""
  return jnp.clip(api.apply(cfg, params, from_latents(cfg, latents), method="decode"), -1.0, 1.0)
