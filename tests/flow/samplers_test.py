"""Samplers: exactness on straight flows, convergence orders, guidance, thresholding, and recovery of a
Gaussian dataset with its analytic optimal denoiser for every forward process."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit_jax import flow
from mmdit_jax.flow import samplers

MU = jnp.array([0.5, -0.3])
STD = jnp.array([0.6, 1.3])


def gaussian_denoiser(process, mu=MU, std=STD):
  """E[x | z_t] for x ~ N(μ, diag(s²)): the exact optimum any trained model approximates."""
  def denoise(z, t, i):
    tb = jnp.full((z.shape[0],), jnp.maximum(t, 1e-7))
    a, b = process.a(tb)[:, None], process.b(tb)[:, None]
    x_hat = mu + a * std ** 2 / (a * a * std ** 2 + b * b) * (z - a * mu)
    return x_hat, (z - a * x_hat) / jnp.maximum(b, 1e-7)
  return denoise


def test_euler_is_exact_on_a_straight_flow():
  rf = flow.get_process("rf")
  target = jnp.array([[0.3, -1.2, 2.0]])
  denoise = lambda z, t, i: (target, (z - (1 - t) * target) / t)  # point mass: every path is straight
  out = samplers.sample("euler", rf, denoise, jnp.array([[1.0, 0.5, -0.7]]), samplers.timestep_grid(3))
  np.testing.assert_allclose(out, target, atol=1e-5)


def _final_error(name, steps):
  rf = flow.get_process("rf")
  mu, std = jnp.array([0.5]), jnp.array([0.6])
  noise = jnp.linspace(-2, 2, 9)[:, None]
  out = samplers.sample(name, rf, gaussian_denoiser(rf, mu, std), noise, samplers.timestep_grid(steps))
  return float(jnp.max(jnp.abs(out - (mu + std * noise))))  # the exact flow map is affine


def test_convergence_orders():
  with jax.default_matmul_precision("highest"):
    e_euler = [_final_error("euler", n) for n in (10, 20, 40)]
    e_heun = [_final_error("heun", n) for n in (10, 20, 40)]
  for coarse, fine in zip(e_euler, e_euler[1:]):
    assert 1.7 < coarse / fine < 2.3, e_euler  # error ∝ h
  for coarse, fine in zip(e_heun, e_heun[1:]):
    assert 3.2 < coarse / fine < 4.8, e_heun  # error ∝ h²
  assert e_heun[-1] < e_euler[-1] / 10


def test_guidance():
  c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
  np.testing.assert_array_equal(samplers.guide(c, u, 1.0), c)
  np.testing.assert_allclose(samplers.guide(c, u, 3.0), u + 3 * (c - u))
  rf = flow.get_process("rf")
  calls = []
  def net(z, t, guided):
    calls.append(guided)
    return (z * 0 + c, z * 0 + u) if guided else z * 0 + c
  z = jnp.zeros((1, 2))
  x1, _ = samplers.make_denoiser(rf, "x", net)(z, 0.5, 0)
  np.testing.assert_allclose(x1[0], c)
  assert calls == [False]  # w = 1 needs no unconditional half
  x3, _ = samplers.make_denoiser(rf, "x", net, guidance_scale=3.0)(z, 0.5, 0)
  np.testing.assert_allclose(x3[0], u + 3 * (c - u), rtol=1e-6)
  # Outside the guidance interval the conditional prediction is used.
  x_out, _ = samplers.make_denoiser(rf, "x", net, guidance_scale=3.0, guidance_interval=(0.0, 0.4))(z, 0.5, 0)
  np.testing.assert_allclose(x_out[0], c)


def test_skip_layer_guidance_window():
  rf = flow.get_process("rf")
  net = lambda z, t, g: z * 0 + 1.0
  skip = lambda z, t: z * 0 + 0.25
  d = samplers.make_denoiser(rf, "x", net, skip_net=skip, skip_scale=2.0, num_steps=100)
  inside, _ = d(jnp.zeros((1, 1)), 0.9, 10)
  outside, _ = d(jnp.zeros((1, 1)), 0.9, 50)
  np.testing.assert_allclose(inside, 1.0 + 2.0 * 0.75)
  np.testing.assert_allclose(outside, 1.0)


def test_dynamic_thresholding_matches_imagen():
  x = jnp.array([[0.5, -2.0, 3.0, 0.1], [0.2, -0.4, 0.9, 0.3]])
  p = 0.75
  out = samplers.dynamic_threshold(x, p)
  for row, got in zip(np.asarray(x), np.asarray(out)):
    s = max(1.0, np.quantile(np.abs(row), p))
    np.testing.assert_allclose(got, np.clip(row, -s, s) / s, rtol=1e-6)
  np.testing.assert_allclose(out[1], x[1])  # s = 1 when everything is inside [−1, 1]
  np.testing.assert_array_equal(samplers.static_threshold(x), jnp.clip(x, -1, 1))


@pytest.mark.parametrize("process_name,params", [
    ("rf", {}), ("linear", {}), ("ddpm_linear", {}), ("cos", {}),
    ("edm", {"p_mean": -1.2, "p_std": 1.2}), ("edm_rf", {}), ("edm_cos", {})])
@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "euler"])
def test_optimal_denoiser_recovers_gaussian(process_name, params, solver):
  process = flow.get_process(process_name, **params)
  steps = {"heun": 40, "dpmpp_2m": 40, "euler": 200}[solver]
  if isinstance(process, flow.paths.VarianceExploding):  # σ moves fast in t: step evenly in log-SNR
    ts = samplers.log_snr_grid(process, steps, samplers.t_max(process))
  else:
    ts = samplers.timestep_grid(steps, t_max=samplers.t_max(process))
  noise = jax.random.normal(jax.random.key(0), (4096, 2))
  out = jax.jit(lambda n: samplers.sample(solver, process, gaussian_denoiser(process), n, ts))(noise)
  np.testing.assert_allclose(jnp.mean(out, 0), MU, atol=0.06)
  np.testing.assert_allclose(jnp.std(out, 0), STD, rtol=0.06)
  assert abs(float(jnp.corrcoef(out.T)[0, 1])) < 0.06


def test_ddim_on_the_discrete_schedule():
  process = flow.get_process("linear")
  ts = process.t_of_index(jnp.arange(999, -1, -20))  # every 20th of the 1000 training steps
  ts = jnp.concatenate([ts, jnp.zeros(1)])
  noise = jax.random.normal(jax.random.key(1), (4096, 2))
  out = samplers.sample("ddim", process, gaussian_denoiser(process), noise, ts)
  np.testing.assert_allclose(jnp.mean(out, 0), MU, atol=0.06)
  np.testing.assert_allclose(jnp.std(out, 0), STD, rtol=0.06)


def test_t_max_is_where_sigma_reaches_80():
  for name in ("edm", "edm_rf", "edm_cos"):
    process = flow.get_process(name)
    assert float(process.sigma(jnp.asarray(samplers.t_max(process)))) == pytest.approx(80.0, rel=2e-2)
  assert samplers.t_max(flow.get_process("rf")) == 1.0
  # The same constant while a program is traced (the evaluator's and --mode=sample's jitted sampling loops).
  process = flow.get_process("edm")
  grid = jax.jit(lambda: samplers.log_snr_grid(process, 5, samplers.t_max(process)))()
  np.testing.assert_allclose(grid, samplers.log_snr_grid(process, 5, samplers.t_max(process)), rtol=1e-6)


def test_unknown_names():
  with pytest.raises(ValueError, match="valid: .*dpmpp_2m.*euler.*heun"):
    samplers.sample("rk4", flow.get_process("rf"), None, jnp.zeros((1, 1)), samplers.timestep_grid(2))
  with pytest.raises(ValueError, match="valid: .*dynamic.*none.*static"):
    samplers.make_denoiser(flow.get_process("rf"), "x", None, threshold="soft")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_reference_grid_is_diffusers_flow_match_schedule(steps, shift):
  """SD3's grid as diffusers' FlowMatchEulerDiscreteScheduler computes it (sigmas incl. the final 0), and
  the Euler update on it is the scheduler's step: the same latents to float32 rounding."""
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  scheduler.set_timesteps(steps)
  ts = samplers.reference_grid(steps, shift)
  np.testing.assert_allclose(np.asarray(ts), scheduler.sigmas.numpy(), atol=2e-7)
  if steps == 4 and shift == 3.0:  # the values the SD3 inference issue quotes
    np.testing.assert_allclose(np.asarray(ts), [1, 0.858, 0.602, 0.0089, 0], atol=5e-4)
  rf = flow.get_process("rf")
  velocity = lambda z, t: jnp.sin(3 * z) * (1 + t)  # any smooth field, fed to both as the model output
  z = jax.random.normal(jax.random.key(0), (2, 5))
  denoise = samplers.make_denoiser(rf, "velocity", lambda z, t, guided: velocity(z, t[:, None]))
  ours = samplers.sample("euler", rf, denoise, z, ts)
  zt = torch.from_numpy(np.asarray(z))
  for t in scheduler.timesteps:
    v = torch.from_numpy(np.asarray(velocity(jnp.asarray(zt.numpy()), float(t) / 1000)))
    zt = scheduler.step(v, t, zt).prev_sample
  np.testing.assert_allclose(np.asarray(ours), zt.numpy(), atol=1e-5)


def _reference_dpmpp_2m(denoised_fn, x, sigmas):
  """SD3.5's reference sampler (sd3_impls.sample_dpmpp_2m, from k-diffusion), transcribed in float64."""
  t_fn = lambda s: -np.log(s)
  old = None
  for i in range(len(sigmas) - 1):
    denoised = denoised_fn(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = denoised  # (e^{-h} → 0: the first-order step lands on the estimate)
    else:
      t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
      h = t_next - t
      if old is None:
        x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised
      else:
        r = (t - t_fn(sigmas[i - 1])) / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * d
    old = denoised
  return x


def test_dpmpp_2m_sd3_is_the_reference_samplers_update():
  """On SD3's grid with the same model outputs, dpmpp_2m_sd3 is SD3.5's reference DPM++(2M) to float32
  rounding; textbook dpmpp_2m (steps in λ) is a different image."""
  rf = flow.get_process("rf")
  velocity = lambda z, t: np.sin(3 * z) * (1 + t)
  ts = samplers.reference_grid(12, 3.0)
  z = np.asarray(jax.random.normal(jax.random.key(0), (2, 5)), np.float64)
  denoise = samplers.make_denoiser(rf, "velocity", lambda z, t, guided: jnp.sin(3 * z) * (1 + t[:, None]))
  want = _reference_dpmpp_2m(lambda x, s: x - s * velocity(x, s), z, np.asarray(ts, np.float64))
  ours = samplers.sample("dpmpp_2m_sd3", rf, denoise, jnp.asarray(z, jnp.float32), ts)
  np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5)
  textbook = samplers.sample("dpmpp_2m", rf, denoise, jnp.asarray(z, jnp.float32), ts)
  assert np.abs(np.asarray(textbook) - want).max() > 1e-3


def test_guidance_runs_only_above_one():
  """As diffusers' pipelines: w ≤ 1 is the conditional output alone, one network call without the
  unconditional half."""
  calls = []

  def net(z, t, guided):
    calls.append(guided)
    return (z, -z) if guided else z

  rf = flow.get_process("rf")
  for w in (0.5, 1.0):
    x, _ = samplers.make_denoiser(rf, "x", net, guidance_scale=w)(jnp.ones((1, 2)), 0.5, 0)
    np.testing.assert_allclose(x, 1.0)
  samplers.make_denoiser(rf, "x", net, guidance_scale=1.5)(jnp.ones((1, 2)), 0.5, 0)
  assert calls == [False, False, True]
