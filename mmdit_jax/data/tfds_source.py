"""TFDS datasets prepared in the ArrayRecord file format, read through `tfds.data_source` (no TensorFlow).

Addressed as path "tfds:NAME[/CONFIG][:SPLIT]" with the TFDS data_dir alongside; features map onto
the pipeline's names with `rename` (e.g. {"image_latent": "latent"}). Class labels (tfds ClassLabel)
carry their class count into the metadata, for the null class of classifier-free guidance.
"""

from __future__ import annotations

import numpy as np

from mmdit_jax.data import records


def parse(path: str):
  spec = path[len("tfds:"):]
  name, _, split = spec.partition(":")
  if not name:
    raise ValueError(f"bad TFDS path {path!r}; expected 'tfds:NAME[/CONFIG][:SPLIT]'")
  return name, split or "train"


class TfdsSource:
  """Random access to a prepared TFDS dataset with the pipeline's record interface."""

  def __init__(self, path: str, data_dir: str | None = None, rename: dict | None = None):
    import tensorflow_datasets as tfds

    name, split = parse(path)
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise records.DataError(f"TFDS dataset {name!r} split {split!r} is not prepared in data_dir "
                              f"{data_dir!r} as array_record ({type(e).__name__}: {e})") from e
    self.where = f"tfds:{name}:{split}"
    self.rename = dict(rename or {})
    info = self.source.dataset_info
    features, extras = [], {"name": name, "tfds_split": split}
    for key, feat in info.features.items():
      out = self.rename.get(key, key)
      dtype = np.dtype(feat.np_dtype if hasattr(feat, "np_dtype") else feat.dtype)
      features.append(records.Feature(out, tuple(feat.shape), str(dtype)))
      if type(feat).__name__ == "ClassLabel":
        extras["num_classes"] = int(feat.num_classes)
    self.meta = records.Metadata(tuple(features), ((self.where, len(self.source)),), extras)

  def __len__(self):
    return len(self.source)

  def read(self, index: int) -> dict:
    raw = self.source[int(index)]
    out = {}
    for f in self.meta.features:
      key = next((k for k, v in self.rename.items() if v == f.name), f.name)
      a = np.asarray(raw[key], dtype=f.dtype)
      f.check(a, f"{self.where} record {index}")
      out[f.name] = a
    return out
