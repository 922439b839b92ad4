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
                       vae_layers: int = 1) -> pathlib.Path:
  """Writes the checkpoint under `root`; `widths` = {clip_l, clip_g, t5} (default WIDTHS, tiny)."""
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
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=width,
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
