"""ODE samplers from noise (t = 1) to data (t = 0), for every forward process and prediction type.

A sampler sees the model only as `denoise(z, t) -> (x̂, ε̂)`; `make_denoiser` builds that from a raw
network call, converting its prediction (any of flow.PREDICTIONS) and applying classifier-free guidance
(with a guidance interval), skip-layer guidance and Imagen's static or dynamic thresholding of x̂.
The probability-flow ODE of any process is then dz/dt = a'_t x̂ + b'_t ε̂. Pure jnp; jit the caller.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from mmdit_jax.flow.paths import Process, VarianceExploding, bcast
from mmdit_jax.flow.predictions import to_x_eps
from mmdit_jax.flow.timesteps import shift_timesteps

Denoiser = Callable  # (z, t (B,), step index) -> (x̂, ε̂)


def timestep_grid(num_steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0):
  """num_steps + 1 decreasing times from t_max to t_min, uniform before the resolution shift α."""
  return shift_timesteps(jnp.linspace(t_max, t_min, num_steps + 1), shift)


def reference_grid(num_steps: int, shift: float = 1.0, train_timesteps: int = 1000):
  """SD3's sampling grid: σ_i = shift(linspace(1, σ_min, N))_i followed by 0, where σ_min = shift(1/T) is
  the smallest (shifted) training sigma of a model trained on T discrete timesteps — N + 1 times, the
  last network evaluation at t = shift(σ_min) rather than at 1/N.

  As SD3's reference code (sd3_impls.ModelSamplingDiscreteFlow with sd3_infer's get_sigmas:
  sigma(linspace(timestep(σ_max), timestep(σ_min), N)) + [0]) and diffusers'
  FlowMatchEulerDiscreteScheduler.set_timesteps (linspace(σ_max·T, σ_min·T, N) / T, then the shift, then 0)
  compute it; the shift is applied to σ_min twice there too. For N = 4, shift 3: [1, 0.858, 0.602, 0.0089, 0].
  """
  sigma_min = shift_timesteps(1.0 / train_timesteps, shift)
  ts = shift_timesteps(jnp.linspace(1.0, sigma_min, num_steps), shift)
  return jnp.concatenate([ts, jnp.zeros((1,), ts.dtype)])


def t_of_log_snr(process: Process, lam, iterations: int = 60):
  """t with λ(t) = lam, by bisection (λ decreases in t for every process)."""
  lam = jnp.asarray(lam, jnp.float32)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = process.log_snr(mid) > lam  # still left of the root
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (jnp.zeros_like(lam) + 1e-7, jnp.ones_like(lam) - 1e-7))
  return 0.5 * (lo + hi)


def t_max(process: Process, sigma_max: float = 80.0) -> float:
  """Where sampling starts: t = 1 where the process reaches pure noise there; for the variance-exploding
  (EDM) processes, whose σ diverges at t = 1, the t where σ = sigma_max (EDM's σ_max = 80)."""
  if not isinstance(process, VarianceExploding):
    return 1.0
  with jax.ensure_compile_time_eval():  # a constant of the program, also when called while tracing one
    return float(t_of_log_snr(process, jnp.asarray(-2.0 * math.log(sigma_max))))


def log_snr_grid(process: Process, num_steps: int, t_max: float, sigma_min: float = 0.002):
  """Times uniform in log-SNR from t_max down to σ = b/a = sigma_min, then t = 0.

  The right spacing where σ_t moves fast in t (EDM's Φ⁻¹ schedule near t = 1): every step covers
  the same change of signal-to-noise ratio.
  """
  lam = jnp.linspace(process.log_snr(jnp.asarray(t_max)), -2.0 * jnp.log(sigma_min), num_steps)
  return jnp.concatenate([t_of_log_snr(process, lam).at[0].set(t_max), jnp.zeros(1)])


def static_threshold(x_hat):
  return jnp.clip(x_hat, -1.0, 1.0)


def dynamic_threshold(x_hat, percentile: float = 0.995):
  """Imagen: s = max(1, quantile(|x̂|, p)) per sample; x̂ ← clip(x̂, −s, s) / s."""
  flat = jnp.abs(x_hat.reshape(x_hat.shape[0], -1))
  s = jnp.maximum(1.0, jnp.quantile(flat, percentile, axis=1))
  s = bcast(s, x_hat)
  return jnp.clip(x_hat, -s, s) / s


THRESHOLDS = {"none": None, "static": static_threshold, "dynamic": dynamic_threshold}


def guide(cond, uncond, scale):
  """Classifier-free guidance: uncond + w (cond − uncond)."""
  return uncond + scale * (cond - uncond)


def make_denoiser(process: Process, prediction: str, net: Callable, *, guidance_scale: float = 1.0,
                  guidance_interval: tuple[float, float] = (0.0, 1.0), threshold: str = "none",
                  percentile: float = 0.995, skip_net: Callable | None = None, skip_scale: float = 0.0,
                  skip_interval: tuple[float, float] = (0.01, 0.2), num_steps: int | None = None,
                  t_min_eps: float = 1e-4):
  """(z, t, i) → (x̂, ε̂) from a raw network call.

  net(z, t, guided) returns (cond_out, uncond_out) when `guided` is True (the caller runs both halves
  in one batch) and cond_out alone otherwise. Guidance applies for t in guidance_interval. skip_net(z, t)
  is the conditional output with layers skipped (SD3.5's skip-layer guidance), used at steps i with
  start·N < i < stop·N for skip_interval = (start, stop) — strictly, as SD3.5's reference
  (SkipLayerCFGDenoiser) and diffusers' pipeline — after guidance: out += skip_scale · (cond − skipped). As diffusers' pipelines,
  guidance runs only for a scale above 1 (w ≤ 1: the conditional output alone, one network call).
  """
  if threshold not in THRESHOLDS:
    raise ValueError(f"unknown threshold {threshold!r}; valid: {sorted(THRESHOLDS)}")
  thresh = THRESHOLDS[threshold]
  guided = guidance_scale > 1.0

  def denoise(z, t, i):
    tb = jnp.full((z.shape[0],), t)
    if guided:
      cond, uncond = net(z, tb, True)
      inside = (t >= guidance_interval[0]) & (t <= guidance_interval[1])
      out = jnp.where(inside, guide(cond, uncond, guidance_scale), cond)
    else:
      cond = out = net(z, tb, False)
    if skip_net is not None and skip_scale:
      active = (i > skip_interval[0] * num_steps) & (i < skip_interval[1] * num_steps)
      out = out + jnp.where(active, skip_scale * (cond - skip_net(z, tb)), 0.0)
    x_hat, eps_hat = to_x_eps(process, prediction, out, z, jnp.maximum(tb, t_min_eps))
    if thresh is not None:
      x_hat = thresh(x_hat)
      a, b = bcast(process.a(tb), z), bcast(process.b(tb), z)
      eps_hat = (z - a * x_hat) / jnp.maximum(b, t_min_eps)
    return x_hat, eps_hat

  return denoise


def _step(process, z, t, t_next, x_hat, eps_hat):
  """One Euler step of dz = a'(t) x̂ dt + b'(t) ε̂ dt, taken in the process's own coordinates:
  z + (a(t') − a(t)) x̂ + (b(t') − b(t)) ε̂. For rf this is z + (t' − t)(ε̂ − x̂), SD3's Euler; for EDM it
  is Karras's Euler in σ. Differences of a and b stay accurate where σ(t) is steep (EDM near t = 1)."""
  tb, tn = jnp.full((z.shape[0],), t), jnp.full((z.shape[0],), t_next)
  da = bcast(process.a(tn) - process.a(tb), z)
  db = bcast(process.b(tn) - process.b(tb), z)
  return z + da * x_hat + db * eps_hat


def euler(process: Process, denoise: Denoiser, z, ts):
  """First order. On a discrete schedule the same update is DDIM (η = 0): z' = a' x̂ + b' ε̂."""
  def body(i, z):
    return _step(process, z, ts[i], ts[i + 1], *denoise(z, ts[i], i))
  return jax.lax.fori_loop(0, ts.shape[0] - 1, body, z)


def heun(process: Process, denoise: Denoiser, z, ts):
  """Second order (trapezoidal corrector on x̂ and ε̂); the final step to t = 0 is Euler, as in EDM."""
  last = ts.shape[0] - 2

  def body(i, z):
    t, t_next = ts[i], ts[i + 1]
    x_hat, eps_hat = denoise(z, t, i)
    z_euler = _step(process, z, t, t_next, x_hat, eps_hat)
    def correct(_):
      x2, e2 = denoise(z_euler, t_next, i + 1)
      return _step(process, z, t, t_next, 0.5 * (x_hat + x2), 0.5 * (eps_hat + e2))
    return jax.lax.cond((i < last) | (t_next > 0), correct, lambda _: z_euler, None)
  return jax.lax.fori_loop(0, ts.shape[0] - 1, body, z)


ddim = euler  # the same update; `ts` on the discrete training schedule makes it DDIM proper


def _dpmpp_2m(process: Process, denoise: Denoiser, z, ts, ratio_in_log_sigma: bool):
  def half_lambda(t):  # clipped: λ is ±∞ at the endpoints of rf and cos
    return 0.5 * process.log_snr(jnp.full((1,), jnp.clip(t, 1e-6, 1 - 1e-6)))[0]

  def neg_log_b(t):
    return -jnp.log(process.b(jnp.full((1,), jnp.clip(t, 1e-6, 1.0)))[0])

  ratio_coord = neg_log_b if ratio_in_log_sigma else half_lambda

  def body(i, carry):
    z, x_prev, h_prev = carry
    t, t_next = ts[i], ts[i + 1]
    x_hat, _ = denoise(z, t, i)
    tn = jnp.full((z.shape[0],), t_next)
    t_now = jnp.full((z.shape[0],), t)
    final = t_next <= 0
    h = jnp.where(final, 1.0, half_lambda(t_next) - half_lambda(t))
    h_ratio = jnp.where(final, 1.0, ratio_coord(t_next) - ratio_coord(t))
    r = h_prev / h_ratio
    d = jnp.where((i > 0), (1 + 1 / (2 * r)) * x_hat - (1 / (2 * r)) * x_prev, x_hat)
    b_ratio = bcast(process.b(tn) / process.b(t_now), z)
    z_next = b_ratio * z - bcast(process.a(tn), z) * jnp.expm1(-h) * d
    return jnp.where(final, x_hat, z_next), x_hat, h_ratio

  z, _, _ = jax.lax.fori_loop(0, ts.shape[0] - 1, body, (z, jnp.zeros_like(z), jnp.ones(())))
  return z


def dpmpp_2m(process: Process, denoise: Denoiser, z, ts):
  """DPM-Solver++(2M) (Lu et al. 2022) in data-prediction form over λ = log(a/b); last step returns x̂:
  z' = (b'/b) z − a' (e^{−h} − 1) D, h = λ'/2 − λ/2, D = (1 + 1/2r) x̂ − (1/2r) x̂_prev, r = h_prev / h."""
  return _dpmpp_2m(process, denoise, z, ts, ratio_in_log_sigma=False)


def dpmpp_2m_sd3(process: Process, denoise: Denoiser, z, ts):
  """DPM-Solver++(2M) as SD3 / SD3.5's reference code runs it on flow models (sd3_impls.sample_dpmpp_2m,
  k-diffusion's solver given σ = t): x' = (σ'/σ) x − (e^{−h} − 1) D with h = log σ − log σ'. For rf its
  update coefficients are dpmpp_2m's exactly (1 − σ'/σ either way); only the multistep ratio r = h_prev / h
  is measured in −log σ instead of λ = log((1 − σ)/σ) — what SD3.5's reference images are made with."""
  return _dpmpp_2m(process, denoise, z, ts, ratio_in_log_sigma=True)


SAMPLERS = {"euler": euler, "heun": heun, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sd3": dpmpp_2m_sd3}  # closed set, by name


def sample(name: str, process: Process, denoise: Denoiser, noise, ts):
  """Integrates from noise at ts[0] to ts[-1] with the named solver."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
  a0 = bcast(process.a(jnp.full((noise.shape[0],), ts[0])), noise)
  b0 = bcast(process.b(jnp.full((noise.shape[0],), ts[0])), noise)
  # The prior: z at ts[0] of a zero-mean unit-variance dataset is ≈ b ε (a ≈ 0 at t = 1; exact for EDM).
  z = jnp.sqrt(a0 * a0 + b0 * b0) * noise
  return SAMPLERS[name](process, denoise, z, ts)
