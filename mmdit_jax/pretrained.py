"""Official weights as a starting point: `config.init = "diffusers:DIR"`.

DIR is a diffusers SD3 pipeline directory (transformer/, text_encoder*/, tokenizer*/, vae/, scheduler/),
just an SD3Transformer2DModel directory or .safetensors file, or an SD3 / SD3.5 single-file checkpoint
(sd3_medium_incl_clips_t5xxlfp8.safetensors, sd3.5_large.safetensors, …) whose bundled text encoders and
VAE become config.encoders (their tokenizers: config.encoders.tokenizers). `resolve` makes the run's config agree with
the weights before anything compiles: the model's architecture is read from the checkpoint (the config's
compute fields — dtype, attention, remat, scan_layers — are kept), the pipeline's scheduler shift becomes
the formulation's shift, and its encoders become `config.encoders` unless those are given. `--mode=sample`
then samples the imported weights with no workdir checkpoint; training starts from them (EMA included).
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath

from mmdit_jax.config import TrainConfig
from mmdit_jax.errors import ConfigError

KINDS = ("diffusers",)
RUNTIME_FIELDS = ("dtype", "attention", "remat", "scan_layers")  # not in the weights: kept from the config


def parse(init: str) -> tuple[str, epath.Path]:
  kind, sep, path = init.partition(":")
  if not sep or kind not in KINDS or not path:
    raise ConfigError(f"config.init={init!r}: expected 'diffusers:/path/to/sd3-diffusers' (kinds: {list(KINDS)})")
  root = epath.Path(path)
  if not root.exists():
    raise ConfigError(f"config.init: {root} does not exist")
  return kind, root


def _transformer_path(root: epath.Path) -> epath.Path:
  return root / "transformer" if (root / "transformer").is_dir() else root


def resolve(cfg: TrainConfig):
  """(cfg agreeing with the weights, load) for config.init, where load(mesh) reads the parameters tensor by
  tensor straight into their shardings on `mesh` (called only when no checkpoint is restored instead);
  (cfg, None) without one."""
  if not cfg.init:
    return cfg, None
  from mmdit_jax import model
  from mmdit_jax.model.convert import convert_state_dict, read_diffusers
  _, root = parse(cfg.init)
  if not isinstance(cfg.model, model.MMDiTConfig):
    raise ConfigError(f"config.init={cfg.init!r} imports an SD3 transformer; config.model is "
                      f"{type(cfg.model).__name__} (use configs/rf_lognorm.py)")
  keep = {f: getattr(cfg.model, f) for f in RUNTIME_FIELDS}
  model_cfg, tensors = read_diffusers(_transformer_path(root), **keep)
  changes = {"model": model_cfg}
  scheduler = root / "scheduler" / "scheduler_config.json"
  if scheduler.exists():
    shift = float(json.loads(scheduler.read_text()).get("shift", 1.0))
    changes["formulation"] = dataclasses.replace(cfg.formulation, shift=shift)
  if not cfg.encoders.given and (root / "text_encoder").is_dir():
    changes["encoders"] = dataclasses.replace(cfg.encoders, root=str(root))
  elif not cfg.encoders.given and root.is_file():  # a single file: the encoders it bundles, if any
    from mmdit_jax.encoders.convert import bundled_parts
    from mmdit_jax.model.weights import load_safetensors
    bundled = bundled_parts(load_safetensors(root, lazy=True)[0])  # (the header only)
    if bundled:
      changes["encoders"] = dataclasses.replace(cfg.encoders, **{role: str(root) for role in bundled})
  bad = [i for i in cfg.sample.skip_layers if not 0 <= i < model_cfg.depth]
  if bad:
    raise ConfigError(f"config.sample.skip_layers: {bad} outside the imported model's layers 0..{model_cfg.depth - 1}")
  rules = cfg.sharding_rules

  def load(mesh):
    return convert_state_dict(tensors, model_cfg, model.param_shardings(model_cfg, mesh, rules))
  return dataclasses.replace(cfg, **changes), load
