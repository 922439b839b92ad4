"""The study's plots as PNG (matplotlib, Agg): timestep densities, training loss per t-bin, EMA validation
loss over steps, metrics vs sampling steps, and the Pareto fronts per setting with their ranks."""

from __future__ import annotations

import numpy as np
from etils import epath

from mmdit_jax.metrics import read_metrics


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path):
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()  # (a panel's title clear of the xlabel above it)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def densities(formulations, path, samples: int = 1_000_000):
  """π(t) of each formulation's training timesteps: a histogram of what its sampler draws (any family,
  EDM's included, shifted as it trains)."""
  import jax
  from mmdit_jax.flow import objectives
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0, 1, 101)
  for i, name in enumerate(formulations):
    t = np.asarray(objectives.parse_formulation(name).sample_t(jax.random.key(i), (samples,)))
    hist, _ = np.histogram(t, bins, density=True)
    ax.plot((bins[1:] + bins[:-1]) / 2, hist, label=name)
  ax.set(xlabel="t (0 data, 1 noise)", ylabel="π(t)", title="training timestep densities")
  ax.legend(fontsize=7)
  return _save(fig, path)


def loss_per_bin(runs: dict, path):
  """The last logged training loss per t-bin (loss_t_bin/i) of each run: {run name: workdir}."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, workdir in runs.items():
    rows = [r for r in read_metrics(workdir) if any(k.startswith("loss_t_bin/") for k in r)]
    if not rows:
      continue
    bins = sorted((int(k.split("/")[1]), v) for k, v in rows[-1].items() if k.startswith("loss_t_bin/"))
    n = max(i for i, _ in bins) + 1
    ax.plot([(i + 0.5) / n for i, _ in bins], [v for _, v in bins], marker=".", label=name)
  ax.set(xlabel="t bin", ylabel="training loss (last log)", yscale="log", title="loss per timestep bin")
  ax.legend(fontsize=7)
  return _save(fig, path)


def validation_curves(selections: dict, path):
  """EMA validation loss over steps per run, the selected step marked: {run name: selection.json dict}."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, sel in selections.items():
    steps = sorted(int(s) for s in sel["curve"])
    line, = ax.plot(steps, [sel["curve"][str(s)] for s in steps], marker=".", label=name)
    ax.plot([sel["step"]], [sel["val_ema/loss"]], "o", mfc="none", ms=10, color=line.get_color())
  ax.set(xlabel="step", ylabel="EMA validation loss", title="validation (circles: the selected steps)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def metric_vs_steps(table: dict, settings: list, path):
  """Alignment and quality against sampling steps: one row of panels per guidance scale (and sampler), one
  colour per formulation, EMA weights solid and raw weights dashed."""
  plt = _pyplot()
  groups = {}
  for s in settings:
    for f, e in table["per_setting"][s.name].items():
      groups.setdefault((s.sampler, s.guidance), {}).setdefault((f, s.weights), []).append(
          (s.steps, e["alignment"], e["quality"]))
  formulations = list(table["average_rank"])
  colours = {f: f"C{i % 10}" for i, f in enumerate(formulations)}
  rows = sorted(groups)
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
  for (sampler, g), (a1, a2) in zip(rows, axes):
    for (f, w), pts in sorted(groups[(sampler, g)].items()):
      pts.sort()
      style = dict(marker=".", color=colours.get(f, "k"), linestyle="-" if w == "ema" else "--",
                   label=f if w == "ema" else None)
      a1.plot([p[0] for p in pts], [p[1] for p in pts], **style)
      a2.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    where = f"{sampler}, CFG {g:g}"
    a1.set(xlabel="sampling steps", ylabel=table["alignment_metric"], xscale="log", title=f"alignment ↑ ({where})")
    a2.set(xlabel="sampling steps", ylabel=table["quality_metric"], xscale="log", title=f"quality ↓ ({where})")
  axes[0][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), title="EMA solid, raw dashed",
                    title_fontsize=7)
  return _save(fig, path)


def pareto_fronts(table: dict, setting: str, path):
  """(quality, alignment) of each formulation in one setting, fronts joined, ranks written beside."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  by_f = table["per_setting"][setting]
  for front in sorted({e["rank"] for e in by_f.values()}):
    pts = sorted((e["quality"], e["alignment"], f) for f, e in by_f.items() if e["rank"] == front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=f"front {front}")
    for q, a, f in pts:
      ax.annotate(f"{f} ({front})", (q, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set(xlabel=f"{table['quality_metric']} (lower is better)", ylabel=f"{table['alignment_metric']} (higher)",
         title=setting)
  ax.legend(fontsize=7)
  return _save(fig, path)


def loss_vs_metrics(table: dict, path):
  """EMA validation loss against the alignment and quality of each scored checkpoint, coloured by formulation."""
  plt = _pyplot()
  lvm = table["loss_vs_metrics"]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for f in sorted({p["formulation"] for p in lvm["points"]}):
    pts = [p for p in lvm["points"] if p["formulation"] == f]
    a1.plot([p["val_ema/loss"] for p in pts], [p["alignment"] for p in pts], "o", ms=4, label=f)
    a2.plot([p["val_ema/loss"] for p in pts], [p["quality"] for p in pts], "o", ms=4, label=f)
  a1.set(xlabel="EMA validation loss", ylabel=table["alignment_metric"], title=lvm["setting"])
  a2.set(xlabel="EMA validation loss", ylabel=table["quality_metric"], title=lvm["setting"])
  quality = np.asarray([p["quality"] for p in lvm["points"]], np.float64)
  quality = quality[np.isfinite(quality)]
  if len(quality) and quality.min() > 0 and quality.max() > 10 * quality.min():  # early checkpoints' FID
    a2.set_yscale("log")
  for ax in (a1, a2):  # each formulation's loss has its own scale: log x keeps them apart and readable
    ax.set_xscale("log")
  a2.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
  return _save(fig, path)
