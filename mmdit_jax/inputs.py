"""Which datasets a run reads, the configured one or the embedded demo, checked against the model before
anything compiles: one choice for training, evaluation and sampling."""

from __future__ import annotations

from mmdit_jax import data, pretrained
from mmdit_jax.config import TrainConfig
from mmdit_jax.data import demo
from mmdit_jax.errors import ConfigError
from mmdit_jax.metrics import log


def is_demo(cfg: TrainConfig) -> bool:
  """No dataset named and no official weights to start from: the embedded demo."""
  return not cfg.data.path and not pretrained.is_official(cfg)


def demo_kind(cfg: TrainConfig) -> str:
  """The demo for the backbone: captioned scenes for text conditioning (preference pairs of them for DPO),
  labelled objects for classes."""
  if "label" in cfg.model.cond_features:
    return "classes"
  return "pairs" if cfg.dpo.beta else "text"


DEMO_TASK = "demo_task"  # metadata key: a dataset of the demo's scenes, scored by the demo's checker


def evaluation_demo(cfg: TrainConfig) -> str | None:
  """The demo task whose checker scores a run's samples (compositional or class accuracy, on the demo's fixed
  captions or labels): the embedded demo's, or that of a dataset whose metadata names one ("demo_task": text |
  classes — e.g. the on-policy DPO pairs of benchmarks/dpo_pairs.py, drawn from the demo's captions); else None."""
  if is_demo(cfg):
    return demo_kind(cfg)
  if not cfg.data.path or cfg.data.path.startswith("tfds:"):
    return None
  task = data.load_metadata(cfg.data.path).extras.get(DEMO_TASK)
  if task not in (None, "text", "classes"):
    raise ConfigError(f"{cfg.data.path}: metadata {DEMO_TASK}={task!r}; valid: 'text', 'classes' (or none)")
  return task


def pixel_space(cfg: TrainConfig) -> bool:
  """Whether the dataset's "latents" are images in [−1, 1] (metadata "pixels": true; the demos are), so
  samples need no VAE to be viewed and scored."""
  if is_demo(cfg):
    return True
  if not cfg.data.path or cfg.data.path.startswith("tfds:"):  # (no data: official weights, latent space)
    return False
  return bool(data.load_metadata(cfg.data.path).extras.get("pixels", False))


def dataset_paths(cfg: TrainConfig, *, announce: bool = True) -> tuple[str, str]:
  """(train path, held-out path): the configured dataset (validation: data.val_path, else the training
  data), or the embedded demo, written on first use. Fails now, naming the path, if one is incomplete."""
  if cfg.data.path:
    val = cfg.data.val_path or cfg.data.path
    for p in {cfg.data.path, val}:
      if not p.startswith("tfds:"):
        data.load_metadata(p)
    return cfg.data.path, val
  if pretrained.is_official(cfg):
    raise ConfigError(f"config.init={cfg.init!r} fine-tunes official weights on a dataset: set config.data.path "
                      "to precomputed latents with the same encoders (python -m mmdit_jax.precompute)")
  kind = demo_kind(cfg)
  if announce:
    log(f"config.data.path is empty: using the embedded demo dataset ({kind}; written on first use)")
  size, buckets = cfg.data.demo_size, cfg.data.demo_buckets
  train = demo.ensure_demo("train", cfg.data.demo_examples, kind=kind, size=size, buckets=buckets)
  return train, cfg.data.val_path or demo.ensure_demo("validation", kind=kind, size=size, buckets=buckets)


def check_data_fits_model(meta: data.Metadata, model_cfg, path: str):
  """Data shapes against the model, so a mismatch fails before compiling."""
  names = [f.name for f in meta.features]
  latent = meta.feature("latent")
  if latent.shape[-1] != model_cfg.in_channels:
    raise ConfigError(f"{path}: latents have {latent.shape[-1]} channels but config.model.in_channels="
                      f"{model_cfg.in_channels}")
  for feat in model_cfg.cond_features:
    if feat not in names:
      raise ConfigError(f"{path}: {type(model_cfg).__name__} is conditioned on {list(model_cfg.cond_features)}; "
                        f"the dataset has {names}")
  if "context" in model_cfg.cond_features:
    for feat, width in (("context", model_cfg.context_dim), ("pooled", model_cfg.pooled_dim)):
      if meta.feature(feat).shape[-1] != width:
        raise ConfigError(f"{path}: {feat} width {meta.feature(feat).shape[-1]} != config.model.{feat}_dim {width}")
  if "label" in model_cfg.cond_features:
    classes = meta.extras.get("num_classes")
    if classes is not None and int(classes) > model_cfg.num_classes:
      raise ConfigError(f"{path}: {classes} classes but config.model.num_classes={model_cfg.num_classes}")


def _pipeline(cfg: TrainConfig, path: str, **kw) -> data.PipelineConfig:
  return data.PipelineConfig(path, cfg.data.global_batch_size, num_threads=cfg.data.num_threads,
                             prefetch=cfg.data.prefetch, tfds_data_dir=cfg.data.tfds_data_dir,
                             on_corrupt=cfg.data.on_corrupt, **kw)


def training_set(cfg: TrainConfig, path: str) -> data.Dataset:
  """The shuffled training data with SD3's per-encoder text dropout (or label dropout for classes)."""
  ds = data.Dataset(_pipeline(cfg, path, seed=cfg.seed, label_dropout=cfg.data.label_dropout,
                              text_dropout=(("*", cfg.data.text_dropout),)))
  check_data_fits_model(ds.meta, cfg.model, path)
  check_pairs(cfg, ds.meta, path)
  return ds


def check_pairs(cfg: TrainConfig, meta: data.Metadata, path: str):
  """DPO (config.dpo.beta > 0) trains on preference pairs: the data must hold latent_rejected like latent."""
  if not cfg.dpo.beta:
    return
  names = [f.name for f in meta.features]
  if "latent_rejected" not in names:
    raise ConfigError(f"config.dpo.beta={cfg.dpo.beta}: {path} has no preference pairs (features {names}; DPO needs "
                      "latent_rejected: precompute a manifest with an image_rejected column, or leave data.path "
                      "empty for the pairs demo)")
  if meta.feature("latent_rejected").shape != meta.feature("latent").shape:
    raise ConfigError(f"{path}: latent_rejected {meta.feature('latent_rejected').shape} and latent "
                      f"{meta.feature('latent').shape} differ in shape")


def evaluation_set(cfg: TrainConfig, path: str) -> data.Dataset:
  """Held-out data in file order, without dropout: validation loss and reference images."""
  ds = data.Dataset(_pipeline(cfg, path, shuffle=False, text_dropout=()))
  check_data_fits_model(ds.meta, cfg.model, path)
  check_pairs(cfg, ds.meta, path)
  return ds


def latent_shape(ds: data.Dataset) -> tuple[int, int, int]:
  """(h, w, C) of the latents (the first bucket's when they vary)."""
  shape = ds.meta.feature("latent").shape
  if None in shape[:2]:
    return tuple(int(x) for x in ds.bucket_shapes[0])
  return tuple(int(x) for x in shape)


def text_tokens(ds: data.Dataset) -> int:
  names = [f.name for f in ds.meta.features]
  return int(ds.meta.feature("context").shape[0]) if "context" in names else 0


SD3_VAE_DOWNSAMPLE = 8  # SD3's autoencoder: 8× fewer latent cells per side than pixels


def with_latent_downsample(cfg: TrainConfig) -> TrainConfig:
  """cfg with data.latent_downsample known where config.shift_base_resolution needs it (α per bucket from the
  bucket's pixels): 1 for pixel-space data (the demos, "pixels": true), the recorded VAE's factor for
  precomputed latents, SD3's 8 for latents the metadata does not describe or for official weights (init)."""
  import dataclasses
  if not cfg.shift_base_resolution or cfg.data.latent_downsample:
    return cfg
  if not cfg.data.path:
    factor = SD3_VAE_DOWNSAMPLE if pretrained.is_official(cfg) else 1  # (the embedded demos: pixels)
  elif cfg.data.path.startswith("tfds:"):
    raise ConfigError("config.shift_base_resolution on a TFDS source: set config.data.latent_downsample (pixels "
                      "per latent cell: 8 for SD3's VAE, 1 for images)")
  else:
    extras = data.load_metadata(cfg.data.path).extras
    vae = (extras.get("encoders") or {}).get("vae") or {}
    blocks = (vae.get("config") or {}).get("block_out_channels")
    factor = 1 if extras.get("pixels") else 2 ** (len(blocks) - 1) if blocks else SD3_VAE_DOWNSAMPLE
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, latent_downsample=factor))
