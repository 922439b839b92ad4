"""--mode=eval and --mode=sample on a restored checkpoint: same validation loss on another mesh shape, eval in
its own directory, PNG samples for prompts; class-conditional DiT sampled (CFG with the null label) and
scored in training, with label adherence checked on a trained toy."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from configs import dit
from mmdit_jax import config as config_lib
from mmdit_jax import data, errors, evaluate, flow, sample, train
from tests import helpers
from tests.helpers import config

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("sample")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  # ema_decay 0.5: the sampled EMA weights leave adaLN-Zero's initial state within 4 steps, so the
  # conditioning (prompts, negative prompts) shows in the samples.
  from tests.study_test import _tiny_clip_model
  clip_dir = tmp_path_factory.mktemp("clip")
  _tiny_clip_model(clip_dir)  # CLIP score and CMMD in the sample evaluations
  cfg = config(**{"mesh.ici.data": 2, "mesh.ici.fsdp": 4, "total_steps": 4, "sample_every": 2,
                  "eval.num_samples": 8, "sample.steps": 2, "ema_decay": 0.5,
                  "eval.clip": str(clip_dir)})
  summary = train.train_and_evaluate(cfg, workdir)
  return workdir, cfg, summary


def test_periodic_sample_evaluation_during_training(trained):
  workdir, _, summary = trained
  assert (workdir / "samples" / "step_0000002.png").is_file() and (workdir / "samples" / "step_0000004.png").is_file()
  logged = helpers.metrics(workdir)
  fids = {m["step"]: m["fid/demo"] for m in logged if "fid/demo" in m}
  assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())
  assert summary["fid/demo"] == fids[4] and "demo/accuracy_all" in summary
  assert np.isfinite(summary["cmmd"]) and 0 <= summary["clip_score"] <= 100  # (eval.clip: a tiny random CLIP)
  assert _image_steps(workdir / "tensorboard", "samples") == [2, 4]


def _image_steps(logdir, tag):
  """Steps of the images under `tag` in TensorBoard event files (TFRecord framing, Event protos)."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    raw, pos = path.read_bytes(), 0
    while pos < len(raw):
      (n,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      steps += [event.step for v in event.summary.value if v.tag == tag and v.HasField("image")]
  return steps


def test_eval_on_another_mesh_matches_training_in_its_own_directory(trained):
  workdir, _, summary = trained
  before = sorted(p.name for p in (workdir / "samples").iterdir())
  cfg = config(**{"mesh.ici.data": 8, "total_steps": 4, "sample.steps": 4, "eval.num_samples": 8})
  results = sample.run_eval(cfg, workdir)
  np.testing.assert_allclose(results["val_ema/loss"], summary["val_ema/loss"], rtol=1e-5)
  np.testing.assert_allclose(results["val_raw/loss"], summary["val_raw/loss"], rtol=1e-5)
  assert 0 <= results["demo/accuracy_all"] <= 1 and "demo/chance_all" in results
  saved = json.loads((workdir / "eval" / "step_0000004.json").read_text())
  assert saved["step"] == 4 and len([k for k in saved if k.startswith("val_ema/loss_t")]) == 8
  assert Image.open(workdir / "eval" / "step_0000004.png").size[0] > 100
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == before  # training's samples untouched
  assert np.isfinite(results["fid/demo"]) and (workdir / "eval" / "metrics.jsonl").is_file()


def test_sample_mode_writes_pngs(trained):
  workdir, _, _ = trained
  cfg = config(**{"total_steps": 4, "sample.steps": 3, "sample.sampler": "heun", "sample.threshold": "dynamic"})
  prompts = ["a red circle at the top left and a blue square at the bottom right",
             "a green triangle at the top right and a yellow circle at the bottom left"]
  paths = sample.run_sample(cfg, workdir, prompts)
  assert len(paths) == 2 and paths[0].name == "000_a_red_circle_at_the_top_left_and_a_blue_square_at_the_bottom_right.png"
  img = np.asarray(Image.open(paths[0]))
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8
  assert (workdir / "generated" / "grid.png").is_file()
  records = [json.loads(l) for l in (workdir / "generated" / "generated.jsonl").read_text().splitlines()]
  assert [r["conditioning"] for r in records] == prompts and records[0]["step"] == 4
  with pytest.raises(errors.UserError, match="unknown words"):
    sample.run_sample(cfg, workdir, ["a purple cow"])
  with pytest.raises(errors.UserError, match="text-conditioned: pass --prompt, not --labels"):
    sample.run_sample(cfg, workdir, labels=[1])


def test_sample_inputs_seeds_negatives_noise_grid_and_size(trained, tmp_path):
  """--mode=sample's reproducibility inputs: a seed per prompt (the same image wherever the prompt sits
  in the batch), negative prompts (the unconditional branch), initial noise from a .npy, an explicit time
  grid (the reference grid given explicitly reproduces the default), a non-square size; and clear errors."""
  workdir, _, _ = trained
  red = "a red circle at the top left and a blue square at the bottom right"
  green = "a green triangle at the top right and a yellow circle at the bottom left"
  base = {"total_steps": 4, "sample.steps": 3}
  run = lambda requests, **extra: np.stack([np.asarray(Image.open(p)) for p in sample.run_sample(
      config(**base, **extra), workdir, requests)]).astype(int)
  both = run([sample.Request(red, seed=7), sample.Request(green, negative_prompt=red, seed=8)])
  records = [json.loads(l) for l in (workdir / "generated" / "generated.jsonl").read_text().splitlines()]
  assert [(r["seed"], r["negative_prompt"]) for r in records] == [(7, ""), (8, red)]
  alone = run([sample.Request(green, negative_prompt=red, seed=8)])
  assert np.abs(alone[0] - both[1]).max() <= 1  # (batch size 1 vs 2: float rounding only)
  chunked = run([sample.Request(red, seed=7), sample.Request(green, negative_prompt=red, seed=8)],
                **{"sample.batch_size": 1})  # two calls of the batch-1 program: the same images
  assert np.abs(chunked - both).max() <= 1 and np.array_equal(chunked[1], alone[0])
  # The negative prompt is the unconditional branch: it matters (shown at a strong guidance, since 4 steps
  # of training leave the conditioning's effect small).
  strong = {"sample.guidance": 40.0}
  with_negative = run([sample.Request(green, negative_prompt=red, seed=8)], **strong)
  assert np.abs(run([sample.Request(green, seed=8)], **strong)[0] - with_negative[0]).mean() > 0.1  # (ignored: 0)

  shape = sample.image_shape(config(**base), True)
  np.save(tmp_path / "noise.npy", evaluate.sample_noise(7, [0], shape))
  from_file = run([red], **{"sample.noise": str(tmp_path / "noise.npy")})
  assert np.abs(from_file[0] - both[0]).max() <= 1
  grid = np.asarray(evaluate.sampling_grid(config(**base))).tolist()
  assert grid == np.asarray(flow.samplers.reference_grid(3)).tolist()  # rf's default: SD3's grid
  explicit = run([sample.Request(red, seed=7)], **{"sample.timesteps": tuple(grid)})
  assert np.abs(explicit[0] - both[0]).max() <= 1
  uniform = np.asarray(evaluate.sampling_grid(config(**base, **{"sample.schedule": "uniform"})))
  np.testing.assert_allclose(uniform, [1, 2 / 3, 1 / 3, 0], atol=1e-7)

  wide = run([red], **{"sample.height": 16, "sample.width": 32})
  assert wide.shape[1] * 2 == wide.shape[2]
  with pytest.raises(errors.UserError, match=r"beyond the position grid \(8 patches of 8 = 64 px"):
    run([red], **{"sample.height": 96})
  with pytest.raises(errors.UserError, match=r"noise.npy has shape \(1, 32, 32, 3\); 2 samples"):
    run([red, green], **{"sample.noise": str(tmp_path / "noise.npy")})
  with pytest.raises(errors.ConfigError, match="sample.timesteps: needs sample.steps"):
    config(**base, **{"sample.timesteps": (1.0, 0.5, 0.0)})
  with pytest.raises(errors.UserError, match=r"p.txt:2: seed must be an integer"):
    sample.parse_prompts_file(f'{red}\n{{"prompt": "{green}", "seed": "x"}}', "p.txt")
  assert sample.parse_prompts_file(f'{red}\n\n{{"prompt": "{green}", "negative_prompt": "{red}", "seed": 3}}',
                                   "p.txt") == [sample.Request(red), sample.Request(green, red, 3)]


def test_bad_sampler_config():
  with pytest.raises(errors.ConfigError,
                     match=r"config.sample.sampler: 'rk45'; valid: \['ddim', 'dpmpp_2m', 'dpmpp_2m_sd3', 'euler', 'heun'\]"):
    config(**{"sample.sampler": "rk45"})


# ── Class-conditional DiT ──

COLOURS = np.array([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]], np.float32)  # class 0 red, class 1 blue


def _two_colour_toy(path, n=256, size=8, seed=0):
  """Pixel-space images of one colour per class, with noise: a task a tiny DiT learns in a few dozen steps."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n).astype(np.int32)
  images = COLOURS[labels][:, None, None, :] + 0.1 * rng.standard_normal((n, size, size, 3))
  data.write_arrays(path, {"latent": np.clip(images, -1, 1).astype(np.float16), "label": labels},
                    {"num_classes": 2, "pixels": True}, examples_per_shard=128)
  return path


TOY = {"model.num_classes": 2, "model.input_size": 8, "model.patch_size": 4, "model.depth": 2,
       "model.hidden_size": 32, "model.num_heads": 2, "sample.steps": 8, "sample.guidance": 3.0}


def _dit_toy_config(path):
  c = dit.get_config(f"variant=tiny,data={path},steps=120,batch=16")
  return helpers.set_fields(c, {**TOY, "optim.lr": 1e-2, "ema_decay": 0.9, "log_every": 40, "checkpoint_every": 120,
                                "sample_every": 60, "eval_every": 0, "eval_batches": 1, "eval.num_samples": 16})


@pytest.fixture(scope="module")
def dit_toy(tmp_path_factory):
  root = tmp_path_factory.mktemp("dit")
  path = _two_colour_toy(root / "toy")
  c = _dit_toy_config(path)
  summary = train.train_and_evaluate(config_lib.from_config_dict(c), root / "run")
  return root, path, c, summary


def test_dit_is_scored_by_fid_during_training(dit_toy):
  root, _, _, summary = dit_toy
  fids = {m["step"]: m["fid/demo"] for m in helpers.metrics(root / "run") if "fid/demo" in m}
  assert sorted(fids) == [60, 120] and all(np.isfinite(v) for v in fids.values())
  assert summary["fid/demo"] == fids[120] and (root / "run" / "samples" / "step_0000120.png").is_file()


@pytest.mark.slow
def test_dit_samples_follow_their_labels(dit_toy, tmp_path):
  """--mode=sample --labels through the CLI; each sample's mean colour is its class's."""
  root, _, c, _ = dit_toy
  labels = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0]
  proc = subprocess.run(
      helpers.main_cmd(root / "run", "--mode=sample", f"--labels={','.join(map(str, labels))}",
                       *[f"--config.{k}={v}" for k, v in TOY.items()],
                       config_file=f"configs/dit.py:variant=tiny,data={root / 'toy'},steps=120,batch=16"),
      cwd=helpers.ROOT, env=helpers.env(devices=1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in (root / "run" / "generated" / "generated.jsonl").read_text().splitlines()]
  assert [r["conditioning"] for r in records] == [f"class {l}" for l in labels]
  images = [np.asarray(Image.open(root / "run" / "generated" / r["file"]), np.float32) / 127.5 - 1 for r in records]
  predicted = [int(np.argmin(((COLOURS - img.reshape(-1, 3).mean(0)) ** 2).sum(1))) for img in images]
  assert predicted == labels, predicted
  with pytest.raises(errors.UserError, match=r"--labels \[5\] outside 0..1"):
    sample.run_sample(config_lib.from_config_dict(c), root / "run", labels=[5])

