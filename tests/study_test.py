"""The study's ranking (non-dominated sorting per setting, ranks averaged) and CMMD, against direct references."""

import itertools

import numpy as np
import pytest

from mmdit_jax import fid
from mmdit_jax.study import ranking


def _brute_force_fronts(points, maximize):
  """Peels Pareto fronts one at a time with the textbook pairwise definition of dominance."""
  signs = np.where(maximize, 1.0, -1.0)
  pts = [np.where(np.isnan(p), -np.inf, p * signs) for p in np.asarray(points, np.float64)]
  fronts, left, k = {}, set(range(len(pts))), 0
  while left:
    front = {i for i in left if not any(
        all(a >= b for a, b in zip(pts[j], pts[i])) and any(a > b for a, b in zip(pts[j], pts[i]))
        for j in left if j != i)}
    for i in front:
      fronts[i] = k
    left -= front
    k += 1
  return np.array([fronts[i] for i in range(len(pts))])


@pytest.mark.parametrize("seed,maximize", list(itertools.product(range(4), [(True, False), (True, True),
                                                                           (False, True, True)])))
def test_non_dominated_fronts_match_brute_force_with_ties(seed, maximize):
  rng = np.random.default_rng(seed)
  points = rng.integers(0, 5, (40, len(maximize))).astype(float)  # few values: many ties and equal points
  points[rng.integers(0, 40, 3), 0] = np.nan  # failed evaluations
  np.testing.assert_array_equal(ranking.non_dominated_fronts(points, maximize),
                                _brute_force_fronts(points, maximize))


def test_fronts_of_a_known_example():
  # (alignment ↑, FID ↓): a and b trade off (front 0), c is dominated by a only, d by everything, e equals a.
  pts = {"a": (0.8, 10.0), "b": (0.6, 5.0), "c": (0.7, 12.0), "d": (0.5, 20.0), "e": (0.8, 10.0)}
  fronts = ranking.non_dominated_fronts(list(pts.values()), (True, False))
  assert dict(zip(pts, fronts.tolist())) == {"a": 0, "b": 0, "c": 1, "d": 2, "e": 0}
  with pytest.raises(ValueError, match=r"points must be \(n, 2\)"):
    ranking.non_dominated_fronts([(1.0, 2.0, 3.0)], (True, False))


def test_ranks_per_setting_are_averaged():
  scores = {"5 steps": {"rf/lognorm": (0.9, 10), "rf": (0.5, 30), "eps/linear": (0.6, 12)},
            "25 steps": {"rf/lognorm": (0.9, 8), "rf": (0.95, 9), "eps/linear": (0.4, 20)}}
  ranks = ranking.rank_settings(scores, (True, False))
  assert ranks == {"5 steps": {"eps/linear": 1, "rf": 2, "rf/lognorm": 0},
                   "25 steps": {"eps/linear": 1, "rf": 0, "rf/lognorm": 0}}
  assert ranking.average_ranks(ranks) == {"rf/lognorm": (0.0, 2), "eps/linear": (1.0, 2), "rf": (1.0, 2)}


def _cmmd_numpy(x, y, sigma=10.0, scale=1000.0):
  """The formula, directly: mean k over every pair of each set, k(a, b) = exp(−‖a − b‖² / 2σ²), unit vectors."""
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  y = y / np.linalg.norm(y, axis=1, keepdims=True)
  k = lambda a, b: np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2)).mean()
  return scale * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_cmmd_matches_the_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 32))
  y = rng.standard_normal((48, 32)) + 0.5  # another distribution
  want = _cmmd_numpy(x, y)
  assert want > 0.1
  np.testing.assert_allclose(fid.cmmd(x, y), want, rtol=1e-3)
  assert abs(fid.cmmd(x, x)) < 1e-3  # a set against itself
  with pytest.raises(ValueError, match="one width"):
    fid.cmmd(x, y[:, :16])


def _tiny_study():
  from configs import study
  from tests import helpers
  c = study.get_config("formulations=rf;eps/linear")  # (';' joins names in the preset argument)
  c.train = helpers.config_dict(**{"eval.num_samples": 8, "debug.halt_at_step": 2, "debug.log_data_order": False})
  c.steps, c.select_every = 4, 2
  c.sample_steps, c.guidance, c.weights = (2,), (3.0,), ("ema", "raw")  # (one sampling program per run)
  c.curve_setting = "euler-2steps-cfg3-ema"
  return c


@pytest.mark.slow
def test_a_tiny_study_is_killed_resumed_and_ranked(tmp_path):
  """2 formulations × 1 seed × 4 steps: each run halts at step 2 (as a preemption would), the same call resumes
  it; finished runs and scores are not recomputed; the table ranks both by non-dominated sorting."""
  from mmdit_jax.study import runner
  c = _tiny_study()
  with pytest.raises(runner.StudyStopped, match="rf-s0 stopped"):
    runner.run_study(c, tmp_path)
  with pytest.raises(runner.StudyStopped, match="eps_linear-s0 stopped"):  # rf finished and scored; eps/linear halts
    runner.run_study(c, tmp_path)
  rf = tmp_path / "runs" / "rf-s0"
  scored = {p.name: p.stat().st_mtime_ns for p in (rf / "scores").rglob("*.json")}
  assert sorted(scored) == ["0000002.json", "0000004.json", "euler-2steps-cfg3-ema.json", "euler-2steps-cfg3-raw.json"]
  selection = (rf / "selection.json").read_text()
  table = runner.run_study(c, tmp_path)
  assert {p.name: p.stat().st_mtime_ns for p in (rf / "scores").rglob("*.json")} == scored  # not recomputed
  assert (rf / "selection.json").read_text() == selection
  sel = runner.select_step(rf)
  assert sel["step"] in (2, 4) and sel["val_ema/loss"] == min(sel["curve"].values())
  assert set(table["average_rank"]) == {"rf", "eps/linear"}
  for name, by_f in table["per_setting"].items():
    points = {f: (e["alignment"], e["quality"]) for f, e in by_f.items()}
    assert {f: e["rank"] for f, e in by_f.items()} == ranking.rank_settings({name: points}, (True, False))[name]
  assert (tmp_path / "table.md").read_text().startswith("# Study") and (tmp_path / "table.csv").exists()
  for plot in table["plots"]:  # linked from the table, real PNGs
    assert f"({plot})" in (tmp_path / "table.md").read_text()
    assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(table["plots"]) == 4 + 2 + 1  # densities, loss per bin, validation, metrics vs steps; a front per
  # setting; validation loss against the metrics of every checkpoint (steps 2 and 4 of both runs)
  lvm = table["loss_vs_metrics"]
  assert lvm["setting"] == "euler-2steps-cfg3-ema" and len(lvm["points"]) == 4
  assert lvm["quality"]["n"] == 4 and -1 <= lvm["quality"]["pearson"] <= 1
  assert {f: w["quality"]["n"] for f, w in lvm["within_formulations"].items()} == {"rf": 2, "eps/linear": 2}
  assert sorted(p.name for p in (rf / "scores" / "curve").iterdir()) == ["0000002.json", "0000004.json"]
  # A second shard of a finished study only ranks; bad shards and formulations are named.
  assert runner.run_study(c, tmp_path, shard="1/2") == table
  with pytest.raises(Exception, match="expected i/n"):
    runner.run_study(c, tmp_path, shard="2/2")
  c.curve_setting = "euler-9steps-cfg3-ema"
  with pytest.raises(Exception, match="is not one of the study's settings"):
    runner.run_study(c, tmp_path)
  c.curve_setting = ""
  c.formulations = "rf;paper8"
  with pytest.raises(Exception, match="groups: "):
    runner.run_study(c, tmp_path)


def _tiny_clip_model(path):
  """A tiny random transformers CLIPModel with a CLIP tokenizer, saved as a directory."""
  import torch
  import transformers
  from tests import torch_reference
  vocab = torch_reference.write_clip_tokenizer(path)
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"],
                       bos_token_id=vocab["<|startoftext|>"]),
      vision_config=dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4), projection_dim=16)).eval()
  model.save_pretrained(path)
  return model


def test_clip_score_and_cmmd_in_jax_match_transformers(tmp_path):
  """CLIPMetrics on a whole CLIPModel directory: its text and image embeddings are transformers' (same ids,
  same preprocessed pixels), so CLIP score and CMMD equal the formulas on transformers' features."""
  import torch
  from mmdit_jax import config as config_lib
  from mmdit_jax.clip_metrics import CLIPMetrics
  from mmdit_jax.encoders import clip_vision
  ref = _tiny_clip_model(tmp_path / "clip")
  metrics = CLIPMetrics(tmp_path / "clip", batch_size=4)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
  reference = np.clip(images[::-1] * 0.5 + 0.2, -1, 1)
  texts = ["a red circle", "a photo of a dog", "a cat", "red", "dog at the top", "circle"]
  with torch.no_grad():
    pix = lambda x: torch.from_numpy(np.asarray(clip_vision.preprocess(x, 28))).permute(0, 3, 1, 2)
    img = ref.get_image_features(pixel_values=pix(images))
    img = (img.pooler_output if hasattr(img, "pooler_output") else img).numpy()
    rimg = ref.get_image_features(pixel_values=pix(reference))
    rimg = (rimg.pooler_output if hasattr(rimg, "pooler_output") else rimg).numpy()
    txt = ref.get_text_features(input_ids=torch.from_numpy(metrics.tokenizer(texts).astype(np.int64)))
    txt = (txt.pooler_output if hasattr(txt, "pooler_output") else txt).numpy()
  np.testing.assert_allclose(metrics.embed_images(images), img, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics.embed_texts(texts), txt, rtol=1e-4, atol=1e-5)
  cos = (img * txt).sum(-1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
  assert metrics.clip_score(images, texts) == pytest.approx(np.mean(100 * np.maximum(cos, 0)), rel=1e-4)
  assert metrics.cmmd(images, reference) == pytest.approx(_cmmd_numpy(img, rimg), rel=1e-3, abs=1e-4)
  with pytest.raises(Exception, match=r"config.eval.clip: .* is not a transformers CLIPModel directory"):
    config_lib.EvalConfig(clip=str(tmp_path / "nowhere"))
