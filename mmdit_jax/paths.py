"""User paths: any location etils.epath knows (local, gs://, …) through one API, and local views for the
readers that only take local files (ArrayRecord shards, safetensors, Hugging Face tokenizers).

ArrayRecord reads local files only, so a gs:// dataset is read through a gcsfuse mount of its bucket at
$MMDIT_JAX_GCS_MOUNT/BUCKET (default /gcs/BUCKET; `launch/tpu.py setup --mount=gs://BUCKET` makes it).
Weights and tokenizers on gs:// are read from that mount too, or else copied once into the local cache.
"""

from __future__ import annotations

import json
import os
import tempfile

from etils import epath

from mmdit_jax.errors import UserError


def path(p) -> epath.Path:
  return epath.Path(p)


def cache_dir() -> epath.Path:
  """$MMDIT_JAX_CACHE, else ~/.cache/mmdit_jax: demo datasets, the XLA compilation cache, remote copies."""
  return epath.Path(os.environ.get("MMDIT_JAX_CACHE") or os.path.expanduser("~/.cache/mmdit_jax"))


def compilation_cache_dir() -> str:
  """The persistent XLA compilation cache every entry point uses: $JAX_COMPILATION_CACHE_DIR, else
  cache_dir()/xla."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla")


def is_remote(p) -> bool:
  return "://" in str(p)


def gcs_mount_root() -> epath.Path:
  return epath.Path(os.environ.get("MMDIT_JAX_GCS_MOUNT", "/gcs"))


def _mounted(p) -> epath.Path | None:
  text = str(p)
  if not text.startswith("gs://"):
    return None
  bucket, _, rest = text[len("gs://"):].partition("/")
  root = gcs_mount_root() / bucket
  return (root / rest) if root.is_dir() else None


def local_view(p, what: str) -> str:
  """A local path to read `p` from: itself when local, else its gcsfuse mount; a UserError naming the
  mount to create otherwise."""
  if not is_remote(p):
    return str(p)
  mounted = _mounted(p)
  if mounted is not None:
    return str(mounted)
  bucket = str(p)[len("gs://"):].split("/")[0] if str(p).startswith("gs://") else "?"
  raise UserError(f"{what} {p} is read through a local mount of its bucket (ArrayRecord reads local files "
                  f"only): mount gs://{bucket} at {gcs_mount_root() / bucket} (launch/tpu.py setup "
                  f"--mount=gs://{bucket} does it with gcsfuse; MMDIT_JAX_GCS_MOUNT moves the root), or pass the "
                  "mounted path")


def local_copy(p, cache_root) -> str:
  """A local path to read the file or directory `p` from: itself when local, its gcsfuse mount when there
  is one, else a copy made once under `cache_root` (weights, tokenizers: read whole anyway)."""
  if not is_remote(p):
    return str(p)
  mounted = _mounted(p)
  if mounted is not None:
    return str(mounted)
  src = epath.Path(p)
  dst = epath.Path(cache_root) / "remote" / str(p).replace("://", "/")
  if not (dst / ".complete").exists() and not dst.is_file():
    if src.is_dir():
      for f in src.rglob("*"):
        if f.is_file():
          target = dst / f.relative_to(src)
          target.parent.mkdir(parents=True, exist_ok=True)
          f.copy(target, overwrite=True)
      (dst / ".complete").write_text(str(p))
    else:
      dst.parent.mkdir(parents=True, exist_ok=True)
      src.copy(dst, overwrite=True)
  return str(dst)


def write_json(dst, data, **dumps_kwargs):
  """`data` as JSON at `dst`, whole or not at all (write_atomically)."""
  text = json.dumps(data, **dumps_kwargs)
  write_atomically(dst, lambda local: epath.Path(local).write_text(text))


def write_atomically(dst, write):
  """Calls write(local_path) to produce a file, then puts it at `dst` all at once: a rename on a local disk,
  one upload of a finished file elsewhere (object stores create objects atomically)."""
  dst = epath.Path(dst)
  if not is_remote(dst):
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    write(str(tmp))
    tmp.replace(dst)  # (over an older file as the upload below does: os.replace, atomic)
    return
  with tempfile.TemporaryDirectory() as tmp_dir:
    local = epath.Path(tmp_dir) / dst.name
    write(str(local))
    local.copy(dst, overwrite=True)
