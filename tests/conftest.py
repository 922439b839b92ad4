"""Test session setup: JAX on the CPU with 8 forced host devices, so (2, 2, 2) meshes can be tested; one
demo-data cache and one persistent XLA compilation cache for the whole session, shared with the
subprocesses that tests start (they inherit the environment), so each program compiles once."""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
# Compile-for-TPU tests load libtpu (no TPU needed); with two xdist workers both may: libtpu's lock on
# /tmp/libtpu_lockfile is for real chips, which no test touches.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Tiny models: compile time dominates run time, so XLA's CPU backend skips its slow optimisations (≈40 %
# faster compiles) and emits fusions the older, simpler way (fusion emitters off: the tiny train step
# compiles in 7 s instead of 11, a tiny model's gradient in 2.1 s instead of 3.8, at the same run time).
# Subprocesses get the same flags from tests.helpers.env.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}").strip()
_SESSION = tempfile.mkdtemp(prefix="mmdit_jax_tests_")
os.environ.setdefault("MMDIT_JAX_CACHE", os.path.join(_SESSION, "cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SESSION, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny eager compiles too


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
  """The tiny config trained straight through: (workdir, (step, state, data state)) for resume checks."""
  from mmdit_jax import train
  from tests import helpers
  workdir = tmp_path_factory.mktemp("straight")
  summary = train.train_and_evaluate(helpers.config(), workdir)
  assert summary["step"] == helpers.STEPS and "stopped" not in summary
  return workdir, helpers.final_state(workdir, helpers.config())
