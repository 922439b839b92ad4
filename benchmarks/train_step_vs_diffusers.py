"""Times one MM-DiT training step (forward + backward + AdamW) in JAX and in diffusers/PyTorch.

Same architecture, sizes and batch on this machine's CPU, run side by side; prints both step times and
their ratio. Usage: python benchmarks/train_step_vs_diffusers.py [--depth 4 --width 256 --latent 32]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mmdit_jax import flow, model  # noqa: E402


def _time(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--latent", type=int, default=32, help="latent side (tokens = (side/2)²)")
  parser.add_argument("--text_tokens", type=int, default=77)
  parser.add_argument("--context_dim", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  heads = args.width // 64
  b, s, c = args.batch, args.latent, 16

  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, s, s, c)).astype(np.float32)
  noise = rng.standard_normal((b, s, s, c)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, b).astype(np.float32)
  ctx = rng.standard_normal((b, args.text_tokens, args.context_dim)).astype(np.float32)
  pooled = rng.standard_normal((b, 2048)).astype(np.float32)

  # JAX.
  cfg = model.MMDiTConfig(depth=args.depth, hidden_size=args.width, num_heads=heads,
                          context_dim=args.context_dim, pos_embed_max_size=s // 2, sample_size=s)
  params = model.init(cfg, jax.random.key(0))
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt_state = tx.init(params)
  form = flow.parse_formulation("rf")

  @jax.jit
  def step(params, opt_state, x, noise, t, ctx, pooled):
    def loss_fn(p):
      z = form.perturb(x, noise, t)
      return jnp.mean(form.loss(model.forward(cfg, p, z, t, {"context": ctx, "pooled": pooled}), x, noise, t))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  inputs = [jnp.asarray(a) for a in (x, noise, t, ctx, pooled)]
  t0 = time.perf_counter()
  state = [params, opt_state]
  jax.block_until_ready(step(*state, *inputs))
  compile_s = time.perf_counter() - t0

  def jax_step():
    p, o, loss = step(*state, *inputs)
    state[:] = [p, o]
    jax.block_until_ready(loss)

  jax_s = _time(jax_step, args.steps, 1)

  # PyTorch / diffusers.
  import torch
  from diffusers import SD3Transformer2DModel

  torch.manual_seed(0)
  ref = SD3Transformer2DModel(
      sample_size=s, patch_size=2, in_channels=c, num_layers=args.depth, attention_head_dim=64,
      num_attention_heads=heads, joint_attention_dim=args.context_dim, caption_projection_dim=args.width,
      pooled_projection_dim=2048, out_channels=c, pos_embed_max_size=s // 2)
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
  tx_, tn, tt, tc, tp = (torch.from_numpy(a) for a in (x, noise, t, ctx, pooled))
  tx_, tn = tx_.permute(0, 3, 1, 2), tn.permute(0, 3, 1, 2)

  def torch_step():
    z = (1 - tt[:, None, None, None]) * tx_ + tt[:, None, None, None] * tn
    out = ref(hidden_states=z, encoder_hidden_states=tc, pooled_projections=tp, timestep=1000 * tt,
              return_dict=False)[0]
    loss = torch.mean((out - (tn - tx_)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()

  torch_s = _time(torch_step, args.steps, 1)
  params_n = model.param_count(cfg)
  flops = model.train_flops(cfg, s, s, args.text_tokens) * b
  print(f"config: depth={args.depth} width={args.width} heads={heads} latent={s}x{s}x{c} "
        f"tokens={(s // 2) ** 2}+{args.text_tokens} batch={b} params={params_n / 1e6:.1f}M")
  print(f"jax   : {jax_s * 1e3:8.1f} ms/step  ({flops / jax_s / 1e9:.1f} GFLOP/s, compile {compile_s:.1f} s)")
  print(f"torch : {torch_s * 1e3:8.1f} ms/step  ({flops / torch_s / 1e9:.1f} GFLOP/s)")
  print(f"ratio torch/jax: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
