"""Precompute job: images + captions (or labels) → VAE latents + SD3 text embeddings as a dataset.

Launch commands:
  # A folder of images with a captions manifest (JSONL lines {"image": "a.jpg", "caption": "…"}, or a CSV
  # with those columns; paths relative to the manifest), encoders from a diffusers SD3 checkpoint:
  python -m mmdit_jax.precompute --config=configs/precompute.py:input=/data/pics/captions.jsonl,\
output=/data/latents256,root=/ckpt/stable-diffusion-3-medium-diffusers
  # Aspect-ratio buckets instead of a square centre crop:
  python -m mmdit_jax.precompute --config=configs/precompute.py:input=…,output=…,root=… \
      --config.buckets="((256,256),(192,320),(320,192),(224,288),(288,224))"
  # Pixel-space data for Imagen's U-Nets (images in [−1, 1], no VAE; 256² also serves a 64→256 SR stage):
  python -m mmdit_jax.precompute --config=configs/precompute.py:input=…,output=/data/pixels256,root=…,resolution=256 \
      --config.pixels=True
  # Class-conditional data (a 'label' column instead of captions; no text encoders needed):
  python -m mmdit_jax.precompute --config=configs/precompute.py:input=…/labels.csv,output=…,root=… \
      --config.label_key=label
  # On every host of a pod slice (each host encodes its own shards; re-running resumes):
  python -m mmdit_jax.precompute --config=… --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
Then train with --config=configs/rf_lognorm.py:data=/data/latents256 (the model's latent, context and pooled
sizes must match the dataset; training checks them before compiling).
"""

import ml_collections

from mmdit_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, input="", output="", root="", resolution=256)
  c = ml_collections.ConfigDict()
  c.input = args.input  # manifest .jsonl / .csv (image paths relative to it), or "tfds:NAME[:SPLIT]"
  c.output = args.output  # dataset directory to create (or resume)
  c.tfds_data_dir = ""  # for input "tfds:NAME[:SPLIT]" (prepared with file_format=array_record)
  c.image_key = "image"
  c.caption_key = "caption"
  c.label_key = ""  # class-conditional: read integer labels from this column instead of captions
  c.rejected_key = ""  # preference pairs (Diffusion-DPO): this column's image is stored as latent_rejected
  c.resolution = args.resolution  # square centre crop, in pixels (a multiple of the VAE's downsampling)
  c.buckets = ()  # ((h, w), …) pixel sizes: each image goes to the bucket nearest its aspect ratio
  c.encoders = defaults.encoders_config()
  c.encoders.root = args.root  # a diffusers SD3 checkpoint directory (text_encoder*, tokenizer*, vae)
  c.t5_tokens = 77  # SD3 uses 77 (the diffusers pipeline's default is 256)
  c.encoder_dtype = "float32"  # compute dtype of the encoders (bfloat16 on TPU halves their memory)
  c.storage_dtype = "float16"
  c.sample_latents = False  # False: the posterior mean; True: a sample (seeded per example)
  c.pixels = False  # True: store the images themselves in [−1, 1], no VAE (pixel-space models: Imagen's U-Nets;
  # a super-resolution stage's low-res inputs are these images downsampled in the train step: config.sr)
  c.seed = 0
  c.batch_size = 16  # per host
  c.examples_per_shard = 1024
  c.compression = "uncompressed"  # of the shards' records: uncompressed | zstd | snappy | brotli (reads 2.8× slower for 8 % less)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = defaults.mesh_sizes(data=-1)  # over this host's devices, per mesh axis
  c.sharding_rules = defaults.DEFAULT_RULES
  c.halt_after_shards = 0  # testing aid: stop after this many shards as if interrupted (0: off)
  return c
