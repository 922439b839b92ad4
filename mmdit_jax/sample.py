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

from mmdit_jax import data, evaluate, inputs, parallel, pretrained, superres
from mmdit_jax.config import TrainConfig
from mmdit_jax.data import demo
from mmdit_jax.errors import UserError
from mmdit_jax.metrics import MetricWriter, log
from mmdit_jax.state import restore_for_eval


def _recorded_paths(cfg: TrainConfig):
  """(EncoderPaths, text-encoder options) from config.encoders, else from what the precompute job recorded
  in the dataset's metadata (the encoders' paths, T5 length and clip_skip); None when neither names them."""
  from mmdit_jax.encoders import sd3
  e = cfg.encoders
  if e.given:
    return sd3.EncoderPaths.from_config(e), dict(t5_tokens=e.t5_tokens, t5_truncate=e.t5_truncate,
                                                 clip_skip=e.clip_skip)
  if not cfg.data.path or cfg.data.path.startswith("tfds:"):
    return None
  meta = data.load_metadata(cfg.data.path)
  recorded = meta.extras.get("encoders", {})
  if not isinstance(recorded, dict) or not {"vae", "clip_l"} & set(recorded):  # (pixel datasets: no vae)
    return None
  get = lambda role, key: recorded[role][key] if role in recorded else ""
  paths = sd3.EncoderPaths(
      **{r: get(r, "path") for r in ("clip_l", "clip_g", "t5", "vae")},
      **{f"{r}_tokenizer": get(r, "tokenizer") for r in ("clip_l", "clip_g", "t5")})
  if cfg.encoders.no_t5:
    paths = dataclasses.replace(paths, t5="", t5_tokenizer="")
  return paths, dict(t5_tokens=int(meta.extras.get("t5_tokens", 77)), t5_truncate=e.t5_truncate,
                     clip_skip=int(meta.extras.get("clip_skip", 0)))


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
  paths, options = found
  text = sd3.SD3TextEncoder(paths, mesh, cfg.sharding_rules, context_dim=cfg.model.context_dim, **options)
  if text.pooled_dim != cfg.model.pooled_dim:
    raise UserError(f"the encoders give pooled width {text.pooled_dim}; config.model.pooled_dim is "
                    f"{cfg.model.pooled_dim}")
  return text, (sd3.Autoencoder(paths.vae, mesh, cfg.sharding_rules) if paths.vae else None)


def _slug(text: str, limit: int = 150) -> str:
  return re.sub(r"_+", "_", "".join(ch if ch.isalnum() else "_" for ch in text)).strip("_")[:limit] or "empty"


@dataclasses.dataclass(frozen=True)
class Request:
  """One sample to draw: a prompt, its negative prompt (the unconditional branch of guidance) and seed
  (None: config.sample.seed with the sample's index)."""
  prompt: str
  negative_prompt: str = ""
  seed: int | None = None


def parse_prompts_file(text: str, where: str) -> list[Request]:
  """One request per non-empty line: plain text is a prompt; a JSON object names `prompt` and optionally
  `negative_prompt` and `seed`."""
  requests = []
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    if not line.startswith("{"):
      requests.append(Request(line))
      continue
    try:
      row = json.loads(line)
      unknown = sorted(set(row) - {"prompt", "negative_prompt", "seed"})
      if unknown or not isinstance(row.get("prompt"), str):
        raise ValueError(f"needs a string 'prompt' and only 'negative_prompt', 'seed' besides (got {sorted(row)})")
      seed = row.get("seed")
      if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
      requests.append(Request(row["prompt"], str(row.get("negative_prompt", "")), seed))
    except ValueError as e:
      raise UserError(f"{where}:{n}: {e}") from e
  return requests


def image_shape(cfg: TrainConfig, pixel_space: bool) -> tuple[int, int, int]:
  """(h, w, C) of the samples' latents (or pixels): config.sample.height/width (the model's size when 0),
  checked against what the backbone can place (MM-DiT: its position grid of pos_embed_max_size patches)."""
  m, s = cfg.model, cfg.sample
  channels = 3 if pixel_space else m.in_channels
  factor = 1 if pixel_space else 8  # SD3's VAE
  native = (cfg.data.demo_size if pixel_space and inputs.is_demo(cfg) else
            getattr(m, "sample_size", None) or m.input_size)
  h = s.height // factor if s.height else native
  w = s.width // factor if s.width else native
  patch = m.patch_size
  if h % patch or w % patch:
    raise UserError(f"sample size {h * factor}×{w * factor} px: the {'pixel' if pixel_space else 'latent'} "
                    f"size {h}×{w} must be a multiple of the patch size {patch}")
  limit = getattr(m, "pos_embed_max_size", None)
  if limit and max(h, w) > limit * patch:
    raise UserError(f"sample size {s.height or h * factor}×{s.width or w * factor} px is beyond the position "
                    f"grid ({limit} patches of {patch} = {limit * patch * factor} px a side; "
                    f"config.model.pos_embed_max_size)")
  return h, w, channels


def _noise(cfg: TrainConfig, requests, shape) -> np.ndarray:
  """Initial noise: config.sample.noise (.npy, one row per sample), else sample i's own seed (index 0 of
  it) or, without one, fold_in(key(sample.seed), i)."""
  n = len(requests)
  if cfg.sample.noise:
    path = epath.Path(cfg.sample.noise)
    if not path.exists():
      raise UserError(f"config.sample.noise={path} does not exist")
    with path.open("rb") as f:
      noise = np.load(f)
    if noise.shape != (n, *shape):
      raise UserError(f"config.sample.noise={path} has shape {noise.shape}; {n} samples of {shape} need "
                      f"{(n, *shape)}")
    return noise.astype(np.float32)
  rows = [evaluate.sample_noise(r.seed, [0], shape)[0] if r.seed is not None else None for r in requests]
  default = evaluate.sample_noise(cfg.sample.seed, np.arange(n), shape) if None in [
      r.seed for r in requests] else None
  return np.stack([row if row is not None else default[i] for i, row in enumerate(rows)])


def _conditioning(cfg: TrainConfig, mesh, requests, labels, embeddings):
  """(groups, latent shape, names, autoencoder) for the requested samples; each group is (indices, cond,
  null_cond, null per sample?) — one group, except that prompts whose T5 lengths differ (encoders.t5_truncate
  False, SD3's reference tokenisation) cannot share a batch: a group per length."""
  autoencoder = None
  if embeddings:
    with epath.Path(embeddings).open("rb") as f, np.load(f) as e:
      cond = {"context": e["context"], "pooled": e["pooled"]}
      null = {"context": e["null_context"], "pooled": e["null_pooled"]}
      shape = tuple(int(x) for x in e["latent_shape"])
    n = len(cond["context"])
    return [(np.arange(n), cond, cfg.model.null_cond(null), False)], shape, [f"embedding {i}" for i in range(n)], None
  if "label" in cfg.model.cond_features:
    if not labels:
      raise UserError("a class-conditional model samples from --labels=0,1,… (not --prompt)")
    bad = [l for l in labels if not 0 <= l < cfg.model.num_classes]
    if bad:
      raise UserError(f"--labels {bad} outside 0..{cfg.model.num_classes - 1}")
    shape = image_shape(cfg, inputs.pixel_space(cfg))
    names = [f"class {l}" + (f" ({' '.join(demo.class_attributes(l))})" if inputs.is_demo(cfg) else "")
             for l in labels]
    if not inputs.pixel_space(cfg):
      autoencoder = autoencoder_for(cfg, mesh)
    cond = {"label": np.asarray(labels, np.int32)}
    return [(np.arange(len(labels)), cond, cfg.model.null_cond(), False)], shape, names, autoencoder
  if labels:
    raise UserError(f"{type(cfg.model).__name__} is text-conditioned: pass --prompt, not --labels")
  if not requests:
    raise UserError("--mode=sample needs --prompt, --prompts_file, --labels or --embeddings")
  per_sample = any(r.negative_prompt for r in requests)  # else one shared unconditional branch: ""
  if inputs.is_demo(cfg):
    encoder = demo.DemoTextEncoder()
    length = lambda r: None

    def encode(texts, _length):
      enc = [encoder(t) for t in texts]
      return {"context": np.stack([c for c, _ in enc]), "pooled": np.stack([p for _, p in enc])}
  else:
    text, autoencoder = sd3_encoders(cfg, mesh)
    encode = lambda texts, n: dict(zip(("context", "pooled"), text(texts, t5_length=n)))
    length = lambda r: max(text.t5_length(r.prompt), text.t5_length(r.negative_prompt))
  shape = image_shape(cfg, inputs.pixel_space(cfg))
  by_length: dict[int, list[int]] = {}
  for i, r in enumerate(requests):
    by_length.setdefault(length(r), []).append(i)
  groups = []
  for n, indices in by_length.items():  # (prompts and their negatives padded to the group's T5 length)
    cond = encode([requests[i].prompt for i in indices], n)
    null = (encode([requests[i].negative_prompt for i in indices], n) if per_sample else
            {k: v[0] for k, v in encode([""], n).items()})
    groups.append((np.asarray(indices), cond, cfg.model.null_cond(null), per_sample))
  return groups, shape, [r.prompt for r in requests], autoencoder


@dataclasses.dataclass
class Samples:
  """One stage's samples: latents (the model's space), images in [−1, 1] (None: no VAE known), names and
  requests per sample, and the step of the weights."""
  latents: np.ndarray
  images: np.ndarray | None
  names: list
  requests: list
  step: int
  pixel_space: bool


def generate(cfg: TrainConfig, workdir, requests=(), embeddings: str | None = None, labels=(), *,
             lowres: np.ndarray | None = None, aug_level: float | None = None) -> Samples:
  """Samples of the EMA weights of the run in `workdir` (or config.init's) for prompts (Requests), labels or
  embeddings. A super-resolution stage (config.sr.factor) also takes `lowres` (N, h, w, C): the stage below's
  output in this stage's space, upsampled and noise-augmented at aug_level (default config.sr.aug_level)."""
  workdir = epath.Path(workdir)
  requests = list(requests)
  cfg, imported = pretrained.resolve(cfg)  # config.init: official weights, their encoders and shift
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    groups, shape, names, autoencoder = _conditioning(cfg, mesh, requests, list(labels), embeddings)
    if cfg.sr.factor:
      if lowres is None:
        raise UserError(f"{workdir} is a super-resolution stage (config.sr.factor={cfg.sr.factor}): it samples after a "
                        "base model, in a cascade — --workdir=BASE_RUN --cascade=" + str(workdir))
      want = (len(names), shape[0] // cfg.sr.factor, shape[1] // cfg.sr.factor, shape[2])
      if tuple(lowres.shape) != want:
        raise UserError(f"{workdir}: this {cfg.sr.factor}× stage makes {shape[0]}×{shape[1]} from {want[1]}×{want[2]}×"
                        f"{want[3]} inputs; the stage below gave {tuple(lowres.shape[1:])} (set its sample size, or "
                        "this stage's config.sample.height/width)")
    state, step = restore_for_eval(cfg, workdir, mesh, imported)
    requests = requests or [Request(name) for name in names]
    noise = _noise(cfg, requests, shape)
    aug_noise = evaluate.augmentation_noise(cfg, len(noise), shape) if cfg.sr.factor else None
    run = jax.jit(evaluate.make_generate(cfg))
    latents = np.zeros(noise.shape, np.float32)
    for indices, cond, null, per_sample in groups:  # (one group unless T5 lengths differ)
      if cfg.sr.factor:
        cond = {**cond, **superres.sampling_condition(cfg, lowres[indices], aug_noise[indices], aug_level)}
      null = {k: np.asarray(v) for k, v in null.items()}
      latents[indices] = evaluate.generate_batched(run, state["ema"], cond, null, noise[indices],
                                                   cfg.sample.batch_size, mesh, per_sample)
  pixel_space = inputs.pixel_space(cfg) and shape[-1] == 3  # pixel-space data (the demos): samples are images
  images = autoencoder.decode(latents) if autoencoder is not None else latents if pixel_space else None
  return Samples(latents, None if images is None else np.asarray(images, np.float32), names, requests, step,
                 pixel_space)


def write_samples(cfg: TrainConfig, samples: Samples, out_dir) -> list:
  """One PNG per sample and grid.png under out_dir (or latents.npy when no VAE is known), with
  generated.jsonl naming each file's conditioning, negative prompt and seed; returns the paths."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if samples.images is None:
    with (out_dir / "latents.npy").open("wb") as f:
      np.save(f, samples.latents)
    log(f"wrote {len(samples.names)} latents to {out_dir / 'latents.npy'} (no VAE known: decode them with yours)")
    return [out_dir / "latents.npy"]
  decoded = samples.images
  scale = max(1, 128 // decoded.shape[1]) if samples.pixel_space else 1
  images = evaluate.to_uint8(decoded)
  if cfg.sample.save_arrays:  # unrounded, as diffusers' output_type="np": (x + 1) / 2 clipped to [0, 1]
    with (out_dir / "images.npy").open("wb") as f:
      np.save(f, np.clip((decoded + 1) / 2, 0, 1))
  paths, records = [], []
  for i, (name, img) in enumerate(zip(samples.names, images)):
    path = out_dir / f"{i:03d}_{_slug(name)}.png"
    evaluate.save_png(np.repeat(np.repeat(img, scale, 0), scale, 1), path)
    paths.append(path)
    r = samples.requests[i]
    records.append({"file": path.name, "conditioning": name, "negative_prompt": r.negative_prompt,
                    "seed": cfg.sample.seed if r.seed is None else r.seed, "index": 0 if r.seed is not None else i,
                    "noise": cfg.sample.noise or None, "step": samples.step})
  evaluate.save_png(evaluate.grid_image(images, scale=scale), out_dir / "grid.png")
  (out_dir / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  log(f"wrote {len(paths)} samples of the step-{samples.step} EMA weights and grid.png to {out_dir}")
  return paths


def run_sample(cfg: TrainConfig, workdir, prompts=(), embeddings: str | None = None, labels=()) -> list:
  """Writes one PNG per prompt (str or Request) or label, and grid.png, under workdir/generated; returns
  their paths. generated.jsonl names each file's conditioning, negative prompt and seed."""
  requests = [p if isinstance(p, Request) else Request(p) for p in prompts]
  samples = generate(cfg, workdir, requests, embeddings, labels)
  return write_samples(cfg, samples, epath.Path(workdir) / "generated")


def run_eval(cfg: TrainConfig, workdir) -> dict:
  """Validation loss for EMA and raw weights, and sample evaluation of the EMA weights (grid, FID, CLIP
  score, demo accuracy beside chance) → workdir/eval/step_N.json, step_N.png, and TensorBoard."""
  workdir = epath.Path(workdir)
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    _, val_path = inputs.dataset_paths(cfg, announce=False)
    val_set = inputs.evaluation_set(cfg, val_path)
    state, step = restore_for_eval(cfg, workdir, mesh, pretrained.resolve(cfg)[1] if cfg.lora.rank else None)
    out = workdir / "eval"
    results = evaluate.validation_both(cfg, state, val_set, mesh)
    evaluator = evaluate.SampleEvaluator(cfg, val_set, mesh, out, autoencoder_for(cfg, mesh),
                                         inputs.evaluation_demo(cfg))
    writer = MetricWriter(workdir / "eval")
    results.update(evaluator(state["ema"], step, writer))
  writer.write(step, results)
  writer.close()
  if jax.process_index() == 0:
    (out / f"step_{step:07d}.json").write_text(json.dumps({"step": step, **results}, indent=1))
  log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if "_t0" not in k) +
      f" → {out / f'step_{step:07d}.json'}")
  return results
