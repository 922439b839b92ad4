"""train_and_evaluate(cfg, workdir): config → mesh → data → state → update step → loop → checkpoints → evals.

One exit path: everything opened is registered on an ExitStack, so a finished, preempted or failed run
closes the checkpointer (waiting for its last save), the metric writers and the signal handler alike.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmdit_jax import cpu_runtime, data, evaluate, inputs, model, parallel, paths, pretrained
from mmdit_jax.checkpoint import Checkpointer
from mmdit_jax.config import TrainConfig, check_mesh_and_batch
from mmdit_jax.errors import ConfigError, UserError
from mmdit_jax.metrics import MetricWriter, Progress, log, warn
from mmdit_jax.parallel.distributed import check_same_everywhere
from mmdit_jax.state import checkpointed, make_optimizer, restore_or_init, weights
from mmdit_jax.train_step import NUM_T_BINS, bucket_shift, jit_train_step

RESULTS = "results.json"


class TrainingStopped(UserError):
  """The run stopped itself (e.g. too many consecutive non-finite steps); the message says why."""


class _Preemption:
  """SIGTERM (and, on multi-process runs, jax's preemption sync point) → checkpoint at the next step."""

  def __init__(self):
    self.requested = threading.Event()
    self.previous = None
    self.sync_point = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self.previous is not None:  # hand SIGTERM back to whoever had it (e.g. a test runner)
      signal.signal(signal.SIGTERM, self.previous)
    return False

  def __call__(self, step: int) -> bool:
    if self.sync_point:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError as e:  # jax.distributed started without its preemption service
        self.sync_point = False
        warn(f"no preemption sync service ({e}); preemption is detected by SIGTERM on each host only")
    return self.requested.is_set()


def _startup_lines(cfg: TrainConfig, mesh, workdir, n_params: int):
  devices = jax.devices()
  per_device = cfg.data.global_batch_size / parallel.data_parallel_size(mesh)
  return [
      f"process {jax.process_index()}/{jax.process_count()} | {jax.local_device_count()} local, "
      f"{len(devices)} global devices ({devices[0].device_kind}) | mesh {dict(mesh.shape)} | "
      f"global batch {cfg.data.global_batch_size}, {per_device:g} per data-parallel device",
      f"model: {type(cfg.model).__name__} {n_params / 1e6:.2f}M params | formulation {cfg.formulation.name} "
      f"(shift {cfg.formulation.shift}) | checkpoints → {workdir / 'checkpoints'}"]


def _finished_results(workdir, total_steps: int):
  """results.json of a run that already reached total_steps, or None."""
  path = workdir / RESULTS
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  return results if results.get("step") == total_steps else None


def train_and_evaluate(cfg: TrainConfig, workdir) -> dict:
  """Trains (resuming from the newest intact checkpoint in workdir) and returns the final metrics.

  A run stopped by preemption (or config.debug.halt_at_step) returns {'step', 'stopped': reason} after a
  complete checkpoint; a finished run re-run reports its results.json unless config.force_eval.
  """
  workdir = epath.Path(workdir)
  with contextlib.ExitStack() as stack:
    # ── Config: every check that can fail does so here, before data or compilation ──
    check_mesh_and_batch(cfg, jax.devices())
    check_same_everywhere(cfg.source, "config")
    if cfg.debug.log_data_order and paths.is_remote(workdir):
      raise ConfigError(f"debug.log_data_order appends to workdir/data_order.jsonl, which object stores cannot "
                        f"do: use a local workdir for it, not {workdir}")
    cfg, imported = pretrained.resolve(cfg)  # config.init: the model as the official weights define it
    cfg = inputs.with_latent_downsample(cfg)  # (shift_base_resolution: α per bucket from its pixel size)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(cfg.source)
    preempted = stack.enter_context(_Preemption())

    # ── Data ──
    train_path, val_path = inputs.dataset_paths(cfg)
    dataset = inputs.training_set(cfg, train_path)
    val_set = inputs.evaluation_set(cfg, val_path)

    # ── Mesh ──
    mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nnx.logical_axis_rules(cfg.sharding_rules))

    # ── State: the newest intact checkpoint, or a fresh state initialised into its shardings ──
    tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    stack.callback(ckpt.close)
    state, start, data_state = restore_or_init(cfg, tx, mesh, ckpt, init_params=imported)
    if start:
      log(f"restored checkpoint at step {start} from {workdir / 'checkpoints'}")
    done = _finished_results(workdir, cfg.total_steps) if start >= cfg.total_steps else None
    if done is not None and not cfg.force_eval:
      log(f"already finished at step {start}: {workdir / RESULTS} — " + ", ".join(
          f"{k} {v:.4f}" for k, v in done.items() if isinstance(v, float) and "_t0" not in k) +
          " (--config.force_eval=True evaluates again)")
      return done
    iterator = dataset.iterator(jax.process_index(), jax.process_count())
    if data_state is not None:
      iterator.set_state(data_state["iterator"])
    writer = MetricWriter(workdir, resume_step=start)
    stack.callback(writer.close)
    h, w, _ = inputs.latent_shape(dataset)
    flops_per_step = model.train_flops(cfg.model, h, w, inputs.text_tokens(dataset)) * cfg.data.global_batch_size
    for line in _startup_lines(cfg, mesh, workdir, model.param_count(cfg.model)):
      log(line)
    if cfg.lora.rank or cfg.dpo.beta:
      trained = sum(x.size for x in jax.tree.leaves(state["params"]))
      log(f"fine-tuning {cfg.init}: {trained / 1e6:.3f}M trained parameters"
          + (f" (LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank:g}, targets "
             f"{list(cfg.lora.targets)}, base in {cfg.lora.base_dtype})" if cfg.lora.rank else "")
          + (f" | DPO β={cfg.dpo.beta:g} against the frozen initial weights" if cfg.dpo.beta else ""))

    # ── Update step ──
    train_step = jit_train_step(cfg, tx, schedule, jax.tree.map(lambda x: x.sharding, state))

    # ── Evaluations: validation loss (EMA and raw) and sample evaluation, built on first use ──
    level_fn = jax.jit(evaluate.make_level_losses(cfg))
    evaluator = None

    def evaluate_now(step):
      results = evaluate.validation_both(cfg, state, val_set, mesh, level_fn)
      writer.write(step, results)
      log(f"validation at step {step}: EMA loss {results['val_ema/loss']:.4f}, raw {results['val_raw/loss']:.4f}"
          + (f" | held-out DPO reward accuracy EMA {results['val_ema/dpo_accuracy']:.3f}, raw "
             f"{results['val_raw/dpo_accuracy']:.3f}" if "val_ema/dpo_accuracy" in results else ""))
      return results

    def sample_now(step):
      nonlocal evaluator
      if evaluator is None:  # encoders, reference images and compilation cost time: only when asked
        from mmdit_jax.sample import autoencoder_for
        evaluator = evaluate.SampleEvaluator(
            cfg, val_set, mesh, workdir / "samples", autoencoder_for(cfg, mesh),
            inputs.evaluation_demo(cfg))
      return evaluator(weights(cfg, state, "ema"), step, writer)

    # ── Loop ──
    order_log = None
    if cfg.debug.log_data_order and jax.process_index() == 0:
      order_log = stack.enter_context((workdir / "data_order.jsonl").open("a"))
    progress = Progress(cfg.total_steps, start, flops_per_step, cfg.data.global_batch_size)
    bin_sum, bin_count = np.zeros(NUM_T_BINS), np.zeros(NUM_T_BINS)
    last_metrics, summary, skipped_records = None, {}, 0
    step = start
    while step < cfg.total_steps:
      wait_start = time.perf_counter()
      batch = next(iterator)
      progress.waited_for_input(time.perf_counter() - wait_start)
      skipped_records += int(batch["skipped_records"].sum())
      if order_log is not None:
        order_log.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
        order_log.flush()  # a debugging aid: complete even when the process is killed
      gbatch = cpu_runtime.ready(parallel.to_global({k: v for k, v in batch.items() if k not in data.HOST_ONLY},
                                                    mesh))
      if step == start:
        log("compiling the train step…")
        compile_start = time.perf_counter()
      state, metrics = train_step(state, gbatch)
      if step == start:
        jax.block_until_ready(metrics)
        log(f"compiled the train step and ran step {step + 1} in {time.perf_counter() - compile_start:.1f} s")
        progress.restart(step + 1)
      if last_metrics is not None:  # one step behind, so the host never stalls the device
        prev = jax.device_get(last_metrics)
        bin_sum += prev["loss_bin_sum"]
        bin_count += prev["loss_bin_count"]
        if int(prev["nonfinite"]) >= cfg.max_nonfinite_steps:
          raise TrainingStopped(
              f"{int(prev['nonfinite'])} consecutive non-finite steps (config.max_nonfinite_steps="
              f"{cfg.max_nonfinite_steps}) before step {step}; the last finite state is in {workdir}. Lower "
              f"config.optim.lr, enable config.optim.grad_clip or check the data")
      last_metrics = metrics
      step += 1

      if step % cfg.log_every == 0 or step == cfg.total_steps:
        m = jax.device_get(metrics)
        perf = progress.update(step)
        scalars = {k: m[k] for k in ("loss", "grad_norm", "param_norm", "update_norm", "lr", "skipped",
                                     "dpo/accuracy", "dpo/margin") if k in m}
        scalars.update({f"loss_t_bin/{i}": s / c for i, (s, c) in enumerate(zip(bin_sum, bin_count)) if c})
        scalars.update(perf)
        if cfg.shift_base_resolution:  # the timestep shift of this step's aspect bucket
          scalars["shift"] = bucket_shift(cfg, batch["latent"].shape[1:3])
        if cfg.data.on_corrupt == "skip":
          scalars["data/skipped_records"] = skipped_records  # (this host's, since this process started)
          summary["skipped_records"] = skipped_records
        writer.write(step, scalars)
        log(progress.line(step, float(m["loss"]), perf) + (f" | skipped {int(m['skipped'])}" if m["skipped"] else "")
            + (f" | DPO reward accuracy {float(m['dpo/accuracy']):.3f}, margin {float(m['dpo/margin']):.4f}"
               if "dpo/accuracy" in m else "")
            + (f" | replaced {skipped_records} damaged records" if skipped_records else ""))
        bin_sum[:], bin_count[:] = 0, 0
        summary["loss"] = float(m["loss"])
      between = time.perf_counter()
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
        evaluate_now(step)
      if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.total_steps:
        sample_now(step)
      reason = "preemption" if preempted(step) else "halt_at_step" if step == cfg.debug.halt_at_step else None
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or reason:
        ckpt.save(step, checkpointed(state), {"iterator": iterator.get_state()})
      progress.exclude(time.perf_counter() - between)  # the step rate is the steps' own
      if reason:
        ckpt.wait()
        log(f"stopping at step {step} ({reason}); checkpoint saved — run the same command to resume")
        return {"step": step, "stopped": reason, **summary}

    # ── Finish: final validation and samples → results.json ──
    ckpt.wait()
    summary.update(evaluate_now(step))
    if cfg.sample_every:
      summary.update(sample_now(step))
    if "loss" not in summary:  # evaluating a finished run again: keep its last training loss
      summary["loss"] = writer.last("loss")
    summary["step"] = step
    summary["skipped"] = int(jax.device_get(state["skipped"]))
    if jax.process_index() == 0:
      (workdir / RESULTS).write_text(json.dumps(summary, indent=1))
    log(f"finished at step {step}: results in {workdir / RESULTS}")
    return summary
