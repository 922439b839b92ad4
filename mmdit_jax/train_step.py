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
from mmdit_jax.model import lora
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


REJECTED = "latent_rejected"  # a preference pair's second image (DPO): "latent" is the preferred one


def pair_losses(cfg: TrainConfig, params, batch, t, noise):
  """(e_w, e_l) (B,) each: the per-example losses of the preferred and the rejected image of each pair at
  the same t and noise (one forward over both halves)."""
  if REJECTED not in batch:
    raise ValueError(f"DPO needs preference pairs: the batch has {sorted(batch)}, not {REJECTED!r} (precompute "
                     "with an image_rejected column, or the pairs demo)")
  both = {k: jnp.concatenate([v, v]) for k, v in batch.items() if k not in ("latent", REJECTED)}
  both["latent"] = jnp.concatenate([batch["latent"], batch[REJECTED]])
  losses = per_example_loss(cfg, params, both, jnp.concatenate([t, t]), jnp.concatenate([noise, noise]))
  return jnp.split(losses, 2)


def dpo_losses(beta: float, e_w, e_l, ref_w, ref_l):
  """Diffusion-DPO per pair (Wallace et al. 2023, as diffusers' train_diffusion_dpo computes it): the implicit
  reward difference r = −β/2 · [(e_w − e_w^ref) − (e_l − e_l^ref)] and the loss −log σ(r)."""
  inside = -0.5 * beta * ((e_w - ref_w) - (e_l - ref_l))
  return -jax.nn.log_sigmoid(inside), inside


def objective(cfg: TrainConfig, params, base, batch, t, noise, key=None):
  """(per-example loss (B,), DPO reward difference (B,) or None) of the trained parameters `params`: the
  model's own, or LoRA adapters merged into the frozen `base`; with config.dpo.beta the DPO loss against
  the frozen base (the reference)."""
  weights = params
  if cfg.lora.rank > 0:
    weights = lora.merge(lora.thaw(base), params, cfg.lora.scale, dropout=cfg.lora.dropout, key=key)
  if not cfg.dpo.beta:
    return per_example_loss(cfg, weights, batch, t, noise), None
  e_w, e_l = pair_losses(cfg, weights, batch, t, noise)
  ref_w, ref_l = jax.lax.stop_gradient(pair_losses(cfg, lora.thaw(base), batch, t, noise))
  return dpo_losses(cfg.dpo.beta, e_w, e_l, ref_w, ref_l)


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


def loss_and_grads(cfg: TrainConfig, params, batch, key, base=None):
  """(mean loss, (per-example losses, t, DPO reward differences or None)), grads over the global batch; with
  cfg.microbatches = m a scan over m microbatches, summing their gradients: the same update as the whole
  batch at once (the same t and noise per example), with the activations of B/m examples alive at a time.
  `base`: the frozen weights of a fine-tuning run (LoRA's base, DPO's reference); grads are params' alone."""
  t, noise = draw(cfg, key, batch["latent"].shape)
  if cfg.sr.factor:  # a super-resolution stage: its noise-augmented low-res input, drawn once for the batch
    batch = superres.training_condition(cfg, batch, jax.random.fold_in(key, 1))
  b, m = t.shape[0], cfg.microbatches
  dropout_key = jax.random.fold_in(key, 2)  # LoRA dropout: one mask per step, the same in every microbatch

  def total(params, part, t, noise):
    losses, reward = objective(cfg, params, base, part, t, noise, dropout_key)
    return jnp.sum(losses) / b, (losses, jnp.zeros_like(losses) if reward is None else reward)

  if m == 1:
    (loss, (losses, reward)), grads = jax.value_and_grad(total, has_aux=True)(params, batch, t, noise)
  else:
    def body(acc, xs):
      part, t_i, noise_i = xs
      (loss_i, aux_i), grads_i = jax.value_and_grad(total, has_aux=True)(params, part, t_i, noise_i)
      loss, grads = acc
      return (loss + loss_i, jax.tree.map(jnp.add, grads, grads_i)), aux_i

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), (losses, reward) = jax.lax.scan(body, zero, _microbatched((batch, t, noise), m))
    losses, reward = _unmicrobatched(losses), _unmicrobatched(reward)
  return (loss, (losses, t, reward if cfg.dpo.beta else None)), grads


def make_train_step(cfg: TrainConfig, tx, schedule):
  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    (loss, (losses, t, reward)), grads = loss_and_grads(cfg, state["params"], batch, key, state.get("base"))
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
    if "base" in state:  # the frozen weights (fine-tuning) pass through unchanged
      new_state["base"] = state["base"]
    bins = jnp.clip((t * NUM_T_BINS).astype(jnp.int32), 0, NUM_T_BINS - 1)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(jax.tree.map(jnp.subtract, params, state["params"])),
        "lr": schedule(step), "finite": finite, "nonfinite": new_state["nonfinite"],
        "skipped": new_state["skipped"],
        "loss_bin_sum": jax.ops.segment_sum(jnp.where(finite, losses, 0.0), bins, NUM_T_BINS),
        "loss_bin_count": jax.ops.segment_sum(jnp.ones_like(losses), bins, NUM_T_BINS)}
    if reward is not None:  # DPO: implicit reward accuracy (the preferred image's reward is higher) and margin
      metrics["dpo/accuracy"] = jnp.mean((reward > 0).astype(jnp.float32))
      metrics["dpo/margin"] = jnp.mean(reward)
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
  if cfg.dpo.beta:  # preference pairs: the rejected image beside the preferred one
    shapes[REJECTED] = shapes["latent"]
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items() if k in ("latent", REJECTED) or k in m.cond_features}
