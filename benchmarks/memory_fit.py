"""The memory-fit table: which SD3 recipe (2B d=24, 8B d=38) fits which TPU slice at 256² and 1024², with what
mesh, remat policy and largest per-chip batch — found by compiling the real train step for each topology on
this CPU machine (libtpu needed, no TPU; see `--mode=compile`).

  python benchmarks/memory_fit.py --out=docs/memory_fit.json [--models=2b,8b] [--res=256,1024] \
      [--slices=v5p-64,v5e-16,v5e-64,v6e-16] [--markdown=docs/memory_fit.md]

Per cell: compile at a per-chip batch of 1 with the preset's remat policy ('dots' for 2B; 'full' for 8B, and
for any cell where 'dots' does not fit); HBM per chip ≈ c + k·batch, and that first compile bounds k, which
gives a batch compiled next (halved until it fits); secant steps through the two latest compiles then find
where the line meets 95 % of HBM, each compiled to confirm (at most three). The table reports the largest
per-chip batch that compiled within 95 % of HBM.
The mesh: FSDP over the largest product of physical axes ≤ 16 (16 on 4x4x4, 2x4x4 and 4x4; 8 on 8x8) and
data parallelism over the rest. At 1024² both remat policies are searched and the larger batch reported. Each compile runs in its own process (the 8B step holds several GiB while compiling). Cells
are appended to --out as they finish; a re-run skips the cells already there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Cloud TPU slice names count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
SLICES = {"v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8",
          "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8", "v4-64": "v4:2x4x4"}
HEADROOM = 0.95  # leave 5 % of HBM for the runtime and fragmentation


def fsdp_size(topology: str) -> int:
  """The largest FSDP axis ≤ 16 that tiles the slice: a product of some of its physical axes (a logical
  mesh axis must be one, e.g. 16 = 4×4 of a 4x4x4 torus, but only 8 of an 8x8 one)."""
  dims = [int(d) for d in topology.split(":")[-1].split("x")]
  products = {math.prod(c) for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)}
  return max(p for p in products if p <= 16)


def _compile(model: str, res: int, topology: str, remat: str, per_chip: int, timeout_s: int) -> dict:
  chips = math.prod(int(d) for d in topology.split(":")[-1].split("x"))
  fsdp = fsdp_size(topology)
  code = f"""
import json, sys
from mmdit_jax.aot import prepare_environment
prepare_environment()
import jax
jax.config.update("jax_enable_compilation_cache", False)
from configs import rf_lognorm
from mmdit_jax import aot, config as config_lib
c = rf_lognorm.get_config("size={model},res={res},batch={per_chip * chips}")
c.model.remat = "{remat}"
c.mesh.ici.data, c.mesh.ici.fsdp = -1, {fsdp}
r = aot.compile_report(config_lib.from_config_dict(c), "{topology}", sample=False)
print("REPORT " + json.dumps(r))
"""
  env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"fits": None, "error": f"compile did not finish in {timeout_s} s on this machine", "remat": remat,
            "per_chip_batch": per_chip, "compile_s": timeout_s}
  for line in proc.stdout.splitlines():
    if line.startswith("REPORT "):
      report = json.loads(line[len("REPORT "):])
      report["wall_s"] = time.perf_counter() - start
      return report
  raise RuntimeError(f"compile process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _fits(r: dict, hbm: float) -> bool:
  return bool(r.get("fits")) and r["total_gib"] <= HEADROOM * hbm


def fit_cell(model: str, res: int, slice_name: str, timeout_s: int) -> dict:
  topology = SLICES[slice_name]
  tried = []

  def _try(batch):
    r = _compile(model, res, topology, remat, batch, timeout_s)
    tried.append({k: r.get(k) for k in ("remat", "per_chip_batch", "total_gib", "fits", "error", "compile_s")})
    return r if r.get("fits") is not None and _fits(r, r["hbm_gib"]) else None

  results = []
  for remat in (["dots", "full"] if model == "2b" else ["full"]):
    probe = _compile(model, res, topology, remat, 1, timeout_s)
    tried.append({k: probe.get(k) for k in ("remat", "per_chip_batch", "total_gib", "fits", "error", "compile_s")})
    if probe.get("fits") is None:  # timed out: a bigger remat will not compile faster
      return {"model": model, "res": res, "slice": slice_name, "topology": topology, "fits": None,
              "why": probe["error"], "tried": tried}
    if not _fits(probe, probe["hbm_gib"]):
      continue
    limit = HEADROOM * probe["hbm_gib"]
    best = probe
    # HBM per chip ≈ c + k·batch (state, then activations and the batch itself). From the probe alone,
    # k ≤ (total − state) at batch 1 gives a batch that fits (halved until it does); then secant steps
    # through the two nearest compiles find where the line meets the limit, each one compiled to confirm.
    batch = max(1, int((limit - probe["state_gib"]) // max(probe["total_gib"] - probe["state_gib"], 1e-3)))
    while batch > 1:
      r = _try(batch)
      if r is not None:
        best = r
        break
      batch //= 2
    history = [(1, probe["total_gib"])] + ([(best["per_chip_batch"], best["total_gib"])] if best is not probe else [])
    failed = None  # the smallest batch known not to fit
    for _ in range(3):
      if len(history) < 2:
        break
      (b0, m0), (b1, m1) = history[-2:]
      k = (m1 - m0) / (b1 - b0)
      guess = int(b1 + (limit - m1) // k) if k > 0 else 0
      if failed is not None:
        guess = min(guess, failed - 1)
      if guess <= best["per_chip_batch"] or guess in (b0, b1):
        break
      r = _compile(model, res, topology, remat, guess, timeout_s)
      tried.append({k_: r.get(k_) for k_ in ("remat", "per_chip_batch", "total_gib", "fits", "error", "compile_s")})
      if r.get("fits") is None or "total_gib" not in r:
        break
      if _fits(r, r["hbm_gib"]):
        best = r
      else:
        failed = guess
      history.append((guess, r["total_gib"]))
      if failed is not None and failed == best["per_chip_batch"] + 1:
        break
    results.append({"model": model, "res": res, "slice": slice_name, "topology": topology, "fits": True,
            "remat": remat, "mesh": best["mesh"], "max_per_chip_batch": int(best["per_chip_batch"]),
            "total_gib": best["total_gib"], "state_gib": best["state_gib"], "temp_gib": best["temp_gib"],
            "hbm_gib": best["hbm_gib"], "roofline_mfu": best["roofline_mfu"],
            "roofline_step_s": best["roofline_step_s"], "collectives": best["collectives"],
            "params": best["params"], "tried": tried})
    if res < 1024:  # at 256² the first policy that fits is the one to use; at 1024² 'dots' keeps the
      break         # attention logits (the efficiency issue), so 'full' may fit a larger batch: try both
  if results:
    return max(results, key=lambda r: r["max_per_chip_batch"])  # (a tie keeps the cheaper 'dots')
  last = probe
  why = (f"per-chip batch 1 needs {last['total_gib']:.1f} GiB of {last['hbm_gib']:.1f} (state "
         f"{last['state_gib']:.1f}, temporaries {last['temp_gib']:.1f}) with remat={last['remat']}"
         if "total_gib" in last else (last.get("error") or "").splitlines()[0][:300])
  return {"model": model, "res": res, "slice": slice_name, "topology": topology, "fits": False, "why": why,
          "tried": tried}


def markdown(cells: list[dict]) -> str:
  lines = ["| model | res | slice (topology) | fits | mesh | remat | max batch / chip | HBM / chip at it | state / chip | roofline step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for c in cells:
    head = f"| {c['model']} | {c['res']}² | {c['slice']} ({c['topology']}) |"
    if c["fits"]:
      mesh = " × ".join(f"{k} {v}" for k, v in c["mesh"].items() if v > 1)
      lines.append(f"{head} yes | {mesh} | {c['remat']} | {c['max_per_chip_batch']} | "
                   f"{c['total_gib']:.1f} of {c['hbm_gib']:.1f} GiB | {c['state_gib']:.2f} GiB | "
                   f"{c['roofline_step_s'] * 1e3:.0f} ms |")
    else:
      lines.append(f"{head} {'no' if c['fits'] is False else 'unknown'} | | | | {c['why']} | | |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="docs/memory_fit.json")
  parser.add_argument("--markdown", default="")
  parser.add_argument("--models", default="2b,8b")
  parser.add_argument("--res", default="256,1024")
  parser.add_argument("--slices", default="v5p-64,v5e-16,v5e-64,v6e-16")
  parser.add_argument("--timeout_s", type=int, default=900, help="per compile")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  cells = json.loads(out.read_text()) if out.exists() else []
  done = {(c["model"], c["res"], c["slice"]) for c in cells}
  for model in args.models.split(","):
    for res in map(int, args.res.split(",")):
      for slice_name in args.slices.split(","):
        if (model, res, slice_name) in done:
          continue
        start = time.perf_counter()
        cell = fit_cell(model, res, slice_name, args.timeout_s)
        cell["search_s"] = time.perf_counter() - start
        cells.append(cell)
        out.write_text(json.dumps(cells, indent=1))
        print(markdown([cell]).splitlines()[-1], f"({cell['search_s']:.0f} s)", flush=True)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(markdown(cells))
  print(markdown(cells))


if __name__ == "__main__":
  main()
