"""SD3's study as a tool (§5.1): train each formulation × seed to a step budget, select each run's step of
lowest EMA validation loss, sample it under every setting (steps × guidance × EMA/raw × sampler), score the
samples, rank by non-dominated sorting per setting and average the ranks (Table 1).

Layout under the study directory (every level resumable: finished parts are never recomputed):
  runs/<formulation>-s<seed>/          an ordinary training workdir (checkpoints at every validation)
  runs/<…>/selection.json              the step of lowest EMA validation loss, and the loss curve
  runs/<…>/scores/<setting>.json       the scores of that step's samples under one setting
  table.md, table.csv, table.json      the ranking (written once every run of the study has its scores)

Runs are independent: `--shard i/n` takes runs i, i + n, …, so a study spreads over processes, jobs or
hosts that share the study directory; the ranking is written by whichever shard finds every score present
(or by `--stage=rank`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import re

import jax
import ml_collections
import numpy as np
from etils import epath

from mmdit_jax import config as config_lib
from mmdit_jax import inputs, parallel, paths
from mmdit_jax.errors import UserError
from mmdit_jax.flow import objectives
from mmdit_jax.metrics import log, read_metrics
from mmdit_jax.study import ranking

# Formulation groups by name (the paper's families; `all61` is Table 1's every row).
GROUPS = {
    "all61": objectives.PAPER_FORMULATIONS,
    "lognorm": tuple(n for n in objectives.PAPER_FORMULATIONS if n.startswith("rf/lognorm")),
    "mode": tuple(n for n in objectives.PAPER_FORMULATIONS if n == "rf" or n.startswith("rf/mode")),
    "edm": tuple(n for n in objectives.PAPER_FORMULATIONS if n.startswith("edm")),
    "eps_v": ("eps/linear", "v/linear", "eps/cos", "v/cos"),
    # The mini-study of the issue: SD3's winner, its close rivals, uniform rf and the classic baselines.
    "paper7": ("rf/lognorm(0.00, 1.00)", "rf", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/cos",
               "edm(-1.20, 1.20)"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One sampler setting of the evaluation: the paper's 5/25/50 steps × guidance, with EMA or raw weights."""
  steps: int
  guidance: float
  weights: str  # ema | raw
  sampler: str = "euler"

  @property
  def name(self) -> str:
    return f"{self.sampler}-{self.steps}steps-cfg{self.guidance:g}-{self.weights}"


@dataclasses.dataclass(frozen=True)
class Run:
  formulation: str
  seed: int

  @property
  def name(self) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", self.formulation).strip("_")
    return f"{slug}-s{self.seed}"


def expand_formulations(spec) -> tuple[str, ...]:
  """Names and group names ("lognorm", "paper7", …), separated by ';' (names contain commas) or as a
  sequence; each name is checked by the formulation parser; duplicates are dropped, order kept."""
  items = [s.strip() for s in (spec.split(";") if isinstance(spec, str) else spec) if s.strip()]
  names = []
  for item in items:
    for name in GROUPS.get(item, (item,)):
      try:
        objectives.parse_formulation(name)
      except ValueError as e:
        raise UserError(f"config.formulations: {e}; groups: {sorted(GROUPS)}") from None
      if name not in names:
        names.append(name)
  if not names:
    raise UserError(f"config.formulations is empty; give names or groups {sorted(GROUPS)}")
  return tuple(names)


def settings_of(c) -> list[Setting]:
  weights = tuple(c.weights)
  bad = [w for w in weights if w not in ("ema", "raw")]
  if bad:
    raise UserError(f"config.weights has {bad}; valid: ['ema', 'raw']")
  return [Setting(int(s), float(g), w, sampler) for sampler in c.samplers for s in c.sample_steps
          for g in c.guidance for w in weights]


def runs_of(c) -> list[Run]:
  return [Run(f, int(s)) for f in expand_formulations(c.formulations) for s in c.seeds]


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)/(\d+)", text or "0/1")
  if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
    raise UserError(f"--shard={text!r}: expected i/n with 0 ≤ i < n, e.g. 0/4")
  return int(m.group(1)), int(m.group(2))


def train_config_dict(c, run: Run) -> ml_collections.ConfigDict:
  """The run's training config: the study's base config with the run's formulation and seed, validated
  and checkpointed together (so the step of lowest EMA validation loss has a checkpoint), all kept."""
  t = copy.deepcopy(c.train)
  if t.get("lora", {}).get("rank", 0) or t.get("dpo", {}).get("beta", 0):
    raise UserError("config.train.lora / config.train.dpo: the study trains each formulation from scratch; "
                    "fine-tuning runs (LoRA, DPO) are not study runs")
  t.formulation = run.formulation
  t.seed = run.seed
  t.total_steps = int(c.steps)
  every = int(c.select_every)
  if every < 1 or t.total_steps % every:
    raise UserError(f"config.select_every={every} must divide config.steps={t.total_steps} (checkpoints are "
                    "taken where validation runs, so the selected step can be sampled)")
  t.eval_every = t.checkpoint_every = every
  t.keep_checkpoints = t.total_steps // every + 1
  t.sample_every = 0
  return t


def select_step(workdir) -> dict:
  """The paper's criterion: the step with the lowest EMA validation loss among the run's validations."""
  curve = {int(r["step"]): float(r["val_ema/loss"]) for r in read_metrics(workdir) if "val_ema/loss" in r}
  if not curve:
    raise UserError(f"{workdir}/metrics.jsonl has no val_ema/loss: the run validated nothing")
  step = min(curve, key=lambda s: (curve[s] if np.isfinite(curve[s]) else np.inf, s))
  return {"step": step, "val_ema/loss": curve[step], "curve": {str(k): v for k, v in sorted(curve.items())}}


def _write_json(path, data):
  """Whole or absent: a killed study never leaves a half-written score or table."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_json(path, data, indent=1, sort_keys=True)


def train_run(c, run: Run, study_dir) -> dict:
  from mmdit_jax import train
  workdir = epath.Path(study_dir) / "runs" / run.name
  selection_path = workdir / "selection.json"
  if selection_path.exists():
    return json.loads(selection_path.read_text())
  cfg = config_lib.from_config_dict(train_config_dict(c, run))
  log(f"study: training {run.formulation} (seed {run.seed}) → {workdir}")
  summary = train.train_and_evaluate(cfg, workdir)
  if "stopped" in summary:
    raise StudyStopped(f"run {run.name} stopped ({summary['stopped']}); re-run the study to continue")
  selection = select_step(workdir)
  _write_json(selection_path, selection)
  log(f"study: {run.name} selected step {selection['step']} (EMA validation loss {selection['val_ema/loss']:.4f})")
  return selection


class StudyStopped(Exception):
  """A run was preempted or halted: the study stops too, to be resumed by the same command."""


def curve_setting(c) -> Setting | None:
  """The setting under which every validated checkpoint is also scored (config.curve_setting: a setting's
  name, or "" for none), for the paper's claim that validation loss tracks sample quality."""
  name = c.get("curve_setting", "")
  if not name:
    return None
  by_name = {s.name: s for s in settings_of(c)}
  if name not in by_name:
    raise UserError(f"config.curve_setting={name!r} is not one of the study's settings {sorted(by_name)}")
  return by_name[name]


def score_run(c, run: Run, study_dir, selection: dict) -> dict:
  """{setting name: scores} of the run's selected step, computing only the settings not yet scored; with a
  curve setting, also that setting's scores of every validated checkpoint (scores/curve/<step>.json)."""
  from mmdit_jax import evaluate
  from mmdit_jax.checkpoint import Checkpointer
  from mmdit_jax.sample import autoencoder_for
  from mmdit_jax.state import WEIGHTS, make_optimizer, state_shardings
  from flax import nnx
  workdir = epath.Path(study_dir) / "runs" / run.name
  settings = settings_of(c)
  jobs = [(selection["step"], s, workdir / "scores" / f"{s.name}.json") for s in settings]
  curve = curve_setting(c)
  if curve is not None:
    jobs += [(int(step), curve, workdir / "scores" / "curve" / f"{int(step):07d}.json") for step in selection["curve"]]
  todo = [j for j in jobs if not j[2].exists()]
  if todo:
    base = train_config_dict(c, run)
    cfg = config_lib.from_config_dict(base)
    mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    val_set = inputs.evaluation_set(cfg, inputs.dataset_paths(cfg, announce=False)[1])
    autoencoder = autoencoder_for(cfg, mesh)
    evaluators = {}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):  # (the same for every step)
      abstract, shardings = state_shardings(cfg.model, tx, mesh, cfg.sharding_rules)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    try:
      for step in sorted({j[0] for j in todo}):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(cfg.sharding_rules):
          state, _ = ckpt.restore(step, abstract, shardings, keys=WEIGHTS)  # (not the optimizer's moments)
        for _, setting, path in [j for j in todo if j[0] == step]:
          if setting not in evaluators:
            t = copy.deepcopy(base)
            t.sample.steps, t.sample.guidance, t.sample.sampler = setting.steps, setting.guidance, setting.sampler
            scfg = config_lib.from_config_dict(t)
            evaluators[setting] = (scfg, evaluate.SampleEvaluator(
                scfg, val_set, mesh, workdir / "samples" / setting.name, autoencoder,
                inputs.evaluation_demo(scfg)))
          scfg, evaluator = evaluators[setting]
          with jax.set_mesh(mesh), nnx.logical_axis_rules(scfg.sharding_rules):
            scores = evaluator(state["ema" if setting.weights == "ema" else "params"], step)
          _write_json(path, {"run": run.name, "formulation": run.formulation, "seed": run.seed, "step": step,
                             "setting": dataclasses.asdict(setting), "scores": scores,
                             "val_ema/loss": selection["curve"][str(step)]})
    finally:
      ckpt.close()
  return {s.name: json.loads((workdir / "scores" / f"{s.name}.json").read_text()) for s in settings}


def loss_vs_metrics(c, study_dir) -> dict | None:
  """Pearson and Spearman correlations, over every scored checkpoint of every run, between the EMA validation
  loss and the curve setting's alignment and quality metrics (the paper: lower validation loss, better
  samples, i.e. a negative correlation with alignment and a positive one with FID)."""
  setting = curve_setting(c)
  if setting is None:
    return None
  points = []
  for run in runs_of(c):
    d = epath.Path(study_dir) / "runs" / run.name / "scores" / "curve"
    for path in sorted(d.glob("*.json")) if d.exists() else []:
      r = json.loads(path.read_text())
      points.append((run.formulation, r["step"], r["val_ema/loss"], r["scores"].get(c.alignment_metric, np.nan),
                     r["scores"].get(c.quality_metric, np.nan)))
  if len(points) < 3:
    return None
  loss, align, qual = (np.asarray([p[i] for p in points], np.float64) for i in (2, 3, 4))

  def corr(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
      return {"pearson": None, "spearman": None, "n": int(ok.sum())}
    rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)
    return {"pearson": float(np.corrcoef(a[ok], b[ok])[0, 1]),
            "spearman": float(np.corrcoef(rank(a[ok]), rank(b[ok]))[0, 1]), "n": int(ok.sum())}

  # Within each formulation too: the losses of different formulations are on different scales (an ε-loss is
  # not a velocity loss), so the pooled figure mixes "which formulation" with "how far trained".
  forms = np.asarray([p[0] for p in points])
  within = {f: {"alignment": corr(loss[forms == f], align[forms == f]), "quality": corr(loss[forms == f],
                                                                                       qual[forms == f])}
            for f in dict.fromkeys(forms.tolist())}
  mean_within = {axis: (float(np.mean(v)) if (v := [w[axis]["spearman"] for w in within.values()
                                                    if w[axis]["spearman"] is not None]) else None)
                 for axis in ("alignment", "quality")}
  return {"setting": setting.name, "alignment": corr(loss, align), "quality": corr(loss, qual),
          "within_formulations": within, "mean_within_spearman": mean_within,
          "points": [{"formulation": f, "step": s, "val_ema/loss": l, "alignment": a, "quality": q}
                     for f, s, l, a, q in points]}


def rank_study(c, study_dir) -> dict | None:
  """The Table-1 ranking from every run's scores, or None while some are missing. Metrics are averaged
  over seeds per formulation before sorting; the seed-to-seed spread is reported beside them."""
  study_dir = epath.Path(study_dir)
  runs, settings = runs_of(c), settings_of(c)
  align, quality = c.alignment_metric, c.quality_metric
  per = {}  # (setting, formulation) → list of (alignment, quality)
  for run in runs:
    for s in settings:
      path = study_dir / "runs" / run.name / "scores" / f"{s.name}.json"
      if not path.exists():
        return None
      scores = json.loads(path.read_text())["scores"]
      missing = [k for k in (align, quality) if k not in scores]
      if missing:
        raise UserError(f"{path}: no {missing} among the scores {sorted(scores)}; set config.alignment_metric / "
                        "config.quality_metric to ones the evaluation reports")
      per.setdefault((s.name, run.formulation), []).append((scores[align], scores[quality]))
  means = {s.name: {f: tuple(np.mean(v, axis=0)) for (sn, f), v in per.items() if sn == s.name} for s in settings}
  spread = {s.name: {f: tuple(np.std(v, axis=0)) for (sn, f), v in per.items() if sn == s.name} for s in settings}
  ranks = ranking.rank_settings(means, (True, False))
  average = ranking.average_ranks(ranks)
  table = {"alignment_metric": align, "quality_metric": quality, "seeds": list(map(int, c.seeds)),
           "steps": int(c.steps), "settings": [s.name for s in settings],
           "average_rank": {f: {"mean": m, "settings": n} for f, (m, n) in average.items()},
           "per_setting": {s: {f: {"rank": ranks[s][f], "alignment": means[s][f][0], "quality": means[s][f][1],
                                   "alignment_std": spread[s][f][0], "quality_std": spread[s][f][1]}
                               for f in ranks[s]} for s in ranks}}
  table["loss_vs_metrics"] = loss_vs_metrics(c, study_dir)
  table["plots"] = _plots(table, runs, settings, study_dir)
  _write_json(study_dir / "table.json", table)
  (study_dir / "table.md").write_text(_markdown(table))
  (study_dir / "table.csv").write_text(_csv(table))
  log(f"study: ranking written to {study_dir / 'table.md'}")
  return table


def _plots(table, runs, settings, study_dir) -> list[str]:
  """The study's PNGs under plots/, as paths relative to the study directory."""
  from mmdit_jax.study import plots
  d = epath.Path(study_dir) / "plots"
  workdirs = {r.name: epath.Path(study_dir) / "runs" / r.name for r in runs}
  selections = {n: json.loads((w / "selection.json").read_text()) for n, w in workdirs.items()}
  made = [plots.densities(list(dict.fromkeys(r.formulation for r in runs)), d / "densities.png"),
          plots.loss_per_bin(workdirs, d / "loss_per_t_bin.png"),
          plots.validation_curves(selections, d / "validation_loss.png"),
          plots.metric_vs_steps(table, settings, d / "metrics_vs_steps.png")]
  made += [plots.pareto_fronts(table, s.name, d / f"pareto_{s.name}.png") for s in settings]
  if table.get("loss_vs_metrics"):
    made.append(plots.loss_vs_metrics(table, d / "val_loss_vs_metrics.png"))
  return [f"plots/{p.name}" for p in made]


def _markdown(table) -> str:
  settings = table["settings"]
  lines = [f"# Study: formulations ranked by non-dominated sorting on ({table['alignment_metric']} ↑, "
           f"{table['quality_metric']} ↓) per setting, ranks averaged",
           "", f"{table['steps']} training steps per run, seeds {table['seeds']}; each run sampled at its step of "
           "lowest EMA validation loss; metrics are means over seeds (± their standard deviation).", "",
           "| formulation | average rank | " + " | ".join(settings) + " |",
           "|---|---|" + "---|" * len(settings)]
  for f, avg in table["average_rank"].items():
    cells = []
    for s in settings:
      e = table["per_setting"][s].get(f)
      cells.append("—" if e is None else f"{e['rank']} ({e['alignment']:.3f}±{e['alignment_std']:.3f}, "
                   f"{e['quality']:.2f}±{e['quality_std']:.2f})")
    lines.append(f"| {f} | {avg['mean']:.2f} | " + " | ".join(cells) + " |")
  lvm = table.get("loss_vs_metrics")
  if lvm:
    fmt = lambda r: "—" if r["pearson"] is None else f"Pearson {r['pearson']:+.2f}, Spearman {r['spearman']:+.2f} (n={r['n']})"
    lines += ["", f"EMA validation loss against the samples of every validated checkpoint ({lvm['setting']}): "
              f"{table['alignment_metric']} {fmt(lvm['alignment'])}; {table['quality_metric']} {fmt(lvm['quality'])}."]
    mean = lvm.get("mean_within_spearman") or {}
    num = lambda x: "—" if x is None else f"{x:+.2f}"
    lines += ["", f"Within each formulation (Spearman over its checkpoints; mean {num(mean.get('alignment'))} for "
              f"{table['alignment_metric']}, {num(mean.get('quality'))} for {table['quality_metric']}): " + "; ".join(
                  f"{f} {num(w['alignment']['spearman'])} / {num(w['quality']['spearman'])}"
                  for f, w in lvm.get("within_formulations", {}).items()) + "."]
  lines += ["", "Cells: front index (alignment, quality).", "", "Plots: " + ", ".join(
      f"[{p.split('/')[-1][:-4]}]({p})" for p in table.get("plots", []))]
  return "\n".join(lines) + "\n"


def _csv(table) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(["formulation", "average_rank", "setting", "rank", "alignment", "alignment_std", "quality",
              "quality_std"])
  for f, avg in table["average_rank"].items():
    for s, by_f in table["per_setting"].items():
      if f in by_f:
        e = by_f[f]
        w.writerow([f, avg["mean"], s, e["rank"], e["alignment"], e["alignment_std"], e["quality"],
                    e["quality_std"]])
  return out.getvalue()


def run_study(c, study_dir, shard: str = "0/1", stage: str = "all") -> dict | None:
  """Trains, selects and scores this shard's runs (skipping whatever is done), then ranks when every run of
  the study has its scores. stage: all | train (train and select only) | rank (rank only)."""
  if stage not in ("all", "train", "rank"):
    raise UserError(f"--stage={stage!r}; valid: all, train, rank")
  index, count = parse_shard(shard)
  runs = runs_of(c)
  settings_of(c)  # (bad settings fail before any training)
  study_dir = epath.Path(study_dir)
  study_dir.mkdir(parents=True, exist_ok=True)
  if stage != "rank":
    mine = runs[index::count]
    log(f"study: {len(runs)} runs × {len(settings_of(c))} settings; shard {index}/{count} has {len(mine)} runs")
    for run in mine:
      selection = train_run(c, run, study_dir)
      if stage == "all":
        score_run(c, run, study_dir, selection)
  table = rank_study(c, study_dir)
  if table is None:
    log("study: some runs have no scores yet (other shards still working); the ranking is written by the "
        "shard that finishes last, or by --stage=rank")
  return table
