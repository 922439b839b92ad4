"""The demo cascade's ablation: noise-conditioning augmentation measured on the base model's own outputs.

A base run (32² demo scenes) samples N captions; each super-resolution run (32 → 64) then upsamples those
samples, and so does plain bicubic interpolation. Scored at 64²: the demo checker's compositional accuracy,
PSNR against the captions' scenes rendered at 64² (ground truth of the layout, not of the base model's sample),
and FID (the demo feature network) against real 64² scenes. The same SR runs from the ground-truth low-res
scenes show what each can do without the base model's artefacts. Each SR run with augmentation is also swept
over sampling levels.

  python -m mmdit_jax.main --config=configs/imagen.py:stage=base --workdir=/tmp/casc/base
  python -m mmdit_jax.main --config=configs/imagen.py:stage=sr --workdir=/tmp/casc/sr_aug
  python -m mmdit_jax.main --config=configs/imagen.py:stage=sr,aug=0 --workdir=/tmp/casc/sr_noaug
  python benchmarks/cascade_ablation.py --base=/tmp/casc/base --sr=/tmp/casc/sr_aug,/tmp/casc/sr_noaug \
      --levels=0,0.1,0.2,0.3 --out=docs/cascade_demo
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
  parser.add_argument("--base", required=True, help="the base run's workdir")
  parser.add_argument("--sr", required=True, help="super-resolution workdirs, comma-separated")
  parser.add_argument("--num", type=int, default=128, help="captions sampled")
  parser.add_argument("--levels", default="0,0.1,0.2,0.3", help="sampling augmentation levels to sweep")
  parser.add_argument("--out", default="", help="write OUT.md and OUT.json (e.g. docs/cascade_demo)")
  parser.add_argument("--seed", type=int, default=7)
  args = parser.parse_args()

  import jax
  from mmdit_jax import cascade, fid, sample, superres
  from mmdit_jax.data import demo

  start = time.time()
  rng = np.random.default_rng(args.seed)
  scenes = [demo.random_scene(rng) for _ in range(args.num)]
  prompts = [demo.caption(s) for s in scenes]
  requests = [sample.Request(p) for p in prompts]
  base_cfg = cascade.stage_config(args.base, {})
  base = sample.generate(base_cfg, args.base, requests)
  size = 2 * base.images.shape[1]
  reference = np.stack([demo.render(demo.random_scene(rng), rng, size=size) for _ in range(args.num)])
  features = fid.feature_network("demo", "")

  def score(images) -> dict:
    return {**cascade.scene_scores(images, prompts), "fid_demo": fid.fid(features, images, reference)}

  base_scores = {k: v for k, v in demo.compositional_accuracy(base.images, prompts).items()}
  rows = [{"method": "bicubic", "input": "base samples", "aug_level": None,
           **score(np.asarray(superres.upsample(jax.numpy.asarray(base.images), (size, size), "bicubic")))}]
  truth = np.stack([demo.render(s, size=size) for s in scenes])  # the captions' scenes, no jitter
  truth_low = np.asarray(superres.downsample(truth, 2))
  rows.append({"method": "bicubic", "input": "true low-res", "aug_level": None,
               **score(np.asarray(superres.upsample(jax.numpy.asarray(truth_low), (size, size), "bicubic")))})
  levels = [float(x) for x in args.levels.split(",") if x]
  for workdir in args.sr.split(","):
    cfg = cascade.stage_config(workdir, {})
    name = f"SR, trained with aug ≤ {cfg.sr.aug_max:g}" if cfg.sr.aug_max else "SR, no augmentation"
    for level in (levels if cfg.sr.aug_max else [0.0]):
      out = sample.generate(cfg, workdir, requests, lowres=base.images, aug_level=level)
      rows.append({"method": name, "input": "base samples", "aug_level": level, **score(out.images)})
      print(rows[-1], flush=True)
    out = sample.generate(cfg, workdir, requests, lowres=truth_low, aug_level=levels[0] if cfg.sr.aug_max else 0.0)
    rows.append({"method": name, "input": "true low-res", "aug_level": levels[0] if cfg.sr.aug_max else 0.0,
                 **score(out.images)})
    print(rows[-1], flush=True)
  report = {"base_workdir": args.base, "num": args.num, "base_accuracy_32": base_scores, "rows": rows,
            "seconds": round(time.time() - start, 1)}
  keys = ["accuracy_all", "accuracy_position", "accuracy_colour", "accuracy_shape", "psnr", "fid_demo"]
  lines = ["| method | input | aug level | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
  for r in rows:
    level = "" if r["aug_level"] is None else f"{r['aug_level']:.2f}"
    lines.append(f"| {r['method']} | {r['input']} | {level} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
  table = "\n".join(lines)
  print(f"base model at 32²: {base_scores}\n{table}")
  if args.out:
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".table.md").write_text(table + "\n")


if __name__ == "__main__":
  main()
