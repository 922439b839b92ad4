"""Shared test aids: the tiny config (in-process and as CLI flags), subprocess commands, checkpoint reads."""

import json
import os
import pathlib
import socket
import sys
import tracemalloc

import jax
import numpy as np
from etils import epath

from configs import rf_lognorm
from mmdit_jax import config as config_lib
from mmdit_jax import parallel
from mmdit_jax.checkpoint import Checkpointer
from mmdit_jax.state import make_optimizer, restore_latest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
# The README's tiny preset cut to a 2-layer, 32-wide model on 128 demo scenes.
TINY = {
    "total_steps": STEPS, "log_every": 2, "checkpoint_every": 4, "eval_batches": 1, "eval_every": 0,
    "data.global_batch_size": 8, "data.demo_examples": 128, "data.num_threads": 1, "data.prefetch": 2,
    "model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 8,
    "optim.warmup_steps": 2, "sample_every": 0, "debug.log_data_order": True,
}


def set_fields(c, fields: dict):
  for key, value in fields.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def config_dict(**extra):
  """The tiny ConfigDict; extra 'a.b' keys override fields."""
  return set_fields(rf_lognorm.get_config(), {**TINY, **extra})


def config(**extra) -> config_lib.TrainConfig:
  return config_lib.from_config_dict(config_dict(**extra))


def cli_flags(**extra) -> list[str]:
  def fmt(value):
    return tuple(value) if isinstance(value, list) else value
  return [f"--config.{k}={fmt(v)}" for k, v in {**TINY, **extra}.items()]


def env(devices=8, fast_compile=True) -> dict:
  """A subprocess's environment: `devices` CPU devices, the session's caches, and (for tiny programs whose
  compile time dominates) the test session's fast-compile XLA flags."""
  from tests.conftest import TEST_XLA_FLAGS
  flags = f"--xla_force_host_platform_device_count={devices}" + (f" {TEST_XLA_FLAGS}" if fast_compile else "")
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=flags)


def main_cmd(workdir, *flags, config_file="configs/rf_lognorm.py") -> list[str]:
  return [sys.executable, "-m", "mmdit_jax.main", f"--config={config_file}", f"--workdir={workdir}", *flags]


def final_state(workdir, cfg: config_lib.TrainConfig, mesh_ici=(-1, 1, 1, 1)):
  """(step, state, data state) of the newest checkpoint, restored onto a mesh of `mesh_ici`."""
  ckpt = Checkpointer(epath.Path(workdir) / "checkpoints")
  try:
    return restore_latest(cfg, make_optimizer(cfg.optim, cfg.total_steps)[0], parallel.make_mesh(mesh_ici), ckpt)
  finally:
    ckpt.close()


def tree_equal(a, b) -> bool:
  """Bitwise equality of two pytrees of arrays (for resume checks)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir) -> list[float]:
  return [r["loss"] for r in metrics(workdir) if "loss" in r]


def data_order(workdir) -> dict:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "data_order.jsonl").read_text().splitlines()]
  return {r["step"]: r["index"] for r in rows}  # a resumed step overwrites a lost one


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def assert_same_as_straight(straight, workdir):
  """The run in `workdir` ended bitwise identical to the straight one: state, data position and order."""
  s_dir, (s_step, s_state, s_data) = straight
  step, state, data_state = final_state(workdir, config())
  assert step == s_step == STEPS
  for part in ("params", "opt_state", "ema", "step", "skipped"):
    assert tree_equal(state[part], s_state[part]), part
  assert data_state == s_data
  assert data_order(workdir) == data_order(s_dir)


def host_memory_of(load):
  """(load()'s result, the peak host memory (tracemalloc: numpy's buffers) it used beyond what it kept):
  run once first, so tracing and compilation caches are not counted. CPU devices may keep numpy's
  buffers as their own, so what stays allocated is the placed parameters and is subtracted."""
  load()
  tracemalloc.start()
  try:
    result = load()
    kept, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  return result, peak - kept
