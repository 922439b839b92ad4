"""Entry point: python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir=DIR [--mode=train]."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if jax.config.jax_platforms == "cpu":  # CPU collectives across processes
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif jax.config.jax_platforms not in (None, "", "cpu"):  # Cloud TPU VMs: discover the other hosts
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError):
      pass
  from mmdit_jax import train
  if _MODE.value == "train":
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    raise app.UsageError(f"--mode={_MODE.value} arrives with the sampling-and-evaluation issue; "
                         "this build trains (and reports validation loss at the end of training)")


if __name__ == "__main__":
  app.run(main)
