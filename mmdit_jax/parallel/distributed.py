"""Multi-process start-up that fails loudly: on a multi-host platform every process must join, or none runs.

A pod whose hosts silently fell back to single-process runs would each train alone into the same workdir
and overwrite each other's checkpoints, so a failed `jax.distributed.initialize` is an error that names
the cause and what to check. Modes (`--distributed`): `auto` joins when flags or the environment say the
run spans hosts (explicit coordinator flags, a Cloud TPU VM, SLURM/Open MPI/GKE variables); `on` always
joins (jax's cluster auto-detection); `off` never does.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import time

import jax
import numpy as np

from mmdit_jax.errors import UserError

MODES = ("auto", "on", "off")
# Environment variables whose value > 1 (or a list of > 1 hosts) means the job spans processes.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES")


class DistributedInitError(UserError):
  """jax.distributed could not start on a multi-process run; the message says what to check."""


def on_cloud_tpu_vm() -> bool:
  return bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_HOSTNAMES")
              or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def multi_process_signals() -> list[str]:
  """The environment's reasons to believe this run spans several processes (empty: none)."""
  found = []
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    found.append(f"TPU_WORKER_HOSTNAMES lists {len(hosts.split(','))} hosts")
  for name in _MULTI_PROCESS_ENV:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      found.append(f"{name}={value}")
  return found


def _wait_for_coordinator(address: str, timeout_s: float):
  """Process k > 0: the coordinator's port must accept connections within the timeout. (jax's client aborts
  the whole process from C++ when it cannot register, so the common failure is caught here, with words.)"""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedInitError(f"--coordinator_address={address!r} is not host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedInitError(
            f"the coordinator {address} did not accept connections within {timeout_s:.0f} s ({e}). Check that "
            "process 0 runs the same command on that host, that the port is open between hosts, and that "
            "--coordinator_address names process 0's host (a single-host machine can pass --distributed=off)")
      time.sleep(0.5)


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, mode: str = "auto",
               timeout_s: int = 300) -> bool:
  """Joins the other processes when the run is multi-process; True if jax.distributed was initialised.

  Explicit flags (CPU: gloo collectives) or mode 'on' always join; mode 'auto' joins on a Cloud TPU VM or
  when the environment shows several processes. A failure to join is a DistributedInitError, or, where
  jax's C++ client aborts the process itself (peers that never register), a non-zero exit with jax's
  message: either way no process goes on alone.
  """
  if mode not in MODES:
    raise UserError(f"--distributed={mode!r}; valid: {list(MODES)}")
  explicit = bool(coordinator_address or num_processes)
  signals = multi_process_signals()
  if mode == "off":
    if explicit or signals:
      raise UserError(f"--distributed=off but this run is multi-process ({'flags' if explicit else ', '.join(signals)}): "
                      "every process would train alone into the same workdir")
    return False
  if not (explicit or mode == "on" or signals or on_cloud_tpu_vm()):
    return False
  if explicit and jax.config.jax_platforms == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  why = ("--coordinator_address/--num_processes/--process_id" if explicit else
         ", ".join(signals) if signals else "--distributed=on" if mode == "on" else "a Cloud TPU VM")
  if coordinator_address and process_id:
    _wait_for_coordinator(coordinator_address, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
  except Exception as e:  # jax raises RuntimeError, ValueError or XlaRuntimeError, depending on the stage
    raise DistributedInitError(
        f"jax.distributed.initialize failed ({type(e).__name__}: {e}). This run is multi-process because of "
        f"{why}. Check that every host runs the same command at the same time, that the coordinator "
        f"({coordinator_address or 'auto-detected'}) is reachable from every host on its port, and that "
        f"process ids are 0..num_processes-1; a single-host machine can pass --distributed=off") from e
  return True


def check_same_everywhere(text: str, what: str):
  """Fails unless every process holds the same `text` (e.g. the resolved config), naming what differs."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  mine = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  theirs = np.asarray(multihost_utils.broadcast_one_to_all(mine))
  same = bool(np.all(theirs == mine))
  agree = np.asarray(multihost_utils.process_allgather(np.asarray([same])))
  if not np.all(agree):
    bad = [int(i) for i in np.flatnonzero(~agree.reshape(-1))]
    raise UserError(f"processes {bad} see a different {what} than process 0; launch every host with the same "
                    "code, config file and flags")
