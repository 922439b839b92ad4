"""Entry point: python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir=DIR [--mode=train]."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "--mode=sample: a prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "--mode=sample: a file of prompts, one per line.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "--mode=sample: .npz of precomputed embeddings.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from mmdit_jax import parallel
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from mmdit_jax import sample, train
  if _MODE.value == "train":
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == "eval":
    sample.run_eval(_CONFIG.value, _WORKDIR.value)
  else:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
      with open(_PROMPTS_FILE.value) as f:
        prompts += [line.strip() for line in f if line.strip()]
    if not prompts and not _EMBEDDINGS.value:
      raise app.UsageError("--mode=sample needs --prompt, --prompts_file or --embeddings")
    sample.run_sample(_CONFIG.value, _WORKDIR.value, prompts, _EMBEDDINGS.value)


if __name__ == "__main__":
  app.run(main)
