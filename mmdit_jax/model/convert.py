"""Import diffusers `SD3Transformer2DModel` weights (PyTorch layout, safetensors) into MM-DiT parameters.

The config is inferred from tensor shapes (and config.json when one sits beside the weights); every
tensor must be used exactly once and have the expected shape, or the import fails naming the tensors.
"""

from __future__ import annotations

import math
import re

import numpy as np

from mmdit_jax.model import layers
from mmdit_jax.model.mmdit import MMDiTConfig
from mmdit_jax.model.weights import ConversionError, Deferred, Derived, check_all_used, fill_params, load_safetensors
from mmdit_jax.model.weights import require
from mmdit_jax.model.weights import need

# Our block-relative path → diffusers block-relative name (Linear layers; kernels are transposed).
_STREAM_LINEARS = {
    ("img", "mod"): "norm1.linear",
    ("img", "attn", "q"): "attn.to_q",
    ("img", "attn", "k"): "attn.to_k",
    ("img", "attn", "v"): "attn.to_v",
    ("img", "attn", "out"): "attn.to_out.0",
    ("img", "mlp", "fc1"): "ff.net.0.proj",
    ("img", "mlp", "fc2"): "ff.net.2",
    ("img", "attn2", "q"): "attn2.to_q",
    ("img", "attn2", "k"): "attn2.to_k",
    ("img", "attn2", "v"): "attn2.to_v",
    ("img", "attn2", "out"): "attn2.to_out.0",
    ("txt", 0, "mod"): "norm1_context.linear",
    ("txt", 0, "attn", "q"): "attn.add_q_proj",
    ("txt", 0, "attn", "k"): "attn.add_k_proj",
    ("txt", 0, "attn", "v"): "attn.add_v_proj",
    ("txt", 0, "attn", "out"): "attn.to_add_out",
    ("txt", 0, "mlp", "fc1"): "ff_context.net.0.proj",
    ("txt", 0, "mlp", "fc2"): "ff_context.net.2",
}
_STREAM_NORMS = {
    ("img", "attn", "q_norm"): "attn.norm_q",
    ("img", "attn", "k_norm"): "attn.norm_k",
    ("img", "attn2", "q_norm"): "attn2.norm_q",
    ("img", "attn2", "k_norm"): "attn2.norm_k",
    ("txt", 0, "attn", "q_norm"): "attn.norm_added_q",
    ("txt", 0, "attn", "k_norm"): "attn.norm_added_k",
}
_TOP_LINEARS = {
    ("t_embedder", "linear_1"): "time_text_embed.timestep_embedder.linear_1",
    ("t_embedder", "linear_2"): "time_text_embed.timestep_embedder.linear_2",
    ("y_embedder", "linear_1"): "time_text_embed.text_embedder.linear_1",
    ("y_embedder", "linear_2"): "time_text_embed.text_embedder.linear_2",
    ("context_embedder", 0): "context_embedder",
    ("norm_out",): "norm_out.linear",
    ("proj_out",): "proj_out",
}


def infer_config(tensors: dict, config_json: dict | None = None, **overrides) -> MMDiTConfig:
  """MMDiTConfig from tensor shapes; heads from QK-norm shapes, config.json, or head dim 64."""
  config_json = config_json or {}
  proj = need(tensors, "pos_embed.proj.weight")  # (D, C, P, P)
  width, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
  layer_ids = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
  if not layer_ids or layer_ids != list(range(len(layer_ids))):
    raise ConversionError(f"transformer_blocks indices are not 0..n-1: {layer_ids[:10]}…")
  depth = len(layer_ids)
  qk_norm = "transformer_blocks.0.attn.norm_q.weight" in tensors
  if qk_norm:
    heads = width // tensors["transformer_blocks.0.attn.norm_q.weight"].shape[0]
  elif "num_attention_heads" in config_json:
    heads = int(config_json["num_attention_heads"])
  elif "num_heads" in overrides:
    heads = overrides["num_heads"]
  else:
    heads = width // 64  # SD3's rule: head dim 64
    if heads == 0 or width % 64:
      raise ConversionError(f"width {width}: the number of heads is not in the checkpoint (no config.json, no "
                            "QK-norm) and SD3's head dim 64 does not divide it; pass num_heads")
  dual = tuple(i for i in layer_ids if f"transformer_blocks.{i}.attn2.to_q.weight" in tensors)
  pos = need(tensors, "pos_embed.pos_embed")  # (1, M·M, D)
  max_size = math.isqrt(pos.shape[1])
  if "sample_size" in config_json:
    sample_size = int(config_json["sample_size"])
  else:
    # Token (0, 1) of the grid sits at width position base/max; channel 0 holds sin(position).
    base = round(float(np.arcsin(np.clip(pos[0, 1, 0], -1, 1))) * max_size)
    sample_size = base * patch
  mlp = need(tensors, "transformer_blocks.0.ff.net.0.proj.weight").shape[0]
  cfg = dict(
      depth=depth, hidden_size=width, num_heads=heads, mlp_ratio=mlp / width, patch_size=patch,
      in_channels=in_ch, out_channels=need(tensors, "proj_out.weight").shape[0] // (patch * patch),
      context_dim=need(tensors, "context_embedder.weight").shape[1],
      pooled_dim=need(tensors, "time_text_embed.text_embedder.linear_1.weight").shape[1],
      pos_embed_max_size=max_size, sample_size=sample_size, qk_norm=qk_norm, dual_attention_layers=dual)
  cfg.update(overrides)
  return MMDiTConfig(**cfg)


def _block_tensors(tensors, layer, used):
  """Our block-relative flat params of diffusers layer `layer`, as thunks (read when placed)."""
  out = {}
  prefix = f"transformer_blocks.{layer}."
  for ours, theirs in _STREAM_LINEARS.items():
    name = prefix + theirs
    if name + ".weight" in tensors:
      require(tensors, name + ".bias")
      out[ours + ("kernel",)] = lambda n=name + ".weight": tensors[n].T
      out[ours + ("bias",)] = lambda n=name + ".bias": tensors[n]
      used.update({name + ".weight", name + ".bias"})
  for ours, theirs in _STREAM_NORMS.items():
    name = prefix + theirs + ".weight"
    if name in tensors:
      out[ours + ("scale",)] = lambda n=name: tensors[n]
      used.add(name)
  return out


def convert_state_dict(tensors, cfg: MMDiTConfig, shardings=None):
  """diffusers tensors (a dict, or a lazy mapping read tensor by tensor) → an nnx.State of our parameters
  for `cfg`; with `shardings`, each parameter is read and placed shard by shard (a layer stack's shard
  reads only its layers), so the checkpoint is never whole in host memory."""
  used: set[str] = set()
  flat = {}

  def embed_kernel():  # (D, C, P, P) → (P·P·C, D), patch order (p, q, c)
    proj = tensors["pos_embed.proj.weight"]
    return proj.transpose(2, 3, 1, 0).reshape(-1, proj.shape[0])
  require(tensors, "pos_embed.proj.weight", "pos_embed.proj.bias")
  flat[("x_embedder", "kernel")] = Deferred(embed_kernel)
  flat[("x_embedder", "bias")] = Deferred(lambda: tensors["pos_embed.proj.bias"])
  used.update({"pos_embed.proj.weight", "pos_embed.proj.bias"})
  for ours, theirs in _TOP_LINEARS.items():
    require(tensors, theirs + ".weight", theirs + ".bias")
    flat[ours + ("kernel",)] = Deferred(lambda n=theirs + ".weight": tensors[n].T)
    flat[ours + ("bias",)] = Deferred(lambda n=theirs + ".bias": tensors[n])
    used.update({theirs + ".weight", theirs + ".bias"})
  for s, (first, n, _) in enumerate(cfg.stages()):
    blocks = [_block_tensors(tensors, i, used) for i in range(first, first + n)]
    for key in blocks[0]:
      flat[("stages", s, "layers") + key] = Deferred.stack([b[key] for b in blocks])
  for key, value in _block_tensors(tensors, cfg.depth - 1, used).items():
    flat[("final_block",) + key] = Deferred(value)

  # The position table is fixed, not learned: check it instead of loading it.
  pos = tensors["pos_embed.pos_embed"]
  m = cfg.pos_embed_max_size
  expected = layers.sincos_pos_embed(cfg.width, m, m, m, cfg.sample_size // cfg.patch_size)
  if pos.shape != (1, m * m, cfg.width) or np.max(np.abs(pos[0] - expected)) > 1e-4:
    raise ConversionError(
        f"pos_embed.pos_embed does not match the sin-cos table for sample_size={cfg.sample_size}, "
        f"pos_embed_max_size={m}; pass sample_size= explicitly")
  used.add("pos_embed.pos_embed")

  check_all_used(tensors, used)
  return fill_params(cfg, flat, shardings)


# ── SD3's own single-file layout (sd3_medium.safetensors, sd3.5_*.safetensors) → diffusers names ──

SINGLE_FILE_PREFIX = "model.diffusion_model."


def is_single_file(tensors: dict) -> bool:
  return any(k.startswith(SINGLE_FILE_PREFIX) or k.startswith("joint_blocks.") for k in tensors)


def _swap_halves(x):
  """SD3 stores the final (pre-only) modulations as (shift, scale); diffusers as (scale, shift)."""
  a, b = np.split(x, 2, axis=0)
  return np.concatenate([b, a], axis=0)


def single_file_to_diffusers(tensors) -> Derived:
  """The MM-DiT tensors of an SD3 / SD3.5 single-file checkpoint under diffusers' names, as diffusers'
  convert_sd3_transformer_checkpoint_to_diffusers maps them (fused qkv split, final modulations swapped),
  computed when read. Bundled text encoders and VAE (other prefixes) are left out; a leftover MM-DiT
  tensor is an error."""
  has_prefix = any(k.startswith(SINGLE_FILE_PREFIX) for k in tensors)
  names = {k[len(SINGLE_FILE_PREFIX):]: k for k in tensors if k.startswith(SINGLE_FILE_PREFIX)} if has_prefix \
      else {k: k for k in tensors}
  used: set[str] = set()

  def take(name, transform=lambda x: x):
    require(names, name)
    used.add(name)
    return lambda: transform(tensors[names[name]])

  def part(j):
    return lambda x: np.split(x, 3, axis=0)[j]

  out = {"pos_embed.pos_embed": take("pos_embed"), "pos_embed.proj.weight": take("x_embedder.proj.weight"),
         "pos_embed.proj.bias": take("x_embedder.proj.bias")}
  for ours, theirs in (("time_text_embed.timestep_embedder", "t_embedder"),
                       ("time_text_embed.text_embedder", "y_embedder")):
    for j, k in (("linear_1", 0), ("linear_2", 2)):
      for w in ("weight", "bias"):
        out[f"{ours}.{j}.{w}"] = take(f"{theirs}.mlp.{k}.{w}")
  for w in ("weight", "bias"):
    out[f"context_embedder.{w}"] = take(f"context_embedder.{w}")
    out[f"proj_out.{w}"] = take(f"final_layer.linear.{w}")
    out[f"norm_out.linear.{w}"] = take(f"final_layer.adaLN_modulation.1.{w}", _swap_halves)
  layer_ids = sorted({int(k.split(".")[1]) for k in names if k.startswith("joint_blocks.")})
  last = layer_ids[-1] if layer_ids else -1
  for i in layer_ids:
    src, dst = f"joint_blocks.{i}", f"transformer_blocks.{i}"
    streams = [("x_block", "attn", ("to_q", "to_k", "to_v"), "attn.to_out.0", "norm1.linear", "ff")]
    streams.append(("context_block", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                    None if i == last else "attn.to_add_out", "norm1_context.linear",
                    None if i == last else "ff_context"))
    if f"{src}.x_block.attn2.qkv.weight" in names:
      streams.append(("x_block", "attn2", ("to_q", "to_k", "to_v"), "attn2.to_out.0", None, None))
    for block, attn, qkv, proj, mod, ff in streams:
      for w in ("weight", "bias"):
        for j, name in enumerate(qkv):
          out[f"{dst}.{attn}.{name}.{w}"] = take(f"{src}.{block}.{attn}.qkv.{w}", part(j))
        if proj:
          out[f"{dst}.{proj}.{w}"] = take(f"{src}.{block}.{attn}.proj.{w}")
        if mod:
          swap = block == "context_block" and i == last
          out[f"{dst}.{mod}.{w}"] = take(f"{src}.{block}.adaLN_modulation.1.{w}", _swap_halves if swap else lambda x: x)
        if ff:
          out[f"{dst}.{ff}.net.0.proj.{w}"] = take(f"{src}.{block}.mlp.fc1.{w}")
          out[f"{dst}.{ff}.net.2.{w}"] = take(f"{src}.{block}.mlp.fc2.{w}")
      for norm, name in (("ln_q", "norm_q" if block == "x_block" else "norm_added_q"),
                         ("ln_k", "norm_k" if block == "x_block" else "norm_added_k")):
        key = f"{src}.{block}.{attn}.{norm}.weight"
        if key in names:
          out[f"{dst}.{attn}.{name}.weight"] = take(key)
  leftover = sorted(k for k in names if k not in used and not k.startswith(("text_encoders.", "first_stage_model.")))
  if leftover:
    raise ConversionError(f"single-file checkpoint: tensors not part of SD3's MM-DiT layout: {leftover[:20]}")
  return Derived(out)


def from_diffusers(path, shardings=None, **overrides):
  """(config, params) from a diffusers SD3Transformer2DModel checkpoint (a .safetensors file or directory)
  or an SD3 / SD3.5 single-file checkpoint (its MM-DiT part; detected by its key layout). Tensors are read
  one at a time; with `shardings` (a function of the config → api.param_shardings) each parameter goes
  straight into its shards, so an 8B checkpoint is never whole in host memory.

  `overrides` set config fields that shapes cannot tell (dtype, attention, remat, …).
  """
  cfg, tensors = read_diffusers(path, **overrides)
  return cfg, convert_state_dict(tensors, cfg, shardings(cfg) if callable(shardings) else shardings)


def read_diffusers(path, **overrides):
  """(config, lazy tensors under diffusers' names) of a checkpoint `from_diffusers` reads: the config now,
  the parameters later with convert_state_dict (only when they are needed)."""
  tensors, config_json = load_safetensors(path, lazy=True)
  if is_single_file(tensors):
    tensors, config_json = single_file_to_diffusers(tensors), None
  return infer_config(tensors, config_json, **overrides), tensors


# ── Export: our parameters → diffusers SD3Transformer2DModel (the same name maps, inverted) ──

def _flat_params(params) -> dict:
  """{path tuple (ints for list indices): float32 numpy} of an nnx.State or pure dict of parameters."""
  from flax import nnx
  out = {}
  for path, v in nnx.to_flat_state(params):
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    key = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path)
    out[key] = np.asarray(value, np.float32)
  return out


def to_diffusers(cfg: MMDiTConfig, params) -> tuple[dict, dict]:
  """(tensors, config.json) of an `SD3Transformer2DModel` equal to `params` — what `from_diffusers` reads
  back. MM-DiT variants diffusers has no class for (separate text streams, mlp_ratio ≠ 4) are refused."""
  if cfg.text_streams:
    raise ConversionError(f"text_streams={cfg.text_streams}: diffusers' SD3Transformer2DModel has one text stream")
  if cfg.mlp_ratio != 4.0:
    raise ConversionError(f"mlp_ratio={cfg.mlp_ratio}: diffusers' SD3Transformer2DModel fixes it at 4")
  flat = _flat_params(params)
  tensors = {}

  def linear(ours, theirs):
    tensors[theirs + ".weight"] = np.ascontiguousarray(flat[ours + ("kernel",)].T)
    tensors[theirs + ".bias"] = flat[ours + ("bias",)]

  kernel = flat[("x_embedder", "kernel")]  # (P·P·C, D), patch order (p, q, c) → (D, C, P, P)
  p, c = cfg.patch_size, cfg.in_channels
  tensors["pos_embed.proj.weight"] = np.ascontiguousarray(kernel.reshape(p, p, c, -1).transpose(3, 2, 0, 1))
  tensors["pos_embed.proj.bias"] = flat[("x_embedder", "bias")]
  m = cfg.pos_embed_max_size
  tensors["pos_embed.pos_embed"] = np.asarray(
      layers.sincos_pos_embed(cfg.width, m, m, m, cfg.sample_size // cfg.patch_size), np.float32)[None]
  for ours, theirs in _TOP_LINEARS.items():
    linear(ours, theirs)

  def block(prefix_ours, layer, index=None):
    pick = (lambda a: a[index]) if index is not None else (lambda a: a)
    for ours, theirs in _STREAM_LINEARS.items():
      if prefix_ours + ours + ("kernel",) in flat:
        name = f"transformer_blocks.{layer}.{theirs}"
        tensors[name + ".weight"] = np.ascontiguousarray(pick(flat[prefix_ours + ours + ("kernel",)]).T)
        tensors[name + ".bias"] = pick(flat[prefix_ours + ours + ("bias",)])
    for ours, theirs in _STREAM_NORMS.items():
      if prefix_ours + ours + ("scale",) in flat:
        tensors[f"transformer_blocks.{layer}.{theirs}.weight"] = pick(flat[prefix_ours + ours + ("scale",)])

  for s, (first, n, _) in enumerate(cfg.stages()):
    for j in range(n):
      block(("stages", s, "layers"), first + j, j)
  block(("final_block",), cfg.depth - 1)
  config = {
      "_class_name": "SD3Transformer2DModel", "sample_size": cfg.sample_size, "patch_size": cfg.patch_size,
      "in_channels": cfg.in_channels, "out_channels": cfg.out_channels or cfg.in_channels,
      "num_layers": cfg.depth, "attention_head_dim": cfg.width // cfg.heads, "num_attention_heads": cfg.heads,
      "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.width,
      "pooled_projection_dim": cfg.pooled_dim, "pos_embed_max_size": cfg.pos_embed_max_size,
      "dual_attention_layers": list(cfg.dual_attention_layers), "qk_norm": "rms_norm" if cfg.qk_norm else None}
  return tensors, config


# ── LoRA adapters ↔ diffusers / PEFT LoRA files (SD3Transformer2DModel.load_lora_adapter's layout) ──

PEFT_PREFIX = "transformer."
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry: the adapter's LoraConfig


def linear_names(cfg: MMDiTConfig) -> dict:
  """{our module path (strings): [(layer index in its stack or None, diffusers Linear name)]} of every linear
  layer diffusers' SD3Transformer2DModel has (the import's name maps)."""
  out = {}
  for ours, theirs in _TOP_LINEARS.items():
    out[tuple(str(k) for k in ours)] = [(None, theirs)]

  def block(prefix, layer, index):
    for ours, theirs in _STREAM_LINEARS.items():
      out.setdefault(prefix + tuple(str(k) for k in ours), []).append((index, f"transformer_blocks.{layer}.{theirs}"))

  for s, (first, n, _) in enumerate(cfg.stages()):
    for j in range(n):
      block(("stages", str(s), "layers"), first + j, j)
  block(("final_block",), cfg.depth - 1, None)
  return out


def lora_to_peft(cfg: MMDiTConfig, adapters, scale: float) -> tuple[dict, dict]:
  """(tensors, metadata) of a diffusers LoRA file: `transformer.<Linear>.lora_A.weight` (r, in) = Aᵀ and
  `….lora_B.weight` (out, r) = (scale·B)ᵀ, so the file's own scale is 1 (lora_alpha = r, as the metadata says):
  `SD3Transformer2DModel.load_lora_adapter(tensors)` and `pipe.load_lora_weights(dir)` reproduce our delta."""
  import json
  from mmdit_jax.model import lora
  if cfg.text_streams:
    raise ConversionError(f"text_streams={cfg.text_streams}: diffusers' SD3Transformer2DModel has one text stream")
  names = linear_names(cfg)
  flat_adapters = lora.flat(adapters)
  unknown = sorted("/".join(p) for p in flat_adapters if p not in names)
  if unknown:
    raise ConversionError(f"adapters on {unknown[:6]} have no diffusers Linear to map to")
  tensors, targets = {}, set()
  for path, ab in flat_adapters.items():
    a, b = np.asarray(ab["lora_a"], np.float32), np.asarray(ab["lora_b"], np.float32) * scale
    for index, theirs in names[path]:
      pick = (lambda x: x[index]) if index is not None else (lambda x: x)
      tensors[f"{PEFT_PREFIX}{theirs}.lora_A.weight"] = np.ascontiguousarray(pick(a).T)
      tensors[f"{PEFT_PREFIX}{theirs}.lora_B.weight"] = np.ascontiguousarray(pick(b).T)
      targets.add(theirs)
  rank = lora.rank_of(adapters)
  config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(targets), "init_lora_weights": True,
            "lora_dropout": 0.0, "bias": "none"}
  return tensors, {"format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def lora_from_peft(cfg: MMDiTConfig, tensors, lora_cfg, metadata: dict | None = None) -> dict:
  """Adapters (our nested layout, float32 numpy) from a diffusers / PEFT LoRA file's tensors, with the delta
  the file means (its lora_alpha / r from the metadata, else 1) at our scale lora_cfg.alpha / rank. Layers of a
  stack the file leaves out get zero adapters; names that are no Linear of this model, a rank other than
  lora_cfg.rank, or shapes other than the model's are errors naming them."""
  import json
  from mmdit_jax.model import lora
  file_scale = 1.0
  if metadata and LORA_METADATA_KEY in metadata:
    meta = json.loads(metadata[LORA_METADATA_KEY])
    file_scale = float(meta.get("lora_alpha", meta.get("r", 1))) / float(meta.get("r", 1))
  names = linear_names(cfg)
  where = {theirs: (path, index) for path, entries in names.items() for index, theirs in entries}
  pairs, bad = {}, []
  for key in tensors:
    name = key
    for prefix in (PEFT_PREFIX, "base_model.model."):
      name = name[len(prefix):] if name.startswith(prefix) else name
    m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
    if not m or m.group(1) not in where:
      bad.append(key)
      continue
    pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(tensors[key], np.float32)
  if bad:
    raise ConversionError(f"not LoRA weights of this MM-DiT's linear layers: {sorted(bad)[:6]} (expected "
                          f"'{PEFT_PREFIX}transformer_blocks.0.attn.to_q.lora_A.weight' and the like)")
  if not pairs:
    raise ConversionError("the file holds no LoRA weights")
  shapes = {p: s for p, s in lora.targeted(_abstract_kernels(cfg), ("all_linear",)).items()}
  out = {}
  for theirs, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise ConversionError(f"{theirs}: lora_A and lora_B come in pairs; the file has only lora_{''.join(ab)}")
    path, index = where[theirs]
    a, b = ab["A"].T, ab["B"].T * (file_scale / lora_cfg.scale)
    *lead, d_in, d_out = shapes[path]
    if a.shape[-1] != lora_cfg.rank or b.shape[0] != lora_cfg.rank:
      raise ConversionError(f"{theirs}: rank {a.shape[-1]} in the file, config.lora.rank={lora_cfg.rank}")
    if a.shape[0] != d_in or b.shape[1] != d_out:
      raise ConversionError(f"{theirs}: A {a.shape} / B {b.shape} do not fit the layer ({d_in} → {d_out})")
    entry = out.setdefault(path, {"lora_a": np.zeros((*lead, d_in, lora_cfg.rank), np.float32),
                                  "lora_b": np.zeros((*lead, lora_cfg.rank, d_out), np.float32)})
    sel = (index,) if index is not None else ()
    entry["lora_a"][sel] = a
    entry["lora_b"][sel] = b
  return lora.unflat(out)


def _abstract_kernels(cfg: MMDiTConfig):
  from mmdit_jax.model import api
  return api.abstract_params(cfg)


def read_peft(cfg: MMDiTConfig, path, lora_cfg) -> dict:
  """lora_from_peft of a LoRA .safetensors file, or of the pytorch_lora_weights.safetensors in a directory."""
  from etils import epath
  from safetensors import safe_open
  from mmdit_jax import paths
  path = epath.Path(path)
  if path.is_dir():
    path = path / PEFT_WEIGHTS
  if not path.is_file():
    raise ConversionError(f"no LoRA file at {path} (a .safetensors file, or a directory with {PEFT_WEIGHTS})")
  local = paths.local_copy(path, paths.cache_dir())
  with safe_open(str(local), framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return lora_from_peft(cfg, tensors, lora_cfg, metadata)


PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name (pipe.load_lora_weights(dir) finds it)
