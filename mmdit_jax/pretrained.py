"""Weights as a starting point: official ones (`config.init = "diffusers:DIR"`) or another run's
(`config.init = "run:WORKDIR"`, its newest checkpoint's parameters; `"run-ema:WORKDIR"`, its EMA weights) —
e.g. SD3's high-resolution fine-tune starting from the 256² run (configs/rf_lognorm.py:…,stage=hires,base_run=DIR).
The optimizer starts fresh and the EMA starts at the initial weights, as with official weights.

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

KINDS = ("diffusers", "run", "run-ema")
RUNTIME_FIELDS = ("dtype", "attention", "remat", "scan_layers")  # not in the weights: kept from the config


def parse(init: str) -> tuple[str, epath.Path]:
  kind, sep, path = init.partition(":")
  if not sep or kind not in KINDS or not path:
    raise ConfigError(f"config.init={init!r}: expected 'diffusers:/path/to/sd3-diffusers', 'run:/path/to/workdir' "
                      f"or 'run-ema:/path/to/workdir' (kinds: {list(KINDS)})")
  root = epath.Path(path)
  if not root.exists():
    raise ConfigError(f"config.init: {root} does not exist")
  return kind, root


def is_official(cfg: TrainConfig) -> bool:
  """config.init names official (diffusers / single-file) weights, whose encoders and VAE come with them."""
  return cfg.init.startswith("diffusers:")


def _from_run(cfg: TrainConfig, kind: str, root: epath.Path):
  """(cfg, load) for init from another run's newest checkpoint: its parameters (or EMA), restored with that
  run's own config (optimizer included, so any schedule restores), placed in this run's shardings."""
  import ml_collections

  from mmdit_jax import config as config_lib
  from mmdit_jax.checkpoint import Checkpointer
  from mmdit_jax.state import WEIGHTS, make_optimizer, restore_latest
  source = root / "config.json"
  if not source.is_file() or not (root / "checkpoints").is_dir():
    raise ConfigError(f"config.init={cfg.init!r}: {root} is not a training workdir (config.json and checkpoints/)")
  src = config_lib.from_config_dict(ml_collections.ConfigDict(json.loads(source.read_text())))
  runtime = {f: getattr(cfg.model, f) for f in RUNTIME_FIELDS if hasattr(cfg.model, f)}
  if dataclasses.replace(src.model, **runtime) != cfg.model:
    raise ConfigError(f"config.init={cfg.init!r}: that run's model {src.model} is not this config's {cfg.model} "
                      f"(only {list(RUNTIME_FIELDS)} may differ)")
  rules = cfg.sharding_rules

  def load(mesh):
    if src.lora.rank > 0:  # a LoRA run: its adapters merged into its own base
      from mmdit_jax.state import restore_for_eval
      src_cfg = dataclasses.replace(src, model=cfg.model, sharding_rules=rules)
      state, step = restore_for_eval(src_cfg, root, mesh, resolve(src_cfg)[1])
      from mmdit_jax.metrics import log
      log(f"initialised from {root} step {step} (LoRA merged, {'EMA' if kind == 'run-ema' else 'raw'} adapters)")
      return state["ema" if kind == "run-ema" else "params"]
    tx, _ = make_optimizer(src.optim, src.total_steps)
    ckpt = Checkpointer(root / "checkpoints")
    try:
      found = restore_latest(dataclasses.replace(src, model=cfg.model, sharding_rules=rules), tx, mesh, ckpt,
                             keys=WEIGHTS)
    finally:
      ckpt.close()
    if found is None:
      raise ConfigError(f"config.init={cfg.init!r}: {root / 'checkpoints'} holds no checkpoint")
    step, state, _ = found
    from mmdit_jax.metrics import log
    log(f"initialised from {root} step {step} ({'EMA' if kind == 'run-ema' else 'raw'} weights)")
    return state["ema" if kind == "run-ema" else "params"]
  return cfg, load


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
  kind, root = parse(cfg.init)
  if kind != "diffusers":
    return _from_run(cfg, kind, root)
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
