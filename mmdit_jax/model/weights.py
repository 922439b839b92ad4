"""Weights in and out: safetensors files → {name: array}, and {our path: array} → sharded parameters.

Shared by every converter (MM-DiT from diffusers, the encoders from transformers/diffusers, Inception):
each is then only a name map, and every tensor must be used exactly once or the conversion fails naming
the unknown, missing or mis-shaped tensors.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import safe_open

from mmdit_jax import paths
from mmdit_jax.errors import UserError
from mmdit_jax.model import api


class ConversionError(UserError):
  """A checkpoint that does not fit the model: names the offending tensors."""


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
  """All tensors of a .safetensors file or a directory of them (float32 numpy), plus config.json if any.
  Remote weights (gs://) are read from their bucket's mount, or copied once into the local cache."""
  if paths.is_remote(path) and not epath.Path(path).is_dir():  # a single file: bring its config.json too
    config = epath.Path(path).parent / "config.json"
    path = paths.local_copy(path, paths.cache_dir())
    if config.exists():
      paths.local_copy(config, paths.cache_dir())
  path = epath.Path(paths.local_copy(path, paths.cache_dir()))
  if path.is_dir():
    files = sorted(path.glob("*.safetensors"))
    config_path = path / "config.json"
  else:
    files = [path]
    config_path = path.parent / "config.json"
  if not files or not all(f.is_file() for f in files):
    raise ConversionError(f"no .safetensors weights at {path}")
  tensors = {}
  for f in files:
    with safe_open(str(f), framework="flax") as handle:  # the flax reader understands bfloat16
      for name in handle.keys():
        tensors[name] = np.asarray(handle.get_tensor(name), dtype=np.float32)
  config = json.loads(config_path.read_text()) if config_path.is_file() else {}
  return tensors, config


def need(tensors, name):
  """tensors[name], or a ConversionError naming the missing tensor."""
  if name not in tensors:
    raise ConversionError(f"checkpoint lacks tensor {name!r}")
  return tensors[name]


def check_all_used(tensors: dict, used: set):
  """Fails naming the checkpoint tensors that no parameter took."""
  unknown = sorted(set(tensors) - used)
  if unknown:
    raise ConversionError(f"{len(unknown)} checkpoint tensors have no place in the model: {unknown[:20]}")


def fill_params(cfg, flat: dict, shardings=None):
  """An nnx.State of `cfg`'s parameters from {path tuple: array}; names missing or mis-shaped paths.

  With `shardings` (api.param_shardings), each tensor goes straight to its shards, so a large encoder is
  never whole on one device.
  """
  abstract = nnx.to_flat_state(api.abstract_params(cfg))
  expected_paths = {path: var.shape for path, var in abstract}
  missing = sorted(map(str, set(expected_paths) - set(flat)))
  if missing:
    raise ConversionError(f"checkpoint lacks parameters for: {missing[:20]}")
  wrong = [f"{p}: checkpoint {flat[p].shape} vs model {expected_paths[p]}" for p in expected_paths
           if flat[p].shape != expected_paths[p]]
  if wrong:
    raise ConversionError("shape mismatch: " + "; ".join(wrong[:20]))
  state = api.abstract_params(cfg)
  where = {path: (v.get_value() if isinstance(v, nnx.Variable) else v)
           for path, v in nnx.to_flat_state(shardings)} if shardings is not None else {}
  pure = {}
  for path, value in flat.items():
    node = pure
    for k in path[:-1]:
      node = node.setdefault(k, {})
    value = np.asarray(value, np.float32)
    node[path[-1]] = jax.device_put(value, where[path]) if path in where else jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  return state


