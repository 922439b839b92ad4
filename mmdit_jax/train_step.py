"""The one place where the flow math and the model meet: a pure (state, batch) → (state, metrics) step.

State is a dict of pytrees: step, params, opt_state, ema, and counters of non-finite steps. Per-step
randomness is fold_in(key(seed), step), so a resumed run draws exactly the numbers the straight one did.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit_jax import model
from mmdit_jax.config import OptimConfig, TrainConfig

NUM_T_BINS = 8


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
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
  return tx, schedule


def init_state(model_cfg, tx, key):
  params = model.init_unjitted(model_cfg, key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params), "nonfinite": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32)}


def state_shardings(model_cfg, tx, mesh, rules):
  """(abstract state, shardings): optimizer moments and EMA are sharded like the parameters."""
  abstract = jax.eval_shape(lambda k: init_state(model_cfg, tx, k), jax.random.key(0))
  param_sh = model.param_shardings(model_cfg, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "ema": param_sh,
               "nonfinite": replicated, "skipped": replicated}
  return abstract, shardings


def forward(model_cfg, params, z, t, batch):
  """The backbone on z_t with whatever conditioning the batch carries."""
  if isinstance(model_cfg, model.MMDiTConfig):
    return model.apply(model_cfg, params, z, t, batch["context"], batch["pooled"])
  if model_cfg.conditioning == "class":
    return model.apply(model_cfg, params, z, t, labels=batch["label"])
  return model.apply(model_cfg, params, z, t, context=batch["context"], pooled=batch["pooled"])


def per_example_loss(cfg: TrainConfig, params, batch, key):
  """(loss (B,), t (B,)) for one batch with the formulation's t, noise and target."""
  f = cfg.formulation
  x = batch["latent"].astype(jnp.float32)
  k_t, k_noise = jax.random.split(key)
  t = f.sample_t(k_t, (x.shape[0],))
  noise = jax.random.normal(k_noise, x.shape, jnp.float32)
  z = f.perturb(x, noise, t)
  out = forward(cfg.model, params, f.model_input(z, t), t, batch)
  return f.loss(out, x, noise, t), t


def make_train_step(cfg: TrainConfig, tx, schedule):
  base_key = jax.random.key(cfg.seed)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)

    def loss_fn(params):
      losses, t = per_example_loss(cfg, params, batch, key)
      return jnp.mean(losses), (losses, t)

    (loss, (losses, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(params, state["params"])
    ema = keep(jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, state["ema"], params),
               state["ema"])
    new_state = {
        "step": step + 1, "params": params, "opt_state": keep(opt_state, state["opt_state"]), "ema": ema,
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
    bins = jnp.clip((t * NUM_T_BINS).astype(jnp.int32), 0, NUM_T_BINS - 1)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(jax.tree.map(jnp.subtract, params, state["params"])),
        "lr": schedule(step), "finite": finite, "nonfinite": new_state["nonfinite"],
        "skipped": new_state["skipped"],
        "loss_bin_sum": jax.ops.segment_sum(jnp.where(finite, losses, 0.0), bins, NUM_T_BINS),
        "loss_bin_count": jax.ops.segment_sum(jnp.ones_like(losses), bins, NUM_T_BINS)}
    return new_state, metrics

  return train_step
