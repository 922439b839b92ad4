"""cpu_runtime: with it, a program's large temporaries are reused from one run to the next instead of being
page-faulted in again; without it (JAX's and glibc's defaults) they are not. Each case runs in a fresh
process with one CPU device, since both settings are process-wide and must precede the backend."""

import platform
import subprocess
import sys

import pytest

from tests import helpers

# A program with a 64 MiB temporary (above glibc's 32 MiB ceiling for heap blocks), run 8 times after a
# warm-up; prints the minor page faults per run.
_PROBE = """
import resource, sys
import jax, jax.numpy as jnp
from mmdit_jax import cpu_runtime
print("configured", cpu_runtime.configure(sys.argv[1] == "1"))
f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)) @ x[:, None]))  # the sines: a 4096² f32 temporary
x = cpu_runtime.ready(jnp.ones((4096,)) * 1e-3)
for _ in range(3):
  jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  jax.block_until_ready(f(x))
print("faults_per_run", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _probe(enabled: bool) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROBE, "1" if enabled else "0"], env=helpers.env(devices=1),
                       capture_output=True, text=True, timeout=120, check=True).stdout
  return {k: v for k, v in (line.split() for line in out.splitlines() if " " in line)}


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_temporaries_are_reused_only_when_configured():
  on, off = _probe(True), _probe(False)
  assert on["configured"] == "True" and off["configured"] == "False"
  # 64 MiB is 16384 pages: faulted in on every run by default, not again once the memory is kept (0.25 per
  # run on an idle machine; 2,048 once in a suite on a heavily loaded one, still an eighth of the block).
  assert float(off["faults_per_run"]) > 8000, off
  assert float(on["faults_per_run"]) < 4096, on


def test_ready_waits_only_when_inline(monkeypatch):
  import jax
  import jax.numpy as jnp

  from mmdit_jax import cpu_runtime
  calls = []
  monkeypatch.setattr(jax, "block_until_ready", lambda tree: calls.append(tree) or tree)
  tree = {"a": jnp.ones(3)}
  monkeypatch.setattr(cpu_runtime, "_inline", False)
  assert cpu_runtime.ready(tree) is tree and not calls
  monkeypatch.setattr(cpu_runtime, "_inline", True)
  assert cpu_runtime.ready(tree) is tree and calls == [tree]
  assert cpu_runtime.configure(False) is False  # off: nothing is changed
