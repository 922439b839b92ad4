"""Multi-head attention: the kernels behind one signature, chosen by name, and the projection module.

Kernels take q, k, v (B, S, H, K) (k, v may be longer than q: cross-attention) → (B, S_q, H, K):
- "xla": a plain einsum/softmax (float32 logits, O(S²) memory); runs everywhere.
- "splash": Pallas splash attention for TPU (jax.experimental.pallas.ops.tpu.splash_attention): blockwise,
  the logits never whole in memory. Sequences are padded to the block sizes with segment ids that keep
  padding out of every real token's softmax; run per device under shard_map over the batch and head axes.
  Off TPU it runs in Pallas interpret mode (slow; for tests).
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- "dot_product": JAX picks.
- "cpu": a native CPU kernel (cpu_attention.cc, an XLA FFI custom call built at first use): blockwise, on the
  (B, S, H, K) arrays, float32; on the CPU its forward takes a third to a half of xla's time, forward and
  backward two thirds (docs/performance.md). Run per device under shard_map on a mesh. Where it does not
  apply (another platform, other dtypes, a head dimension off 16, no C++ compiler) it is xla.
- "auto": splash on TPU, cuDNN on GPU for bf16/fp16 inputs, "cpu" on the CPU (decided when traced, from the
  devices of the mesh in use — a TPU topology compiled from a CPU machine gets splash).
Joint text+image attention (MM-DiT), QK-norm, MMDiT-X's second attention and skip-layer guidance all sit
outside the kernel, so every kernel serves them alike. Sequence parallelism (a 'sequence' mesh axis) is
Ulysses-style: see heads_layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.ad_checkpoint import checkpoint_name

from mmdit_jax.model import layers
from mmdit_jax.model.layers import constrain, dense


def xla_attention(q, k, v):
  return biased_attention(q, k, v)


def biased_attention(q, k, v, bias=None, scale=None):
  """Attention with an additive logit bias (B|1, H|1, S, S): causal or padding masks (−inf where
  masked), T5's relative position bias. `scale` defaults to K^−0.5 (T5 uses 1).

  The products run head-major, (B, H, S, K), with the layout changes outside them: XLA's CPU backend runs
  the (B, S, H, K) einsums of the same maths 2.3× slower in the forward (14.5 against 6.3 ms for B 4, H 4,
  S 333, K 64 on one core; docs/performance.md). TPU and GPU compilers assign their own layouts either way."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  logits = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32) * scale  # (B, H, S, S)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqs,bhsk->bhqk", probs, v), 1, 2)


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def dot_product_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v)


def _pad_seq(x, to):
  return jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0)))


def splash_attention(q, k, v, *, block_q: int = 512, block_kv: int = 512):
  """Pallas splash attention (see the module docstring). Block sizes are capped at the padded lengths."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  sq, skv, d = q.shape[1], k.shape[1], q.shape[-1]
  bq, bkv = min(block_q, -(-sq // 128) * 128), min(block_kv, -(-skv // 128) * 128)
  pq, pkv = -(-sq // bq) * bq, -(-skv // bkv) * bkv
  q = _pad_seq(q * jnp.asarray(d ** -0.5, q.dtype), pq)
  k, v = _pad_seq(k, pkv), _pad_seq(v, pkv)
  segments = splash.SegmentIds(q=(jnp.arange(pq) < sq).astype(jnp.int32),
                               kv=(jnp.arange(pkv) < skv).astype(jnp.int32))
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  interpret = layers.platform() != "tpu"  # (a TPU topology compiled from a CPU machine is TPU)

  def local(q, k, v):  # this device's (B, S, H, K) blocks
    mask = splash.MultiHeadMask([splash.FullMask((pq, pkv))] * q.shape[2])
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(functools.partial(kernel, segment_ids=segments))(heads_first(q), heads_first(k), heads_first(v))
    return heads_first(out)

  return _per_device(local, q, k, v)[:, :sq]


def _per_device(local, q, k, v):
  """`local` (a kernel of one device's (B, S, H, K) blocks) on each device of the mesh in use, over the batch
  and head axes (shard_map); called directly without a mesh or logical axis rules."""
  mesh, rules = layers.mesh_in_use(), dict(flax_spmd.get_logical_axis_rules() or ())
  if mesh is None or not rules:
    return local(q, k, v)
  spec = jax.sharding.PartitionSpec(rules.get("act_batch"), None, rules.get("act_attn_heads"), None)
  run = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return run(q, k, v)


def cpu_attention(q, k, v):
  """The native CPU kernel (mmdit_jax.model.cpu_attention) where it applies, else xla (module docstring)."""
  from mmdit_jax.model import cpu_attention as native
  if layers.platform() != "cpu" or not native.supports(q, k, v) or not native.available():
    return xla_attention(q, k, v)
  return _per_device(native.attention, q, k, v)


def auto_attention(q, k, v, **blocks):
  kind = layers.platform()
  if kind == "tpu":
    return splash_attention(q, k, v, **blocks)
  if kind == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return cudnn_attention(q, k, v)
  return cpu_attention(q, k, v)


ATTENTION_IMPLS = {
    "xla": xla_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
    "dot_product": dot_product_attention,
    "cpu": cpu_attention,
    "auto": auto_attention,
}
_TAKES_BLOCKS = ("splash", "auto")


def check_blocks(block_q: int, block_kv: int):
  if block_q % 128 or block_kv % 128 or block_q <= 0 or block_kv <= 0:
    raise ValueError(f"splash block sizes ({block_q}, {block_kv}) must be positive multiples of 128")


def get_attention(name: str, block_q: int = 512, block_kv: int = 512):
  """The kernel `name` (splash's block sizes for "splash" / "auto"), its output tagged "attn_out" (for
  remat "names" / "offload")."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; valid: {sorted(ATTENTION_IMPLS)}")
  check_blocks(block_q, block_kv)
  impl = ATTENTION_IMPLS[name]
  if name in _TAKES_BLOCKS:
    impl = functools.partial(impl, block_q=block_q, block_kv=block_kv)

  def attend(q, k, v):
    q, k, v = (heads_layout(x) for x in (q, k, v))
    return checkpoint_name(heads_layout(impl(q, k, v)), "attn_out")
  return attend


def heads_layout(x):
  """(B, S, H, K) laid out for attention: the whole sequence on each device, heads split over
  'act_attn_heads' (default: tensor × sequence). With a sequence axis this is Ulysses-style sequence
  parallelism — the layers around attention hold S / n tokens, attention holds H / n heads of all S, and
  GSPMD turns each re-layout into an all-to-all; without one, heads stay split over tensor as before."""
  return constrain(x, "act_batch", None, "act_attn_heads", None)


class Attention(nnx.Module):
  """q, k, v projections (with optional RMSNorm on q and k) of one stream, and the output projection."""

  def __init__(self, d, heads, rngs, *, dtype, qk_norm=False, out=True, kv_dim=None, inner=None):
    """d: the stream's width; kv_dim: the width keys and values are projected from (cross-attention);
    inner: the width of the heads (H·K), d unless given."""
    self.heads = heads
    inner = inner or d
    self.q = dense(d, inner, ("embed", "heads"), rngs, dtype=dtype)
    self.k = dense(kv_dim or d, inner, ("embed", "heads"), rngs, dtype=dtype)
    self.v = dense(kv_dim or d, inner, ("embed", "heads"), rngs, dtype=dtype)
    head_dim = inner // heads
    self.q_norm = layers.RMSNorm(head_dim, rngs) if qk_norm else None
    self.k_norm = layers.RMSNorm(head_dim, rngs) if qk_norm else None
    self.out = dense(inner, d, ("heads", "embed"), rngs, dtype=dtype) if out else None

  def _split(self, y):
    b, n, d = y.shape
    return constrain(y.reshape(b, n, self.heads, d // self.heads), "act_batch", "act_seq", "act_heads", None)

  def qkv(self, x, context=None):
    """(q, k, v), each (B, N, H, K); k and v from `context` for cross-attention."""
    kv = x if context is None else context
    q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return tuple(checkpoint_name(a, "qkv") for a in (q, k, v))  # (names for remat "names" / "offload")

  def __call__(self, x, attend, context=None):
    """Self-attention of x, or cross-attention from x to `context`; output projected, (B, N, D)."""
    o = attend(*self.qkv(x, context))  # (B, N, H, K)
    return self.out(o.reshape(*x.shape[:-1], -1))
