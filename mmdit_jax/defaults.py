"""Every config field the system reads, with its default and a comment: what `configs/*.py` start from.

A config file is `get_config(arg) -> ConfigDict` built on `base_config(...)`; `--config.x=…` overrides
any field. `c.model` holds every field of the chosen backbone's dataclass (seeded from it; the comments
are on the dataclass: `mmdit_jax/model/mmdit.py` MMDiTConfig, `model/dit.py` DiTConfig). Config files
import only this package, so they load from any working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

from mmdit_jax import model
from mmdit_jax.data.pipeline import SD3_TEXT_DROPOUT
from mmdit_jax.errors import ConfigError
from mmdit_jax.parallel.mesh import DEFAULT_RULES, MESH_AXES


def typed_value(raw: str, like):
  """The command-line text `raw` as a value of `like`'s type (bool: 1/true/yes); ValueError if it is not one."""
  kind = type(like)
  return (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,steps=300' → a ConfigDict of `defaults` overridden by the arg (values keep their type)."""
  cfg = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in cfg:
      raise ConfigError(f"unknown config arg {key!r} in {arg!r}; valid: {sorted(cfg.keys())}")
    try:
      cfg[key] = typed_value(value, defaults[key])
    except ValueError as e:
      raise ConfigError(f"config arg {key}={value!r} is not a {type(defaults[key]).__name__}") from e
  return cfg


def _optional_type(hint):
  """T of `T | None` (a placeholder's type), or None when the hint is not optional."""
  args = typing.get_args(hint)
  if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
    return next(a for a in args if a is not type(None))
  return None


def model_fields(name: str, **overrides) -> ml_collections.ConfigDict:
  """`name` plus every field of backbone `name`'s config dataclass, at its default or `overrides`.

  Fields whose default is None (e.g. MM-DiT's hidden_size: 64·depth) become typed placeholders, so
  `--config.model.hidden_size=256` works from the command line.
  """
  if name not in model.BACKBONES:
    raise ConfigError(f"unknown backbone {name!r}; valid: {sorted(model.BACKBONES)}")
  cls = model.BACKBONES[name]
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ConfigError(f"{cls.__name__} has no fields {unknown}; valid: {[f.name for f in dataclasses.fields(cls)]}")
  c = ml_collections.ConfigDict()
  c.name = name
  for f in dataclasses.fields(cls):
    value = overrides.get(f.name, f.default)
    optional = _optional_type(hints[f.name])
    c[f.name] = config_dict.placeholder(optional) if value is None and optional else value
  return c


def mesh_sizes(**sizes) -> ml_collections.ConfigDict:
  """{axis: size} over every mesh axis (default 1; one −1 fills the rest)."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
  return ml_collections.ConfigDict({a: int(sizes.get(a, 1)) for a in MESH_AXES})


def encoders_config() -> ml_collections.ConfigDict:
  """Where the frozen SD3 encoders live: `root` is a diffusers SD3 checkpoint directory (text_encoder*,
  tokenizer*, vae); the per-role fields override its layout. Empty everywhere → the paths recorded in
  the dataset's metadata by the precompute job."""
  e = ml_collections.ConfigDict()
  e.root = ""
  for role in ("clip_l", "clip_g", "t5", "vae"):
    e[role] = ""
  for role in ("clip_l", "clip_g", "t5"):
    e[f"{role}_tokenizer"] = ""
  e.tokenizers = ""  # tokenizer/, tokenizer_2/, tokenizer_3/ for weights that lack them (SD3 single files)
  e.no_t5 = False  # inference without T5: zeros in its place (SD3 §5.3.2)
  e.clip_skip = 0  # as diffusers' pipeline: CLIP states k layers before the penultimate (0: SD3's own)
  return e


# Inference settings of SD3's and SD3.5's reference code (Stability-AI/sd3.5, sd3_infer.py CONFIGS; its
# images are 1024²), and of diffusers' StableDiffusion3Pipeline with its default scheduler. `*_slg` is the
# reference run with --skip_layer_cfg: SD3.5 Medium's skip-layer guidance (layers 7-9, scale 2.5, steps in
# (1 %, 20 %) of the run). The reference's own guidance for that case (its config says 4.0) is assigned to a
# variable it then does not use, so its images are made at 5.0, as here.
REFERENCE_SAMPLING = {
    "sd3_medium": dict(sampler="dpmpp_2m_sd3", steps=50, guidance=5.0, shift=1.0),
    "sd3.5_medium": dict(sampler="dpmpp_2m_sd3", steps=50, guidance=5.0, shift=3.0),
    "sd3.5_medium_slg": dict(sampler="dpmpp_2m_sd3", steps=50, guidance=5.0, shift=3.0, skip_layers=(7, 8, 9),
                             skip_scale=2.5, skip_interval=(0.01, 0.2)),
    "sd3.5_large": dict(sampler="dpmpp_2m_sd3", steps=40, guidance=4.5, shift=3.0),
    "sd3.5_large_turbo": dict(sampler="euler", steps=4, guidance=1.0, shift=3.0),
    "diffusers": dict(sampler="euler", steps=28, guidance=7.0, shift=0.0),  # the shift: the scheduler's
}


def reference_sampling(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets c.sample to a REFERENCE_SAMPLING entry (reference grid, 1024² images)."""
  if name not in REFERENCE_SAMPLING:
    raise ConfigError(f"sampling={name!r}; valid: {sorted(REFERENCE_SAMPLING)}")
  c.sample.schedule = "reference"
  c.sample.height = c.sample.width = 1024
  for key, value in REFERENCE_SAMPLING[name].items():
    c.sample[key] = value
  return c


def base_config(backbone: str = "mmdit", **model_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.formulation = "rf/lognorm(0.00, 1.00)"  # any of mmdit_jax.flow.PAPER_FORMULATIONS
  c.shift = 1.0  # resolution-dependent timestep shift α (SD3 uses 3.0 at 1024²)
  c.shift_base_resolution = 0  # > 0: α per aspect bucket, √(H·W / base²) (SD3 §5.3.2); 0: config.shift always
  c.model = model_fields(backbone, **model_overrides)

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # precomputed dataset directory, or "tfds:NAME[:SPLIT]"; "" → the embedded demo dataset
  c.data.tfds_data_dir = ""  # TFDS data_dir for a "tfds:" path (prepared with file_format=array_record)
  c.data.val_path = ""  # held-out split for validation loss; "" → the demo validation split, or data.path
  c.data.demo_examples = 8192  # size of the demo training split (when data.path is empty)
  c.data.demo_size = 32  # the demo images' side (64: the same scenes for the cascade demo's super-resolution stage)
  c.data.demo_buckets = ()  # ((h, w), …): the demo's scenes in aspect-ratio buckets (configs/rf_lognorm.py stage=hires)
  c.data.global_batch_size = 256
  c.data.on_corrupt = "fail"  # a damaged record: fail naming it and the verifier, or skip (replaced, counted)
  c.data.text_dropout = SD3_TEXT_DROPOUT  # per text encoder, independently (SD3: 46.3 % → ≈10 % fully unconditional)
  c.data.label_dropout = 0.1  # class-conditional: null-class rate for classifier-free guidance
  c.data.num_threads = 4  # grain reader threads
  c.data.prefetch = 8  # batches decoded ahead
  c.data.text_tokens = 154  # context tokens where no dataset states them (--mode=compile): SD3's 77 CLIP + 77 T5
  c.data.resolution = 0  # image pixels where no dataset states them (--mode=compile); 0: the model's sample_size
  c.data.latent_downsample = 0  # pixels per latent cell (VAE 8, pixels 1) for shift_base_resolution; 0: from the data

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.schedule = "constant"  # constant | cosine | linear (decay after warm-up to 0 at total_steps)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # 1e-15 for the QK-norm recipe
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables

  c.ema_decay = 0.9999
  c.max_nonfinite_steps = 10  # stop after this many consecutive non-finite steps
  c.microbatches = 1  # gradient accumulation: each step's global batch in this many sequential microbatches
  c.xla_flags = "none"  # XLA/libtpu flag preset: none | tpu_overlap | tpu_overlap_dp | gpu_overlap (xla_presets)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = mesh_sizes(data=-1)  # within a slice, per axis: --config.mesh.ici.fsdp=-1 --config.mesh.ici.data=1
  c.mesh.dcn = mesh_sizes(data=-1)  # across slices (multi-slice TPU pods)
  # Logical axis → mesh axes (None: replicated); model code names logical axes only.
  c.sharding_rules = DEFAULT_RULES

  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 0  # validation loss every k steps (0: only at the end)
  c.eval_batches = 4  # held-out batches per validation
  c.sample_every = 0  # sample evaluation (grid, FID, demo accuracy) every k steps and at the end (0: off)
  c.init = ""  # "diffusers:/path/to/sd3-diffusers" (official weights), "run:WORKDIR" / "run-ema:WORKDIR" (another
  # run's newest parameters / EMA weights): the start of sampling or fine-tuning ("" random init)
  c.force_eval = False  # re-run the final evaluation of a finished run instead of reporting its results.json

  c.sample = ml_collections.ConfigDict()  # sampling in training's sample evaluation, --mode=eval and --mode=sample
  c.sample.sampler = "euler"  # euler | heun | ddim | dpmpp_2m | dpmpp_2m_sd3 (SD3.5's reference DPM++ 2M)
  c.sample.steps = 28
  c.sample.guidance = 4.0  # classifier-free guidance scale (1: none)
  c.sample.guidance_interval = (0.0, 1.0)  # guidance only for t in this interval
  c.sample.threshold = "none"  # none | static | dynamic (Imagen)
  c.sample.percentile = 0.995  # dynamic thresholding's quantile
  c.sample.seed = 0  # noise of sample i: fold_in(key(seed), i)
  c.sample.schedule = "auto"  # time grid: auto | reference (SD3/diffusers) | uniform | log_snr (EDM)
  c.sample.train_timesteps = 1000  # the reference grid's σ_min = shift(1/train_timesteps), as SD3
  c.sample.timesteps = ()  # explicit grid: steps + 1 decreasing times ending at 0 (overrides schedule)
  c.sample.shift = 0.0  # the sampling grid's shift (0: the formulation's; with config.init, the scheduler's)
  c.sample.skip_layers = ()  # SD3.5 skip-layer guidance: layers to skip, e.g. (7, 8, 9) for SD3.5 Medium
  c.sample.skip_scale = 2.8  # its scale (diffusers' and SD3.5's default)
  c.sample.skip_interval = (0.01, 0.2)  # active for steps i with start·N < i < stop·N
  c.sample.noise = ""  # --mode=sample: .npy of initial noise (N, h, w, C); else drawn from the seeds
  c.sample.save_arrays = False  # --mode=sample: also images.npy, float32 in [0, 1] before PNG rounding
  c.sample.height = 0  # --mode=sample: image size in pixels, multiples of 16 (0: the model's sample size)
  c.sample.width = 0
  c.sample.batch_size = 64  # --mode=sample: samples per call of the one compiled sampler (more: further calls)

  c.eval = ml_collections.ConfigDict()  # sample evaluation
  c.eval.num_samples = 64  # samples per evaluation (grid, accuracy, FID, CLIP score)
  c.eval.fid_network = "demo"  # demo | inception | none
  c.eval.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth (or .safetensors) for "inception"
  c.eval.clip_score = ""  # 'package.module:factory' returning (embed_images, embed_texts)
  c.eval.clip = ""  # a transformers CLIPModel directory (e.g. clip-vit-large-patch14): CLIP score and CMMD in JAX

  c.encoders = encoders_config()  # --mode=sample --prompt on a precomputed (non-demo) dataset
  c.encoders.t5_tokens = 256  # T5 length with these encoders (diffusers' default; 77 as SD3 trained)
  c.encoders.t5_truncate = True  # False: SD3's reference — the prompt's first 226 characters, padded to ≥ t5_tokens

  c.sr = ml_collections.ConfigDict()  # a super-resolution stage (Imagen's cascade): set factor and model.lowres_channels
  c.sr.factor = 0  # k > 0: conditioned on its target downsampled k× (area mean), upsampled back; 0: a base model
  c.sr.aug_max = 0.5  # noise-conditioning augmentation in training: level t_aug ~ U(0, aug_max) (0: none)
  c.sr.aug_level = 0.1  # the fixed level at sampling and in validation (a cascade stage may override it)
  c.sr.upsample = "bilinear"  # low-res → target size: nearest | bilinear | bicubic

  c.lora = ml_collections.ConfigDict()  # LoRA fine-tuning of config.init's weights (mmdit_jax.model.lora)
  c.lora.rank = 0  # r > 0: only rank-r adapters train; the base stays frozen, out of optimizer state and checkpoints
  c.lora.alpha = 0.0  # delta = (alpha / r)·A·B; 0 → alpha = r
  c.lora.dropout = 0.0  # adapter input features dropped per step (PEFT drops per token)
  c.lora.targets = ("attn",)  # groups attn | mlp | mod | context_embedder | embedders | all_linear, or regexes
  c.lora.base_dtype = "float32"  # the frozen base in float32 | bfloat16 | int8
  c.lora.load = ""  # adapters to start from: a diffusers/PEFT LoRA .safetensors (e.g. one exported here)

  c.dpo = ml_collections.ConfigDict()  # Diffusion-DPO on preference pairs (SD3 §5.3), against config.init's weights
  c.dpo.beta = 0.0  # β > 0: on (the data needs latent_rejected: precompute with image_rejected, or the pairs demo)

  c.debug = ml_collections.ConfigDict()
  c.debug.halt_at_step = 0  # checkpoint and exit at this step as if preempted (0: off; tests, debugging)
  c.debug.log_data_order = False  # append each step's example indices to workdir/data_order.jsonl
  return c
