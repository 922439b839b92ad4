"""Cloud TPU VMs for mmdit_jax, with gcloud as the only outside tool.

  python launch/tpu.py create --name=NAME --zone=ZONE --type=v5p-128 [--spot | --reserved] [--slices=2]
  python launch/tpu.py setup  --name=NAME --zone=ZONE [--mount=gs://BUCKET]...      # code + .[tpu] + gcsfuse
  python launch/tpu.py run    --name=NAME --zone=ZONE -- python -m mmdit_jax.main --config=… --workdir=gs://…
  python launch/tpu.py train  --name=NAME --zone=ZONE --type=v5p-128 --spot [--mount=…] -- <command>
  python launch/tpu.py delete --name=NAME --zone=ZONE [--queued]
  python launch/tpu.py jobset --name=NAME --type=v5p-128 --topology=4x4x4 --image=IMAGE -- <command>  # GKE

`create` uses a queued resource (needed for spot, reserved and multi-slice capacity; --no-queued for a plain
TPU VM). `run` starts the command on every worker of every slice at once, streams their output prefixed
with the worker and keeps one log per worker under logs/NAME/ (--logs). `train` = create (if needed) → setup → run,
and when a spot slice is preempted (exit code 75 from mmdit_jax, or workers lost) deletes, recreates and
runs again: training resumes from its gs:// checkpoints. See launch/README.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# accelerator family → (TPU VM runtime version, TensorCores per chip in the type's number — v4-N and v5p-N
# count cores, v5litepod-N and v6e-N chips —, chips per host of a multi-host slice, GKE accelerator label)
FAMILIES = {
    "v4": ("tpu-ubuntu2204-base", 2, 4, "tpu-v4-podslice"),
    "v5litepod": ("v2-alpha-tpuv5-lite", 1, 4, "tpu-v5-lite-podslice"),
    "v5p": ("v2-alpha-tpuv5", 2, 4, "tpu-v5p-slice"),
    "v6e": ("v2-alpha-tpuv6e", 1, 4, "tpu-v6e-slice"),
}
EXIT_PREEMPTED = 75  # mmdit_jax.errors.EXIT_PREEMPTED: saved and stopped on a preemption notice
# gcsfuse options for many readers of large, immutable training shards: cache files, metadata and listings
# for the life of the mount, read-only, parallel downloads.
GCSFUSE_OPTIONS = ("--implicit-dirs", "-o ro", "--file-cache-max-size-mb=-1", "--cache-dir=/tmp/gcsfuse-cache",
                   "--file-cache-enable-parallel-downloads", "--metadata-cache-ttl-secs=-1",
                   "--stat-cache-max-size-mb=-1", "--type-cache-max-size-mb=-1")
MOUNT_ROOT = "/gcs"  # gs://BUCKET/path is read at /gcs/BUCKET/path (mmdit_jax.data does the same mapping)


def family(accelerator_type: str) -> str:
  name = accelerator_type.split("-")[0]
  if name not in FAMILIES:
    raise SystemExit(f"--type={accelerator_type}: unknown TPU family {name!r}; valid: {sorted(FAMILIES)} "
                     "(e.g. v5p-128, v5litepod-16, v6e-16, v4-32)")
  return name


def gcloud(*args, capture=False, check=True) -> str:
  """Runs gcloud (the only outside tool); returns its stdout when `capture`."""
  cmd = ["gcloud", *args]
  print("+ " + " ".join(shlex.quote(a) for a in cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
  if check and proc.returncode:
    raise SystemExit(f"gcloud failed (exit {proc.returncode}): {' '.join(cmd[:5])} …")
  return proc.stdout or ""


def _where(a) -> list[str]:
  out = [f"--zone={a.zone}"]
  return out + ([f"--project={a.project}"] if a.project else [])


def node_names(a) -> list[str]:
  """The TPU VM of each slice: NAME, or NAME-0 … NAME-(n−1) for a multi-slice queued resource."""
  return [a.name] if a.slices == 1 else [f"{a.name}-{i}" for i in range(a.slices)]


def create(a):
  fam = family(a.type)
  version = a.version or FAMILIES[fam][0]
  pricing = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
  if not a.queued:
    if a.slices > 1:
      raise SystemExit("multi-slice capacity comes as a queued resource: drop --no-queued")
    gcloud("compute", "tpus", "tpu-vm", "create", a.name, *_where(a), f"--accelerator-type={a.type}",
           f"--version={version}", *pricing)
    return
  nodes = [f"--node-id={a.name}"] if a.slices == 1 else [f"--node-count={a.slices}", f"--node-prefix={a.name}"]
  gcloud("compute", "tpus", "queued-resources", "create", a.name, *_where(a), *nodes,
         f"--accelerator-type={a.type}", f"--runtime-version={version}", *pricing)
  wait_active(a)


def wait_active(a, poll_s: float = 30.0):
  """Waits until the queued resource is ACTIVE; fails on FAILED/SUSPENDED."""
  while True:
    state = json.loads(gcloud("compute", "tpus", "queued-resources", "describe", a.name, *_where(a),
                              "--format=json", capture=True) or "{}").get("state", {}).get("state", "UNKNOWN")
    print(f"queued resource {a.name}: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"queued resource {a.name} is {state}")
    time.sleep(poll_s)


def workers(a, node: str) -> int:
  """How many hosts a TPU VM has (its network endpoints)."""
  info = json.loads(gcloud("compute", "tpus", "tpu-vm", "describe", node, *_where(a), "--format=json", capture=True))
  return len(info.get("networkEndpoints", [])) or 1


def ssh(a, node: str, worker: str, command: str, **kw):
  return gcloud("compute", "tpus", "tpu-vm", "ssh", node, *_where(a), f"--worker={worker}",
                f"--command={command}", **kw)


def setup(a):
  """Code (git archive of HEAD), the README's install with .[tpu], and gcsfuse mounts, on every worker."""
  archive = pathlib.Path(a.logs) / f"{a.name}-code.tar.gz"
  archive.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", str(archive), "HEAD"], check=True)
  install = ("mkdir -p ~/mmdit_jax && tar -xzf ~/mmdit_jax.tar.gz -C ~/mmdit_jax && cd ~/mmdit_jax && "
             "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'")
  mounts = []
  for bucket in a.mount:
    name = bucket.removeprefix("gs://").strip("/")
    mounts.append(f"sudo mkdir -p {MOUNT_ROOT}/{name} && sudo chmod 777 {MOUNT_ROOT}/{name} && "
                  f"(mountpoint -q {MOUNT_ROOT}/{name} || gcsfuse {' '.join(GCSFUSE_OPTIONS)} {name} {MOUNT_ROOT}/{name})")
  if mounts:
    mounts.insert(0, "(command -v gcsfuse >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse))")
  for node in node_names(a):
    gcloud("compute", "tpus", "tpu-vm", "scp", str(archive), f"{node}:~/mmdit_jax.tar.gz", *_where(a), "--worker=all")
    ssh(a, node, "all", " && ".join([install, *mounts]))


def run(a) -> int:
  """The command on every worker of every slice at once; output streamed with a [node/worker] prefix and
  kept per worker in logs/NAME/. Returns the highest worker exit code (75: preempted after a save)."""
  command = " ".join(shlex.quote(c) for c in a.command)
  if not command:
    raise SystemExit("run: give the command after --, e.g. -- python -m mmdit_jax.main --config=… --workdir=gs://…")
  remote = f"cd ~/mmdit_jax && . .venv/bin/activate && {command}"  # joins its peers: --distributed=auto
  log_dir = pathlib.Path(a.logs) / a.name
  log_dir.mkdir(parents=True, exist_ok=True)
  procs = []
  hosts = [(node, w) for node in node_names(a) for w in range(workers(a, node))]
  for index, (node, w) in enumerate(hosts):
    # {worker} / {workers}: this host's index over every slice, and their count — for jobs that split work
    # between independent hosts (the study: --shard={worker}/{workers}).
    here = remote.replace("{worker}", str(index)).replace("{workers}", str(len(hosts)))
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(a), f"--worker={w}", f"--command={here}"]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append((f"{node}/{w}", proc, log_dir / f"{node}-worker-{w}.log"))

  def pump(tag, proc, path):
    with open(path, "a") as log:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        print(f"[{tag}] {line}", end="", flush=True)

  threads = [threading.Thread(target=pump, args=p) for p in procs]
  for t in threads:
    t.start()
  codes = [proc.wait() for _, proc, _ in procs]
  for t in threads:
    t.join()
  print(f"workers exited with {sorted(set(codes))}; logs in {log_dir}", file=sys.stderr)
  return max(codes)


def delete(a):
  if a.queued:
    gcloud("compute", "tpus", "queued-resources", "delete", a.name, *_where(a), "--force", "--quiet")
  else:
    gcloud("compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet")


def train(a) -> int:
  """create → setup → run, recreating the slice after each preemption (up to --max_restarts times)."""
  for attempt in range(a.max_restarts + 1):
    exists = subprocess.run(["gcloud", "compute", "tpus", "queued-resources" if a.queued else "tpu-vm",
                             "describe", a.name, *_where(a), "--format=json"], capture_output=True).returncode == 0
    if not exists:
      create(a)
    setup(a)
    code = run(a)
    if code == 0:
      return 0
    if code != EXIT_PREEMPTED and code != 255:  # 255: ssh lost the worker (the VM went away)
      return code
    print(f"preempted (exit {code}); recreating the slice, attempt {attempt + 1} of {a.max_restarts}",
          file=sys.stderr, flush=True)
    delete(a)
  return EXIT_PREEMPTED


def jobset(a):
  """A JobSet manifest (the shape XPK submits) for a GKE TPU node pool: one replicated job per slice, one
  pod per host, the same command and the coordinator from the JobSet's first pod."""
  fam = family(a.type)
  if not a.topology or not a.image:
    raise SystemExit("jobset needs --topology (e.g. 4x4x4 for v5p-128) and --image")
  chips = int(a.type.split("-")[1]) // FAMILIES[fam][1]
  single_host = chips <= (8 if FAMILIES[fam][1] == 1 else 4)
  per_host = chips if single_host else FAMILIES[fam][2]
  hosts = chips // per_host
  command = " ".join(shlex.quote(c) for c in a.command)
  manifest = {
      "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
      "metadata": {"name": a.name, "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                   "cloud.google.com/gke-nodepool"}},
      "spec": {"failurePolicy": {"maxRestarts": a.max_restarts}, "replicatedJobs": [{
          "name": "slice", "replicas": a.slices,
          "template": {"spec": {"parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                                "template": {"spec": {
                                    "restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
                                    "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": FAMILIES[fam][3],
                                                     "cloud.google.com/gke-tpu-topology": a.topology},
                                    "containers": [{"name": "mmdit-jax", "image": a.image,
                                                    "command": ["bash", "-c", command],
                                                    "env": [{"name": "JAX_PLATFORMS", "value": "tpu"}],
                                                    "resources": {"limits": {"google.com/tpu": per_host}}}]}}}}}]}}
  text = json.dumps(manifest, indent=1)  # JSON is YAML; kubectl apply -f accepts it
  if a.out:
    pathlib.Path(a.out).write_text(text + "\n")
  else:
    print(text)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="verb", required=True)
  for verb in ("create", "setup", "run", "train", "delete", "jobset"):
    p = sub.add_parser(verb)
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=verb != "jobset")
    p.add_argument("--project", default="")
    p.add_argument("--type", default="v5p-8", help="accelerator type, e.g. v5p-128 (64 chips), v5litepod-16, v6e-16")
    p.add_argument("--slices", type=int, default=1, help="multi-slice: number of slices (queued resource)")
    p.add_argument("--version", default="", help="TPU VM runtime version (default per family)")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--reserved", action="store_true")
    p.add_argument("--queued", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mount", action="append", default=[], help="gs://BUCKET to mount at /gcs/BUCKET (gcsfuse)")
    p.add_argument("--max_restarts", type=int, default=20)
    p.add_argument("--image", default="", help="jobset: container image with mmdit_jax installed")
    p.add_argument("--topology", default="", help="jobset: the slice topology, e.g. 4x4x4")
    p.add_argument("--out", default="", help="jobset: write the manifest here")
    p.add_argument("--logs", default=str(REPO / "logs"), help="per-worker logs and the code archive")
  a = parser.parse_args(argv)
  a.command = command
  if a.spot and a.reserved:
    raise SystemExit("--spot and --reserved exclude each other")
  result = {"create": create, "setup": setup, "run": run, "train": train, "delete": delete, "jobset": jobset}[a.verb](a)
  return result if isinstance(result, int) else 0


if __name__ == "__main__":
  sys.exit(main())
