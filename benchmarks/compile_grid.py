"""Side by side: the train step compiled for one TPU topology over a grid of attention kernel × remat policy ×
mesh (× microbatches), from this CPU machine (libtpu, no TPU) — HBM per chip, roofline step time and MFU,
collective bytes per step — so each choice in the configs rests on numbers.

  python benchmarks/compile_grid.py --topology=v5p:4x4x4 --size=2b --res=1024 --batch=64 \
      --attention=xla,splash --remat=dots,dots_no_batch,full --mesh=64x1,1x64 \
      --out=docs/compile_grid.json --markdown=docs/compile_grid.md

--mesh entries are DATAxFSDP (sequence and tensor 1) or DATAxFSDPxSEQUENCExTENSOR. Each cell is compiled in
its own process (through mmdit_jax.aot.compile_report, as --mode=compile does) and appended to --out as it
finishes; a re-run skips the cells already there. --markdown writes the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def _mesh(text: str) -> tuple[int, ...]:
  sizes = tuple(int(x) for x in text.split("x"))
  return sizes + (1,) * (4 - len(sizes))


def compile_cell(topology, size, res, batch, attention, remat, mesh, microbatches, timeout_s) -> dict:
  code = f"""
import json
from mmdit_jax.aot import prepare_environment
prepare_environment()
import jax
jax.config.update("jax_enable_compilation_cache", False)
from configs import rf_lognorm
from mmdit_jax import aot, config as config_lib
c = rf_lognorm.get_config("size={size},res={res},batch={batch}")
c.model.attention, c.model.remat, c.microbatches = "{attention}", "{remat}", {microbatches}
c.mesh.ici = dict(zip(("data", "fsdp", "sequence", "tensor"), {mesh}))
r = aot.compile_report(config_lib.from_config_dict(c), "{topology}", sample=False)
print("REPORT " + json.dumps(r))
"""
  env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  start = time.perf_counter()
  cell = {"attention": attention, "remat": remat, "mesh": list(mesh), "microbatches": microbatches}
  try:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**cell, "error": f"compile did not finish in {timeout_s} s on this machine"}
  for line in proc.stdout.splitlines():
    if line.startswith("REPORT "):
      return {**cell, **json.loads(line[len("REPORT "):]), "wall_s": time.perf_counter() - start}
  return {**cell, "error": f"compile process failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1][:300]}"}


def markdown(cells: list[dict]) -> str:
  rows = ["| attention | remat | mesh (data×fsdp×seq×tensor) | μbatch | HBM/chip GiB (temp) | fits | roofline ms | MFU ≤ "
          "| all-gather GiB | gather-as-AR GiB | all-reduce GiB | reduce-scatter GiB | all-to-all GiB | compile s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in cells:
    mesh = c["mesh"].values() if isinstance(c["mesh"], dict) else c["mesh"]  # (the report's {axis: size})
    mesh = "×".join(map(str, mesh))
    if "error" in c or "total_gib" not in c:
      rows.append(f"| {c['attention']} | {c['remat']} | {mesh} | {c['microbatches']} | — | no: "
                  f"{c.get('error', 'did not compile')[:80]} | | | | | | | | |")
      continue
    col = {k: v["bytes"] / GIB for k, v in c["collectives"].items() if isinstance(v, dict)}
    rows.append(f"| {c['attention']} | {c['remat']} | {mesh} | {c['microbatches']} | {c['total_gib']:.1f} "
                f"({c['temp_gib']:.1f}) | {'yes' if c['fits'] else 'NO'} | {c['roofline_step_s'] * 1e3:.1f} | "
                f"{c['roofline_mfu']:.0%} | {col.get('all-gather', 0):.2f} | {col.get('all-gather-as-all-reduce', 0):.2f} | "
                f"{col.get('all-reduce', 0):.2f} | {col.get('reduce-scatter', 0):.2f} | {col.get('all-to-all', 0):.2f} | "
                f"{c['compile_s']:.0f} |")
  return "\n".join(rows) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5p:4x4x4")
  p.add_argument("--size", default="2b")
  p.add_argument("--res", type=int, default=1024)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--attention", default="xla,splash")
  p.add_argument("--remat", default="dots,dots_no_batch,full")
  p.add_argument("--mesh", default="64x1,1x64")
  p.add_argument("--microbatches", default="1")
  p.add_argument("--timeout", type=int, default=900)
  p.add_argument("--out", default="docs/compile_grid.json")
  p.add_argument("--markdown", default="")
  a = p.parse_args()
  out = pathlib.Path(a.out)
  cells = json.loads(out.read_text()) if out.exists() else []
  done = {(c["attention"], c["remat"], tuple(c["mesh"].values() if isinstance(c["mesh"], dict) else c["mesh"]),
           c["microbatches"]) for c in cells}
  for attention, remat, mesh, micro in itertools.product(a.attention.split(","), a.remat.split(","),
                                                         map(_mesh, a.mesh.split(",")),
                                                         map(int, a.microbatches.split(","))):
    if (attention, remat, mesh, micro) in done:
      continue
    cell = compile_cell(a.topology, a.size, a.res, a.batch, attention, remat, mesh, micro, a.timeout)
    cell.update({"topology": a.topology, "size": a.size, "res": a.res, "batch": a.batch})
    cells.append(cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cells, indent=1))
    print(markdown([cell]).splitlines()[-1], flush=True)
  if a.markdown:
    pathlib.Path(a.markdown).write_text(
        f"# Compile grid: {a.size} at {a.res}², global batch {a.batch}, {a.topology}\n\n"
        f"Generated by `python benchmarks/compile_grid.py {' '.join(sys.argv[1:])}`.\n\n" + markdown(cells))


if __name__ == "__main__":
  main()
