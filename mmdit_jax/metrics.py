"""What a user watching a long job sees: TensorBoard scalars, a JSONL log, and a progress line with
rate, ETA, model TFLOP/s per device and MFU (analytic FLOPs; peak by device kind, never guessed).

Every message is printed once, by process 0: `log` to stdout, `warn` to stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np
from etils import epath

# Dense bf16 peak FLOP/s per device by jax device_kind prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str):
  """Peak FLOP/s of one device, or None when the kind is not in the table."""
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch, when installed,
  only to accept torch tensors (which this project never passes), and that import is 2 s of every start."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def read_metrics(workdir) -> list[dict]:
  """The records of workdir/metrics.jsonl ([] before the first write), as MetricWriter writes them."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class MetricWriter:
  """TensorBoard event files and metrics.jsonl in the workdir (written by process 0 only).

  `resume_step`: the step a resumed run restarts from; records of later steps (written before the
  interruption, and about to be written again) are dropped, so metrics.jsonl holds each step once.
  Non-finite values are kept (NaN/Infinity in the JSON, as Python and pandas read them) and warned about.
  """

  def __init__(self, workdir, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir)
    self.tb = None
    if self.active:
      self.tb = _summary_writer()(str(self.path / "tensorboard"))
      self.jsonl_path = self.path / "metrics.jsonl"
      self.lines = []
      if self.jsonl_path.exists():
        self.lines = [line for line in self.jsonl_path.read_text().splitlines() if line.strip() and (
            resume_step is None or json.loads(line).get("step", 0) <= resume_step)]
        self.jsonl_path.write_text("".join(line + "\n" for line in self.lines))
      # Object stores (gs://) cannot append: there the file is rewritten whole at each write.
      self.jsonl = None if "://" in str(self.path) else self.jsonl_path.open("a")

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    bad = sorted(k for k, v in clean.items() if not math.isfinite(v))
    if bad:
      warn(f"non-finite metrics at step {step}: {', '.join(f'{k}={clean[k]}' for k in bad)}")
    for k, v in clean.items():
      self.tb.add_scalar(k, v, step)
    line = json.dumps({"step": int(step), **clean})
    self.lines.append(line)
    if self.jsonl is not None:
      self.jsonl.write(line + "\n")
      self.jsonl.flush()
    else:
      self.jsonl_path.write_text("".join(x + "\n" for x in self.lines))
    self.tb.flush()

  def last(self, key: str):
    """The last value of `key` in metrics.jsonl (process 0), or None."""
    if not self.active:
      return None
    values = [r[key] for r in map(json.loads, self.lines) if key in r]
    return values[-1] if values else None

  def write_image(self, step: int, name: str, image: np.ndarray):
    """An (H, W, 3) uint8 image (a sample grid) into TensorBoard."""
    if self.active:
      self.tb.add_image(name, np.asarray(image), step, dataformats="HWC")
      self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()
      if self.jsonl is not None:
        self.jsonl.close()


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "unknown"
  return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


class Progress:
  """Rate, ETA and throughput between log points."""

  def __init__(self, total_steps: int, start_step: int, flops_per_step: float, batch_size: int):
    self.total, self.flops_per_step, self.batch = total_steps, flops_per_step, batch_size
    self.start, self.excluded = start_step, 0.0
    self.restart(start_step)
    self.devices = jax.device_count()
    self.peak = peak_flops(jax.devices()[0].device_kind)

  INPUT_BOUND = 0.3  # warn when the steps waited this fraction of their time for input …
  INPUT_BOUND_LOGS = 3  # … at this many log points in a row

  def restart(self, step: int):
    """Measure from now and `step` on (after the first step's compilation)."""
    self.last_step, self.last_time, self.waited, self.bound_logs = step, time.perf_counter(), 0.0, 0

  def exclude(self, seconds: float):
    """Time between steps spent on something else (validation, samples, a checkpoint's start): left out of
    the step rate, and spread over the steps so far in the ETA, which so counts the evaluations to come."""
    self.last_time += seconds
    self.excluded += seconds

  def waited_for_input(self, seconds: float):
    """Time the loop spent waiting for the next batch (added up until the next update)."""
    self.waited += seconds

  def update(self, step: int) -> dict:
    """Rates since the last update; {} when no step has run since (e.g. right after compiling).
    perf/data_wait_s: seconds per step spent waiting for input; perf/data_wait_fraction: of the step time."""
    now = time.perf_counter()
    steps = step - self.last_step
    if steps <= 0:
      return {}
    dt = (now - self.last_time) / steps
    wait = self.waited / steps
    self.last_step, self.last_time, self.waited = step, now, 0.0
    tflops = self.flops_per_step / dt / self.devices / 1e12
    fraction = min(1.0, wait / dt) if dt > 0 else 0.0
    self.bound_logs = self.bound_logs + 1 if fraction >= self.INPUT_BOUND else 0
    if self.bound_logs == self.INPUT_BOUND_LOGS:
      warn(f"input-bound: steps waited {fraction:.0%} of their time for data at {self.INPUT_BOUND_LOGS} log points in "
           "a row; raise config.data.num_threads / config.data.prefetch, or move the data closer (local SSD, a "
           "gcsfuse mount with a file cache)")
    return {"perf/step_time_s": dt, "perf/examples_per_s": self.batch / dt,
            "perf/model_tflops_per_device": tflops,
            "perf/mfu": (tflops * 1e12 / self.peak) if self.peak else None,
            "perf/eta_s": (self.total - step) * (dt + self.excluded / (step - self.start)),
            "perf/data_wait_s": wait, "perf/data_wait_fraction": fraction}

  def line(self, step: int, loss: float, perf: dict) -> str:
    head = f"step {step}/{self.total} ({step / self.total:.0%}) loss {loss:.4f}"
    if not perf:
      return head
    mfu = f"{perf['perf/mfu']:.1%}" if perf["perf/mfu"] is not None else "unknown"
    return (f"{head} | {1 / perf['perf/step_time_s']:.2f} steps/s, {perf['perf/examples_per_s']:.1f} ex/s | "
            f"{perf['perf/model_tflops_per_device']:.3f} TFLOP/s/device, MFU {mfu} | "
            f"input wait {perf['perf/data_wait_fraction']:.0%} | ETA {format_eta(perf['perf/eta_s'])}")


def log(msg: str):
  """One line on stdout, from process 0."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def warn(msg: str):
  """One warning line on stderr, from process 0."""
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)
