"""Tokenizers from local files and the SD3 conditioning assembly on tiny random encoders."""

import ml_collections
import numpy as np
import pytest

from mmdit_jax import parallel
from mmdit_jax.errors import UserError
from mmdit_jax.encoders import sd3
from mmdit_jax.encoders.tokenizer import Tokenizer
from tests import torch_reference as tiny

# (one xdist worker runs this file: its module fixtures are built once)
pytestmark = pytest.mark.xdist_group("sd3_encoders")


def test_tokenizers_from_local_files(tmp_path):
  import transformers
  vocab = tiny.write_clip_tokenizer(tmp_path / "clip")
  ids = Tokenizer(tmp_path / "clip", 8)(["a red circle", "photo of a dog at the top left and a cat"])
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  np.testing.assert_array_equal(ids[0], [bos, vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], eos, eos, eos, eos])
  assert ids.shape == (2, 8) and ids[1, -1] == eos and ids.dtype == np.int32  # truncated, EOS kept
  tiny.write_t5_tokenizer(tmp_path / "t5")
  t5 = Tokenizer(tmp_path / "t5", 12)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "t5"))
  for text in ("a red circle", "photo of a cat at the bottom right"):
    want = ref(text)["input_ids"]
    assert want[-1] == 1  # T5 appends </s>
    want = want[:11] + [1] if len(want) > 12 else want + [0] * (12 - len(want))  # truncate, keep </s>; pad
    assert list(t5([text])[0]) == want
  with pytest.raises(UserError, match="no tokenizer at"):
    Tokenizer(tmp_path / "missing", 77)


@pytest.fixture(scope="module")
def sd3_root(tmp_path_factory):
  return tiny.write_sd3_encoders(tmp_path_factory.mktemp("sd3"))


def test_sd3_conditioning_layout(sd3_root):
  paths = sd3.EncoderPaths.from_config(ml_collections.ConfigDict({"root": str(sd3_root)}))
  mesh = parallel.make_mesh((2, 1, 1, 4))
  enc = sd3.SD3TextEncoder(paths, mesh)
  prompts = ["a red circle", "a blue square at the top left", ""]
  context, pooled = enc(prompts)
  assert context.shape == (3, 154, 80) and pooled.shape == (3, 32 + 48)
  # CLIP-L's channels, bigG's after them, zero padding, then T5 on the sequence.
  assert np.all(context[:, :77, 80:] == 0) and np.all(context[:, 77:, 64:] == 0)
  assert np.abs(context[:, :77, :80]).min() > 0 and np.abs(context[:, 77:, :64]).min() > 0
  spec = enc.params["t5"]["layers"]["layers"]["ff"]["wi_0"]["kernel"].get_value().sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor")  # (layers, embed, mlp): laid out on the mesh
  no_t5 = sd3.SD3TextEncoder(sd3.EncoderPaths.from_config(ml_collections.ConfigDict(
      {"root": str(sd3_root), "no_t5": True})), mesh, context_dim=80)
  c2, p2 = no_t5(prompts)
  np.testing.assert_allclose(c2[:, :77], context[:, :77], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p2, pooled, rtol=1e-5, atol=1e-6)
  assert np.all(c2[:, 77:] == 0)  # inference without T5: zeros in its place
  slices = {s["name"]: s for s in enc.text_encoder_slices()}
  assert slices["clip_g"]["context_channels"] == [32, 80] and slices["t5"]["context_tokens"] == [77, 154]
  assert slices["clip_g"]["pooled"] == [32, 80] and "pooled" not in slices["t5"]
  with pytest.raises(ValueError, match="encoder paths missing"):
    sd3.EncoderPaths.from_config(ml_collections.ConfigDict({"clip_l": str(sd3_root / "text_encoder")}))


def test_clip_skip_and_the_reference_t5_tokenisation(sd3_root):
  """clip_skip = k takes transformers' hidden_states[−(k + 2)] of both CLIPs (diffusers' pipeline);
  t5_truncate=False is SD3's reference code: T5 sees the prompt's first 226 characters uncut, padded to at
  least 77 tokens, so a long prompt's context is longer — and each length is its own batch."""
  import torch
  import transformers
  paths = sd3.EncoderPaths.from_config(ml_collections.ConfigDict({"root": str(sd3_root)}))
  mesh = parallel.make_mesh((2, 1, 1, 4))
  prompts = ["a red circle", "a blue square at the top left"]
  enc = sd3.SD3TextEncoder(paths, mesh, clip_skip=1)
  context, pooled = enc(prompts)
  base_context, base_pooled = sd3.SD3TextEncoder(paths, mesh)(prompts)
  with torch.no_grad():
    for name, channels in (("text_encoder", slice(0, 32)), ("text_encoder_2", slice(32, 80))):
      ref = transformers.CLIPTextModelWithProjection.from_pretrained(sd3_root / name).eval()
      ids = enc.tok_l(prompts) if name == "text_encoder" else enc.tok_g(prompts)
      states = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
      np.testing.assert_allclose(context[:, :77, channels], states[-3].numpy(), rtol=1e-4, atol=1e-5)
      assert np.abs(states[-3].numpy() - states[-2].numpy()).max() > 1e-2  # (a different layer indeed)
  np.testing.assert_allclose(pooled, base_pooled, rtol=1e-5, atol=1e-6)  # the pooled vector is unchanged
  np.testing.assert_allclose(context[:, 77:], base_context[:, 77:], rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="clip_skip=9"):
    sd3.SD3TextEncoder(paths, mesh, clip_skip=9)

  ref_enc = sd3.SD3TextEncoder(paths, mesh, t5_tokens=77, t5_truncate=False)
  long = " ".join(["red circle blue square green triangle"] * 8)  # 295 characters
  assert ref_enc.t5_length(prompts[0]) == 77
  n = ref_enc.t5_length(long)
  t5_tok = transformers.AutoTokenizer.from_pretrained(sd3_root / "tokenizer_3")
  ids = t5_tok(long[:226])["input_ids"]
  assert n == len(ids) > 77 and len(t5_tok(long)["input_ids"]) > n  # cut at 226 characters, not at 77 tokens
  context, _ = ref_enc([long])
  assert context.shape == (1, 77 + n, 80)
  t5 = transformers.T5EncoderModel.from_pretrained(sd3_root / "text_encoder_3").eval()
  with torch.no_grad():
    want = t5(torch.tensor([ids])).last_hidden_state.numpy()
  np.testing.assert_allclose(context[0, 77:, :want.shape[-1]], want[0], rtol=1e-4, atol=1e-5)
  short, _ = ref_enc(prompts)
  np.testing.assert_allclose(short, sd3.SD3TextEncoder(paths, mesh, t5_tokens=77)(prompts)[0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="cannot share a batch"):
    ref_enc([long, prompts[0]])
  both, _ = ref_enc([long, prompts[0]], t5_length=n)  # a group's length: a short negative beside a long prompt
  assert both.shape == (2, 77 + n, 80)
  np.testing.assert_allclose(both[0], context[0], rtol=1e-5, atol=1e-6)
