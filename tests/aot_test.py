"""--mode=compile: topology names, the collective counter of compiled HLO, and a tiny MM-DiT compiled for real
TPU topologies from this CPU machine (skipped, saying why, where libtpu is not installed)."""

import importlib.util
import json
import subprocess

import pytest

from mmdit_jax import aot, errors
from tests import helpers

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_parse_topology():
  assert aot.parse_topology("v5p:4x4x4") == (1, "v5p", "4x4x4")
  assert aot.parse_topology("2:v5e:4x4") == (2, "v5e", "4x4")
  with pytest.raises(errors.UserError, match=r"expected CHIP:AxB\[xC\].*v5p:4x4x4"):
    aot.parse_topology("v5p-64")
  with pytest.raises(errors.UserError, match="CHIP one of"):
    aot.parse_topology("v7:2x2")


# A compiled-HLO shape: an entry with one all-reduce; two while loops over one body holding an async
# all-gather (start/done: counted once, by its payload) and a fusion with a reduce-scatter — one loop's trip
# count (3) is in its condition (`i < 3`, as TPU programs give it), the other's (2) in its backend config; and
# a conditional whose costlier branch holds a collective-permute; and TPU's form of a combined reduce-scatter
# (a fusion calling an all-reduce-scatter computation: one reduce-scatter, of its result's size).
SYNTHETIC_HLO = """
HloModule jit_step

%fused_rs (p0: f32[8,4]) -> f32[2,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[2,4]{1,0} reduce-scatter(%p0), dimensions={0}, to_apply=%add
}

%body (arg: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %arg = (s32[], f32[8,4]{1,0}) parameter(0)
  %ags = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = bf16[8,4]{1,0} all-gather-done(%ags)
  %f = f32[2,4]{1,0} fusion(%y), kind=kCustom, calls=%fused_rs
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %z)
}

%all-reduce-scatter.7 (p0: f32[8,4], p1: f32[16]) -> (f32[2,4], f32[4]) {
  %ar = (f32[8,4]{1,0}, f32[16]{0}) all-reduce(%p0, %p1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (f32[2,4]{1,0}, f32[4]{0}) tuple(%s0, %s1)
}

%cond (arg: (s32[], f32[8,4])) -> pred[] {
  %arg = (s32[], f32[8,4]{1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%arg), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%small (p: f32[4]) -> f32[4] {
  ROOT %cp = f32[4]{0} collective-permute(%p), source_target_pairs={{0,1}}
}

%large (p: f32[4]) -> f32[64] {
  ROOT %cp2 = f32[64]{0} collective-permute(%q), source_target_pairs={{0,1}}
}

ENTRY %main (a: f32[8,4], b: s32[]) -> f32[8,4] {
  %ar = (f32[8,4]{1,0}, f32[16]{0}) all-reduce(%a, %c), replica_groups={{0,1}}, to_apply=%add
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"2"}}
  %c = f32[64]{0} conditional(%b, %x, %y), branch_computations={%small, %large}
  %rs = (f32[2,4]{1,0:T(8,128)}, f32[4]{0}) fusion(%a, %d), kind=kCustom, calls=%all-reduce-scatter.7
  ROOT %r = f32[8,4]{1,0} copy(%a)
}
"""


def test_collective_stats_counts_loop_trips_async_payloads_and_the_costlier_branch():
  stats = aot.collective_stats(SYNTHETIC_HLO)
  assert stats["all-reduce"] == {"count": 1, "bytes": 8 * 4 * 4 + 16 * 4}
  assert stats["all-gather"] == {"count": 5, "bytes": 5 * 8 * 4 * 2}
  assert stats["reduce-scatter"] == {"count": 5 + 1, "bytes": 5 * 2 * 4 * 4 + (2 * 4 + 4) * 4}
  assert stats["collective-permute"] == {"count": 1, "bytes": 64 * 4}
  assert stats["all-to-all"] == {"count": 0, "bytes": 0} and stats["unknown_trip_counts"] == 0


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
  from jax.experimental import topologies

  def no_tpu(*args, **kwargs):
    raise RuntimeError("Unable to initialize backend 'tpu': libtpu not found")
  monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
  with pytest.raises(errors.UserError, match=r"needs libtpu .* pip install -e '\.\[tpu\]'"):
    aot.topology_devices("v5e:2x2")


def _compile(tmp_path, topology, *flags):
  proc = subprocess.run(helpers.main_cmd(tmp_path, "--mode=compile", f"--topology={topology}", "--config.model.depth=1",
                                         "--config.model.hidden_size=64", *flags),
                        cwd=helpers.ROOT, env={**helpers.env(devices=1), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "libtpu" not in proc.stderr and "could not determine TPU" not in proc.stdout + proc.stderr
  return json.loads((tmp_path / "compile_report.json").read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]' to compile for TPUs")
def test_compile_mode_for_a_tpu_topology(tmp_path):
  r, out = _compile(tmp_path / "fsdp", "v5e:2x2", "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2")
  assert "fits" in out and "collectives per step" in out
  assert r["fits"] and r["chips"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 1}
  assert r["hbm_gib"] == 15.75 and r["headroom_gib"] == pytest.approx(15.75 - r["total_gib"])
  assert r["total_gib"] == pytest.approx(r["argument_gib"] + r["temp_gib"] + r["output_gib"] - r["alias_gib"])
  assert abs(r["output_gib"] - r["alias_gib"]) < 1e-3  # the donated state is updated in place
  # The arguments are this chip's state plus its share of the batch (float16 latents, context, pooled), padded
  # to the TPU's (8, 128) tiles (much padding for a 64-wide model; the 2B preset's differ by 0.2 %).
  batch_bytes = r["per_chip_batch"] * (32 * 32 * 3 + 32 * 32 + 32) * 2
  assert r["state_gib"] * aot.GIB + batch_bytes <= r["argument_gib"] * aot.GIB < 2 * (r["state_gib"] * aot.GIB + batch_bytes)
  c = r["collectives"]
  assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] > 0, c  # FSDP: gather weights, scatter grads
  assert 0 < r["roofline_mfu"] <= 1 and r["roofline_step_s"] > 0 and r["sample"]["total_gib"] > 0
  # One chip (in process), a 32 → 64 super-resolution stage: no collectives at all; its sampling loop compiles
  # with the low-res input.
  sr = {"sr.factor": 2, "model.lowres_channels": 3, "data.demo_size": 64, "model.sample_size": 64,
        "model.pos_embed_max_size": 8, "sample.steps": 2}
  single = aot.compile_report(helpers.config(**{"model.depth": 1, "model.hidden_size": 64, "mesh.ici.data": -1, **sr}),
                              "v5e:1x1")
  assert single["fits"] and all(v["count"] == 0 for k, v in single["collectives"].items() if isinstance(v, dict))
  assert "error" not in single["sample"] and single["sample"]["total_gib"] > 0
