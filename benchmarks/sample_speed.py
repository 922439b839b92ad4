"""Seconds per image of classifier-free-guided sampling (the whole denoising loop in one compiled program,
evaluate.make_generate) on whatever device is present, with the analytic FLOPs and the MFU they imply.

  python benchmarks/sample_speed.py [--size=2b] [--res=1024] [--steps=28] [--batch=4] [--guidance=7]

Random weights of the preset's MM-DiT (the speed does not depend on their values), bf16 compute as the
preset sets it; text context of 154 tokens (SD3: 77 CLIP + 77 T5) or --text_tokens. Prints compile time,
then the mean over --repeats timed runs. On a CPU use a small preset (--size=tiny --res=32: the tiny preset is pixel-space, 32² at most): the 2B model
at 1024² takes minutes per image there. --flops_only prints the analytic cost per image and what it takes
on each accelerator in metrics.PEAK_FLOPS at 100 % and 40 % MFU, without running anything.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import rf_lognorm  # noqa: E402
from mmdit_jax import config as config_lib  # noqa: E402
from mmdit_jax import cpu_runtime, evaluate, model  # noqa: E402
from mmdit_jax.metrics import PEAK_FLOPS, peak_flops  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="2b", help="rf_lognorm preset: tiny | demo | 2b | 8b")
  parser.add_argument("--res", type=int, default=1024, help="image side in pixels (latent = res / 8)")
  parser.add_argument("--steps", type=int, default=28)
  parser.add_argument("--guidance", type=float, default=7.0)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--text_tokens", type=int, default=154)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--attention", default="", help="config.model.attention instead of the preset's")
  parser.add_argument("--flops_only", action="store_true", help="print the analytic cost only")
  parser.add_argument("--cpu_reuse_memory", type=int, default=1,
                      help="mmdit_jax.cpu_runtime as main.py sets it (1, its default); 0: JAX's and glibc's defaults")
  args = parser.parse_args()
  cpu_runtime.configure(bool(args.cpu_reuse_memory))  # before JAX creates its backends

  c = rf_lognorm.get_config(f"size={args.size}")
  c.sample.steps, c.sample.guidance = args.steps, args.guidance
  if args.attention:
    c.model.attention = args.attention
  cfg = config_lib.from_config_dict(c)
  m = cfg.model
  side = args.res // 8 if m.in_channels == 16 else args.res  # latent models: SD3's 8× VAE
  evals = args.steps * (2 if args.guidance > 1 else 1)  # network evaluations per image
  if args.flops_only:
    per_image = model.forward_flops(m, side, side, args.text_tokens) * evals
    print(f"{args.size} at {args.res}², {args.steps} steps, guidance {args.guidance} ({evals} network evaluations), "
          f"{args.text_tokens} text tokens: {per_image / 1e12:.1f} TFLOP per image (MM-DiT only)")
    for kind, peak in PEAK_FLOPS.items():
      print(f"  {kind:>16}: {per_image / peak:.2f} s per image at 100 % MFU, {per_image / peak / 0.4:.2f} s at 40 %")
    return
  params = jax.jit(lambda k: model.init_unjitted(m, k))(jax.random.key(0))
  generate = jax.jit(evaluate.make_generate(cfg))
  rng = np.random.default_rng(0)
  cond = {"context": jnp.asarray(rng.standard_normal((args.batch, args.text_tokens, m.context_dim)), jnp.float32),
          "pooled": jnp.asarray(rng.standard_normal((args.batch, m.pooled_dim)), jnp.float32)}
  null = {k: jnp.zeros_like(v[0]) for k, v in cond.items()}
  noise = jnp.asarray(rng.standard_normal((args.batch, side, side, m.in_channels)), jnp.float32)

  start = time.perf_counter()
  compiled = generate.lower(params, cond, null, noise).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, cond, null, noise))  # warm-up
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, cond, null, noise))
    times.append(time.perf_counter() - start)
  per_run = float(np.mean(times))
  flops = model.forward_flops(m, side, side, args.text_tokens) * evals * args.batch
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  n = model.param_count(m)
  size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
  print(f"{args.size} ({size} params, {m.dtype}) at {args.res}² ({side}² latent), "
        f"{args.steps} steps, guidance {args.guidance}, batch {args.batch}, on {device.device_kind}")
  print(f"compile {compile_s:.1f} s | {per_run:.2f} s per batch → {per_run / args.batch:.3f} s per image | "
        f"{flops / per_run / 1e12:.2f} TFLOP/s" + (f" → MFU {flops / per_run / peak:.1%}" if peak else
                                                   " (peak of this device unknown: no MFU)"))


if __name__ == "__main__":
  main()
