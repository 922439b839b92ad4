"""Validation loss (SD3 §5.1): held-out data at the 8 fixed levels t_i = i/8, fixed noise, per level and mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdit_jax import flow, parallel
from mmdit_jax.train_step import forward

EVAL_SEED = 20240305  # fixed noise: every evaluation of every run sees the same ε


def make_level_losses(cfg):
  """(params, batch, batch_index) → (levels,) summed per-example losses at t_i = i/8."""
  f = cfg.formulation
  levels = flow.validation_timesteps(8)

  def level_losses(params, batch, batch_index):
    x = batch["latent"].astype(jnp.float32)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(EVAL_SEED), batch_index), x.shape)

    def at_level(t_level):
      t = jnp.full((x.shape[0],), t_level)
      z = f.perturb(x, noise, t)
      out = forward(cfg.model, params, f.model_input(z, t), t, batch)
      return jnp.sum(f.loss(out, x, noise, t))

    return jax.lax.map(at_level, levels)

  return level_losses


def validation_loss(cfg, params, dataset, mesh, num_batches: int, level_fn=None) -> dict:
  """{'val/loss': mean, 'val/loss_t0.000': …} over the first `num_batches` held-out batches."""
  level_fn = level_fn or jax.jit(make_level_losses(cfg))
  totals, count = np.zeros(8), 0
  for i in range(min(num_batches, dataset.batches_per_epoch)):
    batch = dataset.load_batch(i, jax.process_index(), jax.process_count())
    batch = {k: v for k, v in batch.items() if k not in ("index", "step")}
    totals += np.asarray(parallel.to_host(level_fn(params, parallel.to_global(batch, mesh), i)))
    count += dataset.cfg.global_batch_size
  per_level = totals / max(count, 1)
  out = {f"val/loss_t{i / 8:.3f}": float(v) for i, v in enumerate(per_level)}
  out["val/loss"] = float(per_level.mean())
  return out
