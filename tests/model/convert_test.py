"""Numerical parity with diffusers' SD3Transformer2DModel through the safetensors importer."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from mmdit_jax import model  # noqa: E402
from tests import torch_reference as tiny  # noqa: E402

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
            pooled_projection_dim=12, out_channels=4, pos_embed_max_size=12)
VARIANTS = {
    "sd3": {},
    "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def _reference(tmp_path, variant, seed=0, save_config=True):
  torch.manual_seed(seed)
  ref = diffusers.SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
  if save_config:
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref, tmp_path
  path = tmp_path / "weights.safetensors"
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
  return ref, path


def _inputs(h, w, seed=1):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, h, w, 4)).astype(np.float32)
  t = np.array([0.25, 0.8], np.float32)
  context = rng.standard_normal((2, 7, 24)).astype(np.float32)
  pooled = rng.standard_normal((2, 12)).astype(np.float32)
  return latents, t, context, pooled


def _ours(latents, t, context, pooled):
  return latents, t, {"context": context, "pooled": pooled}


def _torch_forward(ref, latents, t, context, pooled, **kw):
  with torch.no_grad():
    out = ref(hidden_states=torch.from_numpy(latents).permute(0, 3, 1, 2),
              encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
              timestep=torch.from_numpy(1000 * t), return_dict=False, **kw)[0]
  return out.permute(0, 2, 3, 1).numpy()


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("save_config", [True, False])
def test_parity_with_diffusers(tmp_path, variant, save_config):
  ref, path = _reference(tmp_path, variant, save_config=save_config)
  if not save_config and variant == "sd3":  # no config.json, no QK-norm: SD3's head dim 64 cannot apply here
    with pytest.raises(model.ConversionError, match="the number of heads is not in the checkpoint"):
      model.from_diffusers(path)
  cfg, params = model.from_diffusers(path, **({"num_heads": 4} if not save_config and variant == "sd3" else {}))
  assert cfg.depth == 4 and cfg.width == 32 and cfg.heads == 4 and cfg.sample_size == 16
  assert cfg.qk_norm == (variant == "sd35")
  assert cfg.dual_attention_layers == VARIANTS[variant].get("dual_attention_layers", ())
  for h, w in [(8, 8), (6, 10)]:  # square and non-square latents
    inputs = _inputs(h, w)
    ours = np.asarray(jax.jit(lambda p, *a: model.forward(cfg, p, *_ours(*a)))(params, *map(jnp.asarray, inputs)))
    theirs = _torch_forward(ref, *inputs)
    assert ours.shape == theirs.shape
    assert _rel_err(ours, theirs) <= 1e-4, _rel_err(ours, theirs)


def test_skip_layers_match_diffusers(tmp_path):
  ref, path = _reference(tmp_path, "sd3")
  cfg, params = model.from_diffusers(path)
  inputs = _inputs(8, 8)
  ours = np.asarray(model.forward(cfg, params, *_ours(*map(jnp.asarray, inputs)), skip_layers=[1, 2]))
  theirs = _torch_forward(ref, *inputs, skip_layers=[1, 2])
  assert _rel_err(ours, theirs) <= 1e-4
  full = np.asarray(model.forward(cfg, params, *_ours(*map(jnp.asarray, inputs))))
  assert _rel_err(ours, full) > 1e-3  # skipping layers changes the output


def test_unknown_and_missing_tensors_are_named(tmp_path):
  ref, _ = _reference(tmp_path, "sd3")
  sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
  extra = dict(sd, **{"transformer_blocks.0.attn.mystery.weight": torch.zeros(3)})
  save_file(extra, str(tmp_path / "extra.safetensors"))
  with pytest.raises(model.ConversionError, match="mystery"):
    model.from_diffusers(tmp_path / "extra.safetensors")
  missing = {k: v for k, v in sd.items() if k != "transformer_blocks.2.ff.net.2.bias"}
  save_file(missing, str(tmp_path / "missing.safetensors"))
  with pytest.raises(model.ConversionError, match="transformer_blocks.2.ff.net.2.bias"):
    model.from_diffusers(tmp_path / "missing.safetensors")


def test_missing_file_raises(tmp_path):
  with pytest.raises(model.ConversionError, match="no .safetensors"):
    model.from_diffusers(tmp_path / "nothing_here")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_single_file_checkpoint_imports_to_the_same_parameters(tmp_path, variant):
  ref, path = _reference(tmp_path, variant)
  cfg, params = model.from_diffusers(path)
  single = tmp_path / "sd3_single.safetensors"
  save_file(tiny.sd3_single_file(ref.state_dict()), str(single))
  # (without config.json or QK-norm the heads come from SD3's head dim 64, which this tiny model lacks)
  single_cfg, single_params = model.from_diffusers(single, **({} if variant == "sd35" else {"num_heads": 4}))
  assert single_cfg == cfg
  for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_big_weights_load_tensor_by_tensor_into_their_shards(tmp_path):
  """Host memory while importing stays near one checkpoint tensor, not the checkpoint: tensors are read one
  at a time and each parameter placed shard by shard (a layer stack's shard reads only its layers) on an
  8-way FSDP mesh. Measured with tracemalloc (numpy's host buffers), beyond the parameters placed (CPU
  devices may adopt numpy buffers); the checkpoint is 72× its largest tensor here."""
  from mmdit_jax import parallel
  from tests import helpers
  torch.manual_seed(0)
  ref = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=12,
                                        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=12)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  sizes = [v.numel() * 4 for v in ref.state_dict().values()]
  largest, total = max(sizes), sum(sizes)
  assert total > 70 * largest
  mesh = parallel.make_mesh((1, 8, 1, 1))
  (cfg, params), used = helpers.host_memory_of(lambda: model.from_diffusers(
      tmp_path, shardings=lambda c: model.param_shardings(c, mesh, parallel.DEFAULT_RULES)))
  # A layer stack's shard plus one layer tensor being read (twice: safetensors' array, then float32 numpy),
  # and the import's bookkeeping: under 8× the largest tensor, where a whole-checkpoint load is 70×.
  assert used < 8 * largest, (used, largest, total)
  _, eager = model.from_diffusers(tmp_path)  # the same parameters as an unsharded import
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
