"""Randomly initialised SD3 encoder checkpoints in the diffusers layout (text_encoder, text_encoder_2,
text_encoder_3, tokenizer, tokenizer_2, tokenizer_3, vae), written by the PyTorch reference libraries
(transformers, diffusers and torch: the `test` extra). Tests and benchmarks use them where real weights
cannot be downloaded; the package itself never imports this module."""

import json
import pathlib

WORDS = ("a red green blue yellow circle square triangle at the top bottom left right and photo of "
         "cat dog").split()
WIDTHS = {"clip_l": 32, "clip_g": 48, "t5": 64}  # context width max(32 + 48, 64) = 80; pooled 32 + 48


def _bytes_to_unicode():
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(path, pad="<|endoftext|>") -> dict:
  """A byte-level BPE vocabulary in CLIP's format whose merges spell out WORDS; returns the vocab."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  base = list(_bytes_to_unicode().values())
  vocab, merges = base + [b + "</w>" for b in base], []
  for w in WORDS:
    parts = list(w[:-1]) + [w[-1] + "</w>"]
    while len(parts) > 1:
      merge = f"{parts[0]} {parts[1]}"
      if merge not in merges:
        merges.append(merge)
      parts = [parts[0] + parts[1]] + parts[2:]
      if parts[0] not in vocab:
        vocab.append(parts[0])
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  table = {t: i for i, t in enumerate(vocab)}
  (path / "vocab.json").write_text(json.dumps(table))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}))
  return table


def write_t5_tokenizer(path):
  import transformers
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  t = Tokenizer(models.Unigram())
  t.normalizer = normalizers.NFKC()
  t.pre_tokenizer = pre_tokenizers.Metaspace()
  t.decoder = decoders.Metaspace()
  t.train_from_iterator([" ".join(WORDS)] * 10, trainers.UnigramTrainer(
      vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
  t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  transformers.T5TokenizerFast(tokenizer_object=t, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                               extra_ids=0).save_pretrained(str(path))


def write_sd3_encoders(root, *, widths=None, depth: int = 2, vae_blocks=(8, 16), vae_groups: int = 4,
                       vae_layers: int = 1, clip_head_dim: int | None = None) -> pathlib.Path:
  """Writes the checkpoint under `root`; `widths` = {clip_l, clip_g, t5} (default WIDTHS, tiny); the CLIPs
  have 4 heads, or heads of clip_head_dim (SD3's: 64)."""
  widths = {**WIDTHS, **(widths or {})}
  import torch
  import transformers
  from diffusers import AutoencoderKL
  root = pathlib.Path(root)
  torch.manual_seed(0)
  vocab_l = write_clip_tokenizer(root / "tokenizer")
  write_clip_tokenizer(root / "tokenizer_2", pad="!")  # bigG pads with "!", as SD3's tokenizer_2 does
  write_t5_tokenizer(root / "tokenizer_3")
  for sub, width, act in (("text_encoder", widths["clip_l"], "quick_gelu"),
                          ("text_encoder_2", widths["clip_g"], "gelu")):
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(vocab_l), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
        num_attention_heads=width // clip_head_dim if clip_head_dim else 4, max_position_embeddings=77, hidden_act=act, projection_dim=width,
        bos_token_id=len(vocab_l) - 2, eos_token_id=len(vocab_l) - 1, pad_token_id=len(vocab_l) - 1)
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(root / sub)
  transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=64, d_model=widths["t5"], d_kv=16, num_heads=widths["t5"] // 16, d_ff=2 * widths["t5"],
      num_layers=depth,
      feed_forward_proj="gated-gelu")).save_pretrained(root / "text_encoder_3")
  AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), block_out_channels=vae_blocks,
                layers_per_block=vae_layers, latent_channels=16, norm_num_groups=vae_groups, sample_size=32,
                use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(root / "vae")
  return root


def sd3_single_file(state_dict):
  """diffusers SD3 tensors → SD3's single-file layout (the inverse of diffusers' own single-file converter,
  which the test checks), with a bundled-VAE tensor that the import must leave alone."""
  import torch
  from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
  sd = {k: v.clone() for k, v in state_dict.items()}
  n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
  swap = lambda x: torch.cat(x.chunk(2, dim=0)[::-1])
  out = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
         "x_embedder.proj.bias": sd["pos_embed.proj.bias"]}
  for ours, theirs in (("time_text_embed.timestep_embedder", "t_embedder"), ("time_text_embed.text_embedder", "y_embedder")):
    for j, k in (("linear_1", 0), ("linear_2", 2)):
      for w in ("weight", "bias"):
        out[f"{theirs}.mlp.{k}.{w}"] = sd[f"{ours}.{j}.{w}"]
  for w in ("weight", "bias"):
    out[f"context_embedder.{w}"] = sd[f"context_embedder.{w}"]
    out[f"final_layer.linear.{w}"] = sd[f"proj_out.{w}"]
    out[f"final_layer.adaLN_modulation.1.{w}"] = swap(sd[f"norm_out.linear.{w}"])
    for i in range(n):
      b, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
      out[f"{b}.x_block.attn.qkv.{w}"] = torch.cat([sd[f"{t}.attn.to_{x}.{w}"] for x in "qkv"])
      out[f"{b}.context_block.attn.qkv.{w}"] = torch.cat([sd[f"{t}.attn.add_{x}_proj.{w}"] for x in "qkv"])
      out[f"{b}.x_block.attn.proj.{w}"] = sd[f"{t}.attn.to_out.0.{w}"]
      out[f"{b}.x_block.adaLN_modulation.1.{w}"] = sd[f"{t}.norm1.linear.{w}"]
      ctx_mod = sd[f"{t}.norm1_context.linear.{w}"]
      out[f"{b}.context_block.adaLN_modulation.1.{w}"] = swap(ctx_mod) if i == n - 1 else ctx_mod
      out[f"{b}.x_block.mlp.fc1.{w}"] = sd[f"{t}.ff.net.0.proj.{w}"]
      out[f"{b}.x_block.mlp.fc2.{w}"] = sd[f"{t}.ff.net.2.{w}"]
      if i < n - 1:
        out[f"{b}.context_block.attn.proj.{w}"] = sd[f"{t}.attn.to_add_out.{w}"]
        out[f"{b}.context_block.mlp.fc1.{w}"] = sd[f"{t}.ff_context.net.0.proj.{w}"]
        out[f"{b}.context_block.mlp.fc2.{w}"] = sd[f"{t}.ff_context.net.2.{w}"]
      if f"{t}.attn2.to_q.{w}" in sd:
        out[f"{b}.x_block.attn2.qkv.{w}"] = torch.cat([sd[f"{t}.attn2.to_{x}.{w}"] for x in "qkv"])
        out[f"{b}.x_block.attn2.proj.{w}"] = sd[f"{t}.attn2.to_out.0.{w}"]
  for i in range(n):
    b, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
    for src, dst in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                     ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                     ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
      if f"{t}.{dst}.weight" in sd:
        out[f"{b}.{src}.weight"] = sd[f"{t}.{dst}.weight"]
  single = {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}
  back = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
  assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # diffusers agrees
  single["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)  # a bundled VAE tensor
  return single

def ldm_vae(state_dict, prefix="first_stage_model."):
  """diffusers AutoencoderKL tensors → the original (LDM) autoencoder's names, as SD3's single files bundle
  them (the inverse of diffusers' convert_ldm_vae_checkpoint, which the caller can check against)."""
  import re
  n_up = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  out = {}
  for k, v in state_dict.items():
    n = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", n)
    n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
    n = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", n)
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", n)
    if m:
      n = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
      if m.group(3) == "weight" and v.ndim == 2:
        v = v[:, :, None, None]  # 1×1 convolutions there
    n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.", n)
    n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", n)
    out[prefix + n.replace("conv_shortcut", "nin_shortcut")] = v.contiguous()
  return out


def write_sd3_single_file(pipeline_dir, path, t5: bool = True):
  """An SD3 single file (sd3_medium_incl_clips[_t5xxl].safetensors layout) from a diffusers SD3 pipeline
  directory: the MM-DiT, CLIP-L, bigG (and T5) under text_encoders.*.transformer., the VAE in LDM names."""
  import diffusers
  import transformers
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  from safetensors.torch import save_file
  root = pathlib.Path(pipeline_dir)
  out = sd3_single_file(diffusers.SD3Transformer2DModel.from_pretrained(root / "transformer").state_dict())
  out = {k: v for k, v in out.items() if not k.startswith("first_stage_model.")}
  for role, sub, cls in (("clip_l", "text_encoder", transformers.CLIPTextModelWithProjection),
                         ("clip_g", "text_encoder_2", transformers.CLIPTextModelWithProjection),
                         ("t5xxl", "text_encoder_3", transformers.T5EncoderModel)):
    if role == "t5xxl" and not t5:
      continue
    for k, v in cls.from_pretrained(root / sub).state_dict().items():
      if not k.endswith("position_ids"):
        out[f"text_encoders.{role}.transformer.{k}"] = v.detach().clone()
  autoencoder = diffusers.AutoencoderKL.from_pretrained(root / "vae")
  vae = ldm_vae(autoencoder.state_dict())
  back = convert_ldm_vae_checkpoint(dict(vae), dict(autoencoder.config))
  sd = autoencoder.state_dict()
  assert sorted(back) == sorted(sd) and all(torch_equal(back[k], sd[k]) for k in sd)  # diffusers agrees
  out.update(vae)
  save_file(out, str(path))
  return path


def torch_equal(a, b) -> bool:
  import torch
  return a.shape == b.shape and bool(torch.equal(a.reshape(b.shape), b))
