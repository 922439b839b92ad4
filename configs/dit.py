"""Class-conditional DiT (Peebles & Xie): AdamW 1e-4, no weight decay, EMA 0.9999, 10 % label dropout.

Launch commands:
  python -m mmdit_jax.main --config=configs/dit.py:variant=XL/2,data=/data/imagenet256_latents --workdir=…
  python -m mmdit_jax.main --config=configs/dit.py:variant=S/2,data=… --config.formulation="v/cos" --workdir=…
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant="XL/2", data="", steps=400_000, batch=256)
  c = common.base_config()
  c.model.name = "dit"
  c.model.dit_variant = args.variant
  c.model.kwargs.update(dict(in_channels=4, num_classes=1000, dtype="bfloat16"))
  c.formulation = "rf/lognorm(0.00, 1.00)"
  c.data.path = args.data
  c.data.global_batch_size = args.batch
  c.data.label_dropout = 0.1
  c.total_steps = args.steps
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.ema_decay = 0.9999
  return c
