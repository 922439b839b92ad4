"""SD3's mixed-aspect hi-res stage on the demo: samples at each aspect bucket, scored, before and after.

The 32² base run and its hi-res fine-tune (three buckets of about 48²: 48², 32×64, 64×32, with the timestep shift
α = √(H·W)/32 of each) sample the same N captions at every bucket's size; each set is scored by the demo checker
(compositional accuracy: position, colour, shape, all) and PSNR against the captions' scenes rendered at that
size. The base run at 32² is the reference. A grid of the hi-res run's samples per bucket goes to OUT.png.

  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo,steps=1500 --config.model.pos_embed_max_size=16 \
      --workdir=/tmp/hires_base
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo,stage=hires,base_run=/tmp/hires_base,steps=600 \
      --workdir=/tmp/hires
  python benchmarks/hires_demo.py --base=/tmp/hires_base --hires=/tmp/hires --out=docs/hires_demo
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="the 32² run's workdir")
  parser.add_argument("--hires", required=True, help="the hi-res (stage=hires) run's workdir")
  parser.add_argument("--num", type=int, default=128, help="captions sampled per size")
  parser.add_argument("--out", default="", help="write OUT.json, OUT.table.md and OUT.png (e.g. docs/hires_demo)")
  parser.add_argument("--seed", type=int, default=11)
  args = parser.parse_args()

  from PIL import Image

  from mmdit_jax import cascade, evaluate, sample
  from mmdit_jax.data import demo
  from mmdit_jax.train_step import bucket_shift

  start = time.time()
  rng = np.random.default_rng(args.seed)
  prompts = [demo.caption(demo.random_scene(rng)) for _ in range(args.num)]
  requests = [sample.Request(p) for p in prompts]
  hires_cfg = cascade.stage_config(args.hires, {})
  sizes = [(32, 32), *hires_cfg.data.demo_buckets]
  rows, grids = [], []
  for name, workdir in (("base (32² only)", args.base), ("hi-res fine-tune", args.hires)):
    for h, w in sizes:
      cfg = cascade.stage_config(workdir, {"sample.height": str(h), "sample.width": str(w)})
      out = sample.generate(cfg, workdir, requests)
      alpha = bucket_shift(cfg, (h, w)) if cfg.shift_base_resolution else cfg.formulation.shift
      rows.append({"model": name, "size": f"{h}×{w}", "shift": alpha, "step": out.step,
                   **cascade.scene_scores(out.images, prompts)})
      print(rows[-1], flush=True)
      if workdir == args.hires and (h, w) != (32, 32):
        grids.append(evaluate.to_uint8(out.images[:6]))
  report = {"base": args.base, "hires": args.hires, "num": args.num, "rows": rows,
            "seconds": round(time.time() - start, 1)}
  keys = ["accuracy_all", "accuracy_position", "accuracy_colour", "accuracy_shape", "psnr"]
  lines = ["| model | size (H×W px) | α | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['size']} | {r['shift']:.2f} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
  table = "\n".join(lines)
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".table.md").write_text(table + "\n")
    # One row per bucket: its first six samples side by side (×3 nearest), gaps in grey.
    scale, gap = 3, 6
    cells = [[np.kron(img, np.ones((scale, scale, 1), np.uint8)) for img in g] for g in grids]
    width = max(sum(c.shape[1] + gap for c in row) for row in cells)
    height = sum(row[0].shape[0] + gap for row in cells)
    canvas = np.full((height, width, 3), 128, np.uint8)
    y = 0
    for row in cells:
      x = 0
      for c in row:
        canvas[y:y + c.shape[0], x:x + c.shape[1]] = c
        x += c.shape[1] + gap
      y += row[0].shape[0] + gap
    Image.fromarray(canvas).save(out.with_suffix(".png"))
    (out.parent / (out.name + ".prompts.txt")).write_text("\n".join(prompts[:6]) + "\n")


if __name__ == "__main__":
  main()
