"""The Flax FID Inception against a PyTorch transcription of pytorch-fid's (pool3), with random weights
converted from the published checkpoint's layout."""

import jax
import numpy as np
import pytest
import torch

from mmdit_jax.encoders import inception
from mmdit_jax.model import api
from mmdit_jax.model.weights import ConversionError
from tests.encoders import inception_reference


def test_fid_inception_matches_the_torch_reference(tmp_path):
  from safetensors.torch import save_file
  torch.manual_seed(0)
  ref = inception_reference.FIDInceptionV3().eval()
  with torch.no_grad():  # non-trivial batch-norm statistics
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  state = ref.state_dict()  # the names of pt_inception-2015-12-05-6726825d.pth
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pt_inception.safetensors"))

  images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.tensor((images + 1) / 2).permute(0, 3, 1, 2)).numpy()
  cfg, params = inception.load_inception(tmp_path / "pt_inception.safetensors")
  got = np.asarray(jax.jit(lambda p, x: api.apply(cfg, p, x))(params, images))
  assert got.shape == (2, 2048)
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
  assert api.param_count(cfg) == pytest.approx(21.8e6, rel=0.01)  # pool3 network, without fc

  broken = {k: v.numpy() for k, v in state.items() if not k.startswith("Mixed_7c.branch_pool.bn")}
  with pytest.raises(ConversionError, match="lacks tensor 'Mixed_7c.branch_pool.bn"):
    inception.convert_inception(broken)
