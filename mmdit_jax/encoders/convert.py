"""Weight converters from the Hugging Face / diffusers safetensors layouts to the Flax encoders.

Each takes a .safetensors file or a directory (with config.json when there is one; otherwise the config
is inferred from tensor shapes, and what shapes cannot tell comes from a table of the known checkpoints
or an explicit override). Our module names mirror theirs, so each converter is a map from our parameter
paths to their tensor names; every tensor must be used exactly once, or the conversion fails naming
the unknown, missing or mis-shaped tensors.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from flax import nnx

from mmdit_jax.encoders import open_clip_layout
from mmdit_jax.encoders.clip import CLIPTextConfig
from mmdit_jax.encoders.clip_vision import CLIPVisionConfig
from mmdit_jax.encoders.t5 import T5Config
from mmdit_jax.encoders.vae import VAEConfig
from mmdit_jax.model import api
from mmdit_jax.model.weights import (ConversionError, Deferred, Derived, check_all_used, fill_params, load_safetensors,
                                     require, select, shape_of)

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_name(path) -> str:
  *mods, leaf = path
  return ".".join([*map(str, mods), _LEAF[leaf]])


# ── SD3's single-file checkpoints (sd3_medium_incl_clips*.safetensors, sd3.5_*.safetensors) bundle the
# encoders beside the MM-DiT: the text encoders in transformers' names under a prefix, the VAE in the original
# (LDM) autoencoder's names. A role's part is read from such a file with its prefix stripped (and the VAE
# renamed to diffusers' AutoencoderKL names, as diffusers' convert_ldm_vae_checkpoint does), lazily.

SINGLE_FILE_PARTS = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                     "t5": "text_encoders.t5xxl.transformer.", "vae": "first_stage_model."}
SINGLE_FILE_CLIP_ACTIVATION = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # OpenAI CLIP-L, OpenCLIP bigG
_SINGLE_FILE_MARKS = ("text_encoders.", "first_stage_model.", "model.diffusion_model.")


def bundled_parts(tensors) -> list[str]:
  """The encoder roles a single-file checkpoint bundles (none for any other checkpoint)."""
  return [role for role, prefix in SINGLE_FILE_PARTS.items() if any(k.startswith(prefix) for k in tensors)]


def _renamed(tensors, names: dict, transforms: dict | None = None) -> Derived:
  """{new: tensors[old]} for names = {new: old}, read on access (transforms: {new: fn} applied then)."""
  transforms = transforms or {}
  thunks = {new: (lambda o=old, f=transforms.get(new, lambda x: x): f(tensors[o])) for new, old in names.items()}
  shapes = {}
  for new, old in names.items():
    shape = shape_of(tensors, old)
    shapes[new] = shape[:2] if new in transforms else shape
  return Derived(thunks, shapes)


def single_file_part(tensors, role: str, where="checkpoint"):
  """`role`'s tensors under the names its loader expects when `tensors` is an SD3 single-file checkpoint;
  `tensors` unchanged otherwise."""
  if not any(k.startswith(_SINGLE_FILE_MARKS) for k in tensors):
    return tensors
  prefix = SINGLE_FILE_PARTS[role]
  names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
  if not names:
    raise ConversionError(f"{where}: this SD3 single-file checkpoint bundles no {role} (it has: "
                          f"{bundled_parts(tensors) or 'no encoders'}); give that encoder's own weights")
  if role != "vae":
    return _renamed(tensors, names)
  n_up = len({m.group(1) for k in names if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
  renamed = {_ldm_vae_name(k, n_up): v for k, v in names.items()}
  squeeze = {k: (lambda x: x.reshape(x.shape[:2]) if x.ndim == 4 else x) for k in renamed
             if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)}
  return _renamed(tensors, renamed, squeeze)


def _bundled(tensors, config_json, role, path):
  """(tensors, config) of `role` when `path` is an SD3 single-file checkpoint (no config.json applies),
  else as they are."""
  part = single_file_part(tensors, role, path)
  return (tensors, config_json) if part is tensors else (part, {})


_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ldm_vae_name(k: str, n_up: int) -> str:
  """The original autoencoder's parameter name → diffusers' AutoencoderKL name (its decoder's up blocks
  are numbered from the top: diffusers' up_blocks.i is up.{n_up − 1 − i})."""
  k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
  k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
  k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
  k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", k)
  k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
             lambda m: f"{m.group(1)}.mid_block.attentions.0.{_LDM_ATTENTION[m.group(2)]}.", k)
  k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.", k)
  k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
             lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.", k)
  return k.replace("nin_shortcut", "conv_shortcut")


_KERNEL_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}  # Linear (O, I) → (I, O); Conv (O, I, kh, kw) → (kh, kw, I, O)


def _from_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  return value.transpose(_KERNEL_AXES[value.ndim]) if leaf == "kernel" else value


def _convert(cfg, tensors, torch_name, stacks: dict, shardings=None):
  """Maps every parameter of `cfg` through `torch_name(path)`; a path under a key of `stacks`
  (prefix → layer count) is the stack of their per-layer tensors, named by `torch_name(path, i)`.

  Nothing is read here: each parameter is a Deferred read of its tensors (a stack's shard reads only its
  layers), placed by fill_params one at a time, so a lazy checkpoint (T5-XXL's 19 GB in float32) is never
  whole in host memory."""
  used: set[str] = set()
  flat = {}

  def read(name, leaf):
    require(tensors, name)
    used.add(name)
    shape = shape_of(tensors, name)
    if leaf == "kernel" and len(shape) in _KERNEL_AXES:
      shape = tuple(shape[a] for a in _KERNEL_AXES[len(shape)])
    return (lambda: _from_torch(tensors[name], leaf)), shape

  for path, _ in nnx.to_flat_state(api.abstract_params(cfg)):
    leaf = path[-1]
    prefix = next((p for p in stacks if path[:len(p)] == p), None)
    if prefix is None:
      thunk, shape = read(torch_name(path), leaf)
      flat[path] = Deferred(thunk, shape=shape)
    else:
      parts = [read(torch_name(path, i), leaf) for i in range(stacks[prefix])]
      flat[path] = Deferred.stack([t for t, _ in parts], layer_shape=parts[0][1])
  check_all_used(tensors, used)
  return fill_params(cfg, flat, shardings)


def _layer_ids(tensors, pattern):
  ids = sorted({int(m.group(1)) for k in tensors if (m := re.match(pattern, k))})
  if not ids or ids != list(range(len(ids))):
    raise ConversionError(f"layer indices of {pattern!r} are not 0..n-1: {ids[:10]}")
  return len(ids)


# CLIP text (transformers CLIPTextModel / CLIPTextModelWithProjection).

# What shapes cannot tell, for the checkpoints SD3 uses: (width, depth) → config.json entries, which a
# checkpoint's own config.json overrides.
KNOWN_CLIP = {(768, 12): {"hidden_act": "quick_gelu"},  # OpenAI CLIP-L/14
              (1280, 32): {"hidden_act": "gelu"}}  # OpenCLIP bigG/14


def _clip_activation(config_json, width, depth, overrides, tower):
  """hidden_act from config.json (or a known checkpoint's entries), else an override."""
  act = config_json.get("hidden_act")
  if act is None and "activation" not in overrides:
    raise ConversionError(f"CLIP {tower} width {width}, depth {depth} is not a known checkpoint and no config.json "
                          "gives hidden_act; pass activation= one of quick_gelu, gelu")
  return act


def _clip_heads(config_json, width, overrides, tower) -> int:
  """num_attention_heads from config.json (or a known checkpoint's entries), else CLIP's head dim 64 (an
  override wins in the caller)."""
  if "num_attention_heads" not in config_json and width % 64 and "num_heads" not in overrides:
    raise ConversionError(f"CLIP {tower} width {width}: heads are unknown without config.json (CLIP uses head dim "
                          "64, which does not divide it); pass num_heads=")
  return int(config_json.get("num_attention_heads", width // 64))


def _clip_prefix(tensors):
  return "text_model." if any(k.startswith("text_model.") for k in tensors) else ""


def infer_clip_config(tensors, config_json=None, **overrides) -> CLIPTextConfig:
  config_json = config_json or {}
  config_json = config_json.get("text_config", config_json)  # a whole CLIPModel's config.json nests it
  p = _clip_prefix(tensors)
  vocab, width = shape_of(tensors, f"{p}embeddings.token_embedding.weight")
  depth = _layer_ids(tensors, rf"{re.escape(p)}encoder\.layers\.(\d+)\.")
  config_json = {**KNOWN_CLIP.get((width, depth), {}), **config_json}
  act = _clip_activation(config_json, width, depth, overrides, "text")
  proj = shape_of(tensors, "text_projection.weight") if "text_projection.weight" in tensors else None
  cfg = dict(vocab_size=vocab, width=width, depth=depth, num_heads=_clip_heads(config_json, width, overrides, "text"),
             mlp_width=shape_of(tensors, f"{p}encoder.layers.0.mlp.fc1.weight")[0],
             max_tokens=shape_of(tensors, f"{p}embeddings.position_embedding.weight")[0],
             activation=act, projection_dim=None if proj is None else proj[0],
             pooled="unprojected" if proj is None else "projected",
             eos_token_id=int(config_json.get("eos_token_id", 49407)),
             eps=float(config_json.get("layer_norm_eps", 1e-5)))
  cfg.update(overrides)
  return CLIPTextConfig(**cfg)


def convert_clip(tensors, cfg: CLIPTextConfig, shardings=None):
  p = _clip_prefix(tensors)
  tensors = select(tensors, lambda k: not k.endswith("position_ids")  # a buffer in old files
                   and not k.startswith(("vision_model.", "visual_projection.", "logit_scale")))  # a CLIPModel's
  top = {("token_embedding", "embedding"): f"{p}embeddings.token_embedding.weight",
         ("position_embedding",): f"{p}embeddings.position_embedding.weight",
         ("text_projection", "kernel"): "text_projection.weight"}

  def torch_name(path, i=None):
    if path in top:
      return top[path]
    if path[0] == "layers":
      return f"{p}encoder.layers.{i}." + _torch_name(path[2:])
    if path[0] == "last_layer":
      return f"{p}encoder.layers.{cfg.depth - 1}." + _torch_name(path[1:])
    return p + _torch_name(path)

  return _convert(cfg, tensors, torch_name, {("layers", "layers"): cfg.depth - 1}, shardings)


# CLIP vision (transformers CLIPVisionModelWithProjection; a full CLIPModel's file works too).

KNOWN_CLIP_VISION = {(1024, 24): {"hidden_act": "quick_gelu"},  # OpenAI ViT-L/14
                     # OpenCLIP ViT-bigG/14: its heads are 104 wide, not CLIP's usual 64
                     (1664, 48): {"hidden_act": "gelu", "num_attention_heads": 16}}


def infer_clip_vision_config(tensors, config_json=None, **overrides) -> CLIPVisionConfig:
  config_json = config_json or {}
  config_json = config_json.get("vision_config", config_json)  # CLIPModel's config.json nests it
  p = "vision_model."
  width, _, patch, _ = shape_of(tensors, f"{p}embeddings.patch_embedding.weight")
  depth = _layer_ids(tensors, rf"{re.escape(p)}encoder\.layers\.(\d+)\.")
  config_json = {**KNOWN_CLIP_VISION.get((width, depth), {}), **config_json}
  act = _clip_activation(config_json, width, depth, overrides, "vision")
  positions = shape_of(tensors, f"{p}embeddings.position_embedding.weight")[0]
  side = round((positions - 1) ** 0.5)
  if side * side != positions - 1:
    raise ConversionError(f"{p}embeddings.position_embedding.weight has {positions} rows, not a square grid + 1")
  cfg = dict(image_size=side * patch, patch_size=patch, width=width, depth=depth,
             num_heads=_clip_heads(config_json, width, overrides, "vision"),
             mlp_width=shape_of(tensors, f"{p}encoder.layers.0.mlp.fc1.weight")[0], activation=act,
             projection_dim=shape_of(tensors, "visual_projection.weight")[0],
             eps=float(config_json.get("layer_norm_eps", 1e-5)))
  cfg.update(overrides)
  return CLIPVisionConfig(**cfg)


def convert_clip_vision(tensors, cfg: CLIPVisionConfig, shardings=None):
  p = "vision_model."
  tensors = select(tensors, lambda k: k.startswith((p, "visual_projection.")) and not k.endswith("position_ids"))
  top = {("class_embedding",): f"{p}embeddings.class_embedding",
         ("patch_embedding", "kernel"): f"{p}embeddings.patch_embedding.weight",
         ("position_embedding",): f"{p}embeddings.position_embedding.weight",
         ("visual_projection", "kernel"): "visual_projection.weight"}

  def torch_name(path, i=None):
    if path in top:
      return top[path]
    if path[0] == "layers":
      return f"{p}encoder.layers.{i}." + _torch_name(path[2:])
    return p + _torch_name(path)

  return _convert(cfg, tensors, torch_name, {("layers", "layers"): cfg.depth}, shardings)


def load_clip_vision(path, shardings_for=None, **overrides):
  """(CLIPVisionConfig, params) from a transformers CLIP vision (or whole CLIP) checkpoint or an OpenCLIP one,
  file or directory."""
  tensors, config_json = open_clip_layout.as_transformers(*load_safetensors(path, lazy=True), path)
  cfg = infer_clip_vision_config(tensors, config_json, **overrides)
  return cfg, convert_clip_vision(tensors, cfg, shardings_for(cfg) if shardings_for else None)


def load_clip(path, shardings_for=None, part="clip_l", **overrides):
  """(CLIPTextConfig, params) from a transformers or OpenCLIP CLIP text checkpoint (file or directory), or the `part`
  (clip_l | clip_g) of an SD3 single-file checkpoint."""
  tensors, config_json = open_clip_layout.as_transformers(*load_safetensors(path, lazy=True), path)
  bundled, config_json = _bundled(tensors, config_json, part, path)
  if bundled is not tensors:  # no config.json: SD3's CLIP-L / bigG, pooled at argmax(ids) as SD3's reference does
    overrides = {"activation": SINGLE_FILE_CLIP_ACTIVATION[part], "eos_token_id": 2, **overrides}
  tensors = bundled
  cfg = infer_clip_config(tensors, config_json, **overrides)
  return cfg, convert_clip(tensors, cfg, shardings_for(cfg) if shardings_for else None)


# T5 v1.1 encoder (transformers T5EncoderModel).

_T5_RENAME = {"attn_norm": "layer.0.layer_norm", "attn": "layer.0.SelfAttention",
              "ff_norm": "layer.1.layer_norm", "ff": "layer.1.DenseReluDense"}


def infer_t5_config(tensors, config_json=None, **overrides) -> T5Config:
  config_json = config_json or {}
  if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in tensors:
    raise ConversionError("a T5 v1.0 checkpoint (ReLU feed-forward 'wi'): only T5 v1.1 (gated GELU, "
                          "'wi_0'/'wi_1') is supported")
  vocab, width = shape_of(tensors, _shared(tensors))
  buckets, heads = shape_of(tensors, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
  inner = shape_of(tensors, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
  cfg = dict(vocab_size=vocab, width=width, depth=_layer_ids(tensors, r"encoder\.block\.(\d+)\."),
             num_heads=heads, head_dim=inner // heads,
             mlp_width=shape_of(tensors, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
             num_buckets=buckets, max_distance=int(config_json.get("relative_attention_max_distance", 128)),
             eps=float(config_json.get("layer_norm_epsilon", 1e-6)))
  cfg.update(overrides)
  return T5Config(**cfg)


def _shared(tensors) -> str:
  for name in ("shared.weight", "encoder.embed_tokens.weight"):
    if name in tensors:
      return name
  raise ConversionError("checkpoint lacks the token embedding ('shared.weight' or 'encoder.embed_tokens.weight')")


def convert_t5(tensors, cfg: T5Config, shardings=None):
  if "shared.weight" in tensors and "encoder.embed_tokens.weight" in tensors:  # tied copies
    # (compared by digest: one of the two embedding tables on the host at a time)
    digest = lambda name: hashlib.sha256(np.ascontiguousarray(tensors[name]).tobytes()).digest()
    if digest("shared.weight") != digest("encoder.embed_tokens.weight"):
      raise ConversionError("shared.weight and encoder.embed_tokens.weight differ; expected tied embeddings")
    tensors = select(tensors, lambda k: k != "encoder.embed_tokens.weight")
  shared = _shared(tensors)
  top = {("shared", "embedding"): shared,
         ("relative_attention_bias", "embedding"):
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         ("final_layer_norm", "scale"): "encoder.final_layer_norm.weight"}

  def torch_name(path, i=None):
    if path in top:
      return top[path]
    rest = path[2:]
    return f"encoder.block.{i}.{_T5_RENAME[rest[0]]}." + _torch_name(rest[1:])

  return _convert(cfg, tensors, torch_name, {("layers", "layers"): cfg.depth}, shardings)


def load_t5(path, shardings_for=None, **overrides):
  """(T5Config, params) from a transformers T5EncoderModel (or full T5) checkpoint, or the T5 bundled in an
  SD3 single-file checkpoint; the decoder of a full T5 checkpoint is ignored."""
  tensors, config_json = load_safetensors(path, lazy=True)
  tensors, config_json = _bundled(tensors, config_json, "t5", path)
  tensors = select(tensors, lambda k: not k.startswith(("decoder.", "lm_head.")))
  cfg = infer_t5_config(tensors, config_json, **overrides)
  return cfg, convert_t5(tensors, cfg, shardings_for(cfg) if shardings_for else None)


# The autoencoder (diffusers AutoencoderKL).

def infer_vae_config(tensors, config_json=None, **overrides) -> VAEConfig:
  config_json = config_json or {}
  n_blocks = _layer_ids(tensors, r"encoder\.down_blocks\.(\d+)\.")
  channels = tuple(int(shape_of(tensors, f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0])
                   for i in range(n_blocks))
  latent = shape_of(tensors, "encoder.conv_out.weight")[0] // 2
  cfg = dict(in_channels=shape_of(tensors, "encoder.conv_in.weight")[1], latent_channels=latent,
             block_out_channels=channels,
             layers_per_block=_layer_ids(tensors, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
             norm_groups=int(config_json.get("norm_num_groups", 32)),
             use_quant_conv="quant_conv.weight" in tensors,
             use_post_quant_conv="post_quant_conv.weight" in tensors)
  if "scaling_factor" in config_json:
    cfg["scaling_factor"] = float(config_json["scaling_factor"])
    cfg["shift_factor"] = float(config_json.get("shift_factor") or 0.0)
  elif latent != 16 and "scaling_factor" not in overrides:  # 16 channels: SD3's values, the defaults
    raise ConversionError(f"a {latent}-channel autoencoder without config.json: its latent scaling_factor "
                          "and shift_factor are unknown; pass them explicitly")
  cfg.update(overrides)
  return VAEConfig(**cfg)


def convert_vae(tensors, cfg: VAEConfig, shardings=None):
  def torch_name(path, i=None):
    name = _torch_name(path)
    return name.replace(".to_out.", ".to_out.0.")

  return _convert(cfg, tensors, torch_name, {}, shardings)


def load_vae(path, shardings_for=None, **overrides):
  """(VAEConfig, params) from a diffusers AutoencoderKL checkpoint (file or directory), or the autoencoder
  bundled (in its original names) in an SD3 single-file checkpoint."""
  tensors, config_json = load_safetensors(path, lazy=True)
  tensors, config_json = _bundled(tensors, config_json, "vae", path)
  cfg = infer_vae_config(tensors, config_json, **overrides)
  return cfg, convert_vae(tensors, cfg, shardings_for(cfg) if shardings_for else None)
