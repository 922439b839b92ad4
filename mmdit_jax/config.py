"""The boundary between ml_collections configs and the code: ConfigDict → frozen, validated dataclasses.

Every check that can fail on a bad config runs here, before any data is read or anything compiles,
and names the field and its valid values.
"""

from __future__ import annotations

import dataclasses

import jax

from mmdit_jax import flow, model
from mmdit_jax.model.stack import REMAT_POLICIES
from mmdit_jax.parallel import MESH_AXES, fill_sizes

SCHEDULES = ("constant", "cosine", "linear")
MODEL_NAMES = ("mmdit", "dit")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  warmup_steps: int
  schedule: str
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str
  val_path: str
  demo_examples: int
  global_batch_size: int
  text_dropout: float
  label_dropout: float
  num_threads: int
  prefetch: int
  tfds_data_dir: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int
  total_steps: int
  formulation: flow.Formulation
  model: model.MMDiTConfig | model.DiTConfig
  data: DataConfig
  optim: OptimConfig
  ema_decay: float
  max_nonfinite_steps: int
  mesh_ici: tuple[int, ...]
  mesh_dcn: tuple[int, ...]
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_every: int
  eval_batches: int
  halt_at_step: int
  sample_every: int = 0  # sample evaluation (grid, FID, demo accuracy) every k steps and at the end; 0: off


def _field(where, value, valid):
  if value not in valid:
    raise ValueError(f"config.{where}={value!r} is not valid; valid: {list(valid)}")
  return value


def _model_config(c):
  name = _field("model.name", c.model.name, MODEL_NAMES)
  kwargs = dict(c.model.kwargs)
  if "dual_attention_layers" in kwargs:
    kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
  if "text_streams" in kwargs:
    kwargs["text_streams"] = tuple(kwargs["text_streams"])
  if "remat" in kwargs:
    _field("model.kwargs.remat", kwargs["remat"], tuple(REMAT_POLICIES))
  cls = model.MMDiTConfig if name == "mmdit" else model.DiTConfig
  unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"config.model.kwargs has unknown fields {sorted(unknown)}; valid: "
                     f"{[f.name for f in dataclasses.fields(cls)]}")
  try:
    if name == "dit" and c.model.dit_variant:
      return model.dit_config(c.model.dit_variant, **kwargs)
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  sampler: str = "euler"  # key of flow.samplers.SAMPLERS
  steps: int = 28
  guidance: float = 4.0  # classifier-free guidance scale (1 = none)
  guidance_interval: tuple[float, float] = (0.0, 1.0)
  threshold: str = "none"  # none | static | dynamic
  percentile: float = 0.995
  seed: int = 0


def sample_config(c) -> SampleConfig:
  s = c.get("sample", {})
  cfg = SampleConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(s).items()})
  if cfg.sampler not in flow.samplers.SAMPLERS:
    raise ValueError(f"config.sample.sampler={cfg.sampler!r}; valid: {sorted(flow.samplers.SAMPLERS)}")
  if cfg.threshold not in flow.samplers.THRESHOLDS:
    raise ValueError(f"config.sample.threshold={cfg.threshold!r}; valid: {sorted(flow.samplers.THRESHOLDS)}")
  return cfg


FID_NETWORKS = ("demo", "inception", "none")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_samples: int = 64  # samples per evaluation (grid, accuracy, FID, CLIP score)
  fid_network: str = "demo"  # demo | inception | none (mmdit_jax.fid)
  inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth or its .safetensors
  clip_score: str = ""  # hook 'package.module:factory' → (embed_images, embed_texts); '' → off


def eval_config(c) -> EvalConfig:
  cfg = EvalConfig(**dict(c.get("eval", {})))
  if cfg.fid_network not in FID_NETWORKS:
    raise ValueError(f"config.eval.fid_network={cfg.fid_network!r}; valid: {FID_NETWORKS}")
  if cfg.num_samples < 2:
    raise ValueError(f"config.eval.num_samples must be at least 2, got {cfg.num_samples}")
  return cfg


def from_config_dict(c) -> TrainConfig:
  try:
    formulation = flow.parse_formulation(c.formulation, shift=float(c.shift))
  except ValueError as e:
    raise ValueError(f"config.formulation: {e}") from e
  optim = OptimConfig(**{k: c.optim[k] for k in (f.name for f in dataclasses.fields(OptimConfig))})
  _field("optim.schedule", optim.schedule, SCHEDULES)
  data = DataConfig(**{k: c.data[k] for k in (f.name for f in dataclasses.fields(DataConfig))})
  if data.global_batch_size <= 0:
    raise ValueError(f"config.data.global_batch_size must be positive, got {data.global_batch_size}")
  if not 0 <= c.ema_decay < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {c.ema_decay}")
  if c.total_steps <= 0:
    raise ValueError(f"config.total_steps must be positive, got {c.total_steps}")
  sample_config(c), eval_config(c)  # validated here, before anything runs
  if c.get("sample_every", 0) < 0:
    raise ValueError(f"config.sample_every must be >= 0, got {c.sample_every}")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
    if c[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {c[name]}")
  return TrainConfig(
      seed=int(c.seed), total_steps=int(c.total_steps), formulation=formulation, model=_model_config(c),
      data=data, optim=optim, ema_decay=float(c.ema_decay), max_nonfinite_steps=int(c.max_nonfinite_steps),
      mesh_ici=tuple(c.mesh.ici), mesh_dcn=tuple(c.mesh.dcn), log_every=int(c.log_every),
      checkpoint_every=int(c.checkpoint_every), keep_checkpoints=int(c.keep_checkpoints),
      eval_every=int(c.eval_every), eval_batches=int(c.eval_batches), halt_at_step=int(c.halt_at_step),
      sample_every=int(c.get("sample_every", 0)))


def check_mesh_and_batch(cfg: TrainConfig, devices=None):
  """Mesh sizes against the device count and the batch against the data-parallel size."""
  devices = jax.devices() if devices is None else devices
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  try:
    dcn = fill_sizes(cfg.mesh_dcn, n_slices, "config.mesh.dcn")
    ici = fill_sizes(cfg.mesh_ici, len(devices) // n_slices, "config.mesh.ici")
  except ValueError as e:
    raise ValueError(f"{e} (axes {MESH_AXES})") from e
  dp = ici[0] * ici[1] * dcn[0] * dcn[1]
  if cfg.data.global_batch_size % dp:
    raise ValueError(f"config.data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
                     f"data-parallel size {dp} (mesh data × fsdp); use a multiple of {dp}")
  if cfg.data.global_batch_size % jax.process_count():
    raise ValueError(f"config.data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
