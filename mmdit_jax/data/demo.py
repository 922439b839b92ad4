"""The embedded demo dataset: compositional two-object scenes with captions, made from a seed.

"a red circle at the top left and a blue square at the bottom right" → a 32×32 RGB image in [−1, 1] (or the
same scene at any size: the cascade demo's 64² super-resolution data),
used directly as the latent (3 channels, scale 1, shift 0). A tiny frozen text encoder — two
"encoders" (clip-like and t5-like token tables with position codes) — gives context (32 tokens × 32)
and pooled (32) embeddings, so the whole SD3 text path, per-encoder dropout included, is exercised.
`check(image, caption)` tells which attributes an image gets right: the GenEval-style score.

The class-conditional variant (for DiT) has NUM_CLASSES = 12 labels, colour × shape: one object of the
label's colour and shape in a random quadrant; `class_accuracy` scores samples against their labels.
"""

from __future__ import annotations

import re

import numpy as np
from etils import epath

from mmdit_jax import paths
from mmdit_jax.data import records
from mmdit_jax.errors import UserError
from mmdit_jax.data.writer import DatasetWriter

SIZE = 32
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
MAX_TOKENS = 16
EMBED = 32
POOLED_PER_ENCODER = 16
VOCAB = ("<pad>", "a", "and", "at", "the", "top", "bottom", "left", "right", *COLOURS, *SHAPES)
DEMO_VERSION = 3  # in the cache path: bump when the data or the encoder changes (3: "pixels" in the metadata)
ENCODER_SEED = 1234  # the demo encoder is frozen: fixed tables, independent of the dataset seed
TEXT_ENCODERS = [
    {"name": "clip", "context_tokens": [0, MAX_TOKENS], "context_channels": [0, EMBED],
     "pooled": [0, POOLED_PER_ENCODER]},
    {"name": "t5", "context_tokens": [MAX_TOKENS, 2 * MAX_TOKENS], "context_channels": [0, EMBED],
     "pooled": [POOLED_PER_ENCODER, 2 * POOLED_PER_ENCODER]},
]
_CAPTION = re.compile(r"a (\w+) (\w+) at the (\w+ \w+)")


def caption(objects) -> str:
  return " and ".join(f"a {c} {s} at the {p}" for c, s, p in objects)


def parse_caption(text: str):
  objects = _CAPTION.findall(text)
  if not objects or any(c not in COLOURS or s not in SHAPES or p not in POSITIONS for c, s, p in objects):
    raise UserError(f"not a demo caption: {text!r} (expected e.g. 'a red circle at the top left and …')")
  return objects


def _hw(size) -> tuple[int, int]:
  """(height, width) of a demo image size: one side (square) or (h, w) (an aspect-ratio bucket)."""
  h, w = (size, size) if np.isscalar(size) else size
  return int(h), int(w)


def _shape_mask(shape, size, dy, dx, side=SIZE):
  """Boolean (h/2, w/2) mask of a shape centred in a quadrant of an image of side `side` (or (h, w)), offset
  by (dy, dx)."""
  qh, qw = (s // 2 for s in _hw(side))
  y, x = np.mgrid[0:qh, 0:qw] + 0.5
  cy, cx, r = qh / 2 + dy, qw / 2 + dx, size / 2
  if shape == "square":
    return (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
  if shape == "circle":
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
  # Triangle pointing up: the half-width grows linearly from apex to base.
  rel = (y - (cy - r)) / (2 * r)
  return (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= rel * r)


def render(objects, rng=None, size=SIZE) -> np.ndarray:
  """(h, w, 3) float32 image in [−1, 1] for size = side or (h, w); `rng` jitters each object by up to one pixel
  of the 32² scene. Any size renders the same scene (objects and jitter scaled by min(h, w)/32; the same draws
  from rng), so the images of one seed at 32² and 64² are the low- and high-resolution views of one scene (the
  cascade demo), and a wide or tall size (an aspect bucket) places the objects in its four quadrants."""
  h, w = _hw(size)
  img = -np.ones((h, w, 3), np.float32)
  qh, qw, k = h // 2, w // 2, min(h, w) / SIZE
  for colour, shape, pos in objects:
    dy, dx = (rng.integers(-1, 2, 2) if rng is not None else (0, 0))
    mask = _shape_mask(shape, 11 * k, dy * k, dx * k, (h, w))
    r0, c0 = POSITIONS[pos]
    img[r0 * qh:(r0 + 1) * qh, c0 * qw:(c0 + 1) * qw][mask] = COLOURS[colour]
  return img


NUM_CLASSES = len(COLOURS) * len(SHAPES)  # class-conditional demo: label = colour index · 3 + shape index


def class_attributes(label: int) -> tuple[str, str]:
  """(colour, shape) of a class label of the class-conditional demo."""
  if not 0 <= label < NUM_CLASSES:
    raise ValueError(f"demo class label {label} outside 0..{NUM_CLASSES - 1}")
  return list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def class_scene(label: int, rng):
  colour, shape = class_attributes(label)
  return [(colour, shape, list(POSITIONS)[rng.integers(len(POSITIONS))])]


def random_scene(rng):
  positions = rng.choice(list(POSITIONS), size=2, replace=False)
  colours = list(COLOURS)
  return [(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], str(p)) for p in positions]


class DemoTextEncoder:
  """A frozen toy text encoder pair with token tables and position codes; pooled = projected mean.

  Like SD3's encoders, the two differ: the clip-like one sees each word alone (plus its position), the
  t5-like one is contextual — each word of an object phrase ("a red circle at the top left") also
  carries the mean of its phrase's word vectors, as a bidirectional encoder's states would, so the
  binding of colour and shape to position is present in the text states.
  """

  def __init__(self, seed: int = ENCODER_SEED):
    rng = np.random.default_rng(seed)
    self.tables = [rng.standard_normal((len(VOCAB), EMBED)) / np.sqrt(EMBED) for _ in TEXT_ENCODERS]
    self.tables = [np.concatenate([np.zeros((1, EMBED)), t[1:]]) for t in self.tables]  # <pad> = 0
    self.proj = [rng.standard_normal((EMBED, POOLED_PER_ENCODER)) / np.sqrt(EMBED) for _ in TEXT_ENCODERS]
    pos = np.arange(MAX_TOKENS)[:, None] / 10000 ** (np.arange(0, EMBED, 2) / EMBED)[None]
    self.positions = np.concatenate([np.sin(pos), np.cos(pos)], axis=1) * 0.5  # (MAX_TOKENS, EMBED)

  def tokenize(self, text: str) -> np.ndarray:
    words = text.split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
      raise UserError(f"demo encoder: unknown words {unknown}; vocabulary: {list(VOCAB[1:])}")
    if len(words) > MAX_TOKENS:
      raise UserError(f"demo encoder: {len(words)} words exceed {MAX_TOKENS} tokens")
    ids = np.zeros(MAX_TOKENS, np.int64)
    ids[:len(words)] = [VOCAB.index(w) for w in words]
    return ids

  @staticmethod
  def _phrases(ids) -> np.ndarray:
    """Phrase index of each token: phrases are separated by 'and'; padding and 'and' get −1."""
    and_id = VOCAB.index("and")
    out, k = np.full(len(ids), -1), 0
    for i, t in enumerate(ids):
      if t == and_id:
        k += 1
      elif t > 0:
        out[i] = k
    return out

  def __call__(self, text: str):
    """(context (32, 32), pooled (32,)) float16 for one caption; '' gives the null embedding."""
    ids = self.tokenize(text)
    valid = (ids > 0)[:, None]
    phrases = self._phrases(ids)
    contexts, pooled = [], []
    for e, (table, proj) in enumerate(zip(self.tables, self.proj)):
      tokens = (table[ids] + self.positions) * valid  # (MAX_TOKENS, EMBED)
      if TEXT_ENCODERS[e]["name"] == "t5":
        for k in set(phrases[phrases >= 0]):
          members = phrases == k
          tokens[members] += table[ids[members]].mean(0)
      contexts.append(tokens)
      pooled.append((tokens.sum(0) / max(1, valid.sum())) @ proj)
    return (np.concatenate(contexts).astype(np.float16), np.concatenate(pooled).astype(np.float16))


FEATURES = (
    records.Feature("latent", (SIZE, SIZE, 3), "float16"),
    records.Feature("context", (2 * MAX_TOKENS, EMBED), "float16"),
    records.Feature("pooled", (2 * POOLED_PER_ENCODER,), "float16"),
)


def features(size: int = SIZE, bucketed: bool = False):
  shape = (None, None, 3) if bucketed else (size, size, 3)
  return (records.Feature("latent", shape, "float16"), *FEATURES[1:])


def text_writer(path, features, name: str, encoder: "DemoTextEncoder", extras: dict | None = None, *,
                examples_per_shard: int = 1024, keep_existing: bool = False) -> DatasetWriter:
  """A DatasetWriter (overwriting) for records of the text demo's kind — pixel-space images with `encoder`'s
  embeddings: the metadata every such dataset carries, `extras` among it, and the encoder's null embeddings."""
  null_context, null_pooled = encoder("")
  meta = {"name": name, "pixels": True, "latent_scale": 1.0, "latent_shift": 0.0, **(extras or {}),
          "encoders": {"demo_text": f"mmdit_jax.data.demo.DemoTextEncoder(seed={ENCODER_SEED})"},
          "text_encoders": TEXT_ENCODERS}
  return DatasetWriter(path, features, meta, examples_per_shard=examples_per_shard,
                       null_embeddings={"context": null_context, "pooled": null_pooled}, overwrite=True,
                       keep_existing=keep_existing)


def write_demo(path, num_examples: int, seed: int, examples_per_shard: int = 1024, size: int = SIZE,
               buckets=()):
  """Writes `num_examples` scenes from `seed` at size × size; the same seed gives byte-identical files, and
  the same scenes at every size. buckets ((h, w), …): each scene at one of these sizes instead, drawn per
  example (aspect-ratio buckets: the latents' shape varies, one bucket per batch in training)."""
  buckets = tuple(tuple(b) for b in buckets)
  rng = np.random.default_rng(seed)
  encoder = DemoTextEncoder()
  extras = {"seed": seed, **({"buckets": [list(b) for b in buckets]} if buckets else {})}
  with text_writer(path, features(size, bucketed=bool(buckets)), f"demo_shapes-v{DEMO_VERSION}", encoder, extras,
                   examples_per_shard=examples_per_shard, keep_existing=True) as w:
    for _ in range(num_examples):
      objects = random_scene(rng)
      hw = buckets[int(rng.integers(len(buckets)))] if buckets else size
      context, pooled = encoder(caption(objects))
      w.write({"latent": render(objects, rng, hw).astype(np.float16), "context": context, "pooled": pooled})
  return records.load_metadata(path)


CLASS_FEATURES = (records.Feature("latent", (SIZE, SIZE, 3), "float16"), records.Feature("label", (), "int32"))


def write_demo_classes(path, num_examples: int, seed: int, examples_per_shard: int = 1024):
  """Writes `num_examples` single-object scenes with their class labels (colour × shape)."""
  rng = np.random.default_rng(seed)
  extras = {"name": f"demo_classes-v{DEMO_VERSION}", "pixels": True, "latent_scale": 1.0, "latent_shift": 0.0, "seed": seed,
            "num_classes": NUM_CLASSES}
  with DatasetWriter(path, CLASS_FEATURES, extras, examples_per_shard=examples_per_shard, overwrite=True,
                     keep_existing=True) as w:
    for _ in range(num_examples):
      label = int(rng.integers(NUM_CLASSES))
      w.write({"latent": render(class_scene(label, rng), rng).astype(np.float16), "label": np.int32(label)})
  return records.load_metadata(path)


FLAWS = ("colour", "shape", "position", "count")  # what a rejected demo scene gets wrong


def rejected_scene(objects, rng, flaws=FLAWS):
  """The scene with one flaw drawn from `flaws`: one object's colour or shape changed, one object moved to an
  empty quadrant, or one object left out (count) — an image that no longer satisfies the caption of `objects`."""
  bad = [f for f in flaws if f not in FLAWS]
  if bad or not flaws:
    raise ValueError(f"demo flaws {list(flaws)}; valid: {list(FLAWS)}")
  objects = [tuple(o) for o in objects]
  i = int(rng.integers(len(objects)))
  kind = flaws[int(rng.integers(len(flaws)))]
  if kind == "count":
    return objects[:i] + objects[i + 1:]
  colour, shape, pos = objects[i]
  if kind == "colour":
    colour = str(rng.choice([c for c in COLOURS if c != colour]))
  elif kind == "shape":
    shape = str(rng.choice([s for s in SHAPES if s != shape]))
  else:
    taken = {p for _, _, p in objects}
    pos = str(rng.choice([p for p in POSITIONS if p not in taken]))
  objects[i] = (colour, shape, pos)
  return objects


def pair_features(size: int = SIZE):
  return (*features(size), records.Feature("latent_rejected", (size, size, 3), "float16"))


def write_demo_pairs(path, num_examples: int, seed: int, examples_per_shard: int = 1024, size: int = SIZE,
                     flaws=FLAWS):
  """Preference pairs for Diffusion-DPO: per caption the scene it describes ("latent", preferred) and the same
  scene with one flaw of `flaws` ("latent_rejected", rejected_scene), rendered with the same jitter."""
  rng = np.random.default_rng(seed)
  encoder = DemoTextEncoder()
  extras = {"seed": seed, "preference_pairs": True, "flaws": list(flaws)}
  with text_writer(path, pair_features(size), f"demo_pairs-v{DEMO_VERSION}", encoder, extras,
                   examples_per_shard=examples_per_shard, keep_existing=True) as w:
    for _ in range(num_examples):
      objects = random_scene(rng)
      bad = rejected_scene(objects, rng, flaws)
      context, pooled = encoder(caption(objects))
      state = rng.bit_generator.state  # the same jitter draws for both images
      good_img = render(objects, rng, size)
      after = rng.bit_generator.state
      rng.bit_generator.state = state
      bad_img = render(bad, rng, size)
      rng.bit_generator.state = after  # (the stream continues as after the preferred image)
      w.write({"latent": good_img.astype(np.float16), "context": context, "pooled": pooled,
               "latent_rejected": bad_img.astype(np.float16)})
  return records.load_metadata(path)


DEMO_KINDS = {"text": ("demo_shapes", write_demo), "classes": ("demo_classes", write_demo_classes),
              "pairs": ("demo_pairs", write_demo_pairs)}


def default_cache_dir() -> epath.Path:
  return paths.cache_dir()


def ensure_demo(split: str = "train", num_examples: int | None = None, seed: int = 0, root=None,
                kind: str = "text", size: int = SIZE, buckets=()) -> str:
  """Path of a demo dataset split ('train' or 'validation'), writing it on first use.

  kind: 'text' (two-object scenes with captions, for MM-DiT), 'classes' (one object, labelled by
  colour × shape, for class-conditional DiT) or 'pairs' (captions with a preferred and a rejected scene, DPO).
  buckets ((h, w), …; text scenes): each scene at one of these sizes (SD3's mixed-aspect hi-res stage). size: the images' side (text scenes; 64 for the cascade demo's
  super-resolution stage — the same scenes as at 32).
  """
  sizes = {"train": 8192, "validation": 512}
  if split not in sizes:
    raise ValueError(f"unknown demo split {split!r}; valid: {sorted(sizes)}")
  if kind not in DEMO_KINDS:
    raise ValueError(f"unknown demo kind {kind!r}; valid: {sorted(DEMO_KINDS)}")
  n = num_examples or sizes[split]
  split_seed = seed * 2 + (split == "validation")  # disjoint streams for the two splits
  if size != SIZE and kind == "classes":
    raise ValueError(f"demo size {size}: only the text scenes render at sizes other than {SIZE}")
  if size < 8 or size % 8:
    raise ValueError(f"demo size {size} must be a multiple of 8")
  name, write = DEMO_KINDS[kind]
  suffix = "" if size == SIZE else f"-{size}px"
  extra = {}
  if buckets:
    if kind != "text":
      raise ValueError(f"demo buckets: only the text scenes come in aspect buckets, not {kind!r}")
    bad = [b for b in buckets if len(b) != 2 or min(b) < 8 or b[0] % 8 or b[1] % 8]
    if bad:
      raise ValueError(f"demo buckets {bad}: (h, w) pairs of multiples of 8")
    suffix += "-buckets" + "_".join(f"{h}x{w}" for h, w in buckets)
    extra["buckets"] = tuple(tuple(b) for b in buckets)
  path = epath.Path(root or default_cache_dir()) / f"{name}-v{DEMO_VERSION}-{split}-n{n}-seed{seed}{suffix}"
  if not (path / records.METADATA).is_file():
    write(path, n, split_seed, **({"size": size} if size != SIZE else {}), **extra)
  return str(path)


# The checker.
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def _quadrant(img, pos):
  qh, qw = img.shape[0] // 2, img.shape[1] // 2
  r0, c0 = POSITIONS[pos]
  return img[r0 * qh:(r0 + 1) * qh, c0 * qw:(c0 + 1) * qw]


def check(image: np.ndarray, text: str) -> dict:
  """Per-attribute accuracy of one image for its caption: position, colour, shape and all three.

  position: the named quadrant holds one object-sized blob and unnamed quadrants are empty;
  colour: the blob's mean colour is nearest to the named one; shape: its bounding-box fill ratio is
  nearest to the named shape's (square 1, circle π/4, triangle 1/2).
  """
  image = np.asarray(image, np.float32)
  objects = parse_caption(text)
  named = {p for _, _, p in objects}
  empty_ok = all((_quadrant(image, p).max(-1) > 0).mean() < 0.08 for p in POSITIONS if p not in named)
  scores = {"position": [], "colour": [], "shape": [], "all": []}
  for colour, shape, pos in objects:
    quad = _quadrant(image, pos)
    mask = quad.max(-1) > 0
    frac = mask.mean()
    present = 0.1 <= frac <= 0.6
    pos_ok = bool(present and empty_ok)
    colour_ok = shape_ok = False
    if present:
      mean = quad[mask].mean(0)
      colour_ok = list(COLOURS)[int(np.argmin(((_PALETTE - mean) ** 2).sum(1)))] == colour
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      fill = mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
      shape_ok = min(_FILL, key=lambda s: abs(_FILL[s] - fill)) == shape
    for k, v in (("position", pos_ok), ("colour", colour_ok), ("shape", shape_ok),
                 ("all", pos_ok and colour_ok and shape_ok)):
      scores[k].append(float(v))
  return {k: float(np.mean(v)) for k, v in scores.items()}


def compositional_accuracy(images, captions) -> dict:
  """Mean of `check` over a set of images and their captions."""
  results = [check(img, cap) for img, cap in zip(images, captions)]
  return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def class_accuracy(images, labels) -> dict:
  """Class-conditional demo: per image, whether the fullest quadrant holds an object of the label's
  colour and shape ('colour', 'shape', 'all'), averaged."""
  scores = {"colour": [], "shape": [], "all": []}
  for image, label in zip(images, labels):
    colour, shape = class_attributes(int(label))
    image = np.asarray(image, np.float32)
    pos = max(POSITIONS, key=lambda p: (_quadrant(image, p).max(-1) > 0).mean())
    result = check(image, caption([(colour, shape, pos)]))
    scores["colour"].append(result["colour"])
    scores["shape"].append(result["shape"])
    scores["all"].append(float(result["colour"] and result["shape"]))
  return {k: float(np.mean(v)) for k, v in scores.items()}
