"""Forward processes: endpoints, log-SNR and derivatives against autodiff and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit_jax import flow
from mmdit_jax.flow import paths

PROCESS_CASES = {
    "rf": paths.RectifiedFlow(),
    "linear": flow.get_process("linear"),
    "ddpm_linear": flow.get_process("ddpm_linear"),
    "cos": paths.Cosine(),
    "edm": paths.EDM(p_mean=-1.2, p_std=1.2),
    "edm_shifted": paths.EDM(p_mean=0.6, p_std=0.6),
    "edm_rf": paths.EDMRectifiedFlow(),
    "edm_cos": paths.EDMCosine(),
}
T_GRID = jnp.linspace(0.03, 0.97, 37)


def test_rf_endpoints():
  x, noise = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
  rf = paths.RectifiedFlow()
  np.testing.assert_array_equal(rf.perturb(x, noise, jnp.zeros(2)), x)
  np.testing.assert_array_equal(rf.perturb(x, noise, jnp.ones(2)), noise)


@pytest.mark.parametrize("name", sorted(PROCESS_CASES))
def test_log_snr_is_log_a2_over_b2(name):
  p = PROCESS_CASES[name]
  expected = np.log(np.asarray(p.a(T_GRID), np.float64) ** 2 / np.asarray(p.b(T_GRID), np.float64) ** 2)
  np.testing.assert_allclose(p.log_snr(T_GRID), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", sorted(PROCESS_CASES))
@pytest.mark.parametrize("fn", ["a", "b", "log_snr"])
def test_derivatives_match_autodiff(name, fn):
  p = PROCESS_CASES[name]
  deriv = {"a": p.da, "b": p.db, "log_snr": p.dlog_snr}[fn]
  auto = jax.vmap(jax.grad(lambda t: getattr(p, fn)(t)))(T_GRID)
  np.testing.assert_allclose(deriv(T_GRID), auto, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PROCESS_CASES))
def test_derivatives_match_finite_differences(name):
  p = PROCESS_CASES[name]
  # Central differences in float64 numpy from the float32 functions: h large enough to beat rounding.
  h = 1e-3
  t = np.linspace(0.05, 0.95, 11) + 0.37e-3  # off the discrete schedule's knots
  fd = (np.asarray(p.log_snr(jnp.asarray(t + h)), np.float64)
        - np.asarray(p.log_snr(jnp.asarray(t - h)), np.float64)) / (2 * h)
  np.testing.assert_allclose(p.dlog_snr(jnp.asarray(t)), fd, rtol=2e-2)


def test_closed_forms():
  t = T_GRID
  np.testing.assert_allclose(paths.RectifiedFlow().dlog_snr(t), -2 / (t * (1 - t)), rtol=1e-6)
  np.testing.assert_allclose(paths.Cosine().log_snr(t), -2 * np.log(np.tan(np.pi * t / 2)), rtol=1e-4, atol=1e-5)
  # EDM with t ~ U gives λ ~ N(−2 P_m, (2 P_s)²): λ at the median and quartiles.
  edm = paths.EDM(p_mean=-1.2, p_std=1.2)
  np.testing.assert_allclose(edm.log_snr(jnp.array([0.5])), [2.4], rtol=1e-6)
  np.testing.assert_allclose(edm.log_snr(jnp.array([0.75])), [2.4 - 2 * 1.2 * 0.6744898], rtol=1e-5)
  # edm/rf and edm/cos share their noise-to-signal ratio with rf and cos.
  np.testing.assert_allclose(paths.EDMRectifiedFlow().sigma(t), paths.RectifiedFlow().sigma(t), rtol=1e-5)
  np.testing.assert_allclose(paths.EDMCosine().sigma(t), paths.Cosine().sigma(t), rtol=1e-4)


def test_discrete_schedules_match_reference_tables():
  # DDPM linear β and LDM scaled-linear β, index i ↔ t = i/999, against a direct numpy cumprod.
  for name, betas in [
      ("ddpm_linear", np.linspace(1e-4, 0.02, 1000)),
      ("linear", np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2),
  ]:
    p = flow.get_process(name)
    abar = np.cumprod(1 - betas)
    idx = np.array([0, 1, 250, 500, 998, 999])
    t = jnp.asarray(idx / 999, jnp.float32)
    np.testing.assert_allclose(np.asarray(p.a(t)) ** 2, abar[idx], rtol=2e-4)
    np.testing.assert_allclose(np.asarray(p.a(t)) ** 2 + np.asarray(p.b(t)) ** 2, 1.0, rtol=1e-5)


def test_unknown_process_lists_valid():
  with pytest.raises(ValueError, match="valid: .*'cos'.*'rf'"):
    flow.get_process("karras")
