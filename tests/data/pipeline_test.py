"""The data path: exact resume, process sharding, buckets, dropout statistics, errors naming files."""

import json

import numpy as np
import pytest

from mmdit_jax import data, parallel
from mmdit_jax.data import demo, records

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("data_pipeline")


def _write(path, n=64, shapes=((4, 4),), seed=0, **kw):
  rng = np.random.default_rng(seed)
  feats = [records.Feature("latent", (None, None, 2), "float16"), records.Feature("label", (), "int32")]
  with data.DatasetWriter(path, feats, {"num_classes": 5}, examples_per_shard=16, **kw) as w:
    for i in range(n):
      h, wd = shapes[i % len(shapes)]
      w.write({"latent": rng.standard_normal((h, wd, 2)).astype(np.float16), "label": np.int32(i % 5)})
  return path


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
  return demo.ensure_demo("train", num_examples=96, root=tmp_path_factory.mktemp("demo"))


def test_exact_resume_from_iterator_state(demo_path):
  ds = data.Dataset(data.PipelineConfig(demo_path, 8, seed=3))
  straight = ds.iterator()
  batches = [next(straight) for _ in range(30)]  # crosses epoch boundaries (12 batches per epoch)
  it = ds.iterator()
  for _ in range(17):
    next(it)
  state = it.get_state()
  resumed = data.Dataset(data.PipelineConfig(demo_path, 8, seed=3)).iterator()
  resumed.set_state(state)
  for expected in batches[17:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])
  # Epochs are reshuffled, and every epoch visits each example once.
  assert not np.array_equal(ds.epoch_plan(0), ds.epoch_plan(1))
  assert sorted(ds.epoch_plan(1).ravel()) == list(range(96))


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover(demo_path, processes):
  ds = data.Dataset(data.PipelineConfig(demo_path, 16, seed=1))
  for step in range(3):
    parts = [ds.load_batch(step, p, processes) for p in range(processes)]
    rows = np.concatenate([b["index"] for b in parts])
    assert len(set(rows)) == 16
    np.testing.assert_array_equal(rows, ds.global_indices(step))
    # Text dropout is decided per global row, so the batch does not depend on the process count.
    whole = ds.load_batch(step)
    np.testing.assert_array_equal(np.concatenate([b["context"] for b in parts]), whole["context"])


def test_buckets_are_homogeneous(tmp_path):
  path = _write(tmp_path / "b", n=90, shapes=((4, 4), (2, 8), (8, 2)))
  ds = data.Dataset(data.PipelineConfig(str(path), 6))
  assert len(ds.bucket_shapes) == 3
  seen = set()
  for step in range(ds.batches_per_epoch):
    batch = ds.load_batch(step)
    seen.add(batch["latent"].shape[1:3])
    assert batch["latent"].shape[0] == 6
  assert seen == {(4, 4), (2, 8), (8, 2)}


def test_text_dropout_frequencies(demo_path):
  ds = data.Dataset(data.PipelineConfig(demo_path, 16, seed=0))
  null_ctx = ds.null["context"]
  clip_dropped, t5_dropped, both, n = 0, 0, 0, 0
  for step in range(150):
    b = ds.load_batch(step)
    clip = np.all(b["context"][:, :16] == null_ctx[:16], axis=(1, 2))
    t5 = np.all(b["context"][:, 16:] == null_ctx[16:], axis=(1, 2))
    clip_dropped += clip.sum(); t5_dropped += t5.sum(); both += (clip & t5).sum(); n += len(clip)
  # Binomial bounds, about 4.5 standard deviations.
  for count, p in [(clip_dropped, 0.463), (t5_dropped, 0.463), (both, 0.463 ** 2)]:
    sd = np.sqrt(n * p * (1 - p))
    assert abs(count - n * p) < 4.5 * sd, (count, n * p)
  # Configurable: no dropout at all.
  ds0 = data.Dataset(data.PipelineConfig(demo_path, 16, text_dropout=(("clip", 0.0), ("t5", 0.0))))
  b = ds0.load_batch(0)
  assert not np.any(np.all(b["context"][:, :16] == null_ctx[:16], axis=(1, 2)))
  # "*" sets every encoder's rate; named entries override it.
  ds1 = data.Dataset(data.PipelineConfig(demo_path, 16, text_dropout=(("*", 1.0), ("t5", 0.0))))
  b = ds1.load_batch(0)
  assert np.all(b["context"][:, :16] == null_ctx[:16]) and not np.any(
      np.all(b["context"][:, 16:] == null_ctx[16:], axis=(1, 2)))
  with pytest.raises(ValueError, match=r"unknown encoders \['bert'\].*\['clip', 't5'\]"):
    data.Dataset(data.PipelineConfig(demo_path, 16, text_dropout=(("bert", 0.1),)))


def test_label_dropout(tmp_path):
  ds = data.Dataset(data.PipelineConfig(str(_write(tmp_path / "l", n=64)), 16, label_dropout=0.25))
  labels = np.concatenate([ds.load_batch(s)["label"] for s in range(40)])
  assert 0.18 < np.mean(labels == 5) < 0.32


def test_truncated_shard_names_the_file(tmp_path):
  path = _write(tmp_path / "t")
  shard = path / "shard-00001.array_record"
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(data.DataError, match="shard-00001.array_record: .*(truncated|holds)"):
    data.Dataset(data.PipelineConfig(str(path), 4, shuffle=False))


def test_wrong_dtype_and_shape_name_file_and_record(tmp_path):
  path = _write(tmp_path / "d")
  meta = (path / records.METADATA).read_text()
  (path / records.METADATA).write_text(meta.replace('"float16"', '"float32"'))
  ds = data.Dataset(data.PipelineConfig(str(path), 4, shuffle=False))
  with pytest.raises(data.DataError, match=r"shard-00000.array_record record 0.*(dtype|trailing|truncated)"):
    ds.read(0)
  path2 = _write(tmp_path / "s")
  meta = json.loads((path2 / records.METADATA).read_text())
  meta["features"][0]["shape"] = [None, None, 3]  # records hold 2 channels
  (path2 / records.METADATA).write_text(json.dumps(meta))
  with pytest.raises(data.DataError, match=r"shard-00000.array_record record 0: feature 'latent' has shape"):
    data.Dataset(data.PipelineConfig(str(path2), 4, shuffle=False)).read(0)


def test_missing_metadata_and_missing_dataset(tmp_path):
  path = _write(tmp_path / "m")
  (path / records.METADATA).unlink()
  with pytest.raises(data.DataError, match=r"metadata.json is missing.*not a complete dataset"):
    data.Dataset(data.PipelineConfig(str(path), 4))
  with pytest.raises(data.DataError, match="does not exist"):
    data.Dataset(data.PipelineConfig(str(tmp_path / "nowhere"), 4))


def test_interrupted_write_leaves_no_dataset(tmp_path):
  path = tmp_path / "crash"
  with pytest.raises(RuntimeError):
    with data.DatasetWriter(path, [records.Feature("x", (2,), "float32")]) as w:
      w.write({"x": np.zeros(2, np.float32)})
      raise RuntimeError("killed")
  assert not path.exists() and not list(tmp_path.glob(".crash*"))


def test_demo_is_byte_identical_for_a_seed(tmp_path):
  a = demo.write_demo(tmp_path / "a", 40, seed=7, examples_per_shard=16)
  demo.write_demo(tmp_path / "b", 40, seed=7, examples_per_shard=16)
  demo.write_demo(tmp_path / "c", 40, seed=8, examples_per_shard=16)
  for name, _ in a.shards:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert (tmp_path / "a" / "shard-00000.array_record").read_bytes() != (
      tmp_path / "c" / "shard-00000.array_record").read_bytes()


def test_checker_scores_truth_and_noise():
  rng = np.random.default_rng(0)
  scenes = [demo.random_scene(rng) for _ in range(200)]
  images = [demo.render(s, rng) for s in scenes]
  captions = [demo.caption(s) for s in scenes]
  assert demo.compositional_accuracy(images, captions)["all"] == 1.0
  noise = [rng.uniform(-1, 1, (32, 32, 3)) for _ in scenes]
  assert demo.compositional_accuracy(noise, captions)["all"] < 0.05
  shuffled = demo.compositional_accuracy(images[1:] + images[:1], captions)
  assert shuffled["all"] < 0.1 and shuffled["colour"] < 0.5
  with pytest.raises(ValueError, match="not a demo caption"):
    demo.check(images[0], "a purple cow")


def test_global_arrays_on_the_mesh(demo_path):
  mesh = parallel.make_mesh((2, 4, 1, 1))
  batch = data.Dataset(data.PipelineConfig(demo_path, 16)).load_batch(0)
  g = parallel.to_global(batch, mesh)
  assert g["latent"].shape == (16, 32, 32, 3)
  assert g["latent"].sharding.shard_shape(g["latent"].shape) == (2, 32, 32, 3)
  np.testing.assert_array_equal(parallel.to_host(g["latent"]), batch["latent"])


def test_writer_cli(tmp_path):
  from mmdit_jax.data import writer
  np.savez(tmp_path / "x.npz", latent=np.ones((5, 2, 2, 1), np.float16), label=np.arange(5, dtype=np.int32))
  writer.main(["--out", str(tmp_path / "cli"), "--npz", str(tmp_path / "x.npz"), "--examples_per_shard", "2"])
  meta = data.load_metadata(tmp_path / "cli")
  assert meta.num_examples == 5 and len(meta.shards) == 3


def test_shard_compression_is_the_writers_choice_and_readers_need_none(tmp_path):
  from mmdit_jax.data import writer
  arrays = {"latent": np.tile(np.arange(6, dtype=np.float16)[:, None, None, None], (1, 64, 64, 4))}  # compressible
  sizes = {}
  for compression in ("uncompressed", "zstd"):
    writer.write_arrays(tmp_path / compression, arrays, examples_per_shard=3, compression=compression)
    ds = data.Dataset(data.PipelineConfig(str(tmp_path / compression), 2, shuffle=False))
    np.testing.assert_array_equal(np.stack([ds.read(i)["latent"] for i in range(6)]), arrays["latent"])
    sizes[compression] = sum(f.stat().st_size for f in (tmp_path / compression).glob("*.array_record"))
  assert sizes["zstd"] < sizes["uncompressed"]
  with pytest.raises(ValueError, match=r"shard compression 'lz4'; valid: \['uncompressed', 'zstd'"):
    writer.write_arrays(tmp_path / "lz4", arrays, compression="lz4")


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyLatents(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "z": tfds.features.Tensor(shape=(4, 4, 2), dtype=np.float16),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(24):
        yield i, {"z": np.full((4, 4, 2), i, np.float16), "label": i % 3}

  TinyLatents(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = data.Dataset(data.PipelineConfig("tfds:tiny_latents:train", 8, label_dropout=0.0,
                                        tfds_data_dir=str(tmp_path), tfds_rename=(("z", "latent"),)))
  assert ds.meta.extras["num_classes"] == 3
  seen = np.concatenate([ds.load_batch(s)["latent"][:, 0, 0, 0] for s in range(3)])
  assert sorted(seen.astype(int)) == list(range(24))  # one epoch covers the dataset once
  batch = ds.load_batch(0)
  np.testing.assert_array_equal(batch["label"], batch["latent"][:, 0, 0, 0].astype(int) % 3)
  with pytest.raises(data.DataError, match="not prepared"):
    data.Dataset(data.PipelineConfig("tfds:no_such_dataset", 8, tfds_data_dir=str(tmp_path)))
