"""User paths go through etils.epath everywhere, so gs:// (and any scheme epath knows) works: no module of the
package opens a file with the builtin open() or builds one with pathlib; a gs:// dataset without its bucket's
mount is a clear error; and the whole run — training, checkpoints, metrics, TensorBoard, samples, eval,
resume — works against a local GCS emulator serving gs:// (skipped where the emulator is not installed)."""

import ast
import json
import socket
import subprocess
import sys
import time

import pytest

from mmdit_jax import errors, paths
from tests import helpers

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("straight")


def test_no_module_opens_a_user_path_with_open_or_pathlib():
  offenders = []
  for path in (helpers.ROOT / "mmdit_jax").rglob("*.py"):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
        offenders.append(f"{path.relative_to(helpers.ROOT)}:{node.lineno}: open(")
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
        if "pathlib" in names:
          offenders.append(f"{path.relative_to(helpers.ROOT)}:{node.lineno}: import pathlib")
  assert not offenders, "use etils.epath for user paths:\n" + "\n".join(offenders)


def test_gs_datasets_are_read_through_their_bucket_mount(tmp_path, monkeypatch):
  monkeypatch.setenv("MMDIT_JAX_GCS_MOUNT", str(tmp_path / "gcs"))
  with pytest.raises(errors.UserError, match=r"mount gs://bkt at .*gcs/bkt \(launch/tpu.py setup --mount=gs://bkt"):
    paths.local_view("gs://bkt/latents256", "dataset")
  (tmp_path / "gcs" / "bkt" / "latents256").mkdir(parents=True)
  assert paths.local_view("gs://bkt/latents256", "dataset") == str(tmp_path / "gcs" / "bkt" / "latents256")
  assert paths.local_view(str(tmp_path), "dataset") == str(tmp_path)


GCS_ENV = {"GOOGLE_CLOUD_PROJECT": "test",
           "NO_GCE_CHECK": "true",  # no metadata server to probe for credentials (else minutes of back-off)
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # (its bucket-type probe would look for one too)


@pytest.fixture(scope="module")
def gcs():
  """A GCS server on loopback (tests/gcs_emulator.py) with bucket 'bkt': the environment that points epath
  (gcsfs), orbax (tensorstore) and TensorBoard (google-cloud-storage) at it, with anonymous credentials."""
  pytest.importorskip("gcp_storage_emulator", reason="the test extra brings gcp-storage-emulator")
  pytest.importorskip("gcsfs", reason="the test and tpu extras bring gcsfs")
  port = helpers.free_port()
  proc = subprocess.Popen([sys.executable, str(helpers.ROOT / "tests" / "gcs_emulator.py"), str(port), "bkt"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while time.time() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      time.sleep(0.2)
  yield {**GCS_ENV, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
  proc.terminate()
  proc.wait(timeout=30)


@pytest.mark.slow
def test_preempted_run_on_gs_resumes_exactly(gcs, straight):
  """The whole run with workdir gs://…: halted at step 4 as if preempted (checkpoint, metrics, TensorBoard
  written there), resumed by a second process from that checkpoint, it ends bitwise identical to the local
  straight run; metrics.jsonl holds each logged step once; a third start sees the run finished."""
  from etils import epath
  env = {**helpers.env(), **gcs}
  cmd = helpers.main_cmd("gs://bkt/run", *helpers.cli_flags(**{"debug.log_data_order": False}))
  first = subprocess.run(cmd + ["--config.debug.halt_at_step=4"], cwd=helpers.ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == errors.EXIT_PREEMPTED, first.stdout + first.stderr[-3000:]
  second = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0 and "restored checkpoint at step 4" in second.stdout + second.stderr, second.stderr[-3000:]

  import os
  os.environ.update(gcs)  # this process reads the results back through epath and orbax
  root = epath.Path("gs://bkt/run")
  rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == helpers.STEPS, steps
  assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
  step, state, data_state = helpers.final_state(root, helpers.config())
  assert step == helpers.STEPS and helpers.tree_equal(state, straight[1][1]) and data_state == straight[1][2]


def test_dataset_and_weights_on_gs(gcs, tmp_path, monkeypatch):
  """A dataset written to gs:// (shards uploaded whole, metadata.json last) and read back; weights on gs://
  copied once into the local cache for the readers that take local files only."""
  import numpy as np
  from etils import epath
  from mmdit_jax import data, evaluate
  for k, v in gcs.items():
    monkeypatch.setenv(k, v)
  meta = data.write_arrays("gs://bkt/tiny_data", {"latent": np.ones((3, 2, 2, 1), np.float16)}, examples_per_shard=2)
  assert meta.num_examples == 3 and data.load_metadata("gs://bkt/tiny_data").shards == meta.shards
  assert sorted(p.name for p in epath.Path("gs://bkt/tiny_data").iterdir()) == [
      "metadata.json", "shard-00000.array_record", "shard-00001.array_record"]
  evaluate.save_png(np.zeros((4, 4, 3), np.uint8), "gs://bkt/run/samples/step_0000001.png")
  assert epath.Path("gs://bkt/run/samples/step_0000001.png").read_bytes()[:4] == b"\x89PNG"
  epath.Path("gs://bkt/weights/model.safetensors").write_bytes(b"x" * 10)
  local = paths.local_copy("gs://bkt/weights/model.safetensors", tmp_path)
  assert local.startswith(str(tmp_path)) and epath.Path(local).read_bytes() == b"x" * 10
