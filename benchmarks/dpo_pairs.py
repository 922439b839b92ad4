"""On-policy preference pairs for the DPO demo: the base model's own samples, judged by the demo checker.

For each of N captions the base run draws K samples (seeds differ), and the demo's checker scores each: the
reward is the share of the caption's objects with all three attributes right plus the mean of the per-attribute
shares (0 … 2). Two samples of one caption whose rewards differ by at least --margin make a pair (preferred =
the higher), the largest gaps first, up to --pairs_per_caption per caption. The samples are kept (samples.npz),
so --rejudge changes the rule without sampling again. With --preferred=render the preferred image is instead the
caption's scene rendered, against each of the base's samples that is not wholly right (SPIN-Diffusion's pairs).
The pairs are written as a training and a held-out preference dataset (latent, latent_rejected, the captions'
embeddings; metadata demo_task "text", so evaluation scores samples with the demo's checker), which
`--config.data.path` / `--config.data.val_path` of a DPO run read. (The rendered pairs of the pairs demo show the
model correct scenes it was trained on already; these show it its own mistakes.) docs/finetune.md has the results.

  python benchmarks/dpo_pairs.py --base=/tmp/dpo_base --out=/tmp/dpo_pairs --captions=768 --per_caption=4
  python -m mmdit_jax.main --config=configs/lora.py:base=run-ema:/tmp/dpo_base,target=tiny,dpo=5000 \
      --config.data.path=/tmp/dpo_pairs/train --config.data.val_path=/tmp/dpo_pairs/validation --workdir=/tmp/dpo_onpolicy
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
  parser.add_argument("--base", required=True, help="the base run's workdir (a text demo run)")
  parser.add_argument("--out", required=True, help="directory for train/ and validation/ pair datasets")
  parser.add_argument("--captions", type=int, default=1024)
  parser.add_argument("--per_caption", type=int, default=4)
  parser.add_argument("--pairs_per_caption", type=int, default=3,
                      help="at most this many pairs of one caption's samples")
  parser.add_argument("--margin", type=float, default=0.5, help="least reward gap of a pair")
  parser.add_argument("--rejudge", action="store_true", help="reuse OUT/samples.npz instead of sampling")
  parser.add_argument("--preferred", choices=("sample", "render"), default="sample",
                      help="sample: both images are the base's samples; render: the preferred image is the caption's "
                           "scene rendered, the rejected one a sample that is not wholly right (SPIN-Diffusion's pairs)")
  parser.add_argument("--held_out", type=float, default=0.125, help="share of captions kept for validation")
  parser.add_argument("--seed", type=int, default=3)
  args = parser.parse_args()

  from mmdit_jax import cascade, inputs, sample
  from mmdit_jax.data import demo

  start = time.time()
  samples_file = pathlib.Path(args.out) / "samples.npz"
  if args.rejudge:
    kept = np.load(samples_file)
    images, captions = kept["images"], [str(c) for c in kept["captions"]]
  else:
    rng = np.random.default_rng(args.seed)
    captions = [demo.caption(demo.random_scene(rng)) for _ in range(args.captions)]
    requests = [sample.Request(c, seed=int(args.seed * 1_000_003 + i * args.per_caption + k))
                for i, c in enumerate(captions) for k in range(args.per_caption)]
    cfg = cascade.stage_config(args.base, {})
    out = sample.generate(cfg, args.base, requests)  # in batches of config.sample.batch_size
    images = out.images.reshape(args.captions, args.per_caption, *out.images.shape[1:])
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(samples_file, images=images.astype(np.float16), captions=np.array(captions))
  sampled = time.time() - start
  checks = [[demo.check(img, c) for img in imgs] for imgs, c in zip(images, captions)]
  reward = np.array([[r["all"] + (r["position"] + r["colour"] + r["shape"]) / 3 for r in row] for row in checks])
  whole = np.array([[r["all"] == 1.0 for r in row] for row in checks])

  def pairs_of(i):
    """(caption, preferred, rejected) with image indices into the caption's samples; -1: its scene rendered."""
    if args.preferred == "render":
      worst = sorted((reward[i, b], b) for b in range(len(reward[i])) if not whole[i, b])
      return [(i, -1, b) for _, b in worst[:args.pairs_per_caption]]
    order = sorted(((reward[i, g] - reward[i, b], g, b) for g in range(len(reward[i])) for b in range(len(reward[i]))
                    if reward[i, g] - reward[i, b] >= args.margin), reverse=True)
    return [(i, g, b) for _, g, b in order[:args.pairs_per_caption]]

  pairs = [pairs_of(i) for i in range(len(captions))]
  if args.preferred == "render":
    render_rng = np.random.default_rng(args.seed + 1)
    rendered = [demo.render(demo.parse_caption(c), render_rng, images.shape[2]) for c in captions]

  encoder = demo.DemoTextEncoder()
  n_val = int(round(len(captions) * args.held_out))
  counts = {}
  for split, rows in (("validation", range(n_val)), ("train", range(n_val, len(captions)))):
    counts[split] = sum(len(pairs[i]) for i in rows)
    extras = {"preference_pairs": True, inputs.DEMO_TASK: "text",
              "source": f"samples of {args.base} judged by the demo checker (preferred: {args.preferred})"}
    with demo.text_writer(pathlib.Path(args.out) / split, demo.pair_features(images.shape[2]),
                          f"demo_pairs_onpolicy-{split}", encoder, extras) as w:
      for i in rows:  # the caption's embeddings once for all its pairs
        context, pooled = encoder(captions[i]) if pairs[i] else (None, None)
        for _, good, bad in pairs[i]:
          w.write({"latent": (rendered[i] if good < 0 else images[i, good]).astype(np.float16), "context": context,
                   "pooled": pooled, "latent_rejected": images[i, bad].astype(np.float16)})
  report = {"base": args.base, "captions": len(captions), "per_caption": images.shape[1],
            "accuracy_all": float(np.mean([[r["all"] for r in row] for row in checks])),
            "whole_scene_accuracy": float(whole.mean()), "mean_reward": float(reward.mean()), "preferred": args.preferred,
            "margin": args.margin,
            "captions_with_pairs": sum(bool(p) for p in pairs), "pairs": counts,
            "sampling_seconds": round(sampled, 1), "seconds": round(time.time() - start, 1)}
  (pathlib.Path(args.out) / "pairs.json").write_text(json.dumps(report, indent=1))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
