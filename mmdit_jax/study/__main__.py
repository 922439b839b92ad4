"""python -m mmdit_jax.study --config=configs/study.py[:…] --workdir=DIR [--shard=i/n] [--stage=all|train|rank]

Trains every formulation × seed of the study (one workdir each under DIR/runs), selects each run's step of
lowest EMA validation loss, samples and scores it under every setting, and ranks the formulations by
non-dominated sorting per setting with the ranks averaged (DIR/table.md, .csv, .json). Resumable at every
level: the same command continues a killed study. Exit codes as mmdit_jax.main: 0 done, 2 bad input,
75 a run was preempted or halted (resubmit the same command).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmdit_jax.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/study.py[:args]")
_WORKDIR = flags.DEFINE_string("workdir", None, "The study directory (local or gs://).")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: this process trains and scores runs i, i + n, …")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", "train", "rank"], "all; train (and select) only; rank only.")
_CPU_REUSE_MEMORY = flags.DEFINE_boolean(
    "cpu_reuse_memory", True, "As mmdit_jax.main's: on the CPU backend, steps run on the calling thread and "
    "freed memory stays in the process (mmdit_jax/cpu_runtime.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax

  from mmdit_jax import cpu_runtime
  from mmdit_jax.paths import compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())  # runs of a study share their programs
  cpu_runtime.configure(_CPU_REUSE_MEMORY.value)
  from mmdit_jax.study import runner
  try:
    table = runner.run_study(_CONFIG.value, _WORKDIR.value, _SHARD.value, _STAGE.value)
  except runner.StudyStopped as e:
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
  if table is not None:
    best = next(iter(table["average_rank"]))
    print(f"best average rank: {best} ({table['average_rank'][best]['mean']:.2f}); table: {_WORKDIR.value}/table.md")


if __name__ == "__main__":
  app.run(main)
