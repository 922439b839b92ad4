"""Evaluation: validation loss (SD3 §5.1: held-out data at the 8 fixed levels t_i = i/8, fixed noise, per
level and mean), and sample evaluation (generation from fixed conditioning → PNG grid, FID, CLIP score,
and on the demo dataset the compositional GenEval-style accuracy beside its chance level)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmdit_jax import fid, flow, model, parallel
from mmdit_jax.data import demo
from mmdit_jax.flow import samplers
from mmdit_jax.metrics import log
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


# ── Sampling ──

def make_generate(cfg, scfg, latent_shape):
  """jit-able (params, context, pooled, null_context, null_pooled, key) → latents (B, h, w, C)."""
  f = cfg.formulation
  process = f.path
  ts = (samplers.log_snr_grid(process, scfg.steps, samplers.t_max(process)) if f.is_edm
        else samplers.timestep_grid(scfg.steps, shift=f.shift))

  def generate(params, context, pooled, null_context, null_pooled, key):
    b = context.shape[0]

    def net(z, t, guided):
      zin = f.model_input(z, t)
      if not guided:
        return model.apply(cfg.model, params, zin, t, context, pooled)
      both = model.apply(cfg.model, params, jnp.concatenate([zin, zin]), jnp.concatenate([t, t]),
                         jnp.concatenate([context, jnp.broadcast_to(null_context, context.shape)]),
                         jnp.concatenate([pooled, jnp.broadcast_to(null_pooled, pooled.shape)]))
      return both[:b], both[b:]

    denoise = samplers.make_denoiser(process, f.prediction, net, guidance_scale=scfg.guidance,
                                     guidance_interval=scfg.guidance_interval, threshold=scfg.threshold,
                                     percentile=scfg.percentile, num_steps=scfg.steps)
    noise = jax.random.normal(key, (b, *latent_shape))
    return samplers.sample(scfg.sampler, process, denoise, noise, ts)

  return generate


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [−1, 1] (decoded, or the demo's RGB latents) → uint8."""
  return np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255).astype(np.uint8)


def grid_image(images: np.ndarray, cols: int = 8, scale: int = 4) -> np.ndarray:
  """(N, h, w, 3) uint8 images tiled with 1-pixel white borders, upscaled `scale`× (nearest) for viewing."""
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
  return np.repeat(np.repeat(grid, scale, 0), scale, 1)


def save_grid(images: np.ndarray, path, cols: int = 8, scale: int = 4):
  Image.fromarray(grid_image(images, cols, scale)).save(path)


DEMO_CAPTION_SEED = 12345


class SampleEvaluator:
  """Generates from fixed conditioning with given params and scores the samples.

  Demo dataset: captions of random scenes (fixed seed) through the demo encoder; references are the
  validation images. Other datasets: the conditioning of the first validation examples, images decoded
  with the VAE the dataset records (or config.encoders); without one there are no images to score.
  """

  def __init__(self, cfg, scfg, ecfg, val_set, mesh, workdir, autoencoder=None):
    self.cfg, self.ecfg, self.mesh = cfg, ecfg, mesh
    self.workdir = pathlib.Path(workdir)
    self.enabled = isinstance(cfg.model, model.MMDiTConfig)
    if not self.enabled:
      log("sample evaluation: class-conditional generation is not implemented; skipped")
      return
    n = ecfg.num_samples
    rows = _first_rows(val_set, n)
    self.captions = None
    if not cfg.data.path:  # the demo
      rng = np.random.default_rng(DEMO_CAPTION_SEED)
      self.captions = [demo.caption(demo.random_scene(rng)) for _ in range(n)]
      encoder = demo.DemoTextEncoder()
      enc = [encoder(c) for c in self.captions]
      self.context, self.pooled = np.stack([c for c, _ in enc]), np.stack([p for _, p in enc])
      self.null_context, self.null_pooled = encoder("")
      self.decode = lambda latents: np.asarray(latents)  # demo "latents" are RGB
    else:
      self.context, self.pooled = rows["context"], rows["pooled"]
      null = val_set.null or {"context": np.zeros_like(self.context[0]), "pooled": np.zeros_like(self.pooled[0])}
      self.null_context, self.null_pooled = null["context"], null["pooled"]
      self.decode = autoencoder.decode if autoencoder is not None else None
    self.latent_shape = rows["latent"].shape[1:]
    self.reference = None if self.decode is None else self.decode(rows["latent"].astype(np.float32))
    self.fid_fn = (None if ecfg.fid_network == "none" or self.decode is None
                   else fid.feature_network(ecfg.fid_network, ecfg.inception_weights))
    self.clip_hook = fid.load_clip_score_hook(ecfg.clip_score)
    self.batch = min(n, cfg.data.global_batch_size)
    self.generate = jax.jit(make_generate(cfg, scfg, self.latent_shape))
    self.seed = scfg.seed

  def __call__(self, params, step: int, writer=None) -> dict:
    if not self.enabled:
      return {}
    chunks = []
    for i in range(0, len(self.context), self.batch):  # fixed batch: one compilation
      sl = slice(i, i + self.batch)
      context, pooled = parallel.pad_batch(self.context[sl], self.batch), parallel.pad_batch(self.pooled[sl], self.batch)
      out = self.generate(params, jnp.asarray(context, jnp.float32), jnp.asarray(pooled, jnp.float32),
                          jnp.asarray(self.null_context, jnp.float32), jnp.asarray(self.null_pooled, jnp.float32),
                          jax.random.fold_in(jax.random.key(self.seed), i))
      chunks.append(np.asarray(parallel.to_host(out))[:len(self.context[sl])])
    latents = np.concatenate(chunks)
    results = {}
    if self.decode is None:
      log("sample evaluation: no VAE to decode latents into images (set config.encoders); FID skipped")
      return results
    images = self.decode(latents)
    if self.captions is not None:
      acc = demo.compositional_accuracy(images, self.captions)
      chance = demo.compositional_accuracy(images, self.captions[1:] + self.captions[:1])
      results.update({f"demo/accuracy_{k}": v for k, v in acc.items()})
      results.update({f"demo/chance_{k}": v for k, v in chance.items()})
    if self.fid_fn is not None:
      results[f"fid/{self.ecfg.fid_network}"] = fid.fid(self.fid_fn, images, self.reference)
    if self.clip_hook is not None and self.captions is not None:
      results["clip_score"] = fid.clip_score(*self.clip_hook, images, self.captions)
    grid = grid_image(to_uint8(images), scale=4 if images.shape[1] <= 64 else 1)
    if jax.process_index() == 0:
      out = self.workdir / "samples"
      out.mkdir(parents=True, exist_ok=True)
      Image.fromarray(grid).save(out / f"step_{step:07d}.png")
      if self.captions is not None:
        (out / "captions.txt").write_text("\n".join(self.captions) + "\n")
    if writer is not None:
      writer.write(step, results)
      writer.write_image(step, "samples", grid)
    return results


def _first_rows(dataset, n: int) -> dict:
  rows: dict = {}
  for i in range(-(-n // dataset.cfg.global_batch_size)):
    batch = dataset.load_batch(i % dataset.batches_per_epoch, 0, 1)
    for k, v in batch.items():
      rows.setdefault(k, []).append(np.asarray(v))
  return {k: np.concatenate(v)[:n] for k, v in rows.items()}
