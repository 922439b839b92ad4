"""Attention on the CPU through a native kernel (`cpu_attention.cc`), called as an XLA FFI custom call.

XLA's CPU backend runs attention's two batched products and the softmax between them as YNNPACK fusions at
28-60 GFLOP/s on one core and needs head-major copies of q, k and v; torch's CPU SDPA kernel takes about
60 % of its time (docs/performance.md). The kernel here works blockwise on the (B, S, H, K) arrays the model holds:
per (batch, head), a block of query rows against every key, the softmax in place, then the product with v;
the backward recomputes the probabilities from the saved log-sum-exp (flash attention's maths, without the
online rescaling: a block's logits row fits in cache at the sequence lengths a CPU trains).

The kernel is compiled at first use for the machine at hand (`$CXX`, else g++ / c++ / clang++, with
-march=native, or `$MMDIT_JAX_CPU_ARCH`: e.g. x86-64-v3 for AVX2 code)
against the FFI headers jaxlib ships, and cached under `paths.cache_dir()/kernels`, keyed by the source,
jaxlib's version, the compiler and the CPU's features, so a cache directory shared between machines never
hands one a binary built for another. Without a compiler, `available()` is False (with one warning) and
"auto" attention uses XLA's einsums.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform as platform_lib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.ad_checkpoint import checkpoint_name

FORWARD, BACKWARD = "mmdit_cpu_attention_fwd", "mmdit_cpu_attention_bwd"
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
ARCH_ENV = "MMDIT_JAX_CPU_ARCH"  # the -march the kernel is built for (default native: this machine's CPU)


def _compiler() -> str | None:
  found = (shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)
  return next((path for path in found if path), None)


def _cpu_features() -> str:
  """What -march=native compiles for: the CPU's model and feature flags."""
  try:
    lines = epath.Path("/proc/cpuinfo").read_text().splitlines()
    keys = ("flags", "model name", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(keys)}))
  except OSError:
    return platform_lib.processor()


def build(cache_root: str, compiler: str) -> str:
  """The shared library built from `cpu_attention.cc` under `cache_root` (built once; an existing build
  with the same key is reused). The build goes to a temporary file renamed into place, so processes that
  build at once (the test suite's workers) never load a half-written file."""
  import jaxlib
  source = epath.Path(_SOURCE).read_bytes()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
  flags = (*_FLAGS, f"-march={os.environ.get(ARCH_ENV) or 'native'}")
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), " ".join(flags).encode(),
                                   "".join(version).encode(), _cpu_features().encode(),
                                   platform_lib.machine().encode()])).hexdigest()[:16]
  target = os.path.join(cache_root, f"cpu_attention-{key}.so")
  if os.path.exists(target):
    return target
  os.makedirs(cache_root, exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_root)
  os.close(fd)
  try:
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", partial]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"building the CPU attention kernel failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


@functools.cache
def library() -> str | None:
  """Builds (or finds) the kernel and registers its two FFI targets with XLA's CPU platform; the shared
  library's path, or None (with one warning) where it cannot be built."""
  from mmdit_jax import paths
  compiler = _compiler()
  if compiler is None:
    logging.warning("no C++ compiler ($CXX, g++, c++, clang++): attention 'cpu' and 'auto' use XLA's einsums on "
                    "the CPU, which are slower (docs/performance.md)")
    return None
  try:
    root = paths.cache_dir()  # a shared library is loaded from a local file: a gs:// cache builds in /tmp
    root = os.path.join(tempfile.gettempdir(), "mmdit_jax") if paths.is_remote(root) else str(root)
    path = build(os.path.join(root, "kernels"), compiler)
    lib = ctypes.cdll.LoadLibrary(path)
  except (OSError, RuntimeError) as e:
    logging.warning("the CPU attention kernel is not available, attention 'cpu' and 'auto' use XLA's einsums: %s",
                    e)
    return None
  jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.MmditCpuAttentionForward), platform="cpu")
  jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.MmditCpuAttentionBackward), platform="cpu")
  return path


def available() -> bool:
  return library() is not None


def supports(q, k, v) -> bool:
  """Whether the kernel takes these (B, S, H, K) operands: float32, K a multiple of 16."""
  return (all(x.dtype == jnp.float32 and x.ndim == 4 for x in (q, k, v)) and q.shape[-1] % 16 == 0
          and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:])


def _forward(q, k, v, scale):
  b, s, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                        jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
                              vmap_method="sequential")(q, k, v, scale=np.float32(scale))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
  return _forward(q, k, v, scale)[0]


# The name on the kernel's residuals (output and log-sum-exp, O(S) per head): remat policies that save
# matmuls save these too (model.stack), so the backward does not run the forward kernel again.
RESIDUALS = "attn_kernel_residuals"


def _attention_fwd(q, k, v, scale):
  out, lse = (checkpoint_name(x, RESIDUALS) for x in _forward(q, k, v, scale))
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, residuals, g):
  q, k, v, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")(q, k, v, out, lse, g.astype(jnp.float32),
                                                                      scale=np.float32(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, scale=None):
  """softmax(q·kᵀ · scale)·v for (B, S, H, K) float32 q, k, v (k, v may be longer: cross-attention);
  scale defaults to K^−0.5. Differentiable (the kernel's own backward). Raises where the kernel cannot be
  built or does not take these operands (`supports`); `auto` attention checks both first."""
  if not supports(q, k, v):
    raise ValueError(f"the CPU attention kernel takes float32 (B, S, H, K) q, k, v with K a multiple of 16; got "
                     f"{q.dtype} {q.shape}, {k.dtype} {k.shape}, {v.dtype} {v.shape}")
  if not available():
    raise RuntimeError("the CPU attention kernel could not be built (see the warning above); use attention 'xla'")
  return _attention(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))
