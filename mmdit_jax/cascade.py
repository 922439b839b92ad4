"""Cascade sampling (Imagen §2.5): a base model, then super-resolution stages, from prompts to PNGs.

  python -m mmdit_jax.main --mode=sample --config=… --workdir=BASE_RUN --prompt="…" \
      --cascade=SR_RUN[:key=value,…] [--cascade=SR_RUN2…] [--aug_sweep=0,0.1,0.2,0.4]

The base stage is the --config / --workdir run as in plain --mode=sample. Each --cascade stage is another
training workdir, sampled with its own config (its config.json) and the overrides after the colon — sampler,
steps, guidance, thresholding, augmentation level: e.g. `/runs/sr64:sample.steps=50,sample.guidance=3,
sample.threshold=dynamic,sr.aug_level=0.2`. Each stage's input is the stage below's output in the stage's own
space (pixels, or latents of one VAE). Out: BASE_RUN/cascade/stage_K/ (PNGs, grid.png, generated.jsonl per
stage; the last stage's are the final images) and cascade.json. --aug_sweep re-runs the last stage at each
augmentation level and writes aug_sweep.md / .json: on the demo, the compositional accuracy of the final
images and their PSNR against the captions' scenes rendered at the final size.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import numpy as np
from etils import epath

from mmdit_jax import config as config_lib
from mmdit_jax import defaults, evaluate, inputs, paths, sample
from mmdit_jax.config import TrainConfig
from mmdit_jax.data import demo
from mmdit_jax.errors import ConfigError, UserError
from mmdit_jax.metrics import log


@dataclasses.dataclass(frozen=True)
class Stage:
  workdir: epath.Path
  cfg: TrainConfig
  overrides: tuple[tuple[str, str], ...] = ()


def parse_stage(spec: str) -> tuple[str, dict]:
  """'WORKDIR[:key=value,…]' → (WORKDIR, {dotted key: raw value}); a workdir may hold colons (gs://…)."""
  workdir, sep, rest = spec.rpartition(":")
  if not sep or "=" not in rest:
    return spec, {}
  overrides = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise UserError(f"--cascade={spec}: overrides are key=value pairs separated by commas, got {item!r}")
    overrides[key.strip()] = value.strip()
  return workdir, overrides


def _typed(key: str, raw: str, current):
  if isinstance(current, (bool, int, float, str)):
    try:
      return defaults.typed_value(raw, current)
    except ValueError as e:
      raise UserError(f"--cascade override {key}={raw!r} is not a {type(current).__name__}") from e
  raise UserError(f"--cascade override {key}: only numbers, strings and booleans can be set here, "
                  f"and {key} is {current!r}")


def stage_config(workdir: str, overrides: dict) -> TrainConfig:
  """The config a training workdir ran with (its config.json), with dotted-key overrides applied."""
  root = epath.Path(workdir)
  source = root / "config.json"
  if not source.is_file():
    raise UserError(f"--cascade={workdir}: not a training workdir (no config.json there)")
  c = ml_collections.ConfigDict(json.loads(source.read_text()))
  for key, raw in overrides.items():
    node, *parts = key.split(".")
    parent = c
    for name in [node, *parts][:-1]:
      if name not in parent:
        raise UserError(f"--cascade={workdir}: unknown config field {key!r}")
      parent = parent[name]
    leaf = ([node, *parts])[-1]
    if leaf not in parent:
      raise UserError(f"--cascade={workdir}: unknown config field {key!r}")
    parent[leaf] = _typed(key, raw, parent[leaf])
  try:  # (with config.shift_base_resolution, the sampling shift of the requested size needs pixels per cell)
    return inputs.with_latent_downsample(config_lib.from_config_dict(c))
  except ConfigError as e:
    raise UserError(f"--cascade={workdir}: {e}") from e


def _stage_input(previous: sample.Samples, cfg: TrainConfig) -> np.ndarray:
  """The stage below's output in this stage's space: its images for a pixel-space stage, else its latents."""
  if inputs.pixel_space(cfg):
    if previous.images is None:
      raise UserError("a pixel-space super-resolution stage needs images from the stage below, which has no VAE known")
    return previous.images
  return previous.latents


def scene_scores(images: np.ndarray, captions: list) -> dict:
  """Demo images (N, S, S, 3) against their captions: compositional accuracy (all, position, colour, shape) and
  PSNR against the captions' scenes rendered at S² (the cascade's reports and benchmarks/cascade_ablation.py)."""
  truth = np.stack([demo.render(demo.parse_caption(c), size=images.shape[1:3]) for c in captions])
  acc = demo.compositional_accuracy(images, captions)
  return {"accuracy_all": acc["all"], "accuracy_position": acc["position"], "accuracy_colour": acc["colour"],
          "accuracy_shape": acc["shape"], "psnr": evaluate.psnr(images, truth)}


def _demo_scores(cfg: TrainConfig, images: np.ndarray, names: list) -> dict:
  """scene_scores on the text demo (prompts that are demo captions); {} elsewhere."""
  if not inputs.is_demo(cfg) or images is None:
    return {}
  try:
    return scene_scores(images, names)
  except UserError:  # (a prompt that is not a demo caption)
    return {}


def run_cascade(cfg: TrainConfig, workdir, specs, prompts=(), embeddings=None, labels=(), aug_sweep=()) -> dict:
  """Samples the base run and then every --cascade stage in turn; see the module docstring."""
  workdir = epath.Path(workdir)
  stages = [Stage(epath.Path(w), stage_config(w, o), tuple(o.items())) for w, o in map(parse_stage, specs)]
  if not stages:
    raise UserError("a cascade needs at least one --cascade=SR_RUN stage after the base run")
  for s in stages:
    if not s.cfg.sr.factor:
      raise UserError(f"--cascade={s.workdir}: not a super-resolution stage (its config.sr.factor is 0)")
  if cfg.sr.factor:
    raise UserError(f"--workdir={workdir} is a super-resolution stage: the cascade starts from a base run")
  requests = [p if isinstance(p, sample.Request) else sample.Request(p) for p in prompts]
  out = workdir / "cascade"
  report = {"stages": []}
  current = sample.generate(cfg, workdir, requests, embeddings, labels)
  requests = current.requests
  levels = [current]

  def record(k, stage_workdir, stage_cfg, samples, overrides=()):
    sample.write_samples(stage_cfg, samples, out / f"stage_{k}")
    report["stages"].append({
        "stage": k, "workdir": str(stage_workdir), "overrides": dict(overrides), "step": samples.step,
        "size": list(samples.latents.shape[1:3]), "sampler": stage_cfg.sample.sampler, "steps": stage_cfg.sample.steps,
        "guidance": stage_cfg.sample.guidance, "threshold": stage_cfg.sample.threshold,
        "aug_level": stage_cfg.sr.aug_level if stage_cfg.sr.factor else None,
        **_demo_scores(stage_cfg, samples.images, samples.names)})

  record(0, workdir, cfg, current)
  for k, stage in enumerate(stages, 1):
    current = sample.generate(stage.cfg, stage.workdir, requests, embeddings, labels,
                              lowres=_stage_input(current, stage.cfg))
    levels.append(current)
    record(k, stage.workdir, stage.cfg, current, stage.overrides)
  if aug_sweep:
    last, below = stages[-1], levels[-2]
    rows = []
    for level in aug_sweep:
      if not 0 <= level <= 1:
        raise UserError(f"--aug_sweep level {level} is outside [0, 1]")
      swept = sample.generate(last.cfg, last.workdir, requests, embeddings, labels,
                              lowres=_stage_input(below, last.cfg), aug_level=float(level))
      rows.append({"aug_level": float(level), **_demo_scores(last.cfg, swept.images, swept.names)})
      if swept.images is not None:
        evaluate.save_png(evaluate.grid_image(evaluate.to_uint8(swept.images), scale=1),
                          out / f"aug_sweep_{level:.3f}.png")
    report["aug_sweep"] = rows
    _write_sweep(out, last.workdir, rows)
  paths.write_json(out / "cascade.json", report)
  log(f"cascade of {len(stages) + 1} stages → {out} (final images: {out / f'stage_{len(stages)}'})")
  return report


def _write_sweep(out: epath.Path, workdir, rows: list):
  keys = [k for k in rows[0] if k != "aug_level"]
  lines = [f"# Augmentation level at sampling: {workdir}", "",
           "| aug_level | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  lines += ["| " + " | ".join([f"{r['aug_level']:.3f}"] + [f"{r[k]:.4f}" for k in keys]) + " |" for r in rows]
  (out / "aug_sweep.md").write_text("\n".join(lines) + "\n")
  paths.write_json(out / "aug_sweep.json", rows)
