"""Official weights without training, image for image: a tiny random SD3 pipeline saved in diffusers'
layout is sampled by `--mode=sample --config.init=diffusers:DIR` and by diffusers' StableDiffusion3Pipeline
with the same noise, prompts, negative prompts, steps, guidance, T5 length and clip_skip; the images agree
to 1e-3 in [0, 1] (sample.save_arrays' float images), and the PNGs are those images rounded."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("sd3_pipeline")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from mmdit_jax import errors, evaluate, pretrained, sample  # noqa: E402
from tests import helpers  # noqa: E402
from tests import torch_reference as tiny  # noqa: E402

PROMPTS = [("a red circle at the top left", "a blue square"), ("a green triangle", "")]


TRANSFORMERS = {"sd3": {}, "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0,))}  # SD3.5: QK-norm, MMDiT-X


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
  """variant → a diffusers SD3 (or SD3.5-shaped) pipeline directory, written on first use: tiny random
  encoders (T5 wider than CLIP-L ‖ bigG, as in SD3, and CLIP-L's text_projection the identity, as in SD3's
  weights), an 8× VAE, a transformer, a shift-3 scheduler."""
  made = {}

  def get(variant):
    if variant not in made:
      made[variant] = _write_pipeline(tmp_path_factory.mktemp(f"{variant}_pipeline"), variant)
    return made[variant]
  return get


# "sd3_file": the shapes an SD3 single file implies without config.json (CLIP head dim 64, 32 VAE norm groups)
ENCODERS = {"sd3": dict(widths={"t5": 96}, vae_blocks=(8, 8, 16, 16)),
            "sd3_file": dict(widths={"clip_l": 64, "clip_g": 128, "t5": 96}, clip_head_dim=64,
                             vae_blocks=(32, 32, 32, 32), vae_groups=32)}


SHAPES = {"sd3": dict(attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=96,
                      pooled_projection_dim=80),
          "sd3_file": dict(attention_head_dim=64, num_attention_heads=1, caption_projection_dim=64,
                           joint_attention_dim=192, pooled_projection_dim=192)}


def _write_pipeline(root, variant):
  tiny.write_sd3_encoders(root, **ENCODERS.get(variant, ENCODERS["sd3"]))
  clip_l = transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder")
  with torch.no_grad():
    clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
  clip_l.save_pretrained(root / "text_encoder")
  torch.manual_seed(1)
  diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, pos_embed_max_size=8,
      **TRANSFORMERS.get(variant, {}), **SHAPES.get(variant, SHAPES["sd3"])).save_pretrained(root / "transformer")
  diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
  return root


def _pipeline(root):
  auto = transformers.AutoTokenizer.from_pretrained
  return diffusers.StableDiffusion3Pipeline(
      transformer=diffusers.SD3Transformer2DModel.from_pretrained(root / "transformer"),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
      vae=diffusers.AutoencoderKL.from_pretrained(root / "vae"),
      text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder"),
      tokenizer=auto(root / "tokenizer"),
      text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
      tokenizer_2=auto(root / "tokenizer_2"),
      text_encoder_3=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_3"),
      tokenizer_3=auto(root / "tokenizer_3"))


@pytest.mark.parametrize("variant,steps,guidance,height,width,skip,t5_tokens,clip_skip", [
    ("sd3", 4, 7.0, 64, 64, (), 77, 0), ("sd3", 4, 1.0, 32, 64, (), 256, 1), ("sd35", 28, 5.0, 64, 32, (1,), 77, 0),
    ("sd35", 4, 7.0, 64, 64, (), 256, 0)])
def test_sample_mode_matches_the_diffusers_pipeline(sd3_dirs, tmp_path, variant, steps, guidance, height, width,
                                                    skip, t5_tokens, clip_skip):
  """skip: SD3.5's skip-layer guidance (scale 2.8 on steps 1..5 of 28, as SD3.5's defaults place it);
  t5_tokens: T5's sequence length (diffusers' max_sequence_length, 256 by default); clip_skip as diffusers'."""
  sd3_dir = sd3_dirs(variant)
  requests = [sample.Request(p, n, seed=10 + i) for i, (p, n) in enumerate(PROMPTS)]
  cfg = helpers.config(**{"init": f"diffusers:{sd3_dir}", "sample.steps": steps, "sample.guidance": guidance,
                          "sample.height": height, "sample.width": width, "encoders.t5_tokens": t5_tokens,
                          "encoders.clip_skip": clip_skip,
                          "sample.skip_layers": skip, "mesh.ici.data": 2, "mesh.ici.fsdp": 4,
                          "sample.save_arrays": True})
  paths = sample.run_sample(cfg, tmp_path / "run", requests)
  pngs = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths])
  ours = np.load(tmp_path / "run" / "generated" / "images.npy")
  records = [json.loads(l) for l in (tmp_path / "run" / "generated" / "generated.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 0] and [r["seed"] for r in records] == [10, 11]

  shape = (height // 8, width // 8, 16)
  noise = np.stack([evaluate.sample_noise(r.seed, [0], shape)[0] for r in requests])
  with torch.no_grad():
    theirs = _pipeline(sd3_dir)(
        prompt=[p for p, _ in PROMPTS], negative_prompt=[n for _, n in PROMPTS], num_inference_steps=steps,
        guidance_scale=guidance, height=height, width=width, max_sequence_length=t5_tokens, output_type="np",
        skip_guidance_layers=list(skip) or None, clip_skip=clip_skip or None,
        latents=torch.from_numpy(noise).permute(0, 3, 1, 2)).images
  assert ours.shape == theirs.shape == pngs.shape == (2, height, width, 3)
  assert theirs.std() > 0.01  # (a non-trivial image)
  assert np.abs(ours - theirs).max() <= 1e-3, np.abs(ours - theirs).max()
  assert np.abs(pngs - ours).max() <= 0.5 / 255 + 1e-6  # the PNGs: the same images, rounded


def test_init_errors(tmp_path):
  with pytest.raises(errors.ConfigError, match="expected 'diffusers:/path/to/sd3-diffusers'"):
    pretrained.parse("hub:stabilityai/sd3")
  with pytest.raises(errors.ConfigError, match="does not exist"):
    pretrained.parse(f"diffusers:{tmp_path / 'missing'}")


def test_fine_tuning_starts_from_the_imported_weights(sd3_dirs, tmp_path):
  """The same `init` fine-tunes: with no checkpoint yet, the train state is the imported transformer (EMA
  too) placed in its shardings, the model config read from the weights and the shift from the scheduler;
  without a dataset to fine-tune on, the run says so before anything loads."""
  import jax
  from mmdit_jax import inputs, model, parallel
  from mmdit_jax.checkpoint import Checkpointer
  from mmdit_jax.state import make_optimizer, restore_or_init
  sd3_dir = sd3_dirs("sd3")
  cfg = helpers.config(**{"init": f"diffusers:{sd3_dir}", "data.path": "/data/latents"})
  resolved, load = pretrained.resolve(cfg)
  assert resolved.model.depth == 2 and resolved.model.context_dim == 96 and resolved.formulation.shift == 3.0
  assert resolved.encoders.root == str(sd3_dir)
  mesh = parallel.make_mesh((2, 4, 1, 1))
  ckpt = Checkpointer(tmp_path / "checkpoints")
  try:
    state, start, _ = restore_or_init(resolved, make_optimizer(resolved.optim, 10)[0], mesh, ckpt, init_params=load)
  finally:
    ckpt.close()
  imported = model.from_diffusers(sd3_dir / "transformer")[1]
  assert start == 0
  for tree in (state["params"], state["ema"]):
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(jax.tree.leaves(imported))
    for a, b in zip(leaves, jax.tree.leaves(imported)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.ConfigError, match="fine-tunes official weights on a dataset: set config.data.path"):
    inputs.dataset_paths(helpers.config(**{"init": f"diffusers:{sd3_dir}"}))


def _run_workdir(path):
  """A run's workdir (config.json + a checkpoint at step 3) with random, non-zero weights everywhere."""
  import jax
  from mmdit_jax import model
  from mmdit_jax.checkpoint import Checkpointer
  from mmdit_jax.state import make_optimizer, state_from_params
  cfg = helpers.config()
  path.mkdir()
  (path / "config.json").write_text(cfg.source)
  tx = make_optimizer(cfg.optim, cfg.total_steps)[0]

  @jax.jit
  def make(key):
    params = model.init_unjitted(cfg.model, key)
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(key, x.shape), params)  # (no zero layers)
    return state_from_params(params, tx)
  state = make(jax.random.key(0))
  ckpt = Checkpointer(path / "checkpoints")
  ckpt.save(3, state, {"iterator": {}})
  ckpt.close()
  return state


def test_export_round_trip(tmp_path):
  """A run exported (EMA) loads in diffusers' SD3Transformer2DModel and gives our forward's output;
  imported back through config.init it is the same parameters."""
  import jax
  import jax.numpy as jnp
  from mmdit_jax import export, model
  workdir = tmp_path / "run"
  state = _run_workdir(workdir)
  out = export.export(workdir, tmp_path / "exported")
  cfg = export.run_config(workdir)
  ref = diffusers.SD3Transformer2DModel.from_pretrained(out).eval()
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 16, 24, cfg.model.in_channels)).astype(np.float32)  # non-square
  t = np.array([0.3, 0.9], np.float32)
  context = rng.standard_normal((2, 5, cfg.model.context_dim)).astype(np.float32)
  pooled = rng.standard_normal((2, cfg.model.pooled_dim)).astype(np.float32)
  ours = np.asarray(model.forward(cfg.model, state["ema"], jnp.asarray(z), jnp.asarray(t),
                                  {"context": jnp.asarray(context), "pooled": jnp.asarray(pooled)}))
  with torch.no_grad():
    theirs = ref(hidden_states=torch.from_numpy(z).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(context),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(1000 * t),
                 return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
  back_cfg, back = model.from_diffusers(out)
  assert back_cfg.depth == cfg.model.depth and back_cfg.width == cfg.model.width
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state["ema"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(errors.UserError, match="config.json does not exist"):
    export.export(tmp_path, tmp_path / "x")


def test_single_file_checkpoint_with_bundled_encoders(sd3_dirs, tmp_path):
  """An SD3 single file (MM-DiT, CLIP-L, bigG, T5 in transformers' names under text_encoders.*, the VAE in
  its original LDM names, as diffusers' single-file converter reads them) gives the same encoders as the
  diffusers directory it was made from; config.init on it uses them, with config.encoders.tokenizers."""
  import jax
  from mmdit_jax.encoders import convert
  sd3_dir = sd3_dirs("sd3_file")
  single = tiny.write_sd3_single_file(sd3_dir, tmp_path / "sd3_medium_incl_clips_t5xxl.safetensors")
  for part, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3"),
                    ("vae", "vae")):
    load = {"clip_l": convert.load_clip, "clip_g": convert.load_clip, "t5": convert.load_t5,
            "vae": convert.load_vae}[part]
    kw = {"part": part} if part.startswith("clip") else {}
    (cfg_a, a), (cfg_b, b) = load(single, **kw), load(sd3_dir / sub)
    if part.startswith("clip"):  # pooled at argmax(ids) (SD3's reference) = at the EOS (the largest id)
      cfg_b = dataclasses.replace(cfg_b, eos_token_id=2)
    assert cfg_a == cfg_b, part
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # config.init on the file: the encoders it bundles (identical parameters, above) and its tokenizers from
  # config.encoders.tokenizers — the same encoders as the directory's, so the same images.
  from mmdit_jax.encoders import sd3
  cfg = helpers.config(**{"init": f"diffusers:{single}", "encoders.tokenizers": str(sd3_dir)})
  resolved, _ = pretrained.resolve(cfg)
  assert (resolved.encoders.clip_l, resolved.encoders.t5, resolved.encoders.vae) == (str(single),) * 3
  paths = sd3.EncoderPaths.from_config(resolved.encoders)
  assert paths.clip_g == str(single) and paths.t5_tokenizer == str(sd3_dir / "tokenizer_3")
  bare, _ = pretrained.resolve(helpers.config(**{"init": f"diffusers:{single}"}))
  with pytest.raises(errors.UserError, match="set config.encoders.tokenizers"):
    sd3.EncoderPaths.from_config(bare.encoders)
