"""Class-conditional DiT (Peebles & Xie): AdamW 1e-4, no weight decay, EMA 0.9999, 10 % label dropout.

Preset arguments: variant (the paper's S/B/L/XL × patch 2/4/8, or tiny for the demo), data, steps, batch.

Launch commands:
  python -m mmdit_jax.main --config=configs/dit.py:variant=XL/2,data=/data/imagenet256_latents --workdir=…
  python -m mmdit_jax.main --config=configs/dit.py:variant=S/2,data=… --config.formulation="v/cos" --workdir=…
  # A few CPU-minutes on the embedded class-conditional demo (12 classes: colour × shape):
  python -m mmdit_jax.main --config=configs/dit.py:variant=tiny --workdir=/tmp/dit_demo
  # Class-conditional samples (guidance 1.5, as the DiT paper's FID), labels as integers:
  python -m mmdit_jax.main --config=configs/dit.py:variant=tiny --workdir=/tmp/dit_demo --mode=sample \
      --labels=0,5,11 --config.sample.guidance=1.5
"""

from mmdit_jax import defaults, model
from mmdit_jax.data import demo

_TINY = dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, in_channels=3, num_classes=demo.NUM_CLASSES,
             input_size=demo.SIZE)


def get_config(arg=None):
  args = defaults.parse_arg(arg, variant="XL/2", data="", steps=0, batch=0)
  tiny = args.variant == "tiny"
  if tiny:
    fields = _TINY
  else:
    dit = model.dit_config(args.variant)  # raises naming the valid variants
    fields = dict(depth=dit.depth, hidden_size=dit.hidden_size, num_heads=dit.num_heads, patch_size=dit.patch_size,
                  in_channels=4, num_classes=1000, dtype="bfloat16")
  c = defaults.base_config("dit", **fields)
  c.formulation = "rf/lognorm(0.00, 1.00)"
  c.data.path = args.data
  c.data.global_batch_size = args.batch or (32 if tiny else 256)
  c.data.label_dropout = 0.1
  c.total_steps = args.steps or (600 if tiny else 400_000)
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.ema_decay = 0.99 if tiny else 0.9999
  c.sample.guidance = 1.5  # the DiT paper's FID setting
  if tiny:
    c.data.demo_examples = 4096
    c.data.num_threads = 2
    c.optim.schedule = "cosine"
    c.log_every, c.checkpoint_every, c.eval_every, c.sample_every = 50, 200, 200, 200
  return c
