"""--mode=compile: does a config fit a TPU topology, and what will a step cost? Answered from a CPU machine.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` describes any TPU slice without one.
The real train step (train_step.jit_train_step, the function training runs) and the sampling loop are
lowered on abstract, sharded state and batch (nothing touches a device or reads data) and compiled for
that topology. The report, per chip: state bytes, XLA's memory analysis against the chip's HBM, analytic
FLOPs, every collective of the compiled program (ops inside loops counted trip-count times), a roofline
lower bound of the step time and the MFU it implies. Printed as a table and written to
workdir/compile_report.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from mmdit_jax import data, evaluate, inputs, model, parallel, xla_presets
from mmdit_jax.config import TrainConfig, check_mesh_and_batch
from mmdit_jax.data import demo
from mmdit_jax.errors import UserError
from mmdit_jax.metrics import log
from mmdit_jax.state import FROZEN, base_shardings, has_base, make_optimizer, state_shardings
from mmdit_jax.train_step import batch_spec, jit_train_step

# What the attention names compile to for a TPU topology (the native CPU kernel is XLA's einsums there).
_ATTENTION_ON_TPU = {"auto": "auto (splash)", "cpu": "cpu (xla on TPU)"}
GIB = 1024 ** 3
# Per chip: dense bf16 peak FLOP/s, HBM the compiler can use (GiB), HBM bandwidth (GB/s). Peaks and bandwidths
# from cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} ("Key chip specifications"); usable HBM as the TPU compiler
# reports it in RESOURCE_EXHAUSTED messages (v5e, v5p, v6e, observed with libtpu 0.0.42); v4: nominal 32 GiB.
CHIPS = {
    "v4": {"kind": "TPU v4", "peak_flops": 275e12, "hbm_gib": 32.0, "hbm_gbps": 1228.0},
    "v5e": {"kind": "TPU v5 lite", "peak_flops": 197e12, "hbm_gib": 15.75, "hbm_gbps": 819.0},
    "v5p": {"kind": "TPU v5", "peak_flops": 459e12, "hbm_gib": 95.74, "hbm_gbps": 2765.0},
    "v6e": {"kind": "TPU v6 lite", "peak_flops": 918e12, "hbm_gib": 31.25, "hbm_gbps": 1640.0},
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "all-gather-as-all-reduce")
_TOPOLOGY = re.compile(r"(?:(\d+):)?(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)$")


def parse_topology(name: str) -> tuple[int, str, str]:
  """'v5p:4x4x4' → (1, 'v5p', '4x4x4'); '2:v5e:4x4' → (2, 'v5e', '4x4') for two slices."""
  m = _TOPOLOGY.fullmatch(name.strip())
  if not m:
    raise UserError(f"--topology={name!r}: expected CHIP:AxB[xC] or SLICES:CHIP:AxB[xC] with CHIP one of "
                    f"{sorted(CHIPS)}, e.g. v5p:4x4x4, v5e:4x4, v6e:8x8, 2:v5p:2x2x2")
  return int(m.group(1) or 1), m.group(2), m.group(3)


def prepare_environment():
  """Before JAX loads: compile on the CPU, and give libtpu a local host to describe, else it reports at
  length (at exit, from C buffers) that it found no TPU hosts, which it does not need here. Values already
  set (a real TPU VM) are kept."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(name: str):
  """The abstract TPU devices of a topology (libtpu needed, no TPU)."""
  slices, chip, shape = parse_topology(name)
  kwargs = {"chip_config_name": "megacore"} if chip == "v4" else {}
  if slices > 1:
    kwargs["num_slices"] = slices
  dims = [int(d) for d in shape.split("x")]
  if math.prod(dims) < 4:  # fewer chips than a host holds (v5litepod-1, -2): a host of just these chips
    kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(f"{chip}:{shape}", "tpu", **kwargs).devices
  except Exception as e:  # ImportError, RuntimeError, JaxRuntimeError, depending on what is missing
    message = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    if "lockfile" in message:
      raise UserError(f"another process on this machine is using libtpu ({message}); wait for it to finish, or "
                      "set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it") from e
    if isinstance(e, ImportError) or "libtpu" in message.lower() or "backend 'tpu'" in message:
      raise UserError(f"--mode=compile needs libtpu to describe {name}: pip install -e '.[tpu]' (about 700 MB). "
                      f"({type(e).__name__}: {message})") from e
    raise UserError(f"--topology={name}: {type(e).__name__}: {message}") from e


# ── Collectives in compiled HLO ──

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][a-z0-9\-]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(type_text: str) -> list[int]:
  return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt]
          for dt, dims in _ARRAY.findall(type_text) if dt in _DTYPE_BYTES]


def collective_stats(hlo: str) -> dict:
  """{kind: {'count', 'bytes'}} executed per call of the ENTRY computation: each op's result size, ops in
  while bodies counted trip-count times (unknown trip counts count once and are reported under
  'unknown_trip_counts'), async -start ops counted once by their payload, TPU's all-reduce-scatter
  fusions as reduce-scatters, and all-reduces of dynamic-update-slices (how the TPU compiler implements an
  all-gather over a whole 3-D torus, e.g. FSDP over all 64 chips of a v5p-128) as all-gather-as-all-reduce
  — the rest of a combined all-reduce stays an all-reduce."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = comps.setdefault(m.group(1), {"ops": [], "calls": [], "lines": []})
      if line.startswith("ENTRY"):
        entry = m.group(1)
      continue
    if current is None or line.startswith("}"):
      continue
    current["lines"].append(line)
    op = _OP.match(line)
    if not op:
      continue
    type_text, opname = op.groups()
    kind = opname[:-len("-start")] if opname.endswith("-start") else opname
    fused = re.search(r"calls=%?(all-reduce-scatter[\w.\-]*)", line)
    if fused:  # TPU's form of a (combined) reduce-scatter: an all-reduce + slice fusion; its result is the shards
      current["ops"].append(("reduce-scatter", sum(_array_bytes(type_text))))
      continue
    if kind in COLLECTIVES and not opname.endswith("-done"):
      sizes = _array_bytes(type_text)
      if kind == "all-reduce":  # TPU gathers over a whole 3-D torus as an all-reduce of zero-padded shards
        operands = re.search(r"all-reduce(?:-start)?\(([^)]*)\)", line)
        names = [o.strip() for o in operands.group(1).split(",")] if operands else []
        names = [re.sub(r"/\*.*?\*/", "", n).strip() for n in names]
        gathers = [i for i, n in enumerate(names) if "dynamic-update-slice" in n]
        if gathers and len(names) == len(sizes) and not opname.endswith("-start"):
          gathered = sum(sizes[i] for i in gathers)
          if gathered:
            current["ops"].append(("all-gather-as-all-reduce", gathered))
          if len(gathers) < len(names):
            current["ops"].append(("all-reduce", sum(sizes) - gathered))
          continue
      current["ops"].append((kind, (max(sizes) if opname.endswith("-start") else sum(sizes)) if sizes else 0))
    if opname == "while":
      body = re.search(r"body=%?([\w.\-]+)", line)
      trip = _TRIP.search(line)
      condition = re.search(r"condition=%?([\w.\-]+)", line)
      current["calls"].append((body.group(1), int(trip.group(1)) if trip else ("cond", condition.group(1))))
    else:
      for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        current["calls"].append((callee, 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:  # a conditional runs one branch: count the costliest
        current["calls"].append((tuple(b.strip().lstrip("%") for b in branches.group(1).split(",")), 1))
  unknown = [0]

  def trip_count(condition: str):
    """N of a condition `counter < N` (lax.scan and fori_loop count from 0), else None."""
    lines = comps.get(condition, {}).get("lines", [])
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\][^=]* constant\((\d+)\)", "\n".join(lines)))
    for line in lines:
      m = re.search(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
      if m and m.group(1) in constants:
        return int(constants[m.group(1)])
    return None

  def totals(name, seen=()):
    if name not in comps or name in seen:
      return {}
    out = {}
    for kind, nbytes in comps[name]["ops"]:
      c = out.setdefault(kind, [0, 0])
      c[0] += 1
      c[1] += nbytes
    for callee, times in comps[name]["calls"]:
      if isinstance(times, tuple):
        times = trip_count(times[1])
      if times is None:
        unknown[0] += 1
        times = 1
      subs = [totals(c, seen + (name,)) for c in (callee if isinstance(callee, tuple) else (callee,))]
      sub = max(subs, key=lambda s: sum(v[1] for v in s.values()), default={})
      for kind, (n, b) in sub.items():
        c = out.setdefault(kind, [0, 0])
        c[0] += n * times
        c[1] += b * times
    return out

  found = totals(entry) if entry else {}
  stats = {kind: {"count": int(found.get(kind, (0, 0))[0]), "bytes": int(found.get(kind, (0, 0))[1])}
           for kind in COLLECTIVES}
  stats["unknown_trip_counts"] = unknown[0]
  return stats


# ── The report ──

def _per_device_bytes(tree, shardings) -> int:
  leaves = jax.tree.leaves(jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize,
                                        tree, shardings))
  return int(sum(leaves))


def batch_geometry(cfg: TrainConfig) -> tuple[tuple[int, int, int], int]:
  """(latent (h, w, C), text tokens) of a batch: the dataset's metadata when one is configured and readable,
  the embedded demo's for a model shaped for it, else the model's own size (MM-DiT: sample_size, and
  config.data.text_tokens, SD3's 154; config.data.resolution / 8 when set, / 1 for a pixel-space model)."""
  m = cfg.model
  demo_shaped = m.in_channels == 3 and ("context" not in m.cond_features or m.context_dim == demo.EMBED)
  if not cfg.data.path and demo_shaped:
    return (cfg.data.demo_size, cfg.data.demo_size, 3), (2 * demo.MAX_TOKENS if "context" in m.cond_features else 0)
  if not cfg.data.path.startswith("tfds:") and epath.Path(cfg.data.path, data.records.METADATA).exists():
    meta = data.load_metadata(cfg.data.path)
    latent = meta.feature("latent").shape
    if None not in latent:
      names = [f.name for f in meta.features]
      return tuple(latent), (meta.feature("context").shape[0] if "context" in names else 0)
  # pixels per latent cell: as configured, else 1 for 3-channel (pixel-space: Imagen) models, else SD3's VAE
  per_cell = cfg.data.latent_downsample or (1 if m.in_channels == 3 else inputs.SD3_VAE_DOWNSAMPLE)
  side = (cfg.data.resolution // per_cell if cfg.data.resolution else
          getattr(m, "sample_size", None) or getattr(m, "input_size"))
  return (side, side, m.in_channels), (cfg.data.text_tokens if "context" in m.cond_features else 0)


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  return {"argument_gib": args / GIB, "output_gib": out / GIB, "alias_gib": alias / GIB, "temp_gib": temp / GIB,
          "generated_code_gib": mem.generated_code_size_in_bytes / GIB,
          # Live at the peak: the inputs, the temporaries, and the outputs that do not reuse a donated input.
          "total_gib": (args + temp + out - alias) / GIB}


def _compile(lowered):
  """(compiled, seconds, None) or (None, seconds, the compiler's message) when the program does not fit."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; only an out-of-memory verdict is an answer, anything else a bug
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, time.perf_counter() - start, str(e).strip()
  return compiled, time.perf_counter() - start, None


def _sample_report(cfg: TrainConfig, mesh, shardings, abstract, latent_shape, text_tokens):
  """Compiles the sampling loop (config.sample, one sample per data-parallel device, CFG in one batch)."""
  b = parallel.data_parallel_size(mesh)
  spec = batch_spec(cfg, mesh, latent_shape, text_tokens)
  cond = {k: jax.ShapeDtypeStruct((b, *v.shape[1:]), v.dtype, sharding=v.sharding) for k, v in spec.items()
          if k != "latent"}
  replicated = parallel.replicated(mesh)
  null = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=replicated) for k, v in cond.items()}
  noise = jax.ShapeDtypeStruct((b, *latent_shape), jnp.float32, sharding=parallel.batch_sharding(mesh, 4))
  if cfg.sr.factor:  # a super-resolution stage samples from the upsampled, augmented low-res input
    cond["lowres"] = noise
    cond["aug_level"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=parallel.batch_sharding(mesh, 1))
  if cfg.lora.rank > 0:  # sampling runs the adapters merged into the base: the model's own parameters
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          model.abstract_params(cfg.model), model.param_shardings(cfg.model, mesh, cfg.sharding_rules))
  else:
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract["ema"],
                          shardings["ema"])
  lowered = jax.jit(evaluate.make_generate(cfg)).lower(params, cond, null, noise)
  compiled, seconds, error = _compile(lowered)
  report = {"batch": b, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "compile_s": seconds}
  if compiled is None:
    return {**report, "fits": False, "error": error}
  return {**report, **_memory(compiled), "collectives": collective_stats(compiled.as_text())}


def compile_report(cfg: TrainConfig, topology: str, *, sample: bool = True) -> dict:
  """Compiles the train step (and the sampling loop) of `cfg` for `topology`; the report as a dict."""
  devices = topology_devices(topology)
  _, chip_name, _ = parse_topology(topology)
  chip = CHIPS[chip_name]
  check_mesh_and_batch(cfg, devices)
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn, devices=devices)
  tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
  latent_shape, text_tokens = batch_geometry(cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
    abstract, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules, cfg.lora)
    if has_base(cfg):  # fine-tuning: the frozen base (LoRA) / reference (DPO) in config.lora.base_dtype
      abstract[FROZEN], shardings[FROZEN] = base_shardings(cfg.model, mesh, cfg.sharding_rules, cfg.lora.base_dtype)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = batch_spec(cfg, mesh, latent_shape, text_tokens)
    lowered = jit_train_step(cfg, tx, schedule, shardings).lower(state, batch)
    compiled, compile_s, error = _compile(lowered)
    n_chips = len(devices)
    flops = model.train_flops(cfg.model, latent_shape[0], latent_shape[1], text_tokens) * cfg.data.global_batch_size
    report = {
        "topology": topology, "chip": chip["kind"], "chips": n_chips, "hbm_gib": chip["hbm_gib"],
        "mesh": dict(mesh.shape), "global_batch": cfg.data.global_batch_size,
        "per_chip_batch": cfg.data.global_batch_size / parallel.data_parallel_size(mesh),
        "latent": list(latent_shape), "text_tokens": text_tokens, "params": model.param_count(cfg.model),
        "remat": cfg.model.remat, "attention": _ATTENTION_ON_TPU.get(cfg.model.attention, cfg.model.attention), "dtype": cfg.model.dtype,
        "microbatches": cfg.microbatches, "xla_flags": {"preset": cfg.xla_flags, **xla_presets.environment()},
        "param_gib": _per_device_bytes(abstract["params"], shardings["params"]) / GIB,
        "opt_gib": _per_device_bytes(abstract["opt_state"], shardings["opt_state"]) / GIB,
        "ema_gib": _per_device_bytes(abstract["ema"], shardings["ema"]) / GIB,
        "base_gib": _per_device_bytes(abstract[FROZEN], shardings[FROZEN]) / GIB if FROZEN in abstract else 0.0,
        "trained_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"])),
        "lora": {"rank": cfg.lora.rank, "targets": list(cfg.lora.targets), "base_dtype": cfg.lora.base_dtype}
        if cfg.lora.rank else None, "dpo_beta": cfg.dpo.beta,
        "flops_per_step": flops / n_chips, "compile_s": compile_s,
        "peak_flops": chip["peak_flops"], "hbm_gbps": chip["hbm_gbps"]}
    report["state_gib"] = report["param_gib"] + report["opt_gib"] + report["ema_gib"] + report["base_gib"]
    if compiled is None:
      report.update({"fits": False, "error": error})
      return report
    report.update(_memory(compiled))
    report["fits"] = report["total_gib"] <= chip["hbm_gib"]
    report["headroom_gib"] = chip["hbm_gib"] - report["total_gib"]
    report["collectives"] = collective_stats(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # HBM traffic lower bound: XLA's count (which sees a scanned layer once) or, at least, reading every input
    # and writing every output once.
    hbm_bytes = max(float(cost.get("bytes accessed", 0.0)),
                    (report["argument_gib"] + report["output_gib"]) * GIB)
    report["hbm_bytes_lower_bound"] = hbm_bytes
    report["roofline_step_s"] = max(report["flops_per_step"] / chip["peak_flops"], hbm_bytes / (chip["hbm_gbps"] * 1e9))
    report["roofline_mfu"] = report["flops_per_step"] / chip["peak_flops"] / report["roofline_step_s"]
    if sample:
      report["sample"] = _sample_report(cfg, mesh, shardings, abstract, latent_shape, text_tokens)
  return report


def format_report(r: dict) -> str:
  lines = [f"compile for {r['topology']}: {r['chips']} × {r['chip']} ({r['hbm_gib']:.2f} GiB HBM each), mesh "
           f"{r['mesh']}, global batch {r['global_batch']} ({r['per_chip_batch']:g} per data-parallel chip), "
           f"latent {r['latent']}, {r['text_tokens']} text tokens",
           f"  model {r['params'] / 1e9:.3f}B params, {r['dtype']}, remat {r['remat']}, attention {r['attention']}"
           + (f", {r['microbatches']} microbatches" if r.get("microbatches", 1) > 1 else "")
           + (f", XLA flags {r['xla_flags']['preset']}" if r.get("xla_flags", {}).get("preset", "none") != "none" else ""),
           f"  per chip: params {r['param_gib']:.3f} + optimizer {r['opt_gib']:.3f} + EMA {r['ema_gib']:.3f}"
           + (f" + frozen base {r['base_gib']:.3f}" if r.get("base_gib") else "") + f" = state {r['state_gib']:.3f} GiB"]
  if r.get("lora") or r.get("dpo_beta"):
    lines.append(f"  fine-tuning: {r['trained_params'] / 1e6:.2f}M trained parameters"
                 + (f", LoRA rank {r['lora']['rank']} on {r['lora']['targets']}, base in {r['lora']['base_dtype']}"
                    if r.get("lora") else "") + (f", DPO β={r['dpo_beta']:g}" if r.get("dpo_beta") else ""))
  if not r["fits"] and "error" in r:
    lines.append(f"  DOES NOT FIT (compile {r['compile_s']:.0f} s): {r['error'].splitlines()[0][:400]}")
    return "\n".join(lines)
  lines += [f"  HBM per chip: arguments {r['argument_gib']:.3f} + temporaries {r['temp_gib']:.3f} + outputs "
            f"{r['output_gib']:.3f} − aliased {r['alias_gib']:.3f} = {r['total_gib']:.3f} GiB of {r['hbm_gib']:.2f} → "
            + (f"fits, {r['headroom_gib']:.2f} GiB headroom" if r["fits"] else "DOES NOT FIT"),
            f"  train FLOPs per chip per step {r['flops_per_step'] / 1e12:.2f} T (analytic) | roofline step "
            f"{r['roofline_step_s'] * 1e3:.1f} ms → MFU ≤ {r['roofline_mfu']:.1%} | compile {r['compile_s']:.1f} s",
            "  collectives per step: " + ", ".join(
                f"{k} {v['count']} ({v['bytes'] / GIB:.3f} GiB)" for k, v in r["collectives"].items()
                if isinstance(v, dict) and v["count"])]
  s = r.get("sample")
  if s:
    lines.append(f"  sampling ({s['batch']} samples, {s['steps']} steps, CFG): " + (
        f"{s['total_gib']:.3f} GiB per chip, compile {s['compile_s']:.1f} s" if "total_gib" in s else
        f"DOES NOT FIT: {s['error'].splitlines()[0][:200]}"))
  return "\n".join(lines)


def run(cfg: TrainConfig, workdir, topology: str, *, sample: bool = True) -> dict:
  """--mode=compile: the report on stdout and in workdir/compile_report.json."""
  log(f"compiling for {topology} on this machine (no TPU needed)…")
  jax.config.update("jax_enable_compilation_cache", False)  # the cache cannot hold topology-only programs
  report = compile_report(cfg, topology, sample=sample)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "compile_report.json").write_text(json.dumps(report, indent=1))
  log(format_report(report))
  log(f"report: {workdir / 'compile_report.json'}")
  return report
