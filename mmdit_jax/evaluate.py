"""Evaluation: validation loss (SD3 §5.1: held-out data at the 8 fixed levels t_i = i/8, fixed noise, per
level and mean), generation for any backbone, and sample evaluation (PNG grid, FID, CLIP score, and on
the demo datasets the compositional GenEval-style accuracy, or the class accuracy, beside chance)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from mmdit_jax import data, fid, flow, model, parallel, superres
from mmdit_jax.config import TrainConfig
from mmdit_jax.data import demo
from mmdit_jax.flow import samplers
from mmdit_jax.metrics import log, warn

EVAL_SEED = 20240305  # fixed noise: every evaluation of every run sees the same ε


def make_level_losses(cfg: TrainConfig):
  """(params, batch, batch_index) → (levels,) summed per-example losses at t_i = i/8."""
  f = cfg.formulation
  levels = flow.validation_timesteps(8)

  def level_losses(params, batch, batch_index):
    x = batch["latent"].astype(jnp.float32)
    key = jax.random.fold_in(jax.random.key(EVAL_SEED), batch_index)
    noise = jax.random.normal(key, x.shape)
    if cfg.sr.factor:  # a super-resolution stage: the low-res input at the fixed level sr.aug_level
      batch = superres.fixed_condition(cfg, batch, jax.random.fold_in(key, 1))

    def at_level(t_level):
      t = jnp.full((x.shape[0],), t_level)
      z = f.perturb(x, noise, t)
      out = model.forward(cfg.model, params, f.model_input(z, t), t, batch)
      return jnp.sum(f.loss(out, x, noise, t))

    return jax.lax.map(at_level, levels)

  return level_losses


def validation_loss(cfg: TrainConfig, params, dataset, mesh, level_fn=None) -> dict:
  """{'val/loss': mean, 'val/loss_t0.000': …} over the first config.eval_batches held-out batches."""
  level_fn = level_fn or jax.jit(make_level_losses(cfg))
  totals, count = np.zeros(8), 0
  for i in range(min(cfg.eval_batches, dataset.batches_per_epoch)):
    batch = dataset.load_batch(i, jax.process_index(), jax.process_count())
    batch = {k: v for k, v in batch.items() if k not in data.HOST_ONLY}
    totals += np.asarray(parallel.to_host(level_fn(params, parallel.to_global(batch, mesh), i)))
    count += dataset.cfg.global_batch_size
  per_level = totals / max(count, 1)
  out = {f"val/loss_t{i / 8:.3f}": float(v) for i, v in enumerate(per_level)}
  out["val/loss"] = float(per_level.mean())
  return out


def validation_both(cfg: TrainConfig, state, dataset, mesh, level_fn=None) -> dict:
  """Validation loss of the EMA and the raw weights: 'val_ema/…' and 'val_raw/…' (of the preferred images
  on preference pairs); a DPO run adds the held-out implicit reward accuracy and margin ('val_*/dpo_…')."""
  from mmdit_jax.state import weights
  results = {}
  for name, which in (("ema", "ema"), ("raw", "params")):
    params = weights(cfg, state, which)
    for k, v in validation_loss(cfg, params, dataset, mesh, level_fn).items():
      results[k.replace("val/", f"val_{name}/")] = v
    if cfg.dpo.beta and "base" in state:
      for k, v in dpo_validation(cfg, params, state["base"], dataset, mesh).items():
        results[f"val_{name}/{k}"] = v
  return results


@functools.lru_cache(maxsize=8)
def _dpo_rewards_fn(cfg: TrainConfig):
  from mmdit_jax.model import lora
  from mmdit_jax.train_step import dpo_losses, pair_losses
  levels = flow.validation_timesteps(8)

  def rewards(params, base, batch, batch_index):
    ref = lora.thaw(base)
    key = jax.random.fold_in(jax.random.key(EVAL_SEED), batch_index)
    noise = jax.random.normal(key, batch["latent"].shape)

    def at_level(t_level):
      t = jnp.full((noise.shape[0],), t_level)
      e_w, e_l = pair_losses(cfg, params, batch, t, noise)
      r_w, r_l = pair_losses(cfg, ref, batch, t, noise)
      return dpo_losses(cfg.dpo.beta, e_w, e_l, r_w, r_l)[1]

    return jax.lax.map(at_level, levels)  # (levels, B)

  return jax.jit(rewards)


def dpo_validation(cfg: TrainConfig, params, base, dataset, mesh) -> dict:
  """Held-out preference pairs: the implicit reward difference r (train_step.dpo_losses) of `params` against
  the frozen base at the 8 fixed t levels with the validation's fixed noise, over config.eval_batches
  batches: accuracy (share of pairs × levels with r > 0, ties counted half) and margin (mean r)."""
  fn = _dpo_rewards_fn(cfg)
  values = []
  for i in range(min(cfg.eval_batches, dataset.batches_per_epoch)):
    batch = dataset.load_batch(i, jax.process_index(), jax.process_count())
    batch = {k: v for k, v in batch.items() if k not in data.HOST_ONLY}
    values.append(np.asarray(parallel.to_host(fn(params, base, parallel.to_global(batch, mesh), i))).ravel())
  r = np.concatenate(values)
  return {"dpo_accuracy": float(np.mean((r > 0) + 0.5 * (r == 0))), "dpo_margin": float(np.mean(r))}


# ── Generation ──

def sampling_grid(cfg: TrainConfig, latent_hw=None):
  """The sampler's steps + 1 decreasing times (config.sample.schedule, or the explicit sample.timesteps):
  by default SD3's reference grid for rf, uniform in log-SNR for the EDM processes, else the shifted
  uniform grid. With config.shift_base_resolution the shift is the requested size's (latent_hw)."""
  f, s = cfg.formulation, cfg.sample
  if cfg.shift_base_resolution and latent_hw is not None and cfg.data.latent_downsample:
    from mmdit_jax.train_step import bucket_shift
    f = f.with_shift(bucket_shift(cfg, latent_hw))
  if s.timesteps:
    return jnp.asarray(s.timesteps, jnp.float32)
  schedule = s.schedule
  if schedule == "auto":
    schedule = "log_snr" if f.is_edm else "reference" if f.process == "rf" else "uniform"
  if schedule == "log_snr":
    return samplers.log_snr_grid(f.path, s.steps, samplers.t_max(f.path))
  if schedule == "reference":
    return samplers.reference_grid(s.steps, shift=s.shift or f.shift, train_timesteps=s.train_timesteps)
  return samplers.timestep_grid(s.steps, shift=s.shift or f.shift)


def make_generate(cfg: TrainConfig):
  """jit-able (params, cond, null_cond, noise (B, h, w, C), ts=None) → latents, for any backbone.

  cond holds the backbone's conditioning features batched ({context, pooled} or {label}); null_cond the
  unconditional (or negative-prompt) ones, unbatched (broadcast) or one per sample, run in the same batch
  for classifier-free guidance. ts: the time grid (steps + 1 decreasing times ending at 0); None →
  sampling_grid(cfg).
  """
  f, scfg = cfg.formulation, cfg.sample

  def generate(params, cond, null_cond, noise, ts=None):
    b = noise.shape[0]
    if ts is None:
      ts = sampling_grid(cfg, noise.shape[1:3])  # traced: nothing is computed outside the compiled program

    def net(z, t, guided):
      zin = f.model_input(z, t)
      if not guided:
        return model.forward(cfg.model, params, zin, t, cond)
      # (a super-resolution stage's low-res input conditions both branches: guidance is on the text alone)
      null = {k: cond[k] if k in model.SR_FEATURES else null_cond[k] for k in cond}
      both = jax.tree.map(lambda c, n: jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)]),
                          cond, null)
      out = model.forward(cfg.model, params, jnp.concatenate([zin, zin]), jnp.concatenate([t, t]), both)
      return out[:b], out[b:]

    skip_net = None
    if scfg.skip_layers:  # SD3.5's skip-layer guidance: the conditional branch with those layers skipped
      skip_net = lambda z, t: model.forward(cfg.model, params, f.model_input(z, t), t, cond,
                                            skip_layers=scfg.skip_layers)
    denoise = samplers.make_denoiser(f.path, f.prediction, net, guidance_scale=scfg.guidance,
                                     guidance_interval=scfg.guidance_interval, threshold=scfg.threshold,
                                     percentile=scfg.percentile, num_steps=ts.shape[0] - 1,
                                     skip_net=skip_net if scfg.guidance > 1 else None,
                                     skip_scale=scfg.skip_scale, skip_interval=scfg.skip_interval)
    return samplers.sample(scfg.sampler, f.path, denoise, noise, ts)

  return generate


@jax.jit
def _noise(key, indices, zeros):
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), zeros.shape[1:]))(indices)


def sample_noise(seed: int, indices, shape) -> np.ndarray:
  """Initial noise of samples `indices`: sample i draws from fold_in(key(seed), i), so a sample's noise
  depends on its seed and index alone, not on batching."""
  indices = np.asarray(indices, np.int32)
  return np.asarray(_noise(jax.random.key(seed), indices, jnp.zeros((len(indices), *shape), jnp.float32)))


def augmentation_noise(cfg: TrainConfig, n: int, shape) -> np.ndarray:
  """The noise that augments a super-resolution stage's low-res input of samples 0..n−1 at sampling: the
  initial-noise draws of seed config.sample.seed + 1 (independent of the samples' own noise)."""
  return sample_noise(cfg.sample.seed + 1, np.arange(n), shape)


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


def save_png(image: np.ndarray, path):
  """A uint8 (H, W, 3) image as PNG at any epath location (local or gs://)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")


def generate_batched(generate, params, cond: dict, null_cond: dict, noise: np.ndarray, batch: int, mesh,
                     null_per_sample: bool = False):
  """Runs `generate` over all rows in fixed batches of `batch` (one compilation), split over the mesh.
  null_cond is shared by every sample, or (null_per_sample: negative prompts) one row per sample."""
  n = len(noise)
  dp = parallel.data_parallel_size(mesh)
  batch = -(-min(batch, n) // dp) * dp
  shared = None if null_per_sample else {k: jnp.asarray(v) for k, v in null_cond.items()}
  chunks = []
  for i in range(0, n, batch):
    rows = {k: parallel.put_rows(parallel.pad_batch(v[i:i + batch], batch), mesh) for k, v in cond.items()}
    null = shared if shared is not None else {k: parallel.put_rows(parallel.pad_batch(v[i:i + batch], batch), mesh)
                      for k, v in null_cond.items()}
    z = parallel.put_rows(parallel.pad_batch(noise[i:i + batch], batch), mesh)
    chunks.append(np.asarray(parallel.to_host(generate(params, rows, null, z)))[:min(batch, n - i)])
  return np.concatenate(chunks)


DEMO_CAPTION_SEED = 12345


class SampleEvaluator:
  """Generates from fixed conditioning with given params and scores the samples.

  Text demo: captions of random scenes (fixed seed) through the demo encoder, scored by compositional
  accuracy. Class demo: every label in turn, scored by class accuracy. Other datasets: the conditioning
  of the first validation examples. Samples are images directly in a pixel-space dataset (metadata
  "pixels": true, as the demos), else decoded with the VAE the dataset records (or config.encoders);
  without one there are no images to score. References for FID are the validation images.
  """

  def __init__(self, cfg: TrainConfig, val_set, mesh, out_dir, autoencoder=None, demo_kind: str | None = None):
    self.cfg, self.mesh, self.out_dir = cfg, mesh, epath.Path(out_dir)
    ecfg = cfg.eval
    n = ecfg.num_samples
    rows = _first_rows(val_set, n)
    self.captions = self.labels = None
    if demo_kind in ("text", "pairs"):  # (pairs: the DPO demo's captions are the text demo's)
      rng = np.random.default_rng(DEMO_CAPTION_SEED)
      scenes = [demo.random_scene(rng) for _ in range(n)]
      self.captions = [demo.caption(s) for s in scenes]
      encoder = demo.DemoTextEncoder()
      enc = [encoder(c) for c in self.captions]
      self.cond = {"context": np.stack([c for c, _ in enc]).astype(np.float32),
                   "pooled": np.stack([p for _, p in enc]).astype(np.float32)}
      null = dict(zip(("context", "pooled"), encoder("")))
    elif demo_kind == "classes":
      self.labels = np.arange(n, dtype=np.int32) % demo.NUM_CLASSES
      self.cond, null = {"label": self.labels}, None
    else:
      self.cond = {k: rows[k] for k in cfg.model.cond_features}
      null = val_set.null
      if null is None and "context" in cfg.model.cond_features:
        null = {k: np.zeros_like(rows[k][0]) for k in ("context", "pooled")}
    self.null_cond = {k: np.asarray(v, np.float32 if k != "label" else np.int32)
                      for k, v in cfg.model.null_cond(null).items()}
    pixels = bool(val_set.meta.extras.get("pixels", False))
    self.decode = (lambda latents: np.asarray(latents)) if pixels else (
        autoencoder.decode if autoencoder is not None else None)
    self.latent_shape = rows["latent"].shape[1:]
    reference = rows["latent"].astype(np.float32)
    if self.captions is not None and val_set.meta.extras.get("demo_task"):
      # A dataset of the demo's scenes that is not the demo (the on-policy DPO pairs hold the base model's own
      # samples): FID against the captioned scenes rendered, as the demo's references are.
      reference = np.stack([demo.render(s, np.random.default_rng(i), size=self.latent_shape[0])
                            for i, s in enumerate(scenes)]).astype(np.float32)
    self.reference = None if self.decode is None else self.decode(reference)
    self.fid_fn = (None if ecfg.fid_network == "none" or self.decode is None
                   else fid.feature_network(ecfg.fid_network, ecfg.inception_weights))
    self.clip_hook = fid.load_clip_score_hook(ecfg.clip_score)
    self.clip = None
    if ecfg.clip and self.decode is not None:
      from mmdit_jax.clip_metrics import CLIPMetrics
      self.clip = CLIPMetrics(ecfg.clip)
    self.noise = sample_noise(cfg.sample.seed, np.arange(n), self.latent_shape)
    self.sr_target = None
    if cfg.sr.factor and self.decode is not None:
      # A super-resolution stage: its low-res input is the ground truth downsampled (on the text demo, the
      # captioned scenes rendered at the stage's size), scored by PSNR against that truth, beside bicubic.
      target = (np.stack([demo.render(s, size=self.latent_shape[0]) for s in scenes]) if self.captions is not None
                else rows["latent"].astype(np.float32))
      lowres = np.asarray(superres.downsample(target, cfg.sr.factor))
      self.cond.update(superres.sampling_condition(cfg, lowres, augmentation_noise(cfg, n, self.latent_shape)))
      self.sr_target = self.decode(target)
      self.sr_bicubic = psnr(self.decode(np.asarray(superres.upsample(lowres, target.shape[1:3], "bicubic"))),
                             self.sr_target)
    self.generate = jax.jit(make_generate(cfg))
    if self.decode is None:
      warn("sample evaluation: no VAE to decode latents into images (set config.encoders); FID and grids skipped")

  def __call__(self, params, step: int, writer=None) -> dict:
    if self.decode is None:
      return {}
    latents = generate_batched(self.generate, params, self.cond, self.null_cond, self.noise,
                               self.cfg.data.global_batch_size, self.mesh)
    images = self.decode(latents)
    results = {}
    if self.captions is not None:
      acc = demo.compositional_accuracy(images, self.captions)
      chance = demo.compositional_accuracy(images, self.captions[1:] + self.captions[:1])
      results.update({f"demo/accuracy_{k}": v for k, v in acc.items()})
      results.update({f"demo/chance_{k}": v for k, v in chance.items()})
    if self.labels is not None:
      acc = demo.class_accuracy(images, self.labels)
      chance = demo.class_accuracy(images, np.roll(self.labels, 1))
      results.update({f"demo/class_accuracy_{k}": v for k, v in acc.items()})
      results.update({f"demo/class_chance_{k}": v for k, v in chance.items()})
    if self.sr_target is not None:
      results["sr/psnr"] = psnr(images, self.sr_target)
      results["sr/psnr_bicubic"] = self.sr_bicubic
    if self.fid_fn is not None:
      results[f"fid/{self.cfg.eval.fid_network}"] = fid.fid(self.fid_fn, images, self.reference)
    if self.clip_hook is not None and self.captions is not None:
      results["clip_score"] = fid.clip_score(*self.clip_hook, images, self.captions)
    if self.clip is not None:
      results["cmmd"] = self.clip.cmmd(images, self.reference)
      if self.captions is not None and self.clip_hook is None:
        results["clip_score"] = self.clip.clip_score(images, self.captions)
    grid = grid_image(to_uint8(images), scale=4 if images.shape[1] <= 64 else 1)
    if jax.process_index() == 0:
      save_png(grid, self.out_dir / f"step_{step:07d}.png")
      if self.captions is not None or self.labels is not None:
        names = self.captions if self.captions is not None else [
            f"{int(l)} ({' '.join(demo.class_attributes(int(l)))})" for l in self.labels]
        (self.out_dir / "conditioning.txt").write_text("\n".join(names) + "\n")
    if writer is not None:
      writer.write(step, results)
      writer.write_image(step, "samples", grid)
    log(f"samples at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()) +
        f" → {self.out_dir / f'step_{step:07d}.png'}")
    return results


def psnr(images, reference) -> float:
  """Mean PSNR (dB) of images against reference, both in [−1, 1] (peak-to-peak 2), per image then averaged."""
  a = np.clip(np.asarray(images, np.float32), -1, 1)
  b = np.clip(np.asarray(reference, np.float32), -1, 1)
  mse = np.mean(np.square(a - b).reshape(len(a), -1), axis=1)
  return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10))))


def _first_rows(dataset, n: int) -> dict:
  rows: dict = {}
  for i in range(-(-n // dataset.cfg.global_batch_size)):
    batch = dataset.load_batch(i % dataset.batches_per_epoch, 0, 1)
    for k, v in batch.items():
      rows.setdefault(k, []).append(np.asarray(v))
  return {k: np.concatenate(v)[:n] for k, v in rows.items()}
