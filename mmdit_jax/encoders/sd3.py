"""SD3 conditioning: where the encoders live on disk, and prompts → (context, pooled).

context = [CLIP-L ‖ bigG penultimate states, zero-padded on channels to D] followed on the sequence by
T5's states (77 + 77 = 154 tokens at D = 4096); pooled = [CLIP-L ‖ bigG] (768 + 1280 = 2048). Without
T5 its tokens are zeros, as SD3 does at inference. `text_encoder_slices` tells the data pipeline which
slice each encoder owns, for SD3's per-encoder dropout to null (empty-prompt) embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mmdit_jax import parallel
from mmdit_jax.errors import UserError
from mmdit_jax.encoders import convert, vae
from mmdit_jax.encoders.tokenizer import Tokenizer
from mmdit_jax.model import api

# Role → (weights, tokenizer) sub-directories of a diffusers StableDiffusion3Pipeline checkpoint.
SD3_LAYOUT = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
              "t5": ("text_encoder_3", "tokenizer_3"), "vae": ("vae", None)}
CLIP_TOKENS = 77
REFERENCE_T5_CHARS = 226  # SD3's reference code gives T5 the prompt's first 226 characters


@dataclasses.dataclass(frozen=True)
class EncoderPaths:
  """Weights and tokenizer directories per role; "" for t5 means no T5 (zeros in its place)."""
  clip_l: str
  clip_l_tokenizer: str
  clip_g: str
  clip_g_tokenizer: str
  t5: str
  t5_tokenizer: str
  vae: str

  @classmethod
  def from_config(cls, c) -> "EncoderPaths":
    """From a ConfigDict with `root` (an SD3 diffusers checkpoint) and optional per-role overrides;
    `tokenizers` (a directory laid out as a diffusers SD3 checkpoint's tokenizer*/ folders) names the
    tokenizers of weights that come without them (an SD3 single-file checkpoint)."""
    root = epath.Path(c.get("root", "") or ".")
    tokenizers = c.get("tokenizers", "") or c.get("root", "")
    fields = {}
    for role, (weights, tok) in SD3_LAYOUT.items():
      fields[role] = c.get(role, "") or (str(root / weights) if c.get("root") else "")
      if tok:
        fields[f"{role}_tokenizer"] = c.get(f"{role}_tokenizer", "") or (
            str(epath.Path(tokenizers) / tok) if tokenizers else fields[role])
    for role, (_, tok) in SD3_LAYOUT.items():
      where = fields.get(f"{role}_tokenizer", "")
      if tok and fields[role] and where and where.endswith(".safetensors"):
        raise UserError(f"config.encoders: the {role} weights {fields[role]} come without a tokenizer (an SD3 "
                        f"single-file checkpoint bundles none): set config.encoders.tokenizers to a directory with "
                        f"{', '.join(t + '/' for _, t in SD3_LAYOUT.values() if t)} (e.g. a diffusers SD3 checkpoint), "
                        f"or config.encoders.{role}_tokenizer")
    if c.get("no_t5", False):
      fields["t5"] = fields["t5_tokenizer"] = ""
    paths = cls(**fields)
    missing = [r for r in ("clip_l", "clip_g", "vae") if not getattr(paths, r)]
    if missing:
      raise UserError(f"encoder paths missing for {missing}: set config.encoders.root to a diffusers SD3 "
                       f"checkpoint directory, or config.encoders.<role> for each of {list(SD3_LAYOUT)}")
    for role in ("clip_l", "clip_g", "t5", "vae"):
      p = getattr(paths, role)
      if p and not epath.Path(p).exists():
        raise UserError(f"config.encoders: {role} weights {p} do not exist")
    return paths


def weights_sha256(path) -> str:
  """SHA-256 over the .safetensors files of a weights file or directory (sorted by name)."""
  path = epath.Path(path)
  h = hashlib.sha256()
  for f in ([path] if path.is_file() else sorted(path.glob("*.safetensors"))):
    with f.open("rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 24), b""):
        h.update(chunk)
  return h.hexdigest()


def _shardings_for(mesh, rules):
  return lambda cfg: api.param_shardings(cfg, mesh, rules)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _encode_text(cfg_l, cfg_g, cfg_t5, d, t5_tokens, clip_skip, params, ids_l, ids_g, ids_t5):
  """Token ids → (context (B, 77 + t5_tokens, d), pooled); compiled once per encoder configs and shapes."""
  h_l, p_l = api.apply(cfg_l, params["clip_l"], ids_l, clip_skip=clip_skip)
  h_g, p_g = api.apply(cfg_g, params["clip_g"], ids_g, clip_skip=clip_skip)
  clip = jnp.concatenate([h_l, h_g], -1)  # (B, 77, D_l + D_g)
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, d - clip.shape[-1])))
  if cfg_t5 is not None:
    t5 = api.apply(cfg_t5, params["t5"], ids_t5)
    t5 = jnp.pad(t5, ((0, 0), (0, 0), (0, d - t5.shape[-1])))
  else:
    t5 = jnp.zeros((clip.shape[0], t5_tokens, d), clip.dtype)
  return jnp.concatenate([clip, t5], 1), jnp.concatenate([p_l, p_g], -1)  # (B, T, d), (B, P)


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(cfg, params, images, noise):
  return vae.encode_images(cfg, params, images, noise)


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(cfg, params, latents):
  return vae.decode_latents(cfg, params, latents)


def _check_identity_projection(params, path):
  """SD3's reference pools CLIP-L without its text_projection, diffusers' pipeline through it: the same for
  SD3's weights, whose CLIP-L projection is the identity. Any other projection is named, not ignored quietly."""
  proj = params.get("text_projection") if isinstance(params, dict) else None
  kernel = None if proj is None else np.asarray(jax.device_get(proj["kernel"]), np.float32)
  if kernel is not None and (kernel.shape[0] != kernel.shape[1] or not np.allclose(kernel, np.eye(len(kernel)),
                                                                                     atol=1e-6)):
    if jax.process_index() == 0:  # (the encoders sit below mmdit_jax.metrics: the same line format)
      print(f"warning: {path}: CLIP-L's text_projection is not the identity; the pooled vector is taken unprojected, as "
            "SD3's reference code does (diffusers' pipeline would project it, and its images would differ)",
            file=sys.stderr, flush=True)


class SD3TextEncoder:
  """Prompts → SD3 (context (B, 77 + t5_tokens, D), pooled (B, P)) with CLIP-L, bigG and T5 on a mesh.

  t5_truncate=False is SD3's reference tokenisation of T5 (sd3_infer / other_impls.T5XXLTokenizer): the
  prompt's first 226 characters, not truncated, padded to at least t5_tokens (77 there), so a long prompt
  gets a longer context; `t5_length(prompt)` says how long. clip_skip as diffusers' pipeline (both CLIPs).
  """

  def __init__(self, paths: EncoderPaths, mesh, rules=parallel.DEFAULT_RULES, *, t5_tokens: int = 77,
               dtype: str = "float32", context_dim: int | None = None, clip_skip: int = 0,
               t5_truncate: bool = True):
    shard = _shardings_for(mesh, rules)
    self.mesh = mesh
    self.cfg_l, params_l = convert.load_clip(paths.clip_l, shard, part="clip_l", pooled="unprojected", dtype=dtype)
    self.cfg_g, params_g = convert.load_clip(paths.clip_g, shard, part="clip_g", pooled="projected", dtype=dtype)
    _check_identity_projection(params_l, paths.clip_l)
    self.tok_l = Tokenizer(paths.clip_l_tokenizer, CLIP_TOKENS)
    self.tok_g = Tokenizer(paths.clip_g_tokenizer, CLIP_TOKENS)
    self.params = {"clip_l": params_l, "clip_g": params_g}
    self.cfg_t5 = None
    if paths.t5:
      self.cfg_t5, self.params["t5"] = convert.load_t5(paths.t5, shard, dtype=dtype)
      self.tok_t5 = Tokenizer(paths.t5_tokenizer, t5_tokens)
    self.t5_tokens, self.t5_truncate, self.clip_skip = t5_tokens, t5_truncate, clip_skip
    if not 0 <= clip_skip < min(self.cfg_l.depth, self.cfg_g.depth):
      raise UserError(f"clip_skip={clip_skip}: the CLIP encoders have {self.cfg_l.depth} and {self.cfg_g.depth} "
                      f"layers, so 0..{min(self.cfg_l.depth, self.cfg_g.depth) - 1}")
    clip_width = self.cfg_l.width + self.cfg_g.width
    natural = max(clip_width, self.cfg_t5.width) if self.cfg_t5 else None
    self.context_dim = context_dim or natural
    if self.context_dim is None:
      raise ValueError("without T5 the context width is unknown: pass context_dim (the model's context_dim)")
    if self.context_dim < clip_width or (self.cfg_t5 and self.context_dim < self.cfg_t5.width):
      raise ValueError(f"context_dim {self.context_dim} cannot hold CLIP ({clip_width}) and T5 "
                       f"({self.cfg_t5.width if self.cfg_t5 else 'absent'}) states")
    self.pooled_dim = self.cfg_l.pooled_dim + self.cfg_g.pooled_dim
    self.paths = paths

  def _t5_text(self, prompt: str) -> str:
    return prompt if self.t5_truncate else prompt[:REFERENCE_T5_CHARS]

  def t5_length(self, prompt: str) -> int:
    """T5's token count for `prompt`: t5_tokens, or without truncation max(t5_tokens, its token count)."""
    if self.t5_truncate or self.cfg_t5 is None:
      return self.t5_tokens
    return max(self.t5_tokens, self.tok_t5.count(self._t5_text(prompt)))

  def __call__(self, prompts, t5_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 numpy (context, pooled) for a list of prompts, T5 padded to `t5_length` (default: the
    prompts' one t5_length — without T5 truncation, prompts of different lengths need it given)."""
    prompts = list(prompts)
    lengths = sorted({self.t5_length(p) for p in prompts})
    if t5_length is None and len(lengths) > 1:
      raise ValueError(f"prompts of T5 lengths {lengths} cannot share a batch: encode each length's prompts "
                       "apart (t5_length), or pass the t5_length to pad them all to")
    if t5_length is not None and lengths and (lengths[-1] > t5_length or (self.t5_truncate and t5_length != self.t5_tokens)):
      raise ValueError(f"t5_length={t5_length} cannot hold these prompts' T5 lengths {lengths}")
    n_t5 = t5_length if t5_length is not None else lengths[0] if lengths else self.t5_tokens
    ids_l, ids_g = self.tok_l(prompts), self.tok_g(prompts)
    ids_t5 = (self.tok_t5([self._t5_text(p) for p in prompts], n_t5) if self.cfg_t5 is not None
              else np.zeros((len(prompts), 1), np.int32))
    with jax.set_mesh(self.mesh):
      context, pooled = _encode_text(self.cfg_l, self.cfg_g, self.cfg_t5, self.context_dim, n_t5, self.clip_skip,
                                     self.params, *(parallel.put_rows(i, self.mesh) for i in (ids_l, ids_g, ids_t5)))
    n = len(prompts)
    return np.asarray(context)[:n], np.asarray(pooled)[:n]

  def text_encoder_slices(self) -> list[dict]:
    """Per-encoder slices of context and pooled (metadata for the pipeline's text dropout)."""
    wl, wg = self.cfg_l.width, self.cfg_g.width
    pl, pg = self.cfg_l.pooled_dim, self.cfg_g.pooled_dim
    out = [{"name": "clip_l", "context_tokens": [0, CLIP_TOKENS], "context_channels": [0, wl],
            "pooled": [0, pl]},
           {"name": "clip_g", "context_tokens": [0, CLIP_TOKENS], "context_channels": [wl, wl + wg],
            "pooled": [pl, pl + pg]}]
    if self.cfg_t5 is not None:
      out.append({"name": "t5", "context_tokens": [CLIP_TOKENS, CLIP_TOKENS + self.t5_tokens],
                  "context_channels": [0, self.cfg_t5.width]})
    return out

  def describe(self) -> dict:
    """Encoder names, paths, weight hashes, configs and dtypes, for dataset metadata."""
    out = {}
    for role, cfg in (("clip_l", self.cfg_l), ("clip_g", self.cfg_g), ("t5", self.cfg_t5)):
      if cfg is not None:
        path = getattr(self.paths, role)
        out[role] = {"path": str(path), "tokenizer": getattr(self.paths, f"{role}_tokenizer"),
                     "sha256": weights_sha256(path), "config": dataclasses.asdict(cfg)}
    return out


class Autoencoder:
  """The VAE on a mesh: images [−1, 1] ↔ normalised latents (vae.to_latents / from_latents)."""

  def __init__(self, path, mesh, rules=parallel.DEFAULT_RULES, dtype: str = "float32"):
    self.mesh = mesh
    self.path = str(path)
    self.cfg, self.params = convert.load_vae(path, _shardings_for(mesh, rules), dtype=dtype)

  def encode(self, images, noise=None) -> np.ndarray:
    """(B, H, W, 3) in [−1, 1] → normalised latents (B, H/f, W/f, C): the posterior mean, or a sample
    with the given standard-normal `noise`."""
    with jax.set_mesh(self.mesh):
      noise = None if noise is None else parallel.put_rows(noise, self.mesh)
      return np.asarray(_vae_encode(self.cfg, self.params, parallel.put_rows(images, self.mesh), noise))[:len(images)]

  def decode(self, latents) -> np.ndarray:
    with jax.set_mesh(self.mesh):
      return np.asarray(_vae_decode(self.cfg, self.params, parallel.put_rows(latents, self.mesh)))[:len(latents)]

  def describe(self) -> dict:
    return {"path": self.path, "sha256": weights_sha256(self.path), "config": dataclasses.asdict(self.cfg)}
