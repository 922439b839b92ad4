"""Timestep densities π(t) for training (SD3 §3.1) and the resolution-dependent shift (§5.3.2).

Every density has a sampler and a pdf; `sample_timesteps` and `timestep_pdf` look them up by name.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Density(NamedTuple):
  sample: Callable  # (key, shape, **params) -> t in (0, 1)
  pdf: Callable  # (t, **params) -> π(t)
  params: tuple[str, ...]  # the keyword parameters it takes
  defaults: dict


def _uniform_sample(key, shape):
  return jax.random.uniform(key, shape)


def _uniform_pdf(t):
  return jnp.ones_like(jnp.asarray(t, jnp.float32))


def _logit_normal_sample(key, shape, m, s):
  return jax.nn.sigmoid(m + s * jax.random.normal(key, shape))


def _logit_normal_pdf(t, m, s):
  t = jnp.asarray(t, jnp.float32)
  inside = (t > 0) & (t < 1)
  t_safe = jnp.where(inside, t, 0.5)  # π → 0 at both endpoints; keeps gradients finite too
  logit = jnp.log(t_safe) - jnp.log1p(-t_safe)
  pdf = jnp.exp(-0.5 * ((logit - m) / s) ** 2) / (s * math.sqrt(2 * math.pi) * t_safe * (1 - t_safe))
  return jnp.where(inside, pdf, 0.0)


def mode_map(u, s):
  """f_mode(u; s) = 1 − u − s (cos²(πu/2) − 1 + u): maps u ~ U(0, 1) to t; monotone for −1 ≤ s ≤ 2/(π − 2)."""
  return 1.0 - u - s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def _mode_sample(key, shape, s):
  return mode_map(jax.random.uniform(key, shape), s)


def _mode_inverse(t, s, iterations: int = 40):
  """u with f_mode(u) = t, by bisection (f_mode decreases from 1 at u = 0 to 0 at u = 1)."""
  t = jnp.asarray(t, jnp.float32)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = mode_map(mid, s) > t  # still left of the root
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (jnp.zeros_like(t), jnp.ones_like(t)))
  return 0.5 * (lo + hi)


def _mode_pdf(t, s):
  u = _mode_inverse(t, s)
  dfdu = -1.0 - s * (1.0 - 0.5 * jnp.pi * jnp.sin(jnp.pi * u))
  return 1.0 / jnp.abs(dfdu)


def _cosmap_sample(key, shape):
  u = jax.random.uniform(key, shape)
  return 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)


def _cosmap_pdf(t):
  t = jnp.asarray(t, jnp.float32)
  return 2.0 / (jnp.pi - 2.0 * jnp.pi * t + 2.0 * jnp.pi * t * t)


DENSITIES = {
    "uniform": Density(_uniform_sample, _uniform_pdf, (), {}),
    "logit_normal": Density(_logit_normal_sample, _logit_normal_pdf, ("m", "s"), {"m": 0.0, "s": 1.0}),
    "mode": Density(_mode_sample, _mode_pdf, ("s",), {"s": 1.29}),
    "cosmap": Density(_cosmap_sample, _cosmap_pdf, (), {}),
}

MODE_S_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def resolve_density(density: str, params: dict) -> tuple[Density, dict]:
  """Checks a density name and its parameters, filling defaults; errors name the valid choices."""
  if density not in DENSITIES:
    raise ValueError(f"unknown timestep density {density!r}; valid: {sorted(DENSITIES)}")
  spec = DENSITIES[density]
  unknown = set(params) - set(spec.params)
  if unknown:
    raise ValueError(
        f"density {density!r} takes parameters {list(spec.params) or 'none'}, got {sorted(unknown)}")
  full = {**spec.defaults, **params}
  if density == "logit_normal" and not float(full["s"]) > 0:
    raise ValueError(f"logit_normal needs s > 0, got s={full['s']}")
  if density == "mode" and not MODE_S_RANGE[0] <= float(full["s"]) <= MODE_S_RANGE[1] + 1e-9:
    raise ValueError(
        f"mode(s) is monotone only for {MODE_S_RANGE[0]} <= s <= 2/(pi-2) = {MODE_S_RANGE[1]:.4f}; "
        f"got s={full['s']}")
  return spec, full


def sample_timesteps(key, shape, density: str = "uniform", **params):
  """Draws t ~ π(t) of the named density; params: m, s (logit_normal) or s (mode)."""
  spec, full = resolve_density(density, params)
  return spec.sample(key, shape, **full)


def timestep_pdf(t, density: str = "uniform", **params):
  """π(t) of the named density."""
  spec, full = resolve_density(density, params)
  return spec.pdf(t, **full)


def shift_timesteps(t, alpha):
  """Resolution-dependent shift t' = αt / (1 + (α − 1)t); shifts rf log-SNR by −2 log α."""
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def unshift_timesteps(t_shifted, alpha):
  """Inverse of `shift_timesteps`."""
  return t_shifted / (alpha - (alpha - 1.0) * t_shifted)


def shifted_pdf(t_shifted, alpha, density: str = "uniform", **params):
  """Density of shift_timesteps(t, α) when t ~ π: π(g⁻¹(t')) · dg⁻¹/dt'."""
  jac = alpha / (alpha - (alpha - 1.0) * t_shifted) ** 2
  return timestep_pdf(unshift_timesteps(t_shifted, alpha), density, **params) * jac


def resolution_shift(num_pixels: float, base_pixels: float = 256 * 256) -> float:
  """α = √(m/n) for m target pixels against the n pixels the schedule was tuned at."""
  return math.sqrt(num_pixels / base_pixels)
