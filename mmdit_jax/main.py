"""Entry point: python -m mmdit_jax.main --config=configs/rf_lognorm.py --workdir=DIR [--mode=train].

Exit codes: 0 done; 2 bad input (a config value, flag, path, dataset or checkpoint; the message says what
is valid); 3 the run stopped itself (e.g. non-finite steps); 75 preempted after a complete checkpoint
(resubmit the same command to resume). Logs of orbax and absl are at WARNING unless --verbosity is given.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmdit_jax.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_STOPPED, UserError

MODES = ["train", "eval", "sample", "compile"]
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (local or gs://).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Join a multi-process run: auto (when flags or the platform say so), on, off.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Persistent XLA compilation cache directory ('' disables); default "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/mmdit_jax/xla.")
_CPU_REUSE_MEMORY = flags.DEFINE_boolean(
    "cpu_reuse_memory", True, "On the CPU backend, run each single-device step on the calling thread and keep "
    "freed memory in the process, so a step reuses the last one's memory instead of page-faulting it in "
    "(mmdit_jax/cpu_runtime.py; the process then keeps its peak memory); --nocpu_reuse_memory keeps JAX's "
    "asynchronous dispatch and glibc's defaults.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "--mode=sample: a prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "--mode=sample: a file of prompts, one per line (plain "
                                    "text, or JSON {\"prompt\", \"negative_prompt\", \"seed\"}).")
_NEGATIVE_PROMPT = flags.DEFINE_string("negative_prompt", "", "--mode=sample: the unconditional branch of "
                                       "guidance for every prompt without its own ('' as default).")
_SEEDS = flags.DEFINE_list("seeds", [], "--mode=sample: a seed per --prompt (else config.sample.seed with each "
                           "sample's index).")
_LABELS = flags.DEFINE_list("labels", [], "--mode=sample, class-conditional models: class labels, e.g. 0,5,11.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "--mode=sample: .npz of precomputed embeddings.")
_CASCADE = flags.DEFINE_multi_string("cascade", [], "--mode=sample: a super-resolution stage after the --workdir "
                                     "run, WORKDIR[:key=value,…] (its own config, with overrides, e.g. "
                                     "sample.steps=50,sr.aug_level=0.2); repeat for more stages (mmdit_jax.cascade).")
_AUG_SWEEP = flags.DEFINE_list("aug_sweep", [], "--mode=sample with --cascade: re-run the last stage at these "
                               "augmentation levels, e.g. 0,0.1,0.2,0.4 → cascade/aug_sweep.md.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=compile: a TPU topology, e.g. v5p:4x4x4, v5e:4x4, "
                                "2:v6e:8x8 (two slices).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str, code: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _clean(message: str) -> str:
  """A flag error without the traceback config_flags embeds: its last line, minus the exception's type."""
  head, sep, trace = message.partition("Traceback (most recent call last):")
  if not sep:
    return message.strip()
  last = [line for line in trace.strip().splitlines() if line.strip()][-1]
  return f"{head.strip()} {last.split(': ', 1)[-1] if last.split(':', 1)[0].endswith(('Error', 'Exception')) else last}"


def _parse_flags(argv):
  """absl's parser, with config-file and --config.x override failures as one clean paragraph."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{_clean(str(e))}\nPass --helpshort to see the flags.", EXIT_BAD_INPUT)
  except (AttributeError, KeyError) as e:  # --config.<unknown field>=…
    detail = e.args[0] if e.args else e
    lines = str(detail.args[0] if isinstance(detail, KeyError) and detail.args else detail).splitlines()
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    _fail(f"unknown config field {lines[0].strip(chr(39) + chr(34))!r} among the overrides {overrides}: "
          f"{' '.join(lines[1:]) or 'see the config file for the valid fields'}", EXIT_BAD_INPUT)
  except (OSError, UserError, ValueError, TypeError) as e:  # the config file, or its get_config(arg)
    _fail(f"cannot load the config: {_clean(str(e))}", EXIT_BAD_INPUT)


def _setup_logging_and_cache():
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  cache = _COMPILATION_CACHE.value
  if cache is None:
    from mmdit_jax.paths import compilation_cache_dir
    cache = compilation_cache_dir()
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)


def _prompts() -> list:
  """sample.Request per --prompt (with --seeds and --negative_prompt) and per --prompts_file line."""
  import dataclasses
  from mmdit_jax.sample import Request, parse_prompts_file
  try:
    seeds = [int(x) for x in _SEEDS.value]
  except ValueError as e:
    raise UserError(f"--seeds={','.join(_SEEDS.value)}: seeds are integers ({e})") from e
  if seeds and len(seeds) != len(_PROMPT.value):
    raise UserError(f"--seeds gives {len(seeds)} seeds for {len(_PROMPT.value)} --prompt flags: one each")
  requests = [Request(p, seed=seeds[i] if seeds else None) for i, p in enumerate(_PROMPT.value)]
  if _PROMPTS_FILE.value:
    from etils import epath
    path = epath.Path(_PROMPTS_FILE.value)
    if not path.exists():
      raise UserError(f"--prompts_file={path} does not exist")
    requests += parse_prompts_file(path.read_text(), str(path))
  return [r if r.negative_prompt else dataclasses.replace(r, negative_prompt=_NEGATIVE_PROMPT.value)
          for r in requests]


def _labels() -> list[int]:
  try:
    return [int(x) for x in _LABELS.value]
  except ValueError as e:
    raise UserError(f"--labels={','.join(_LABELS.value)}: labels are integers ({e})") from e


def _run():
  from mmdit_jax import xla_presets
  try:
    xla_presets.apply(str(_CONFIG.value.get("xla_flags", "none")))  # before any backend starts
  except OSError:
    pass  # (an unloadable config file: reported below, where it is first used)
  if _MODE.value == "compile":
    if not _TOPOLOGY.value:
      raise UserError("--mode=compile needs --topology, e.g. --topology=v5p:4x4x4")
    from mmdit_jax.aot import prepare_environment  # before JAX loads
    prepare_environment()
  _setup_logging_and_cache()
  from mmdit_jax import config as config_lib
  from mmdit_jax.parallel import distributed
  if _MODE.value != "compile":
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, mode=_DISTRIBUTED.value,
                           timeout_s=_DISTRIBUTED_TIMEOUT.value)
  try:
    cfg = config_lib.from_config_dict(_CONFIG.value)
  except OSError as e:  # config_flags defers a missing or unloadable file to its first use (no other I/O here)
    raise UserError(f"cannot load --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: "
                    f"{str(e).strip().splitlines()[-1].strip()}") from e
  from mmdit_jax import inputs, sample, train
  cfg = inputs.with_latent_downsample(cfg)  # (config.shift_base_resolution: α per bucket needs pixels per latent)
  if _MODE.value != "compile":  # after the config's checks: this creates the backends
    from mmdit_jax import cpu_runtime
    cpu_runtime.configure(_CPU_REUSE_MEMORY.value)
  if _MODE.value == "train":
    summary = train.train_and_evaluate(cfg, _WORKDIR.value)
    if summary.get("stopped"):
      sys.exit(EXIT_PREEMPTED)
  elif _MODE.value == "eval":
    sample.run_eval(cfg, _WORKDIR.value)
  elif _MODE.value == "compile":
    from mmdit_jax import aot
    aot.run(cfg, _WORKDIR.value, _TOPOLOGY.value)
  elif _CASCADE.value:
    from mmdit_jax import cascade
    try:
      levels = [float(x) for x in _AUG_SWEEP.value]
    except ValueError as e:
      raise UserError(f"--aug_sweep={','.join(_AUG_SWEEP.value)}: levels are numbers in [0, 1] ({e})") from e
    cascade.run_cascade(cfg, _WORKDIR.value, _CASCADE.value, _prompts(), _EMBEDDINGS.value, _labels(), levels)
  else:
    if _AUG_SWEEP.value:
      raise UserError("--aug_sweep sweeps the last stage of a cascade: give the stages with --cascade")
    sample.run_sample(cfg, _WORKDIR.value, _prompts(), _EMBEDDINGS.value, _labels())


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag", EXIT_BAD_INPUT)
  from mmdit_jax.train import TrainingStopped
  try:
    _run()
  except TrainingStopped as e:
    _fail(str(e), EXIT_STOPPED)
  except UserError as e:
    _fail(str(e), EXIT_BAD_INPUT)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
