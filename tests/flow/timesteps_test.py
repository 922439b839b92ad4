"""Timestep densities: normalisation, sampled histograms (KS test), special cases, the shift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from mmdit_jax import flow

CASES = [
    ("uniform", {}),
    ("logit_normal", {"m": 0.0, "s": 1.0}),
    ("logit_normal", {"m": 1.0, "s": 0.6}),
    ("logit_normal", {"m": -0.5, "s": 2.2}),
    ("mode", {"s": 1.29}),
    ("mode", {"s": -1.0}),
    ("mode", {"s": 1.5}),  # 1.75 sits at the monotonicity limit: a spike no grid resolves
    ("cosmap", {}),
]


def _cdf(pdf):
  """(t, ∫₀ᵗ pdf) on a grid, substituting t = sigmoid(y) so that mass near the endpoints is resolved."""
  y = np.linspace(-15, 15, 200001)  # float32 t stays strictly inside (0, 1)
  t = 1 / (1 + np.exp(-y))
  values = np.asarray(pdf(jnp.asarray(t, jnp.float32)), np.float64) * t * (1 - t)
  return t, integrate.cumulative_trapezoid(values, y, initial=0)


def _integral(pdf):
  return _cdf(pdf)[1][-1]


def _ks_pvalue(samples, pdf):
  grid, cdf = _cdf(pdf)
  return stats.kstest(np.asarray(samples, np.float64), lambda q: np.interp(q, grid, cdf / cdf[-1])).pvalue


@pytest.mark.parametrize("density,params", CASES)
def test_pdf_integrates_to_one(density, params):
  assert _integral(lambda t: flow.timestep_pdf(t, density, **params)) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("density,params", CASES)
def test_samples_follow_pdf(density, params):
  t = np.asarray(flow.sample_timesteps(jax.random.key(0), (4000,), density, **params), np.float64)
  assert t.min() >= 0 and t.max() <= 1
  assert _ks_pvalue(t, lambda q: flow.timestep_pdf(q, density, **params)) > 1e-3


def test_ks_detects_a_wrong_density():
  # The KS check above must be able to fail: logit-normal samples do not follow the cosmap pdf.
  t = np.asarray(flow.sample_timesteps(jax.random.key(0), (4000,), "logit_normal", m=1.0, s=0.6))
  assert _ks_pvalue(t, lambda q: flow.timestep_pdf(q, "cosmap")) < 1e-6


def test_mode_zero_is_uniform():
  u = jnp.linspace(0, 1, 101)
  np.testing.assert_allclose(flow.mode_map(u, 0.0), 1 - u, atol=1e-7)
  np.testing.assert_allclose(flow.timestep_pdf(jnp.linspace(0.01, 0.99, 50), "mode", s=0.0), 1.0, rtol=1e-5)
  a = flow.sample_timesteps(jax.random.key(3), (1000,), "mode", s=0.0)
  assert stats.kstest(np.asarray(a), "uniform").pvalue > 1e-3


def test_logit_normal_pdf_closed_form():
  t = jnp.array([0.2, 0.5, 0.9])
  m, s = 0.5, 0.6
  logit = np.log(t / (1 - t))
  expected = stats.norm.pdf(logit, m, s) / (t * (1 - t))
  np.testing.assert_allclose(flow.timestep_pdf(t, "logit_normal", m=m, s=s), expected, rtol=1e-5)


def test_shift_fixes_endpoints_and_shifts_log_snr():
  t = jnp.linspace(0.05, 0.95, 19)
  for alpha in (0.5, 1.0, 3.0):
    np.testing.assert_allclose(flow.shift_timesteps(jnp.array([0.0, 1.0]), alpha), [0.0, 1.0], atol=1e-7)
    rf = flow.get_process("rf")
    np.testing.assert_allclose(
        rf.log_snr(flow.shift_timesteps(t, alpha)), rf.log_snr(t) - 2 * np.log(alpha), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flow.unshift_timesteps(flow.shift_timesteps(t, alpha), alpha), t, rtol=1e-6)
  assert flow.resolution_shift(1024 * 1024, 512 * 512) == pytest.approx(2.0)


def test_shifted_pdf_integrates_to_one():
  total = _integral(lambda t: flow.shifted_pdf(t, 3.0, "logit_normal", m=0.0, s=1.0))
  assert total == pytest.approx(1.0, abs=2e-3)


def test_bad_density_and_params_raise():
  with pytest.raises(ValueError, match="valid: .*cosmap.*logit_normal"):
    flow.sample_timesteps(jax.random.key(0), (2,), "lognormal")
  with pytest.raises(ValueError, match=r"takes parameters \['s'\]"):
    flow.timestep_pdf(jnp.ones(2) * 0.5, "mode", m=1.0)
  with pytest.raises(ValueError, match="monotone only"):
    flow.sample_timesteps(jax.random.key(0), (2,), "mode", s=2.0)
