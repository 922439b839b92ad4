"""launch/tpu.py against a fake gcloud on PATH that records its arguments: the exact command lines of each
scenario (on-demand, spot queued resource, multi-slice, setup with gcsfuse, run on every worker with
per-worker logs, spot preemption and automatic resume) and the GKE JobSet manifest."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

# The fake: records argv (one JSON list per line), answers `describe` with an ACTIVE queued resource or a TPU
# VM of FAKE_WORKERS hosts, prints a line per ssh command, and exits with the next code of FAKE_SSH_EXITS.
FAKE_GCLOUD = r'''#!/usr/bin/env python3
import fcntl, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
if "describe" in args:
  if "queued-resources" in args:
    if os.environ.get("FAKE_MISSING") and not os.path.exists(os.environ["FAKE_GCLOUD_LOG"] + ".created"):
      sys.exit(1)
    print(json.dumps({"state": {"state": "ACTIVE"}}))
  else:
    print(json.dumps({"networkEndpoints": [{"ipAddress": f"10.0.0.{i}"} for i in range(int(os.environ["FAKE_WORKERS"]))]}))
elif "create" in args:
  open(os.environ["FAKE_GCLOUD_LOG"] + ".created", "w").close()
elif "delete" in args:
  if os.path.exists(os.environ["FAKE_GCLOUD_LOG"] + ".created"):
    os.remove(os.environ["FAKE_GCLOUD_LOG"] + ".created")
elif "ssh" in args and any(a.startswith("--command=cd ~/mmdit_jax") and "venv" in a and "mmdit_jax.main" in a for a in args):
  worker = [a for a in args if a.startswith("--worker=")][0].split("=")[1]
  print(f"training on worker {worker}")
  exits = os.environ.get("FAKE_SSH_EXITS", "0").split(",")
  with open(os.environ["FAKE_GCLOUD_LOG"] + ".runs", "a+") as counter:  # workers run at once: count under a lock
    fcntl.flock(counter, fcntl.LOCK_EX)
    counter.seek(0)
    n = len(counter.read())
    counter.write("x")
  sys.exit(int(exits[min(n // int(os.environ["FAKE_WORKERS"]), len(exits) - 1)]))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.jsonl"

  def run(*args, workers=2, ssh_exits="0", missing=False):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
               FAKE_WORKERS=str(workers), FAKE_SSH_EXITS=ssh_exits, FAKE_MISSING="1" if missing else "")
    extra = [f"--logs={tmp_path / 'logs'}"] if args[0] != "jobset" else []
    if "--" in args:
      i = args.index("--")
      args = (*args[:i], *extra, *args[i:])
    else:
      args = (*args, *extra)
    proc = subprocess.run([sys.executable, "launch/tpu.py", *args], cwd=helpers.ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return proc, calls

  return run


ZONE = ["--zone=us-east5-a", "--project=my-proj"]
TRAIN = ["python", "-m", "mmdit_jax.main", "--config=configs/rf_lognorm.py:size=2b,data=gs://bkt/latents256",
         "--workdir=gs://bkt/runs/sd3_2b"]


def test_create_on_demand_spot_and_multi_slice(fake):
  proc, calls = fake("create", "--name=sd3", *ZONE, "--type=v5p-128", "--no-queued")
  assert proc.returncode == 0, proc.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "create", "sd3", *ZONE, "--accelerator-type=v5p-128",
                    "--version=v2-alpha-tpuv5"]]
  proc, calls = fake("create", "--name=sd3", *ZONE, "--type=v6e-16", "--spot")
  assert proc.returncode == 0, proc.stderr
  assert calls == [["compute", "tpus", "queued-resources", "create", "sd3", *ZONE, "--node-id=sd3",
                    "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot"],
                   ["compute", "tpus", "queued-resources", "describe", "sd3", *ZONE, "--format=json"]]
  proc, calls = fake("create", "--name=sd3", *ZONE, "--type=v5litepod-16", "--reserved", "--slices=2")
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "sd3", *ZONE, "--node-count=2",
                      "--node-prefix=sd3", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                      "--reserved"]
  proc, _ = fake("create", "--name=sd3", *ZONE, "--type=v9-8")
  assert proc.returncode != 0 and "unknown TPU family 'v9'" in proc.stderr


def test_setup_copies_the_code_installs_and_mounts(fake, tmp_path):
  proc, calls = fake("setup", "--name=sd3", *ZONE, "--mount=gs://bkt")
  assert proc.returncode == 0, proc.stderr
  assert calls[0][:6] == ["compute", "tpus", "tpu-vm", "scp", str(tmp_path / "logs" / "sd3-code.tar.gz"),
                          "sd3:~/mmdit_jax.tar.gz"] and calls[0][-1] == "--worker=all"
  ssh = calls[1]
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "sd3"] and "--worker=all" in ssh
  command = ssh[-1]
  assert "pip install -q -e '.[tpu]'" in command and "gcsfuse --implicit-dirs" in command
  assert "bkt /gcs/bkt" in command and "--file-cache-max-size-mb=-1" in command


def test_run_on_every_worker_with_logs(fake, tmp_path):
  proc, calls = fake("run", "--name=sd3", *ZONE, "--slices=2", "--", *TRAIN, workers=2)
  assert proc.returncode == 0, proc.stderr
  ssh = [c for c in calls if "ssh" in c]
  assert sorted((c[4], c[-2]) for c in ssh) == [("sd3-0", "--worker=0"), ("sd3-0", "--worker=1"),
                                               ("sd3-1", "--worker=0"), ("sd3-1", "--worker=1")]
  assert ssh[0][-1] == "--command=cd ~/mmdit_jax && . .venv/bin/activate && " + " ".join(TRAIN)
  assert "[sd3-1/1] training on worker 1" in proc.stdout
  log = tmp_path / "logs" / "sd3" / "sd3-0-worker-1.log"
  assert "training on worker 1" in log.read_text()


def test_a_study_spread_over_the_hosts_of_two_slices(fake):
  """{worker}/{workers} in the command become each host's index over all slices and their count, so every
  host runs its own shard of the study (launch/README.md)."""
  study = ["python", "-m", "mmdit_jax.study", "--config=configs/study.py:formulations=all61",
           "--workdir=gs://b/study", "--shard={worker}/{workers}"]
  proc, calls = fake("run", "--name=st", *ZONE, "--slices=2", "--", *study, workers=2)
  assert proc.returncode == 0, proc.stderr
  shards = sorted((c[4], c[-2], c[-1].rsplit(" ", 1)[-1].strip("'")) for c in calls if "ssh" in c)  # (quoted: braces)
  assert shards == [("st-0", "--worker=0", "--shard=0/4"), ("st-0", "--worker=1", "--shard=1/4"),
                    ("st-1", "--worker=0", "--shard=2/4"), ("st-1", "--worker=1", "--shard=3/4")]


def test_spot_preemption_recreates_and_resumes(fake):
  proc, calls = fake("train", "--name=sd3", *ZONE, "--type=v5p-128", "--spot", "--", *TRAIN, workers=1,
                     ssh_exits="75,0", missing=True)
  assert proc.returncode == 0, proc.stderr
  verbs = [(c[2], c[3]) for c in calls if c[3] in ("create", "delete", "ssh", "scp")]
  assert verbs == [("queued-resources", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                   ("queued-resources", "delete"),
                   ("queued-resources", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]
  assert "preempted (exit 75); recreating the slice" in proc.stderr


def test_jobset_manifest(fake, tmp_path):
  proc, calls = fake("jobset", "--name=sd3", "--type=v5p-128", "--topology=4x4x4", "--slices=2",
                     "--image=us-docker.pkg.dev/p/mmdit:latest", f"--out={tmp_path / 'jobset.yaml'}", "--", *TRAIN)
  assert proc.returncode == 0 and not calls, proc.stderr
  m = json.loads((tmp_path / "jobset.yaml").read_text())
  job = m["spec"]["replicatedJobs"][0]
  pod = job["template"]["spec"]["template"]["spec"]
  assert m["kind"] == "JobSet" and job["replicas"] == 2
  assert job["template"]["spec"]["parallelism"] == 16  # 64 chips, 4 per host
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x4"}
  assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 4
  assert pod["containers"][0]["command"][-1] == " ".join(TRAIN)
