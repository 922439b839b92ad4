"""Pure-function view of the NNX models: abstract shapes, (sharded) init, apply, parameter counts, and
`forward`, the one way every caller (training, validation, sampling, FID) runs a backbone.

The graph definition of a model is a function of its frozen config alone (each config builds its own
module with `config.make(rngs)`), so `apply(config, params, …)` is a plain function of pytrees that
`jax.jit` can trace without NNX's per-call overhead.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from mmdit_jax.model.dit import DiTConfig
from mmdit_jax.model.mmdit import MMDiTConfig
from mmdit_jax.model.unet import UNetConfig


# The backbones by config.model.name: the config dataclass of each (its fields are the config's keys).
BACKBONES = {"mmdit": MMDiTConfig, "dit": DiTConfig, "unet": UNetConfig}


def backbone_config(name: str, **fields):
  """The frozen config of backbone `name` (a key of BACKBONES) with `fields`; errors list what is valid."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
  return BACKBONES[name](**fields)


def _construct(config, key):
  if not hasattr(config, "make"):
    raise TypeError(f"not a model config: {type(config).__name__} has no make(rngs)")
  with nnx.use_eager_sharding(False):
    return config.make(_host_counted_rngs(key))


class _HostCount(nnx.RngCount):
  """An RNG stream's call counter held as a NumPy value; every read is a fresh copy, because flax increments
  the counter in place and a traced fold_in keeps the array it was given, not its value at the call."""

  def get_value(self, **kwargs):
    value = super().get_value(**kwargs)
    return value.copy() if isinstance(value, np.ndarray) else value  # (traced inside nnx.split_rngs)


def _host_counted_rngs(key) -> nnx.Rngs:
  """nnx.Rngs(params=key) whose call counter lives on the host: the same keys (fold_in(key, 0, 1, …)), but
  a parameter's draw no longer stores a traced counter. Under a trace (eval_shape, a jitted init) flax
  compares the new counter's `.sharding` with the old one's, and a tracer's missing `.sharding` builds its
  error message by walking the whole trace so far: quadratic in the number of parameters. Imagen's 2B U-Net
  took 16.5 s to count its parameters, 1.4 s with this."""
  rngs = nnx.Rngs(params=key)
  rngs.params.count = _HostCount(np.zeros(rngs.params.count.shape, np.uint32), tag="params")
  return rngs


@functools.lru_cache(maxsize=64)
def _abstract(config):
  model = nnx.eval_shape(lambda: _construct(config, jax.random.key(0)))
  return nnx.split(model, nnx.Param)


def graphdef(config):
  return _abstract(config)[0]


def abstract_params(config):
  """nnx.State of ShapeDtypeStruct-backed Params (with logical axis metadata); allocates nothing."""
  return _abstract(config)[1]


def init_unjitted(config, key):
  """Parameters as a traceable function (for use inside a larger jitted init)."""
  return nnx.split(_construct(config, key), nnx.Param)[1]


init = jax.jit(init_unjitted, static_argnums=0)
init.__doc__ = "Parameters (an nnx.State of arrays), initialised in one compiled call."


def param_shardings(config, mesh, rules):
  """NamedShardings of the parameters on `mesh` under logical-axis `rules`."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_params(config))
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_sharded(config, key, mesh, rules):
  """Parameters initialised directly into their shardings: never materialised whole on one device."""
  shardings = param_shardings(config, mesh, rules)
  return jax.jit(lambda k: init_unjitted(config, k), out_shardings=shardings)(key)


def apply(config, params, *args, method: str = "__call__", **kwargs):
  """Runs the model of `config` with `params`; MM-DiT: (latents, t, context, pooled) → velocity.

  `method` names another entry point of the module (the autoencoder's "encode" and "decode").
  """
  model = nnx.merge(graphdef(config), params)
  return getattr(model, method)(*args, **kwargs)


# What a super-resolution stage (config.lowres_channels > 0) is conditioned on besides the text or label: the
# low-resolution image upsampled to the target size and noise-augmented, and its augmentation level (B,).
SR_FEATURES = ("lowres", "aug_level")


def features(config) -> tuple[str, ...]:
  """The conditioning features `forward` hands the backbone of `config` (required ones)."""
  return tuple(config.cond_features) + (SR_FEATURES if getattr(config, "lowres_channels", 0) else ())


def forward(config, params, z, t, cond: dict, **kwargs):
  """A backbone on z_t (B, h, w, C) at t (B,) with conditioning `cond` ({context, pooled} or {label}, and
  for a super-resolution stage {lowres, aug_level}): its prediction (B, h, w, C) in float32. kwargs reach
  the module (MM-DiT: skip_layers). Optional features a backbone names (U-Net: context_mask) pass if given."""
  need = features(config)
  missing = [k for k in need if k not in cond]
  if missing:
    raise ValueError(f"{type(config).__name__} is conditioned on {list(need)}; the batch "
                     f"lacks {missing} (has {sorted(cond)})")
  given = {k: cond[k] for k in (*need, *getattr(config, "optional_features", ())) if k in cond}
  return apply(config, params, z, t, given, **kwargs)


def param_count(config) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
