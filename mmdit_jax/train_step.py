"""The one place where the flow math and the model meet: a pure (state, batch) → (state, metrics) step,
and the one builder of its jitted, sharded form (used by training and by --mode=compile alike).

Per-step randomness is fold_in(key(seed), step), so a resumed run draws exactly the numbers the straight
one did; the key is made inside the traced step, so nothing here touches a device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit_jax import flow, model, superres
from mmdit_jax.config import TrainConfig
from mmdit_jax.model.layers import constrain
from mmdit_jax.parallel import batch_sharding

NUM_T_BINS = 8


def bucket_shift(cfg: TrainConfig, latent_hw) -> float:
  """The timestep shift α of a batch of latents (H, W): config.shift, or with config.shift_base_resolution the
  bucket's own, √(H·W·f² / base²) for f pixels per latent cell (SD3 §5.3.2). Static: one program per bucket."""
  if not cfg.shift_base_resolution:
    return cfg.formulation.shift
  f = cfg.data.latent_downsample
  if not f:
    raise ValueError("config.data.latent_downsample is unknown (0): train.py sets it from the dataset before "
                     "building the step; set it when calling the step directly")
  h, w = latent_hw
  return flow.resolution_shift(h * w * f * f, cfg.shift_base_resolution ** 2)


def draw(cfg: TrainConfig, key, x_shape):
  """The step's randomness for a batch of latents of x_shape: (t (B,), noise), t drawn with the batch's shift."""
  k_t, k_noise = jax.random.split(key)
  form = cfg.formulation.with_shift(bucket_shift(cfg, x_shape[1:3]))
  return form.sample_t(k_t, (x_shape[0],)), jax.random.normal(k_noise, x_shape, jnp.float32)


def per_example_loss(cfg: TrainConfig, params, batch, t, noise):
  """loss (B,) for one batch at times t with this noise, the formulation's perturbation and target."""
  f = cfg.formulation
  x = batch["latent"].astype(jnp.float32)
  z = f.perturb(x, noise, t)
  out = model.forward(cfg.model, params, f.model_input(z, t), t, batch)
  return f.loss(out, x, noise, t)


def _microbatched(tree, m: int):
  """(B, …) → (m, B/m, …) with microbatch i = rows i, i + m, i + 2m, …: every microbatch spread over the
  data-parallel devices as the batch is (a contiguous split would put each on a few devices)."""
  def split(x):
    y = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return constrain(y, None, "act_batch", *([None] * (x.ndim - 1)))
  return jax.tree.map(split, tree)


def _unmicrobatched(x):
  """(m, B/m, …) → (B, …), the inverse of _microbatched."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def loss_and_grads(cfg: TrainConfig, params, batch, key):
  """(mean loss, (per-example losses, t)), grads over the global batch; with cfg.microbatches = m a scan
  over m microbatches, summing their gradients: the same update as the whole batch at once (the same t
  and noise per example), with the activations of B/m examples alive at a time."""
  t, noise = draw(cfg, key, batch["latent"].shape)
  if cfg.sr.factor:  # a super-resolution stage: its noise-augmented low-res input, drawn once for the batch
    batch = superres.training_condition(cfg, batch, jax.random.fold_in(key, 1))
  b, m = t.shape[0], cfg.microbatches

  def total(params, part, t, noise):
    losses = per_example_loss(cfg, params, part, t, noise)
    return jnp.sum(losses) / b, losses

  if m == 1:
    (loss, losses), grads = jax.value_and_grad(total, has_aux=True)(params, batch, t, noise)
    return (loss, (losses, t)), grads

  def body(acc, xs):
    part, t_i, noise_i = xs
    (loss_i, losses_i), grads_i = jax.value_and_grad(total, has_aux=True)(params, part, t_i, noise_i)
    loss, grads = acc
    return (loss + loss_i, jax.tree.map(jnp.add, grads, grads_i)), losses_i

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), losses = jax.lax.scan(body, zero, _microbatched((batch, t, noise), m))
  return (loss, (_unmicrobatched(losses), t)), grads


def make_train_step(cfg: TrainConfig, tx, schedule):
  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    (loss, (losses, t)), grads = loss_and_grads(cfg, state["params"], batch, key)
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
