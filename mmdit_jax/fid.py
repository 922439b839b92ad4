"""Sample-quality metrics: FID with a pluggable feature network, CMMD on CLIP embeddings, and a CLIP-score hook.

Feature networks map images in [−1, 1] (B, H, W, 3) to features (B, F):
- "inception": the standard FID network (encoders.inception; published weights converted from PyTorch),
- "demo": a small built-in network for the demo dataset — two fixed, seeded random conv layers (ReLU,
  2× average pooling) whose features are pooled globally and per quadrant (320-d), so that colour,
  shape and position all move the statistics. Random-feature FIDs rank models consistently but are not
  comparable with Inception FIDs; it needs no weights.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax import parallel

DEMO_SEED = 20260101


def _demo_weights():
  rng = np.random.default_rng(DEMO_SEED)
  w1 = rng.standard_normal((3, 3, 3, 32)) * np.sqrt(2 / 27)
  w2 = rng.standard_normal((3, 3, 32, 64)) * np.sqrt(2 / 288)
  return jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32)


def demo_features(images):
  """(B, H, W, 3) in [−1, 1] → (B, 320): global and 2×2-quadrant means of a fixed random conv net."""
  w1, w2 = _demo_weights()
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  pool = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
  x = pool(jax.nn.relu(conv(images.astype(jnp.float32), w1)))
  x = pool(jax.nn.relu(conv(x, w2)))  # (B, H/4, W/4, 64)
  b, h, w, c = x.shape
  quadrants = x.reshape(b, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(b, 4 * c)
  return jnp.concatenate([x.mean(axis=(1, 2)), quadrants], -1)


def inception_features(weights_path: str):
  from mmdit_jax.encoders import inception
  from mmdit_jax.model import api
  cfg, params = inception.load_inception(weights_path)
  return lambda images: api.apply(cfg, params, images)


def feature_network(name: str, inception_weights: str = "") -> Callable:
  """A jitted images → features function by name (closed set; errors list the valid names)."""
  if name == "demo":
    return jax.jit(demo_features)
  if name == "inception":
    if not inception_weights:
      raise ValueError("the inception FID network needs config.eval.inception_weights (the path of "
                       "pt_inception-2015-12-05-6726825d.pth or its .safetensors conversion)")
    return jax.jit(inception_features(inception_weights))
  raise ValueError(f"unknown FID feature network {name!r}; valid: ['demo', 'inception']")


def features(fn: Callable, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Features of many images in fixed-size batches (the last one padded), float64."""
  out = []
  for i in range(0, len(images), batch_size):
    chunk = np.asarray(images[i:i + batch_size], np.float32)
    out.append(np.asarray(fn(parallel.pad_batch(chunk, batch_size)), np.float64)[:len(chunk)])
  return np.concatenate(out)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  feats = np.asarray(feats, np.float64)
  if len(feats) < 2:
    raise ValueError(f"FID needs at least 2 samples, got {len(feats)}")
  return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, with tr (Σ₁Σ₂)^½ = Σ √eig(Σ₁^½ Σ₂ Σ₁^½) (symmetric,
  so eigh is stable where a general matrix square root of a singular product is not)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  vals, vecs = np.linalg.eigh(sigma1)
  root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(fn: Callable, generated: np.ndarray, reference: np.ndarray) -> float:
  return frechet_distance(*statistics(features(fn, generated)), *statistics(features(fn, reference)))


CMMD_SIGMA = 10.0  # the Gaussian RBF bandwidth of Jayasumana et al. (2024) on unit-norm CLIP embeddings
CMMD_SCALE = 1000.0  # their scale, for readable numbers


@jax.jit
def _mmd(x, y, sigma, scale):
  gamma = 1.0 / (2.0 * sigma ** 2)
  xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
  x_sq, y_sq = jnp.diag(xx), jnp.diag(yy)
  k_xx = jnp.mean(jnp.exp(-gamma * (x_sq[:, None] + x_sq[None, :] - 2 * xx)))
  k_yy = jnp.mean(jnp.exp(-gamma * (y_sq[:, None] + y_sq[None, :] - 2 * yy)))
  k_xy = jnp.mean(jnp.exp(-gamma * (x_sq[:, None] + y_sq[None, :] - 2 * xy)))
  return scale * (k_xx + k_yy - 2 * k_xy)


def cmmd(generated_embeddings, reference_embeddings, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
  """CMMD (Jayasumana et al. 2024, "Rethinking FID"): the squared MMD between two sets of CLIP image
  embeddings under a Gaussian RBF kernel, k(x, y) = exp(−‖x − y‖² / 2σ²), σ = 10, ×1000 — the reference
  implementation's estimator (means over every pair, the diagonals included) on L2-normalised embeddings,
  computed in JAX in float32 as the reference (google-research/cmmd, distance.py) computes it."""
  x, y = (np.asarray(e, np.float64) for e in (generated_embeddings, reference_embeddings))
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"CMMD needs two (n, d) embedding sets of one width, got {x.shape} and {y.shape}")
  x, y = (e / np.linalg.norm(e, axis=-1, keepdims=True) for e in (x, y))
  return float(_mmd(jnp.asarray(x), jnp.asarray(y), sigma, scale))


def clip_score(embed_images: Callable, embed_texts: Callable, images, prompts) -> float:
  """Mean of 100 · max(cos(image, text), 0) (Hessel et al. 2021) with user-supplied embedders."""
  a = np.asarray(embed_images(images), np.float64)
  b = np.asarray(embed_texts(list(prompts)), np.float64)
  if a.shape != b.shape:
    raise ValueError(f"CLIP-score embedders disagree: images {a.shape}, texts {b.shape}")
  cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return float(np.mean(100 * np.maximum(cos, 0)))


def load_clip_score_hook(spec: str):
  """'package.module:factory' → factory() = (embed_images, embed_texts); '' → None.

  The hook is how a CLIP (or SigLIP) model plugs into evaluation: the project ships no image tower."""
  if not spec:
    return None
  module, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"config.eval.clip_score={spec!r}; expected 'package.module:factory'")
  factory = getattr(importlib.import_module(module), name, None)
  if factory is None:
    raise ValueError(f"config.eval.clip_score: {module} has no {name!r}")
  return factory()
