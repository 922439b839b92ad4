"""The precompute job end to end on tiny random encoders: images + captions → dataset (interrupted and
resumed without duplicates) → training on it → --mode=sample from new prompts; buckets and labels;
manifest errors."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import precompute as precompute_config
from mmdit_jax import data, errors, parallel, precompute, sample, train
from mmdit_jax.data import demo
from tests import torch_reference as tiny
from tests.helpers import config

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("precompute")

N = 24


@pytest.fixture(scope="module")
def sd3_root(tmp_path_factory):
  return tiny.write_sd3_encoders(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """N demo scenes saved as PNGs, with a JSONL manifest of their captions."""
  root = tmp_path_factory.mktemp("pics")
  rng = np.random.default_rng(0)
  lines = []
  for i in range(N):
    scene = demo.random_scene(rng)
    img = ((demo.render(scene) + 1) * 127.5).astype(np.uint8)
    Image.fromarray(img).save(root / f"{i:03d}.png")
    lines.append(json.dumps({"image": f"{i:03d}.png", "caption": demo.caption(scene)}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return root


def _pc(folder, out, sd3_root, **kw):
  c = precompute_config.get_config(f"input={folder / 'captions.jsonl'},output={out},root={sd3_root},resolution=32")
  c.batch_size, c.examples_per_shard = 8, 8
  c.update(kw)
  return c


@pytest.mark.slow
def test_precompute_resume_train_and_sample(folder, sd3_root, tmp_path):
  out = tmp_path / "latents"
  assert precompute.run(_pc(folder, out, sd3_root, halt_after_shards=1)) is None  # "interrupted"
  assert sorted(p.name for p in out.glob("shard-*.array_record")) == ["shard-00000.array_record"]
  first = (out / "shard-00000.array_record").stat().st_mtime_ns
  with pytest.raises(ValueError, match="another manifest or config"):
    precompute.run(_pc(folder, out, sd3_root, seed=1))
  meta = precompute.run(_pc(folder, out, sd3_root))
  assert (out / "shard-00000.array_record").stat().st_mtime_ns == first  # done shards are not redone
  assert meta.num_examples == N and [n for _, n in meta.shards] == [8, 8, 8]
  assert meta.extras["latent_scale"] == 1.5305 and len(meta.extras["encoders"]["t5"]["sha256"]) == 64
  ds = data.Dataset(data.PipelineConfig(str(out), 8, shuffle=False, text_dropout=()))
  rows = {k: np.concatenate([ds.load_batch(s, 0, 1)[k] for s in range(3)]) for k in ("latent", "context")}
  assert rows["latent"].shape == (N, 16, 16, 16) and rows["latent"].dtype == np.float16
  # Every example once, in manifest order: the latents are the VAE's, the contexts the prompts'.
  from mmdit_jax.encoders import sd3
  mesh = parallel.make_mesh((-1, 1, 1, 1))
  paths = sd3.EncoderPaths.from_config(ml_collections.ConfigDict({"root": str(sd3_root)}))
  images = np.stack([np.asarray(Image.open(folder / f"{i:03d}.png"), np.float32) / 127.5 - 1 for i in range(N)])
  want = sd3.Autoencoder(paths.vae, mesh).encode(images[-8:])
  np.testing.assert_allclose(rows["latent"][-8:], want, rtol=2e-3, atol=2e-3)
  captions = [json.loads(line)["caption"] for line in (folder / "captions.jsonl").read_text().splitlines()]
  text = sd3.SD3TextEncoder(paths, mesh)
  np.testing.assert_allclose(rows["context"][:8], text(captions[:8])[0], rtol=2e-3, atol=2e-3)
  assert len({r.tobytes() for r in rows["context"]}) == len(set(captions))

  # Train the tiny preset on it, then sample from new prompts through the encoders and the VAE.
  workdir = tmp_path / "run"
  c = config(**{"data.path": str(out), "data.val_path": str(out), "total_steps": 4, "checkpoint_every": 4,
                "model.in_channels": 16, "model.context_dim": 80, "model.pooled_dim": 80,
                "model.patch_size": 4, "model.sample_size": 16, "model.pos_embed_max_size": 4,
                "sample.steps": 3, "sample_every": 4, "eval.num_samples": 8})
  summary = train.train_and_evaluate(c, str(workdir))
  assert np.isfinite(summary["fid/demo"])  # generated latents decoded by the dataset's VAE, scored
  pngs = sample.run_sample(c, str(workdir), ["a red circle at the top left", "a cat"])
  assert len(pngs) == 2
  img = np.asarray(Image.open(pngs[0]))
  assert img.shape == (32, 32, 3) and img.std() > 0


def test_pixel_space_dataset(folder, sd3_root, tmp_path):
  """config.pixels: the images themselves (no VAE), with the prompts' embeddings — Imagen's pixel-space data."""
  out = tmp_path / "pixels"
  meta = precompute.run(_pc(folder, out, sd3_root, pixels=True))
  assert meta.extras["pixels"] is True and "vae" not in meta.extras["encoders"]
  assert meta.feature("latent").shape == (32, 32, 3) and meta.extras["latent_scale"] == 1.0
  ds = data.Dataset(data.PipelineConfig(str(out), 8, shuffle=False, text_dropout=()))
  rows = ds.load_batch(0, 0, 1)
  images = np.stack([np.asarray(Image.open(folder / f"{i:03d}.png"), np.float32) / 127.5 - 1 for i in range(8)])
  np.testing.assert_allclose(rows["latent"], images, atol=1e-3)
  assert rows["context"].shape[0] == 8
  from mmdit_jax import inputs
  c = config(**{"data.path": str(out), "model.context_dim": 80, "model.pooled_dim": 80})
  assert inputs.pixel_space(c)
  c = config(**{"data.path": str(out), "model.context_dim": 80, "model.pooled_dim": 80, "shift_base_resolution": 32})
  assert inputs.with_latent_downsample(c).data.latent_downsample == 1


def test_preference_pairs(folder, sd3_root, tmp_path):
  """config.rejected_key: a manifest of (caption, preferred, rejected) → latent and latent_rejected, the pair's
  images through the same encoder; what DPO training reads."""
  rng = np.random.default_rng(5)
  lines = []
  for i, line in enumerate((folder / "captions.jsonl").read_text().splitlines()):
    row = json.loads(line)
    bad = demo.rejected_scene(demo.parse_caption(row["caption"]), rng)
    Image.fromarray(((demo.render(bad) + 1) * 127.5).astype(np.uint8)).save(tmp_path / f"bad{i:03d}.png")
    row.update(image=str(folder / row["image"]), image_rejected=str(tmp_path / f"bad{i:03d}.png"))
    lines.append(json.dumps(row))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  c = _pc(folder, tmp_path / "pairs", sd3_root, pixels=True, rejected_key="image_rejected")
  c.input = str(tmp_path / "pairs.jsonl")
  meta = precompute.run(c)
  assert meta.extras["preference_pairs"] is True
  assert meta.feature("latent_rejected").shape == meta.feature("latent").shape == (32, 32, 3)
  rows = data.Dataset(data.PipelineConfig(str(tmp_path / "pairs"), 8, shuffle=False, text_dropout=())).load_batch(0, 0, 1)
  good = np.stack([np.asarray(Image.open(folder / f"{i:03d}.png"), np.float32) / 127.5 - 1 for i in range(8)])
  bad = np.stack([np.asarray(Image.open(tmp_path / f"bad{i:03d}.png"), np.float32) / 127.5 - 1 for i in range(8)])
  np.testing.assert_allclose(rows["latent"], good, atol=1e-3)
  np.testing.assert_allclose(rows["latent_rejected"], bad, atol=1e-3)
  (tmp_path / "broken.jsonl").write_text(json.dumps({"image": "000.png", "caption": "a red circle at the top left"}) + "\n")
  with pytest.raises(errors.UserError, match="no .image_rejected. field"):
    precompute.read_manifest(tmp_path / "broken.jsonl", rejected_key="image_rejected")


def test_buckets_and_labels(tmp_path, sd3_root):
  """Class-conditional data (a CSV of labels) in aspect-ratio buckets."""
  rows = ["image,label"]
  for i, (w, h) in enumerate([(40, 40), (90, 30), (30, 30), (100, 34), (33, 31), (60, 20)]):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows.append(f"{i}.png,{i % 3}")
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  c = precompute_config.get_config(f"input={tmp_path / 'labels.csv'},output={tmp_path / 'out'},root={sd3_root}")
  c.label_key, c.batch_size, c.examples_per_shard = "label", 2, 4
  c.buckets = ((16, 16), (8, 24))
  assert precompute.run(c, process=(1, 2)) is None  # host 1 of 2 encodes shard 1 only
  assert sorted(p.name for p in (tmp_path / "out").glob("*.done.json")) == ["shard-00001.done.json"]
  meta = precompute.run(c, process=(0, 2))  # host 0: shard 0, then the metadata
  assert meta.feature("latent").shape == (None, None, 16) and meta.extras["num_classes"] == 3
  assert "text_encoders" not in meta.extras
  shapes = np.load(tmp_path / "out" / "shapes.npy")
  assert shapes[:, :2].tolist() == [[8, 8], [4, 12], [8, 8], [4, 12], [8, 8], [4, 12]]
  ds = data.Dataset(data.PipelineConfig(str(tmp_path / "out"), 2, shuffle=True))
  for step in range(3):
    batch = ds.load_batch(step, 0, 1)
    assert batch["latent"].shape[1:] in ((8, 8, 16), (4, 12, 16)) and batch["label"].dtype == np.int32


def test_tfds_input(tmp_path, sd3_root):
  """A TFDS split (array_record, prepared without TensorFlow) with uint8 image arrays and captions."""
  import tensorflow_datasets as tfds

  class TinyPictures(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "pixels": tfds.features.Tensor(shape=(20, 30, 3), dtype=np.uint8),
          "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"pixels": np.full((20, 30, 3), 40 * i, np.uint8), "text": f"a photo of {i} cats"}

  TinyPictures(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = precompute_config.get_config(f"input=tfds:tiny_pictures:train,output={tmp_path / 'out'},root={sd3_root},"
                                   "resolution=16")
  c.tfds_data_dir, c.image_key, c.caption_key, c.batch_size = str(tmp_path), "pixels", "text", 4
  meta = precompute.run(c)
  assert meta.num_examples == 3 and meta.feature("latent").shape == (8, 8, 16)
  assert meta.feature("context").shape == (154, 80)
  c.image_key = "image"
  with pytest.raises(ValueError, match=r"no feature 'image'; features: \['pixels', 'text'\]"):
    precompute.run(_with(c, output=str(tmp_path / "out2")))


def _with(c, **kw):
  c = c.copy_and_resolve_references()
  c.update(kw)
  return c


def test_manifest_errors(tmp_path):
  (tmp_path / "a.png").write_bytes(b"not a png")
  cases = {
      "bad.jsonl": ('{"image": "a.png", "caption": "x"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
      "nokey.jsonl": ('{"image": "a.png", "text": "x"}\n', r"no 'caption' field \(fields: \['image', 'text'\]\)"),
      "missing.jsonl": ('{"image": "b.png", "caption": "x"}\n', r"1 images listed .* do not exist"),
      "labels.csv": ("image,label\na.png,cat\n", r"labels.csv:2: label 'cat' is not an integer"),
      "x.txt": ("", r"unknown format '.txt'"),
  }
  for name, (content, match) in cases.items():
    (tmp_path / name).write_text(content)
    with pytest.raises(errors.UserError, match=match):
      precompute.read_manifest(tmp_path / name, label_key="label" if name.endswith(".csv") else "")
  with pytest.raises(ValueError, match="cannot read image .*a.png"):
    precompute.load_image(str(tmp_path / "a.png"), 32, ())
  c = precompute_config.get_config("output=/tmp/x")
  with pytest.raises(ValueError, match="config.input is empty"):
    precompute.run(c)
