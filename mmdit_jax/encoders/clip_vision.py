"""The CLIP image tower (OpenAI ViT-L/14, OpenCLIP ViT-bigG/14 shapes) for CLIP score and CMMD.

A pre-LN ViT: 14×14 patches (a bias-free convolution), a class token, learned positions, a LayerNorm
before the layers ("pre_layrnorm", transformers' spelling), the class token's state through the final
LayerNorm and the (bias-free) visual projection → the image embedding. Module names follow transformers'
CLIPVisionModelWithProjection, so the converter is a name map; the layers are the text tower's
(encoders.clip.CLIPLayer), scanned.

`embed_images` takes the project's images ((B, H, W, 3) in [−1, 1]) through CLIP's preprocessing (bicubic
resize of the shorter side to the tower's size, centre crop, CLIP's mean/std) and returns the embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.encoders.clip import CLIPLayer, check_layer_fields
from mmdit_jax.model import layers
from mmdit_jax.model.layers import constrain, dense, get_dtype
from mmdit_jax.model.stack import Stack

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_width: int = 4096
  activation: str = "quick_gelu"  # key of clip.ACTIVATIONS: quick_gelu (OpenAI) | gelu (OpenCLIP)
  projection_dim: int = 768
  eps: float = 1e-5
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def make(self, rngs: nnx.Rngs) -> "CLIPVision":
    return CLIPVision(self, rngs)

  def __post_init__(self):
    check_layer_fields(self)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig.image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


CLIP_VIT_L14 = CLIPVisionConfig()  # openai/clip-vit-large-patch14
CLIP_VIT_L14_336 = CLIPVisionConfig(image_size=336)  # openai/clip-vit-large-patch14-336 (CMMD's tower)
CLIP_VIT_BIGG14 = CLIPVisionConfig(width=1664, depth=48, num_heads=16, mlp_width=8192, activation="gelu",
                                   projection_dim=1280)  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k


class CLIPVision(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.class_embedding = nnx.Param(nnx.with_partitioning(init, ("embed",))(
        rngs.params(), (cfg.width,), jnp.float32))
    self.patch_embedding = nnx.Conv(
        3, cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID", use_bias=False,
        param_dtype=jnp.float32, kernel_init=nnx.with_partitioning(init, (None, None, None, "embed")), rngs=rngs)
    self.position_embedding = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(
        rngs.params(), (cfg.num_positions, cfg.width), jnp.float32))
    self.pre_layrnorm = layers.LayerNorm(cfg.width, rngs, eps=cfg.eps)
    self.layers = Stack(lambda r: CLIPLayer(cfg, r), cfg.depth, rngs)
    self.post_layernorm = layers.LayerNorm(cfg.width, rngs, eps=cfg.eps)
    self.visual_projection = dense(cfg.width, cfg.projection_dim, ("embed", None), rngs, bias=False)

  def __call__(self, pixels):
    """CLIP-normalised pixels (B, S, S, 3), S = image_size → image embeddings (B, projection_dim), float32."""
    cfg = self.cfg
    b, h, w, _ = pixels.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"CLIP vision takes {cfg.image_size}² pixels, got {h}×{w} (embed_images resizes)")
    x = self.patch_embedding(pixels.astype(jnp.float32)).reshape(b, -1, cfg.width)  # (B, N, D)
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
    x = constrain(self.pre_layrnorm(x).astype(get_dtype(cfg.dtype)), "act_batch", "act_seq", "act_embed")
    x, _ = self.layers(x, None)
    pooled = self.post_layernorm(x[:, 0]).astype(jnp.float32)
    return self.visual_projection(pooled)


def preprocess(images, image_size: int):
  """Images (B, H, W, 3) in [−1, 1] → CLIP's input: the shorter side resized (bicubic) to `image_size`,
  centre-cropped square, normalised by CLIP's mean and std."""
  images = (jnp.asarray(images, jnp.float32) + 1) / 2
  b, h, w, c = images.shape
  scale = image_size / min(h, w)
  nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
  if (nh, nw) != (h, w):
    images = jax.image.resize(images, (b, nh, nw, c), "bicubic", antialias=True)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  images = images[:, top:top + image_size, left:left + image_size]
  return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def embed_images(cfg: CLIPVisionConfig, params, images):
  """The project's images ((B, H, W, 3) in [−1, 1]) → CLIP image embeddings (B, projection_dim)."""
  from mmdit_jax.model import api
  return api.apply(cfg, params, preprocess(images, cfg.image_size))
