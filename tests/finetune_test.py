"""LoRA and Diffusion-DPO: adapter-only training, merging, the diffusers/PEFT layout both ways, the DPO loss,
and DPO on the demo's preference pairs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from mmdit_jax import config as config_lib
from mmdit_jax import model, pretrained, train
from mmdit_jax.data import demo
from mmdit_jax.errors import ConfigError
from mmdit_jax.model import convert, lora
from mmdit_jax.state import FROZEN, restore_for_eval
from mmdit_jax.train_step import dpo_losses
from tests import helpers

# The base these tests adapt is the session's straight run (tests/conftest.py), trained once on its worker.
pytestmark = pytest.mark.xdist_group("straight")


def _base_params(workdir):
  return helpers.final_state(workdir, helpers.config())[1]["ema"]


@pytest.fixture(scope="module")
def lora_run(straight, tmp_path_factory):
  """The straight run's EMA weights adapted by rank-4 LoRA on attention and MLPs for 8 steps."""
  base_dir, _ = straight
  workdir = tmp_path_factory.mktemp("lora")
  cfg = helpers.config(**{"init": f"run-ema:{base_dir}", "lora.rank": 4, "lora.alpha": 8.0,
                          "lora.targets": ("attn", "mlp"), "optim.lr": 3e-3})
  summary = train.train_and_evaluate(cfg, workdir)
  assert summary["step"] == helpers.STEPS
  return base_dir, workdir, cfg


def test_only_adapters_train_and_are_checkpointed(lora_run):
  base_dir, workdir, cfg = lora_run
  base = _base_params(base_dir)
  step, state, _ = helpers.final_state(workdir, cfg)
  assert step == helpers.STEPS and FROZEN not in state
  # The checkpoint holds adapters alone: A (…, in, 4) and B (…, 4, out) for attention and MLP kernels.
  paths = {"/".join(p) for p in lora.flat(state["params"])}
  assert "stages/0/layers/img/attn/q" in paths and "final_block/img/mlp/fc1" in paths
  assert not any("mod" in p or "embedder" in p for p in paths)
  opt_leaves = jax.tree.leaves(state["opt_state"])
  assert sum(x.size for x in opt_leaves) < 3 * sum(x.size for x in jax.tree.leaves(state["params"])) + 10
  b = lora.flat(state["params"])[("stages", "0", "layers", "img", "attn", "q")]["lora_b"]
  assert np.abs(np.asarray(b)).max() > 0  # B moved off zero: the adapters trained
  # The model it runs with is the base plus the delta; the base weights are bit-identical to the source's.
  restored, _ = restore_for_eval(cfg, epath.Path(workdir), helpers.parallel.make_mesh((-1, 1, 1, 1)),
                                 pretrained.resolve(cfg)[1])
  merged_raw = restored["params"]
  for path, ab in lora.flat(state["params"]).items():
    w0 = _kernel(base, path)
    want = w0 + cfg.lora.scale * np.einsum("...ir,...ro->...io", np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"]))
    np.testing.assert_allclose(_kernel(merged_raw, path), want, rtol=1e-5, atol=1e-6)
  untouched = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(base)[0] if "mod" in jax.tree_util.keystr(p)]
  merged_leaves = dict(jax.tree_util.tree_flatten_with_path(merged_raw)[0])
  for p, x in untouched:
    assert np.array_equal(np.asarray(merged_leaves[p]), np.asarray(x))


def _kernel(params, path):
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if lora._module_path(keypath) == path:
      return np.asarray(leaf)
  raise KeyError(path)


def test_lora_resume_is_exact(lora_run, tmp_path):
  base_dir, workdir, cfg = lora_run
  halted = train.train_and_evaluate(
      helpers.config(**{"init": f"run-ema:{base_dir}", "lora.rank": 4, "lora.alpha": 8.0,
                        "lora.targets": ("attn", "mlp"), "optim.lr": 3e-3, "debug.halt_at_step": 4}), tmp_path)
  assert halted["stopped"] == "halt_at_step"
  train.train_and_evaluate(cfg, tmp_path)
  straight, resumed = helpers.final_state(workdir, cfg)[1], helpers.final_state(tmp_path, cfg)[1]
  assert helpers.tree_equal(straight, resumed)


def test_merge_is_the_unmerged_linear_and_freezing_keeps_the_weights():
  key = jax.random.key(0)
  w = jax.random.normal(key, (3, 16, 24))  # a scanned stack of 3 kernels
  base = {"blk": {"attn": {"q": {"kernel": w, "bias": jnp.zeros((3, 24))}}}}
  adapters = lora.init(jax.eval_shape(lambda: base), ("attn",), 4, jax.random.key(1))
  adapters["blk"]["attn"]["q"]["lora_b"] = jax.random.normal(jax.random.key(2), (3, 4, 24))
  merged = lora.merge(base, adapters, 0.5)
  x = jax.random.normal(jax.random.key(3), (3, 5, 16))
  ab = adapters["blk"]["attn"]["q"]
  unmerged = jnp.einsum("lbi,lio->lbo", x, w) + 0.5 * jnp.einsum(
      "lbr,lro->lbo", jnp.einsum("lbi,lir->lbr", x, ab["lora_a"]), ab["lora_b"])
  np.testing.assert_allclose(jnp.einsum("lbi,lio->lbo", x, merged["blk"]["attn"]["q"]["kernel"]), unmerged,
                             rtol=1e-5, atol=1e-5)
  assert merged["blk"]["attn"]["q"]["bias"] is base["blk"]["attn"]["q"]["bias"]
  # Dropout in the merged form: whole input features of A, rescaled; rate 0 is the plain merge.
  dropped = lora.merge(base, adapters, 0.5, dropout=0.5, key=jax.random.key(4))["blk"]["attn"]["q"]["kernel"]
  delta_rows = np.abs(np.asarray(dropped - w)).sum(-1)  # (3, 16): zero where the input feature was dropped
  assert 0 < (delta_rows == 0).mean() < 1
  # Frozen bases: bfloat16 and int8 (per-channel) come back close, float32 exactly.
  assert lora.thaw(lora.freeze(base))["blk"]["attn"]["q"]["kernel"] is not None
  np.testing.assert_array_equal(lora.thaw(lora.freeze(base))["blk"]["attn"]["q"]["kernel"], w)
  for dtype, tol in (("bfloat16", 1e-2), ("int8", 1.5e-2)):
    frozen = lora.freeze(base, dtype)
    got = lora.thaw(frozen)["blk"]["attn"]["q"]["kernel"]
    assert float(jnp.max(jnp.abs(got - w)) / jnp.max(jnp.abs(w))) < tol, dtype
  assert lora.freeze(base, "int8")["weights"]["blk"]["attn"]["q"]["kernel"].dtype == jnp.int8


def test_targets_and_config_errors(straight):
  base_dir, _ = straight
  abstract = model.abstract_params(helpers.config().model)
  assert set(lora.targeted(abstract, ("mod",))) >= {("norm_out",), ("stages", "0", "layers", "img", "mod")}
  assert all(p[-1] in ("q", "v") for p in lora.targeted(abstract, (r"img/attn/(q|v)$",)))
  with pytest.raises(ValueError, match="match no linear layer"):
    lora.targeted(abstract, ("nothing_here",))
  with pytest.raises(ConfigError, match="config.init"):
    helpers.config(**{"lora.rank": 4})
  with pytest.raises(ConfigError, match="lora.targets"):
    helpers.config(**{"init": f"run:{base_dir}", "lora.rank": 4, "lora.targets": ("(unclosed",)})
  with pytest.raises(ConfigError, match="lora.base_dtype"):
    helpers.config(**{"init": f"run:{base_dir}", "lora.rank": 4, "lora.base_dtype": "fp8"})
  with pytest.raises(ConfigError, match="dpo.beta"):
    helpers.config(**{"dpo.beta": 10.0})


def test_dpo_loss_against_numpy():
  rng = np.random.default_rng(0)
  e_w, e_l, r_w, r_l = (rng.uniform(0.1, 2.0, 16).astype(np.float32) for _ in range(4))
  beta = 50.0
  loss, reward = dpo_losses(beta, *map(jnp.asarray, (e_w, e_l, r_w, r_l)))
  inside = -beta / 2 * ((e_w - r_w) - (e_l - r_l))
  np.testing.assert_allclose(reward, inside, rtol=1e-5)
  np.testing.assert_allclose(loss, np.log1p(np.exp(-inside)), rtol=1e-4, atol=1e-6)


def test_demo_pairs_differ_in_one_attribute(tmp_path):
  path = demo.ensure_demo("validation", 16, kind="pairs", root=tmp_path)
  meta = demo.records.load_metadata(path)
  assert meta.feature("latent_rejected").shape == meta.feature("latent").shape
  rng = np.random.default_rng(0)
  for _ in range(20):
    objects = demo.random_scene(rng)
    bad = demo.rejected_scene(objects, rng)
    if len(bad) == len(objects):  # one attribute of one object changed
      changed = [sum(a != b for a, b in zip(o, r)) for o, r in zip(objects, bad)]
      assert sorted(changed) == [0, 1]
    else:  # one object left out
      assert len(bad) == 1 and bad[0] in objects
    assert demo.check(demo.render(bad), demo.caption(objects))["all"] < 1.0
    assert demo.check(demo.render(objects), demo.caption(objects))["all"] == 1.0


def test_dpo_without_pairs_is_a_config_error(straight, tmp_path):
  base_dir, _ = straight
  text_demo = demo.ensure_demo("train", 128)
  with pytest.raises(ConfigError, match="latent_rejected"):
    train.train_and_evaluate(helpers.config(**{"init": f"run:{base_dir}", "dpo.beta": 10.0, "lora.rank": 2,
                                               "data.path": text_demo}), tmp_path)


def test_a_dataset_of_demo_scenes_is_scored_by_the_demo_checker(tmp_path):
  """On-policy pairs (benchmarks/dpo_pairs.py) are a dataset, not the embedded demo, but hold the demo's scenes:
  their metadata's demo_task makes evaluation score samples by the demo's checker; a wrong value is an error."""
  from mmdit_jax import inputs
  from mmdit_jax.data import writer
  context, pooled = demo.DemoTextEncoder()("")
  for task, path in (("text", tmp_path / "ok"), ("faces", tmp_path / "bad"), (None, tmp_path / "none")):
    extras = {"pixels": True, **({inputs.DEMO_TASK: task} if task else {})}
    with writer.DatasetWriter(path, demo.pair_features(demo.SIZE), extras,
                              null_embeddings={"context": context, "pooled": pooled}) as w:
      image = demo.render(demo.random_scene(np.random.default_rng(0)))
      w.write({"latent": image.astype(np.float16), "latent_rejected": image.astype(np.float16),
               "context": context, "pooled": pooled})
  assert inputs.evaluation_demo(helpers.config(**{"data.path": str(tmp_path / "ok")})) == "text"
  assert inputs.evaluation_demo(helpers.config(**{"data.path": str(tmp_path / "none")})) is None
  assert inputs.evaluation_demo(helpers.config()) == "text"  # the embedded demo
  with pytest.raises(ConfigError, match=r"demo_task='faces'; valid: 'text', 'classes'"):
    inputs.evaluation_demo(helpers.config(**{"data.path": str(tmp_path / "bad")}))


def test_dpo_raises_held_out_reward_accuracy(straight, tmp_path):
  """DPO with LoRA on demo preference pairs whose rejected image leaves an object out (a flaw the 8-step base
  can see without reading the caption): in 24 steps the held-out implicit reward accuracy (pairs the
  fine-tuned model prefers the right way, against the adapter-free reference) rises above 50 %.
  (docs/finetune.md: the demo on every flaw, from a trained base.)"""
  base_dir, _ = straight
  train_pairs = demo.write_demo_pairs(tmp_path / "train", 256, 0, flaws=("count",))
  val_pairs = demo.write_demo_pairs(tmp_path / "val", 64, 1, flaws=("count",))
  del train_pairs, val_pairs
  cfg = helpers.config(**{"init": f"run-ema:{base_dir}", "lora.rank": 8, "lora.targets": ("attn", "mlp", "mod"),
                          "dpo.beta": 5000.0, "optim.lr": 1e-2, "total_steps": 24, "data.global_batch_size": 16,
                          "data.path": str(tmp_path / "train"), "data.val_path": str(tmp_path / "val"),
                          "eval_batches": 2, "checkpoint_every": 24, "debug.log_data_order": False})
  summary = train.train_and_evaluate(cfg, tmp_path / "run")
  assert summary["val_raw/dpo_accuracy"] > 0.5, summary
  assert summary["val_raw/dpo_margin"] > 0, summary


def test_peft_round_trip_and_diffusers_parity(tmp_path):
  """Adapters exported in diffusers' LoRA layout load into diffusers' SD3Transformer2DModel (PEFT, unmerged)
  and give our merged model's output; the file reads back to the same adapters."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("peft")
  from tests.model.convert_test import TINY, _inputs, _ours, _rel_err, _torch_forward
  torch.manual_seed(0)
  ref = diffusers.SD3Transformer2DModel(**TINY).eval()
  ref.save_pretrained(tmp_path / "sd3", safe_serialization=True)
  cfg, params = model.from_diffusers(tmp_path / "sd3")
  lcfg = config_lib.LoRAConfig(rank=4, alpha=2.0, targets=("attn", "mlp", "mod", "context_embedder"))
  adapters = lora.init(model.abstract_params(cfg), lcfg.targets, lcfg.rank, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
  tensors, metadata = convert.lora_to_peft(cfg, adapters, lcfg.scale)
  assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
  assert "transformer.transformer_blocks.3.attn.add_k_proj.lora_B.weight" in tensors
  assert json.loads(metadata[convert.LORA_METADATA_KEY])["lora_alpha"] == 4
  # Read back at another alpha: the same delta.
  back = convert.lora_from_peft(cfg, tensors, config_lib.LoRAConfig(rank=4, alpha=8.0, targets=lcfg.targets), metadata)
  for path, ab in lora.flat(adapters).items():
    got = lora.flat(back)[path]
    np.testing.assert_allclose(got["lora_a"], ab["lora_a"], rtol=1e-6)
    np.testing.assert_allclose(got["lora_b"] * 8.0 / 4, np.asarray(ab["lora_b"]) * lcfg.scale, rtol=1e-5, atol=1e-7)
  with pytest.raises(model.ConversionError, match="rank 4 in the file"):
    convert.lora_from_peft(cfg, tensors, config_lib.LoRAConfig(rank=8), metadata)
  with pytest.raises(model.ConversionError, match="not LoRA weights"):
    convert.lora_from_peft(cfg, {"transformer.nope.lora_A.weight": np.zeros((4, 2))}, lcfg)
  # diffusers + PEFT, unmerged, against our merged forward.
  ref.load_lora_adapter({k: torch.from_numpy(v) for k, v in tensors.items()}, prefix="transformer",
                        adapter_name="ours")
  merged = lora.merge(params, adapters, lcfg.scale)
  inputs = _inputs(8, 8)
  ours = np.asarray(jax.jit(lambda p, *a: model.forward(cfg, p, *_ours(*a)))(merged, *map(jnp.asarray, inputs)))
  theirs = _torch_forward(ref, *inputs)
  base_out = np.asarray(jax.jit(lambda p, *a: model.forward(cfg, p, *_ours(*a)))(params, *map(jnp.asarray, inputs)))
  assert _rel_err(base_out, theirs) > 1e-2  # the adapters change the output…
  assert _rel_err(ours, theirs) <= 1e-4, _rel_err(ours, theirs)  # …the same way in both


def test_adapters_shard_like_their_kernels_and_train_on_a_mesh(straight, tmp_path):
  """On a data 2 × fsdp 2 × tensor 2 mesh: A (in, r) and B (r, out) are split over the same axes as W (the rank
  axis takes W's other axis), and a LoRA + DPO step with scanned layers and microbatches runs there."""
  from flax import nnx

  from mmdit_jax import data, inputs, parallel
  from mmdit_jax.checkpoint import Checkpointer
  from mmdit_jax.state import make_optimizer, restore_or_init
  from mmdit_jax.train_step import jit_train_step
  base_dir, _ = straight
  cfg = helpers.config(**{"init": f"run:{base_dir}", "lora.rank": 4, "lora.targets": ("all_linear",),
                          "dpo.beta": 100.0, "microbatches": 2, "lora.base_dtype": "bfloat16",
                          "mesh.ici": {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}})
  cfg, load = pretrained.resolve(cfg)
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    state, start, _ = restore_or_init(cfg, tx, mesh, ckpt, init_params=load)
    ckpt.close()
    q = state["params"]["stages"]["0"]["layers"]["img"]["attn"]["q"]
    assert tuple(q["lora_a"].sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(q["lora_b"].sharding.spec) == (None, "fsdp", "tensor")
    assert state[FROZEN]["weights"]["stages"][0]["layers"]["img"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    pairs = demo.ensure_demo("validation", 16, kind="pairs")
    ds = inputs.evaluation_set(cfg, pairs)
    batch = {k: v for k, v in ds.load_batch(0, 0, 1).items() if k not in data.HOST_ONLY}
    base_before = jax.device_get(state[FROZEN])
    step = jit_train_step(cfg, tx, schedule, jax.tree.map(lambda x: x.sharding, state))
    new, metrics = step(state, parallel.to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["dpo/accuracy"]) <= 1
    assert helpers.tree_equal(jax.device_get(new[FROZEN]), base_before)  # the base passes through untouched
    assert not helpers.tree_equal(jax.device_get(new["params"]), jax.device_get(
        jax.tree.map(jnp.zeros_like, new["params"])))


def test_lora_presets():
  from configs import lora as lora_presets
  for target, batch in (("v5e-8", 8), ("v5p-8", 32), ("gpu", 4)):
    cfg = config_lib.from_config_dict(lora_presets.get_config(f"target={target},dpo=5000"))
    assert cfg.lora.rank == 128 and cfg.lora.targets == ("all_linear",) and cfg.lora.base_dtype == "bfloat16"
    assert cfg.model.depth == 24 and not cfg.model.qk_norm and cfg.data.global_batch_size == batch  # SD3-Medium
    assert cfg.init.startswith("diffusers:") and cfg.dpo.beta == 5000 and cfg.formulation.shift == 3.0
  tiny = config_lib.from_config_dict(lora_presets.get_config("base=run-ema:/some/run,target=tiny"))
  assert tiny.init == "run-ema:/some/run" and tiny.lora.rank == 16 and tiny.dpo.beta == 0
  with pytest.raises(ConfigError, match="target=tiny adapts a run"):
    lora_presets.get_config("target=tiny")
  with pytest.raises(ConfigError, match="unknown target"):
    lora_presets.get_config("target=v4-8")


def test_export_adapters_and_merged_and_load_them_back(lora_run, tmp_path):
  from mmdit_jax import export, parallel
  _, workdir, cfg = lora_run
  out = export.export(workdir, tmp_path / "adapter")
  assert (out / convert.PEFT_WEIGHTS).is_file()
  back = convert.read_peft(cfg.model, out, cfg.lora)  # (config.lora.load reads the same way)
  restored, _ = restore_for_eval(cfg, epath.Path(workdir), parallel.make_mesh((-1, 1, 1, 1)),
                                 pretrained.resolve(cfg)[1])
  for path, ab in lora.flat(restored["adapters_ema"]).items():
    np.testing.assert_allclose(lora.flat(back)[path]["lora_a"], ab["lora_a"], rtol=1e-6)
    np.testing.assert_allclose(lora.flat(back)[path]["lora_b"], ab["lora_b"], rtol=1e-5, atol=1e-8)
  merged_dir = export.export(workdir, tmp_path / "merged", lora="merged")
  _, params = model.from_diffusers(merged_dir)
  want = dict(jax.tree_util.tree_flatten_with_path(restored["ema"])[0])
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    np.testing.assert_allclose(np.asarray(x), np.asarray(want[p]), rtol=1e-6, atol=1e-7)


def test_lora_on_dit():
  """DiT's linear layers take adapters by the same groups; the merged model runs and moves with B."""
  from configs import dit
  cfg = config_lib.from_config_dict(helpers.set_fields(dit.get_config("variant=S/8"), {
      "model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2, "model.input_size": 16}))
  params = model.init(cfg.model, jax.random.key(0))  # (adaLN-Zero: moved off zero so the output is not 0)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params)
  adapters = lora.init(model.abstract_params(cfg.model), ("attn", "mlp"), 2, jax.random.key(1))
  assert {"/".join(p) for p in lora.flat(adapters)} == {f"blocks/layers/{m}" for m in
                                                          ("attn/q", "attn/k", "attn/v", "attn/out", "mlp/fc1", "mlp/fc2")}
  z = jax.random.normal(jax.random.key(2), (2, 16, 16, cfg.model.in_channels))
  t, cond = jnp.array([0.3, 0.7]), {"label": jnp.array([1, 2])}
  run = jax.jit(lambda p: model.forward(cfg.model, p, z, t, cond))
  np.testing.assert_array_equal(run(lora.merge(params, adapters, 1.0)), run(params))  # B = 0: the base model
  moved = jax.tree.map(lambda x: x + 0.1, adapters)
  assert float(jnp.max(jnp.abs(run(lora.merge(params, moved, 1.0)) - run(params)))) > 1e-4
