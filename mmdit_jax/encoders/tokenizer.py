"""Tokenizers from local directories (transformers' CLIP and T5 tokenizers; nothing is downloaded).

SD3 pads every prompt to a fixed length and truncates longer ones, so each encoder compiles once.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from mmdit_jax import paths
from mmdit_jax.errors import UserError

# Files that make a directory loadable by transformers.AutoTokenizer, per kind.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


class Tokenizer:
  """texts → int32 ids (B, max_length), padded and truncated as SD3 does."""

  def __init__(self, path, max_length: int):
    import transformers  # heavy: imported when a tokenizer is actually needed
    path = epath.Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
      raise UserError(f"no tokenizer at {path}: expected a directory with one of {TOKENIZER_FILES} "
                              "(e.g. the tokenizer/ folder of a diffusers SD3 checkpoint)")
    self.path, self.max_length = path, max_length
    local = paths.local_copy(path, paths.cache_dir())  # a gs:// tokenizer: its mount, or a local copy
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)

  def __call__(self, texts, length: int | None = None) -> np.ndarray:
    """(B, length) ids, each text padded to `length` (default max_length) and cut there."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = self.tokenizer(texts, padding="max_length", max_length=length or self.max_length, truncation=True,
                         return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)

  def count(self, text: str) -> int:
    """The number of ids `text` takes untruncated (special tokens included)."""
    return len(self.tokenizer(text)["input_ids"])
