"""SD3's formulation study (§5.1, Table 1) as a tool: `python -m mmdit_jax.study`.

Preset arguments: formulations (names or groups, ';'-separated: all61, lognorm, mode, edm, eps_v, paper7),
seeds (how many, from 0), steps (training steps per run), data (dataset path; "" → the demo dataset),
size (the rf_lognorm preset each run trains: tiny | demo | 2b | 8b).

Launch commands:
  # The mini-study on the demo task (7 formulations × 2 seeds; the table and plots go to --workdir):
  python -m mmdit_jax.study --config=configs/study.py:formulations=paper7,seeds=2 --workdir=/tmp/study_demo
  # One formulation against SD3's winner, on precomputed latents, spread over 4 jobs sharing a bucket (names
  # with commas go in --config.formulations, not in the preset argument):
  python -m mmdit_jax.study --config=configs/study.py:size=2b,data=gs://b/latents256 \
      --config.formulations='rf/lognorm(0.00, 1.00);rf/mode(1.29)' --workdir=gs://b/studies/mode \
      --shard=0/4      # … and --shard=1/4, 2/4, 3/4 (or launch/study_pod.sh); then --stage=rank
  # Any field of the runs' training config: --config.train.<field>=…; of the evaluation: --config.<field>=…
"""

import ml_collections

from configs import rf_lognorm
from mmdit_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, formulations="paper7", seeds=1, steps=0, data="", size="tiny")
  c = ml_collections.ConfigDict()
  c.formulations = args.formulations  # names and groups, ';'-separated (names contain commas)
  if args.seeds < 1:
    raise defaults.ConfigError(f"seeds={args.seeds}: at least 1")
  c.seeds = tuple(range(args.seeds))
  c.train = rf_lognorm.get_config(f"size={args.size}" + (f",data={args.data}" if args.data else ""))
  c.steps = args.steps or c.train.total_steps  # per run, every run the same budget
  c.select_every = max(1, c.steps // 8)  # validate (EMA loss) and checkpoint this often; the best step is sampled
  # The evaluation settings (the paper: 5, 25 and 50 Euler steps × guidance, EMA and raw weights).
  c.sample_steps = (5, 25, 50)
  c.guidance = (1.0, 4.0)
  c.weights = ("ema", "raw")
  c.samplers = ("euler",)
  # The two axes of the Pareto sorting: text alignment (higher is better) and image quality (lower is better).
  # On the demo task alignment is the compositional accuracy. On real data give a CLIP model
  # (--config.train.eval.clip=DIR, a transformers CLIPModel directory) and use "clip_score" and "cmmd" (or keep
  # FID: train.eval.fid_network=inception).
  c.alignment_metric = "demo/accuracy_all"
  # Also score every validated checkpoint under this setting (its name, e.g. "euler-25steps-cfg4-ema"; "" off):
  # the correlation of EMA validation loss with the metrics, over all checkpoints of all runs.
  c.curve_setting = "euler-25steps-cfg4-ema"
  c.quality_metric = f"fid/{c.train.eval.fid_network}"
  return c
