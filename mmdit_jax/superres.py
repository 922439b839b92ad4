"""Super-resolution stages of a cascade (Imagen §2.5): the low-resolution conditioning and its noise-conditioning
augmentation, for training, validation and sampling alike.

A stage with config.sr.factor = k learns p(x | text, lowres): lowres is its target x downsampled k× (the mean of
each k × k block — the pairs come from one image, in whatever space the data is: pixels or latents), upsampled
back to x's size (config.sr.upsample) and corrupted by the stage's own forward process at a level t_aug:
lowres_aug = a(t_aug) · up(lowres) + b(t_aug) · ε. The model is told t_aug (an embedding added to the timestep's).
Training draws t_aug ~ U(0, sr.aug_max), so the stage learns to distrust the artefacts of the stage below it;
validation and sampling use the fixed sr.aug_level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax.config import TrainConfig


def downsample(x, factor: int):
  """(B, H, W, C) → (B, H/k, W/k, C): the mean of each k × k block."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"a {h}x{w} target cannot be downsampled {factor}× (config.sr.factor): sides must divide")
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x, hw, method: str = "bilinear"):
  """(B, h, w, C) → (B, H, W, C) with jax.image.resize (nearest | bilinear | bicubic; antialiased)."""
  return jax.image.resize(x.astype(jnp.float32), (x.shape[0], *hw, x.shape[-1]), method)


def condition(cfg: TrainConfig, lowres, aug_level, noise) -> dict:
  """The model's {lowres, aug_level}: lowres (B, h, w, C) upsampled to noise's (B, H, W, C) and corrupted by the
  stage's forward process at aug_level (B,) with that noise."""
  up = upsample(lowres, noise.shape[1:3], cfg.sr.upsample)
  return {"lowres": cfg.formulation.perturb(up, noise.astype(jnp.float32), aug_level), "aug_level": aug_level}


def _batch_condition(cfg: TrainConfig, batch: dict, level, key) -> dict:
  x = batch["latent"].astype(jnp.float32)
  return {**batch, **condition(cfg, downsample(x, cfg.sr.factor), level, jax.random.normal(key, x.shape))}


def training_condition(cfg: TrainConfig, batch: dict, key) -> dict:
  """The batch with its SR conditioning: lowres from its own latents, t_aug ~ U(0, sr.aug_max)."""
  k_level, k_noise = jax.random.split(key)
  level = jax.random.uniform(k_level, batch["latent"].shape[:1]) * cfg.sr.aug_max
  return _batch_condition(cfg, batch, level, k_noise)


def fixed_condition(cfg: TrainConfig, batch: dict, key) -> dict:
  """The batch with its SR conditioning at the fixed level sr.aug_level (validation)."""
  return _batch_condition(cfg, batch, jnp.full(batch["latent"].shape[:1], cfg.sr.aug_level, jnp.float32), key)


def sampling_condition(cfg: TrainConfig, lowres: np.ndarray, noise: np.ndarray, aug_level: float | None = None) -> dict:
  """Host arrays {lowres, aug_level} for sampling N images from lowres (N, h, w, C) — ground truth downsampled,
  or the stage below's samples — at aug_level (default sr.aug_level), with augmentation noise (N, H, W, C)."""
  level = cfg.sr.aug_level if aug_level is None else aug_level
  levels = jnp.full((len(lowres),), level, jnp.float32)
  run = jax.jit(lambda lr, lv, n: condition(cfg, lr, lv, n))
  out = run(jnp.asarray(lowres, jnp.float32), levels, jnp.asarray(noise, jnp.float32))
  return {k: np.asarray(v) for k, v in out.items()}
