"""The training system in-process: exact resume (halt, partial saves), damaged checkpoints, re-run
idempotence, non-finite steps, config errors before compiling, and golden steps. (The command line,
signals and multi-process runs: cli_test.py.)"""

import json
import logging
import shutil
import time

import jax
import numpy as np
import pytest

from mmdit_jax import data, errors, train
from mmdit_jax.checkpoint import Checkpointer, CheckpointError
from mmdit_jax.state import init_state, make_optimizer
from mmdit_jax.train_step import make_train_step
from tests import helpers
from tests.helpers import STEPS, assert_same_as_straight, config, tree_equal


@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_exact_resume_after_halt_ignoring_a_partial_save(straight, tmp_path):
  first = train.train_and_evaluate(config(**{"debug.halt_at_step": STEPS // 2}), tmp_path)
  assert first == {"step": STEPS // 2, "stopped": "halt_at_step", "loss": first["loss"]}
  # What a crash during an asynchronous save leaves behind: a temporary directory for a later step.
  partial = tmp_path / "checkpoints" / f"{STEPS // 2 + 2}.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == STEPS // 2
  # And what a crash after logging a step but before its checkpoint leaves: a record the resume redoes.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": STEPS // 2 + 2, "loss": 123.0}) + "\n")
  train.train_and_evaluate(config(), tmp_path)
  assert_same_as_straight(straight, tmp_path)
  rows = [r for r in helpers.metrics(tmp_path) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2)) and 123.0 not in [r["loss"] for r in rows]


def _damage(step_dir):
  """Overwrites every array data file of a checkpoint step with garbage of the same size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
  assert files, list((step_dir / "state").rglob("*"))
  for p in files:
    p.write_bytes(b"\x17" * p.stat().st_size)


@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(straight, tmp_path):
  train.train_and_evaluate(config(**{"debug.halt_at_step": 6, "checkpoint_every": 2}), tmp_path)
  _damage(tmp_path / "checkpoints" / "6")
  # eval skips it with a warning (and leaves it in place) ...
  from mmdit_jax.state import restore_for_eval
  from mmdit_jax import parallel
  _, step = restore_for_eval(config(), tmp_path, parallel.make_mesh((-1, 1, 1, 1)))
  assert step == 4 and (tmp_path / "checkpoints" / "6").exists()
  # ... and training resumes from step 4, moves step 6 aside (kept), and still ends exactly as straight.
  train.train_and_evaluate(config(), tmp_path)
  assert (tmp_path / "checkpoints_damaged" / "6").is_dir()
  assert_same_as_straight(straight, tmp_path)
  # With every checkpoint damaged, the error names the directory instead of starting over.
  for step_dir in (tmp_path / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      _damage(step_dir)
  with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints: step 8"):
    train.train_and_evaluate(config(**{"total_steps": 12}), tmp_path)


@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_finished_run_reports_without_recomputing(straight, tmp_path):
  s_dir, _ = straight
  shutil.copytree(s_dir, tmp_path / "run")
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert "loss" in results and "val_ema/loss" in results
  start = time.time()
  again = train.train_and_evaluate(config(), tmp_path / "run")
  assert again == results and (tmp_path / "run" / "metrics.jsonl").read_text() == before
  assert time.time() - start < 20
  # --config.force_eval=True evaluates again, keeping the training loss and adding no duplicate rows.
  forced = train.train_and_evaluate(config(force_eval=True), tmp_path / "run")
  assert forced["loss"] == results["loss"]
  np.testing.assert_allclose(forced["val_ema/loss"], results["val_ema/loss"], rtol=1e-6)


def _batch(rng, n=8):
  return {"latent": rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
          "context": rng.standard_normal((n, 32, 32)).astype(np.float32),
          "pooled": rng.standard_normal((n, 32)).astype(np.float32)}


def test_nan_batch_is_skipped_and_counted():
  cfg = config()
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  step = jax.jit(make_train_step(cfg, tx, schedule))
  state = jax.jit(lambda k: init_state(cfg.model, tx, k))(jax.random.key(0))
  batch = _batch(np.random.default_rng(0))
  bad = dict(batch, latent=batch["latent"].copy())
  bad["latent"][3, 5, 5, 0] = np.nan
  after_bad, m = step(state, bad)
  assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(m["nonfinite"]) == 1
  assert tree_equal(after_bad["params"], state["params"]) and tree_equal(after_bad["ema"], state["ema"])
  after_good, m = step(after_bad, batch)
  assert bool(m["finite"]) and int(m["nonfinite"]) == 0 and int(m["skipped"]) == 1
  after_good, m = step(after_good, batch)  # warm-up starts at lr 0: the second good step moves params
  assert not tree_equal(after_good["params"], state["params"])
  for leaf in jax.tree.leaves(after_good):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


# Golden values of three steps of the tiny config on fixed batches (float32 CPU). A change here means the
# model, the loss, the optimizer or the per-step randomness changed: intended changes update the numbers.
GOLDEN = {"loss": [1.9898418, 1.9421003, 2.0024562],
          "grad_norm": [0.10432240, 0.10253876, 0.10485468]}


def test_golden_steps():
  cfg = config()
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  step = jax.jit(make_train_step(cfg, tx, schedule))
  state = jax.jit(lambda k: init_state(cfg.model, tx, k))(jax.random.key(cfg.seed + 1))
  got = {"loss": [], "grad_norm": []}
  for i in range(3):
    state, m = step(state, _batch(np.random.default_rng(i)))
    for k in got:
      got[k].append(float(m[k]))
  for k, want in GOLDEN.items():
    np.testing.assert_allclose(got[k], want, rtol=2e-4, err_msg=f"{k}: got {got[k]}")


def test_gradient_accumulation_is_the_full_batch_update():
  """config.microbatches = 4: a scan over four microbatches (each spread over a 2 × 2 data-parallel mesh)
  gives the same step as the whole batch of 32 at once — the same t and noise per example, the same
  gradient, loss and per-time-bin sums — to float tolerance."""
  from mmdit_jax import parallel
  from mmdit_jax.state import state_shardings
  mesh = parallel.make_mesh((2, 2, 1, 1), devices=jax.devices()[:4])
  batch = _batch(np.random.default_rng(0), n=32)
  out = {}
  for m in (1, 4):
    cfg = config(**{"microbatches": m, "data.global_batch_size": 32, "optim.warmup_steps": 0})
    tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
    with jax.set_mesh(mesh), nnx_rules(cfg):
      _, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules)
      state = jax.jit(lambda k: init_state(cfg.model, tx, k), out_shardings=shardings)(jax.random.key(1))
      out[m] = jax.device_get(jax.jit(make_train_step(cfg, tx, schedule))(state, parallel.to_global(batch, mesh)))
  (s1, m1), (s4, m4) = out[1], out[4]
  for k in ("loss", "grad_norm", "update_norm", "loss_bin_sum", "loss_bin_count"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s1["params"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(m1["update_norm"]) > 0
  with pytest.raises(errors.ConfigError, match="microbatches"):
    config(**{"microbatches": 3, "data.global_batch_size": 32})
  # (the microbatch must also split over the data-parallel devices: checked at start-up)
  from mmdit_jax.config import check_mesh_and_batch
  with pytest.raises(errors.ConfigError, match="a microbatch of 2 is not divisible by the data-parallel size 8"):
    check_mesh_and_batch(config(**{"microbatches": 16, "data.global_batch_size": 32}), jax.devices())


def test_all_fsdp_step_equals_one_device():
  """One step on an all-FSDP 8-device mesh (data 1: parameters, optimizer state and batch all split 8 ways,
  each layer's weights gathered inside the scan) is the single-device step."""
  from mmdit_jax import parallel
  from mmdit_jax.state import state_shardings
  cfg = config()
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  batch = _batch(np.random.default_rng(3))
  state = jax.jit(lambda k: init_state(cfg.model, tx, k))(jax.random.key(1))
  step = make_train_step(cfg, tx, schedule)
  one_state, one = jax.device_get(jax.jit(step)(state, batch))
  mesh = parallel.make_mesh((1, 8, 1, 1))
  with jax.set_mesh(mesh), nnx_rules(cfg):
    _, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules)
    sharded = jax.device_put(state, shardings)
    assert sharded["params"]["final_block"]["img"]["mlp"]["fc1"]["kernel"].sharding.spec[0] == "fsdp"
    fsdp_state, fsdp = jax.device_get(jax.jit(step)(sharded, parallel.to_global(batch, mesh)))
  for k in ("loss", "grad_norm", "loss_bin_sum"):
    np.testing.assert_allclose(fsdp[k], one[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(fsdp_state["opt_state"]), jax.tree.leaves(one_state["opt_state"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def nnx_rules(cfg):
  from flax import nnx
  return nnx.logical_axis_rules(cfg.sharding_rules)


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  """Sound data, a learning rate that overflows the parameters: every later step is non-finite, skipped, and
  after max_nonfinite_steps of them in a row the run stops. (Non-finite data never gets this far: the loader
  names the record, tests/data/verify_test.py.)"""
  with pytest.raises(train.TrainingStopped, match=r"consecutive non-finite steps.*max_nonfinite_steps=3"):
    train.train_and_evaluate(config(**{"optim.lr": 1e37, "max_nonfinite_steps": 3, "total_steps": 20}),
                             tmp_path / "wd")


@pytest.mark.parametrize("extra,match", [
    ({"formulation": "rf/lognormal(0, 1)"}, r"config.formulation: unknown formulation.*valid forms"),
    ({"data.global_batch_size": 6}, r"global_batch_size=6 is not divisible by the data-parallel size 8"),
    ({"mesh.ici.data": 2, "mesh.ici.fsdp": 2}, r"config.mesh.ici .* has 4 devices but 8"),
    ({"data.path": "/nonexistent/latents"}, r"/nonexistent/latents does not exist"),
    ({"optim.schedule": "step"}, r"config.optim.schedule: 'step' is not valid; valid: \['constant', 'cosine', 'linear'\]"),
    ({"model.in_channels": 4}, r"latents have 3 channels but config.model.in_channels=4"),
    ({"model.remat": "most"}, r"config.model \(backbone 'mmdit'\): unknown remat policy 'most'"),
    ({"sharding_rules": (("embed", "fsdp"), ("hidden", "tensor"))}, r"unknown logical axis 'hidden'"),
    ({"data.text_dropout": 1.5}, r"config.data.text_dropout: is a probability"),
])
def test_bad_configs_fail_before_compiling(tmp_path, extra, match):
  start = time.time()
  with pytest.raises(errors.UserError, match=match):
    train.train_and_evaluate(config(**extra), tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  assert time.time() - start < 20


def test_unknown_config_keys_are_rejected():
  from mmdit_jax import config as config_lib
  c = helpers.config_dict()
  c.optim.momentum = 0.9
  with pytest.raises(errors.ConfigError, match=r"config.optim has unknown fields \['momentum'\]; valid: \['lr'"):
    config_lib.from_config_dict(c)
  c = helpers.config_dict()
  c.model.name = "dit"  # MM-DiT's fields are not DiT's
  with pytest.raises(errors.ConfigError, match=r"backbone 'dit'\) has unknown fields \['context_dim'|pos_embed_max_size"):
    config_lib.from_config_dict(c)




def test_progress_reports_input_wait(capsys):
  """perf/data_wait_s and perf/data_wait_fraction per log interval, in the progress line; a warning after
  three input-bound intervals in a row."""
  from mmdit_jax.metrics import Progress
  p = Progress(total_steps=100, start_step=0, flops_per_step=1e9, batch_size=8)
  for step in (10, 20, 30):
    p.last_time -= 1.0  # (each interval: 1 s for 10 steps …)
    p.waited_for_input(0.6)  # (… of which 0.6 s waiting for data)
    perf = p.update(step)
    assert abs(perf["perf/data_wait_s"] - 0.06) < 0.01 and 0.5 < perf["perf/data_wait_fraction"] < 0.65
  assert "input wait 6" in p.line(30, 1.0, perf)
  assert "input-bound" in capsys.readouterr().err


def test_progress_leaves_evaluations_out_of_the_rate_and_spreads_them_over_the_eta():
  from mmdit_jax.metrics import Progress
  p = Progress(total_steps=100, start_step=0, flops_per_step=1e9, batch_size=8)
  p.last_time -= 1.0  # 10 steps in 1 s …
  p.update(10)
  p.last_time -= 1.0  # … then 10 more in 1 s, and a 5 s evaluation between them
  p.last_time -= 5.0
  p.exclude(5.0)
  perf = p.update(20)
  assert abs(perf["perf/step_time_s"] - 0.1) < 0.01  # the steps' own rate
  # 80 steps to go at 0.1 s, plus 5 s of evaluation per 20 steps so far: 80 × 0.35 s
  assert abs(perf["perf/eta_s"] - 28.0) < 0.5


def test_the_shift_follows_each_aspect_bucket_with_one_program_each(tmp_path, caplog):
  """config.shift_base_resolution: α = √(H·W / base²) per aspect bucket (SD3 §5.3.2) — in the drawn t, the logged
  metrics and the sampling grid — one compiled program per bucket, and both processes of a 2-process run
  reading the same bucket at every step."""
  import math
  from mmdit_jax import data, evaluate, inputs, train
  from mmdit_jax.flow import samplers
  from mmdit_jax.train_step import bucket_shift, draw
  rng = np.random.default_rng(0)
  feats = [data.Feature("latent", (None, None, 3), "float32"), data.Feature("context", (32, 32), "float32"),
           data.Feature("pooled", (32,), "float32")]
  with data.DatasetWriter(tmp_path / "buckets", feats, {"pixels": True}, examples_per_shard=16) as w:
    for i in range(32):  # two buckets (H × W): 32 × 32 and 16 × 32 pixels
      h = 32 if i % 2 else 16
      w.write({"latent": rng.uniform(-1, 1, (h, 32, 3)).astype(np.float32),
               "context": rng.standard_normal((32, 32)).astype(np.float32),
               "pooled": rng.standard_normal(32).astype(np.float32)})
  cfg = inputs.with_latent_downsample(config(**{"data.path": str(tmp_path / "buckets"), "shift_base_resolution": 32,
                                                "total_steps": 6, "log_every": 1}))
  assert cfg.data.latent_downsample == 1  # pixel-space data
  assert bucket_shift(cfg, (32, 32)) == 1.0 and bucket_shift(cfg, (16, 32)) == pytest.approx(math.sqrt(0.5))
  key = jax.random.key(3)
  t, _ = draw(cfg, key, (8, 16, 32, 3))
  want = cfg.formulation.with_shift(math.sqrt(0.5)).sample_t(jax.random.split(key)[0], (8,))
  np.testing.assert_allclose(t, want, rtol=1e-6)
  np.testing.assert_allclose(evaluate.sampling_grid(cfg, (16, 32)),
                             samplers.reference_grid(cfg.sample.steps, shift=math.sqrt(0.5)), rtol=1e-6)

  ds = data.Dataset(data.PipelineConfig(cfg.data.path, cfg.data.global_batch_size))
  shapes = [ds.load_batch(s)["latent"].shape[1:3] for s in range(6)]
  assert set(shapes) == {(32, 32), (16, 32)}
  assert all(ds.load_batch(s, 0, 2)["latent"].shape == ds.load_batch(s, 1, 2)["latent"].shape for s in range(6))

  caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")
  jax.config.update("jax_log_compiles", True)
  try:
    train.train_and_evaluate(cfg, tmp_path / "run")
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r for r in caplog.records if "Finished XLA compilation of jit(train_step)" in r.getMessage()]
  assert len(compiles) == 2  # one program per bucket, reused over the 6 steps
  logged = {r["step"]: r["shift"] for r in helpers.metrics(tmp_path / "run") if "shift" in r}
  assert logged == {s + 1: bucket_shift(cfg, shapes[s]) for s in range(6)}


def test_demo_aspect_buckets_and_the_hires_demo_preset(tmp_path):
  """The demo's scenes in aspect buckets (SD3's hi-res stage on the demo): mixed shapes in one dataset, each
  scene the checker reads right at its bucket's size; stage=hires on the demo sets the buckets, the grid and α."""
  from configs import rf_lognorm
  from mmdit_jax import config as config_lib
  from mmdit_jax.data import demo
  from mmdit_jax.errors import ConfigError
  buckets = ((48, 48), (32, 64), (64, 32))
  path = demo.ensure_demo("validation", 48, kind="text", buckets=buckets, root=tmp_path)
  ds = data.Dataset(data.PipelineConfig(path, 8, shuffle=False, text_dropout=()))
  assert sorted(map(tuple, ds.bucket_shapes[:, :2].tolist())) == sorted(buckets)
  rng = np.random.default_rng(0)
  for hw in buckets:
    scene = demo.random_scene(rng)
    image = demo.render(scene, rng, hw)
    assert image.shape == (*hw, 3) and demo.check(image, demo.caption(scene))["all"] == 1.0
  c = config_lib.from_config_dict(rf_lognorm.get_config(f"size=demo,stage=hires,base_run={tmp_path}"))
  assert c.data.demo_buckets == buckets and c.shift_base_resolution == 32 and c.model.pos_embed_max_size == 16
  with pytest.raises(ConfigError, match="demo_buckets"):
    config(**{"data.demo_buckets": ((48, 44),)})


@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_evaluation_reads_only_the_weights(straight):
  """restore_for_eval (sampling, evaluation, export) reads the step, parameters and EMA of the newest checkpoint,
  onto another mesh, equal to a full restore's, without the optimizer's moments; another model is still named."""
  from etils import epath

  from mmdit_jax import parallel
  from mmdit_jax.checkpoint import CheckpointMismatch
  from mmdit_jax.state import WEIGHTS, restore_for_eval
  workdir, (step, full, _) = straight
  mesh = parallel.make_mesh((2, 2, 1, 2))
  state, got = restore_for_eval(config(), epath.Path(workdir), mesh)
  assert got == step and sorted(state) == sorted(WEIGHTS) and int(state["step"]) == step
  assert tree_equal(state["params"], full["params"]) and tree_equal(state["ema"], full["ema"])
  assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(state["ema"]))
  with pytest.raises(CheckpointMismatch, match="does not match the configured model"):
    restore_for_eval(config(**{"model.depth": 3}), epath.Path(workdir), mesh)


def test_a_run_starts_from_another_runs_weights(tmp_path):
  """config.init=run:DIR / run-ema:DIR: the new run's step-0 parameters (and EMA) are the source run's newest
  parameters or EMA weights, on another mesh, with a fresh optimizer; another model or a non-workdir is named;
  configs/rf_lognorm.py:stage=hires sets it up."""
  from configs import rf_lognorm
  from mmdit_jax import parallel, pretrained
  from mmdit_jax.errors import ConfigError
  from mmdit_jax.state import restore_or_init
  src = tmp_path / "base"
  train.train_and_evaluate(config(**{"total_steps": 2, "checkpoint_every": 2, "optim.schedule": "cosine"}), src)
  _, s_state, _ = helpers.final_state(src, config(**{"total_steps": 2, "optim.schedule": "cosine"}))
  mesh = parallel.make_mesh((2, 2, 1, 2))
  for kind, part in (("run", "params"), ("run-ema", "ema")):
    cfg, load = pretrained.resolve(config(**{"init": f"{kind}:{src}"}))  # (another schedule and total_steps)
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    state, start, data_state = restore_or_init(cfg, tx, mesh, Checkpointer(tmp_path / f"new_{kind}"), init_params=load)
    assert start == 0 and data_state is None and int(state["step"]) == 0
    assert tree_equal(state["params"], s_state[part]) and tree_equal(state["ema"], s_state[part])
  assert not tree_equal(s_state["params"], s_state["ema"])  # (so the two kinds were told apart)
  with pytest.raises(ConfigError, match="is not this config's"):
    pretrained.resolve(config(**{"init": f"run:{src}", "model.depth": 3}))
  with pytest.raises(ConfigError, match="is not a training workdir"):
    pretrained.resolve(config(**{"init": f"run:{tmp_path}"}))
  c = rf_lognorm.get_config(f"size=2b,stage=hires,base_run={src}")
  assert (c.init, c.data.resolution, c.shift, c.shift_base_resolution) == (f"run:{src}", 1024, 1.0, 256)
  with pytest.raises(ConfigError, match="give base_run"):
    rf_lognorm.get_config("stage=hires")
