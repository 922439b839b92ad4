"""Layer stacks: n copies of a block with parameters stacked on a leading 'layers' axis, run by a scan.

Scanning compiles one block instead of n; a remat policy trades recomputation for activation memory.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.model.layers import constrain_like_params


def _with_kernel_residuals(policy):
  """`policy`, also saving the native CPU attention kernel's output and log-sum-exp (O(S) per head, like
  the matmul outputs saved): otherwise the backward runs that kernel's forward again (the kernel is one
  custom call, not a matmul, so a dots policy would recompute it)."""
  from mmdit_jax.model.cpu_attention import RESIDUALS
  return jax.checkpoint_policies.save_from_both_policies(
      policy, jax.checkpoint_policies.save_only_these_names(RESIDUALS))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # save matmul outputs, recompute the rest
    "dots": _with_kernel_residuals(jax.checkpoint_policies.checkpoint_dots),
    # save only matmuls without batch dimensions: the projections and MLP, not attention's q·k logits
    # (B, H, S, S) — at 1024² those are most of a layer's saved activations
    "dots_no_batch": _with_kernel_residuals(jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
    "names": None,  # save the activations tagged with config.model.remat_names (see CHECKPOINT_NAMES)
    "offload": None,  # the same, offloaded to pinned host memory between forward and backward (TPU/GPU)
}
# The activations the models tag with jax.ad_checkpoint.checkpoint_name, for remat "names" / "offload".
CHECKPOINT_NAMES = ("qkv", "attn_out", "mlp_in", "mlp_out")


def check_remat(name: str, names=()):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; valid: {sorted(REMAT_POLICIES)}")
  bad = sorted(set(names) - set(CHECKPOINT_NAMES))
  if bad:
    raise ValueError(f"remat_names {bad} are not tagged activations; valid: {list(CHECKPOINT_NAMES)}")
  if name in ("names", "offload") and not names:
    raise ValueError(f"remat {name!r} saves the activations named by remat_names, which is empty")


def remat_policy(name: str, names=()):
  """The jax.checkpoint policy for a remat name (None: no remat)."""
  check_remat(name, names)
  if name == "names":
    return jax.checkpoint_policies.save_only_these_names(*names)
  if name == "offload":
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names), offload_src="device",
        offload_dst="pinned_host")
  return REMAT_POLICIES[name]


class Stack(nnx.Module):
  """`n` blocks made by `make_block(rngs)`, stacked; called as a scan over the carry."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs):
    self.n = n

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
      return make_block(r)

    self.layers = make(rngs)

  def __call__(self, carry, *args, remat: str = "none", remat_names=(), scan: bool = True, active=None,
               xs=None, collect: bool = False):
    """Runs the blocks in order: carry = block(carry, *args[, x_i]).

    active: optional bool (n,) — a False layer passes its carry through (skip-layer guidance).
    xs: optional per-layer inputs stacked on axis 0; collect: also return every layer's output.
    """
    graphdef, state = nnx.split(self.layers)
    policy = remat_policy(remat, remat_names)
    # One layer's logical specs: the stacked ones without their leading 'layers' axis.
    layer_specs = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s[1:]), nnx.get_partition_spec(state),
                               is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))

    def body(carry, scanned):
      layer_state, act, x = scanned
      block = nnx.merge(graphdef, constrain_like_params(layer_state, layer_specs))
      new = block(carry, *args) if x is None else block(carry, *args, x)
      if act is not None:
        new = jax.tree.map(lambda n, o: jnp.where(act, n, o), new, carry)
      return new, (new if collect else None)

    if remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
    if scan:
      return jax.lax.scan(body, carry, (state, active, xs))
    outs = []
    # One split per stacked array (its transpose is one concatenate), not n slices (n pads of the gradient).
    leaves, treedef = jax.tree.flatten((state, active, xs))
    splits = [jnp.split(a, self.n) for a in leaves]
    for i in range(self.n):
      sl = treedef.unflatten([s[i][0] for s in splits])
      carry, y = body(carry, sl)
      outs.append(y)
    return carry, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if collect else None)
