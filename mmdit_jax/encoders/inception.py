"""The Inception-v3 network of FID (the TF 2015-12-05 graph as pytorch-fid ports it), NHWC, and its
converter from the published PyTorch weights (pt_inception-2015-12-05-6726825d.pth, or the same tensors
as .safetensors).

FID's variant differs from torchvision's Inception-v3 in its pooling: average pools exclude padding
(count_include_pad=False) and the last block's pool branch is a max pool. Images in [−1, 1] of any size
are resized bilinearly to 299² (half-pixel centres, no antialiasing, as torch's interpolate); the
output is the 2048-d pool3 feature. Batch norms are frozen (inference statistics are parameters).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from mmdit_jax import paths
from mmdit_jax.model.weights import ConversionError, check_all_used, fill_params


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  resize: int = 299  # 0: no resizing (inputs already 299²)
  dtype: str = "float32"

  def make(self, rngs: nnx.Rngs) -> "FIDInception":
    return FIDInception(self, rngs)


class FrozenBatchNorm(nnx.Module):
  def __init__(self, c, rngs):
    del rngs
    self.scale, self.bias = nnx.Param(jnp.ones((c,))), nnx.Param(jnp.zeros((c,)))
    self.mean, self.var = nnx.Param(jnp.zeros((c,))), nnx.Param(jnp.ones((c,)))

  def __call__(self, x):
    return (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + 1e-3) * self.scale[...] + self.bias[...]


class BasicConv(nnx.Module):
  """conv (no bias) → batch norm (ε = 1e-3) → ReLU; torch's (padding_h, padding_w) convention."""

  def __init__(self, cin, cout, kernel, rngs, stride=1, padding=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=[(p, p) for p in padding], use_bias=False,
                         rngs=rngs)
    self.bn = FrozenBatchNorm(cout, rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x, k=3, s=2, p=0):
  return nnx.max_pool(x, (k, k), (s, s), [(p, p), (p, p)])


def _avg_pool_exclude_pad(x):
  """3×3 stride-1 average over the valid (unpadded) pixels only."""
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), [(0, 0), (1, 1), (1, 1), (0, 0)])
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), [(0, 0), (1, 1), (1, 1), (0, 0)])
  return total / count


class InceptionA(nnx.Module):
  def __init__(self, cin, pool_features, rngs):
    self.branch1x1 = BasicConv(cin, 64, 1, rngs)
    self.branch5x5_1 = BasicConv(cin, 48, 1, rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, rngs, padding=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, rngs, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, rngs, padding=1)
    self.branch_pool = BasicConv(cin, pool_features, 1, rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_exclude_pad(x))], -1)


class InceptionB(nnx.Module):
  def __init__(self, cin, rngs):
    self.branch3x3 = BasicConv(cin, 384, 3, rngs, stride=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, rngs, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, rngs, stride=2)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), _max_pool(x)], -1)


class InceptionC(nnx.Module):
  def __init__(self, cin, c7, rngs):
    self.branch1x1 = BasicConv(cin, 192, 1, rngs)
    self.branch7x7_1 = BasicConv(cin, c7, 1, rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), rngs, padding=(0, 3))
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), rngs, padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), rngs, padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), rngs, padding=(0, 3))
    self.branch_pool = BasicConv(cin, 192, 1, rngs)

  def __call__(self, x):
    dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      dbl = layer(dbl)
    return jnp.concatenate([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                            self.branch_pool(_avg_pool_exclude_pad(x))], -1)


class InceptionD(nnx.Module):
  def __init__(self, cin, rngs):
    self.branch3x3_1 = BasicConv(cin, 192, 1, rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, rngs, stride=2)
    self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), rngs, padding=(0, 3))
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), rngs, padding=(3, 0))
    self.branch7x7x3_4 = BasicConv(192, 192, 3, rngs, stride=2)

  def __call__(self, x):
    b = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b = layer(b)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b, _max_pool(x)], -1)


class InceptionE(nnx.Module):
  def __init__(self, cin, rngs, max_pool_branch: bool):
    self.max_pool_branch = max_pool_branch  # FID's Mixed_7c pools by max, Mixed_7b by average
    self.branch1x1 = BasicConv(cin, 320, 1, rngs)
    self.branch3x3_1 = BasicConv(cin, 384, 1, rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), rngs, padding=(0, 1))
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), rngs, padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, rngs, padding=1)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), rngs, padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), rngs, padding=(1, 0))
    self.branch_pool = BasicConv(cin, 192, 1, rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pool = _max_pool(x, 3, 1, 1) if self.max_pool_branch else _avg_pool_exclude_pad(x)
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], -1)


class FIDInception(nnx.Module):
  def __init__(self, cfg: InceptionConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, rngs, stride=2)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, rngs, padding=1)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs)
    self.Mixed_6a = InceptionB(288, rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs)
    self.Mixed_7a = InceptionD(768, rngs)
    self.Mixed_7b = InceptionE(1280, rngs, max_pool_branch=False)
    self.Mixed_7c = InceptionE(2048, rngs, max_pool_branch=True)

  def __call__(self, images):
    """images (B, H, W, 3) in [−1, 1] → pool3 features (B, 2048), float32."""
    x = images.astype(jnp.float32)
    if self.cfg.resize:
      x = jax.image.resize(x, (x.shape[0], self.cfg.resize, self.cfg.resize, 3), "bilinear", antialias=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
    x = _max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # (B, 2048)


_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
UNUSED = ("fc.weight", "fc.bias")  # the 1008-way logits: FID uses pool3 only


def _load_tensors(path) -> dict:
  if not epath.Path(path).is_file():
    raise ConversionError(f"no Inception weights at {path} (pt_inception-2015-12-05-6726825d.pth or .safetensors)")
  path = epath.Path(paths.local_copy(path, paths.cache_dir()))
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
  try:
    import torch  # only to unpickle the published .pth file
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch; convert it once to .safetensors elsewhere") from e
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items() if v.is_floating_point()}


def convert_inception(tensors: dict, cfg: InceptionConfig = InceptionConfig()):
  from mmdit_jax.model import api
  tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
  used, flat = set(UNUSED) & set(tensors), {}
  for path, _ in nnx.to_flat_state(api.abstract_params(cfg)):
    *mods, leaf = map(str, path)
    if mods[-1] == "conv":
      name = ".".join(mods) + ".weight"
      value = tensors.get(name)
      value = None if value is None else value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) → (kh, kw, I, O)
    else:
      name = ".".join(mods) + "." + _BN[leaf]
      value = tensors.get(name)
    if value is None:
      raise ConversionError(f"Inception checkpoint lacks tensor {name!r}")
    used.add(name)
    flat[path] = value
  check_all_used(tensors, used)
  return fill_params(cfg, flat)


def load_inception(path, cfg: InceptionConfig = InceptionConfig()):
  """(cfg, params) of the FID Inception from its PyTorch weights (.pth or .safetensors)."""
  return cfg, convert_inception(_load_tensors(path), cfg)
