"""CLIP score and CMMD in JAX, from a transformers CLIPModel directory (weights, config.json, tokenizer files;
e.g. openai/clip-vit-large-patch14 or -336, the tower CMMD's authors use) or an OpenCLIP one
(open_clip_model.safetensors, open_clip_config.json and the tokenizer files, e.g. LAION's ViT-bigG/14).

Both towers are the project's Flax encoders (encoders.clip for text, encoders.clip_vision for images) read
through their converters; the images are the project's (B, H, W, 3) in [−1, 1] and go through CLIP's
preprocessing. `config.eval.clip = DIR` puts `clip_score` (with captions) and `cmmd` (against the
evaluation's reference images) into every sample evaluation, in training too.
"""

from __future__ import annotations

import jax
import numpy as np

from mmdit_jax import fid, parallel
from mmdit_jax.encoders import clip_vision, convert
from mmdit_jax.encoders.tokenizer import Tokenizer
from mmdit_jax.model import api


class CLIPMetrics:
  def __init__(self, path, batch_size: int = 32):
    self.path, self.batch_size = str(path), batch_size
    self.vision_cfg, self.vision_params = convert.load_clip_vision(path)
    self.text_cfg, self.text_params = convert.load_clip(path)
    if self.text_cfg.pooled != "projected" or self.text_cfg.projection_dim != self.vision_cfg.projection_dim:
      raise ValueError(f"{path}: the text and image towers do not share one projection "
                       f"({self.text_cfg.projection_dim} vs {self.vision_cfg.projection_dim}); give a whole CLIPModel")
    self.tokenizer = Tokenizer(path, self.text_cfg.max_tokens)
    vcfg, tcfg = self.vision_cfg, self.text_cfg
    self._images = jax.jit(lambda p, x: clip_vision.embed_images(vcfg, p, x))
    self._texts = jax.jit(lambda p, ids: api.apply(tcfg, p, ids)[1])

  def embed_images(self, images) -> np.ndarray:
    """(B, H, W, 3) in [−1, 1] → (B, projection_dim) image embeddings (unnormalised), in fixed-size batches."""
    return fid.features(lambda x: self._images(self.vision_params, x), images, self.batch_size)

  def embed_texts(self, texts) -> np.ndarray:
    ids = self.tokenizer(list(texts))
    out = []
    for i in range(0, len(ids), self.batch_size):
      chunk = ids[i:i + self.batch_size]
      out.append(np.asarray(self._texts(self.text_params, parallel.pad_batch(chunk, self.batch_size)))[:len(chunk)])
    return np.concatenate(out)

  def clip_score(self, images, texts) -> float:
    """Mean of 100 · max(cos(image, text), 0) over the pairs (Hessel et al. 2021)."""
    return fid.clip_score(self.embed_images, self.embed_texts, images, texts)

  def cmmd(self, generated, reference) -> float:
    return fid.cmmd(self.embed_images(generated), self.embed_images(reference))
