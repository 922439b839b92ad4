"""SD3's recipe: MM-DiT trained with rectified flow and logit-normal(0, 1) timesteps.

Launch commands:
  # The embedded demo dataset on a CPU (a few minutes; the README's main command):
  python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir=/tmp/mmdit_demo
  # The small demo preset: 4000 steps on 16384 scenes, long enough for compositional accuracy far above
  # chance (about 20 minutes on 2 CPU cores; samples, FID and accuracy every 1000 steps):
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo --workdir=/tmp/mmdit_demo_long
  # SD3-Medium-sized (d=24, ≈2B) at 256² on precomputed latents, on a TPU pod slice:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=2b,data=gs://bucket/latents256 \
      --workdir=gs://bucket/runs/sd3_2b --config.mesh.ici="(1,-1,1,1)"
  # Another formulation of the paper's study:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py --config.formulation="eps/linear" --workdir=…
"""

from configs import common

# size → (MMDiTConfig fields, global batch, steps, warm-up, log/checkpoint cadence)
_TINY = dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, in_channels=3, context_dim=32, pooled_dim=32,
             pos_embed_max_size=8, sample_size=32)
SIZES = {
    "tiny": (_TINY, 32, 400, 40, 50, 200),  # the README's few-minute run
    "demo": (_TINY, 32, 4000, 40, 100, 1000),  # long enough to learn the demo's compositions (~20 CPU-min)
    "2b": (dict(depth=24, qk_norm=True, dtype="bfloat16", remat="dots"), 1024, 500_000, 1000, 100, 2000),
    "8b": (dict(depth=38, qk_norm=True, dtype="bfloat16", remat="full"), 4096, 500_000, 1000, 100, 2000),
}


def get_config(arg=None):
  args = common.parse_arg(arg, size="tiny", data="", steps=0)
  if args.size not in SIZES:
    raise ValueError(f"unknown size {args.size!r}; valid: {sorted(SIZES)}")
  model, batch, steps, warmup, log_every, ckpt_every = SIZES[args.size]
  c = common.base_config()
  c.model.name = "mmdit"
  c.model.kwargs.update(model)
  c.data.path = args.data
  c.data.global_batch_size = batch
  c.total_steps = args.steps or steps
  c.optim.warmup_steps = warmup
  c.log_every = log_every
  c.checkpoint_every = ckpt_every
  c.eval_every = ckpt_every
  c.sample_every = ckpt_every  # sample grid, FID (and on the demo, compositional accuracy) as it trains
  if args.size in ("tiny", "demo"):  # the demo dataset: faster learning, shorter EMA horizon
    c.data.demo_examples = 4096 if args.size == "tiny" else 16384
    c.data.num_threads = 2
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.ema_decay = 0.99
  else:
    c.optim.eps = 1e-15  # with QK RMSNorm (SD3 §5.3.1)
  return c
