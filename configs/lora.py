"""LoRA fine-tuning (and Diffusion-DPO, SD3 §5.3) of SD3-Medium or of a run of this project.

Preset arguments: base (config.init: diffusers:DIR of SD3-Medium's diffusers pipeline, or run:/run-ema:WORKDIR),
target (tiny | gpu | v5e-8 | v5p-8: the hardware the memory settings are for), rank (SD3's DPO: 128), dpo (β; 0:
plain LoRA fine-tuning), res (pixels), batch, steps, data (precomputed latents; for DPO with latent_rejected).

Launch commands:
  # SD3-Medium LoRA on one TPU v5e-8 host (8 × 16 GiB), on precomputed 1024² latents:
  python -m mmdit_jax.main --config=configs/lora.py:base=diffusers:/ckpt/sd3-medium,target=v5e-8,data=gs://b/latents1024 \\
      --workdir=gs://b/runs/sd3m-lora
  # Diffusion-DPO as SD3 did (rank 128 on every linear layer), on preference pairs (precompute image_rejected):
  python -m mmdit_jax.main --config=configs/lora.py:base=diffusers:/ckpt/sd3-medium,target=v5p-8,dpo=5000,data=… …
  # Does it fit? From any machine with the tpu extra (no TPU, no weights: the architecture is SD3-Medium's):
  python -m mmdit_jax.main --mode=compile --topology=v5e:2x4 --config=configs/lora.py:target=v5e-8 --workdir=/tmp/fit
  # The demo (a few CPU-minutes): DPO with LoRA on the demo's preference pairs, from a run of configs/rf_lognorm.py:
  python -m mmdit_jax.main --config=configs/lora.py:base=run-ema:/tmp/mmdit_demo_long,target=tiny,dpo=5000 \\
      --workdir=/tmp/mmdit_dpo
  # The adapters as a diffusers LoRA file (pipe.load_lora_weights(OUT)):
  python -m mmdit_jax.export --workdir=gs://b/runs/sd3m-lora --out=/tmp/sd3m-lora

Memory, from --mode=compile of these presets (SD3-Medium 2.03B, 1024² = 4096 + 154 tokens, rank 128 on all
linear layers = 236M trained parameters, base in bfloat16; docs/finetune.md, docs/finetune_fit.json):
  v5e-8 (v5e:2x4, 8 × 15.75 GiB): batch 8, remat dots_no_batch, splash: 6.30 GiB per chip (state 0.91).
  v5p-8 (v5p:2x2x1, 4 × 95.7 GiB): batch 32, remat dots_no_batch, splash: 35.2 GiB per chip (state 1.83).
  gpu (one 80 GiB H100/H200): batch 4, remat dots_no_batch, cuDNN attention. No compile mode for GPUs here: the
      v5p program with 4 per chip needs 18.2 GiB of temporaries, plus the whole state on one device (7.3 GiB).
"""

from configs import rf_lognorm
from mmdit_jax import defaults

# Per target: data-parallel layout, batch, memory settings. SD3-Medium: depth 24, no QK-norm (SD3.5 has it).
TARGETS = {
    "tiny": dict(size="tiny", batch=32, mesh=dict(data=-1, fsdp=1), remat="dots_no_batch", attention="xla",
                 base_dtype="float32", steps=600, lr=2e-4),
    "gpu": dict(size="2b", batch=4, mesh=dict(data=1, fsdp=-1), remat="dots_no_batch", attention="cudnn",
                base_dtype="bfloat16", steps=2000, lr=1e-4),
    "v5e-8": dict(size="2b", batch=8, mesh=dict(data=1, fsdp=-1), remat="dots_no_batch", attention="splash",
                  base_dtype="bfloat16", steps=2000, lr=1e-4),
    "v5p-8": dict(size="2b", batch=32, mesh=dict(data=1, fsdp=-1), remat="dots_no_batch", attention="splash",
                  base_dtype="bfloat16", steps=2000, lr=1e-4),
}
DEFAULT_BASE = "diffusers:stable-diffusion-3-medium-diffusers"


def get_config(arg=None):
  args = defaults.parse_arg(arg, base=DEFAULT_BASE, target="tiny", rank=0, dpo=0.0, res=0, batch=0, steps=0,
                            data="", targets="")
  if args.target not in TARGETS:
    raise defaults.ConfigError(f"unknown target {args.target!r}; valid: {sorted(TARGETS)}")
  t = TARGETS[args.target]
  sd3 = t["size"] != "tiny"
  c = rf_lognorm.get_config(f"size={t['size']}" + (f",res={args.res or 1024}" if sd3 else "")
                            + (f",data={args.data}" if args.data else ""))
  c.init = args.base if (sd3 or args.base != DEFAULT_BASE) else ""
  if not c.init:
    raise defaults.ConfigError("target=tiny adapts a run of this project: give base=run-ema:WORKDIR (e.g. a "
                               "configs/rf_lognorm.py:size=demo run)")
  if sd3:
    c.model.qk_norm = False  # SD3-Medium's architecture (config.init=diffusers:… reads it from the weights anyway)
    c.optim.eps = 1e-8
    c.shift = 3.0
  c.model.remat = t["remat"]
  c.model.attention = t["attention"]
  for axis, size in t["mesh"].items():
    c.mesh.ici[axis] = size
  c.data.global_batch_size = args.batch or t["batch"]
  c.total_steps = args.steps or t["steps"]
  c.optim.lr = t["lr"]
  c.optim.warmup_steps = min(100, c.total_steps // 10)
  c.optim.schedule = "constant"
  c.checkpoint_every = c.eval_every = max(1, c.total_steps // 4)
  c.sample_every = c.checkpoint_every
  c.log_every = max(1, min(50, c.total_steps // 20))
  c.lora.rank = args.rank or (128 if sd3 else 16)  # SD3 §5.3: DPO with rank-128 LoRA on all linear layers
  c.lora.alpha = float(c.lora.rank)
  c.lora.targets = tuple(args.targets.split("+")) if args.targets else (
      ("all_linear",) if sd3 else ("attn", "mlp", "mod"))
  c.lora.base_dtype = t["base_dtype"]
  if not sd3:  # the demo: accuracy on 256 samples (64 leave a ±6 % noise on it)
    c.eval.num_samples = 256
  c.dpo.beta = float(args.dpo)
  return c
