"""train_and_evaluate(config, workdir): config → mesh → data → state → loop → checkpoints → validation."""

from __future__ import annotations

import json
import pathlib
import signal
import threading

import jax
import numpy as np
from flax import nnx

from mmdit_jax import config as config_lib
from mmdit_jax import data, evaluate, model, parallel
from mmdit_jax.checkpoint import Checkpointer
from mmdit_jax.data import demo
from mmdit_jax.metrics import MetricWriter, Progress, log
from mmdit_jax.train_step import NUM_T_BINS, make_optimizer, make_train_step, state_shardings, init_state


class TrainingStopped(RuntimeError):
  """The run stopped itself (e.g. too many consecutive non-finite steps); the message says why."""


def resolve_datasets(cfg: config_lib.TrainConfig):
  """(train_path, val_path): the configured dataset, or the embedded demo dataset when none is set."""
  if cfg.data.path:
    val = cfg.data.val_path or cfg.data.path
    for p in {cfg.data.path, val}:
      if not p.startswith("tfds:"):
        data.load_metadata(p)  # fails now, naming the path, if it is missing or incomplete
    return cfg.data.path, val
  log("config.data.path is empty: using the embedded demo dataset (written on first use)")
  train = demo.ensure_demo("train", cfg.data.demo_examples)
  return train, cfg.data.val_path or demo.ensure_demo("validation")


def check_data_fits_model(meta, model_cfg, path):
  """Data shapes against the model, so a mismatch fails before compiling."""
  latent = meta.feature("latent")
  if latent.shape[-1] != model_cfg.in_channels:
    raise ValueError(f"{path}: latents have {latent.shape[-1]} channels but config.model.kwargs.in_channels="
                     f"{model_cfg.in_channels}")
  needs_text = isinstance(model_cfg, model.MMDiTConfig) or model_cfg.conditioning == "text"
  if needs_text:
    names = [f.name for f in meta.features]
    for feat, width in (("context", model_cfg.context_dim), ("pooled", model_cfg.pooled_dim)):
      if feat not in names:
        raise ValueError(f"{path}: a text-conditioned model needs feature {feat!r}; dataset has {names}")
      if meta.feature(feat).shape[-1] != width:
        raise ValueError(f"{path}: {feat} width {meta.feature(feat).shape[-1]} != model {feat}_dim {width}")
  elif "label" not in [f.name for f in meta.features]:
    raise ValueError(f"{path}: a class-conditional model needs a 'label' feature")


class _Preemption:
  """SIGTERM (and, on pods, the preemption sync point) → checkpoint at the next step and exit cleanly."""

  def __init__(self):
    self.requested = threading.Event()
    self.previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self.previous is not None:  # hand SIGTERM back to whoever had it (e.g. a test runner)
      signal.signal(signal.SIGTERM, self.previous)
    return False

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # no preemption service in this distributed set-up
        pass
    return self.requested.is_set()


def train_and_evaluate(config_dict, workdir) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) and returns the final metrics."""
  with _Preemption() as preempted:
    return _train_and_evaluate(config_dict, workdir, preempted)


def _train_and_evaluate(config_dict, workdir, preempted) -> dict:
  # ── Config: every check that can fail does so here, before data or compilation ──
  cfg = config_lib.from_config_dict(config_dict)
  config_lib.check_mesh_and_batch(cfg)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config_dict.to_json_best_effort(indent=1))

  # ── Data ──
  train_path, val_path = resolve_datasets(cfg)
  pipeline = lambda path, **kw: data.PipelineConfig(
      path, cfg.data.global_batch_size, num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
      tfds_data_dir=cfg.data.tfds_data_dir, **kw)
  text_dropout = None if cfg.data.text_dropout < 0 else (("*", cfg.data.text_dropout),)  # None: SD3's
  dataset = data.Dataset(pipeline(train_path, seed=cfg.seed, label_dropout=cfg.data.label_dropout,
                                  text_dropout=text_dropout))
  check_data_fits_model(dataset.meta, cfg.model, train_path)
  val_set = data.Dataset(pipeline(val_path, shuffle=False, text_dropout=()))  # () → no dropout

  # ── Mesh, optimizer and state (parameters are never materialised unsharded) ──
  mesh = parallel.make_mesh(cfg.mesh_ici, cfg.mesh_dcn)
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  rules = parallel.DEFAULT_RULES
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract, shardings = state_shardings(cfg.model, tx, mesh, rules)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    iterator = dataset.iterator(jax.process_index(), jax.process_count())
    start = ckpt.latest_step()
    if start is not None:
      state, data_state = ckpt.restore(start, abstract, shardings)
      iterator.set_state(data_state["iterator"])
      log(f"restored checkpoint at step {start} from {workdir / 'checkpoints'}")
    else:
      start = 0
      state = jax.jit(lambda k: init_state(cfg.model, tx, k), out_shardings=shardings)(
          jax.random.key(cfg.seed + 1))
    n_params = model.param_count(cfg.model)
    h, w = dataset.meta.feature("latent").shape[:2] if None not in dataset.meta.feature("latent").shape[:2] \
        else dataset.bucket_shapes[0][:2]
    text_tokens = dataset.meta.feature("context").shape[0] if "context" in [
        f.name for f in dataset.meta.features] else 0
    flops_per_step = model.train_flops(cfg.model, int(h), int(w), int(text_tokens)) * cfg.data.global_batch_size
    log(f"model: {type(cfg.model).__name__} {n_params / 1e6:.2f}M params | formulation {cfg.formulation.name} "
        f"(shift {cfg.formulation.shift}) | mesh {dict(mesh.shape)} | batch {cfg.data.global_batch_size} | "
        f"{len(jax.devices())} devices, {jax.process_count()} processes")

    train_step = jax.jit(make_train_step(cfg, tx, schedule), in_shardings=(shardings, None),
                         out_shardings=(shardings, None), donate_argnums=0)
    level_fn = jax.jit(evaluate.make_level_losses(cfg))
    writer = MetricWriter(workdir)
    progress = Progress(cfg.total_steps, start, flops_per_step, cfg.data.global_batch_size)
    order_log = open(workdir / "data_order.jsonl", "a") if jax.process_index() == 0 else None
    bin_sum, bin_count = np.zeros(NUM_T_BINS), np.zeros(NUM_T_BINS)
    last_metrics, summary = None, {}

    def evaluate_now(step):
      results = {}
      for name, params in (("ema", state["ema"]), ("raw", state["params"])):
        for k, v in evaluate.validation_loss(cfg, params, val_set, mesh, cfg.eval_batches, level_fn).items():
          results[k.replace("val/", f"val_{name}/")] = v
      writer.write(step, results)
      log(f"validation at step {step}: EMA loss {results['val_ema/loss']:.4f}, raw {results['val_raw/loss']:.4f}")
      return results

    evaluator = None

    def sample_now(step):
      nonlocal evaluator
      if evaluator is None:  # built on first use: encoders, reference images and compilation cost time
        from mmdit_jax.sample import autoencoder_for
        evaluator = evaluate.SampleEvaluator(
            cfg, config_lib.sample_config(config_dict), config_lib.eval_config(config_dict), val_set, mesh,
            workdir, autoencoder_for(config_dict, cfg, mesh))
      results = evaluator(state["ema"], step, writer)
      if results:
        log(f"samples at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
      return results

    def save(step):
      ckpt.save(step, state, {"iterator": iterator.get_state()})

    # ── Loop ──
    step = start
    while step < cfg.total_steps:
      batch = next(iterator)
      if order_log:
        order_log.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
        order_log.flush()
      gbatch = parallel.to_global({k: v for k, v in batch.items() if k not in ("index", "step")}, mesh)
      state, metrics = train_step(state, gbatch)
      if last_metrics is not None:  # one step behind, so the host never stalls the device
        prev = jax.device_get(last_metrics)
        bin_sum += prev["loss_bin_sum"]
        bin_count += prev["loss_bin_count"]
        if int(prev["nonfinite"]) >= cfg.max_nonfinite_steps:
          ckpt.close()
          raise TrainingStopped(
              f"{int(prev['nonfinite'])} consecutive non-finite steps (config.max_nonfinite_steps="
              f"{cfg.max_nonfinite_steps}) before step {step}; the last finite state is in {workdir}. Lower "
              f"config.optim.lr, enable config.optim.grad_clip or check the data")
      last_metrics = metrics
      step += 1

      if step % cfg.log_every == 0 or step == cfg.total_steps:
        m = jax.device_get(metrics)
        perf = progress.update(step)
        scalars = {k: m[k] for k in ("loss", "grad_norm", "param_norm", "update_norm", "lr", "skipped")}
        scalars.update({f"loss_t_bin/{i}": s / c for i, (s, c) in enumerate(zip(bin_sum, bin_count)) if c})
        scalars.update(perf)
        writer.write(step, scalars)
        log(progress.line(step, float(m["loss"]), perf) + (f" | skipped {int(m['skipped'])}" if m["skipped"] else ""))
        bin_sum[:], bin_count[:] = 0, 0
        summary["loss"] = float(m["loss"])
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
        evaluate_now(step)
      if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.total_steps:
        sample_now(step)
      stop = preempted(step) or step == cfg.halt_at_step
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stop:
        save(step)
      if stop:
        ckpt.close()
        log(f"stopping at step {step} ({'preemption' if step != cfg.halt_at_step else 'halt_at_step'}); "
            f"checkpoint saved, resume by running the same command")
        writer.close()
        return {"step": step, "stopped": True, **summary}

    ckpt.wait()
    summary.update(evaluate_now(step))
    if cfg.sample_every:
      summary.update(sample_now(step))
    summary["step"] = step
    summary["skipped"] = int(jax.device_get(state["skipped"]))
    if jax.process_index() == 0:
      (workdir / "results.json").write_text(json.dumps(summary, indent=1))
    ckpt.close()
    writer.close()
    if order_log:
      order_log.close()
    return summary
