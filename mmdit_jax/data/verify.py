"""Verify a precomputed dataset: every record of every shard read, checksummed (Riegeli's chunk hashes),
decoded against metadata.json (shapes, dtypes) and checked for finite values; damaged records named by
shard and index, before a long run meets them.

  python -m mmdit_jax.data.verify DIR [--workers=8] [--report=FILE.json]

DIR may be any path the project reads (gs:// through its gcsfuse mount). Exit status 0: every record is
sound; 1: damaged records (listed, and in the JSON report); 2: the dataset cannot be opened at all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time

from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from mmdit_jax import paths
from mmdit_jax.data import records


def verify_shard(file: str, expected: int, features) -> dict:
  """{'file', 'records', 'bad': [{'index', 'reason'}]} for one shard; every record is read on its own, so
  a damaged chunk names exactly the records it holds."""
  bad = []
  try:
    reader = ArrayRecordReader(file)
    found = reader.num_records()
  except Exception as e:  # array_record raises bare RuntimeErrors
    return {"file": file, "records": 0,
            "bad": [{"index": None, "reason": f"unreadable shard ({str(e).splitlines()[0][:300]})"}]}
  try:
    if found != expected:
      bad.append({"index": None, "reason": f"holds {found} records but metadata.json says {expected}"})
    for i in range(found):
      where = f"{file} record {i}"
      try:
        record = reader.read([i])[0]
      except Exception as e:
        bad.append({"index": i, "reason": f"unreadable ({str(e).splitlines()[0][:200] or type(e).__name__})"})
        continue
      try:
        records.check_finite(records.decode(record, features, where), where)
      except records.CorruptRecord as e:
        bad.append({"index": i, "reason": e.reason})
      except records.DataError as e:
        bad.append({"index": i, "reason": f"does not decode ({e})"})
  finally:
    try:
      reader.close()
    except Exception:  # (closing re-reports a damage already listed)
      pass
  return {"file": file, "records": found, "bad": bad}


def verify(path, workers: int = 8, progress=None) -> dict:
  """The report of every shard of the dataset at `path` (shards in parallel)."""
  meta = records.load_metadata(path)
  local = paths.local_view(str(path), "dataset")
  jobs = [(f"{local}/{name}", count) for name, count in meta.shards]
  shards, done, total = [], 0, meta.num_examples
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for result in pool.map(lambda job: verify_shard(job[0], job[1], meta.features), jobs):
      shards.append(result)
      done += result["records"]
      if progress:
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress(f"verified {len(shards)}/{len(jobs)} shards, {done}/{total} records ({rate:.0f}/s), "
                 f"{sum(len(s['bad']) for s in shards)} damaged")
  bad = [{"file": s["file"], **b} for s in shards for b in s["bad"]]
  return {"path": str(path), "shards": len(jobs), "records": done, "expected_records": total, "bad": bad,
          "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="dataset directory (metadata.json + shards)")
  parser.add_argument("--workers", type=int, default=8, help="shards verified at once")
  parser.add_argument("--report", default="", help="write the report as JSON here")
  args = parser.parse_args(argv)
  try:
    report = verify(epath.Path(args.path), args.workers,
                    progress=lambda line: print(f"\r{line}", end="", file=sys.stderr, flush=True))
  except records.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(file=sys.stderr)
  if args.report:
    epath.Path(args.report).write_text(json.dumps(report, indent=1))
  for b in report["bad"]:
    print(f"{b['file']} record {b['index']}: {b['reason']}" if b["index"] is not None else f"{b['file']}: {b['reason']}")
  print(f"{report['records']} records in {report['shards']} shards verified in {report['seconds']:.1f} s: "
        + (f"{len(report['bad'])} damaged" if report["bad"] else "all sound"))
  return 1 if report["bad"] else 0


if __name__ == "__main__":
  sys.exit(main())
