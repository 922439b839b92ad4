"""Writes datasets atomically: shards and metadata go to a local staging directory that is renamed into
place (local disk) or uploaded with metadata.json last (gs:// and other stores) only after everything is
written, so a crash never leaves a dataset that looks complete.

CLI: python -m mmdit_jax.data.writer --out DIR --npz arrays.npz [--examples_per_shard N]
(each array in the .npz is one feature, indexed by example along axis 0).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from mmdit_jax import paths
from mmdit_jax.data import records

SHAPES = "shapes.npy"  # per-example shapes of the bucketing feature, when its shape varies
# Riegeli's compression of a shard's records. Latents and text embeddings in float16 shrink by ~8 % under
# zstd, and decompressing them costs 2.8× in read speed (benchmarks/data_loader.py: 1,260 → 450 records/s
# of the SD3-256 record on one core), so shards are stored uncompressed unless asked. Readers need no
# setting: every chunk names its own compression.
COMPRESSIONS = ("uncompressed", "zstd", "snappy", "brotli")


def _writer_options(compression: str) -> str:
  if compression not in COMPRESSIONS:
    raise ValueError(f"shard compression {compression!r}; valid: {list(COMPRESSIONS)}")
  return f"group_size:1,{compression}"


class DatasetWriter:
  """with DatasetWriter(path, features, extras) as w: w.write({...}); the dataset appears on exit."""

  def __init__(self, path, features, extras: dict | None = None, *, examples_per_shard: int = 4096,
               null_embeddings: dict | None = None, bucket_feature: str = "latent", overwrite: bool = False,
               keep_existing: bool = False, compression: str = "uncompressed"):
    self.path = epath.Path(path)
    self.options = _writer_options(compression)
    if self.path.exists() and not overwrite:
      raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
    self.features = tuple(f if isinstance(f, records.Feature) else records.Feature(
        f["name"], tuple(f["shape"]), f["dtype"]) for f in features)
    self.extras = dict(extras or {})
    self.null_embeddings = null_embeddings
    self.examples_per_shard = examples_per_shard
    self.keep_existing = keep_existing  # a deterministic dataset another process finished first is kept
    if paths.is_remote(self.path):
      self.tmp = epath.Path(tempfile.mkdtemp(prefix=f"{self.path.name}.partial-"))
    else:
      self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
      if self.tmp.exists():
        self.tmp.rmtree()
      self.tmp.mkdir(parents=True)
    self.shards: list[tuple[str, int]] = []
    self.writer, self.count = None, 0
    bucket = [f for f in self.features if f.name == bucket_feature and None in f.shape]
    self.bucket_feature = bucket[0].name if bucket else None
    self.shapes: list[tuple[int, ...]] = []

  def _roll(self):
    if self.writer is not None:
      self.writer.close()
    name = f"shard-{len(self.shards):05d}.array_record"
    self.writer = ArrayRecordWriter(str(self.tmp / name), self.options)
    self.shards.append((name, 0))

  def write(self, example: dict):
    if self.writer is None or self.shards[-1][1] >= self.examples_per_shard:
      self._roll()
    self.writer.write(records.encode(example, self.features, f"example {self.count}"))
    name, n = self.shards[-1]
    self.shards[-1] = (name, n + 1)
    if self.bucket_feature:
      self.shapes.append(tuple(np.shape(example[self.bucket_feature])))
    self.count += 1

  def close(self):
    if self.writer is not None:
      self.writer.close()
    if self.count == 0:
      self.tmp.rmtree(missing_ok=True)
      raise records.DataError(f"no examples were written to {self.path}")
    meta = finalize(self.tmp, self.features, self.shards, self.extras, self.null_embeddings,
                    self.shapes if self.bucket_feature else None)
    if self.keep_existing and (self.path / records.METADATA).is_file():  # finished by another process meanwhile
      self.tmp.rmtree()
      return records.load_metadata(self.path)
    if self.path.exists():
      self.path.rmtree()
    if paths.is_remote(self.path):  # upload, metadata.json (the mark of completeness) last
      files = sorted(self.tmp.iterdir(), key=lambda f: f.name == records.METADATA)
      self.path.mkdir(parents=True, exist_ok=True)
      for f in files:
        f.copy(self.path / f.name, overwrite=True)
      self.tmp.rmtree()
    else:
      try:
        self.tmp.rename(self.path)
      except OSError:
        if not (self.keep_existing and (self.path / records.METADATA).is_file()):
          raise
        self.tmp.rmtree()  # (another process renamed its identical copy first)
        return records.load_metadata(self.path)
    return meta

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:  # leave nothing that could be mistaken for a dataset
      if self.writer is not None:
        self.writer.close()
      self.tmp.rmtree(missing_ok=True)
    return False


def write_shard(path, features, examples: Iterable[dict], where: str = "", verify: bool = False,
                compression: str = "uncompressed") -> int:
  """Writes one shard file atomically (written under a temporary name, then renamed or uploaded whole);
  returns the record count. With `verify`, every record is read back and checked (data.verify) before
  the shard takes its name."""
  path = epath.Path(path)
  options = _writer_options(compression)
  count = [0]

  def write(local: str):
    writer = ArrayRecordWriter(local, options)
    try:
      for n, ex in enumerate(examples, 1):
        writer.write(records.encode(ex, features, f"{where or path.name} example {n - 1}"))
        count[0] = n
    finally:
      writer.close()
    if verify:
      from mmdit_jax.data.verify import verify_shard  # (verify reads shards; the writer only calls it)
      bad = verify_shard(local, count[0], features)["bad"]
      if bad:
        raise records.DataError(f"{path}: the shard just written does not read back: {bad[:3]}")

  paths.write_atomically(path, write)
  return count[0]


def finalize(path, features, shards, extras, null_embeddings=None, shapes=None) -> records.Metadata:
  """Writes null embeddings, bucket shapes and, last and whole, metadata.json into a directory of finished
  shards: from then on it is a complete dataset."""
  path = epath.Path(path)
  if null_embeddings is not None:
    with (path / records.NULL_EMBEDDINGS).open("wb") as f:
      np.savez(f, **null_embeddings)
  if shapes is not None:
    with (path / SHAPES).open("wb") as f:
      np.save(f, np.asarray(shapes, np.int32))
  meta = records.Metadata(tuple(features), tuple(shards), dict(extras))
  paths.write_json(path / records.METADATA, meta.to_json(), indent=1)
  return meta


def write_arrays(path, arrays: dict[str, np.ndarray], extras: dict | None = None, **kwargs):
  """Writes a dataset from per-feature arrays indexed by example along axis 0."""
  n = {len(a) for a in arrays.values()}
  if len(n) != 1:
    raise records.DataError(f"feature arrays differ in length: { {k: len(a) for k, a in arrays.items()} }")
  features = [records.Feature(k, tuple(a.shape[1:]), str(a.dtype)) for k, a in arrays.items()]
  with DatasetWriter(path, features, extras, **kwargs) as w:
    for i in range(n.pop()):
      w.write({k: a[i] for k, a in arrays.items()})
  return records.load_metadata(path)


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--npz", required=True, help=".npz with one array per feature (examples on axis 0)")
  parser.add_argument("--examples_per_shard", type=int, default=4096)
  parser.add_argument("--extras", default="{}", help="JSON merged into metadata.json")
  parser.add_argument("--compression", default="uncompressed", choices=COMPRESSIONS)
  args = parser.parse_args(argv)
  with epath.Path(args.npz).open("rb") as f, np.load(f) as data:
    arrays = {k: data[k] for k in data.files}
  meta = write_arrays(args.out, arrays, json.loads(args.extras), examples_per_shard=args.examples_per_shard,
                      compression=args.compression)
  print(f"wrote {meta.num_examples} examples in {len(meta.shards)} shards to {args.out}")


if __name__ == "__main__":
  main()
