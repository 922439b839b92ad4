"""Ranking formulations the way SD3's study does (§5.1, Table 1): per sampler setting, non-dominated sorting
on (text alignment ↑, FID ↓); a formulation's rank in a setting is the index of its Pareto front (0 = not
dominated by any other); ranks are then averaged over settings.

Pure NumPy: the study's inputs are a few hundred scores, not arrays worth compiling for.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
  """a is at least as good as b in every objective and better in one (all objectives maximised)."""
  return bool(np.all(a >= b) and np.any(a > b))


def non_dominated_fronts(points, maximize: Sequence[bool]) -> np.ndarray:
  """Front index of each of `points` (n, m): 0 for the Pareto front, 1 for the front once it is removed, …

  `maximize[j]` says whether objective j is better high (CLIP score, accuracy) or low (FID, CMMD). Equal
  points never dominate each other, so ties share a front. NaN scores (a failed evaluation) are worse
  than any number in their objective.
  """
  x = np.asarray(points, np.float64)
  if x.ndim != 2 or x.shape[1] != len(maximize):
    raise ValueError(f"points must be (n, {len(maximize)}) for {len(maximize)} objectives, got shape {x.shape}")
  x = np.where(np.asarray(maximize, bool), x, -x)  # every objective maximised
  x = np.where(np.isnan(x), -np.inf, x)
  n = len(x)
  # better[i, j]: i dominates j.
  ge = np.all(x[:, None, :] >= x[None, :, :], axis=-1)
  gt = np.any(x[:, None, :] > x[None, :, :], axis=-1)
  better = ge & gt
  fronts = np.full(n, -1, np.int64)
  remaining = np.ones(n, bool)
  front = 0
  while remaining.any():
    dominated = (better & remaining[:, None]).any(axis=0)  # by a point still in play
    current = remaining & ~dominated
    fronts[current] = front
    remaining &= ~current
    front += 1
  return fronts


def rank_settings(scores: Mapping[str, Mapping[str, Sequence[float]]], maximize: Sequence[bool]) -> dict:
  """{setting: {name: front}} from {setting: {name: objectives}}: non-dominated sorting within each setting
  (a formulation missing from a setting is simply not ranked there)."""
  out = {}
  for setting, by_name in scores.items():
    names = sorted(by_name)
    fronts = non_dominated_fronts([by_name[n] for n in names], maximize) if names else []
    out[setting] = {n: int(f) for n, f in zip(names, fronts)}
  return out


def average_ranks(ranks: Mapping[str, Mapping[str, int]]) -> dict:
  """{name: (mean front over the settings that ranked it, number of those settings)}, best first."""
  per_name: dict[str, list[int]] = {}
  for by_name in ranks.values():
    for name, front in by_name.items():
      per_name.setdefault(name, []).append(front)
  means = {n: (float(np.mean(v)), len(v)) for n, v in per_name.items()}
  return dict(sorted(means.items(), key=lambda kv: (kv[1][0], kv[0])))
