"""The train state: optimizer, initial state, abstract shapes and shardings, and one restore recipe.

State is a dict of pytrees: step, params, opt_state, ema, and counters of non-finite steps. Its shapes
come from `jax.eval_shape` and its shardings from the logical-axis rules, so parameters are never
materialised unsharded and nothing here touches a device (a compile-only TPU mesh works too).

Fine-tuning (config.lora, config.dpo) adds "base": the frozen weights of config.init (the model LoRA adapts,
and DPO's reference), held in config.lora.base_dtype. With LoRA, params / opt_state / ema are the adapters'
alone. "base" is never checkpointed (`checkpointed(state)`): it is read again from config.init on restore.
`weights(cfg, state, "ema" | "params")` is what the model runs with: the adapters merged into the base.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmdit_jax import model
from mmdit_jax.model import lora as lora_lib
from mmdit_jax.checkpoint import Checkpointer, CheckpointError
from mmdit_jax.config import OptimConfig, TrainConfig


def make_schedule(cfg: OptimConfig, total_steps: int):
  warmup = optax.linear_schedule(0.0, cfg.lr, max(1, cfg.warmup_steps))
  decay_steps = max(1, total_steps - cfg.warmup_steps)
  after = {
      "constant": optax.constant_schedule(cfg.lr),
      "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
      "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
  }[cfg.schedule]
  if cfg.warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_steps: int):
  """(AdamW with warm-up and optional global-norm clipping, its learning-rate schedule)."""
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
  return tx, schedule


FROZEN = "base"  # the state entry of the frozen weights (fine-tuning): not checkpointed


def _adapting(lora) -> bool:
  return lora is not None and lora.rank > 0


def has_base(cfg: TrainConfig) -> bool:
  """Whether the run holds frozen weights beside the trained ones: LoRA's base or DPO's reference."""
  return cfg.lora.rank > 0 or cfg.dpo.beta > 0


def init_state(model_cfg, tx, key, lora=None):
  """A fresh state: the model's parameters, or with LoRA (config.lora, rank > 0) fresh adapters (B = 0)."""
  if _adapting(lora):
    return state_from_params(lora_lib.init(model.abstract_params(model_cfg), lora.targets, lora.rank, key), tx)
  return state_from_params(model.init_unjitted(model_cfg, key), tx)


def abstract_state(model_cfg, tx, lora=None):
  """The state's ShapeDtypeStructs; the PRNG key is traced, never created on a device."""
  return jax.eval_shape(lambda: init_state(model_cfg, tx, jax.random.key(0), lora))


def checkpointed(state) -> dict:
  """The part of the state a checkpoint holds: all but the frozen base (re-read from config.init)."""
  return {k: v for k, v in state.items() if k != FROZEN}


def base_shardings(model_cfg, mesh, rules, dtype: str = "float32"):
  """(abstract frozen base, its shardings) for lora.freeze(params, dtype)."""
  param_sh = model.param_shardings(model_cfg, mesh, rules)
  abstract = jax.eval_shape(lambda p: lora_lib.freeze(p, dtype), model.abstract_params(model_cfg))
  return abstract, lora_lib.frozen_shardings(abstract, param_sh)


def freeze_base(cfg: TrainConfig, params, mesh):
  """The frozen base in its shardings, a copy (params may be donated later) in config.lora.base_dtype."""
  _, shardings = base_shardings(cfg.model, mesh, cfg.sharding_rules, cfg.lora.base_dtype)
  return jax.jit(lambda p: lora_lib.freeze(jax.tree.map(jnp.copy, p), cfg.lora.base_dtype),
                 out_shardings=shardings)(params)


def merged(cfg: TrainConfig, base, adapters):
  """The model's parameters: the adapters merged into the (thawed) base; jit-able."""
  return lora_lib.merge(lora_lib.thaw(base), adapters, cfg.lora.scale)


def weights(cfg: TrainConfig, state, which: str = "ema"):
  """The parameters the model runs with for state[which] ("ema" or "params"): with LoRA the adapters merged
  into the frozen base (one compiled merge, output in the parameters' shardings); else state[which]."""
  if cfg.lora.rank <= 0 or FROZEN not in state:
    return state[which]
  return _merge_fn(cfg)(state[FROZEN], state[which])


@functools.lru_cache(maxsize=8)
def _merge_fn(cfg):
  return jax.jit(lambda base, adapters: merged(cfg, base, adapters))


def state_shardings(model_cfg, tx, mesh, rules, lora=None):
  """(abstract state, shardings): optimizer moments and EMA are sharded like the parameters.

  Optimizer-state subtrees with the parameters' tree structure (AdamW's moments) take the parameter
  shardings, the rest (step counts) is replicated. Matched structurally rather than with
  optax.tree_map_params, which runs the optimizer's init on real arrays (impossible on a compile-only mesh).
  """
  abstract = abstract_state(model_cfg, tx, lora)
  param_sh = model.param_shardings(model_cfg, mesh, rules)
  if _adapting(lora):  # the adapters: A and B split over the axes of their kernel (lora.shardings)
    param_sh = lora_lib.shardings(abstract["params"], param_sh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params_def = jax.tree.structure(abstract["params"])
  like_params = lambda x: not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == params_def
  opt_sh = jax.tree.map(lambda x: param_sh if like_params(x) else replicated, abstract["opt_state"],
                        is_leaf=like_params)
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "ema": param_sh,
               "nonfinite": replicated, "skipped": replicated}
  return abstract, shardings


# What evaluation, sampling, export and config.init read of a checkpoint: the weights, not the optimizer.
WEIGHTS = ("step", "params", "ema")


def restore_latest(cfg: TrainConfig, tx, mesh, ckpt: Checkpointer, *, set_aside_damaged: bool = False, keys=None):
  """(step, state, data iterator state) of the newest intact checkpoint laid out on `mesh` (any shape), or
  None when there is none; with `keys` (e.g. WEIGHTS), only those parts of the state, and no data state.
  The one restore recipe of training, evaluation, sampling and the tests."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    abstract, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules, cfg.lora)
    return ckpt.restore_latest(abstract, shardings, set_aside_damaged=set_aside_damaged, keys=keys)


def state_from_params(params, tx):
  """A step-0 train state around given parameters (imported weights): fresh optimizer, EMA = params."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params), "nonfinite": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def restore_or_init(cfg: TrainConfig, tx, mesh, ckpt: Checkpointer, init_params=None):
  """(state, start step, data iterator state or None): the newest intact checkpoint (damaged newer ones are
  moved aside with a warning), else a fresh state initialised directly into its shardings — around the
  imported weights when `init_params` (pretrained.resolve's load(mesh)) is given. Fine-tuning runs (LoRA,
  DPO) also get the frozen base from `init_params`, restored or not."""
  if has_base(cfg) and init_params is None:
    raise ValueError("LoRA / DPO fine-tuning needs the weights of config.init (pretrained.resolve's load)")
  found = restore_latest(cfg, tx, mesh, ckpt, set_aside_damaged=True)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    if found is not None:
      step, state, data_state = found
      if has_base(cfg):
        state[FROZEN] = freeze_base(cfg, init_params(mesh), mesh)
      return state, step, data_state
    _, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules, cfg.lora)
    base = None
    if has_base(cfg):
      base = freeze_base(cfg, init_params(mesh), mesh)
    if cfg.lora.rank > 0:
      adapters = initial_adapters(cfg, mesh, shardings["params"])
      state = jax.jit(lambda a: state_from_params(a, tx), out_shardings=shardings)(adapters)
    elif init_params is not None:  # imported weights: load(mesh) → parameters already in their shardings
      state = jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings)(
          lora_lib.thaw(base) if base is not None and cfg.lora.base_dtype == "float32" else init_params(mesh))
    else:
      state = jax.jit(lambda k: init_state(cfg.model, tx, k), out_shardings=shardings)(jax.random.key(cfg.seed + 1))
    if base is not None:
      state[FROZEN] = base
  return state, 0, None


def initial_adapters(cfg: TrainConfig, mesh, shardings):
  """The adapters a LoRA run starts from: fresh (B = 0), or config.lora.load's PEFT file."""
  if cfg.lora.load:
    from mmdit_jax.model.convert import read_peft
    return jax.device_put(read_peft(cfg.model, cfg.lora.load, cfg.lora), shardings)
  key = jax.random.key(cfg.seed + 1)
  return jax.jit(lambda k: lora_lib.init(model.abstract_params(cfg.model), cfg.lora.targets, cfg.lora.rank, k),
                 out_shardings=shardings)(key)


def restore_for_eval(cfg: TrainConfig, workdir, mesh, init_params=None):
  """(state, step) of the newest intact checkpoint under workdir/checkpoints, on `mesh` (any shape); without
  one, the imported weights of `init_params` (pretrained.resolve's load(mesh)) as step 0. A LoRA run's
  "params" and "ema" are its adapters merged into config.init's weights ("adapters", "adapters_ema": as trained)."""
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  ckpt = Checkpointer(workdir / "checkpoints")
  try:
    found = restore_latest(cfg, tx, mesh, ckpt, keys=WEIGHTS)
  finally:
    ckpt.close()
  if found is not None and has_base(cfg):  # fine-tuned: the weights the model runs with
    step, state, _ = found
    if cfg.lora.rank > 0:
      if init_params is None:
        raise ValueError("a LoRA run's weights need its base: pass pretrained.resolve(cfg)'s load as init_params")
      with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
        state[FROZEN] = freeze_base(cfg, init_params(mesh), mesh)
        state = {"params": weights(cfg, state, "params"), "ema": weights(cfg, state, "ema"),
                 "adapters": state["params"], "adapters_ema": state["ema"]}
    return state, step
  if found is None and init_params is not None and cfg.lora.rank <= 0:
    params = init_params(mesh)
    return {"params": params, "ema": params}, 0
  if found is None:
    raise CheckpointError(f"no checkpoint in {workdir / 'checkpoints'}; train first (same --workdir), or "
                          "sample official weights with --config.init=diffusers:DIR")
  step, state, _ = found
  return state, step
