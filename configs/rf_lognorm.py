"""SD3's recipe: MM-DiT trained with rectified flow and logit-normal(0, 1) timesteps.

Preset arguments: size (tiny | demo | 2b | 8b), data (dataset path), steps, res (pixels: the images' size
and SD3's timestep shift for it; 2b/8b default to SD3's 256² pretraining), batch (global batch size),
stage=hires with base_run=WORKDIR (SD3's high-resolution, mixed-aspect fine-tune from a 256² run: its
weights, a shift per aspect bucket against 256²),
sampling (the inference settings of SD3's / SD3.5's reference code or diffusers' pipeline, by name:
defaults.REFERENCE_SAMPLING — sd3_medium, sd3.5_medium, sd3.5_medium_slg, sd3.5_large, sd3.5_large_turbo,
diffusers).

Launch commands:
  # The embedded demo dataset on a CPU (a few minutes; the README's main command):
  python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir=/tmp/mmdit_demo
  # The small demo preset: 4000 steps on 16384 scenes, long enough for compositional accuracy far above
  # chance (about 20 minutes on 2 CPU cores; samples, FID and accuracy every 1000 steps):
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo --workdir=/tmp/mmdit_demo_long
  # SD3-Medium-sized (d=24, ≈2B) at 256² on precomputed latents, on a TPU pod slice:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=2b,data=gs://bucket/latents256 \
      --workdir=gs://bucket/runs/sd3_2b
  # Does it fit, and what will a step cost? Compile for a TPU topology from a CPU machine:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=2b,res=1024,batch=64 --mode=compile \
      --topology=v5p:4x4x4 --workdir=/tmp/compile_2b
  # Official SD3.5 Medium weights, sampled as SD3.5's reference code does (DPM++ 2M, 50 steps, 1024²):
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:sampling=sd3.5_medium --mode=sample \
      --config.init=diffusers:/ckpt/stable-diffusion-3.5-medium --prompt="a red fox" --workdir=/tmp/fox
  # SD3's second stage: from that 256² run, fine-tune on 1024²-area aspect buckets (precompute with
  # --config.buckets) with the timestep shift of each bucket:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=2b,stage=hires,base_run=gs://bucket/runs/sd3_2b,data=gs://bucket/latents1024 \
      --workdir=gs://bucket/runs/sd3_2b_hires
  # The same on the demo (docs/hires_demo.md): a 32² run, then three aspect buckets of about 48²
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo,steps=1500 --config.model.pos_embed_max_size=16 \
      --workdir=/tmp/hires_base
  python -m mmdit_jax.main --config=configs/rf_lognorm.py:size=demo,stage=hires,base_run=/tmp/hires_base,steps=600 \
      --workdir=/tmp/hires
  # Another formulation of the paper's study, another mesh:
  python -m mmdit_jax.main --config=configs/rf_lognorm.py --config.formulation="eps/linear" \
      --config.mesh.ici.data=2 --config.mesh.ici.fsdp=-1 --workdir=…
"""

from mmdit_jax import defaults
from mmdit_jax.flow import resolution_shift

# remat "dots_no_batch" on the CPU too: the layer scan then saves no float32 attention probabilities for the
# backward (recomputed instead), which XLA's CPU runtime zero-fills and slices per layer — the demo step
# takes 222 instead of 248 ms (median of 20 interleaved), the benchmark's 286 instead of 331 ms
# (docs/performance.md).
# attention "cpu": the native CPU kernel (XLA's einsums on other platforms, so compiling the tiny model for a
# TPU topology is unchanged), which also keeps remat from running attention's forward twice.
_TINY_MODEL = dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, in_channels=3, context_dim=32,
                   pooled_dim=32, pos_embed_max_size=8, sample_size=32, remat="dots_no_batch", attention="cpu")
_DEMO = dict(demo_examples=4096, lr=1e-3, schedule="cosine", ema_decay=0.99, num_threads=2)
PRESETS = {
    # The README's few-minute run on the demo dataset.
    "tiny": dict(model=_TINY_MODEL, batch=32, steps=400, warmup=40, log_every=50, checkpoint_every=200, **_DEMO),
    # Long enough to learn the demo's compositions (~20 CPU-minutes).
    "demo": dict(model=_TINY_MODEL, batch=32, steps=4000, warmup=40, log_every=100, checkpoint_every=1000,
                 **dict(_DEMO, demo_examples=16384)),
    # SD3 Medium's shape (d=24, ≈2B) and SD3.5 Large's (d=38, ≈8B): QK-norm in bf16, AdamW ε = 1e-15.
    # FSDP over each slice (data parallel across slices), blockwise attention (splash on TPU, cuDNN on GPU)
    # and remat "dots". Chosen from the compile reports (docs/compile_grid.md), 2B at 1024², global batch 64,
    # v5p:4x4x4, HBM per chip: data-parallel mesh + xla + dots_no_batch 53.9 GiB (30.2 of it replicated
    # state); FSDP + xla: dots 47.2 (the f32 attention logits saved), dots_no_batch 11.4, full 5.5; FSDP +
    # splash + dots 5.0 — and 12.1 of 15.75 GiB on v5e:4x4 at batch 16 with xla + dots_no_batch.
    "2b": dict(model=dict(depth=24, qk_norm=True, dtype="bfloat16", remat="dots", attention="auto"), batch=1024,
               steps=500_000, warmup=1000, log_every=100, checkpoint_every=2000, eps=1e-15, res=256,
               mesh=dict(data=1, fsdp=-1)),
    "8b": dict(model=dict(depth=38, qk_norm=True, dtype="bfloat16", remat="dots", attention="auto"), batch=4096,
               steps=500_000, warmup=1000, log_every=100, checkpoint_every=2000, eps=1e-15, res=256,
               mesh=dict(data=1, fsdp=-1)),
}
SD3_SHIFT = {1024: 3.0}  # SD3 §5.3.2 chose α = 3.0 at 1024²; other resolutions use α = √(m/n) against 256²


def get_config(arg=None):
  args = defaults.parse_arg(arg, size="tiny", data="", steps=0, res=0, batch=0, sampling="", stage="", base_run="")
  if args.size not in PRESETS:
    raise defaults.ConfigError(f"unknown size {args.size!r}; valid: {sorted(PRESETS)}")
  p = PRESETS[args.size]
  c = defaults.base_config("mmdit", **p["model"])
  c.data.path = args.data
  c.data.global_batch_size = args.batch or p["batch"]
  c.total_steps = args.steps or p["steps"]
  c.optim.warmup_steps = p["warmup"]
  c.log_every = p["log_every"]
  c.checkpoint_every = c.eval_every = p["checkpoint_every"]
  c.sample_every = p["checkpoint_every"]  # sample grid, FID (and on the demo, compositional accuracy) as it trains
  if "demo_examples" in p:  # the demo dataset: faster learning, shorter EMA horizon
    c.data.demo_examples = p["demo_examples"]
    c.data.num_threads = p["num_threads"]
    c.optim.lr = p["lr"]
    c.optim.schedule = p["schedule"]
    c.ema_decay = p["ema_decay"]
  if "eps" in p:
    c.optim.eps = p["eps"]  # with QK RMSNorm (SD3 §5.3.1)
  for axis, size in p.get("mesh", {}).items():
    c.mesh.ici[axis] = size
  res = args.res or p.get("res", 0)
  if res:  # the position grid keeps SD3's base (sample_size 128): the data's size and the shift change
    if res % 16:
      raise defaults.ConfigError(f"res={res} is not a multiple of 16 (VAE factor 8 × patch 2)")
    c.data.resolution = res
    c.shift = SD3_SHIFT.get(res, max(1.0, resolution_shift(res ** 2)))
  if args.stage not in ("", "hires"):
    raise defaults.ConfigError(f"unknown stage {args.stage!r}; valid: 'hires'")
  if args.stage == "hires":
    # SD3's second stage: from the 256² run's weights, mixed-aspect buckets around res² (default 1024²), the
    # timestep shift of each bucket from its pixels against 256² (α = √(H·W) / 256), not one shift for all.
    if not args.base_run:
      raise defaults.ConfigError("stage=hires starts from a 256² run: give base_run=WORKDIR (its newest weights)")
    c.init = f"run:{args.base_run}"
    c.shift = 1.0
    if "demo_examples" in p and not args.data:
      # The demo's version: from a 32² demo run, scenes in three aspect buckets of about 48² (48², 32×64, 64×32),
      # α from each bucket's pixels against 32². The 64-pixel sides need 16 patches of 4 in the position grid:
      # train the base with --config.model.pos_embed_max_size=16 too (the grid is centre-cropped, as SD3's).
      c.data.demo_buckets = ((48, 48), (32, 64), (64, 32))
      c.model.pos_embed_max_size = 16
      c.shift_base_resolution = 32
    else:
      c.data.resolution = args.res or 1024
      c.shift_base_resolution = 256
  if args.sampling:
    defaults.reference_sampling(c, args.sampling)
  return c
