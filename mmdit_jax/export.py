"""A trained MM-DiT as a diffusers `SD3Transformer2DModel` directory (config.json + safetensors):

  python -m mmdit_jax.export --workdir=DIR --out=DIR [--weights=ema|raw] [--lora=adapter|merged]

The run's own config (workdir/config.json, written by training) rebuilds the model; the newest intact
checkpoint is restored on this host's devices. `SD3Transformer2DModel.from_pretrained(OUT)` loads the
result, and `--config.init=diffusers:OUT` reads it back here.

A LoRA run (config.lora.rank > 0) exports its adapters by default: OUT/pytorch_lora_weights.safetensors in
diffusers' LoRA layout (`pipe.load_lora_weights(OUT)`, `transformer.load_lora_adapter(…)`; read back here with
--config.lora.load=OUT); --lora=merged writes the transformer with the adapters merged in instead.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from mmdit_jax import config as config_lib
from mmdit_jax import model, parallel
from mmdit_jax.errors import EXIT_BAD_INPUT, UserError
from mmdit_jax.metrics import log
from mmdit_jax.state import restore_for_eval

WEIGHTS = ("ema", "raw")


def run_config(workdir) -> config_lib.TrainConfig:
  """The TrainConfig a run was trained with, from its workdir/config.json."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"{path} does not exist: --workdir must be a training run's directory")
  c = ml_collections.ConfigDict(json.loads(path.read_text()))
  c.mesh.ici = {k: (-1 if k == "data" else 1) for k in c.mesh.ici}  # this host's devices, data-parallel
  c.mesh.dcn = {k: (-1 if k == "data" else 1) for k in c.mesh.dcn}
  return config_lib.from_config_dict(c)


LORA_FORMATS = ("adapter", "merged")


def export(workdir, out, weights: str = "ema", lora: str = "adapter") -> epath.Path:
  """Writes OUT/config.json and OUT/diffusion_pytorch_model.safetensors (a LoRA run with lora="adapter":
  OUT/pytorch_lora_weights.safetensors); returns OUT."""
  from safetensors.numpy import save_file
  from mmdit_jax.model.convert import PEFT_WEIGHTS, lora_to_peft, to_diffusers
  from mmdit_jax.paths import write_atomically
  if weights not in WEIGHTS:
    raise UserError(f"--weights={weights!r}; valid: {list(WEIGHTS)}")
  if lora not in LORA_FORMATS:
    raise UserError(f"--lora={lora!r}; valid: {list(LORA_FORMATS)}")
  cfg = run_config(workdir)
  if not isinstance(cfg.model, model.MMDiTConfig):
    raise UserError(f"{workdir} trained a {type(cfg.model).__name__}; diffusers export is for MM-DiT (SD3)")
  mesh = parallel.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
  from mmdit_jax import pretrained
  state, step = restore_for_eval(cfg, epath.Path(workdir), mesh, pretrained.resolve(cfg)[1] if cfg.lora.rank else None)
  out = epath.Path(out)
  if cfg.lora.rank > 0 and lora == "adapter":
    adapters = jax.tree.map(np.asarray, state["adapters_ema" if weights == "ema" else "adapters"])
    tensors, metadata = lora_to_peft(cfg.model, adapters, cfg.lora.scale)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata=metadata))
    log(f"exported the step-{step} {weights} LoRA adapters ({len(tensors) // 2} layers, rank {cfg.lora.rank}) to "
        f"{out / PEFT_WEIGHTS}")
    return out
  params = jax.tree.map(np.asarray, state["ema" if weights == "ema" else "params"])
  tensors, config_json = to_diffusers(cfg.model, params)
  out.mkdir(parents=True, exist_ok=True)
  write_atomically(out / "diffusion_pytorch_model.safetensors", lambda p: save_file(tensors, p))
  config_json["_mmdit_jax"] = {"workdir": str(workdir), "step": step, "weights": weights}
  (out / "config.json").write_text(json.dumps(config_json, indent=1))
  log(f"exported the step-{step} {weights} weights ({len(tensors)} tensors) to {out}")
  return out


_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Where to write the diffusers transformer directory.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", list(WEIGHTS), "EMA or raw parameters.")
_LORA = flags.DEFINE_enum("lora", "adapter", list(LORA_FORMATS),
                          "A LoRA run: its adapters as a diffusers LoRA file, or the transformer with them merged.")


def main(argv):
  del argv
  try:
    export(_WORKDIR.value, _OUT.value, _WEIGHTS.value, _LORA.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
