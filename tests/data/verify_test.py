"""Damaged data: the verifier names exactly the damaged records; a run fails on one naming the file, the
record and the step (no traceback), or with on_corrupt=skip replaces it deterministically and counts it."""

import json
import shutil

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mmdit_jax import errors
from mmdit_jax.data import Dataset, DataError, PipelineConfig, demo, load_metadata, verify, writer
from tests import helpers

FLIPS = {1: (5000, 40000), 2: (20000,)}  # shard → byte offsets flipped (each inside one record's chunk)


def _damage(path, shard_name, offsets):
  f = path / shard_name
  data = bytearray(f.read_bytes())
  for off in offsets:
    for j in range(off, off + 8):
      data[j] ^= 0xFF
  f.write_bytes(bytes(data))


def _unreadable(file) -> set[int]:
  """The records array_record itself cannot read (the oracle for byte damage)."""
  reader = ArrayRecordReader(str(file))
  bad = set()
  for i in range(reader.num_records()):
    try:
      reader.read([i])
    except Exception:
      bad.add(i)
  try:
    reader.close()
  except Exception:
    pass
  return bad


@pytest.fixture
def damaged(tmp_path):
  """3 shards × 16 records: a NaN in shard 0 record 5, flipped bytes in shards 1 and 2."""
  rng = np.random.default_rng(0)
  arrays = {"latent": rng.standard_normal((48, 16, 16, 4)).astype(np.float32),
            "pooled": rng.standard_normal((48, 8)).astype(np.float32)}
  arrays["latent"][5, 3, 3, 1] = np.nan
  meta = writer.write_arrays(tmp_path / "ds", arrays, examples_per_shard=16)
  expected = {(meta.shards[0][0], 5)}
  for shard, offsets in FLIPS.items():
    name = meta.shards[shard][0]
    _damage(tmp_path / "ds", name, offsets)
    expected |= {(name, i) for i in _unreadable(tmp_path / "ds" / name)}
  assert len(expected) == 4  # (each flip damages one record)
  return tmp_path / "ds", meta, expected


def test_verifier_finds_exactly_the_damaged_records(damaged, tmp_path, capsys):
  path, meta, expected = damaged
  code = verify.main([str(path), "--workers=2", f"--report={tmp_path / 'report.json'}"])
  assert code == 1
  report = json.loads((tmp_path / "report.json").read_text())
  found = {(b["file"].rsplit("/", 1)[-1], b["index"]) for b in report["bad"]}
  assert found == expected and report["records"] == 48
  out = capsys.readouterr().out
  assert f"{meta.shards[0][0]} record 5: non-finite values in feature 'latent'" in out and "4 damaged" in out
  clean = writer.write_arrays(tmp_path / "clean", {"latent": np.zeros((4, 2), np.float32)}, examples_per_shard=2)
  assert verify.main([str(tmp_path / "clean")]) == 0 and len(clean.shards) == 2


def test_on_corrupt_fail_and_skip(damaged):
  path, meta, expected = damaged
  fail = Dataset(PipelineConfig(str(path), 48, shuffle=False, text_dropout=()))
  with pytest.raises(DataError, match=rf"{meta.shards[0][0]} record 5: non-finite .* at step 0\. Find every damaged "
                                      r"record with `python -m mmdit_jax.data.verify"):
    fail.load_batch(0)
  skip = Dataset(PipelineConfig(str(path), 8, shuffle=True, seed=3, text_dropout=(), on_corrupt="skip"))
  steps = range(2 * skip.batches_per_epoch)
  batches = [skip.load_batch(s) for s in steps]
  assert sum(int(b["skipped_records"].sum()) for b in batches) == 2 * len(expected)  # each damaged record, each epoch
  assert all(np.isfinite(b["latent"]).all() for b in batches)
  # Resuming mid-run (a fresh iterator from step 5) reads exactly what the uninterrupted run read.
  resumed = skip.iterator(start_step=5)
  for s in steps[5:]:
    b = next(resumed)
    for k in ("latent", "pooled", "index", "skipped_records"):
      np.testing.assert_array_equal(b[k], batches[s][k])


def test_a_run_on_damaged_data_stops_naming_the_record(tmp_path):
  """Training on the demo data with its first shard's records damaged stops at the first batch with a DataError
  (main.py prints such errors as one paragraph, exit 2) naming the record and the step."""
  from mmdit_jax import train
  src = demo.ensure_demo("train", 128, root=tmp_path / "src")
  path = tmp_path / "damaged"
  shutil.copytree(src, path)
  name = load_metadata(path).shards[0][0]
  size = (path / name).stat().st_size
  _damage(path, name, range(200, size // 2, 1500))  # records, not the footer's index
  with pytest.raises(DataError, match=rf"{name} record \d+: unreadable .* at step 0\. Find every damaged record"):
    train.train_and_evaluate(helpers.config(**{"data.path": str(path)}), tmp_path / "wd")
  assert issubclass(DataError, errors.UserError)


def test_finiteness_from_the_bits():
  import ml_dtypes
  from mmdit_jax.data import records
  for dt in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
    a = np.random.default_rng(0).standard_normal((7, 5)).astype(dt)
    a[0, 0] = 60000 if dt is np.float16 else 1e30  # large but finite
    assert records._finite(a), dt
    for bad in (np.nan, np.inf, -np.inf):
      b = a.copy()
      b[3, 2] = bad
      assert not records._finite(b), (dt, bad)
  # Checked in chunks: a NaN in the last, partial chunk of a strided view is found.
  big = np.zeros((3 * records._CHUNK + 11, 2), np.float16)
  assert records._finite(big[:, 0])
  big[-1, 0] = np.nan
  assert not records._finite(big[:, 0]) and records._finite(big[:, 1])
