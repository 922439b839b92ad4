"""Pure-function view of the NNX models: abstract shapes, (sharded) init, apply, parameter counts.

The graph definition of a model is a function of its frozen config alone, so `apply(config, params, …)`
is a plain function of pytrees that `jax.jit` can trace without NNX's per-call overhead.
"""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from mmdit_jax.model.dit import DiT, DiTConfig
from mmdit_jax.model.mmdit import MMDiT, MMDiTConfig


@functools.cache
def model_classes() -> dict:
  """Config type → NNX module: the backbones and the frozen encoders (imported here, not at the top,
  because the encoders build on model.layers)."""
  from mmdit_jax.encoders import clip, inception, t5, vae
  return {MMDiTConfig: MMDiT, DiTConfig: DiT, clip.CLIPTextConfig: clip.CLIPText,
          t5.T5Config: t5.T5Encoder, vae.VAEConfig: vae.AutoencoderKL,
          inception.InceptionConfig: inception.FIDInception}


def _model_class(config):
  classes = model_classes()
  if type(config) not in classes:
    raise TypeError(f"not a model config: {type(config).__name__}; valid: "
                    f"{[c.__name__ for c in classes]}")
  return classes[type(config)]


def _construct(config, key):
  with nnx.use_eager_sharding(False):
    return _model_class(config)(config, nnx.Rngs(params=key))


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


def logical_specs(config):
  """PartitionSpecs of the parameters in logical axis names."""
  return nnx.get_partition_spec(abstract_params(config))


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


def param_count(config) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
