"""Precompute throughput on this machine with small random SD3-shaped encoders.

  PYTHONPATH=. python benchmarks/precompute.py [--images 128] [--size 128] [--batch 16]

Encoders (written with the PyTorch references, so this needs the `test` extra): CLIP-L-like width 256 and
bigG-like width 384 (4 layers each, 77 tokens), T5-like width 512 (4 layers, 77 tokens), and a VAE with
SD3's layout at a quarter of its channels (32, 64, 128, 128; 2 resnets per block). Prints the time of a
first run (loading, conversion and compilation included) and the steady-state rate of a second run over
more images, plus each stage alone.
"""

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from configs import precompute as precompute_config
from mmdit_jax import parallel, precompute
from mmdit_jax.encoders import sd3
from tests import torch_reference


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  args = parser.parse_args()
  tmp = pathlib.Path(tempfile.mkdtemp())
  root = torch_reference.write_sd3_encoders(tmp / "sd3", widths={"clip_l": 256, "clip_g": 384, "t5": 512},
                                            depth=4, vae_blocks=(32, 64, 128, 128), vae_groups=32, vae_layers=2)
  rng = np.random.default_rng(0)
  words = torch_reference.WORDS
  lines = []
  for i in range(args.images):
    h, w = rng.integers(args.size, 2 * args.size, 2)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / f"{i}.jpg", quality=90)
    lines.append(json.dumps({"image": f"{i}.jpg", "caption": " ".join(rng.choice(words, 12))}))
  (tmp / "m.jsonl").write_text("\n".join(lines) + "\n")
  (tmp / "warm.jsonl").write_text("\n".join(lines[:args.batch]) + "\n")

  def config(manifest, out):
    c = precompute_config.get_config(f"input={tmp / manifest},output={tmp / out},root={root},resolution={args.size}")
    c.batch_size, c.examples_per_shard = args.batch, 4 * args.batch
    return c

  t0 = time.perf_counter()
  precompute.run(config("warm.jsonl", "warm"))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  precompute.run(config("m.jsonl", "out"))
  steady = time.perf_counter() - t0

  # Stages alone, warm.
  mesh = parallel.make_mesh((-1, 1, 1, 1), devices=jax.local_devices())
  paths = sd3.EncoderPaths.from_config(config("m.jsonl", "x").encoders)
  vae, text = sd3.Autoencoder(paths.vae, mesh), sd3.SD3TextEncoder(paths, mesh)
  images = np.stack([precompute.load_image(str(tmp / f"{i}.jpg"), args.size, ()) for i in range(args.batch)])
  prompts = [json.loads(line)["caption"] for line in lines[:args.batch]]
  vae.encode(images), text(prompts)
  stages = {}
  for name, fn in (("image decode+resize", lambda: [precompute.load_image(str(tmp / f"{i}.jpg"), args.size, ())
                                                     for i in range(args.batch)]),
                   ("vae encode", lambda: vae.encode(images)), ("text encoders", lambda: text(prompts))):
    t0 = time.perf_counter()
    for _ in range(3):
      fn()
    stages[name] = args.batch * 3 / (time.perf_counter() - t0)
  print(f"\n{jax.device_count()} {jax.devices()[0].platform} devices; {args.images} images of "
        f"{args.size}-{2 * args.size} px → {args.size}² crops, batch {args.batch}")
  print(f"first run ({args.batch} images; load + convert + compile): {first:.1f} s")
  print(f"second run ({args.images} images, compiled): {steady:.1f} s = {args.images / steady:.1f} images/s")
  for name, rate in stages.items():
    print(f"  {name:22s} {rate:8.1f} images/s")


if __name__ == "__main__":
  main()
