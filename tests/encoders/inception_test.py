"""The Flax FID Inception against pytorch-fid's InceptionV3 (pool3), with random weights converted from
the published checkpoint's layout."""

import importlib.metadata
import importlib.util
import pathlib
import sys
import types
from unittest import mock

import jax
import numpy as np
import pytest
import torch

from mmdit_jax.encoders import inception
from mmdit_jax.model import api
from mmdit_jax.model.convert import ConversionError


@pytest.fixture
def pf():
  """pytorch_fid.inception, with torchvision imported as a plain namespace package: its C++ operator
  library does not load beside the CPU build of torch here, and Inception-v3 needs none of it. The
  stand-in is removed afterwards so that no other test sees it."""
  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    pytest.skip("torchvision is not installed")
  before = set(sys.modules)
  pkg = types.ModuleType("torchvision")
  pkg.__path__ = [str(pathlib.Path(spec.origin).parent)]
  pkg.__version__ = importlib.metadata.version("torchvision")
  sys.modules["torchvision"] = pkg
  import pytorch_fid.inception
  yield pytorch_fid.inception
  for name in set(sys.modules) - before:
    if name.split(".")[0] in ("torchvision", "pytorch_fid"):
      del sys.modules[name]


def test_fid_inception_matches_pytorch_fid(tmp_path, pf):
  from safetensors.torch import save_file
  torch.manual_seed(0)
  with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: {}), \
       mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None):
    base = pf.fid_inception_v3()  # the FID graph, randomly initialised instead of downloaded
  with torch.no_grad():  # non-trivial batch-norm statistics
    for m in base.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  state = base.state_dict()
  with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state):
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pt_inception.safetensors"))

  images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.tensor((images + 1) / 2).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  cfg, params = inception.load_inception(tmp_path / "pt_inception.safetensors")
  got = np.asarray(jax.jit(lambda p, x: api.apply(cfg, p, x))(params, images))
  assert got.shape == (2, 2048)
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
  assert api.param_count(cfg) == pytest.approx(21.8e6, rel=0.01)  # pool3 network, without fc

  broken = {k: v.numpy() for k, v in state.items() if not k.startswith("Mixed_7c.branch_pool.bn")}
  with pytest.raises(ConversionError, match="lacks tensor 'Mixed_7c.branch_pool.bn"):
    inception.convert_inception(broken)
