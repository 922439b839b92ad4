"""Analytic forward FLOPs per example (2 × multiply-adds), from the config alone.

XLA's cost analysis counts a scanned layer body once, so MFU needs these closed forms. Training costs
≈ 3 × forward (backward = 2 × forward). Embedding look-ups and element-wise work are not counted.
"""

from __future__ import annotations

from mmdit_jax.model.dit import DiTConfig
from mmdit_jax.model.mmdit import MMDiTConfig
from mmdit_jax.model.unet import UNetConfig


def _dense_stream_macs(tokens, d, f):
  """q, k, v, output projection and MLP of `tokens` tokens."""
  return tokens * (4 * d * d + 2 * d * f)


def mmdit_forward_macs(cfg: MMDiTConfig, h: int, w: int, text_tokens: int) -> int:
  d, f, p = cfg.width, cfg.mlp_width, cfg.patch_size
  n_img = (h // p) * (w // p)
  s = n_img + text_tokens
  macs = n_img * p * p * (cfg.in_channels + cfg.lowres_channels) * d + text_tokens * cfg.context_dim * d  # embedders
  macs += 256 * d + d * d + cfg.pooled_dim * d + d * d  # t and pooled MLPs
  for i in range(cfg.depth):
    dual = i in cfg.dual_attention_layers
    last = i == cfg.depth - 1
    macs += d * (9 if dual else 6) * d  # image modulation
    macs += _dense_stream_macs(n_img, d, f)
    macs += 2 * s * s * d  # joint attention: QKᵀ and AV over all S = L + T tokens
    if last:  # pre-only text: (scale, shift) modulation and q, k, v
      macs += d * 2 * d * cfg.num_text_streams + text_tokens * 3 * d * d
    else:
      macs += d * 6 * d * cfg.num_text_streams + _dense_stream_macs(text_tokens, d, f)
    if dual:
      macs += n_img * 4 * d * d + 2 * n_img * n_img * d
  macs += d * 2 * d + n_img * d * p * p * cfg.out_dim  # final adaLN and projection
  return macs


def dit_forward_macs(cfg: DiTConfig, h: int, w: int, text_tokens: int = 0) -> int:
  d, p = cfg.width, cfg.patch_size
  f = int(d * cfg.mlp_ratio)
  n_img = (h // p) * (w // p)
  text = text_tokens if cfg.conditioning == "text" else 0
  macs = n_img * p * p * (cfg.in_channels + cfg.lowres_channels) * d + 256 * d + d * d
  if cfg.conditioning == "text":
    macs += text * cfg.context_dim * d + cfg.pooled_dim * d + d * d
  prefix = {"in_context": 2 + text, "cross_attn": 0}.get(cfg.block, text)
  s = n_img + prefix
  per_block = _dense_stream_macs(s, d, f) + 2 * s * s * d
  if cfg.adaptive:
    per_block += d * (4 if cfg.block == "adaln" else 6) * d
  if cfg.block == "cross_attn":
    ctx = text if cfg.conditioning == "text" else 2
    per_block += s * 2 * d * d + ctx * 2 * d * d + 2 * s * ctx * d
  macs += cfg.depth * per_block
  if cfg.long_skip:
    macs += (cfg.depth // 2) * s * 2 * d * d
  macs += d * 2 * d + n_img * d * p * p * cfg.out_dim
  return macs


def unet_forward_macs(cfg: UNetConfig, h: int, w: int, text_tokens: int) -> int:
  """Multiply-adds of one forward at h × w with `text_tokens` context tokens (convs, attention, dense)."""
  conv = lambda hh, ww, cin, cout, k=3: hh * ww * k * k * cin * cout
  res = lambda hh, ww, cin, cout: (conv(hh, ww, cin, cout) + conv(hh, ww, cout, cout) + cfg.emb_dim * 2 * cout
                                   + (conv(hh, ww, cin, cout, 1) if cin != cout else 0))

  def attn(i, hh, ww, c, self_attn=None, cross=None):
    self_attn = cfg.attn_levels[i] if self_attn is None else self_attn
    cross = cfg.cross_attn_levels[i] if cross is None else cross
    n, f = hh * ww, int(c * cfg.ff_mult)
    macs = (n * 2 * c * f) if (self_attn or cross) else 0
    text_kv = text_tokens * 2 * cfg.channels * c
    if self_attn and cross and cfg.text_attention == "joint":
      return macs + n * 4 * c * c + text_kv + 2 * n * (n + text_tokens) * c
    if self_attn:
      macs += n * 4 * c * c + 2 * n * n * c
    if cross:
      macs += n * 2 * c * c + text_kv + 2 * n * text_tokens * c
    return macs

  c0, widths = cfg.channels, cfg.level_widths
  e = cfg.emb_dim
  macs = conv(h, w, cfg.in_channels + cfg.lowres_channels, c0) + conv(h, w, c0, cfg.out_dim)
  macs += (c0 * e + e * e) * (2 if cfg.lowres_channels else 1) + cfg.pooled_dim * e + e * e
  macs += text_tokens * cfg.context_dim * c0
  size = lambda i: (h >> i, w >> i)
  if cfg.layout == "efficient":
    prev = [c0, *widths[:-1]]
    for i, c in enumerate(widths):
      hh, ww = size(i)
      macs += conv(hh, ww, prev[i], c) if i else 0
      n = cfg.num_res_blocks[i]
      macs += (2 * n - 1) * res(hh, ww, c, c) + res(hh, ww, 2 * c, c)
      macs += (2 * n if cfg.attn_every_block else 2) * attn(i, hh, ww, c)
      macs += conv(2 * hh, 2 * ww, c, prev[i]) if i else 0
    return macs
  ch, skips = c0, [c0]
  for i, c in enumerate(widths):
    hh, ww = size(i)
    for _ in range(cfg.num_res_blocks[i]):
      macs += res(hh, ww, ch, c) + attn(i, hh, ww, c)
      ch = c
      skips.append(ch)
    if i < len(widths) - 1:
      macs += conv(hh // 2, ww // 2, ch, ch)
      skips.append(ch)
  hh, ww = size(len(widths) - 1)
  macs += 2 * res(hh, ww, ch, ch) + attn(len(widths) - 1, hh, ww, ch, True, cfg.cross_attn_levels[-1])
  for i in reversed(range(len(widths))):
    hh, ww = size(i)
    for j in range(cfg.num_res_blocks[i] + 1):
      macs += res(hh, ww, ch + skips.pop(), widths[i]) + attn(i, hh, ww, widths[i])
      ch = widths[i]
      if i and j == cfg.num_res_blocks[i]:
        macs += conv(2 * hh, 2 * ww, ch, ch)
  return macs


def forward_flops(cfg, h: int, w: int, text_tokens: int = 0) -> float:
  """Forward FLOPs per example for latents of h × w and `text_tokens` context tokens."""
  if isinstance(cfg, MMDiTConfig):
    return 2.0 * mmdit_forward_macs(cfg, h, w, text_tokens)
  if isinstance(cfg, DiTConfig):
    return 2.0 * dit_forward_macs(cfg, h, w, text_tokens)
  if isinstance(cfg, UNetConfig):
    return 2.0 * unet_forward_macs(cfg, h, w, text_tokens)
  raise TypeError(f"no FLOP formula for {type(cfg).__name__}")


def train_flops(cfg, h: int, w: int, text_tokens: int = 0) -> float:
  """Forward + backward FLOPs per example (≈ 3 × forward; remat recomputation not counted)."""
  return 3.0 * forward_flops(cfg, h, w, text_tokens)
