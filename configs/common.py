"""Shared config pieces: every field the training system reads, with its default."""

import ml_collections


def parse_arg(arg, **defaults):
  """'size=tiny,steps=300' → ConfigDict of defaults overridden by the arg (values keep their type)."""
  cfg = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in cfg:
      raise ValueError(f"unknown config arg {key!r}; valid: {sorted(cfg.keys())}")
    cfg[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return cfg


def encoders_config():
  """Where the frozen SD3 encoders live: `root` is a diffusers SD3 checkpoint directory (text_encoder*,
  tokenizer*, vae); the per-role fields override its layout. Empty everywhere → the paths recorded in
  the dataset's metadata by the precompute job."""
  e = ml_collections.ConfigDict()
  e.root = ""
  for role in ("clip_l", "clip_g", "t5", "vae"):
    e[role] = ""
  for role in ("clip_l", "clip_g", "t5"):
    e[f"{role}_tokenizer"] = ""
  e.no_t5 = False  # inference without T5: zeros in its place (SD3 §5.3.2)
  return e


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.formulation = "rf/lognorm(0.00, 1.00)"  # any of mmdit_jax.flow.PAPER_FORMULATIONS
  c.shift = 1.0  # resolution-dependent timestep shift α (SD3 uses 3.0 at 1024²)

  c.model = ml_collections.ConfigDict()
  c.model.name = "mmdit"  # mmdit | dit
  c.model.kwargs = ml_collections.ConfigDict()  # fields of MMDiTConfig / DiTConfig
  c.model.dit_variant = ""  # for dit: e.g. "XL/2" (sizes of the DiT paper), overridden by kwargs

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # precomputed dataset directory, or "tfds:NAME[:SPLIT]"; "" → the embedded demo dataset
  c.data.tfds_data_dir = ""  # TFDS data_dir for a "tfds:" path (prepared with file_format=array_record)
  c.data.val_path = ""  # held-out split for validation loss; "" → the demo validation split
  c.data.demo_examples = 8192
  c.data.global_batch_size = 256
  c.data.text_dropout = -1.0  # per-encoder drop rate; −1 → SD3's 46.3 % for every encoder
  c.data.label_dropout = 0.1  # class-conditional: null-class rate for classifier-free guidance
  c.data.num_threads = 4
  c.data.prefetch = 8

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.schedule = "constant"  # constant | cosine | linear (decay after warm-up to 0 at total_steps)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # 1e-15 for the QK-norm recipe
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables

  c.ema_decay = 0.9999
  c.max_nonfinite_steps = 10  # stop after this many consecutive non-finite steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = (-1, 1, 1, 1)  # (data, fsdp, sequence, tensor) within a slice; −1 fills
  c.mesh.dcn = (-1, 1, 1, 1)  # across slices

  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 0  # validation loss every k steps (0: only at the end)
  c.eval_batches = 4
  c.sample = ml_collections.ConfigDict()  # --mode=sample / eval (mmdit_jax.sample.SampleConfig)
  c.sample.sampler = "euler"  # euler | heun | ddim | dpmpp_2m
  c.sample.steps = 28
  c.sample.guidance = 4.0
  c.sample.guidance_interval = (0.0, 1.0)
  c.sample.threshold = "none"  # none | static | dynamic (Imagen)
  c.sample.percentile = 0.995
  c.sample.seed = 0
  c.sample_every = 0  # sample evaluation during training every k steps and at the end (0: off)
  c.eval = ml_collections.ConfigDict()  # sample evaluation (mmdit_jax.config.EvalConfig)
  c.eval.num_samples = 64
  c.eval.fid_network = "demo"  # demo | inception | none
  c.eval.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth (or .safetensors) for "inception"
  c.eval.clip_score = ""  # 'package.module:factory' returning (embed_images, embed_texts)
  c.encoders = encoders_config()  # --mode=sample --prompt on a precomputed (non-demo) dataset
  c.halt_at_step = 0  # testing aid: checkpoint and exit at this step as if preempted (0: off)
  return c
