"""The training system: exact resume (halt, SIGKILL, SIGTERM), non-finite steps, config errors,
2 processes × 4 devices against 1 × 8, and the README's main command."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import rf_lognorm
from mmdit_jax import config as config_lib
from mmdit_jax import data, parallel, train
from mmdit_jax.checkpoint import Checkpointer, tree_equal
from mmdit_jax.train_step import make_optimizer, make_train_step, state_shardings, init_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
OVERRIDES = {
    "total_steps": STEPS, "log_every": 2, "checkpoint_every": 4, "eval_batches": 1, "eval_every": 0,
    "data.global_batch_size": 8, "data.demo_examples": 128, "data.num_threads": 1, "data.prefetch": 2,
    "model.kwargs.depth": 2, "model.kwargs.hidden_size": 32, "model.kwargs.num_heads": 2,
    "model.kwargs.patch_size": 8, "optim.warmup_steps": 2, "sample_every": 0,
}


def _config(**extra):
  c = rf_lognorm.get_config()
  for key, value in {**OVERRIDES, **extra}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _cli_flags(**extra):
  flags = []
  for key, value in {**OVERRIDES, **extra}.items():
    flags.append(f"--config.{key}={tuple(value) if isinstance(value, (list, tuple)) else value}")
  return flags


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  os.environ["MMDIT_JAX_CACHE"] = str(cache)
  yield cache


def _env(devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(ROOT))
  return env


def _main(workdir, *flags):
  return [sys.executable, "-m", "mmdit_jax.main", "--config=configs/rf_lognorm.py", f"--workdir={workdir}",
          *flags]


def _final_state(workdir, cfg_dict, mesh_shape=(-1, 1, 1, 1)):
  cfg = config_lib.from_config_dict(cfg_dict)
  tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
  mesh = parallel.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    abstract, shardings = state_shardings(cfg.model, tx, mesh, parallel.DEFAULT_RULES)
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    step = ckpt.latest_step()
    state, data_state = ckpt.restore(step, abstract, shardings)
    ckpt.close()
  return step, state, data_state


def _order(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "data_order.jsonl").read_text().splitlines()]
  return {r["step"]: r["index"] for r in rows}  # a resumed step overwrites a lost one


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  summary = train.train_and_evaluate(_config(), workdir)
  assert summary["step"] == STEPS
  return workdir, _final_state(workdir, _config())


def _assert_same_as_straight(straight, workdir):
  s_dir, (s_step, s_state, s_data) = straight
  step, state, data_state = _final_state(workdir, _config())
  assert step == s_step == STEPS
  for part in ("params", "opt_state", "ema", "step", "skipped"):
    assert tree_equal(state[part], s_state[part]), part
  assert data_state == s_data
  assert _order(workdir) == _order(s_dir)


def test_exact_resume_after_halt(straight, tmp_path):
  first = train.train_and_evaluate(_config(halt_at_step=STEPS // 2), tmp_path)
  assert first["stopped"] and first["step"] == STEPS // 2
  train.train_and_evaluate(_config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)


def test_resume_ignores_partially_written_checkpoint(straight, tmp_path):
  train.train_and_evaluate(_config(halt_at_step=STEPS // 2), tmp_path)
  # What a crash during an asynchronous save leaves behind: a temporary directory for a later step.
  partial = tmp_path / "checkpoints" / f"{STEPS // 2 + 2}.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == STEPS // 2
  train.train_and_evaluate(_config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)


def test_sigkill_then_resume(straight, tmp_path):
  proc = subprocess.Popen(_main(tmp_path, *_cli_flags(checkpoint_every=1)), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt_dir = tmp_path / "checkpoints"
  while time.time() < deadline and not (ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    time.sleep(0.05)
  time.sleep(0.3)  # somewhere in the middle of the next asynchronous saves
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert Checkpointer(ckpt_dir).latest_step() is not None
  train.train_and_evaluate(_config(), tmp_path)
  _assert_same_as_straight(straight, tmp_path)


def test_sigterm_checkpoints_and_exits_cleanly(straight, tmp_path):
  proc = subprocess.Popen(_main(tmp_path, *_cli_flags(total_steps=400, checkpoint_every=1000)), cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  order = tmp_path / "data_order.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (order.exists() and len(order.read_text().splitlines()) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert "stopping at step" in out
  stopped = Checkpointer(tmp_path / "checkpoints").latest_step()
  assert 3 <= stopped < 400
  # The run resumes exactly: two more steps, against a straight run to the same step.
  resumed_cfg = _config(total_steps=400, checkpoint_every=1000, halt_at_step=stopped + 2)
  train.train_and_evaluate(resumed_cfg, tmp_path)
  ref = tmp_path.parent / (tmp_path.name + "_ref")
  train.train_and_evaluate(resumed_cfg, ref)
  _, a, _ = _final_state(tmp_path, resumed_cfg)
  _, b, _ = _final_state(ref, resumed_cfg)
  for part in ("params", "opt_state", "ema"):
    assert tree_equal(a[part], b[part]), part


def test_nan_batch_is_skipped_and_counted():
  cfg = config_lib.from_config_dict(_config())
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  step = jax.jit(make_train_step(cfg, tx, schedule))
  state = jax.jit(lambda k: init_state(cfg.model, tx, k))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"latent": rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
           "context": rng.standard_normal((8, 32, 32)).astype(np.float32),
           "pooled": rng.standard_normal((8, 32)).astype(np.float32)}
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


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  n = 32
  arrays = {"latent": np.full((n, 32, 32, 3), np.nan, np.float16),
            "context": np.zeros((n, 32, 32), np.float16), "pooled": np.zeros((n, 32), np.float16)}
  data.write_arrays(tmp_path / "nan", arrays)
  with pytest.raises(train.TrainingStopped, match=r"consecutive non-finite steps.*max_nonfinite_steps=3"):
    train.train_and_evaluate(_config(**{"data.path": str(tmp_path / "nan"), "data.text_dropout": 0.0,
                                        "max_nonfinite_steps": 3, "total_steps": 20}), tmp_path / "wd")


@pytest.mark.parametrize("extra,match", [
    ({"formulation": "rf/lognormal(0, 1)"}, r"config.formulation: unknown formulation.*valid forms"),
    ({"data.global_batch_size": 6, "mesh.ici": (-1, 1, 1, 1)}, r"global_batch_size=6 is not divisible by the data-parallel size 8"),
    ({"mesh.ici": (2, 2, 1, 1)}, r"config.mesh.ici .* has 4 devices but 8"),
    ({"data.path": "/nonexistent/latents"}, r"/nonexistent/latents does not exist"),
    ({"optim.schedule": "step"}, r"config.optim.schedule='step' is not valid; valid: \['constant', 'cosine', 'linear'\]"),
    ({"model.kwargs.in_channels": 4}, r"latents have 3 channels but config.model.kwargs.in_channels=4"),
])
def test_bad_configs_fail_before_compiling(tmp_path, extra, match):
  start = time.time()
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(**extra), tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  assert time.time() - start < 20


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(tmp_path):
  one = tmp_path / "one"
  train.train_and_evaluate(_config(**{"mesh.ici": (2, 2, 1, 2)}), one)
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(
      _main(two, *_cli_flags(**{"mesh.ici": (2, 2, 1, 2)}),
            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-4)
  # Each run's checkpoint restores in the other layout and onto another mesh shape.
  _, a, _ = _final_state(two, _config(), mesh_shape=(2, 2, 1, 2))
  _, b, _ = _final_state(one, _config(), mesh_shape=(8, 1, 1, 1))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_readme_main_command(tmp_path):
  """The README's main command, verbatim on the embedded default, cut to 150 of its steps to keep the
  suite short (the full run's time is measured outside the suite): it runs, the loss falls, and it
  leaves validation results and a sample grid."""
  readme = (ROOT / "README.md").read_text()
  command = "python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir="
  assert command in readme
  start = time.time()
  proc = subprocess.run(_main(tmp_path / "wd", "--config.total_steps=150"),
                        cwd=ROOT, env=_env(devices=1), capture_output=True, text=True, timeout=600)
  elapsed = time.time() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "using the embedded demo dataset" in proc.stdout
  losses = _losses(tmp_path / "wd")
  assert losses[-1] < 0.7 * losses[0], losses
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["val_ema/loss"] < results["val_raw/loss"] * 2 and np.isfinite(results["val_ema/loss"])
  assert np.isfinite(results["fid/demo"]) and (tmp_path / "wd" / "samples" / "step_0000150.png").is_file()
  print(f"README main command (150 steps): {elapsed:.0f} s, loss {losses[0]:.3f} → {losses[-1]:.3f}")


def test_class_conditional_dit_config_trains_in_bf16(tmp_path):
  from configs import dit
  rng = np.random.default_rng(0)
  n = 64
  data.write_arrays(tmp_path / "labelled", {
      "latent": rng.standard_normal((n, 8, 8, 4)).astype(np.float16),
      "label": rng.integers(0, 10, n).astype(np.int32)}, {"num_classes": 10})
  c = dit.get_config(f"variant=S/2,data={tmp_path / 'labelled'},steps=4,batch=8")
  c.model.kwargs.update(dict(depth=2, hidden_size=32, num_heads=2, num_classes=10, dtype="bfloat16"))
  c.update(dict(log_every=2, checkpoint_every=4, eval_batches=1))
  c.data.num_threads = 1
  summary = train.train_and_evaluate(c, tmp_path / "wd")
  assert summary["step"] == 4 and np.isfinite(summary["val_ema/loss"])
  _, state, _ = _final_state(tmp_path / "wd", c)
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}  # master weights
