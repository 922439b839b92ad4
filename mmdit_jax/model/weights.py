"""Weights in and out: safetensors files → {name: array}, and {our path: array} → sharded parameters.

Shared by every converter (MM-DiT from diffusers, the encoders from transformers/diffusers, Inception):
each is then only a name map, and every tensor must be used exactly once or the conversion fails naming
the unknown, missing or mis-shaped tensors.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

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


class Derived(Mapping):
  """{name: value computed on access} — a lazy renaming/reshaping of another lazy mapping. `shapes`, when
  known ({name: shape}, from the file's header), answer `shape_of` without reading a tensor."""

  def __init__(self, thunks: dict, shapes: dict | None = None):
    self.thunks, self.shapes = thunks, shapes or {}

  def __getitem__(self, name):
    return self.thunks[name]()

  def __iter__(self):
    return iter(self.thunks)

  def __len__(self):
    return len(self.thunks)

  def __contains__(self, name):
    return name in self.thunks


# Dtypes safetensors' readers cannot give as arrays (SD3's t5xxl_fp8 files): read from their bytes.
_RAW_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(file: str, name: str) -> np.ndarray:
  """One tensor from the file's header offsets (the safetensors format: u64 header size, JSON header)."""
  import ml_dtypes
  with epath.Path(file).open("rb") as f:
    size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(size))[name]
    start, stop = entry["data_offsets"]
    f.seek(8 + size + start)
    data = f.read(stop - start)
  dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[entry["dtype"]]))
  return np.frombuffer(data, dtype).reshape(entry["shape"]).astype(np.float32)


def _read_tensor(file: str, name: str) -> np.ndarray:
  with safe_open(file, framework="flax") as handle:  # the flax reader understands bfloat16
    if handle.get_slice(name).get_dtype() in _RAW_DTYPES:
      return _read_raw(file, name)
    return np.array(handle.get_tensor(name), dtype=np.float32)  # (a host copy: the reader's buffer goes)


def lazy_tensors(files) -> Derived:
  """{name: float32 numpy} over safetensors files, each tensor read from disk when indexed (and not kept):
  a converter that takes tensors one at a time never holds the checkpoint in host memory."""
  thunks, shapes = {}, {}
  for f in files:
    with safe_open(str(f), framework="flax") as handle:
      for name in handle.keys():
        thunks[name] = functools.partial(_read_tensor, str(f), name)
        shapes[name] = tuple(handle.get_slice(name).get_shape())
  return Derived(thunks, shapes)


def shape_of(tensors, name) -> tuple:
  """tensors[name].shape, from the file header where the mapping is lazy (nothing is read)."""
  require(tensors, name)
  if isinstance(tensors, Derived) and name in tensors.shapes:
    return tensors.shapes[name]
  return tuple(np.shape(tensors[name]))


def select(tensors, keep) -> Mapping:
  """The tensors whose names pass `keep`, still lazy if `tensors` is (nothing is read)."""
  if isinstance(tensors, Derived):
    names = [k for k in tensors.thunks if keep(k)]
    return Derived({k: tensors.thunks[k] for k in names}, {k: tensors.shapes[k] for k in names if k in tensors.shapes})
  return {k: v for k, v in tensors.items() if keep(k)}


class Deferred:
  """A parameter read when it is placed: `load()` gives the whole array; `Deferred.stack(parts)` is a
  scanned stack of per-layer parts, of which each shard reads only its own layers."""

  def __init__(self, load, layers=None, shape=None):
    self.load_all, self.layers, self.known_shape = load, layers, shape

  @classmethod
  def stack(cls, parts, layer_shape=None):
    return cls(None, layers=parts, shape=None if layer_shape is None else (len(parts), *layer_shape))

  @property
  def shape(self):
    if self.known_shape is not None:
      return self.known_shape
    if self.layers is None:
      return np.shape(self.load_all())
    return (len(self.layers),) + np.shape(self.layers[0]())

  def load(self, index=None):
    """The array, or its block at `index` (a tuple of slices, as jax.make_array_from_callback passes)."""
    if self.layers is None:
      full = np.asarray(self.load_all(), np.float32)
      return full if index is None else full[index]
    rows = range(len(self.layers)) if index is None else range(*index[0].indices(len(self.layers)))
    rest = () if index is None else tuple(index[1:])
    out = None
    for j, i in enumerate(rows):  # one full layer tensor on the host at a time
      block = np.asarray(self.layers[i](), np.float32)[rest]
      if out is None:
        out = np.empty((len(rows),) + block.shape, np.float32)
      out[j] = block
      del block
    return out


def place(value: Deferred, shape, sharding) -> jax.Array:
  """A global array of `sharding` from a Deferred, one device's block on the host at a time (a block that
  several devices hold, e.g. replicated, is read once for them)."""
  arrays, last_key, block = [], None, None
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key != last_key:
      block, last_key = None, key
      block = value.load(index)
    arrays.append(jax.device_put(block, device))
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def load_safetensors(path, lazy: bool = False) -> tuple[Mapping, dict]:
  """All tensors of a .safetensors file or a directory of them (float32 numpy), plus config.json if any;
  with lazy, a mapping that reads each tensor when it is used. Remote weights (gs://) are read from
  their bucket's mount, or copied once into the local cache."""
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
  if lazy:
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return lazy_tensors(files), config
  tensors = {}
  for f in files:
    with safe_open(str(f), framework="flax") as handle:
      names = list(handle.keys())
    for name in names:
      tensors[name] = _read_tensor(str(f), name)
  config = json.loads(config_path.read_text()) if config_path.is_file() else {}
  return tensors, config


def require(tensors, *names):
  """A ConversionError naming the first of `names` missing from tensors (nothing is read)."""
  for name in names:
    if name not in tensors:
      raise ConversionError(f"checkpoint lacks tensor {name!r}")


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
           if tuple(flat[p].shape) != tuple(expected_paths[p])]
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
    if isinstance(value, Deferred) and path in where:  # each shard reads only its block
      node[path[-1]] = place(value, expected_paths[path], where[path])
      continue
    value = value.load() if isinstance(value, Deferred) else np.asarray(value, np.float32)
    node[path[-1]] = jax.device_put(value, where[path]) if path in where else jnp.asarray(value)
    del value  # (one parameter on the host at a time)
  nnx.replace_by_pure_dict(state, pure)
  return state


