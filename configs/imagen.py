"""Imagen (Saharia et al. 2022): a cascade of text-conditioned U-Nets in pixel space — a base model, then
super-resolution stages trained with noise-conditioning augmentation — classifier-free guidance from 10 % dropped
text, dynamic thresholding at sampling, ε-prediction on the cosine process (pred=v: v-prediction).

Preset arguments:
  stage   base | sr (64→256 at size=paper, 32→64 on the demo) | sr1024 (256→1024, size=paper)
  size    demo (a few CPU-minutes on the embedded scenes; 32² base, 64² SR: the same scenes rendered at 64²)
          | paper (Imagen's 2B base U-Net at 64², 600M 64→256 and 400M 256→1024 Efficient U-Nets, T5-XXL context:
          pixel datasets of that size with 4096-wide text embeddings, data=…)
  backbone unet (Imagen's) | mmdit (the same recipe on an MM-DiT: the cascade issue's "any backbone")
  pred    eps | v;  aug  the training augmentation's maximum level (0: none, the ablation);  data, steps, batch

Launch commands:
  # The demo cascade on a CPU: base model, super-resolution stage, then prompts → 32² → 64² PNGs with a sweep
  # of the augmentation level (→ /tmp/imagen_base/cascade/):
  python -m mmdit_jax.main --config=configs/imagen.py:stage=base --workdir=/tmp/imagen_base
  python -m mmdit_jax.main --config=configs/imagen.py:stage=sr --workdir=/tmp/imagen_sr
  python -m mmdit_jax.main --config=configs/imagen.py:stage=base --workdir=/tmp/imagen_base --mode=sample \
      --prompt="a red circle at the top left and a blue square at the bottom right" \
      --cascade=/tmp/imagen_sr:sample.steps=20,sr.aug_level=0.1 --aug_sweep=0,0.05,0.1,0.2,0.4
  # The paper's models on a pod slice (pixel data with T5-XXL embeddings at 64² and at 256²):
  python -m mmdit_jax.main --config=configs/imagen.py:stage=base,size=paper,data=gs://bucket/pixels64 --workdir=…
  python -m mmdit_jax.main --config=configs/imagen.py:stage=sr,size=paper,data=gs://bucket/pixels256 --workdir=…
  # Does the 2B base U-Net fit, and what does a step cost? Compiled for a TPU topology from a CPU machine:
  python -m mmdit_jax.main --config=configs/imagen.py:stage=base,size=paper,batch=256 --mode=compile \
      --topology=v5p:4x4x4 --workdir=/tmp/compile_imagen
"""

from mmdit_jax import defaults
from mmdit_jax.data import demo
from mmdit_jax.model.unet import IMAGEN_UNETS

# The demo's U-Nets, small because XLA's CPU convolutions are slow (a 32² base step of 32 examples: 0.5 s at
# 0.6M parameters; 64² SR: 1.6 s): Efficient U-Nets with self-attention at the 8² level, cross-attention to
# the demo encoder's text (32 wide) at 16² and 8², more blocks at the lowest resolution.
_DEMO_UNET = {
    "base": dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=(1, 1, 2), attn_levels=(False, False, True),
                 cross_attn_levels=(False, True, True)),
    "sr": dict(channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=(1, 1, 1, 2),
               attn_levels=(False, False, False, True), cross_attn_levels=(False, False, True, True)),
}
_DEMO_UNET_COMMON = dict(num_heads=4, norm_groups=8, in_channels=3, context_dim=demo.EMBED, pooled_dim=demo.EMBED,
                         layout="efficient")
_DEMO_MMDIT = dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, in_channels=3, context_dim=demo.EMBED,
                   pooled_dim=demo.EMBED, remat="dots_no_batch")
_PAPER = {  # stage → (U-Net, pixels, super-resolution factor, global batch (Imagen: 2048 base, 4096 SR))
    "base": ("base64", 64, 0, 2048),
    "sr": ("sr256", 256, 4, 4096),
    "sr1024": ("sr1024", 1024, 4, 4096),
}


def get_config(arg=None):
  args = defaults.parse_arg(arg, stage="base", size="demo", backbone="unet", pred="", aug=0.5, data="", steps=0,
                            batch=0)
  if args.stage not in _PAPER:
    raise defaults.ConfigError(f"unknown stage {args.stage!r}; valid: {sorted(_PAPER)}")
  if args.size not in ("demo", "paper"):
    raise defaults.ConfigError(f"unknown size {args.size!r}; valid: ['demo', 'paper']")
  if args.backbone not in ("unet", "mmdit"):
    raise defaults.ConfigError(f"unknown backbone {args.backbone!r}; valid: ['mmdit', 'unet']")
  demo_run = args.size == "demo"
  pred = args.pred or ("rf" if demo_run else "eps")
  if pred not in ("eps", "v", "rf"):
    raise defaults.ConfigError(f"unknown pred {args.pred!r}; valid: ['eps', 'rf', 'v']")
  if demo_run and args.stage == "sr1024":
    raise defaults.ConfigError("stage=sr1024 is the paper's 256→1024 model: size=paper (the demo's cascade is base, sr)")
  sr = args.stage != "base"
  if demo_run:
    side, factor = (2 * demo.SIZE, 2) if sr else (demo.SIZE, 0)
    if args.backbone == "unet":
      fields = dict(_DEMO_UNET[args.stage], **_DEMO_UNET_COMMON, input_size=side)
    else:
      fields = dict(_DEMO_MMDIT, sample_size=side, pos_embed_max_size=side // 4)
  else:
    name, side, factor, _ = _PAPER[args.stage]
    if args.backbone != "unet":
      raise defaults.ConfigError("size=paper is Imagen's U-Nets: backbone=unet")
    # bf16 compute; each level's run of same-width blocks scanned (one compiled block: TPU compiles the
    # 16-block levels once, where the CPU runs scanned convolutions slowly, UNetConfig.scan_layers)
    fields = dict(IMAGEN_UNETS[name], dtype="bfloat16", remat="dots_no_batch", scan_layers=True)
  fields["lowres_channels"] = 3 if sr else 0
  c = defaults.base_config(args.backbone, **fields)
  # Imagen: ε-prediction on the continuous-time cosine process, dynamic thresholding (percentile 99.5) and
  # DPM-Solver++ sampling. pred=rf: SD3's rectified flow with logit-normal t and Euler sampling instead.
  if pred == "rf":
    c.formulation, c.sample.sampler, c.sample.threshold = "rf/lognorm(0.00, 1.00)", "euler", "none"
  else:
    c.formulation, c.sample.sampler, c.sample.threshold = f"{pred}/cos", "dpmpp_2m", "dynamic"
  c.data.path = args.data
  c.data.text_dropout = 0.1  # Imagen: the text dropped for 10 % of examples (classifier-free guidance)
  c.sr.factor = factor
  c.sr.aug_max = args.aug if sr else 0.0
  c.sr.aug_level = min(0.1, args.aug) if sr else 0.0  # (a stage trained without augmentation samples without)
  c.sr.upsample = "bilinear"
  if demo_run:
    c.data.demo_size = side
    c.data.demo_examples = 4096
    c.data.num_threads = 2
    c.data.global_batch_size = args.batch or 32
    c.total_steps = args.steps or (400 if sr else 800)  # (base ≈ 6, SR ≈ 12 CPU-minutes on 2 cores)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 40
    c.optim.schedule = "cosine"
    c.ema_decay = 0.99
    c.sample.steps = 20
    c.sample.guidance = 4.0
    c.log_every, c.checkpoint_every = 50, 200
    c.eval_every = c.sample_every = c.total_steps
  else:
    c.data.global_batch_size = args.batch or _PAPER[args.stage][3]
    c.data.resolution = side
    c.data.latent_downsample = 1  # pixel space
    c.data.text_tokens = 128  # T5-XXL, as Imagen
    c.total_steps = args.steps or 2_500_000
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10_000
    c.ema_decay = 0.9999
    c.sample.steps = 50
    c.sample.guidance = 5.0
    c.log_every, c.checkpoint_every = 100, 5000
    c.mesh.ici.data = 1
    c.mesh.ici.fsdp = -1
  return c
