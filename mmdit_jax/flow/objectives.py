"""Training formulations of the SD3 study: forward process × prediction × timestep density.

`parse_formulation("rf/lognorm(0.00, 1.00)")` gives a `Formulation`, whose methods give everything a
train step needs: sampled t, z_t, the network input, the regression target and the per-example loss.
Every formulation's plain loss is a weighted ε-loss  −½ w_t λ'_t ‖ε̂ − ε‖²  (Kingma & Gao); `weight(t)`
returns that implied w_t (times π(t)), e.g. t/(1 − t) for rf with uniform t.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from mmdit_jax.flow import paths, predictions, timesteps


@dataclasses.dataclass(frozen=True)
class Formulation:
  """One training formulation; hashable so it can be a static argument of jitted functions."""

  name: str
  process: str  # key of paths.PROCESSES
  prediction: str  # one of predictions.PREDICTIONS
  density: str = "uniform"  # key of timesteps.DENSITIES
  density_items: tuple[tuple[str, float], ...] = ()
  process_items: tuple[tuple[str, float], ...] = ()
  shift: float = 1.0  # resolution-dependent shift α applied to sampled t (1 = none)

  def __post_init__(self):
    paths.get_process(self.process, **dict(self.process_items))
    if self.prediction not in predictions.PREDICTIONS:
      raise ValueError(
          f"formulation {self.name!r}: unknown prediction {self.prediction!r}; "
          f"valid: {list(predictions.PREDICTIONS)}")
    timesteps.resolve_density(self.density, dict(self.density_items))
    if not self.shift > 0:
      raise ValueError(f"formulation {self.name!r}: shift must be > 0, got {self.shift}")

  @property
  def density_params(self) -> dict:
    return dict(self.density_items)

  @property
  def path(self) -> paths.Process:
    return paths.get_process(self.process, **dict(self.process_items))

  @property
  def is_edm(self) -> bool:
    return self.prediction == "F"

  def with_shift(self, alpha: float) -> "Formulation":
    return dataclasses.replace(self, shift=float(alpha))

  def sample_t(self, key, shape, eps: float = 1e-5):
    """t ~ π, shifted by α, kept inside (eps, 1 − eps) where λ_t is finite."""
    t = timesteps.sample_timesteps(key, shape, self.density, **self.density_params)
    return jnp.clip(timesteps.shift_timesteps(t, self.shift), eps, 1.0 - eps)

  def pdf(self, t):
    """Density of the (shifted) training timesteps."""
    return timesteps.shifted_pdf(t, self.shift, self.density, **self.density_params)

  def perturb(self, x, noise, t):
    return self.path.perturb(x, noise, t)

  def model_input(self, z, t):
    """What the network sees: z_t, or EDM's c_in · z_t/a_t for F-prediction."""
    if not self.is_edm:
      return z
    path = self.path
    a, b = paths.bcast(path.a(t), z), paths.bcast(path.b(t), z)
    _, _, c_in = predictions.edm_preconditioning(b / a)
    return c_in * z / a

  def target(self, x, noise, t):
    z = self.perturb(x, noise, t)
    return predictions.from_x_eps(self.path, self.prediction, x, noise, z, t)

  def loss(self, out, x, noise, t):
    """Per-example plain loss: mean over non-batch axes of (out − target)², shape (B,)."""
    err = jnp.square(out.astype(jnp.float32) - self.target(x, noise, t).astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))

  def to_x_eps(self, out, z, t):
    return predictions.to_x_eps(self.path, self.prediction, out, z, t)

  def weight(self, t):
    """Implied w_t^π = π(t) · (−2 r_t / λ'_t) of the unified loss; see module docstring."""
    path = self.path
    return self.pdf(t) * -2.0 * predictions.eps_error_ratio(path, self.prediction, t) / path.dlog_snr(t)


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PATTERNS = (
    # (regex, builder from match groups)
    (re.compile(r"rf"), lambda: dict(process="rf", prediction="velocity")),
    (re.compile(rf"rf/lognorm\({_NUM},{_NUM}\)"),
     lambda m, s: dict(process="rf", prediction="velocity", density="logit_normal",
                       density_items=(("m", m), ("s", s)))),
    (re.compile(rf"rf/mode\({_NUM}\)"),
     lambda s: dict(process="rf", prediction="velocity", density="mode", density_items=(("s", s),))),
    (re.compile(r"rf/cosmap"), lambda: dict(process="rf", prediction="velocity", density="cosmap")),
    (re.compile(r"(eps|v)/(linear|ddpm_linear|cos)"),
     lambda pred, proc: dict(process=proc, prediction=pred)),
    (re.compile(rf"edm\({_NUM},{_NUM}\)"),
     lambda pm, ps: dict(process="edm", prediction="F", process_items=(("p_mean", pm), ("p_std", ps)))),
    (re.compile(r"edm/(rf|cos)"), lambda proc: dict(process=f"edm_{proc}", prediction="F")),
)

VALID_FORMS = (
    "rf", "rf/lognorm(m, s)", "rf/mode(s)", "rf/cosmap", "eps/linear", "v/linear", "eps/ddpm_linear",
    "v/ddpm_linear", "eps/cos", "v/cos", "edm(P_m, P_s)", "edm/rf", "edm/cos")


def parse_formulation(name: str, shift: float = 1.0) -> Formulation:
  """Parses a formulation name as the SD3 paper writes it, e.g. 'rf/lognorm(0.00, 1.00)'.

  'linear' is LDM's scaled-linear β schedule (the paper's eps/linear); 'ddpm_linear' is DDPM's.
  """
  if isinstance(name, Formulation):
    return name.with_shift(shift) if shift != 1.0 else name
  text = str(name).strip()
  for pattern, build in _PATTERNS:
    match = pattern.fullmatch(text)
    if match:
      groups = [float(g) if re.fullmatch(_NUM, g) else g for g in match.groups()]
      return Formulation(name=text, shift=float(shift), **build(*groups))
  raise ValueError(f"unknown formulation {name!r}; valid forms: {', '.join(VALID_FORMS)}")


def _paper_formulations() -> tuple[str, ...]:
  """The 61 formulations of the SD3 study (§5.1, Table 1 and its appendix).

  Grids as the paper describes them: 30 logit-normal (m, s) with m ∈ {−1, −0.5, 0, 0.5, 1} and
  s ∈ {0.2, 0.6, 1.0, 1.4, 1.8, 2.2}; 9 mode(s) settings in [−1, 1.75], one of which is s = 0, i.e.
  uniform `rf`; 15 edm(P_m, P_s) with P_m ∈ {−1.2, −0.6, 0, 0.6, 1.2} and P_s ∈ {0.6, 1.2, 1.8};
  plus rf/cosmap, eps/linear, v/linear, eps/cos, v/cos, edm/rf and edm/cos. The individual mode values
  other than 1.29 and 1.75 are a reconstruction of the paper's grid.
  """
  names = [f"rf/lognorm({m:.2f}, {s:.2f})" for m in (-1.0, -0.5, 0.0, 0.5, 1.0)
           for s in (0.2, 0.6, 1.0, 1.4, 1.8, 2.2)]
  names += ["rf"] + [f"rf/mode({s:.2f})" for s in (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.29, 1.75)]
  names += [f"edm({pm:.2f}, {ps:.2f})" for pm in (-1.2, -0.6, 0.0, 0.6, 1.2) for ps in (0.6, 1.2, 1.8)]
  names += ["rf/cosmap", "eps/linear", "v/linear", "eps/cos", "v/cos", "edm/rf", "edm/cos"]
  return tuple(names)


PAPER_FORMULATIONS = _paper_formulations()
assert len(PAPER_FORMULATIONS) == 61 and len(set(PAPER_FORMULATIONS)) == 61


def validation_timesteps(num_levels: int = 8):
  """SD3's validation-loss levels t_i = i/8, i = 0..7 (t = 0 is nudged off the data endpoint)."""
  return jnp.maximum(jnp.arange(num_levels, dtype=jnp.float32) / num_levels, 1e-5)

