"""Sampling from a trained model and the evaluation run: restore a checkpoint (any mesh), measure
validation loss, draw sample grids as PNG, and on the demo dataset score compositional accuracy.

`--mode=sample`: prompts (demo encoder) or a .npz of precomputed embeddings in, PNG files out.
`--mode=eval`: validation loss (EMA and raw) + samples + compositional accuracy → eval.json, TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from mmdit_jax import config as config_lib
from mmdit_jax import data, evaluate, model, parallel
from mmdit_jax.checkpoint import Checkpointer
from mmdit_jax.data import demo
from mmdit_jax.flow import samplers
from mmdit_jax.metrics import MetricWriter, log
from mmdit_jax.train_step import make_optimizer, state_shardings


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  sampler: str = "euler"  # key of flow.samplers.SAMPLERS
  steps: int = 28
  guidance: float = 4.0  # classifier-free guidance scale (1 = none)
  guidance_interval: tuple[float, float] = (0.0, 1.0)
  threshold: str = "none"  # none | static | dynamic
  percentile: float = 0.995
  seed: int = 0


def sample_config(c) -> SampleConfig:
  s = c.get("sample", {})
  cfg = SampleConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(s).items()})
  if cfg.sampler not in samplers.SAMPLERS:
    raise ValueError(f"config.sample.sampler={cfg.sampler!r}; valid: {sorted(samplers.SAMPLERS)}")
  if cfg.threshold not in samplers.THRESHOLDS:
    raise ValueError(f"config.sample.threshold={cfg.threshold!r}; valid: {sorted(samplers.THRESHOLDS)}")
  return cfg


def make_generate(cfg: config_lib.TrainConfig, scfg: SampleConfig, latent_shape):
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


def save_grid(images: np.ndarray, path, cols: int = 8, scale: int = 4):
  """A PNG grid of (N, h, w, 3) uint8 images, each upscaled `scale`× (nearest) for viewing."""
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def restore(config_dict, workdir, mesh):
  """(TrainConfig, state) from the newest checkpoint in workdir, laid out on `mesh`."""
  cfg = config_lib.from_config_dict(config_dict)
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  abstract, shardings = state_shardings(cfg.model, tx, mesh, parallel.DEFAULT_RULES)
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints")
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}; train first")
  state, _ = ckpt.restore(step, abstract, shardings)
  ckpt.close()
  return cfg, state


def _is_demo(cfg) -> bool:
  return not cfg.data.path


def sd3_encoders(config_dict, cfg, mesh):
  """(SD3TextEncoder, Autoencoder) from config.encoders, else from the paths the precompute job recorded
  in the dataset's metadata; the context layout matches the model's."""
  from mmdit_jax.encoders import sd3
  enc = config_dict.get("encoders") or {}
  t5_tokens = 77
  if enc.get("root") or enc.get("clip_l"):
    paths = sd3.EncoderPaths.from_config(enc)
  else:
    meta = data.load_metadata(cfg.data.path)
    recorded = meta.extras.get("encoders", {})
    if not {"clip_l", "clip_g", "vae"} <= set(recorded):
      raise ValueError(f"{cfg.data.path} does not record SD3 encoders (it has {sorted(recorded)}): set "
                       "config.encoders.root to a diffusers SD3 checkpoint, or pass --embeddings=FILE.npz")
    paths = sd3.EncoderPaths(**{
        **{r: recorded[r]["path"] if r in recorded else "" for r in ("clip_l", "clip_g", "t5", "vae")},
        **{f"{r}_tokenizer": recorded[r]["tokenizer"] if r in recorded else "" for r in ("clip_l", "clip_g", "t5")}})
    if enc.get("no_t5"):
      paths = dataclasses.replace(paths, t5="", t5_tokenizer="")
    t5_tokens = int(meta.extras.get("t5_tokens", 77))
  text = sd3.SD3TextEncoder(paths, mesh, t5_tokens=t5_tokens, context_dim=cfg.model.context_dim)
  if text.pooled_dim != cfg.model.pooled_dim:
    raise ValueError(f"the encoders give pooled width {text.pooled_dim}; the model's pooled_dim is "
                     f"{cfg.model.pooled_dim}")
  return text, sd3.Autoencoder(paths.vae, mesh)


def run_sample(config_dict, workdir, prompts: list[str] | None = None, embeddings: str | None = None):
  """Writes one PNG per prompt (and a grid) under workdir/samples; returns their paths.

  Prompts go through the demo encoder on the demo dataset and through the SD3 encoders otherwise (their
  latents decoded by the VAE); `embeddings` is a .npz of precomputed ones (latents saved undecoded).
  """
  mesh = parallel.make_mesh(tuple(config_dict.mesh.ici), tuple(config_dict.mesh.dcn))
  autoencoder = None
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    cfg, state = restore(config_dict, workdir, mesh)
    scfg = sample_config(config_dict)
    if embeddings:
      with np.load(embeddings) as e:
        context, pooled = e["context"], e["pooled"]
        null_context, null_pooled = e["null_context"], e["null_pooled"]
        latent_shape = tuple(int(x) for x in e["latent_shape"])
      names = [f"sample_{i:03d}" for i in range(len(context))]
    else:
      if _is_demo(cfg):
        encoder = demo.DemoTextEncoder()
        enc = [encoder(p) for p in prompts]
        context, pooled = np.stack([c for c, _ in enc]), np.stack([p for _, p in enc])
        null_context, null_pooled = encoder("")
        latent_shape = (demo.SIZE, demo.SIZE, 3)
      else:
        text, autoencoder = sd3_encoders(config_dict, cfg, mesh)
        context, pooled = text(prompts)
        null_context, null_pooled = (a[0] for a in text([""]))
        latent_shape = (cfg.model.sample_size, cfg.model.sample_size, cfg.model.in_channels)
      names = [f"{i:03d}_" + "".join(ch if ch.isalnum() else "_" for ch in p)[:60] for i, p in enumerate(prompts)]
    generate = jax.jit(make_generate(cfg, scfg, latent_shape))
    latents = generate(state["ema"], jnp.asarray(context, jnp.float32), jnp.asarray(pooled, jnp.float32),
                       jnp.asarray(null_context, jnp.float32), jnp.asarray(null_pooled, jnp.float32),
                       jax.random.key(scfg.seed))
  out_dir = pathlib.Path(workdir) / "samples"
  out_dir.mkdir(parents=True, exist_ok=True)
  latents = parallel.to_host(latents)
  if autoencoder is not None:
    images, scale = to_uint8(autoencoder.decode(latents)), 1
  elif latent_shape[-1] == 3:  # the demo's "latents" are RGB images
    images, scale = to_uint8(latents), 4
  else:
    np.save(out_dir / "latents.npy", latents)
    log(f"wrote {len(names)} latents to {out_dir / 'latents.npy'} (decode them with the VAE)")
    return [out_dir / "latents.npy"]
  paths = []
  for name, img in zip(names, images):
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(
        out_dir / f"{name}.png")
    paths.append(out_dir / f"{name}.png")
  save_grid(images, out_dir / "grid.png", scale=scale)
  log(f"wrote {len(paths)} samples and grid.png to {out_dir}")
  return paths


def run_eval(config_dict, workdir, num_samples: int = 64) -> dict:
  """Validation loss for EMA and raw weights; on the demo, samples for held-out captions and their
  compositional accuracy beside the chance level (the same images scored against shuffled captions)."""
  mesh = parallel.make_mesh(tuple(config_dict.mesh.ici), tuple(config_dict.mesh.dcn))
  results = {}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    cfg, state = restore(config_dict, workdir, mesh)
    val_path = cfg.data.val_path or (demo.ensure_demo("validation") if _is_demo(cfg) else cfg.data.path)
    val_set = data.Dataset(data.PipelineConfig(val_path, cfg.data.global_batch_size, shuffle=False,
                                               text_dropout=(), num_threads=2,
                                               tfds_data_dir=cfg.data.tfds_data_dir))
    for name in ("ema", "raw"):
      params = state["ema" if name == "ema" else "params"]
      for k, v in evaluate.validation_loss(cfg, params, val_set, mesh, cfg.eval_batches).items():
        results[k.replace("val/", f"val_{name}/")] = v
    step = int(jax.device_get(state["step"]))
    if _is_demo(cfg):
      rng = np.random.default_rng(12345)
      captions = [demo.caption(demo.random_scene(rng)) for _ in range(num_samples)]
      encoder = demo.DemoTextEncoder()
      enc = [encoder(c) for c in captions]
      null_c, null_p = encoder("")
      scfg = sample_config(config_dict)
      generate = jax.jit(make_generate(cfg, scfg, (demo.SIZE, demo.SIZE, 3)))
      latents = generate(state["ema"], jnp.asarray(np.stack([c for c, _ in enc]), jnp.float32),
                         jnp.asarray(np.stack([p for _, p in enc]), jnp.float32),
                         jnp.asarray(null_c, jnp.float32), jnp.asarray(null_p, jnp.float32),
                         jax.random.key(scfg.seed))
      images = np.asarray(parallel.to_host(latents))
      acc = demo.compositional_accuracy(images, captions)
      chance = demo.compositional_accuracy(images, captions[1:] + captions[:1])
      results.update({f"demo/accuracy_{k}": v for k, v in acc.items()})
      results.update({f"demo/chance_{k}": v for k, v in chance.items()})
      out = pathlib.Path(workdir) / "samples"
      out.mkdir(parents=True, exist_ok=True)
      save_grid(to_uint8(images), out / f"eval_step{step}.png")
      (out / f"eval_step{step}_captions.txt").write_text("\n".join(captions))
  writer = MetricWriter(workdir)
  writer.write(step, results)
  writer.close()
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / "eval.json").write_text(json.dumps({"step": step, **results}, indent=1))
  log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if "_t0" not in k))
  return results
