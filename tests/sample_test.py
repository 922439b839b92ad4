"""--mode=eval and --mode=sample on a restored checkpoint: same validation loss on another mesh shape,
PNG samples for prompts, compositional accuracy reported beside its chance level."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmdit_jax import sample, train
from tests.train_test import _config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  os.environ["MMDIT_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  workdir = tmp_path_factory.mktemp("run")
  c = _config(**{"mesh.ici": (2, 4, 1, 1), "total_steps": 4, "sample_every": 2, "eval.num_samples": 8,
                 "sample.steps": 2})
  summary = train.train_and_evaluate(c, workdir)
  return workdir, c, summary


def test_periodic_sample_evaluation_during_training(trained):
  workdir, _, summary = trained
  assert (workdir / "samples" / "step_0000002.png").is_file() and (workdir / "samples" / "step_0000004.png").is_file()
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  fids = {m["step"]: m["fid/demo"] for m in logged if "fid/demo" in m}
  assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())
  assert summary["fid/demo"] == fids[4] and "demo/accuracy_all" in summary
  assert _image_steps(workdir / "tensorboard", "samples") == [2, 4]


def _image_steps(logdir, tag):
  """Steps of the images under `tag` in TensorBoard event files (TFRecord framing, Event protos)."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      steps += [event.step for v in event.summary.value if v.tag == tag and v.HasField("image")]
  return steps


def test_eval_on_another_mesh_matches_training(trained):
  workdir, c, summary = trained
  c = _config(**{"mesh.ici": (8, 1, 1, 1), "total_steps": 4, "sample.steps": 4, "eval.num_samples": 8})
  results = sample.run_eval(c, workdir)
  np.testing.assert_allclose(results["val_ema/loss"], summary["val_ema/loss"], rtol=1e-5)
  np.testing.assert_allclose(results["val_raw/loss"], summary["val_raw/loss"], rtol=1e-5)
  assert 0 <= results["demo/accuracy_all"] <= 1 and "demo/chance_all" in results
  saved = json.loads((workdir / "eval.json").read_text())
  assert saved["step"] == 4 and len([k for k in saved if k.startswith("val_ema/loss_t")]) == 8
  assert Image.open(workdir / "samples" / "step_0000004.png").size[0] > 100
  assert np.isfinite(results["fid/demo"])


def test_sample_mode_writes_pngs(trained):
  workdir, _, _ = trained
  c = _config(**{"total_steps": 4, "sample.steps": 3, "sample.sampler": "heun", "sample.threshold": "dynamic"})
  prompts = ["a red circle at the top left and a blue square at the bottom right",
             "a green triangle at the top right and a yellow circle at the bottom left"]
  paths = sample.run_sample(c, workdir, prompts)
  assert len(paths) == 2
  img = np.asarray(Image.open(paths[0]))
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8
  assert (workdir / "samples" / "grid.png").is_file()
  with pytest.raises(ValueError, match="unknown words"):
    sample.run_sample(c, workdir, ["a purple cow"])


def test_bad_sampler_config(trained):
  workdir, _, _ = trained
  with pytest.raises(ValueError, match=r"config.sample.sampler='rk45'; valid: \['ddim', 'dpmpp_2m', 'euler', 'heun'\]"):
    sample.run_sample(_config(**{"sample.sampler": "rk45"}), workdir, ["a red circle at the top left"])
