"""FID: the Fréchet distance in closed form and against scipy, the demo feature network separating real
from corrupted images, and the CLIP-score hook."""

import numpy as np
import pytest

from mmdit_jax import fid
from mmdit_jax.data import demo


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # diagonal Gaussians
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
  assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)
  import scipy.linalg
  x, y = rng.standard_normal((6, 6)), rng.standard_normal((6, 3))
  s1, s2 = x @ x.T, y @ y.T  # s2 is singular, as covariances of few samples are
  ref = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  assert fid.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(ref, rel=1e-6)


def test_demo_features_separate_real_from_corrupted_images():
  rng = np.random.default_rng(1)
  real = lambda n: np.stack([demo.render(demo.random_scene(rng), rng) for _ in range(n)])
  a, b = real(256), real(256)
  fn = fid.feature_network("demo")
  same = fid.fid(fn, a, b)
  swapped = fid.fid(fn, a, b[..., ::-1])  # colours permuted (red ↔ blue)
  moved = fid.fid(fn, a, np.roll(b, (6, 6), axis=(1, 2)))  # objects off their quadrants
  assert 0 < same < 0.2 * min(swapped, moved), (same, swapped, moved)
  with pytest.raises(ValueError, match=r"valid: \['demo', 'inception'\]"):
    fid.feature_network("vgg")
  with pytest.raises(ValueError, match="inception_weights"):
    fid.feature_network("inception")


def toy_clip():
  """A stand-in CLIP for the hook: images and texts embedded by their colour words / mean colours."""
  colours = np.array(list(demo.COLOURS.values()), np.float64)
  embed_images = lambda images: np.asarray(images).reshape(len(images), -1, 3).max(1) @ colours.T
  embed_texts = lambda texts: np.stack([[1.0 if c in t else -1.0 for c in demo.COLOURS] for t in texts])
  return embed_images, embed_texts


def test_clip_score_hook():
  hook = fid.load_clip_score_hook("tests.fid_test:toy_clip")
  images = np.stack([demo.render([("red", "square", "top left")]), demo.render([("blue", "circle", "top left")])])
  right = fid.clip_score(*hook, images, ["a red square", "a blue circle"])
  wrong = fid.clip_score(*hook, images, ["a blue square", "a red circle"])
  assert right > 50 and wrong < right
  assert fid.load_clip_score_hook("") is None
  with pytest.raises(ValueError, match="expected 'package.module:factory'"):
    fid.load_clip_score_hook("tests.fid_test")
  with pytest.raises(ValueError, match="has no 'nothing'"):
    fid.load_clip_score_hook("tests.fid_test:nothing")
