"""Backbones (Flax NNX) behind pure functions: MM-DiT, the DiT family, SD3's comparison baselines and
Imagen's U-Nets."""

from mmdit_jax.model.api import (
    BACKBONES,
    SR_FEATURES,
    abstract_params,
    apply,
    backbone_config,
    features,
    forward,
    graphdef,
    init,
    init_sharded,
    init_unjitted,
    param_count,
    param_shardings,
)
from mmdit_jax.model.attention import ATTENTION_IMPLS
from mmdit_jax.model.convert import from_diffusers, infer_config
from mmdit_jax.model.dit import DIT_SIZES, DiTConfig, dit_config
from mmdit_jax.model.flops import forward_flops, train_flops
from mmdit_jax.model.mmdit import MMDiTConfig
from mmdit_jax.model.unet import IMAGEN_PARAMS, IMAGEN_UNETS, UNetConfig, imagen_unet
from mmdit_jax.model.weights import ConversionError
