"""OpenCLIP's checkpoint layout (open_clip_model.safetensors, e.g. LAION's ViT-bigG/14 and ViT-L/14, with the
open_clip_config.json beside it), read as transformers' CLIPModel.

The towers are transformers' under other names: q/k/v packed in one `in_proj`, the projections stored
(in, out). `as_transformers` renames the tensors lazily and turns open_clip_config.json into the
config.json entries the CLIP converters (encoders.convert) read. Without that file the converters infer the
config from the shapes (OpenCLIP's defaults: GELU, 64-wide heads, bigG's 104-wide vision heads).
"""

from __future__ import annotations

import json
import re

import numpy as np
from etils import epath

from mmdit_jax.model.weights import ConversionError, Derived, shape_of

CONFIG = "open_clip_config.json"
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection.weight": "text_projection.weight"}  # text_projection as an nn.Linear (no bias)
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# A residual block's tensor: (visual.)transformer.resblocks.<i>.<module>.weight|bias, or attn.in_proj_weight|bias.
_BLOCK_TENSOR = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
_SKIPPED = ("logit_scale", "logit_bias", "attn_mask")  # the contrastive loss's scalars, a buffer
# open_clip_config.json options that change the computation in ways these towers do not implement.
_UNSUPPORTED = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                "final_ln_after_pool": False, "pool_type": ("tok", "argmax"), "embed_cls": False,
                "no_causal_mask": False, "proj_bias": False, "timm_model_name": None,
                "hf_model_name": None, "pos_embed_type": "learnable", "act_kwargs": None,
                "norm_kwargs": None, "output_tokens": False}


def is_open_clip(tensors) -> bool:
  """Whether a checkpoint is in OpenCLIP's layout (and not also in transformers')."""
  return (not any(k.startswith(("vision_model.", "text_model.")) for k in tensors)
          and any(k.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")) for k in tensors))


def renamed(tensors) -> Derived:
  """An OpenCLIP checkpoint's tensors under transformers' CLIPModel names (nothing is read)."""
  thunks, shapes, unknown = {}, {}, []

  def put(new, old, fn=lambda x: x, shape=None):
    thunks[new] = lambda: fn(tensors[old])
    shapes[new] = shape if shape is not None else shape_of(tensors, old)

  for name in tensors:
    if name in _SKIPPED:
      continue
    block = _BLOCK_TENSOR.fullmatch(name)
    if name in _TOP:
      put(_TOP[name], name)
    elif name in _TRANSPOSED:
      put(_TRANSPOSED[name], name, np.transpose, shape_of(tensors, name)[::-1])
    elif block and block[3] in _BLOCK and name.endswith("." + block[4]):
      tower = "vision_model" if block[1] else "text_model"
      put(f"{tower}.encoder.layers.{block[2]}.{_BLOCK[block[3]]}.{block[4]}", name)
    elif block and block[3] == "attn.in_proj" and name.endswith("_" + block[4]):
      tower = "vision_model" if block[1] else "text_model"
      shape = shape_of(tensors, name)
      width = shape[0] // 3
      for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # torch MultiheadAttention packs q, k, v
        put(f"{tower}.encoder.layers.{block[2]}.self_attn.{proj}.{block[4]}", name,
            lambda x, i=i, w=width: x[i * w:(i + 1) * w], (width, *shape[1:]))
    else:
      unknown.append(name)
  if unknown:
    raise ConversionError(f"{len(unknown)} OpenCLIP tensors have no place in the CLIP towers (a variant they do "
                          f"not implement: layer scale, attentional pooling, a timm or HF tower…): {unknown[:10]}")
  return Derived(thunks, shapes)


def config_json(path, tensors) -> dict:
  """transformers-style config.json entries for an OpenCLIP checkpoint, from its open_clip_config.json."""
  path = epath.Path(path)
  file = (path if path.is_dir() else path.parent) / CONFIG
  model = json.loads(file.read_text()).get("model_cfg", {}) if file.is_file() else {}
  vision, text = model.get("vision_cfg", {}), model.get("text_cfg", {})
  for tower, cfg in (("vision_cfg", vision), ("text_cfg", text)):
    for key, ok in _UNSUPPORTED.items():
      if key in cfg and cfg[key] not in (ok if isinstance(ok, tuple) else (ok,)):
        raise ConversionError(f"{file}: model_cfg.{tower}.{key} = {cfg[key]!r} is an OpenCLIP option these CLIP "
                              f"towers do not implement (supported: {ok!r})")
  act = "quick_gelu" if model.get("quick_gelu") else "gelu"
  out = {"vision_config": {"hidden_act": act}}
  # With a config, OpenCLIP's defaults (CLIPVisionCfg.head_width 64, CLIPTextCfg.heads 8) fill what it leaves
  # out; without one the converters infer the heads from the shapes.
  if model and "visual.conv1.weight" in tensors:
    out["vision_config"]["num_attention_heads"] = shape_of(tensors, "visual.conv1.weight")[0] // vision.get(
        "head_width", 64)
  # Text: pooled at argmax(ids) (OpenCLIP's pool_type "argmax"; eos_token_id 2 is transformers' flag for it).
  out["text_config"] = {"hidden_act": act, "eos_token_id": 2,
                        **({"num_attention_heads": text.get("heads", 8)} if model else {})}
  return out


def as_transformers(tensors, config, path):
  """(tensors, config.json) in transformers' names: an OpenCLIP checkpoint renamed, any other as it is."""
  if not is_open_clip(tensors):
    return tensors, config
  return renamed(tensors), config_json(path, tensors)
