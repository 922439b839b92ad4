"""Formulations: name parsing, prediction conversions, targets, losses and implied weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmdit_jax import flow
from mmdit_jax.flow import paths, predictions

ALL_PROCESSES = ["rf", "linear", "ddpm_linear", "cos", "edm", "edm_rf", "edm_cos"]


def _batch(seed=0, shape=(5, 4, 3, 2)):
  kx, kn, kt, ko = jax.random.split(jax.random.key(seed), 4)
  t = jax.random.uniform(kt, shape[:1], minval=0.05, maxval=0.95)
  return (jax.random.normal(kx, shape), jax.random.normal(kn, shape), t, jax.random.normal(ko, shape))


@pytest.mark.parametrize("process", ALL_PROCESSES)
@pytest.mark.parametrize("source", predictions.PREDICTIONS)
def test_prediction_round_trips(process, source):
  p = flow.get_process(process)
  x, noise, t, out = _batch()
  z = p.perturb(x, noise, t)
  # The true (x, ε) maps to each type and back exactly.
  pred = flow.from_x_eps(p, source, x, noise, z, t)
  x_hat, eps_hat = flow.to_x_eps(p, source, pred, z, t)
  np.testing.assert_allclose(x_hat, x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(eps_hat, noise, rtol=1e-4, atol=1e-4)
  # An arbitrary output converts through every other type and back to itself.
  for target in predictions.PREDICTIONS:
    there = flow.convert(p, source, target, out, z, t)
    np.testing.assert_allclose(flow.convert(p, target, source, there, z, t), out, rtol=2e-3, atol=2e-3)
    # Converted predictions stay consistent with z_t = a x̂ + b ε̂.
    xh, eh = flow.to_x_eps(p, target, there, z, t)
    np.testing.assert_allclose(p.perturb(xh, eh, t), z, rtol=1e-3, atol=1e-3)


def test_velocity_is_the_path_derivative():
  x, noise, t, _ = _batch()
  for name in ALL_PROCESSES:
    p = flow.get_process(name)
    _, dz = jax.jvp(lambda s: p.perturb(x, noise, s), (t,), (jnp.ones_like(t),))
    z = p.perturb(x, noise, t)
    np.testing.assert_allclose(flow.from_x_eps(p, "velocity", x, noise, z, t), dz, rtol=1e-3, atol=1e-3)


def test_rf_target_is_noise_minus_data():
  x, noise, t, _ = _batch()
  f = flow.parse_formulation("rf/lognorm(0.00, 1.00)")
  np.testing.assert_allclose(f.target(x, noise, t), noise - x, rtol=1e-6, atol=1e-6)
  assert f.process == "rf" and f.prediction == "velocity"
  assert f.density == "logit_normal" and f.density_params == {"m": 0.0, "s": 1.0}


def test_rf_cfm_loss_equals_weighted_eps_loss():
  """‖v̂ − (ε − x)‖² = −½ w_t λ'_t ‖ε̂ − ε‖² with w_t = t/(1 − t) (SD3 eq. 13)."""
  x, noise, t, v_hat = _batch()
  f = flow.parse_formulation("rf")
  z = f.perturb(x, noise, t)
  cfm = f.loss(v_hat, x, noise, t)
  _, eps_hat = f.to_x_eps(v_hat, z, t)
  w = t / (1 - t)
  eps_loss = -0.5 * w * f.path.dlog_snr(t) * jnp.mean((eps_hat - noise) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(cfm, eps_loss, rtol=1e-4)
  np.testing.assert_allclose(f.weight(t), w, rtol=1e-4)


@pytest.mark.parametrize("name", ["rf", "rf/lognorm(0.50, 0.60)", "eps/linear", "v/linear", "eps/cos",
                                  "v/cos", "edm(-1.20, 1.20)", "edm/rf", "edm/cos", "rf/mode(1.29)"])
def test_plain_loss_is_the_weighted_eps_loss(name):
  x, noise, t, out = _batch(1)
  f = flow.parse_formulation(name)
  z = f.perturb(x, noise, t)
  _, eps_hat = f.to_x_eps(out, z, t)
  eps_err = jnp.mean((eps_hat - noise) ** 2, axis=(1, 2, 3))
  weighted = -0.5 * (f.weight(t) / f.pdf(t)) * f.path.dlog_snr(t) * eps_err
  np.testing.assert_allclose(f.loss(out, x, noise, t), weighted, rtol=2e-3)


def test_implied_weights_match_the_paper():
  t = jnp.linspace(0.1, 0.9, 9)
  cos = flow.get_process("cos")
  lam = cos.log_snr(t)
  ratio = lambda a, b: np.asarray(a) / np.asarray(b)
  # eps/cos ∝ sech(λ/2), v/cos ∝ e^{−λ/2}: the ratio is a constant.
  for name, expected in [("eps/cos", 1 / np.cosh(lam / 2)), ("v/cos", np.exp(-lam / 2))]:
    r = ratio(flow.parse_formulation(name).weight(t), expected)
    np.testing.assert_allclose(r, r[0], rtol=1e-3)
  # edm(P_m, P_s) ∝ N(λ; −2P_m, (2P_s)²)(e^{−λ} + 0.5²).
  f = flow.parse_formulation("edm(-1.20, 1.20)")
  lam = f.path.log_snr(t)
  expected = stats.norm.pdf(np.asarray(lam), 2.4, 2.4) * (np.exp(-np.asarray(lam)) + 0.25)
  r = ratio(f.weight(t), expected)
  np.testing.assert_allclose(r, r[0], rtol=1e-3)
  # logit-normal reweights rf by its density: w^π = t/(1 − t) π(t).
  f = flow.parse_formulation("rf/lognorm(0.00, 1.00)")
  np.testing.assert_allclose(f.weight(t), t / (1 - t) * flow.timestep_pdf(t, "logit_normal"), rtol=1e-4)


def test_edm_model_input_has_unit_variance_for_unit_data_scale():
  f = flow.parse_formulation("edm(0.00, 1.20)")
  x = 0.5 * jax.random.normal(jax.random.key(0), (4096, 8))
  noise = jax.random.normal(jax.random.key(1), (4096, 8))
  t = jnp.full((4096,), 0.8)
  z_in = f.model_input(f.perturb(x, noise, t), t)
  assert float(jnp.std(z_in)) == pytest.approx(1.0, abs=0.02)


def test_all_paper_formulations_parse():
  assert len(flow.PAPER_FORMULATIONS) == 61
  x, noise, t, out = _batch(2, (3, 4))
  seen = set()
  for name in flow.PAPER_FORMULATIONS:
    f = flow.parse_formulation(name)
    seen.add((f.process, f.prediction, f.density, f.density_items, f.process_items))
    loss = f.loss(out, x, noise, f.sample_t(jax.random.key(0), (3,)))
    assert loss.shape == (3,) and bool(jnp.all(jnp.isfinite(loss))), name
  assert len(seen) == 61  # no two names collapse to the same formulation
  assert flow.parse_formulation("edm(0.60, 1.80)").path == paths.EDM(p_mean=0.6, p_std=1.8)
  assert flow.parse_formulation("rf/mode(1.29)").density_params == {"s": 1.29}
  assert flow.parse_formulation("eps/linear").path.schedule == "scaled_linear"


@pytest.mark.parametrize("bad", ["rf/lognormal(0, 1)", "eps/cosine", "edm(1.0)", "x/linear", "", "rf/mode(3.0)"])
def test_unknown_names_raise_with_valid_forms(bad):
  with pytest.raises(ValueError, match=r"valid forms: rf, rf/lognorm\(m, s\)|monotone only"):
    flow.parse_formulation(bad)


def test_shifted_formulation_samples_and_pdf_agree():
  f = flow.parse_formulation("rf/lognorm(0.00, 1.00)", shift=3.0)
  t = np.asarray(f.sample_t(jax.random.key(0), (20000,)))
  # Shifting by α = 3 moves the median of t from 0.5 to 0.75.
  assert np.median(t) == pytest.approx(0.75, abs=0.01)
  hist, edges = np.histogram(t, bins=20, range=(0, 1), density=True)
  centres = jnp.asarray((edges[:-1] + edges[1:]) / 2)
  np.testing.assert_allclose(hist, f.pdf(centres), atol=0.15)


def test_loss_is_jittable_and_vmappable():
  f = flow.parse_formulation("v/cos")
  x, noise, t, out = _batch()
  eager = f.loss(out, x, noise, t)
  jitted = jax.jit(f.loss)(out, x, noise, t)
  mapped = jax.vmap(lambda o, a, n, s: f.loss(o[None], a[None], n[None], s[None])[0])(out, x, noise, t)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5)
  np.testing.assert_allclose(mapped, eager, rtol=1e-5)
