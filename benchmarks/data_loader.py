"""Loader throughput at SD3 256² shapes: latent 32×32×16, context 154×4096, pooled 2048, all float16.

Writes a synthetic dataset to a temporary directory, then reads it through the grain pipeline (shuffle,
per-encoder text dropout, the finite check, prefetch) with 1, 2 and N reader threads, and prints
examples/s and MB/s for each.
Usage: python benchmarks/data_loader.py [--examples 256 --batch 32 --steps 40 --workers 1,2,4
                                         --compression uncompressed]
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np

from mmdit_jax import data
from mmdit_jax.data import records

SD3_ENCODERS = [
    {"name": "clip_l", "context_tokens": [0, 77], "context_channels": [0, 768], "pooled": [0, 768]},
    {"name": "clip_g", "context_tokens": [0, 77], "context_channels": [768, 2048], "pooled": [768, 2048]},
    {"name": "t5", "context_tokens": [77, 154], "context_channels": [0, 4096]},
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--workers", default="1,2,4", help="reader thread counts to measure, comma-separated")
  parser.add_argument("--compression", default="uncompressed", help="of the shards' records (data.writer)")
  args = parser.parse_args()
  feats = [records.Feature("latent", (32, 32, 16), "float16"), records.Feature("context", (154, 4096), "float16"),
           records.Feature("pooled", (2048,), "float16")]
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "sd3_256"
    t0 = time.perf_counter()
    null = {"context": np.zeros((154, 4096), np.float16), "pooled": np.zeros(2048, np.float16)}
    with data.DatasetWriter(path, feats, {"text_encoders": SD3_ENCODERS}, examples_per_shard=64,
                            null_embeddings=null, compression=args.compression) as w:
      ex = {f.name: rng.standard_normal(f.shape).astype(np.float16) for f in feats}
      for _ in range(args.examples):
        w.write(ex)
    write_s = time.perf_counter() - t0
    bytes_per_example = sum(int(np.prod(f.shape)) * 2 for f in feats)
    print(f"example: {bytes_per_example / 1e6:.2f} MB; wrote {args.examples} ({args.compression}) in "
          f"{write_s:.1f} s ({args.examples * bytes_per_example / write_s / 1e6:.0f} MB/s)")
    for workers in map(int, args.workers.split(",")):
      ds = data.Dataset(data.PipelineConfig(str(path), args.batch, num_threads=workers, prefetch=8))
      it = ds.iterator()
      next(it)  # warm up threads
      t0 = time.perf_counter()
      for _ in range(args.steps):
        next(it)
      read_s = time.perf_counter() - t0
      n = args.steps * args.batch
      print(f"{workers} worker{'s' if workers > 1 else ''}: {n} examples in {read_s:.2f} s: {n / read_s:.0f} examples/s, "
            f"{n * bytes_per_example / read_s / 1e6:.0f} MB/s (batch {args.batch})")


if __name__ == "__main__":
  main()
