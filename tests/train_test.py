"""The training system: exact resume (halt, SIGKILL, SIGTERM with its exit code), damaged checkpoints,
re-run idempotence, non-finite steps, config errors before compiling, 2 processes × 4 devices against
1 × 8, a golden one-step test, and the README's main command."""

import json
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from mmdit_jax import data, errors, train
from mmdit_jax.checkpoint import Checkpointer, CheckpointError
from mmdit_jax.state import init_state, make_optimizer
from mmdit_jax.train_step import make_train_step
from tests import helpers
from tests.helpers import STEPS, config, tree_equal


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  summary = train.train_and_evaluate(config(), workdir)
  assert summary["step"] == STEPS and "stopped" not in summary
  return workdir, helpers.final_state(workdir, config())


def _assert_same_as_straight(straight, workdir):
  s_dir, (s_step, s_state, s_data) = straight
  step, state, data_state = helpers.final_state(workdir, config())
  assert step == s_step == STEPS
  for part in ("params", "opt_state", "ema", "step", "skipped"):
    assert tree_equal(state[part], s_state[part]), part
  assert data_state == s_data
  assert helpers.data_order(workdir) == helpers.data_order(s_dir)


def test_exact_resume_after_halt(straight, tmp_path):
  first = train.train_and_evaluate(config(**{"debug.halt_at_step": STEPS // 2}), tmp_path)
  assert first == {"step": STEPS // 2, "stopped": "halt_at_step", "loss": first["loss"]}
  train.train_and_evaluate(config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)
  # Each step's metrics appear once, although steps 5..6 were logged... only after the resume.
  steps = [r["step"] for r in helpers.metrics(tmp_path) if "loss" in r]
  assert steps == sorted(set(steps)) == list(range(2, STEPS + 1, 2))


def test_resume_ignores_partially_written_checkpoint(straight, tmp_path):
  train.train_and_evaluate(config(**{"debug.halt_at_step": STEPS // 2}), tmp_path)
  # What a crash during an asynchronous save leaves behind: a temporary directory for a later step.
  partial = tmp_path / "checkpoints" / f"{STEPS // 2 + 2}.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == STEPS // 2
  train.train_and_evaluate(config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)


def _damage(step_dir):
  """Overwrites every array data file of a checkpoint step with garbage of the same size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
  assert files, list((step_dir / "state").rglob("*"))
  for p in files:
    p.write_bytes(b"\x17" * p.stat().st_size)


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
  _assert_same_as_straight(straight, tmp_path)
  # With every checkpoint damaged, the error names the directory instead of starting over.
  for step_dir in (tmp_path / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      _damage(step_dir)
  with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints: step 8"):
    train.train_and_evaluate(config(**{"total_steps": 12}), tmp_path)


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


def test_sigkill_then_resume(straight, tmp_path):
  proc = subprocess.Popen(helpers.main_cmd(tmp_path, *helpers.cli_flags(checkpoint_every=1)), cwd=helpers.ROOT,
                          env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt_dir = tmp_path / "checkpoints"
  while time.time() < deadline and not (ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    time.sleep(0.05)
  time.sleep(0.3)  # somewhere in the middle of the next asynchronous saves
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert Checkpointer(ckpt_dir).latest_step() is not None
  train.train_and_evaluate(config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)


def test_sigterm_saves_exits_75_and_resumes_exactly(straight, tmp_path):
  proc = subprocess.Popen(helpers.main_cmd(tmp_path, *helpers.cli_flags(total_steps=400, checkpoint_every=1000)),
                          cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  order = tmp_path / "data_order.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (order.exists() and len(order.read_text().splitlines()) >= 1):
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == errors.EXIT_PREEMPTED == 75, out
  assert "stopping at step" in out and "Traceback" not in out
  stopped = Checkpointer(tmp_path / "checkpoints").latest_step()
  assert 1 <= stopped < 400
  # The run resumes exactly: two more steps, against a straight run to the same step.
  resumed = config(total_steps=400, checkpoint_every=1000, **{"debug.halt_at_step": stopped + 2})
  train.train_and_evaluate(resumed, tmp_path)
  ref = tmp_path.parent / (tmp_path.name + "_ref")
  train.train_and_evaluate(resumed, ref)
  _, a, _ = helpers.final_state(tmp_path, resumed)
  _, b, _ = helpers.final_state(ref, resumed)
  for part in ("params", "opt_state", "ema"):
    assert tree_equal(a[part], b[part]), part


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


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  n = 32
  arrays = {"latent": np.full((n, 32, 32, 3), np.nan, np.float16),
            "context": np.zeros((n, 32, 32), np.float16), "pooled": np.zeros((n, 32), np.float16)}
  data.write_arrays(tmp_path / "nan", arrays)
  with pytest.raises(train.TrainingStopped, match=r"consecutive non-finite steps.*max_nonfinite_steps=3"):
    train.train_and_evaluate(config(**{"data.path": str(tmp_path / "nan"), "data.text_dropout": 0.0,
                                       "max_nonfinite_steps": 3, "total_steps": 20}), tmp_path / "wd")


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


def test_two_processes_match_one(tmp_path):
  mesh = {"mesh.ici.data": 2, "mesh.ici.fsdp": 2, "mesh.ici.tensor": 2}
  one = tmp_path / "one"
  train.train_and_evaluate(config(**mesh), one)
  two = tmp_path / "two"
  port = helpers.free_port()
  procs = [subprocess.Popen(
      helpers.main_cmd(two, *helpers.cli_flags(**mesh), f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}"),
      cwd=helpers.ROOT, env=helpers.env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert "process 0/2 | 4 local, 8 global devices" in outs[0] and "process 1/2" not in outs[1]  # once, by process 0
  np.testing.assert_allclose(helpers.losses(two), helpers.losses(one), rtol=1e-4)
  # Each run's checkpoint restores in the other layout and onto another mesh shape.
  _, a, _ = helpers.final_state(two, config(), mesh_ici=(2, 2, 1, 2))
  _, b, _ = helpers.final_state(one, config(), mesh_ici=(8, 1, 1, 1))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_failed_distributed_start_exits_with_the_cause(tmp_path):
  """A multi-process run whose coordinator cannot be reached stops with the cause, never trains alone."""
  port = helpers.free_port()  # nobody listens there
  proc = subprocess.run(helpers.main_cmd(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                         "--process_id=1", "--distributed_timeout=3"),
                        cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
  assert f"the coordinator 127.0.0.1:{port} did not accept connections within 3 s" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags,match", [
    (["--config.model.qk_normm=True"], "unknown config field 'qk_normm'"),
    (["--config.model.depth=two"], "flag --config.model.depth=two"),
    (["--config.data.path=/nonexistent/latents"], "dataset directory /nonexistent/latents does not exist"),
])
def test_bad_input_is_one_paragraph_without_traceback(tmp_path, flags, match):
  proc = subprocess.run(helpers.main_cmd(tmp_path, *flags), cwd=helpers.ROOT, env=helpers.env(devices=1),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_BAD_INPUT
  assert match in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
  assert proc.stderr.startswith("error: ")


def test_readme_main_command(tmp_path):
  """The README's main command, verbatim on the embedded default, cut to 100 of its steps (logged every 10)
  to keep the suite short (the full run's time is measured outside the suite): it runs, the loss falls,
  it leaves validation results and a sample grid, and every line it prints appears once."""
  readme = (helpers.ROOT / "README.md").read_text()
  command = "python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir="
  assert command in readme
  start = time.time()
  proc = subprocess.run(helpers.main_cmd(tmp_path / "wd", "--config.total_steps=100", "--config.log_every=10"),
                        cwd=helpers.ROOT, env=helpers.env(devices=1, fast_compile=False), capture_output=True,
                        text=True, timeout=600)
  elapsed = time.time() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  assert "using the embedded demo dataset" in out and out.count("compiling the train step…") == 1
  lines = [l for l in (out + proc.stderr).splitlines() if l.strip()]
  assert len(lines) == len(set(lines)) and len(lines) < 30, lines  # once each, and no library chatter
  losses = helpers.losses(tmp_path / "wd")
  assert losses[-1] < 0.7 * losses[0], losses
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["val_ema/loss"] < results["val_raw/loss"] * 2 and np.isfinite(results["val_ema/loss"])
  assert np.isfinite(results["fid/demo"]) and (tmp_path / "wd" / "samples" / "step_0000100.png").is_file()
  print(f"README main command (100 steps): {elapsed:.0f} s, loss {losses[0]:.3f} → {losses[-1]:.3f}")
