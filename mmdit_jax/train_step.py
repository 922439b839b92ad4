"""The one place where the flow math and the model meet: a pure (state, batch) → (state, metrics) step,
and the one builder of its jitted, sharded form (used by training and by --mode=compile alike).

Per-step randomness is fold_in(key(seed), step), so a resumed run draws exactly the numbers the straight
one did; the key is made inside the traced step, so nothing here touches a device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit_jax import model
from mmdit_jax.config import TrainConfig
from mmdit_jax.parallel import batch_sharding

NUM_T_BINS = 8


def per_example_loss(cfg: TrainConfig, params, batch, key):
  """(loss (B,), t (B,)) for one batch with the formulation's t, noise and target."""
  f = cfg.formulation
  x = batch["latent"].astype(jnp.float32)
  k_t, k_noise = jax.random.split(key)
  t = f.sample_t(k_t, (x.shape[0],))
  noise = jax.random.normal(k_noise, x.shape, jnp.float32)
  z = f.perturb(x, noise, t)
  out = model.forward(cfg.model, params, f.model_input(z, t), t, batch)
  return f.loss(out, x, noise, t), t


def make_train_step(cfg: TrainConfig, tx, schedule):
  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)

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


def jit_train_step(cfg: TrainConfig, tx, schedule, state_shardings):
  """The jitted step: state in and out with its shardings (donated), the batch as it arrives (split over
  data × fsdp by `parallel.to_global`, or by the shardings of an abstract `batch_spec`)."""
  return jax.jit(make_train_step(cfg, tx, schedule), in_shardings=(state_shardings, None),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def batch_spec(cfg: TrainConfig, mesh, latent_shape, text_tokens: int, dtype=jnp.float16) -> dict:
  """Abstract global batch (ShapeDtypeStructs sharded over data × fsdp) of the backbone's features, in the
  storage dtype the pipeline hands over (precompute's default: float16)."""
  b = cfg.data.global_batch_size
  m = cfg.model
  shapes = {"latent": ((b, *latent_shape), dtype), "context": ((b, text_tokens, getattr(m, "context_dim", 0)), dtype),
            "pooled": ((b, getattr(m, "pooled_dim", 0)), dtype), "label": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items() if k == "latent" or k in m.cond_features}
