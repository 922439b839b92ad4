"""One MM-DiT training step (forward, backward, AdamW) in mmdit_jax and in diffusers + PyTorch, side by side.

Both run the same architecture with the same weights: diffusers' SD3Transformer2DModel is built (seeded),
and its state dict goes through the project's importer (mmdit_jax.model.convert), so the two forward
passes agree to float32 rounding (checked and printed). The steps are timed interleaved (jax, torch, jax,
…) on this machine's CPU, and the medians of `--repeats` runs are compared, so a background load hits both.

Usage: python benchmarks/train_step_vs_diffusers.py [--depth 4 --width 256 --latent 32 --batch 4
                                                     --repeats 10 --profile DIR --cpu_reuse_memory 1]
  --profile DIR: also writes a JAX profiler trace of 3 steps (TensorBoard / Perfetto) and prints the
  compiled step's own cost analysis (FLOPs, bytes) — the inputs of docs/performance.md.
"""

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mmdit_jax import cpu_runtime, flow, model  # noqa: E402
from mmdit_jax.model import convert  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--latent", type=int, default=32, help="latent side (tokens = (side/2)²)")
  parser.add_argument("--text_tokens", type=int, default=77)
  parser.add_argument("--context_dim", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each before the timed ones")
  parser.add_argument("--attention", default="cpu",
                      help="config.model.attention for the JAX model (cpu: the native kernel, the demo presets' setting)")
  parser.add_argument("--remat", default="dots_no_batch",
                      help="config.model.remat for the JAX model (dots_no_batch: the demo presets' CPU setting)")
  parser.add_argument("--remat_names", default="qkv,attn_out,mlp_in,mlp_out",
                      help="with --remat=names: the checkpoint names saved (config.model.remat_names)")
  parser.add_argument("--scan_layers", type=int, default=1, help="config.model.scan_layers for the JAX model")
  parser.add_argument("--profile", default="", help="directory for a JAX profiler trace of 3 steps")
  parser.add_argument("--cpu_reuse_memory", type=int, default=1,
                      help="mmdit_jax.cpu_runtime as main.py sets it (1, its default): steps on the calling "
                           "thread, freed memory kept; 0: JAX's asynchronous dispatch and glibc's defaults")
  args = parser.parse_args()
  kept = cpu_runtime.configure(bool(args.cpu_reuse_memory))  # before JAX creates its backends

  import torch
  from diffusers import SD3Transformer2DModel

  heads = args.width // 64
  b, s, c = args.batch, args.latent, 16
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, s, s, c)).astype(np.float32)
  noise = rng.standard_normal((b, s, s, c)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, b).astype(np.float32)
  ctx = rng.standard_normal((b, args.text_tokens, args.context_dim)).astype(np.float32)
  pooled = rng.standard_normal((b, 2048)).astype(np.float32)

  # The reference, and its weights imported into ours.
  torch.manual_seed(0)
  ref = SD3Transformer2DModel(
      sample_size=s, patch_size=2, in_channels=c, num_layers=args.depth, attention_head_dim=64,
      num_attention_heads=heads, joint_attention_dim=args.context_dim, caption_projection_dim=args.width,
      pooled_projection_dim=2048, out_channels=c, pos_embed_max_size=s // 2)
  tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  cfg = convert.infer_config(tensors, dict(ref.config), attention=args.attention,
                             scan_layers=bool(args.scan_layers), remat=args.remat,
                             remat_names=tuple(args.remat_names.split(",")) if args.remat == "names" else ())
  params = convert.convert_state_dict(tensors, cfg)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt_state = tx.init(params)
  form = flow.parse_formulation("rf")
  cond = {"context": jnp.asarray(ctx), "pooled": jnp.asarray(pooled)}

  tx_, tn, tt, tc, tp = (torch.from_numpy(a) for a in (x, noise, t, ctx, pooled))
  tx_, tn = tx_.permute(0, 3, 1, 2), tn.permute(0, 3, 1, 2)
  with torch.no_grad():
    z = (1 - tt[:, None, None, None]) * tx_ + tt[:, None, None, None] * tn
    want = ref(hidden_states=z, encoder_hidden_states=tc, pooled_projections=tp, timestep=1000 * tt,
               return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  got = np.asarray(jax.jit(lambda p: model.forward(cfg, p, form.perturb(x, noise, t), jnp.asarray(t), cond))(params))
  rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))

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
  compiled = step.lower(params, opt_state, *inputs).compile()
  compile_s = time.perf_counter() - t0
  state = [params, opt_state]

  def jax_step():
    p, o, loss = compiled(*state, *inputs)
    state[:] = [p, o]
    jax.block_until_ready(loss)

  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)

  def torch_step():
    z = (1 - tt[:, None, None, None]) * tx_ + tt[:, None, None, None] * tn
    out = ref(hidden_states=z, encoder_hidden_states=tc, pooled_projections=tp, timestep=1000 * tt,
              return_dict=False)[0]
    loss = torch.mean((out - (tn - tx_)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()

  usage = {"jax": [0, 0.0], "torch": [0, 0.0]}  # minor page faults, kernel CPU seconds

  def timed(fn, name):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage[name][0] += after.ru_minflt - before.ru_minflt
    usage[name][1] += after.ru_stime - before.ru_stime
    return took

  for _ in range(args.warmup):  # allocators reach their working set (each side's heap grows for a few steps)
    jax_step(), torch_step()
  jax_s, torch_s = [], []
  for _ in range(args.repeats):
    jax_s.append(timed(jax_step, "jax"))
    torch_s.append(timed(torch_step, "torch"))
  jax_med, torch_med = statistics.median(jax_s), statistics.median(torch_s)
  faults = {k: f"{v[0] / args.repeats:.0f} page faults, {v[1] / args.repeats * 1e3:.0f} ms kernel CPU per step"
            for k, v in usage.items()}

  flops = model.train_flops(cfg, s, s, args.text_tokens) * b
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  print(f"config: depth={args.depth} width={args.width} heads={heads} latent={s}x{s}x{c} "
        f"tokens={(s // 2) ** 2}+{args.text_tokens} batch={b} params={model.param_count(cfg) / 1e6:.1f}M "
        f"attention={args.attention} scan_layers={cfg.scan_layers} remat={cfg.remat} cpu_reuse_memory={int(kept)}; "
        f"same weights (forward rel. error {rel:.1e})")
  print(f"jax   : median {jax_med * 1e3:7.1f} ms/step (min {min(jax_s) * 1e3:.1f}, {flops / jax_med / 1e9:.1f} GFLOP/s "
        f"model; XLA counts {cost.get('flops', 0) / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 1e9:.2f} GB "
        f"per step; compile {compile_s:.1f} s; {faults['jax']})")
  print(f"torch : median {torch_med * 1e3:7.1f} ms/step (min {min(torch_s) * 1e3:.1f}, "
        f"{flops / torch_med / 1e9:.1f} GFLOP/s; {torch.get_num_threads()} threads; {faults['torch']})")
  print(f"ratio mmdit_jax / (diffusers + torch): {jax_med / torch_med:.2f} (median of {args.repeats} interleaved)")

  if args.profile:
    jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    for _ in range(3):
      jax_step()
    jax.profiler.stop_trace()
    hlo = compiled.as_text()
    with open(os.path.join(args.profile, "step.hlo.txt"), "w") as f:
      f.write(hlo)
    print(f"profile: {args.profile} (tensorboard --logdir {args.profile}, Profile tab)")
    _print_breakdown(args.profile, steps=3, thunks=_thunks(hlo))
    _print_torch_breakdown(torch_step, steps=3)


# XLA CPU thunk names → what they are (docs/performance.md's table).
CATEGORIES = (("attention kernel (native, FFI custom call)", ("ffi_call", "custom-call")),
              ("matmuls (ynn_fusion, dot)", ("ynn", "dot", "convolution")),
              ("scan dynamic-slice / update", ("dynamic",)),
              ("copies / transposes", ("copy", "transpose")),
              ("zero-filled buffers (broadcast)", ("wrapped_broadcast",)),
              ("element-wise fusions", ("",)))


def _thunks(hlo_text):
  """The compiled program's instructions that the CPU runtime runs as one op (loops and calls excluded:
  their trace events span the ops inside them)."""
  import re
  found = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b([a-z\-]+)\(", hlo_text, flags=re.M)
  return {name for name, opcode in found if opcode not in ("while", "call", "conditional")}


def _print_breakdown(directory, steps, thunks):
  """Per-step time of the compiled step's ops by category, summed over the threads that ran them (XLA's
  worker threads, and the calling thread for ops run inline), from the trace."""
  import collections
  import glob
  import gzip
  import json
  files = sorted(glob.glob(f"{directory}/plugins/profile/*/*.trace.json.gz"))
  files = [f for f in files if "perfetto" not in f] or files
  if not files:
    print("(no trace file to break down)")
    return
  events = json.load(gzip.open(files[-1]))["traceEvents"]
  totals, ops = collections.defaultdict(float), collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or e["name"] not in thunks:
      continue
    name = e["name"]
    category = next(c for c, keys in CATEGORIES if any(k in name for k in keys))
    totals[category] += e["dur"] / 1e3 / steps
    ops[name] += e["dur"] / 1e3 / steps
  _print_table("XLA CPU ops, per step (thread-ms, summed over threads; {:.0f} in all):", totals, ops)


def _print_table(title, totals, ops):
  """A breakdown by category (title formatted with the sum) and the 8 largest ops."""
  whole = sum(totals.values())
  print(title.format(whole))
  for category, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"  {ms:7.1f}  {100 * ms / whole:4.1f} %  {category}")
  print("largest ops: " + ", ".join(f"{n} {ms:.1f}" for n, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:8]))


# PyTorch's CPU operators → the same categories (self time, so a composite op is not counted twice).
TORCH_CATEGORIES = (("matmuls (mm, addmm, bmm, linear)", ("mm", "matmul", "linear", "bmm", "baddbmm")),
                    ("attention kernel (SDPA, flash)", ("attention", "flash")),
                    ("copies / transposes", ("copy", "clone", "contiguous", "transpose", "permute", "cat")),
                    ("element-wise / reductions / optimizer", ("",)))


def _print_torch_breakdown(torch_step, steps):
  """Per-step self CPU time of the torch step's operators by category (torch.profiler), beside XLA's."""
  import collections

  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      torch_step()
  totals, ops = collections.defaultdict(float), collections.defaultdict(float)
  for e in prof.key_averages():
    if e.self_cpu_time_total <= 0:
      continue
    name = e.key.lower()
    category = next(c for c, keys in TORCH_CATEGORIES if any(k in name for k in keys))
    totals[category] += e.self_cpu_time_total / 1e3 / steps
    ops[e.key] += e.self_cpu_time_total / 1e3 / steps
  _print_table("torch operators, per step (self CPU ms; {:.0f} in all):", totals, ops)


if __name__ == "__main__":
  main()
