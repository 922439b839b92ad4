"""The precompute job: images + captions (or labels) → a training dataset of VAE latents (or, with
config.pixels, the images themselves for pixel-space models) and SD3 text embeddings, in the data pipeline's format.

python -m mmdit_jax.precompute --config=configs/precompute.py:input=MANIFEST,output=DIR,root=SD3_CKPT

The manifest (JSONL or CSV, image paths relative to it) is cut into fixed shards of consecutive
examples; host p encodes shards p, p + P, … on a mesh over its own devices, so hosts never wait on each
other. Each shard is written under a temporary name, renamed into place, then marked done by a small
JSON file; a re-run skips done shards, so an interrupted job finishes without redoing or duplicating
work. Once every shard is done, process 0 writes the null embeddings, bucket shapes and, last,
metadata.json. A re-run against another manifest or config is refused (precompute_plan.json).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageOps

from mmdit_jax import parallel
from mmdit_jax import paths as user_paths
from mmdit_jax.data import records, writer
from mmdit_jax.errors import EXIT_BAD_INPUT, UserError
from mmdit_jax.encoders import sd3
from mmdit_jax.metrics import format_eta, log

PLAN = "precompute_plan.json"
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Item:
  image: object  # absolute path, encoded image bytes, or a (h, w, 3) uint8 array
  caption: str | None
  label: int | None
  rejected: object = None  # a preference pair's rejected image (config.rejected_key), stored as latent_rejected


class TfdsItems:
  """The examples of a prepared (array_record) TFDS split as Items, read lazily by index."""

  def __init__(self, spec: str, data_dir: str, image_key: str, caption_key: str, label_key: str):
    import tensorflow_datasets as tfds
    from mmdit_jax.data import tfds_source
    name, split = tfds_source.parse(spec)
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise UserError(f"TFDS dataset {name!r} split {split!r} is not prepared as array_record in "
                              f"data_dir {data_dir!r} ({type(e).__name__}: {e})") from e
    keys = list(self.source.dataset_info.features)
    for key in (image_key, label_key or caption_key):
      if key not in keys:
        raise UserError(f"{spec}: no feature {key!r}; features: {keys}")
    self.keys = (image_key, caption_key, label_key)
    self.id = f"{spec}@{data_dir}:{len(self.source)}"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    raw = self.source[int(index)]
    image_key, caption_key, label_key = self.keys
    if label_key:
      return Item(raw[image_key], None, int(raw[label_key]))
    caption = raw[caption_key]
    return Item(raw[image_key], caption.decode() if isinstance(caption, bytes) else str(caption), None)


def read_manifest(path, image_key="image", caption_key="caption", label_key="", rejected_key="") -> list[Item]:
  """Items of a JSONL or CSV manifest (any epath location; images relative to it); errors name the file,
  the line and what is wrong. rejected_key: the column of preference pairs' rejected images (Diffusion-DPO)."""
  path = epath.Path(path)
  if not path.is_file():
    raise UserError(f"manifest {path} does not exist (expected a .jsonl or .csv file)")
  if path.suffix not in (".jsonl", ".csv"):
    raise UserError(f"manifest {path}: unknown format {path.suffix!r}; valid: .jsonl, .csv")
  with path.open("r") as f:
    if path.suffix == ".csv":
      rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]  # line 1 is the header
    else:
      rows = []
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append((i, json.loads(line)))
          except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e})") from e
  if not rows:
    raise UserError(f"manifest {path} has no entries")
  text_key = label_key or caption_key
  items, missing = [], []
  for line, row in rows:
    for key in (image_key, text_key, *([rejected_key] if rejected_key else [])):
      if not isinstance(row, dict) or key not in row:
        raise UserError(f"{path}:{line}: no {key!r} field (fields: {sorted(row) if isinstance(row, dict) else row})")
    found = []
    for key in (image_key, *([rejected_key] if rejected_key else [])):
      image = path.parent / str(row[key])
      if not user_paths.is_remote(image):
        image = image.resolve()
      if not image.is_file():
        missing.append(str(image))
      found.append(str(image))
    if label_key:
      try:
        label, caption = int(row[label_key]), None
      except ValueError as e:
        raise UserError(f"{path}:{line}: label {row[label_key]!r} is not an integer") from e
      if label < 0:
        raise UserError(f"{path}:{line}: label {label} is negative")
    else:
      label, caption = None, str(row[caption_key])
    items.append(Item(found[0], caption, label, found[1] if rejected_key else None))
  if missing:
    raise UserError(f"{len(missing)} images listed in {path} do not exist, e.g. {missing[:5]}")
  return items


def target_size(width: int, height: int, resolution: int, buckets) -> tuple[int, int]:
  """(h, w) in pixels: the square crop, or the bucket nearest in log aspect ratio."""
  if not buckets:
    return resolution, resolution
  ratio = math.log(width / height)
  return tuple(min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio)))


def _open(image):
  if isinstance(image, (bytes, np.bytes_)):
    return Image.open(io.BytesIO(image))
  if isinstance(image, np.ndarray):
    return Image.fromarray(image.astype(np.uint8))
  return Image.open(io.BytesIO(epath.Path(image).read_bytes()))


def load_image(image, resolution: int, buckets) -> np.ndarray:
  """(h, w, 3) float32 in [−1, 1]: resized to cover the target size, then centre-cropped.

  `image` is a file path, encoded bytes or a uint8 array (a TFDS feature)."""
  where = image if isinstance(image, str) else f"<{type(image).__name__}>"
  try:
    with _open(image) as im:
      im = ImageOps.exif_transpose(im).convert("RGB")
      h, w = target_size(im.width, im.height, resolution, buckets)
      scale = max(h / im.height, w / im.width)
      size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
      im = im.resize(size, Image.BICUBIC, reducing_gap=None)
      left, top = (size[0] - w) // 2, (size[1] - h) // 2
      im = im.crop((left, top, left + w, top + h))
      return np.asarray(im, np.float32) / 127.5 - 1.0
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"cannot read image {where}: {e}") from e


def _check_config(c, downsample: int | None = None):
  for field in ("input", "output"):
    if not c[field]:
      raise UserError(f"config.{field} is empty; see configs/precompute.py for the launch commands")
  if c.storage_dtype not in STORAGE_DTYPES:
    raise UserError(f"config.storage_dtype={c.storage_dtype!r}; valid: {STORAGE_DTYPES}")
  if c.get("compression", "uncompressed") not in writer.COMPRESSIONS:
    raise UserError(f"config.compression={c.compression!r}; valid: {list(writer.COMPRESSIONS)}")
  if c.batch_size < 1 or c.examples_per_shard < 1:
    raise UserError("config.batch_size and config.examples_per_shard must be positive")
  if downsample:
    sizes = [tuple(b) for b in c.buckets] or [(c.resolution, c.resolution)]
    bad = [s for s in sizes if s[0] % downsample or s[1] % downsample]
    if bad:
      raise UserError(f"image sizes {bad} are not multiples of the VAE's downsampling factor {downsample} "
                       "(config.resolution / config.buckets)")


def _fingerprint(source_id: str, c) -> str:
  h = hashlib.sha256(source_id.encode())
  fields = ("resolution", "buckets", "t5_tokens", "encoder_dtype", "storage_dtype", "sample_latents", "seed",
            "examples_per_shard", "image_key", "caption_key", "label_key")
  values = {k: c[k] for k in fields}
  if c.get("rejected_key", ""):  # (a field added later: datasets started before it still resume)
    values["rejected_key"] = c.rejected_key
  if c.get("pixels", False):  # (a field added later: latent datasets started before it still resume)
    values["pixels"] = True
  h.update(json.dumps(values, default=list, sort_keys=True).encode())
  encoders = c.encoders.to_dict()
  if not encoders.get("clip_skip"):  # (a default added later: datasets started before it still resume)
    encoders.pop("clip_skip", None)
  h.update(json.dumps(encoders, sort_keys=True).encode())
  return h.hexdigest()


def read_source(c):
  """(items, source id): a manifest's Items, or a lazy view of a TFDS split (input "tfds:NAME[:SPLIT]")."""
  if str(c.input).startswith("tfds:"):
    if c.get("rejected_key", ""):
      raise UserError(f"config.rejected_key={c.rejected_key!r}: preference pairs come from a manifest, not {c.input}")
    items = TfdsItems(c.input, c.get("tfds_data_dir", ""), c.image_key, c.caption_key, c.label_key)
    return items, items.id
  items = read_manifest(c.input, c.image_key, c.caption_key, c.label_key, c.get("rejected_key", ""))
  manifest = epath.Path(c.input)
  if not user_paths.is_remote(manifest):
    manifest = manifest.resolve()
  return items, f"{manifest}:{hashlib.sha256(manifest.read_bytes()).hexdigest()}"


def _shard_name(i: int) -> str:
  return f"shard-{i:05d}.array_record"


def _done_path(out: epath.Path, i: int) -> epath.Path:
  return out / f"shard-{i:05d}.done.json"


class _Progress:
  def __init__(self, total: int):
    self.total, self.done, self.start = total, 0, time.perf_counter()

  def update(self, n: int, what: str):
    self.done += n
    rate = self.done / max(time.perf_counter() - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate else float("inf")
    log(f"{what}: {self.done}/{self.total} examples ({self.done / max(self.total, 1):.0%}) | "
        f"{rate:.1f} ex/s | ETA {format_eta(eta)}")


def _batches(indices, size):
  for i in range(0, len(indices), size):
    yield indices[i:i + size]


def _encode_shard(items, start, c, autoencoder, text, dtype):
  """Encoded examples of one shard, in manifest order (autoencoder None, config.pixels: the images themselves)."""
  n = len(items)
  images = [load_image(it.image, c.resolution, c.buckets) for it in items]
  pairs = items[0].rejected is not None
  if pairs:  # preference pairs: the rejected images go through the same encoding, after the preferred ones
    rejected = [load_image(it.rejected, c.resolution, c.buckets) for it in items]
    bad = [str(it.rejected) for it, a, b in zip(items, images, rejected) if a.shape != b.shape]
    if bad:
      raise UserError(f"rejected images crop to another size than their preferred image (another aspect bucket): "
                      f"{bad[:3]}; a pair's images need the same aspect ratio")
    images = images + rejected
    n = len(images)
  latents: list = [img.astype(dtype) for img in images] if autoencoder is None else [None] * n
  by_size: dict = {}
  for i, img in enumerate(images):
    by_size.setdefault(img.shape, []).append(i)
  for shape, idx in by_size.items() if autoencoder is not None else ():
    f = autoencoder.cfg.downsample
    for batch in _batches(idx, c.batch_size):
      x = parallel.pad_batch(np.stack([images[i] for i in batch]), c.batch_size)
      noise = None
      if c.sample_latents:  # keyed by the example's global index: independent of batching, hosts, resume
        latent_shape = (shape[0] // f, shape[1] // f, autoencoder.cfg.latent_channels)
        noise = parallel.pad_batch(np.stack([np.random.default_rng((c.seed, start + i)).standard_normal(latent_shape)
                               for i in batch]).astype(np.float32), c.batch_size)
      z = autoencoder.encode(x, noise)
      for j, i in enumerate(batch):
        latents[i] = z[j].astype(dtype)
  examples = [{"latent": z} for z in latents[:len(items)]]
  if pairs:
    for ex, z in zip(examples, latents[len(items):]):
      ex["latent_rejected"] = z
  n = len(items)
  if text is None:
    for ex, it in zip(examples, items):
      ex["label"] = np.asarray(it.label, np.int32)
    return examples
  for batch in _batches(list(range(n)), c.batch_size):
    prompts = [items[i].caption for i in batch]
    context, pooled = text(prompts + [prompts[-1]] * (c.batch_size - len(prompts)))
    for j, i in enumerate(batch):
      examples[i]["context"], examples[i]["pooled"] = context[j].astype(dtype), pooled[j].astype(dtype)
  return examples


def run(c, process: tuple[int, int] | None = None) -> records.Metadata | None:
  """Runs (or resumes) the job of config `c`; returns the metadata once the dataset is complete, or
  None when this call stopped early (config.halt_after_shards) or is not process 0.

  `process` = (index, count) overrides jax's process index and count (to run hosts' shares one by one).
  """
  index, count = process or (jax.process_index(), jax.process_count())
  _check_config(c)
  out = epath.Path(c.output)
  if (out / records.METADATA).is_file():
    log(f"{out} is already a complete dataset; nothing to do")
    return records.load_metadata(out)
  items, source_id = read_source(c)
  shards = [(s, min(s + c.examples_per_shard, len(items))) for s in range(0, len(items), c.examples_per_shard)]
  plan = {"fingerprint": _fingerprint(source_id, c), "num_examples": len(items), "shards": shards,
          "input": str(c.input)}
  out.mkdir(parents=True, exist_ok=True)
  if (out / PLAN).is_file():
    old = json.loads((out / PLAN).read_text())
    if old["fingerprint"] != plan["fingerprint"]:
      raise UserError(f"{out} holds a precompute started with another manifest or config ({old['input']}); "
                       "use a new output directory, or delete this one to start over")
  elif index == 0:
    user_paths.write_json(out / PLAN, plan, indent=1)

  paths = sd3.EncoderPaths.from_config(c.encoders)
  mesh = parallel.make_mesh(c.mesh.ici.to_dict(), devices=jax.local_devices())
  rules = tuple(tuple(r) for r in c.sharding_rules)
  pixels = bool(c.get("pixels", False))
  autoencoder = None if pixels else sd3.Autoencoder(paths.vae, mesh, rules, dtype=c.encoder_dtype)
  if autoencoder is not None:
    _check_config(c, autoencoder.cfg.downsample)
  text = None if c.label_key else sd3.SD3TextEncoder(paths, mesh, rules, t5_tokens=c.t5_tokens, dtype=c.encoder_dtype,
                                                        clip_skip=c.encoders.get("clip_skip", 0))
  dtype = np.dtype(jax.numpy.bfloat16) if c.storage_dtype == "bfloat16" else np.dtype(c.storage_dtype)

  mine = [i for i in range(len(shards)) if i % count == index]
  todo = [i for i in mine if not _done_path(out, i).is_file()]
  if len(todo) < len(mine):
    log(f"resuming: {len(mine) - len(todo)} of this host's {len(mine)} shards are already done")
  progress = _Progress(sum(shards[i][1] - shards[i][0] for i in todo))
  for count, i in enumerate(todo):
    if c.halt_after_shards and count >= c.halt_after_shards:
      log(f"halting after {count} shards (config.halt_after_shards); re-run to finish")
      return None
    start, end = shards[i]
    examples = _encode_shard(items[start:end], start, c, autoencoder, text, dtype)
    features = _features(examples[0], bucketed=bool(c.buckets))
    n = writer.write_shard(out / _shard_name(i), features, examples, verify=True,
                           compression=c.get("compression", "uncompressed"))  # read back before it is done
    done = {"count": n, "shapes": [list(e["latent"].shape) for e in examples]}
    if c.label_key:
      done["max_label"] = max(int(e["label"]) for e in examples)
    user_paths.write_json(_done_path(out, i), done, indent=1)
    progress.update(n, f"shard {i + 1}/{len(shards)}")

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mmdit_jax.precompute: all shards written")
  if index != 0:
    return None
  missing = [i for i in range(len(shards)) if not _done_path(out, i).is_file()]
  if missing:
    raise RuntimeError(f"{out}: shards {missing[:10]} of {len(shards)} are not done (other hosts still "
                       "running or failed); re-run the job to finish them")
  return _finalize(out, c, shards, autoencoder, text, dtype)


def _features(example, bucketed: bool):
  feats = []
  for name, value in example.items():
    shape = tuple(value.shape)
    if name in ("latent", "latent_rejected") and bucketed:
      shape = (None, None, shape[-1])
    feats.append(records.Feature(name, shape, str(value.dtype)))
  return tuple(feats)


def _finalize(out, c, shards, autoencoder, text, dtype):
  done = [json.loads(_done_path(out, i).read_text()) for i in range(len(shards))]
  shapes = [s for d in done for s in d["shapes"]]
  example = {"latent": np.zeros(shapes[0], dtype)}
  if c.get("rejected_key", ""):  # preference pairs (Diffusion-DPO)
    example["latent_rejected"] = example["latent"]
  extras = {"name": out.name, "source": str(c.input), "source_fingerprint": json.loads((out / PLAN).read_text())["fingerprint"],
            "resolution": c.resolution, "buckets": [list(b) for b in c.buckets], "encoder_dtype": c.encoder_dtype}
  if autoencoder is None:  # pixel space: the images in [−1, 1]
    extras.update({"pixels": True, "latent_scale": 1.0, "latent_shift": 0.0, "encoders": {}})
  else:
    extras.update({"latent_scale": autoencoder.cfg.scaling_factor, "latent_shift": autoencoder.cfg.shift_factor,
                   "latents_normalised": True, "sample_latents": c.sample_latents,
                   "encoders": {"vae": autoencoder.describe()}})
  if c.get("rejected_key", ""):
    extras["preference_pairs"] = True
  null = None
  if text is None:
    example["label"] = np.zeros((), np.int32)
    extras["num_classes"] = max(d["max_label"] for d in done) + 1
  else:
    context, pooled = text([""])
    null = {"context": context[0].astype(dtype), "pooled": pooled[0].astype(dtype)}
    example.update(null)
    extras["encoders"].update(text.describe())
    extras["text_encoders"] = text.text_encoder_slices()
    extras["t5_tokens"] = c.t5_tokens
    extras["clip_skip"] = text.clip_skip
  meta = writer.finalize(out, _features(example, bool(c.buckets)),
                         [(_shard_name(i), d["count"]) for i, d in enumerate(done)], extras, null,
                         shapes if c.buckets else None)
  log(f"wrote {meta.num_examples} examples in {len(shards)} shards to {out}")
  return meta


def main(argv):
  del argv
  from mmdit_jax.parallel import distributed
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run(_CONFIG.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/precompute.py[:arg]")
  _COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
