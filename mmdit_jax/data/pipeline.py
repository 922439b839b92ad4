"""The training data path: a deterministic batch plan over precomputed examples, read with grain.

Each epoch's plan is a pure function of (seed, epoch): examples are shuffled within their aspect-ratio
bucket (one latent shape per batch), cut into global batches, and the batch order is shuffled. Step s
reads global batch s; process p of P reads rows [p·B/P, (p+1)·B/P) of it, so processes are disjoint
and together cover every batch. Because a step fully determines its batch (text dropout included),
the iterator state is just a position and resumes exactly, on any number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from mmdit_jax import paths
from mmdit_jax.data import records
from mmdit_jax.data.tfds_source import TfdsSource
from mmdit_jax.data.writer import SHAPES

SD3_TEXT_DROPOUT = 0.463  # per encoder, independently (SD3 §5.2.2): ≈ 10 % fully unconditional


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  path: str  # dataset directory (metadata.json + shards)
  global_batch_size: int
  seed: int = 0
  shuffle: bool = True
  # (encoder, rate) pairs, "*" naming every encoder; None → SD3's 46.3 % each; () → no dropout
  text_dropout: tuple[tuple[str, float], ...] | None = None
  label_dropout: float = 0.0  # class-conditional: rate of replacing the label by the null class
  num_threads: int = 4  # grain reader threads
  prefetch: int = 8  # batches decoded ahead in the background
  tfds_data_dir: str = ""  # for path "tfds:NAME[:SPLIT]": the TFDS data_dir
  tfds_rename: tuple[tuple[str, str], ...] = ()  # TFDS feature → pipeline feature name
  on_corrupt: str = "fail"  # a damaged record: "fail" (naming it) | "skip" (a deterministic replacement, counted)


ON_CORRUPT = ("fail", "skip")
HOST_ONLY = ("index", "step", "skipped_records")  # batch entries for the host's bookkeeping, not the model
MAX_REPLACEMENT_TRIES = 64  # "skip": how far along the dataset to look for a readable replacement


def _check_shard(file: str, count: int):
  """Opens a shard and checks its record count against metadata.json, naming the file on failure."""
  try:
    reader = ArrayRecordReader(file)
    found = reader.num_records()
    reader.close()
  except Exception as e:  # array_record raises bare RuntimeErrors, often without a message
    raise records.DataError(f"{file}: unreadable ArrayRecord shard, truncated or corrupt ({e!r})") from e
  if found != count:
    raise records.DataError(f"{file}: holds {found} records but metadata.json says {count}")


class Dataset:
  """Random access to a dataset and its batch plan; `iterator()` gives a checkpointable grain iterator."""

  def __init__(self, cfg: PipelineConfig):
    if cfg.on_corrupt not in ON_CORRUPT:
      raise records.DataError(f"config.data.on_corrupt={cfg.on_corrupt!r}; valid: {list(ON_CORRUPT)}")
    self.cfg = cfg
    self.path = epath.Path(cfg.path)
    if cfg.path.startswith("tfds:"):
      self.tfds = TfdsSource(cfg.path, cfg.tfds_data_dir, dict(cfg.tfds_rename))
      self.meta = self.tfds.meta
    else:
      self.tfds = None
      self.meta = records.load_metadata(self.path)
      local = paths.local_view(cfg.path, "dataset")  # ArrayRecord reads local files: gs:// through a mount
      files = [f"{local}/{name}" for name, _ in self.meta.shards]
      for (name, count), file in zip(self.meta.shards, files):
        _check_shard(file, count)
      self._offsets = np.cumsum([0] + [n for _, n in self.meta.shards])
      self.source = grain.sources.ArrayRecordDataSource(files)
    self.features = self.meta.features
    shapes_path = self.path / SHAPES
    if self.tfds is None and shapes_path.is_file():
      with shapes_path.open("rb") as f:
        shapes = np.load(f)
      if len(shapes) != self.meta.num_examples:
        raise records.DataError(f"{shapes_path}: {len(shapes)} rows for {self.meta.num_examples} examples")
      self.bucket_shapes, self.bucket_ids = np.unique(shapes, axis=0, return_inverse=True)
      self.bucket_ids = self.bucket_ids.reshape(-1)
    else:
      self.bucket_shapes = None
      self.bucket_ids = np.zeros(self.meta.num_examples, np.int64)
    self.null = self._load_null()
    self.dropout = self._dropout_rates()
    if cfg.global_batch_size <= 0:
      raise ValueError(f"global_batch_size must be positive, got {cfg.global_batch_size}")
    if self.batches_per_epoch == 0:
      raise records.DataError(f"{self.path}: no aspect-ratio bucket holds a full batch of "
                              f"{cfg.global_batch_size} examples (bucket sizes {np.bincount(self.bucket_ids)})")

  def _load_null(self):
    path = self.path / records.NULL_EMBEDDINGS
    if self.tfds is not None or not path.is_file():
      return None
    with path.open("rb") as f, np.load(f) as data:
      return {k: data[k] for k in data.files}

  def _dropout_rates(self):
    encoders = self.meta.extras.get("text_encoders", [])
    names = [e["name"] for e in encoders]
    rates = dict(self.cfg.text_dropout) if self.cfg.text_dropout is not None else {
        n: SD3_TEXT_DROPOUT for n in names}
    if "*" in rates:
      rates = {**{n: rates["*"] for n in names}, **{k: v for k, v in rates.items() if k != "*"}}
    unknown = set(rates) - set(names)
    if unknown:
      raise ValueError(f"text_dropout names unknown encoders {sorted(unknown)}; this dataset has {names}")
    if any(r > 0 for r in rates.values()) and self.null is None:
      raise records.DataError(f"{self.path / records.NULL_EMBEDDINGS} is missing; text dropout needs the "
                              "null (empty-prompt) embeddings")
    return [(e, rates.get(e["name"], 0.0)) for e in encoders]

  # The plan.
  @functools.cached_property
  def batches_per_epoch(self) -> int:
    counts = np.bincount(self.bucket_ids)
    return int(np.sum(counts // self.cfg.global_batch_size))

  @functools.lru_cache(maxsize=2)
  def epoch_plan(self, epoch: int) -> np.ndarray:
    """(batches_per_epoch, global_batch_size) example indices for one epoch."""
    b = self.cfg.global_batch_size
    rng = np.random.default_rng([self.cfg.seed, epoch])
    batches = []
    for bucket in range(int(self.bucket_ids.max()) + 1):
      idx = np.flatnonzero(self.bucket_ids == bucket)
      if self.cfg.shuffle:
        idx = rng.permutation(idx)
      n = len(idx) // b
      batches.extend(idx[: n * b].reshape(n, b))
    batches = np.stack(batches)
    return batches[rng.permutation(len(batches))] if self.cfg.shuffle else batches

  def global_indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.batches_per_epoch)
    return self.epoch_plan(epoch)[i]

  # Reading.
  def where(self, index: int) -> str:
    """'<shard file> record <i>' of a global example index."""
    shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
    return f"{self.path / self.meta.shards[shard][0]} record {index - self._offsets[shard]}"

  def read(self, index: int) -> dict:
    """Example `index`, decoded and checked (finite values); a CorruptRecord names a damaged one."""
    if self.tfds is not None:
      return self.tfds.read(index)
    where = self.where(index)
    try:
      record = self.source[int(index)]
    except Exception as e:  # Riegeli: "Corrupted Riegeli/records file: chunk data hash mismatch …"
      raise records.CorruptRecord(where, f"unreadable ({str(e).splitlines()[0][:200] or type(e).__name__})")
    try:
      example = records.decode(record, self.features, where)
    except records.DataError as e:
      raise records.CorruptRecord(where, f"does not decode ({e})") from None
    records.check_finite(example, where)
    return example

  def _read_or_replace(self, index: int, step: int) -> tuple[dict, int]:
    """(example, 1 if it replaced a damaged record else 0): config.data.on_corrupt "skip" takes the next
    readable example after a damaged one — a pure function of the data, so resumed runs read the same."""
    try:
      return self.read(index), 0
    except records.CorruptRecord as e:
      if self.cfg.on_corrupt != "skip":
        raise records.DataError(
            f"{e} — at step {step}. Find every damaged record with `python -m mmdit_jax.data.verify "
            f"{self.path}`, then re-create those shards, or set config.data.on_corrupt=skip to train on with "
            "each damaged record replaced by the next readable one (counted as data/skipped_records)") from None
      first = e
    n = self.meta.num_examples
    for k in range(1, MAX_REPLACEMENT_TRIES + 1):
      try:
        example = self.read((index + k) % n)
      except records.CorruptRecord:
        continue
      print(f"warning: skipped a damaged record at step {step}: {first}; used example {(index + k) % n} instead",
            file=sys.stderr, flush=True)
      return example, 1
    raise records.DataError(f"{first} — at step {step}, and the next {MAX_REPLACEMENT_TRIES} examples are damaged too: "
                            f"run `python -m mmdit_jax.data.verify {self.path}`")

  def _apply_dropout(self, batch: dict, step: int, rows: slice):
    rng = np.random.default_rng([self.cfg.seed, step, 0xD5])
    b = self.cfg.global_batch_size
    draws = rng.random((b, max(1, len(self.dropout)) + 1))[rows]  # drawn for the global batch
    dropped = {}
    for j, (enc, rate) in enumerate(self.dropout):
      mask = draws[:, j] < rate
      dropped[enc["name"]] = mask
      if not mask.any():
        continue
      if "context" in batch and "context_tokens" in enc:
        (t0, t1), (c0, c1) = enc["context_tokens"], enc["context_channels"]
        batch["context"][mask, t0:t1, c0:c1] = self.null["context"][t0:t1, c0:c1]
      if "pooled" in batch and "pooled" in enc:
        p0, p1 = enc["pooled"]
        batch["pooled"][mask, p0:p1] = self.null["pooled"][p0:p1]
    if self.cfg.label_dropout > 0 and "label" in batch:
      num_classes = int(self.meta.extras["num_classes"])
      batch["label"] = np.where(draws[:, -1] < self.cfg.label_dropout, num_classes, batch["label"])
    return dropped

  def load_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
    """The host-local part of global batch `step`: stacked numpy arrays, plus 'index' and 'step'."""
    b = self.cfg.global_batch_size
    if b % process_count:
      raise ValueError(f"global_batch_size {b} is not divisible by {process_count} processes")
    local = b // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    idx = self.global_indices(step)[rows]
    read = [self._read_or_replace(int(i), step) for i in idx]
    examples = [e for e, _ in read]
    batch = {f.name: np.stack([e[f.name] for e in examples]) for f in self.features}  # copies: writable
    self._apply_dropout(batch, step, rows)
    batch["index"] = idx.astype(np.int64)
    batch["step"] = np.full((local,), step, np.int64)
    batch["skipped_records"] = np.asarray([r for _, r in read], np.int32)  # 1 where a damaged record was replaced
    return batch

  def iterator(self, process_index: int = 0, process_count: int = 1, start_step: int = 0):
    """A grain iterator of host-local batches from `start_step` on, decoded ahead by reader threads."""
    ds = grain.MapDataset.range(start_step, sys.maxsize).map(
        lambda step: self.load_batch(step, process_index, process_count))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.cfg.num_threads,
                                                     prefetch_buffer_size=self.cfg.prefetch)))
