"""Super-resolution stages (noise-conditioning augmentation) and cascade sampling, on the tiny demo models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from PIL import Image

from mmdit_jax import cascade, sample, superres, train
from mmdit_jax.data import demo
from mmdit_jax.errors import ConfigError, UserError
from tests import helpers

# The tiny MM-DiT as a 32 → 64 super-resolution stage on the same scenes rendered at 64².
SR = {"sr.factor": 2, "sr.aug_max": 0.5, "sr.aug_level": 0.1, "model.lowres_channels": 3, "data.demo_size": 64,
      "model.sample_size": 64, "model.pos_embed_max_size": 8, "data.demo_examples": 32, "total_steps": 2,
      "checkpoint_every": 2, "sample_every": 2, "eval.num_samples": 4, "sample.steps": 2,
      "debug.log_data_order": False}


def test_training_condition_is_the_target_downsampled_upsampled_and_noised():
  cfg = helpers.config(**SR)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  low = superres.downsample(x, 2)
  np.testing.assert_allclose(low[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
  out = superres.training_condition(cfg, {"latent": x}, jax.random.key(0))
  assert out["lowres"].shape == x.shape and out["aug_level"].shape == (4,)
  assert bool(jnp.all((out["aug_level"] >= 0) & (out["aug_level"] <= cfg.sr.aug_max)))
  # at level 0 (rf: a = 1, b = 0) the conditioning is exactly the upsampled low-res image
  clean = superres.condition(cfg, low, jnp.zeros(4), jnp.ones_like(x))
  np.testing.assert_allclose(clean["lowres"], superres.upsample(low, (8, 8)), rtol=1e-6)
  noisy = superres.condition(cfg, low, jnp.full((4,), 0.5), jnp.ones_like(x))
  np.testing.assert_allclose(noisy["lowres"], 0.5 * superres.upsample(low, (8, 8)) + 0.5, rtol=1e-5, atol=1e-6)
  noise = jax.random.normal(jax.random.key(2), x.shape)
  np.testing.assert_allclose(superres.condition(cfg, low, jnp.ones(4), noise)["lowres"], noise, atol=1e-6)  # level 1
  fixed = superres.fixed_condition(cfg, {"latent": x}, jax.random.key(1))
  np.testing.assert_array_equal(fixed["aug_level"], np.full(4, 0.1, np.float32))
  with pytest.raises(ValueError, match="cannot be downsampled 3×"):
    superres.downsample(x, 3)


@pytest.mark.parametrize("factor", [2, 4])
def test_sr_stages_of_several_factors(factor):
  """The conditioning and a stage's prediction keep the target's shape for 2× and 4× (U-Net and MM-DiT)."""
  from mmdit_jax import model
  from mmdit_jax.model import unet
  side = 8 * factor
  cfg = helpers.config(**{**SR, "sr.factor": factor, "data.demo_size": side})
  x = jnp.zeros((2, side, side, 3))
  cond = superres.training_condition(cfg, {"latent": x}, jax.random.key(0))
  assert cond["lowres"].shape == x.shape
  text = {"context": jnp.zeros((2, 4, 32)), "pooled": jnp.zeros((2, 32)), "lowres": cond["lowres"],
          "aug_level": cond["aug_level"]}
  u = unet.UNetConfig(channels=8, channel_mult=(1, 2), num_res_blocks=(1, 1), attn_levels=(False, True),
                      cross_attn_levels=(False, True), num_heads=2, norm_groups=4, context_dim=32, pooled_dim=32,
                      lowres_channels=3)
  for m in (u, cfg.model):
    out = jax.eval_shape(lambda p: model.forward(m, p, x, jnp.zeros(2), text), model.abstract_params(m))
    assert out.shape == x.shape


def test_sr_config_errors_name_the_fields():
  with pytest.raises(ConfigError, match="sr.factor.*lowres_channels"):
    helpers.config(**{"sr.factor": 2})
  with pytest.raises(ConfigError, match="sr.factor.*lowres_channels"):
    helpers.config(**{"model.lowres_channels": 3})
  with pytest.raises(ConfigError, match="model.lowres_channels: 4"):
    helpers.config(**{"sr.factor": 2, "model.lowres_channels": 4})
  with pytest.raises(ConfigError, match="sr.upsample"):
    helpers.config(**{**SR, "sr.upsample": "lanczos"})
  with pytest.raises(ConfigError, match="sr.aug_max"):
    helpers.config(**{**SR, "sr.aug_max": 1.5})


def test_stage_specs_and_overrides(tmp_path):
  assert cascade.parse_stage("gs://bucket/run") == ("gs://bucket/run", {})
  assert cascade.parse_stage("gs://bucket/run:sample.steps=5,sr.aug_level=0.2") == (
      "gs://bucket/run", {"sample.steps": "5", "sr.aug_level": "0.2"})
  with pytest.raises(UserError, match="not a training workdir"):
    cascade.stage_config(str(tmp_path), {})
  (tmp_path / "config.json").write_text(json.dumps(helpers.config_dict(**SR).to_dict()))
  cfg = cascade.stage_config(str(tmp_path), {"sample.steps": "5", "sample.threshold": "dynamic"})
  assert cfg.sample.steps == 5 and cfg.sample.threshold == "dynamic" and cfg.sr.factor == 2
  with pytest.raises(UserError, match="unknown config field 'sample.stepz'"):
    cascade.stage_config(str(tmp_path), {"sample.stepz": "5"})
  with pytest.raises(UserError, match="is not a int"):
    cascade.stage_config(str(tmp_path), {"sample.steps": "many"})
  with pytest.raises(UserError, match="sample.threshold"):
    cascade.stage_config(str(tmp_path), {"sample.threshold": "hard"})


@pytest.mark.xdist_group("straight")  # (shares the session's straight run as its base stage)
def test_cascade_end_to_end(straight, tmp_path):
  """The tiny base run, a 2-step SR stage trained here (its sample evaluation scores PSNR beside bicubic), then
  prompts → 32² → 64² PNGs with a sweep of the augmentation level."""
  base_dir, _ = straight
  sr_dir = tmp_path / "sr"
  summary = train.train_and_evaluate(helpers.config(**SR), sr_dir)
  assert summary["step"] == 2
  results = json.loads((sr_dir / "results.json").read_text())
  assert {"sr/psnr", "sr/psnr_bicubic", "val_ema/loss"} <= set(results)
  assert results["sr/psnr_bicubic"] > 15  # bicubic from the exact low-res scene is close to the truth
  # An SR stage alone cannot sample: it needs the stage below.
  with pytest.raises(UserError, match="super-resolution stage"):
    sample.generate(helpers.config(**SR), sr_dir, [sample.Request("a red circle at the top left")])
  rng = np.random.default_rng(0)
  prompts = [demo.caption(demo.random_scene(rng)) for _ in range(2)]
  report = cascade.run_cascade(helpers.config(**{"sample.steps": 2}), base_dir,
                               [f"{sr_dir}:sample.steps=3,sr.aug_level=0.2"], prompts, aug_sweep=(0.3,))
  out = epath.Path(base_dir) / "cascade"
  assert [s["size"] for s in report["stages"]] == [[32, 32], [64, 64]]
  assert report["stages"][1]["aug_level"] == 0.2 and report["stages"][1]["steps"] == 3
  assert {"accuracy_all", "psnr"} <= set(report["stages"][1])
  for k, side in ((0, 32), (1, 64)):
    pngs = sorted((out / f"stage_{k}").glob("0*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (side * max(1, 128 // side),) * 2
  assert [r["aug_level"] for r in report["aug_sweep"]] == [0.3]
  assert "| 0.300 |" in (out / "aug_sweep.md").read_text()
  assert json.loads((out / "cascade.json").read_text())["stages"][0]["workdir"] == str(base_dir)
  with pytest.raises(UserError, match="not a super-resolution stage"):
    cascade.run_cascade(helpers.config(), base_dir, [str(base_dir)], prompts)


def test_imagen_recipe_presets():
  from configs import imagen
  from mmdit_jax import config as config_lib
  from mmdit_jax.model import unet
  base = config_lib.from_config_dict(imagen.get_config("stage=base,size=paper"))
  assert base.model == unet.imagen_unet("base64", dtype="bfloat16", remat="dots_no_batch", scan_layers=True)
  assert base.formulation.name == "eps/cos" and base.sample.threshold == "dynamic" and base.data.text_dropout == 0.1
  assert base.sr.factor == 0 and base.data.resolution == 64
  sr = config_lib.from_config_dict(imagen.get_config("stage=sr,size=paper,pred=v"))
  assert sr.sr.factor == 4 and sr.model.lowres_channels == 3 and sr.data.resolution == 256
  assert sr.formulation.name == "v/cos" and sr.sr.aug_max == 0.5
  demo_sr = config_lib.from_config_dict(imagen.get_config("stage=sr,aug=0,backbone=mmdit"))
  assert demo_sr.data.demo_size == 64 and demo_sr.sr.aug_max == 0.0 and demo_sr.model.sample_size == 64
  assert demo_sr.formulation.name.startswith("rf/lognorm")
  for bad, match in (("stage=sr512", "unknown stage"), ("stage=sr1024", "size=paper"),
                     ("size=paper,backbone=mmdit", "backbone=unet"), ("pred=x0", "unknown pred")):
    with pytest.raises(ConfigError, match=match):
      imagen.get_config(bad)
