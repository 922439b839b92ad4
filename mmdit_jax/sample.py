"""Sampling from a trained model and the evaluation run, restoring a checkpoint onto any mesh.

`--mode=sample`: prompts (the demo encoder on the demo dataset, the SD3 encoders + VAE otherwise), class
labels (class-conditional models) or a .npz of precomputed embeddings in; PNG files out, under
workdir/generated/ with generated.jsonl naming each file's conditioning and seed.
`--mode=eval`: validation loss (EMA and raw) + sample evaluation (grid, FID, CLIP score, demo accuracy)
→ workdir/eval/ (step_N.json and step_N.png per evaluated step, its own TensorBoard and metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmdit_jax import data, evaluate, inputs, parallel
from mmdit_jax.config import TrainConfig
from mmdit_jax.data import demo
from mmdit_jax.errors import UserError
from mmdit_jax.metrics import MetricWriter, log
from mmdit_jax.state import restore_for_eval


def _recorded_paths(cfg: TrainConfig):
  """(EncoderPaths, t5 tokens) from config.encoders, else from the paths the precompute job recorded in
  the dataset's metadata; None when neither names them."""
  from mmdit_jax.encoders import sd3
  if cfg.encoders.given:
    return sd3.EncoderPaths.from_config(cfg.encoders), 77
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
  if cfg.encoders.no_t5:
    paths = dataclasses.replace(paths, t5="", t5_tokenizer="")
  return paths, int(meta.extras.get("t5_tokens", 77))


def autoencoder_for(cfg: TrainConfig, mesh):
  """The VAE of the dataset (or config.encoders), to turn latents into images; None if unknown."""
  from mmdit_jax.encoders import sd3
  found = _recorded_paths(cfg)
  return None if found is None or not found[0].vae else sd3.Autoencoder(found[0].vae, mesh, cfg.sharding_rules)


def sd3_encoders(cfg: TrainConfig, mesh):
  """(SD3TextEncoder, Autoencoder) laid out for the model's context width."""
  from mmdit_jax.encoders import sd3
  found = _recorded_paths(cfg)
  if found is None or not found[0].clip_l:
    raise UserError(f"{cfg.data.path or 'the dataset'} does not record SD3 encoders: set config.encoders.root to "
                    "a diffusers SD3 checkpoint, or pass --embeddings=FILE.npz")
  paths, t5_tokens = found
  text = sd3.SD3TextEncoder(paths, mesh, cfg.sharding_rules, t5_tokens=t5_tokens, context_dim=cfg.model.context_dim)
  if text.pooled_dim != cfg.model.pooled_dim:
    raise UserError(f"the encoders give pooled width {text.pooled_dim}; config.model.pooled_dim is "
                    f"{cfg.model.pooled_dim}")
  return text, sd3.Autoencoder(paths.vae, mesh, cfg.sharding_rules)


def _slug(text: str, limit: int = 150) -> str:
  return re.sub(r"_+", "_", "".join(ch if ch.isalnum() else "_" for ch in text)).strip("_")[:limit] or "empty"


def _conditioning(cfg: TrainConfig, mesh, prompts, labels, embeddings):
  """(cond, null_cond, latent shape, names, autoencoder) for the requested samples."""
  autoencoder = None
  if embeddings:
    with epath.Path(embeddings).open("rb") as f, np.load(f) as e:
      cond = {"context": e["context"], "pooled": e["pooled"]}
      null = {"context": e["null_context"], "pooled": e["null_pooled"]}
      shape = tuple(int(x) for x in e["latent_shape"])
    return cond, cfg.model.null_cond(null), shape, [f"embedding {i}" for i in range(len(cond["context"]))], None
  if "label" in cfg.model.cond_features:
    if not labels:
      raise UserError("a class-conditional model samples from --labels=0,1,… (not --prompt)")
    bad = [l for l in labels if not 0 <= l < cfg.model.num_classes]
    if bad:
      raise UserError(f"--labels {bad} outside 0..{cfg.model.num_classes - 1}")
    size = cfg.model.input_size
    shape = (demo.SIZE, demo.SIZE, 3) if inputs.is_demo(cfg) else (size, size, cfg.model.in_channels)
    names = [f"class {l}" + (f" ({' '.join(demo.class_attributes(l))})" if inputs.is_demo(cfg) else "")
             for l in labels]
    if not inputs.pixel_space(cfg):
      autoencoder = autoencoder_for(cfg, mesh)
    return {"label": np.asarray(labels, np.int32)}, cfg.model.null_cond(), shape, names, autoencoder
  if labels:
    raise UserError(f"{type(cfg.model).__name__} is text-conditioned: pass --prompt, not --labels")
  if not prompts:
    raise UserError("--mode=sample needs --prompt, --prompts_file, --labels or --embeddings")
  if inputs.is_demo(cfg):
    encoder = demo.DemoTextEncoder()
    enc = [encoder(p) for p in prompts]
    cond = {"context": np.stack([c for c, _ in enc]), "pooled": np.stack([p for _, p in enc])}
    null = dict(zip(("context", "pooled"), encoder("")))
    shape = (demo.SIZE, demo.SIZE, 3)
  else:
    text, autoencoder = sd3_encoders(cfg, mesh)
    cond = dict(zip(("context", "pooled"), text(prompts)))
    null = {k: v[0] for k, v in zip(("context", "pooled"), text([""]))}
    shape = (cfg.model.sample_size, cfg.model.sample_size, cfg.model.in_channels)
  return cond, cfg.model.null_cond(null), shape, list(prompts), autoencoder


def run_sample(cfg: TrainConfig, workdir, prompts=(), embeddings: str | None = None, labels=()) -> list:
  """Writes one PNG per prompt or label (and grid.png) under workdir/generated; returns their paths."""
  workdir = epath.Path(workdir)
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    cond, null, shape, names, autoencoder = _conditioning(cfg, mesh, list(prompts), list(labels), embeddings)
    state, step = restore_for_eval(cfg, workdir, mesh)
    noise = evaluate.sample_noise(cfg.sample.seed, np.arange(len(names)), shape)
    generate = jax.jit(evaluate.make_generate(cfg))
    null = {k: np.asarray(v) for k, v in null.items()}
    latents = evaluate.generate_batched(generate, state["ema"], cond, null, noise, len(names), mesh)
  out_dir = workdir / "generated"
  out_dir.mkdir(parents=True, exist_ok=True)
  if autoencoder is not None:
    images, scale = evaluate.to_uint8(autoencoder.decode(latents)), 1
  elif inputs.pixel_space(cfg) and shape[-1] == 3:  # pixel-space data (the demos): samples are images
    images, scale = evaluate.to_uint8(latents), max(1, 128 // shape[0])
  else:
    with (out_dir / "latents.npy").open("wb") as f:
      np.save(f, latents)
    log(f"wrote {len(names)} latents to {out_dir / 'latents.npy'} (no VAE known: decode them with yours)")
    return [out_dir / "latents.npy"]
  paths, records = [], []
  for i, (name, img) in enumerate(zip(names, images)):
    path = out_dir / f"{i:03d}_{_slug(name)}.png"
    evaluate.save_png(np.repeat(np.repeat(img, scale, 0), scale, 1), path)
    paths.append(path)
    records.append({"file": path.name, "conditioning": name, "seed": cfg.sample.seed, "index": i, "step": step})
  evaluate.save_png(evaluate.grid_image(images, scale=scale), out_dir / "grid.png")
  (out_dir / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  log(f"wrote {len(paths)} samples of the step-{step} EMA weights and grid.png to {out_dir}")
  return paths


def run_eval(cfg: TrainConfig, workdir) -> dict:
  """Validation loss for EMA and raw weights, and sample evaluation of the EMA weights (grid, FID, CLIP
  score, demo accuracy beside chance) → workdir/eval/step_N.json, step_N.png, and TensorBoard."""
  workdir = epath.Path(workdir)
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    _, val_path = inputs.dataset_paths(cfg, announce=False)
    val_set = inputs.evaluation_set(cfg, val_path)
    state, step = restore_for_eval(cfg, workdir, mesh)
    out = workdir / "eval"
    results = evaluate.validation_both(cfg, state, val_set, mesh)
    evaluator = evaluate.SampleEvaluator(cfg, val_set, mesh, out, autoencoder_for(cfg, mesh),
                                         inputs.demo_kind(cfg) if inputs.is_demo(cfg) else None)
    writer = MetricWriter(workdir / "eval")
    results.update(evaluator(state["ema"], step, writer))
  writer.write(step, results)
  writer.close()
  if jax.process_index() == 0:
    (out / f"step_{step:07d}.json").write_text(json.dumps({"step": step, **results}, indent=1))
  log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if "_t0" not in k) +
      f" → {out / f'step_{step:07d}.json'}")
  return results
