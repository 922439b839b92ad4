"""The command line as users meet it: the README's main command, preemption (SIGTERM → exit 75) and
SIGKILL mid-save with exact resume, 2 processes × 4 devices against 1 × 8, a failed distributed start,
and bad input reported in one paragraph without a traceback."""

import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from mmdit_jax import errors, train
from mmdit_jax.checkpoint import Checkpointer
from tests import helpers
from tests.helpers import assert_same_as_straight, config


def _start(workdir, **flags):
  return subprocess.Popen(helpers.main_cmd(workdir, *helpers.cli_flags(**flags)), cwd=helpers.ROOT,
                          env=helpers.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_sigterm_then_sigkill_mid_save_then_exact_resume(straight, tmp_path):
  """SIGTERM (a preemption notice) during the first compile: the run finishes that step, saves, and exits 75.
  Resumed in a new process, SIGKILL lands in the middle of asynchronous saves. Resumed again in-process, the
  run ends bitwise identical to one that was never interrupted."""
  proc = _start(tmp_path, checkpoint_every=1)
  for line in proc.stdout:
    if "compiling the train step" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == errors.EXIT_PREEMPTED == 75, out
  assert "stopping at step 1 (preemption); checkpoint saved" in out and "Traceback" not in out
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 1

  proc = _start(tmp_path, checkpoint_every=1)
  ckpt_dir = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not any(p.name.isdigit() and int(p.name) > 1 for p in ckpt_dir.iterdir()):
    time.sleep(0.02)
  time.sleep(0.1)  # somewhere in the middle of the next asynchronous saves
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert Checkpointer(ckpt_dir).latest_step() > 1
  train.train_and_evaluate(config(), tmp_path)
  assert_same_as_straight(straight, tmp_path)


@pytest.mark.slow
@pytest.mark.xdist_group("straight")  # (shares the session's straight run)
def test_two_processes_match_one(straight, tmp_path):
  """2 processes × 4 devices on a (data 2, fsdp 2, tensor 2) mesh against the straight 1 × 8 run."""
  port = helpers.free_port()
  mesh = {"mesh.ici.data": 2, "mesh.ici.fsdp": 2, "mesh.ici.tensor": 2}
  procs = [subprocess.Popen(
      helpers.main_cmd(tmp_path, *helpers.cli_flags(**mesh), f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}"),
      cwd=helpers.ROOT, env=helpers.env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert "process 0/2 | 4 local, 8 global devices" in outs[0] and "process 1/2" not in outs[1]  # once, by process 0
  s_dir, (_, s_state, _) = straight
  np.testing.assert_allclose(helpers.losses(tmp_path), helpers.losses(s_dir), rtol=1e-4)
  # The two-process checkpoint restores onto another mesh shape, matching the straight run's.
  _, state, _ = helpers.final_state(tmp_path, config(), mesh_ici=(2, 2, 1, 2))
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(s_state["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
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
    (["--mode=sample", "--prompt=a red circle", "--seeds=1,2"], "--seeds gives 2 seeds for 1 --prompt flags"),
])
def test_bad_input_is_one_paragraph_without_traceback(tmp_path, flags, match):
  proc = subprocess.run(helpers.main_cmd(tmp_path, *flags), cwd=helpers.ROOT, env=helpers.env(devices=1),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_BAD_INPUT
  assert match in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
  assert proc.stderr.startswith("error: ")


@pytest.mark.slow
def test_readme_main_command(tmp_path):
  """The README's main command, verbatim on the embedded default, cut to keep the suite short — 20 of its
  steps (logged every 5) on batches of 8, one validation batch, 16 end-of-run samples of 8 steps (the full
  run's time is measured outside the suite): it runs, the loss falls, it leaves validation results and a
  sample grid, and every line it prints appears once."""
  readme = (helpers.ROOT / "README.md").read_text()
  command = "python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir="
  assert command in readme
  start = time.time()
  cuts = ("--config.total_steps=20", "--config.log_every=5", "--config.data.global_batch_size=8",
          "--config.eval_batches=1", "--config.eval.num_samples=16", "--config.sample.steps=8")
  proc = subprocess.run(helpers.main_cmd(tmp_path / "wd", *cuts),
                        cwd=helpers.ROOT, env=helpers.env(devices=1), capture_output=True,
                        text=True, timeout=600)
  elapsed = time.time() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  assert "using the embedded demo dataset" in out and out.count("compiling the train step…") == 1
  lines = [l for l in (out + proc.stderr).splitlines() if l.strip()]
  assert len(lines) == len(set(lines)) and len(lines) < 30, lines  # once each, and no library chatter
  losses = helpers.losses(tmp_path / "wd")
  assert losses[-1] < 0.8 * losses[0], losses
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["val_ema/loss"] < results["val_raw/loss"] * 2 and np.isfinite(results["val_ema/loss"])
  assert np.isfinite(results["fid/demo"]) and (tmp_path / "wd" / "samples" / "step_0000020.png").is_file()
  print(f"README main command (20 steps): {elapsed:.0f} s, loss {losses[0]:.3f} → {losses[-1]:.3f}")
