"""Parity of the Flax encoders with the PyTorch references (tiny random models saved to safetensors),
the converters' errors, and the parameter counts of the real shapes."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from mmdit_jax.encoders import clip, clip_vision, convert, open_clip_layout, t5, vae
from mmdit_jax.model import api
from mmdit_jax.model.weights import ConversionError


def _rel(ours, ref):
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _ids(rng, b, n, vocab, eos):
  ids = rng.integers(1, vocab - 2, (b, n))
  for i, length in enumerate(rng.integers(3, n - 1, b)):  # EOS then padding, as the tokenizer writes
    ids[i, length] = eos
    ids[i, length + 1:] = 0
  return ids


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 97)])
def test_clip_text_matches_transformers(tmp_path, act, eos):
  import transformers
  torch.manual_seed(0)
  ref_cfg = transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
      max_position_embeddings=77, hidden_act=act, projection_dim=24, eos_token_id=eos)
  ref = transformers.CLIPTextModelWithProjection(ref_cfg).eval()
  ref.save_pretrained(tmp_path)
  ids = _ids(np.random.default_rng(0), 3, 77, 99, eos if eos != 2 else 98)
  with torch.no_grad():
    out = ref(torch.tensor(ids), output_hidden_states=True)
    unprojected = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()(torch.tensor(ids)).pooler_output

  cfg, params = convert.load_clip(tmp_path)
  assert (cfg.activation, cfg.projection_dim, cfg.pooled, cfg.depth) == (act, 24, "projected", 3)
  hidden, pooled = jax.jit(lambda p, x: api.apply(cfg, p, x))(params, ids)
  assert _rel(hidden, out.hidden_states[-2]) < 1e-4
  assert _rel(pooled, out.text_embeds) < 1e-4
  cfg_l = dataclasses.replace(cfg, pooled="unprojected")  # how SD3 takes CLIP-L's pooled vector
  _, pooled_l = jax.jit(lambda p, x: api.apply(cfg_l, p, x))(params, ids)
  assert _rel(pooled_l, unprojected) < 1e-4


@pytest.mark.parametrize("act,whole_clip", [("quick_gelu", False), ("gelu", True)])
def test_clip_vision_matches_transformers(tmp_path, act, whole_clip):
  """The image tower's embeddings equal CLIPVisionModelWithProjection's on the same pixels (a vision-only
  checkpoint, or a whole CLIPModel's file, whose text half the vision converter ignores)."""
  import transformers
  torch.manual_seed(0)
  vision = dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, hidden_act=act, projection_dim=24)
  if whole_clip:
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2), vision_config=vision, projection_dim=24)).eval()
    full.save_pretrained(tmp_path)
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
  else:
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision)).eval()
    ref.save_pretrained(tmp_path)
  pixels = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()

  cfg, params = convert.load_clip_vision(tmp_path)
  assert (cfg.image_size, cfg.patch_size, cfg.depth, cfg.activation, cfg.projection_dim) == (28, 7, 3, act, 24)
  got = jax.jit(lambda p, x: api.apply(cfg, p, x))(params, pixels)
  assert _rel(got, want) < 1e-4
  # The project's images in [−1, 1], any size: resized, cropped and normalised as CLIP expects.
  images = np.random.default_rng(1).uniform(-1, 1, (2, 40, 56, 3)).astype(np.float32)
  pre = np.asarray(clip_vision.preprocess(images, 28))
  assert pre.shape == (2, 28, 28, 3)
  np.testing.assert_allclose(pre.mean((0, 1, 2)), (0.5 - np.array(clip_vision.CLIP_MEAN)) / clip_vision.CLIP_STD,
                             atol=0.1)
  assert clip_vision.embed_images(cfg, params, images).shape == (2, 24)


@pytest.mark.parametrize("quick_gelu,with_config", [(False, False), (True, True)])
def test_open_clip_checkpoint_matches_open_clip(tmp_path, quick_gelu, with_config):
  """An OpenCLIP checkpoint (open_clip_model.safetensors; q/k/v packed in in_proj, projections stored (in, out))
  gives both towers' embeddings of OpenCLIP's own CLIP (tests/encoders/open_clip_reference.py) on the same
  pixels and ids; its config from open_clip_config.json (16-wide heads), or without one OpenCLIP's defaults
  (GELU, 64-wide heads)."""
  import json
  import safetensors.torch
  from tests.encoders import open_clip_reference
  torch.manual_seed(0)
  heads = 4 if with_config else 1
  ref = open_clip_reference.CLIP(embed_dim=24, image_size=28, patch_size=7, vision_width=64, vision_layers=2,
                                 vision_heads=heads, vocab_size=99, context_length=77, text_width=64,
                                 text_layers=2, text_heads=heads, quick_gelu=quick_gelu).eval()
  with torch.no_grad():
    for v in ref.state_dict().values():  # LayerNorms and biases away from 1 and 0 too
      v.add_(0.1 * torch.randn_like(v))
  safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
                              tmp_path / "open_clip_model.safetensors")
  if with_config:
    (tmp_path / open_clip_layout.CONFIG).write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 64, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 99, "width": 64, "heads": 4, "layers": 2}}}))
  pixels = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
  ids = _ids(np.random.default_rng(1), 3, 77, 99, 98)  # OpenCLIP pools at argmax(ids): EOT is the largest id
  with torch.no_grad():
    want_image = ref.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    want_text = ref.encode_text(torch.tensor(ids)).numpy()

  act = "quick_gelu" if quick_gelu else "gelu"
  vcfg, vparams = convert.load_clip_vision(tmp_path / "open_clip_model.safetensors")  # the file, or its directory
  assert (vcfg.image_size, vcfg.patch_size, vcfg.depth, vcfg.num_heads, vcfg.activation) == (28, 7, 2, heads, act)
  assert _rel(jax.jit(lambda p, x: api.apply(vcfg, p, x))(vparams, pixels), want_image) < 1e-4
  tcfg, tparams = convert.load_clip(tmp_path)
  assert (tcfg.num_heads, tcfg.activation, tcfg.pooled, tcfg.eos_token_id) == (heads, act, "projected", 2)
  assert _rel(jax.jit(lambda p, x: api.apply(tcfg, p, x)[1])(tparams, ids), want_text) < 1e-4


def test_open_clip_variants_it_does_not_implement_are_errors(tmp_path):
  import json
  import safetensors.torch
  from tests.encoders import open_clip_reference
  ref = open_clip_reference.CLIP(embed_dim=8, image_size=14, patch_size=7, vision_width=16, vision_layers=1,
                                 vision_heads=1, vocab_size=20, context_length=8, text_width=16, text_layers=1,
                                 text_heads=1)
  tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
  safetensors.torch.save_file({**tensors, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(16)},
                              tmp_path / "open_clip_model.safetensors")
  with pytest.raises(ConversionError, match=r"OpenCLIP tensors have no place.*ls_1\.gamma"):
    convert.load_clip_vision(tmp_path, num_heads=1)
  safetensors.torch.save_file(tensors, tmp_path / "open_clip_model.safetensors")
  (tmp_path / open_clip_layout.CONFIG).write_text(json.dumps({"model_cfg": {"vision_cfg": {"pool_type": "avg"}}}))
  with pytest.raises(ConversionError, match=r"vision_cfg\.pool_type = 'avg'"):
    convert.load_clip_vision(tmp_path, num_heads=1)


def test_t5_encoder_matches_transformers(tmp_path):
  import transformers
  torch.manual_seed(0)
  ref_cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                  relative_attention_max_distance=20)
  ref = transformers.T5EncoderModel(ref_cfg).eval()
  ref.save_pretrained(tmp_path)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 100, (2, 40))  # 40 tokens > max_distance: the log-spaced buckets are exercised
  mask = np.ones((2, 40), bool)
  mask[1, 25:] = False
  with torch.no_grad():
    want = ref(torch.tensor(ids)).last_hidden_state
    want_masked = ref(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state

  cfg, params = convert.load_t5(tmp_path)
  assert (cfg.num_heads, cfg.head_dim, cfg.num_buckets, cfg.max_distance, cfg.depth) == (4, 8, 8, 20, 2)
  f = jax.jit(lambda p, x, m: api.apply(cfg, p, x, m))
  assert _rel(jax.jit(lambda p, x: api.apply(cfg, p, x))(params, ids), want) < 1e-4
  got = np.asarray(f(params, ids, mask))
  assert _rel(got[:, :25], want_masked.numpy()[:, :25]) < 1e-4  # HF leaves padded rows unmasked too
  assert _rel(got, want_masked) < 1e-4


def test_t5_loads_tensor_by_tensor_into_its_shards(tmp_path):
  """T5-XXL is 19 GB in float32: it is read one tensor at a time, each parameter placed shard by shard on an
  8-way FSDP mesh (a layer stack's shard reads only its layers). Host memory beyond the placed parameters
  (tracemalloc: numpy's buffers) stays under 8× the largest tensor, on a checkpoint 60× that size."""
  import transformers
  from mmdit_jax import parallel
  from tests import helpers
  torch.manual_seed(0)
  ref = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=12, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8)).eval()
  ref.save_pretrained(tmp_path)
  sizes = [v.numel() * 4 for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"]
  largest, total = max(sizes), sum(sizes)
  assert total > 60 * largest
  mesh = parallel.make_mesh((1, 8, 1, 1))
  (cfg, params), used = helpers.host_memory_of(
      lambda: convert.load_t5(tmp_path, lambda c: api.param_shardings(c, mesh, parallel.DEFAULT_RULES)))
  assert used < 8 * largest, (used, largest, total)
  _, eager = convert.load_t5(tmp_path)  # the same parameters as an unsharded import
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert cfg.depth == 12


def test_float8_weights_as_sd3_t5xxl_fp8_files_store_them(tmp_path):
  """SD3's sd3_medium_incl_clips_t5xxlfp8 stores T5 in float8_e4m3fn, which safetensors' readers cannot
  give to numpy: such tensors are read from their bytes, to the same values torch reads."""
  import transformers
  from safetensors.torch import save_file
  torch.manual_seed(0)
  ref = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=32, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, feed_forward_proj="gated-gelu"))
  sd = {k: v.detach().clone() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
  fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in sd.items()}
  save_file(fp8, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
  cfg, params = convert.load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
  got = np.asarray(params["layers"]["layers"]["attn"]["q"]["kernel"].get_value())
  want = np.stack([fp8[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"].float().numpy().T for i in range(2)])
  np.testing.assert_array_equal(got, want)
  assert np.abs(want - np.stack([sd[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"].numpy().T
                                 for i in range(2)])).max() > 0  # (rounded to float8 indeed)


def _tiny_vae(tmp_path):
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=16, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).eval()
  ref.save_pretrained(tmp_path)
  return ref


def test_vae_matches_diffusers(tmp_path):
  ref = _tiny_vae(tmp_path)
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # non-square
  z = rng.standard_normal((2, 8, 12, 16)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.tensor(images).permute(0, 3, 1, 2)).latent_dist
    decoded = ref.decode(torch.tensor(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)

  cfg, params = convert.load_vae(tmp_path)
  assert (cfg.block_out_channels, cfg.layers_per_block, cfg.norm_groups) == ((8, 16), 1, 4)
  assert (cfg.scaling_factor, cfg.shift_factor) == (1.5305, 0.0609)
  mean, logvar = jax.jit(lambda p, x: api.apply(cfg, p, x, method="encode"))(params, images)
  assert _rel(mean, dist.mean.permute(0, 2, 3, 1)) < 1e-4
  assert _rel(logvar, dist.logvar.permute(0, 2, 3, 1)) < 1e-4
  assert _rel(jax.jit(lambda p, x: api.apply(cfg, p, x, method="decode"))(params, z), decoded) < 1e-4
  # The one place the SD3 normalisation is applied: encode_images ∘ from_latents is the posterior mean.
  latents = jax.jit(lambda p, x: vae.encode_images(cfg, p, x))(params, images)
  np.testing.assert_allclose(vae.from_latents(cfg, latents), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(latents, (np.asarray(mean) - 0.0609) * 1.5305, rtol=1e-5, atol=1e-6)


def test_converters_name_unknown_missing_and_wrong_tensors(tmp_path):
  from safetensors.numpy import save_file
  import transformers
  ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      hidden_act="gelu"))
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  cfg = convert.infer_clip_config(tensors, {"hidden_act": "gelu", "num_attention_heads": 2})
  with pytest.raises(ConversionError, match="no place in the model.*extra.weight"):
    convert.convert_clip({**tensors, "extra.weight": np.zeros(3, np.float32)}, cfg)
  broken = {k: v for k, v in tensors.items() if "layers.1.mlp.fc2.bias" not in k}
  with pytest.raises(ConversionError, match=r"lacks tensor '(text_model\.)?encoder.layers.1.mlp.fc2.bias'"):
    convert.convert_clip(broken, cfg)
  with pytest.raises(ConversionError, match="shape mismatch"):
    convert.convert_clip(tensors, dataclasses.replace(cfg, mlp_width=24))
  with pytest.raises(ConversionError, match="not a known checkpoint.*hidden_act"):
    convert.infer_clip_config(tensors, {"num_attention_heads": 2})  # not CLIP-L/bigG shaped
  with pytest.raises(ConversionError, match="heads are unknown"):
    convert.infer_clip_config(tensors, {"hidden_act": "gelu"})
  save_file(tensors, str(tmp_path / "clip.safetensors"))
  with pytest.raises(ConversionError, match="T5 v1.0"):
    convert.infer_t5_config({"encoder.block.0.layer.1.DenseReluDense.wi.weight": np.zeros((2, 2))})
  with pytest.raises(ConversionError, match="lacks tensor 'encoder.conv_in.weight'|layer indices"):
    convert.load_vae(tmp_path / "clip.safetensors")  # a checkpoint of another model
  with pytest.raises(ConversionError, match="no .safetensors"):
    convert.load_t5(tmp_path / "nothing_here")


def test_param_counts_of_the_real_shapes():
  counts = {name: api.param_count(c) / 1e6 for name, c in
            (("clip_l", clip.CLIP_L), ("clip_g", clip.CLIP_G), ("t5_xxl", t5.T5_XXL), ("vae", vae.SD3_VAE))}
  assert counts["clip_l"] == pytest.approx(123.65, abs=0.01)  # 123.06M + the 768² projection
  assert counts["clip_g"] == pytest.approx(694.66, abs=0.01)
  assert counts["t5_xxl"] == pytest.approx(4762.31, abs=0.01)
  assert counts["vae"] == pytest.approx(83.82, abs=0.01)
  # CLIP image towers with their projections: ViT-L/14 303.97M (CLIPModel's 427.62M less the 123.65M text
  # tower above), ViT-bigG/14 1844.9M (OpenCLIP's 2539.6M less 694.66M).
  assert api.param_count(clip_vision.CLIP_VIT_L14) / 1e6 == pytest.approx(303.97, abs=0.01)
  assert api.param_count(clip_vision.CLIP_VIT_BIGG14) / 1e6 == pytest.approx(1844.9, abs=0.1)


def test_clip_vision_config_of_bigg_without_config_json():
  """ViT-bigG/14's heads are 104 wide: without a config.json its 16 heads come from the known shapes (the
  default 64-wide heads would give 26). Inferred from the file header's shapes only (nothing is read)."""
  from mmdit_jax.model.weights import Derived
  p = "vision_model."
  shapes = {f"{p}embeddings.patch_embedding.weight": (1664, 3, 14, 14),
            f"{p}embeddings.position_embedding.weight": (257, 1664),
            f"{p}encoder.layers.0.mlp.fc1.weight": (8192, 1664), "visual_projection.weight": (1280, 1664),
            **{f"{p}encoder.layers.{i}.layer_norm1.weight": (1664,) for i in range(48)}}
  cfg = convert.infer_clip_vision_config(Derived({k: None for k in shapes}, shapes))
  assert cfg == clip_vision.CLIP_VIT_BIGG14
