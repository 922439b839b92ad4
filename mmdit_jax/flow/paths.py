"""Forward processes z_t = a_t x + b_t ε of SD3 §2-3 (t = 0 data, t = 1 noise).

Each process gives a_t, b_t, their time derivatives, the log-SNR λ_t = log(a²/b²) and λ'_t.
Pure jnp; processes are frozen (hashable) dataclasses so they can be static jit arguments.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri


class Process(abc.ABC):
  """A forward process; subclasses give a, b and their derivatives as functions of t."""

  @abc.abstractmethod
  def a(self, t):
    ...

  @abc.abstractmethod
  def b(self, t):
    ...

  @abc.abstractmethod
  def da(self, t):
    ...

  @abc.abstractmethod
  def db(self, t):
    ...

  def sigma(self, t):
    """Noise-to-signal ratio σ_t = b_t / a_t (the EDM / variance-exploding noise level)."""
    return self.b(t) / self.a(t)

  def log_snr(self, t):
    return 2.0 * (jnp.log(self.a(t)) - jnp.log(self.b(t)))

  def dlog_snr(self, t):
    return 2.0 * (self.da(t) / self.a(t) - self.db(t) / self.b(t))

  def perturb(self, x, noise, t):
    """z_t = a_t x + b_t ε, with t of shape (B,) broadcast over the trailing axes of x."""
    return bcast(self.a(t), x) * x + bcast(self.b(t), x) * noise


def bcast(c, like):
  """Reshapes a per-example coefficient (B,) to broadcast against `like` (B, ...)."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (jnp.ndim(like) - c.ndim))


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Process):
  """rf: a = 1 − t, b = t (straight paths; λ = 2 log((1 − t)/t))."""

  def a(self, t):
    return 1.0 - t

  def b(self, t):
    return t

  def da(self, t):
    return -jnp.ones_like(t)

  def db(self, t):
    return jnp.ones_like(t)

  def log_snr(self, t):
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def dlog_snr(self, t):
    return -2.0 / (t * (1.0 - t))


@dataclasses.dataclass(frozen=True)
class Cosine(Process):
  """cos: a = cos(πt/2), b = sin(πt/2) (variance preserving)."""

  def a(self, t):
    return jnp.cos(0.5 * jnp.pi * t)

  def b(self, t):
    return jnp.sin(0.5 * jnp.pi * t)

  def da(self, t):
    return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)

  def db(self, t):
    return 0.5 * jnp.pi * jnp.cos(0.5 * jnp.pi * t)

  def log_snr(self, t):
    return -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * t))

  def dlog_snr(self, t):
    return -2.0 * jnp.pi / jnp.sin(jnp.pi * t)


@functools.lru_cache(maxsize=None)
def _log_alphas_cumprod(schedule: str, beta_start: float, beta_end: float, num_steps: int):
  """log ∏_{s≤i}(1 − β_s), computed once in float64 with numpy."""
  i = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
  if schedule == "linear":
    betas = beta_start + i * (beta_end - beta_start)
  elif schedule == "scaled_linear":
    betas = (math.sqrt(beta_start) + i * (math.sqrt(beta_end) - math.sqrt(beta_start))) ** 2
  else:
    raise ValueError(f"unknown beta schedule {schedule!r}; valid: 'linear', 'scaled_linear'")
  return np.cumsum(np.log1p(-betas))


@dataclasses.dataclass(frozen=True)
class DiscreteVP(Process):
  """Variance-preserving discrete schedule with T steps: a_i = ᾱ_i^½, b_i = (1 − ᾱ_i)^½.

  Continuous t maps to the index i = t (T − 1); log ᾱ is interpolated linearly between indices, so
  at t = i/(T − 1) the process equals the discrete one exactly and derivatives are the segment slopes.
  DDPM's `linear` β (1e-4 .. 0.02) and LDM's `scaled_linear` β (0.00085 .. 0.012) are both covered.
  """

  schedule: str = "scaled_linear"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_steps: int = 1000

  @property
  def log_alphas_cumprod(self) -> np.ndarray:
    return _log_alphas_cumprod(self.schedule, self.beta_start, self.beta_end, self.num_steps)

  def t_of_index(self, i):
    return jnp.asarray(i, jnp.float32) / (self.num_steps - 1)

  def _log_abar(self, t):
    """(log ᾱ(t), d log ᾱ / dt)."""
    table = jnp.asarray(self.log_alphas_cumprod, jnp.float32)
    s = jnp.asarray(t, jnp.float32) * (self.num_steps - 1)
    i0 = jnp.clip(jnp.floor(s), 0, self.num_steps - 2).astype(jnp.int32)
    slope = table[i0 + 1] - table[i0]
    return table[i0] + (s - i0) * slope, slope * (self.num_steps - 1)

  def a(self, t):
    return jnp.exp(0.5 * self._log_abar(t)[0])

  def b(self, t):
    return jnp.sqrt(-jnp.expm1(self._log_abar(t)[0]))

  def da(self, t):
    la, dla = self._log_abar(t)
    return 0.5 * jnp.exp(0.5 * la) * dla

  def db(self, t):
    la, dla = self._log_abar(t)
    return -0.5 * jnp.exp(la) * dla / jnp.sqrt(-jnp.expm1(la))

  def log_snr(self, t):
    la, _ = self._log_abar(t)
    return la - jnp.log(-jnp.expm1(la))

  def dlog_snr(self, t):
    la, dla = self._log_abar(t)
    return dla / (-jnp.expm1(la))


class VarianceExploding(Process):
  """EDM form z = x + σ_t ε: a = 1, b = σ_t; subclasses give σ and dσ/dt."""

  def a(self, t):
    return jnp.ones_like(jnp.asarray(t, jnp.float32))

  def da(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def sigma(self, t):
    return self.b(t)


@dataclasses.dataclass(frozen=True)
class EDM(VarianceExploding):
  """edm(P_m, P_s): σ_t = exp(P_m + P_s Φ⁻¹(t)), so t ~ U(0, 1) gives log σ ~ N(P_m, P_s²)."""

  p_mean: float = -1.2
  p_std: float = 1.2

  def b(self, t):
    return jnp.exp(self.p_mean + self.p_std * ndtri(t))

  def db(self, t):
    u = ndtri(t)
    # dΦ⁻¹/dt = 1/φ(Φ⁻¹(t)) = √(2π) exp(u²/2).
    return self.b(t) * self.p_std * math.sqrt(2 * math.pi) * jnp.exp(0.5 * u * u)

  def log_snr(self, t):
    return -2.0 * (self.p_mean + self.p_std * ndtri(t))

  def dlog_snr(self, t):
    u = ndtri(t)
    return -2.0 * self.p_std * math.sqrt(2 * math.pi) * jnp.exp(0.5 * u * u)


@dataclasses.dataclass(frozen=True)
class EDMRectifiedFlow(VarianceExploding):
  """edm/rf: EDM form with σ_t = t/(1 − t), the noise-to-signal ratio of rf."""

  def b(self, t):
    return t / (1.0 - t)

  def db(self, t):
    return 1.0 / (1.0 - t) ** 2

  def log_snr(self, t):
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def dlog_snr(self, t):
    return -2.0 / (t * (1.0 - t))


@dataclasses.dataclass(frozen=True)
class EDMCosine(VarianceExploding):
  """edm/cos: EDM form with σ_t = tan(πt/2), the noise-to-signal ratio of the cosine schedule."""

  def b(self, t):
    return jnp.tan(0.5 * jnp.pi * t)

  def db(self, t):
    return 0.5 * jnp.pi / jnp.cos(0.5 * jnp.pi * t) ** 2

  def log_snr(self, t):
    return -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * t))

  def dlog_snr(self, t):
    return -2.0 * jnp.pi / jnp.sin(jnp.pi * t)


# The closed set of processes, by name. Parameterised ones take keyword arguments.
PROCESSES = {
    "rf": RectifiedFlow,
    "linear": lambda **kw: DiscreteVP(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw),
    "ddpm_linear": lambda **kw: DiscreteVP(schedule="linear", beta_start=1e-4, beta_end=0.02, **kw),
    "cos": Cosine,
    "edm": EDM,
    "edm_rf": EDMRectifiedFlow,
    "edm_cos": EDMCosine,
}


def get_process(name: str, **params) -> Process:
  """Looks a process up by name; unknown names raise with the valid ones listed."""
  if name not in PROCESSES:
    raise ValueError(f"unknown forward process {name!r}; valid: {sorted(PROCESSES)}")
  return PROCESSES[name](**params)
