"""XLA / libtpu flag presets by name (config.xla_flags), applied to the environment before JAX starts a
backend (main.py reads the name from the config first), and recorded in the compile report.

The TPU flags are those large JAX trainers on Cloud TPU set (MaxText's, maxdiffusion's launch scripts);
each line says what it does. Flags already in LIBTPU_INIT_ARGS / XLA_FLAGS are kept and come first.
"""

from __future__ import annotations

import os

from mmdit_jax.errors import ConfigError

_TPU_OVERLAP = (
    "--xla_tpu_enable_async_collective_fusion=true",  # run collectives asynchronously, fused with compute
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",  # …including FSDP's weight all-gathers
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",  # …spread over several compute steps
    "--xla_tpu_overlap_compute_collective_tc=true",  # overlap them with the TensorCore's compute
    "--xla_enable_async_all_gather=true",  # all-gathers as async start/done pairs the scheduler can move
)
_TPU_DATA_PARALLEL = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",  # optimise data parallelism's gradient all-reduces
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",  # …also when the reduced arrays differ in size
)
_GPU_OVERLAP = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # schedule to overlap collectives with compute
    "--xla_gpu_enable_highest_priority_async_stream=true",  # collectives on a high-priority stream
)

# name → {environment variable: flags}
XLA_PRESETS = {
    "none": {},
    "tpu_overlap": {"LIBTPU_INIT_ARGS": _TPU_OVERLAP},
    "tpu_overlap_dp": {"LIBTPU_INIT_ARGS": _TPU_OVERLAP + _TPU_DATA_PARALLEL},
    "gpu_overlap": {"XLA_FLAGS": _GPU_OVERLAP},
}


def check(name: str):
  if name not in XLA_PRESETS:
    raise ConfigError(f"config.xla_flags={name!r}; valid: {sorted(XLA_PRESETS)}")


def apply(name: str) -> dict:
  """Adds preset `name`'s flags to the environment (before a backend starts); returns the variables'
  resulting values."""
  check(name)
  for var, flags in XLA_PRESETS[name].items():
    present = os.environ.get(var, "").split()
    os.environ[var] = " ".join(present + [f for f in flags if f.split("=")[0] not in
                                          {p.split("=")[0] for p in present}])
  return environment()


def environment() -> dict:
  return {var: os.environ.get(var, "") for var in ("LIBTPU_INIT_ARGS", "XLA_FLAGS")}
