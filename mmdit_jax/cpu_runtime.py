"""The CPU backend's run time: each step reuses the memory of the step before, instead of faulting it in anew.

XLA's CPU runtime mallocs every run's temporaries (62 MiB for benchmarks/train_step_vs_diffusers.py's step,
118 MiB for the README demo's) and frees them after. JAX dispatches single-device programs to a worker
thread, whose glibc arena cannot hold a block that large: glibc maps it fresh with mmap and unmaps it on
free, every step (and, for any block over 32 MiB, whatever the thread). The kernels then page the memory in
again as they write it: 16–27 thousand minor page faults and 25–40 ms of kernel time per step on the
2-core machine (docs/performance.md).

`configure(True)` (main.py's default, --nocpu_reuse_memory turns it off) runs single-device programs on
the calling thread (jax_cpu_enable_async_dispatch off), and, when the default backend is the CPU, has
glibc keep freed memory: no mmap for large blocks (they come from the main heap) and no trimming of the
heap's top below 2 GiB. `ready` makes a step's inputs complete before the call, since a program whose
inputs are still being copied is queued to a worker thread even then. Other platforms are untouched:
the accelerator's programs are not affected by the first setting, and the second is not applied. The
cost is resident memory: the process keeps its peak (1.43 against 0.95 GB after 1,000 steps of the demo).
"""

from __future__ import annotations

import ctypes
import platform
import sys

import jax

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes (an int)

_inline = False  # configure(True) took effect: programs run on the calling thread


def configure(enabled: bool) -> bool:
  """Call before JAX creates its backends (it sets how the CPU client dispatches). Returns whether both
  settings are in effect: enabled, the CPU is the default backend, and the C library is glibc."""
  global _inline
  if not enabled:
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu":
    return False
  _inline = True
  return retain_freed_memory()


def retain_freed_memory() -> bool:
  """glibc: serve large blocks from the heap and keep freed memory in the process. False where the C
  library is not glibc (the setting does not exist there) or refuses a parameter."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def ready(tree):
  """`tree` with its transfers complete when configure(True) is in effect (so the step that takes it runs
  on this thread); otherwise `tree` as it is, the host never waiting."""
  return jax.block_until_ready(tree) if _inline else tree
