"""Configs as complete data: every backbone field overridable from the command line, per-axis mesh sizes,
sharding rules as data, presets by name, configs that load from any working directory."""

import dataclasses
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from mmdit_jax import config as config_lib
from mmdit_jax import errors, model
from tests import helpers

# A value other than the default for every field type of the backbone dataclasses.
NEW_VALUES = {"depth": 3, "hidden_size": 96, "num_heads": 3, "mlp_ratio": 2.0, "patch_size": 4, "in_channels": 3,
              "out_channels": 6, "context_dim": 40, "pooled_dim": 24, "pos_embed_max_size": 16, "sample_size": 8,
              "qk_norm": True, "dual_attention_layers": (0, 1), "text_streams": (16, 16), "dtype": "bfloat16",
              "attention": "dot_product", "remat": "names", "remat_names": ("qkv", "attn_out"), "scan_layers": False,
              "splash_block_q": 256, "splash_block_kv": 1024,
              "input_size": 16,
              "block": "cross_attn", "conditioning": "text", "num_classes": 7, "long_skip": True,
              "lowres_channels": 3, "channels": 24, "channel_mult": (1, 2), "num_res_blocks": (2, 1),
              "attn_levels": (True, False), "cross_attn_levels": (False, True), "ff_mult": 1.0, "layout": "ddpm",
              "skip_scale": 0.5, "norm_groups": 4, "text_attention": "joint", "attn_every_block": True}


def _parse(config_arg, *overrides):
  """The ConfigDict exactly as `--config=… --config.x=…` on the command line gives it."""
  argv = ["prog", f"--config={config_arg}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def _cli(value):
  return str(value).replace(" ", "") if isinstance(value, tuple) else value


@pytest.mark.parametrize("config_arg,cls", [("configs/rf_lognorm.py", model.MMDiTConfig),
                                            ("configs/dit.py:variant=S/2", model.DiTConfig),
                                            ("configs/imagen.py", model.UNetConfig)])
def test_every_model_field_is_overridable_from_the_command_line(config_arg, cls):
  fields = [f.name for f in dataclasses.fields(cls)]
  c = _parse(str(helpers.ROOT / config_arg))
  assert sorted(k for k in c.model.keys() if k != "name") == sorted(fields)  # complete: every field present
  overrides = [f"--config.model.{f}={_cli(NEW_VALUES[f])}" for f in fields]
  parsed = config_lib.model_config(_parse(str(helpers.ROOT / config_arg), *overrides).model)
  for f in fields:
    assert getattr(parsed, f) == NEW_VALUES[f], f


def test_mesh_sizes_by_axis_name_and_rules_as_data():
  c = _parse(str(helpers.ROOT / "configs/rf_lognorm.py"), "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=-1",
             "--config.sharding_rules=(('embed','fsdp'),('act_batch',('data','fsdp')))")
  cfg = config_lib.from_config_dict(c)
  assert cfg.mesh.ici == (2, -1, 1, 1) and cfg.mesh.named()["ici"]["fsdp"] == -1
  assert cfg.sharding_rules == (("embed", "fsdp"), ("act_batch", ("data", "fsdp")))
  with c.unlocked():  # a config file that builds its own ConfigDict can add any key: checked all the same
    c.mesh.ici.pipeline = 2
  with pytest.raises(errors.ConfigError, match=r"unknown mesh axes \['pipeline'\]"):
    config_lib.from_config_dict(c)


def test_presets_by_name_and_preset_arguments():
  from configs import rf_lognorm
  cfg = config_lib.from_config_dict(rf_lognorm.get_config("size=2b,res=1024,batch=64"))
  assert cfg.model.depth == 24 and cfg.model.sample_size == 128 and cfg.data.global_batch_size == 64
  assert cfg.data.resolution == 1024 and config_lib.from_config_dict(rf_lognorm.get_config("size=2b")).data.resolution == 256
  assert cfg.formulation.shift == 3.0 and cfg.optim.eps == 1e-15
  assert config_lib.from_config_dict(rf_lognorm.get_config("res=512")).formulation.shift == 2.0
  with pytest.raises(errors.ConfigError, match=r"unknown size 'huge'; valid: \['2b', '8b', 'demo', 'tiny'\]"):
    rf_lognorm.get_config("size=huge")
  with pytest.raises(errors.ConfigError, match=r"unknown config arg 'sz'"):
    rf_lognorm.get_config("sz=2b")


def test_reference_sampling_presets():
  """sampling=NAME: the inference settings of SD3.5's reference code, on SD3's grid with their own shift."""
  import numpy as np
  from configs import rf_lognorm
  from mmdit_jax import evaluate
  from mmdit_jax.flow import samplers
  cfg = config_lib.from_config_dict(rf_lognorm.get_config("size=2b,sampling=sd3.5_medium_slg"))
  s = cfg.sample
  assert (s.sampler, s.steps, s.guidance, s.shift, s.schedule) == ("dpmpp_2m_sd3", 50, 5.0, 3.0, "reference")
  assert (s.skip_layers, s.skip_scale, s.skip_interval, s.height, s.width) == ((7, 8, 9), 2.5, (0.01, 0.2), 1024, 1024)
  assert cfg.formulation.shift == 1.0  # (2b at 256²) training's shift is untouched; the grid takes the sampler's
  np.testing.assert_allclose(evaluate.sampling_grid(cfg), samplers.reference_grid(50, 3.0))
  large = config_lib.from_config_dict(rf_lognorm.get_config("sampling=sd3.5_large")).sample
  assert (large.sampler, large.steps, large.guidance, large.skip_layers) == ("dpmpp_2m_sd3", 40, 4.5, ())
  with pytest.raises(errors.ConfigError, match=r"sampling='sd4'; valid: \['diffusers', 'sd3.5_large'"):
    rf_lognorm.get_config("sampling=sd4")


def test_configs_load_from_any_working_directory(tmp_path):
  """Each config file loads through --config from another working directory (one process parses all three)."""
  args = ("configs/rf_lognorm.py:size=2b", "configs/dit.py:variant=B/4", "configs/precompute.py")
  code = ("from ml_collections import config_flags; from absl import flags; import sys\n"
          "config_flags.DEFINE_config_file('config')\n"
          "from mmdit_jax import config\n"
          "for arg in sys.argv[1:]:\n"
          "  flags.FLAGS(['load', '--config=' + arg])\n"
          "  try:\n"
          "    print(arg, config.from_config_dict(flags.FLAGS.config).model.depth)\n"
          "  except Exception as e:\n"
          "    print(arg, 'error:', str(e).splitlines()[0])\n")
  proc = subprocess.run([sys.executable, "-c", code, *(str(helpers.ROOT / a) for a in args)], cwd=tmp_path,
                        env={k: v for k, v in helpers.env().items() if k != "PYTHONPATH"}, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
  assert list(lines) == [str(helpers.ROOT / a) for a in args], proc.stdout
  rf, dit, precompute = lines.values()
  assert rf == "24" and dit == "12"
  assert precompute.startswith("error:") and "config has unknown fields" in precompute  # not a training config


def test_xla_flag_presets(monkeypatch):
  """config.xla_flags: a preset's flags join what the environment already sets (which wins)."""
  from mmdit_jax import xla_presets
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_enable_async_all_gather=false --xla_tpu_foo=1")
  env = xla_presets.apply("tpu_overlap")
  flags = env["LIBTPU_INIT_ARGS"].split()
  assert flags[:2] == ["--xla_enable_async_all_gather=false", "--xla_tpu_foo=1"]
  assert "--xla_tpu_enable_async_collective_fusion=true" in flags and "--xla_enable_async_all_gather=true" not in flags
  assert xla_presets.apply("tpu_overlap") == env  # applying twice adds nothing
  assert helpers.config(xla_flags="tpu_overlap_dp").xla_flags == "tpu_overlap_dp"
  with pytest.raises(errors.ConfigError, match=r"config.xla_flags='fast'; valid: \['gpu_overlap', 'none'"):
    helpers.config(xla_flags="fast")
