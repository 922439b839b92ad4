"""Exact conversions between what a network can predict, for any forward process.

Given z_t = a x + b ε, every prediction type is an invertible affine function of (x, ε) at fixed z_t:
  x        the clean latents
  eps      the noise ε
  v        v = a ε − b x                  (Salimans & Ho; "v/linear", "v/cos")
  velocity u = a' x + b' ε = dz_t/dt       (the flow's velocity; for rf, ε − x)
  F        EDM's F with σ_data preconditioning: x = c_skip z' + c_out F, z' = z/a, σ = b/a
Samplers and evaluation turn any model output into (x̂, ε̂) with `to_x_eps` and back with `from_x_eps`.
"""

from __future__ import annotations

import jax.numpy as jnp

from mmdit_jax.flow.paths import Process, bcast

SIGMA_DATA = 0.5
PREDICTIONS = ("x", "eps", "v", "velocity", "F")


def edm_preconditioning(sigma, sigma_data: float = SIGMA_DATA):
  """(c_skip, c_out, c_in) of Karras et al. (2022), Table 1."""
  s2, d2 = sigma * sigma, sigma_data * sigma_data
  return d2 / (s2 + d2), sigma * sigma_data / jnp.sqrt(s2 + d2), 1.0 / jnp.sqrt(s2 + d2)


def _check(prediction):
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")


def to_x_eps(process: Process, prediction: str, out, z, t):
  """Converts a prediction `out` at (z_t, t) into (x̂, ε̂). t has shape (B,)."""
  _check(prediction)
  a, b = bcast(process.a(t), z), bcast(process.b(t), z)
  if prediction == "x":
    x = out
  elif prediction == "eps":
    return (z - b * out) / a, out
  elif prediction == "v":
    norm = a * a + b * b
    x = (a * z - b * out) / norm
  elif prediction == "velocity":
    da, db = bcast(process.da(t), z), bcast(process.db(t), z)
    x = (db * z - b * out) / (a * db - b * da)
  else:  # F
    c_skip, c_out, _ = edm_preconditioning(b / a)
    x = c_skip * (z / a) + c_out * out
  return x, (z - a * x) / b


def from_x_eps(process: Process, prediction: str, x, eps, z, t):
  """The prediction of type `prediction` that corresponds to (x, ε) at (z_t, t)."""
  _check(prediction)
  a, b = bcast(process.a(t), z), bcast(process.b(t), z)
  if prediction == "x":
    return x
  if prediction == "eps":
    return eps
  if prediction == "v":
    return a * eps - b * x
  if prediction == "velocity":
    return bcast(process.da(t), z) * x + bcast(process.db(t), z) * eps
  c_skip, c_out, _ = edm_preconditioning(b / a)
  return (x - c_skip * (z / a)) / c_out


def convert(process: Process, source: str, target: str, out, z, t):
  """Converts a prediction of type `source` into type `target`."""
  x, eps = to_x_eps(process, source, out, z, t)
  return from_x_eps(process, target, x, eps, z, t)


def eps_error_ratio(process: Process, prediction: str, t):
  """r_t with ‖pred − target‖² = r_t ‖ε̂ − ε‖² at fixed z_t (the affine maps above are scalar in t)."""
  _check(prediction)
  a, b = process.a(t), process.b(t)
  if prediction == "eps":
    return jnp.ones_like(a)
  if prediction == "x":
    return (b / a) ** 2
  if prediction == "v":
    return (a * a + b * b) ** 2 / (a * a)
  if prediction == "velocity":
    det = a * process.db(t) - b * process.da(t)
    return (det / a) ** 2
  _, c_out, _ = edm_preconditioning(b / a)
  return (b / (a * c_out)) ** 2
