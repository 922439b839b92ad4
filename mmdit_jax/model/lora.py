"""LoRA (Hu et al. 2021) on any backbone's linear layers, as a function of parameter trees.

An adapter of rank r on a kernel W (…, in, out) is a pair A (…, in, r), B (…, r, out) with B = 0 at the
start; the adapted layer computes x·W + (alpha / r)·dropout(x)·A·B. Here the delta is added to the weight
instead — `merge(base, adapters)` returns the base tree with W + (alpha / r)·A·B — so the model's own code
runs unchanged under every remat policy, layer scan, attention kernel and mesh, and gradients reach only A
and B (the base is a constant of the step). Dropout in the merged form drops input features of A for the
whole step (one mask per step and layer), which is what a weight delta can express: PEFT drops them per
token. Leading axes (a scanned stack's layer axis) are batch axes of the adapter.

Adapters are a nested dict mirroring the modules' paths: {"stages": {"0": {"layers": {"img": {"attn": {"q":
{"lora_a": A, "lora_b": B}}}}}}}; `flat(adapters)` gives {("stages", "0", …, "q"): {"lora_a", "lora_b"}}.

The frozen base may be held in bfloat16 or int8 (per output channel absmax scales) to save memory:
`freeze(base, dtype)` → {"weights", "scales"}, `thaw(frozen)` → float32 weights again.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

# Target groups by name (module paths of MM-DiT and DiT; a target that is no group is a regular expression
# searched in the module path, e.g. "img/attn/(q|v)$"). SD3 §5.3 (DPO): rank 128 on all linear layers.
TARGET_GROUPS = {
    "attn": r"(^|/)attn2?/(q|k|v|out)$",  # attention q/k/v/out of both streams (and MMDiT-X's second attention)
    "mlp": r"(^|/)mlp/fc[12]$",
    "mod": r"(^|/)mod$|^norm_out$|(^|/)adaLN[^/]*$",  # adaLN(-Zero) modulation
    "context_embedder": r"^context_embedder(/|$)",
    "embedders": r"^(t_embedder|y_embedder|context_embedder)(/|$)",
    "all_linear": r".",
}
BASE_DTYPES = ("float32", "bfloat16", "int8")
_WEIGHT = ("kernel",)


def patterns(targets) -> tuple[str, ...]:
  """Regular expressions of `targets` (group names or expressions); a bad expression names itself."""
  out = []
  for t in targets:
    p = TARGET_GROUPS.get(t, t)
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"LoRA target {t!r} is neither a group {sorted(TARGET_GROUPS)} nor a regular "
                       f"expression ({e})") from None
    out.append(p)
  return tuple(out)


def _module_path(keypath) -> tuple[str, ...] | None:
  """The module path of a linear kernel's key path (…, "kernel"[, "value"]), else None."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
  if names and names[-1] == "value":
    names = names[:-1]
  if len(names) < 2 or names[-1] != "kernel":
    return None
  return tuple(names[:-1])


def targeted(abstract_params, targets) -> dict:
  """{module path: kernel shape} of the linear kernels (…, in, out) the targets match; errors name what exists."""
  regexes = [re.compile(p) for p in patterns(targets)]
  found, linears = {}, []
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    path = _module_path(keypath)
    if path is None or len(leaf.shape) < 2:
      continue
    name = "/".join(path)
    linears.append(name)
    if any(r.search(name) for r in regexes):
      found[path] = tuple(leaf.shape)
  if not found:
    raise ValueError(f"LoRA targets {list(targets)} match no linear layer; the model's are {linears[:12]}"
                     f"{' …' if len(linears) > 12 else ''} (groups: {sorted(TARGET_GROUPS)})")
  return found


def init(abstract_params, targets, rank: int, key) -> dict:
  """Fresh adapters: A ~ N(0, 1/in) (PEFT's Kaiming-like scale), B = 0, so the adapted model starts as the base."""
  shapes = targeted(abstract_params, targets)
  flat = {}
  for i, (path, shape) in enumerate(sorted(shapes.items())):
    *lead, d_in, d_out = shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32) / math.sqrt(d_in)
    flat[path] = {"lora_a": a, "lora_b": jnp.zeros((*lead, rank, d_out), jnp.float32)}
  return unflat(flat)


def flat(adapters) -> dict:
  """{module path tuple: {"lora_a", "lora_b"}} of a nested adapter dict."""
  f = traverse_util.flatten_dict(adapters)
  out = {}
  for k, v in f.items():
    out.setdefault(k[:-1], {})[k[-1]] = v
  return out


def unflat(flat_adapters) -> dict:
  return traverse_util.unflatten_dict({(*p, name): v for p, ab in flat_adapters.items() for name, v in ab.items()})


def rank_of(adapters) -> int:
  return int(next(iter(flat(adapters).values()))["lora_a"].shape[-1])


def delta(a, b, scale: float, mask=None):
  """scale · A·B (…, in, out) in float32; `mask` (…, in) drops input features (dropout in the merged form)."""
  if mask is not None:
    a = a * mask[..., None]
  return scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def merge(base, adapters, scale: float, *, dropout: float = 0.0, key=None):
  """The base parameters with every adapted kernel W replaced by W + scale·A·B (in W's dtype). With dropout
  and a key, each adapter's input features are dropped at rate `dropout` (rescaled by 1/(1 − rate))."""
  by_path = flat(adapters)
  missing = set(by_path)
  counter = iter(range(1 << 30))

  def one(keypath, w):
    path = _module_path(keypath)
    if path is None or path not in by_path:
      return w
    missing.discard(path)
    ab = by_path[path]
    mask = None
    if dropout > 0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, next(counter)), 1 - dropout, ab["lora_a"].shape[:-1])
      mask = keep.astype(jnp.float32) / (1 - dropout)
    return (w.astype(jnp.float32) + delta(ab["lora_a"], ab["lora_b"], scale, mask)).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(one, base)
  if missing:
    raise ValueError(f"adapters for {sorted('/'.join(p) for p in missing)[:6]} have no kernel in the base "
                     "parameters (adapters from another model?)")
  return out


def _kernel_shardings(param_shardings) -> dict:
  """{module path: NamedSharding} of the linear kernels in a tree of parameter shardings."""
  from jax.sharding import NamedSharding
  leaves = jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  return {path: s for keypath, s in leaves if (path := _module_path(keypath)) is not None}


def shardings(adapters_abstract, param_shardings) -> dict:
  """Adapter shardings from their kernels': A (…, in, r) keeps W's input-axis sharding and B (…, r, out) its
  output-axis one; the rank axis of each takes the mesh axes of W's other axis where r divides by their size,
  so A and B are split over the same devices as W (FSDP shards adapters too). Leading (layer) axes follow W's."""
  from jax.sharding import NamedSharding, PartitionSpec
  kernels = _kernel_shardings(param_shardings)
  out = {}
  for path, ab in flat(adapters_abstract).items():
    s = kernels[path]
    spec = tuple(s.spec) + (None,) * (ab["lora_a"].ndim - len(s.spec))
    *lead, s_in, s_out = spec
    rank = ab["lora_a"].shape[-1]

    def fits(axes):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return axes if names and rank % math.prod(s.mesh.shape[n] for n in names) == 0 else None

    out[path] = {"lora_a": NamedSharding(s.mesh, PartitionSpec(*lead, s_in, fits(s_out))),
                 "lora_b": NamedSharding(s.mesh, PartitionSpec(*lead, fits(s_in), s_out))}
  return unflat(out)


# ── The frozen base, optionally in bfloat16 or int8 ──

def freeze(base, dtype: str = "float32") -> dict:
  """{"weights": base in `dtype`, "scales": {…} (int8: per output channel, for every kernel)}."""
  if dtype not in BASE_DTYPES:
    raise ValueError(f"LoRA base dtype {dtype!r}; valid: {list(BASE_DTYPES)}")
  if dtype == "float32":
    return {"weights": base, "scales": {}}
  if dtype == "bfloat16":
    cast = lambda w: w.astype(jnp.bfloat16) if jnp.issubdtype(w.dtype, jnp.floating) else w
    return {"weights": jax.tree.map(cast, base), "scales": {}}
  scales = {}

  def quantize(keypath, w):
    path = _module_path(keypath)
    if path is None or w.ndim < 2:
      return w
    s = jnp.maximum(jnp.max(jnp.abs(w), axis=-2, keepdims=True), 1e-12) / 127.0  # (…, 1, out)
    scales["/".join(path)] = s.astype(jnp.float32)
    return jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8)

  return {"weights": jax.tree_util.tree_map_with_path(quantize, base), "scales": scales}


def thaw(frozen) -> object:
  """The frozen base's weights in float32 (int8 kernels dequantized)."""
  scales = frozen["scales"]

  def one(keypath, w):
    path = _module_path(keypath)
    if path is not None and "/".join(path) in scales:
      return w.astype(jnp.float32) * scales["/".join(path)]
    return w.astype(jnp.float32) if jnp.issubdtype(w.dtype, jnp.floating) else w

  return jax.tree_util.tree_map_with_path(one, frozen["weights"])


def frozen_shardings(frozen_abstract, param_shardings):
  """Shardings of freeze()'s output: weights like the parameters, int8 scales (…, 1, out) like their kernels
  with the input axis replicated."""
  from jax.sharding import NamedSharding, PartitionSpec
  by_name = {"/".join(path): s for path, s in _kernel_shardings(param_shardings).items()}
  scales = {}
  for name, a in frozen_abstract["scales"].items():
    s = by_name[name]
    spec = tuple(s.spec) + (None,) * (a.ndim - len(s.spec))
    scales[name] = NamedSharding(s.mesh, PartitionSpec(*spec[:-2], None, spec[-1]))
  return {"weights": param_shardings, "scales": scales}
