"""Sampling from a trained model and the evaluation run, restoring a checkpoint onto any mesh.

`--mode=sample`: prompts (the demo encoder on the demo dataset, the SD3 encoders + VAE otherwise) or a
.npz of precomputed embeddings in, PNG files out.
`--mode=eval`: validation loss (EMA and raw) + sample evaluation (evaluate.SampleEvaluator: grid, FID,
CLIP score, demo compositional accuracy) → eval.json and TensorBoard.
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
from mmdit_jax import data, evaluate, parallel
from mmdit_jax.checkpoint import Checkpointer
from mmdit_jax.data import demo
from mmdit_jax.metrics import MetricWriter, log
from mmdit_jax.train_step import make_optimizer, state_shardings


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


def _recorded_paths(config_dict, cfg):
  """(EncoderPaths, t5 tokens) from config.encoders, else from the paths the precompute job recorded in
  the dataset's metadata; None when neither names them."""
  from mmdit_jax.encoders import sd3
  enc = config_dict.get("encoders") or {}
  if enc.get("root") or enc.get("clip_l"):
    return sd3.EncoderPaths.from_config(enc), 77
  if not cfg.data.path or cfg.data.path.startswith("tfds:"):
    return None
  meta = data.load_metadata(cfg.data.path)
  recorded = meta.extras.get("encoders", {})
  if not isinstance(recorded, dict) or "vae" not in recorded:
    return None
  get = lambda role, key: recorded[role][key] if role in recorded else ""
  paths = sd3.EncoderPaths(
      **{r: get(r, "path") for r in ("clip_l", "clip_g", "t5", "vae")},
      **{f"{r}_tokenizer": get(r, "tokenizer") for r in ("clip_l", "clip_g", "t5")})
  if enc.get("no_t5"):
    paths = dataclasses.replace(paths, t5="", t5_tokenizer="")
  return paths, int(meta.extras.get("t5_tokens", 77))


def autoencoder_for(config_dict, cfg, mesh):
  """The VAE of the dataset (or config.encoders), to turn latents into images; None if unknown."""
  from mmdit_jax.encoders import sd3
  found = _recorded_paths(config_dict, cfg)
  return None if found is None or not found[0].vae else sd3.Autoencoder(found[0].vae, mesh)


def sd3_encoders(config_dict, cfg, mesh):
  """(SD3TextEncoder, Autoencoder) laid out for the model's context width."""
  from mmdit_jax.encoders import sd3
  found = _recorded_paths(config_dict, cfg)
  if found is None or not found[0].clip_l:
    raise ValueError(f"{cfg.data.path or 'the dataset'} does not record SD3 encoders: set config.encoders.root to "
                     "a diffusers SD3 checkpoint, or pass --embeddings=FILE.npz")
  paths, t5_tokens = found
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
    scfg = config_lib.sample_config(config_dict)
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
    generate = jax.jit(evaluate.make_generate(cfg, scfg, latent_shape))
    latents = generate(state["ema"], jnp.asarray(context, jnp.float32), jnp.asarray(pooled, jnp.float32),
                       jnp.asarray(null_context, jnp.float32), jnp.asarray(null_pooled, jnp.float32),
                       jax.random.key(scfg.seed))
  out_dir = pathlib.Path(workdir) / "samples"
  out_dir.mkdir(parents=True, exist_ok=True)
  latents = parallel.to_host(latents)
  if autoencoder is not None:
    images, scale = evaluate.to_uint8(autoencoder.decode(latents)), 1
  elif latent_shape[-1] == 3:  # the demo's "latents" are RGB images
    images, scale = evaluate.to_uint8(latents), 4
  else:
    np.save(out_dir / "latents.npy", latents)
    log(f"wrote {len(names)} latents to {out_dir / 'latents.npy'} (decode them with the VAE)")
    return [out_dir / "latents.npy"]
  paths = []
  for name, img in zip(names, images):
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(
        out_dir / f"{name}.png")
    paths.append(out_dir / f"{name}.png")
  evaluate.save_grid(images, out_dir / "grid.png", scale=scale)
  log(f"wrote {len(paths)} samples and grid.png to {out_dir}")
  return paths


def run_eval(config_dict, workdir) -> dict:
  """Validation loss for EMA and raw weights, and sample evaluation of the EMA weights (grid, FID, CLIP
  score, demo compositional accuracy beside chance) → eval.json and TensorBoard."""
  mesh = parallel.make_mesh(tuple(config_dict.mesh.ici), tuple(config_dict.mesh.dcn))
  results = {}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    cfg, state = restore(config_dict, workdir, mesh)
    val_set = evaluation_set(cfg)
    for name in ("ema", "raw"):
      params = state["ema" if name == "ema" else "params"]
      for k, v in evaluate.validation_loss(cfg, params, val_set, mesh, cfg.eval_batches).items():
        results[k.replace("val/", f"val_{name}/")] = v
    step = int(jax.device_get(state["step"]))
    writer = MetricWriter(workdir)
    evaluator = evaluate.SampleEvaluator(cfg, config_lib.sample_config(config_dict), config_lib.eval_config(config_dict),
                                         val_set, mesh, workdir, autoencoder_for(config_dict, cfg, mesh))
    results.update(evaluator(state["ema"], step, writer))
  writer.write(step, results)
  writer.close()
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / "eval.json").write_text(json.dumps({"step": step, **results}, indent=1))
  log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if "_t0" not in k))
  return results


def evaluation_set(cfg):
  """The held-out dataset: config.data.val_path, the demo's validation split, or the training data."""
  val_path = cfg.data.val_path or (demo.ensure_demo("validation") if _is_demo(cfg) else cfg.data.path)
  return data.Dataset(data.PipelineConfig(val_path, cfg.data.global_batch_size, shuffle=False, text_dropout=(),
                                          num_threads=2, tfds_data_dir=cfg.data.tfds_data_dir))
