"""The boundary between ml_collections configs and the code: ConfigDict → frozen, validated dataclasses.

Every check that can fail on a bad config runs here, before any data is read or anything compiles, and
names the field and its valid values. Unknown keys are errors at every level. Nothing below the entry
points sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import math

from mmdit_jax import flow, model, xla_presets
from mmdit_jax.errors import ConfigError
from mmdit_jax.model.layers import LOGICAL_AXES
from mmdit_jax.parallel.mesh import MESH_AXES, axis_sizes, fill_sizes, num_slices

SCHEDULES = ("constant", "cosine", "linear")
FID_NETWORKS = ("demo", "inception", "none")


def _check(where: str, ok: bool, message: str):
  if not ok:
    raise ConfigError(f"config.{where}: {message}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  warmup_steps: int = 1000
  schedule: str = "constant"  # one of SCHEDULES
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # 0 disables

  def __post_init__(self):
    _check("optim.schedule", self.schedule in SCHEDULES, f"{self.schedule!r} is not valid; valid: {list(SCHEDULES)}")
    _check("optim.lr", self.lr > 0, f"must be positive, got {self.lr}")
    _check("optim.warmup_steps", self.warmup_steps >= 0, f"must be >= 0, got {self.warmup_steps}")
    _check("optim.grad_clip", self.grad_clip >= 0, f"must be >= 0 (0 disables), got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""
  tfds_data_dir: str = ""
  val_path: str = ""
  demo_examples: int = 8192
  demo_size: int = 32  # the demo images' side (64: the cascade demo's super-resolution stage, the same scenes)
  demo_buckets: tuple[tuple[int, int], ...] = ()  # ((h, w), …): demo scenes in these aspect buckets (hi-res stage)
  global_batch_size: int = 256
  text_dropout: float = 0.463
  label_dropout: float = 0.1
  num_threads: int = 4
  prefetch: int = 8
  text_tokens: int = 154  # context tokens where no dataset states them (--mode=compile): SD3's 77 CLIP + 77 T5
  resolution: int = 0  # image pixels where no dataset states them (--mode=compile); 0: the model's sample_size
  on_corrupt: str = "fail"  # a damaged record: fail naming it, or skip (replaced by the next readable, counted)
  # Pixels per latent cell along a side (SD3's VAE: 8; pixel-space data: 1), for shift_base_resolution;
  # 0: read from the dataset's metadata (its VAE, or "pixels": true) at start-up.
  latent_downsample: int = 0

  def __post_init__(self):
    _check("data.latent_downsample", self.latent_downsample >= 0, f"must be >= 0, got {self.latent_downsample}")
    _check("data.global_batch_size", self.global_batch_size > 0, f"must be positive, got {self.global_batch_size}")
    for name in ("text_dropout", "label_dropout"):
      rate = getattr(self, name)
      _check(f"data.{name}", 0 <= rate <= 1, f"is a probability in [0, 1], got {rate}")
    _check("data.num_threads", self.num_threads >= 1, f"must be >= 1, got {self.num_threads}")
    _check("data.demo_size", self.demo_size >= 8 and self.demo_size % 8 == 0,
           f"must be a multiple of 8 (32: the demo's own size), got {self.demo_size}")
    bad = [b for b in self.demo_buckets if len(b) != 2 or min(b) < 8 or b[0] % 8 or b[1] % 8]
    _check("data.demo_buckets", not bad, f"{bad}: (height, width) pairs of multiples of 8, e.g. ((48, 48), (32, 64))")
    _check("data.on_corrupt", self.on_corrupt in ("fail", "skip"), f"{self.on_corrupt!r}; valid: ['fail', 'skip']")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  ici: tuple[int, ...] = (-1, 1, 1, 1)  # sizes in MESH_AXES order within a slice; one −1 fills
  dcn: tuple[int, ...] = (-1, 1, 1, 1)  # across slices

  def named(self) -> dict:
    return {"ici": dict(zip(MESH_AXES, self.ici)), "dcn": dict(zip(MESH_AXES, self.dcn))}


# The sampler's time grid: `reference` is SD3's / diffusers' flow-matching grid (flow.samplers.reference_grid),
# `uniform` shift(linspace(1, 0, N + 1)), `log_snr` uniform in log-SNR (EDM); `auto` picks reference for rf,
# log_snr for the EDM processes and uniform for the others.
SAMPLE_SCHEDULES = ("auto", "reference", "uniform", "log_snr")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  sampler: str = "euler"  # key of flow.samplers.SAMPLERS
  steps: int = 28
  guidance: float = 4.0  # classifier-free guidance scale (1 = none)
  guidance_interval: tuple[float, float] = (0.0, 1.0)
  threshold: str = "none"  # none | static | dynamic
  percentile: float = 0.995
  seed: int = 0
  schedule: str = "auto"  # auto | reference | uniform | log_snr (see SAMPLE_SCHEDULES)
  shift: float = 0.0  # the grid's resolution shift; 0: the formulation's (with config.init, the scheduler's)
  train_timesteps: int = 1000  # the reference grid's σ_min = shift(1 / train_timesteps) (SD3: 1000)
  timesteps: tuple[float, ...] = ()  # an explicit grid of steps + 1 decreasing times ending at 0 (overrides)
  skip_layers: tuple[int, ...] = ()  # SD3.5's skip-layer guidance: MM-DiT layers skipped (SD3.5 Medium: 7, 8, 9)
  skip_scale: float = 2.8  # out += skip_scale · (cond − cond with skip_layers skipped), under guidance only
  skip_interval: tuple[float, float] = (0.01, 0.2)  # active for steps i with start·N < i < stop·N
  noise: str = ""  # .npy of initial noise (N, h, w, C) for --mode=sample (else drawn from seed)
  save_arrays: bool = False  # --mode=sample also writes images.npy (float32 in [0, 1], before PNG rounding)
  height: int = 0  # --mode=sample image size in pixels (0: the model's sample size); multiples of 16
  width: int = 0
  batch_size: int = 64  # --mode=sample: samples per call of the one compiled sampler (rounded up to the mesh)

  def __post_init__(self):
    samplers = flow.samplers
    _check("sample.schedule", self.schedule in SAMPLE_SCHEDULES, f"{self.schedule!r}; valid: {list(SAMPLE_SCHEDULES)}")
    _check("sample.shift", self.shift >= 0, f"must be > 0 (or 0: the formulation's), got {self.shift}")
    _check("sample.train_timesteps", self.train_timesteps >= 1, f"must be >= 1, got {self.train_timesteps}")
    _check("sample.skip_interval", len(self.skip_interval) == 2, f"is (start, stop), got {self.skip_interval}")
    object.__setattr__(self, "skip_layers", tuple(int(i) for i in self.skip_layers))
    ts = tuple(float(t) for t in self.timesteps)
    object.__setattr__(self, "timesteps", ts)
    _check("sample.timesteps", not ts or (len(ts) == self.steps + 1 and ts[0] <= 1.0 and ts[-1] == 0.0 and all(
        a > b for a, b in zip(ts, ts[1:]))), f"needs sample.steps + 1 = {self.steps + 1} strictly decreasing "
           f"times from at most 1 down to 0, got {ts}")
    _check("sample.height/width", self.height >= 0 and self.width >= 0 and self.height % 16 == 0 and
           self.width % 16 == 0, f"multiples of 16 (0: the model's size), got {self.height}×{self.width}")
    _check("sample.sampler", self.sampler in samplers.SAMPLERS,
           f"{self.sampler!r}; valid: {sorted(samplers.SAMPLERS)}")
    _check("sample.threshold", self.threshold in samplers.THRESHOLDS,
           f"{self.threshold!r}; valid: {sorted(samplers.THRESHOLDS)}")
    _check("sample.steps", self.steps >= 1, f"must be >= 1, got {self.steps}")
    _check("sample.batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
    _check("sample.guidance_interval", len(self.guidance_interval) == 2,
           f"is (t_low, t_high), got {self.guidance_interval}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_samples: int = 64  # samples per evaluation (grid, accuracy, FID, CLIP score)
  fid_network: str = "demo"  # demo | inception | none (mmdit_jax.fid)
  inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth or its .safetensors
  clip_score: str = ""  # hook 'package.module:factory' → (embed_images, embed_texts); '' → off
  clip: str = ""  # a transformers CLIPModel directory: clip_score (with captions) and cmmd, in JAX; '' → off

  def __post_init__(self):
    _check("eval.fid_network", self.fid_network in FID_NETWORKS, f"{self.fid_network!r}; valid: {list(FID_NETWORKS)}")
    _check("eval.num_samples", self.num_samples >= 2, f"must be at least 2, got {self.num_samples}")
    if self.clip:
      from etils import epath
      _check("eval.clip", (epath.Path(self.clip) / "config.json").is_file(),
             f"{self.clip!r} is not a transformers CLIPModel directory (no config.json there); e.g. a local copy "
             "of openai/clip-vit-large-patch14 with its tokenizer files")


@dataclasses.dataclass(frozen=True)
class EncodersConfig:
  root: str = ""  # a diffusers SD3 checkpoint directory (text_encoder*, tokenizer*, vae)
  clip_l: str = ""
  clip_g: str = ""
  t5: str = ""
  vae: str = ""
  clip_l_tokenizer: str = ""
  clip_g_tokenizer: str = ""
  t5_tokenizer: str = ""
  tokenizers: str = ""  # tokenizer/, tokenizer_2/, tokenizer_3/ for weights without them (single-file checkpoints)
  no_t5: bool = False  # zeros in T5's place (SD3 §5.3.2)
  t5_tokens: int = 256  # T5 sequence length when these encoders are given (diffusers' default 256; SD3 trained
  # on 77); a dataset's recorded encoders use the length it was precomputed with
  t5_truncate: bool = True  # False: SD3's reference code — T5 gets the prompt's first 226 characters, not cut,
  # padded to at least t5_tokens (set 77), so a long prompt has a longer context
  clip_skip: int = 0  # as diffusers' pipeline: CLIP states k layers before the penultimate (0: SD3's own)

  def __post_init__(self):
    _check("encoders.t5_tokens", self.t5_tokens >= 1, f"must be >= 1, got {self.t5_tokens}")
    _check("encoders.clip_skip", self.clip_skip >= 0, f"must be >= 0, got {self.clip_skip}")

  def get(self, key, default=None):  # the mapping view encoders.sd3.EncoderPaths.from_config reads
    return getattr(self, key, default)

  @property
  def given(self) -> bool:
    return bool(self.root or self.clip_l)


UPSAMPLE_METHODS = ("nearest", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class SRConfig:
  """A super-resolution stage of a cascade (Imagen §2.5): the model sees its target downsampled `factor`×,
  upsampled back and corrupted by the forward process at an augmentation level it is told."""
  factor: int = 0  # 0: a base model
  aug_max: float = 0.5  # training: t_aug ~ U(0, aug_max); 0: no noise-conditioning augmentation
  aug_level: float = 0.1  # sampling and validation: this fixed level
  upsample: str = "bilinear"  # one of UPSAMPLE_METHODS

  def __post_init__(self):
    _check("sr.factor", self.factor >= 0, f"must be >= 0 (0: not a super-resolution stage), got {self.factor}")
    _check("sr.aug_max", 0 <= self.aug_max <= 1, f"is a level in [0, 1], got {self.aug_max}")
    _check("sr.aug_level", 0 <= self.aug_level <= 1, f"is a level in [0, 1], got {self.aug_level}")
    _check("sr.upsample", self.upsample in UPSAMPLE_METHODS, f"{self.upsample!r}; valid: {list(UPSAMPLE_METHODS)}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA adapters on the backbone's linear layers (mmdit_jax.model.lora): only they train; the base weights
  (config.init) stay frozen and out of the optimizer state and the checkpoints."""
  rank: int = 0  # 0: off (every parameter trains)
  alpha: float = 0.0  # the delta is (alpha / rank)·A·B; 0 → alpha = rank (scale 1)
  dropout: float = 0.0  # input features of A dropped per step (the merged form's dropout; PEFT's is per token)
  targets: tuple[str, ...] = ("attn",)  # groups (model.lora.TARGET_GROUPS) or regular expressions of module paths
  base_dtype: str = "float32"  # the frozen base held in float32 | bfloat16 | int8 (per-channel scales)
  load: str = ""  # start from a diffusers/PEFT LoRA safetensors file (transformer.….lora_A.weight names)

  def __post_init__(self):
    from mmdit_jax.model import lora
    _check("lora.rank", self.rank >= 0, f"must be >= 0 (0: off), got {self.rank}")
    _check("lora.alpha", self.alpha >= 0, f"must be >= 0 (0: alpha = rank), got {self.alpha}")
    _check("lora.dropout", 0 <= self.dropout < 1, f"is a rate in [0, 1), got {self.dropout}")
    _check("lora.base_dtype", self.base_dtype in lora.BASE_DTYPES,
           f"{self.base_dtype!r}; valid: {list(lora.BASE_DTYPES)}")
    _check("lora.targets", bool(self.targets), f"names no layer; groups: {sorted(lora.TARGET_GROUPS)}")
    try:
      lora.patterns(self.targets)
    except ValueError as e:
      raise ConfigError(f"config.lora.targets: {e}") from None

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Diffusion-DPO (Wallace et al. 2023; SD3 §5.3) on preference pairs (latent = preferred, latent_rejected):
  loss = −log σ(−β/2 · [(e_w − e_w^ref) − (e_l − e_l^ref)]) with e the formulation's per-example loss at one
  shared t and noise, and the reference the frozen initial weights (with LoRA: the model without adapters)."""
  beta: float = 0.0  # 0: off (ordinary training)

  def __post_init__(self):
    _check("dpo.beta", self.beta >= 0, f"must be >= 0 (0: off), got {self.beta}")


@dataclasses.dataclass(frozen=True)
class DebugConfig:
  halt_at_step: int = 0  # checkpoint and exit at this step as if preempted (0: off)
  log_data_order: bool = False  # append each step's example indices to workdir/data_order.jsonl


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int
  total_steps: int
  formulation: flow.Formulation
  model: model.MMDiTConfig | model.DiTConfig | model.UNetConfig
  data: DataConfig
  optim: OptimConfig
  ema_decay: float
  max_nonfinite_steps: int
  mesh: MeshConfig
  sharding_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_every: int
  eval_batches: int
  sample_every: int
  force_eval: bool
  sample: SampleConfig
  eval: EvalConfig
  encoders: EncodersConfig
  debug: DebugConfig
  init: str = ""  # "diffusers:DIR": start from official SD3 weights (mmdit_jax.pretrained); "" random init
  microbatches: int = 1  # gradient accumulation: the global batch in this many sequential parts, one update
  xla_flags: str = "none"  # XLA / libtpu flag preset (mmdit_jax.xla_presets), set before JAX starts
  # > 0: the timestep shift per aspect bucket, α = √(H·W / base²) from the batch's pixel size (SD3 §5.3.2),
  # instead of config.shift for every batch; each bucket's program is compiled once with its α.
  shift_base_resolution: int = 0
  sr: SRConfig = SRConfig()  # a super-resolution stage (factor > 0) of a cascade
  lora: LoRAConfig = LoRAConfig()  # rank > 0: only LoRA adapters train, the base (config.init) is frozen
  dpo: DPOConfig = DPOConfig()  # beta > 0: Diffusion-DPO on preference pairs against the frozen initial weights
  source: str = ""  # the ConfigDict as JSON, as given (written to the workdir, compared across hosts)


def _plain(value):
  """ConfigDict → dict, lists → tuples, recursively."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def build(cls, node, where: str):
  """A frozen `cls` from the ConfigDict `node` (None → defaults); unknown keys name the valid fields."""
  values = _plain(node) if node is not None else {}
  if not isinstance(values, dict):
    raise ConfigError(f"config.{where} must be a group of fields, got {values!r}")
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ConfigError(f"config.{where} has unknown fields {unknown}; valid: {names}")
  try:
    return cls(**values)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{where}: {e}") from e


def model_config(node):
  """The backbone's frozen config from config.model: `name` picks the dataclass, the rest are its fields."""
  values = _plain(node)
  name = values.pop("name", None)
  if name not in model.BACKBONES:
    raise ConfigError(f"config.model.name={name!r}; valid: {sorted(model.BACKBONES)}")
  return build(model.BACKBONES[name], values, f"model (backbone {name!r})")


def sharding_rules(rules) -> tuple:
  """Validated (logical axis, mesh axes) pairs: known logical names, mesh axes of MESH_AXES or None."""
  out = []
  for rule in _plain(rules):
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"config.sharding_rules: each rule is (logical_axis, mesh_axes), got {rule!r}")
    logical, mesh_axes = rule
    if logical not in LOGICAL_AXES:
      raise ConfigError(f"config.sharding_rules: unknown logical axis {logical!r}; valid: {list(LOGICAL_AXES)}")
    names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"config.sharding_rules: {logical!r} maps to unknown mesh axes {bad}; valid: "
                        f"{list(MESH_AXES)} or None")
    out.append((logical, mesh_axes))
  seen = [r[0] for r in out]
  dupes = sorted({n for n in seen if seen.count(n) > 1})
  if dupes:
    raise ConfigError(f"config.sharding_rules: logical axes {dupes} have more than one rule")
  return tuple(out)


TOP_LEVEL = ("seed", "total_steps", "formulation", "shift", "model", "data", "optim", "ema_decay",
             "max_nonfinite_steps", "mesh", "sharding_rules", "log_every", "checkpoint_every",
             "keep_checkpoints", "eval_every", "eval_batches", "sample_every", "force_eval", "sample", "eval",
             "encoders", "debug", "init", "microbatches", "xla_flags", "shift_base_resolution", "sr", "lora", "dpo")


def from_config_dict(c) -> TrainConfig:
  """The run's TrainConfig; raises ConfigError naming the first bad field."""
  unknown = sorted(set(c.keys()) - set(TOP_LEVEL))
  if unknown:
    raise ConfigError(f"config has unknown fields {unknown}; valid: {list(TOP_LEVEL)}")
  try:
    formulation = flow.parse_formulation(c.formulation, shift=float(c.get("shift", 1.0)))
  except ValueError as e:
    raise ConfigError(f"config.formulation: {e}") from e
  _check("ema_decay", 0 <= c.ema_decay < 1, f"must be in [0, 1), got {c.ema_decay}")
  _check("total_steps", c.total_steps > 0, f"must be positive, got {c.total_steps}")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "eval_batches"):
    _check(name, c[name] > 0, f"must be positive, got {c[name]}")
  for name in ("eval_every", "sample_every"):
    _check(name, c[name] >= 0, f"must be >= 0 (0: off), got {c[name]}")
  xla_presets.check(str(c.get("xla_flags", "none")))
  microbatches = int(c.get("microbatches", 1))
  shift_base = int(c.get("shift_base_resolution", 0))
  _check("shift_base_resolution", shift_base >= 0, f"must be >= 0 (0: config.shift for every batch), got {shift_base}")
  _check("shift_base_resolution", not (shift_base and float(c.get("shift", 1.0)) != 1.0),
         f"{shift_base} derives α per bucket, and config.shift={c.shift} sets one α for every batch: set one of them")
  _check("microbatches", microbatches >= 1 and c.data.global_batch_size % microbatches == 0,
         f"must be >= 1 and divide data.global_batch_size {c.data.global_batch_size}, got {microbatches}")
  mesh = MeshConfig(ici=axis_sizes(_plain(c.mesh.ici), "config.mesh.ici"),
                    dcn=axis_sizes(_plain(c.mesh.dcn), "config.mesh.dcn"))
  unknown = sorted(set(c.mesh.keys()) - {"ici", "dcn"})
  if unknown:
    raise ConfigError(f"config.mesh has unknown fields {unknown}; valid: ['ici', 'dcn']")
  model_cfg, sample_cfg = model_config(c.model), build(SampleConfig, c.sample, "sample")
  sr = build(SRConfig, c.get("sr"), "sr")
  lowres = getattr(model_cfg, "lowres_channels", 0)
  _check("sr.factor", bool(sr.factor) == bool(lowres),
         f"{sr.factor} with config.model.lowres_channels={lowres}: a super-resolution stage sets both (factor > 0 "
         "and lowres_channels = the data's channels), a base model neither")
  _check("model.lowres_channels", not lowres or lowres == model_cfg.in_channels,
         f"{lowres}: the low-res input is the target downsampled, so it has the target's "
         f"{model_cfg.in_channels} channels (model.in_channels)")
  lora = build(LoRAConfig, c.get("lora"), "lora")
  dpo = build(DPOConfig, c.get("dpo"), "dpo")
  for name, value in (("lora.rank", lora.rank), ("dpo.beta", dpo.beta)):
    _check(name, not value or c.get("init"), f"{value} fine-tunes existing weights: set config.init (run:DIR, "
           "run-ema:DIR or diffusers:DIR) to the model to adapt")
  if sample_cfg.skip_layers and not c.get("init"):  # (with init, the weights define the model: checked then)
    _check("sample.skip_layers", isinstance(model_cfg, model.MMDiTConfig),
           f"skip-layer guidance is for MM-DiT; config.model is {type(model_cfg).__name__}")
    bad = [i for i in sample_cfg.skip_layers if not 0 <= i < model_cfg.depth]
    _check("sample.skip_layers", not bad, f"{bad} outside the model's layers 0..{model_cfg.depth - 1}")
  return TrainConfig(
      seed=int(c.seed), total_steps=int(c.total_steps), formulation=formulation, model=model_cfg,
      data=build(DataConfig, c.data, "data"), optim=build(OptimConfig, c.optim, "optim"),
      ema_decay=float(c.ema_decay), max_nonfinite_steps=int(c.max_nonfinite_steps), mesh=mesh,
      sharding_rules=sharding_rules(c.sharding_rules), log_every=int(c.log_every),
      checkpoint_every=int(c.checkpoint_every), keep_checkpoints=int(c.keep_checkpoints),
      eval_every=int(c.eval_every), eval_batches=int(c.eval_batches), sample_every=int(c.sample_every),
      force_eval=bool(c.force_eval), sample=sample_cfg,
      eval=build(EvalConfig, c.eval, "eval"), encoders=build(EncodersConfig, c.encoders, "encoders"),
      debug=build(DebugConfig, c.debug, "debug"), init=str(c.get("init", "")), microbatches=microbatches,
      xla_flags=str(c.get("xla_flags", "none")), shift_base_resolution=shift_base, sr=sr,
      lora=lora, dpo=dpo,
      source=json.dumps(_plain(c), sort_keys=True, default=str))


def check_mesh_and_batch(cfg: TrainConfig, devices):
  """Mesh sizes against the devices and the batch against the data-parallel size and process count
  (counted from `devices`, so a compile-only TPU topology is checked like a real one)."""
  slices = num_slices(devices)
  dcn = fill_sizes(cfg.mesh.dcn, slices, "config.mesh.dcn")
  ici = fill_sizes(cfg.mesh.ici, len(devices) // slices, "config.mesh.ici")
  dp = ici[0] * ici[1] * dcn[0] * dcn[1]
  b = cfg.data.global_batch_size
  if b % dp:
    raise ConfigError(f"config.data.global_batch_size={b} is not divisible by the data-parallel size {dp} "
                      f"(mesh data × fsdp); use a multiple of {dp}")
  if (b // cfg.microbatches) % dp:
    raise ConfigError(f"config.microbatches={cfg.microbatches}: a microbatch of {b // cfg.microbatches} is not "
                      f"divisible by the data-parallel size {dp}; use a global batch that is a multiple of "
                      f"{cfg.microbatches * dp}")
  heads = getattr(cfg.model, "heads", 1)
  attn_axes = dict(cfg.sharding_rules).get("act_attn_heads") or ()
  attn_axes = (attn_axes,) if isinstance(attn_axes, str) else attn_axes
  split = math.prod(ici[MESH_AXES.index(a)] * dcn[MESH_AXES.index(a)] for a in attn_axes)
  if heads % split:
    raise ConfigError(f"the model's {heads} attention heads cannot be split {split} ways (act_attn_heads: mesh axes "
                      f"{list(attn_axes)} — with a 'sequence' axis, attention splits heads over tensor × sequence); "
                      f"choose sizes whose product divides {heads}")
  processes = len({d.process_index for d in devices})
  if b % processes:
    raise ConfigError(f"config.data.global_batch_size={b} is not divisible by {processes} processes")
  return ici, dcn
