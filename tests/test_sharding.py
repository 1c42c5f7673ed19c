"""Tests for llama_jax.sharding.

Mesh checks need 8 devices, fixed before jax is imported; this pytest process has already
imported jax (conftest.py), so they run once in a subprocess (tests/sharding_checks.py, 8 emulated
CPU devices) whose per-check results the tests below assert on. Checks that need no mesh larger
than the local device count run in-process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import model, sharding
from llama_jax.config import LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS_SCRIPT = ROOT / "tests" / "sharding_checks.py"


@pytest.fixture(scope="module")
def mesh_checks():
  """Runs every check of sharding_checks.py once; returns {name: {"ok", "error"}}."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(CHECKS_SCRIPT)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  results = {}
  for line in proc.stdout.splitlines():
    if line.startswith("CHECK "):
      result = json.loads(line[len("CHECK "):])
      results[result["name"]] = result
  if not results:
    pytest.fail(f"sharding_checks.py reported nothing (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  results["_stderr"] = proc.stderr
  return results


def _assert_check(mesh_checks, name):
  if name not in mesh_checks:
    pytest.fail(f"check {name} did not run; stderr:\n{mesh_checks['_stderr'][-4000:]}")
  assert mesh_checks[name]["ok"], mesh_checks[name]["error"]


@pytest.mark.parametrize("name", ["forward_data_8", "forward_fsdp_8", "forward_fsdp2_tensor4",
                                  "forward_2x2x2"])
def test_sharded_forward_matches_single_device(mesh_checks, name):
  """Meshes (8,1,1), (1,8,1), (1,2,4), (2,2,2): init_params_sharded equals init_params, every
  shard has the hand-computed shape, logits within 1e-5 of the single-device forward."""
  _assert_check(mesh_checks, name)


def test_activation_constraints_in_hlo(mesh_checks):
  _assert_check(mesh_checks, "constraints_in_hlo")


def test_sft_train_step_matches_single_device(mesh_checks):
  """Two donated sft.train_step calls (adamw, 2 microbatches) on mesh (2,2,2): same losses and
  params as one device; params and adam moments stay sharded."""
  _assert_check(mesh_checks, "sft_train_step_2x2x2")


def test_state_shardings_with_multisteps(mesh_checks):
  _assert_check(mesh_checks, "state_shardings_multisteps")


def test_indivisible_dimension_and_mesh_errors(mesh_checks):
  """n_kv_heads 4 on tensor=8 raises naming the path, size and axis; mesh (3,1,-1) on 8 raises."""
  _assert_check(mesh_checks, "indivisible_kv_heads")


def test_generation_layout(mesh_checks):
  """Reshard without a host round trip; same values; forward and cached prefill match."""
  _assert_check(mesh_checks, "generation_layout")


def test_global_batch_from_process_local(mesh_checks):
  _assert_check(mesh_checks, "process_local_batch")


def test_70b_shapes_fsdp_per_device_bytes(mesh_checks):
  _assert_check(mesh_checks, "presets_abstract")


# ---- in-process checks (any device count) ------------------------------------------------------
def test_make_mesh_shape_errors():
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf"\(2, {n}, 1\).*device count is {n}"):
    sharding.make_mesh((2, n, 1))
  with pytest.raises(ValueError, match=rf"does not divide the device count {n}"):
    sharding.make_mesh((2 * n, 1, -1))
  for bad in [(1, 1), (0, 1, 1), (-1, -1, 1), (1.0, 1, 1), (True, 1, 1)]:
    with pytest.raises(ValueError, match="mesh_shape"):
      sharding.make_mesh(bad)
  mesh = sharding.make_mesh((1, -1, 1))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.shape["fsdp"] == n
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_unmapped_logical_name_raises_with_path():
  cfg = LlamaConfig.tiny()
  mesh = sharding.make_mesh((1, 1, -1))
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp")
  with pytest.raises(ValueError,
                     match=r"layers/feed_forward/w1: logical axis 'mlp'.*no logical axis rule"):
    sharding.param_shardings(cfg, mesh, rules)


def test_logical_to_mesh_spec_strictness():
  mesh = sharding.make_mesh((1, 1, -1))
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh_spec(P("layers", "embed", "heads", "head_dim"), (2, 8, 4, 2),
                                       mesh, rules) == P(None, "fsdp", "tensor", None)
  with pytest.raises(ValueError, match="w: logical axes .* do not match shape"):
    sharding.logical_to_mesh_spec(P("embed"), (8, 4), mesh, rules, "w")
  clash = tuple((n, "tensor" if n == "embed" else a) for n, a in rules)
  with pytest.raises(ValueError,
                     match="wq: logical axes 'embed' and 'heads' both map to mesh axis 'tensor'"):
    sharding.logical_to_mesh_spec(P("embed", "heads"), (8, 4), mesh, clash, "wq")


def test_validate_rules():
  assert sharding.validate_rules([["batch", ["data", "fsdp"]], ["embed", None]]) == (
      ("batch", ("data", "fsdp")), ("embed", None))
  for bad, msg in [([("embed", "fsdp"), ("embed", None)], "more than one rule"),
                   ([("embed", "model")], "unknown mesh axis 'model'"),
                   ([("embed", ("fsdp", "fsdp"))], "repeated"),
                   ([("embed", 3)], "must be None, a str or a tuple"),
                   (["embed"], "pair")]:
    with pytest.raises(ValueError, match=msg):
      sharding.validate_rules(bad)
  # Every logical name the model uses (params, activations, cache) has a rule in each table.
  specs = jax.tree.leaves(model.param_logical_axes(LlamaConfig.tiny()),
                          is_leaf=lambda x: isinstance(x, P))
  used = {a for spec in specs for a in spec} | {model.ACT_BATCH, model.ACT_LENGTH, model.ACT_EMBED}
  used |= {a for spec in sharding.CACHE_LOGICAL_AXES for a in spec}
  for rules in (sharding.DEFAULT_RULES, sharding.GENERATION_RULES, sharding.generation_rules(True)):
    assert sharding.validate_rules(rules) == rules
    assert used <= {n for n, _ in rules}, used - {n for n, _ in rules}
  gen = dict(sharding.GENERATION_RULES)
  assert gen["embed"] is None and gen["heads"] == "tensor" and gen["batch"] == ("data", "fsdp")
  merged = dict(sharding.generation_rules(True))
  assert merged["mlp"] == ("fsdp", "tensor") and merged["batch"] == "data"


def test_global_batch_rejects_scalars():
  mesh = sharding.make_mesh((1, 1, -1))
  with pytest.raises(ValueError, match="step must have a leading batch dimension"):
    sharding.global_batch_from_process_local({"step": jax.numpy.zeros(())}, mesh)
