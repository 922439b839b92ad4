"""Model properties: identity at init, sharded == unsharded, scanned == unrolled, counts and FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmdit_jax import model, parallel

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("model")

TINY = dict(depth=3, hidden_size=32, num_heads=4, context_dim=24, pooled_dim=12, in_channels=4,
            pos_embed_max_size=16, sample_size=16)
# Most tests share one config (QK-norm, an MMDiT-X layer), so its compiled init is reused.
CFG = model.MMDiTConfig(**TINY, dual_attention_layers=(0,), qk_norm=True)


def _inputs(b=4, h=8, w=6, t_tokens=5):
  """(latents, t, cond) for the text-conditioned tiny models."""
  k = jax.random.split(jax.random.key(7), 3)
  return (jax.random.normal(k[0], (b, h, w, 4)), jnp.linspace(0.1, 0.9, b),
          {"context": jax.random.normal(k[1], (b, t_tokens, 24)), "pooled": jax.random.normal(k[2], (b, 12))})


def _randomize(params, seed=0, scale=0.2):
  """Non-zero everywhere, so that the adaLN-Zero model is not trivially the identity (host NumPy: nothing
  to compile per parameter tree)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(np.float32), params)


def test_init_draws_the_keys_of_plain_nnx_rngs():
  """model.init counts its RNG draws on the host (model/api.py) and must draw what nnx.Rngs(params=key) draws:
  the parameters equal those of a module built with flax's own streams (its scanned stack included)."""
  cfg = CFG
  def plain(key):
    with nnx.use_eager_sharding(False):
      return nnx.split(cfg.make(nnx.Rngs(params=key)), nnx.Param)[1]
  key = jax.random.key(3)
  want, got = jax.jit(plain)(key), model.init(cfg, key)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_adaln_zero_blocks_are_identity_at_init():
  cfg = CFG
  params = model.init(cfg, jax.random.key(0))
  latents, t, cond = _inputs()
  img = jax.random.normal(jax.random.key(1), (4, 12, 32))
  txt = jax.random.normal(jax.random.key(2), (4, 5, 32))
  vec = jax.random.normal(jax.random.key(3), (4, 32))

  @jax.jit
  def blocks(params):
    m = nnx.merge(model.graphdef(cfg), params)
    return m.final_block((img, [txt]), vec)[0], m.stages[0]((img, [txt]), vec)[0]

  final_img, (stage_img, stage_txt) = blocks(params)
  np.testing.assert_array_equal(final_img, img)
  np.testing.assert_array_equal(stage_img, img)
  np.testing.assert_array_equal(stage_txt[0], txt)
  # The final layer is zero-initialised too, so the untrained model predicts exactly zero.
  out = jax.jit(lambda p: model.forward(cfg, p, latents, t, cond))(params)
  np.testing.assert_array_equal(out, 0.0)


def test_randomized_blocks_are_not_identity():
  cfg = CFG
  params = _randomize(model.init(cfg, jax.random.key(0)))
  out = jax.jit(lambda p: model.forward(cfg, p, *_inputs()))(params)
  assert float(jnp.std(out)) > 1e-2


@pytest.fixture(scope="module")
def unrolled_reference():
  """Forward and gradients of the unrolled model, computed once for every remat policy."""
  cfg = dataclasses.replace(CFG, scan_layers=False)
  params = _randomize(model.init(CFG, jax.random.key(0)))  # the same parameter tree, scanned or not
  inputs = _inputs()
  loss = lambda p: jnp.mean(model.forward(cfg, p, *inputs) ** 2)
  out = jax.jit(lambda p: model.forward(cfg, p, *inputs))(params)
  return params, inputs, out, jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("remat,names", [("none", ()), ("full", ()), ("dots_no_batch", ()),
                                         ("names", ("qkv", "attn_out", "mlp_out"))])  # (dots: dots_no_batch's machinery)
def test_scanned_equals_unrolled(remat, names, unrolled_reference):
  params, inputs, unrolled, unrolled_grads = unrolled_reference
  cfg = dataclasses.replace(CFG, remat=remat, remat_names=names)
  scanned = jax.jit(lambda p: model.forward(cfg, p, *inputs))(params)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)
  # Gradients agree too (remat only changes what is stored).
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.forward(cfg, p, *inputs) ** 2)))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(unrolled_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mmdit", "dit"])
def test_sharded_forward_equals_unsharded(kind):
  latents, t, cond = _inputs(b=8)
  if kind == "mmdit":
    cfg = CFG
  else:
    cfg = model.DiTConfig(depth=2, hidden_size=32, num_heads=4, num_classes=10)
    cond = {"label": jnp.arange(8) % 11}
  params = _randomize(model.init(cfg, jax.random.key(0)))
  expected = jax.jit(lambda p: model.forward(cfg, p, latents, t, cond))(params)

  mesh = parallel.make_mesh((2, 2, 1, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.DEFAULT_RULES):
    shardings = model.param_shardings(cfg, mesh, parallel.DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    # Parameters really are split: an (embed, mlp) kernel over fsdp × tensor.
    kernel = sharded["stages"][0]["layers"]["img"]["mlp"]["fc1"]["kernel"] if kind == "mmdit" else \
        sharded["blocks"]["layers"]["mlp"]["fc1"]["kernel"]
    assert kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    put = lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
    out = jax.jit(lambda p, *a: model.forward(cfg, p, *a))(sharded, put(latents), put(t), jax.tree.map(put, cond))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_init_sharded_matches_unsharded_init():
  cfg = CFG
  mesh = parallel.make_mesh((2, 2, 1, 2))
  with jax.set_mesh(mesh):
    sharded = model.init_sharded(cfg, jax.random.key(3), mesh, parallel.DEFAULT_RULES)
  plain = model.init(cfg, jax.random.key(3))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_three_stream_variant():
  cfg = model.MMDiTConfig(**TINY, text_streams=(3, 2))
  params = _randomize(model.init(cfg, jax.random.key(0)))
  assert len(params["context_embedder"]) == 2 and len(params["final_block"]["txt"]) == 2
  out = jax.jit(lambda p: model.forward(cfg, p, *_inputs(t_tokens=5)))(params)
  assert out.shape == (4, 8, 6, 4) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="text_streams"):
    model.forward(cfg, params, *_inputs(t_tokens=4))


def test_parameter_counts_from_abstract_shapes():
  assert model.param_count(model.MMDiTConfig(depth=24)) / 1e9 == pytest.approx(2.0, abs=0.05)
  assert model.param_count(model.MMDiTConfig(depth=38)) / 1e9 == pytest.approx(8.1, abs=0.1)
  # DiT-XL/2 with learned σ (8 output channels), DiT Table 4: 675M.
  assert model.param_count(model.dit_config("XL/2", out_channels=8)) / 1e6 == pytest.approx(675, abs=1)


def test_flops():
  # DiT-XL/2 at 256² (32×32 latents): 118.6 G multiply-adds (DiT Table 4).
  dit = model.dit_config("XL/2", out_channels=8)
  assert model.forward_flops(dit, 32, 32) / 2e9 == pytest.approx(118.6, rel=0.005)
  # MM-DiT matches MISSION's per-image training rule 3·d·(24h²T + 4hT²) up to the embedders.
  d = 24
  cfg = model.MMDiTConfig(depth=d)
  h, tokens = 64 * d, 32 * 32 // 4 + 154
  rule = 3 * d * (24 * h * h * tokens + 4 * h * tokens ** 2)
  assert model.train_flops(cfg, 32, 32, 154) == pytest.approx(rule, rel=0.06)
  # Quadratic attention term: doubling the side more than quadruples the cost.
  assert model.forward_flops(cfg, 128, 128, 154) > 4 * model.forward_flops(cfg, 64, 64, 154)


@pytest.mark.parametrize("name", ["S/2", "B/4", "L/8", "XL/2"])
def test_dit_sizes(name):
  cfg = model.dit_config(name)
  assert (cfg.depth, cfg.width, cfg.heads) == model.DIT_SIZES[name.split("/")[0]]
  assert cfg.patch_size == int(name.split("/")[1])


def test_dit_variants_run_and_start_at_zero():
  x, t, text = _inputs()
  # Each block type once; class conditioning with the adaLN blocks, text with the SD3 Fig. 4 baselines
  # (CrossDiT; DiT with text concatenated as a U-ViT with long skips).
  for block, cond in [("adaln_zero", "class"), ("adaln", "class"), ("cross_attn", "text"), ("in_context", "text")]:
    cfg = model.DiTConfig(depth=3, hidden_size=32, num_heads=4, block=block, conditioning=cond,
                          num_classes=10, context_dim=24, pooled_dim=12, long_skip=block == "in_context")
    c = {"label": jnp.array([0, 3, 10, 1])} if cond == "class" else text
    params = model.init(cfg, jax.random.key(0))
    run = jax.jit(lambda p: model.forward(cfg, p, x, t, c))
    np.testing.assert_array_equal(run(params), 0.0)
    out = run(_randomize(params))
    assert out.shape == x.shape and float(jnp.std(out)) > 1e-3, (block, cond)


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="valid: .*'cudnn'.*'xla'"):
    model.MMDiTConfig(depth=2, attention="flash")
  with pytest.raises(ValueError, match="remat"):
    model.MMDiTConfig(depth=2, remat="some")
  with pytest.raises(ValueError, match=r"remat_names \['q'\] are not tagged activations; valid: \['qkv'"):
    model.MMDiTConfig(depth=2, remat="names", remat_names=("q",))
  with pytest.raises(ValueError, match="remat_names, which is empty"):
    model.MMDiTConfig(depth=2, remat="offload")
  with pytest.raises(ValueError, match="dual_attention_layers"):
    model.MMDiTConfig(depth=2, dual_attention_layers=(5,))
  with pytest.raises(ValueError, match="valid: sizes"):
    model.dit_config("XXL/2")
  with pytest.raises(ValueError, match="divisible by patch_size"):
    cfg = model.MMDiTConfig(**TINY)
    model.forward(cfg, model.init(cfg, jax.random.key(0)), *_inputs(h=7))
  with pytest.raises(ValueError, match=r"conditioned on \['label'\]; the batch lacks \['label'\]"):
    model.forward(model.DiTConfig(depth=1, hidden_size=8, num_heads=2), None, *_inputs())
