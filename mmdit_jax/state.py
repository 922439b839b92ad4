"""The train state: optimizer, initial state, abstract shapes and shardings, and one restore recipe.

State is a dict of pytrees: step, params, opt_state, ema, and counters of non-finite steps. Its shapes
come from `jax.eval_shape` and its shardings from the logical-axis rules, so parameters are never
materialised unsharded and nothing here touches a device (a compile-only TPU mesh works too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmdit_jax import model
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


def init_state(model_cfg, tx, key):
  return state_from_params(model.init_unjitted(model_cfg, key), tx)


def abstract_state(model_cfg, tx):
  """The state's ShapeDtypeStructs; the PRNG key is traced, never created on a device."""
  return jax.eval_shape(lambda: init_state(model_cfg, tx, jax.random.key(0)))


def state_shardings(model_cfg, tx, mesh, rules):
  """(abstract state, shardings): optimizer moments and EMA are sharded like the parameters.

  Optimizer-state subtrees with the parameters' tree structure (AdamW's moments) take the parameter
  shardings, the rest (step counts) is replicated. Matched structurally rather than with
  optax.tree_map_params, which runs the optimizer's init on real arrays (impossible on a compile-only mesh).
  """
  abstract = abstract_state(model_cfg, tx)
  param_sh = model.param_shardings(model_cfg, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params_def = jax.tree.structure(abstract["params"])
  like_params = lambda x: not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == params_def
  opt_sh = jax.tree.map(lambda x: param_sh if like_params(x) else replicated, abstract["opt_state"],
                        is_leaf=like_params)
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "ema": param_sh,
               "nonfinite": replicated, "skipped": replicated}
  return abstract, shardings


def restore_latest(cfg: TrainConfig, tx, mesh, ckpt: Checkpointer, *, set_aside_damaged: bool = False):
  """(step, state, data iterator state) of the newest intact checkpoint laid out on `mesh` (any shape), or
  None when there is none. The one restore recipe of training, evaluation, sampling and the tests."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    abstract, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules)
    return ckpt.restore_latest(abstract, shardings, set_aside_damaged=set_aside_damaged)


def state_from_params(params, tx):
  """A step-0 train state around given parameters (imported weights): fresh optimizer, EMA = params."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params), "nonfinite": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def restore_or_init(cfg: TrainConfig, tx, mesh, ckpt: Checkpointer, init_params=None):
  """(state, start step, data iterator state or None): the newest intact checkpoint (damaged newer ones are
  moved aside with a warning), else a fresh state initialised directly into its shardings — around the
  imported weights when `init_params` (pretrained.resolve's load(mesh)) is given."""
  found = restore_latest(cfg, tx, mesh, ckpt, set_aside_damaged=True)
  if found is not None:
    step, state, data_state = found
    return state, step, data_state
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    _, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules)
    if init_params is not None:  # imported weights: load(mesh) → parameters already in their shardings
      state = jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings)(init_params(mesh))
    else:
      state = jax.jit(lambda k: init_state(cfg.model, tx, k), out_shardings=shardings)(jax.random.key(cfg.seed + 1))
  return state, 0, None


def restore_for_eval(cfg: TrainConfig, workdir, mesh, init_params=None):
  """(state, step) of the newest intact checkpoint under workdir/checkpoints, on `mesh` (any shape); without
  one, the imported weights of `init_params` (pretrained.resolve's load(mesh)) as step 0."""
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  ckpt = Checkpointer(workdir / "checkpoints")
  try:
    found = restore_latest(cfg, tx, mesh, ckpt)
  finally:
    ckpt.close()
  if found is None and init_params is not None:
    params = init_params(mesh)
    return {"params": params, "ema": params}, 0
  if found is None:
    raise CheckpointError(f"no checkpoint in {workdir / 'checkpoints'}; train first (same --workdir), or "
                          "sample official weights with --config.init=diffusers:DIR")
  step, state, _ = found
  return state, step
