"""On-policy preference pairs for the DPO demo: the base model's own samples, judged by the demo checker.

For each of N captions the base run draws K samples (seeds differ); a caption whose samples include some the
checker passes (all three attributes right) and some it fails gives pairs (preferred = a passing sample,
rejected = a failing one; up to --pairs_per_caption of them). The pairs are written as a training and a held-out preference dataset (latent,
latent_rejected, the captions' embeddings), which `--config.data.path` / `--config.data.val_path` of a DPO run
read. (The rendered pairs of the pairs demo show the model correct scenes it was trained on already; these show
it its own mistakes.)

  python benchmarks/dpo_pairs.py --base=/tmp/dpo_base --out=/tmp/dpo_pairs --captions=1024 --per_caption=4
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
  parser.add_argument("--pairs_per_caption", type=int, default=4,
                      help="at most this many (passing, failing) pairs of one caption's samples")
  parser.add_argument("--held_out", type=float, default=0.125, help="share of captions kept for validation")
  parser.add_argument("--seed", type=int, default=3)
  args = parser.parse_args()

  from mmdit_jax import cascade, inputs, sample
  from mmdit_jax.data import demo, writer

  start = time.time()
  rng = np.random.default_rng(args.seed)
  captions = [demo.caption(demo.random_scene(rng)) for _ in range(args.captions)]
  requests = [sample.Request(c, seed=int(args.seed * 1_000_003 + i * args.per_caption + k))
              for i, c in enumerate(captions) for k in range(args.per_caption)]
  cfg = cascade.stage_config(args.base, {})
  out = sample.generate(cfg, args.base, requests)  # in batches of config.sample.batch_size
  sampled = time.time() - start
  images = out.images.reshape(args.captions, args.per_caption, *out.images.shape[1:])
  passed = np.array([[demo.check(img, c)["all"] == 1.0 for img in imgs] for imgs, c in zip(images, captions)])
  encoder = demo.DemoTextEncoder()
  null_context, null_pooled = encoder("")
  n_val = int(round(args.captions * args.held_out))
  counts = {}
  for split, rows in (("validation", range(n_val)), ("train", range(n_val, args.captions))):
    pairs = [(i, int(good), int(bad)) for i in rows for good, bad in
             [(g, b) for g in np.flatnonzero(passed[i]) for b in np.flatnonzero(~passed[i])][:args.pairs_per_caption]]
    counts[split] = len(pairs)
    extras = {"name": f"demo_pairs_onpolicy-{split}", "pixels": True, "latent_scale": 1.0, "latent_shift": 0.0,
              "preference_pairs": True, inputs.DEMO_TASK: "text", "source": f"samples of {args.base} judged by the demo checker",
              "encoders": {"demo_text": "mmdit_jax.data.demo.DemoTextEncoder(seed=1234)"},
              "text_encoders": demo.TEXT_ENCODERS}
    size = images.shape[2]
    with writer.DatasetWriter(pathlib.Path(args.out) / split, demo.pair_features(size), extras,
                              examples_per_shard=1024, null_embeddings={"context": null_context, "pooled": null_pooled},
                              overwrite=True) as w:
      for i, good, bad in pairs:
        context, pooled = encoder(captions[i])
        w.write({"latent": images[i, good].astype(np.float16), "context": context, "pooled": pooled,
                 "latent_rejected": images[i, bad].astype(np.float16)})
  report = {"base": args.base, "captions": args.captions, "per_caption": args.per_caption,
            "sample_accuracy_all": float(passed.mean()), "captions_with_pairs": int((passed.any(1) & ~passed.all(1)).sum()), "pairs": counts,
            "sampling_seconds": round(sampled, 1), "seconds": round(time.time() - start, 1)}
  (pathlib.Path(args.out) / "pairs.json").write_text(json.dumps(report, indent=1))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
