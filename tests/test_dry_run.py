"""Tests for llama_jax.recipe.dry_run (``python train.py --dry_run``).

The plans need 8 and 64 emulated CPU devices, fixed before jax is imported, so ``train.py
--dry_run`` runs in subprocesses (both at once). Per-device parameter bytes are checked against
sizes written out here from the Llama 2 shapes (Meta's FFN rounding) and the mesh, never against
the sharding code's own output.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from llama_jax import model
from llama_jax.ppo import rollout
from llama_jax.recipe import dry_run
from llama_jax.sft import step as sft
from llama_jax.train import build, optim
from llama_jax.train.state import init_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
  """Meta's FeedForward hidden size (llama/model.py)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _expected_param_bytes(*, dim, n_layers, n_heads, n_kv_heads, vocab, ffn, fsdp, tensor,
                          itemsize=4) -> int:
  """f32 bytes per device: every matrix has its model dim split by fsdp and its heads / kv heads /
  ffn / vocab dim split by tensor; RMSNorm scales are replicated."""
  h = dim // n_heads
  matrices = (2 * vocab * dim  # tok_embeddings [v, d], output [d, v]
              + n_layers * (dim * n_heads * h * 2  # wq [d, n, h], wo [n, h, d]
                            + dim * n_kv_heads * h * 2  # wk, wv [d, k, h]
                            + dim * ffn * 3))  # w1, w3 [d, f], w2 [f, d]
  norms = n_layers * 2 * dim + dim
  assert matrices % (fsdp * tensor) == 0
  return itemsize * (matrices // (fsdp * tensor) + norms)


def _run_dry(n_devices: int, *args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.Popen([sys.executable, "train.py", "--dry_run", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  """stdout of the tiny (8 devices, an impossible 1 MiB memory limit; its plan also as JSON in
  ``plans["tiny_json"]``), the SFT 70B and the PPO 70B (64 devices) dry runs, run in parallel."""
  tiny_json = tmp_path_factory.mktemp("plan") / "tiny.json"
  procs = {
      "tiny": _run_dry(8, "--config=configs/tiny.py", "--config.stage=sft",
                       "--config.mesh.device_memory_gib=0.001", f"--plan_json={tiny_json}"),
      "70b": _run_dry(64, "--config=configs/sft_70b.py"),
      "ppo_70b": _run_dry(64, "--config=configs/ppo_70b.py"),
  }
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode:
      pytest.fail(f"dry run {name} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    out[name] = stdout
  out["tiny_json"] = json.loads(tiny_json.read_text())
  return out


def _bytes(text: str, label: str) -> int:
  m = re.search(rf"^\s+{label}\s+[\d.]+ GiB\s+\((\d+) bytes\)", text, re.M)
  assert m, f"no {label!r} line in:\n{text}"
  return int(m.group(1))


def _gib(text: str, label: str) -> float:
  m = re.search(rf"^\s+{label}\s+([\d.]+) GiB", text, re.M)
  assert m, f"no {label!r} line in:\n{text}"
  return float(m.group(1))


def test_tiny_plan_on_8_devices(plans):
  """configs/tiny.py on (1, 8, 1): params per device = the hand-computed FSDP shard; the 1 MiB
  limit gives the 'does not fit' verdict."""
  text = plans["tiny"]
  assert "mesh data=1 fsdp=8 tensor=1 (8 cpu devices)" in text
  expected = _expected_param_bytes(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512,
                                   ffn=_ffn_hidden(128, 32), fsdp=8, tensor=1)
  assert _bytes(text, "parameters") == expected
  # AdamW mu and nu are sharded like the params (plus scalar counts).
  assert 2 * expected <= _bytes(text, "optimizer state") < 2 * expected + 1024
  assert re.search(r"verdict: does not fit in 0\.0 GiB per device: over by [\d.]+ GiB", text)


def test_plan_json_and_the_generated_docs_table(plans, tmp_path):
  """--plan_json writes the printed plan as JSON; benchmarks/memory_plans.py turns it into the
  docs table's rows and replaces only the marked block of a file (nothing written without it)."""
  p, text = plans["tiny_json"], plans["tiny"]
  step = p["steps"][0]
  assert step["per_device"]["params"] == _bytes(text, "parameters") and not step["fits"]
  spec = importlib.util.spec_from_file_location("memory_plans", ROOT / "benchmarks/memory_plans.py")
  mp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mp)
  row, = mp.rows("tiny", p)
  assert row.startswith("| tiny | 8 | (1, 8, 1) | sft.train_step |") and "**over by " in row
  assert f"| {step['per_device']['params'] / 2**30:.2f} |" in row
  doc = tmp_path / "doc.md"
  doc.write_text(f"intro\n{mp.BEGIN}\nold table\n{mp.END}\noutro\n")
  mp.write(str(doc), "NEW")
  assert doc.read_text() == f"intro\n{mp.BEGIN}\nNEW\n{mp.END}\noutro\n"
  doc.write_text("no markers\n")
  with pytest.raises(ValueError, match="no <!-- memory_plans.py: begin -->"):
    mp.write(str(doc), "NEW")
  assert doc.read_text() == "no markers\n"


def test_70b_plan_on_64_devices(plans):
  """configs/sft_70b.py: per-device params on its mesh equal 70B's f32 bytes / (fsdp x tensor)
  plus replicated norms, and the step fits 80 GiB."""
  text = plans["70b"]
  m = re.search(r"mesh data=(\d+) fsdp=(\d+) tensor=(\d+) \(64 cpu devices\)", text)
  assert m, text
  data, fsdp, tensor = map(int, m.groups())
  assert data * fsdp * tensor == 64
  expected = _expected_param_bytes(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab=32000,
                                   ffn=_ffn_hidden(8192, 4096, 1.3), fsdp=fsdp, tensor=tensor)
  assert _bytes(text, "parameters") == expected
  whole = _expected_param_bytes(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab=32000,
                                ffn=_ffn_hidden(8192, 4096, 1.3), fsdp=1, tensor=1)
  assert math.isclose(whole / 4, 68.98e9, rel_tol=1e-3)  # Llama 2 70B: 68.98B params
  assert 2 * expected <= _bytes(text, "optimizer state") < 2 * expected + 1024
  total = _gib(text, "total")
  assert total >= _gib(text, "parameters") + _gib(text, "optimizer state")
  assert re.search(r"verdict: fits in 80\.0 GiB per device \([\d.]+ GiB to spare\)", text)
  assert 80.0 - total > 0


def test_ppo_70b_plan_fits_every_program_with_10_gib_spare(plans):
  """configs/ppo_70b.py (issue 16): the minibatch step (8 microbatches), the rollouts (bf16
  generation copy, chunked prefill, train state parked in pinned_host) and the scoring pass
  (reward models; reference and value) each fit 80 GiB per device with at least 10 GiB to
  spare."""
  text = plans["ppo_70b"]
  steps = re.findall(r"^step (.+?) \(grad_accum_steps", text, re.M)
  assert steps[0] == "ppo.ppo_train_step (one minibatch)" and steps[1].startswith(
      "sampling.sample (rollouts, generation layout; train state"), steps
  assert steps[2].startswith("ppo.rollout_rewards") and steps[3].startswith(
      "ppo.make_experience"), steps
  spare = [float(x) for x in re.findall(r"verdict: fits in 80\.0 GiB per device \(([\d.]+) GiB "
                                        r"to spare\)", text)]
  assert len(spare) == len(steps) == 4 and min(spare) >= 10.0, text
  assert "grad_accum_steps 8" in text


def _config(shape, memory=80.0):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.mesh.shape = shape
  c.mesh.device_memory_gib = memory
  return c


def test_mesh_needing_more_devices_names_both_and_the_flag():
  n = len(jax.devices())
  with pytest.raises(ValueError) as e:
    dry_run.plan(_config((1, 64 * n, 1)))
  msg = str(e.value)
  assert f"(1, {64 * n}, 1)" in msg and f"only {n} are available" in msg
  assert f"--xla_force_host_platform_device_count={64 * n}" in msg


def test_mesh_not_dividing_device_count_names_both():
  n = len(jax.devices())
  k = n + 1  # never divides n
  with pytest.raises(ValueError) as e:
    dry_run.plan(_config((k, -1, 1)))
  msg = str(e.value)
  assert f"({k}, -1, 1)" in msg and f"device count {n}" in msg


def test_microbatch_not_divisible_by_batch_axes_is_rejected():
  c = _config((1, -1, 1))
  c.data.batch_size = 6
  c.train.grad_accum_steps = 4
  with pytest.raises(ValueError, match="grad_accum_steps=4"):
    dry_run.plan(c)


def test_rejection_sampling_plans_its_finetune_and_reports_the_rest():
  c = _config((1, -1, 1))
  c.stage = "rejection_sampling"
  p = dry_run.plan(c)
  assert [s["name"] for s in p["steps"]][0] == "sft.train_step"
  sample = p["steps"][1]
  assert sample["name"].startswith("sampling.sample (rejection-sampling pass")
  rc = c.rejection_sampling
  # Each prompt prefilled once, K completions from its cache (sampling.sample(num_samples=K)).
  assert sample["batch_shapes"]["prompt_tokens"] == (rc.batch_size, rc.max_prompt_len)
  assert sample["batch_shapes"]["tokens"] == (rc.batch_size * rc.k, rc.max_new_tokens)
  assert any("scoring" in u for u in p["unavailable"])
  assert "not yet available" in dry_run.format_plan(p)


def test_unknown_stage_raises():
  c = _config((1, -1, 1))
  c.stage = "no_such_stage"
  with pytest.raises(ValueError, match="config.stage"):
    dry_run.plan(c)


def test_vocab_size_for():
  c = ml_collections.ConfigDict({"model": {"vocab_size": None},
                                 "tokenizer": {"path": "x.model", "world_vocab_size": 512}})
  assert build.planning_vocab_size(c) == 32000
  c.tokenizer.path = "world"
  assert build.planning_vocab_size(c) == 512
  c.model.vocab_size = 1000
  assert build.planning_vocab_size(c) == 1000


def test_ppo_plan_has_train_step_rollouts_and_scoring():
  """Stage ppo on one device: the PPO step carries the value model's state as an argument, and
  the rollout plan's params (generation layout, unsplit on one device) are the whole f32 model;
  the resident train state and frozen models are added to its total. The scoring pass (reward
  models; reference and value) counts every live model once: as an argument or as resident."""
  c = _config((1, 1, 1))
  c.stage = "ppo"
  c.ppo.batch_size, c.ppo.minibatch_size = 8, 8
  c.ppo.max_prompt_len, c.ppo.max_new_tokens = 16, 8
  c.ppo.forward_batch_size = 4
  p = dry_run.plan(c)
  assert [s["name"] for s in p["steps"]] == [
      "ppo.ppo_train_step (one minibatch)", "sampling.sample (rollouts, generation layout)",
      "ppo.rollout_rewards (both reward models over the rollouts)",
      "ppo.make_experience (reference and value passes over the rollouts)"]
  train, gen, rewards, experience = p["steps"]
  expected = _expected_param_bytes(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512,
                                   ffn=_ffn_hidden(128, 32), fsdp=1, tensor=1)
  assert train["per_device"]["params"] == expected == gen["per_device"]["params"]
  # Value model: the trunk without output [d, v], plus head weight [d] and bias [], f32, with
  # AdamW mu and nu: 3x its params (plus scalar counters).
  value_params = expected - 4 * 128 * 512 + 4 * 129
  assert 3 * value_params <= train["detail"]["value model state"] < 3 * value_params + 1024
  assert train["batch_shapes"]["tokens"] == (8, 24)
  assert gen["batch_shapes"]["prompt_tokens"] == (8, 16)
  d = gen["per_device"]
  assert d["total"] >= d["arguments"] + d["temporaries"] + sum(gen["extra"].values())
  assert gen["extra"]["resident_frozen_models"] == 3 * expected
  near = lambda x, y: y <= x < y + 1024  # + AdamW's scalar counters
  assert rewards["per_device"]["params"] == value_params == rewards["detail"]["safety reward model"]
  assert near(rewards["extra"]["resident_train_state"], 3 * expected + 3 * value_params)
  assert rewards["extra"]["resident_reference"] == expected
  assert experience["per_device"]["params"] == expected  # the reference (the policy is unused)
  assert experience["detail"]["value params"] == value_params
  assert near(experience["extra"]["resident_train_state_not_an_argument"],
              3 * expected + 2 * value_params)
  assert experience["extra"]["resident_reward_models"] == 2 * value_params
  assert rewards["batch_shapes"]["response_tokens"] == (8, 8)


@pytest.mark.parametrize("name,params_b", [("sft_7b", 6.74), ("sft_13b", 13.02),
                                           ("sft_70b", 68.98)])
def test_large_configs_build_their_step_abstractly(name, params_b):
  """The 7B / 13B / 70B SFT configs trace their real step with jax.eval_shape on CPU (no mesh,
  nothing allocated): the new state has the old state's shapes, the loss is a f32 scalar."""
  c = importlib.import_module(f"configs.{name}").get_config()
  cfg = build.model_config(c, vocab_size=build.planning_vocab_size(c))
  assert c.tokenizer.path.endswith("llama2-tokenizer/tokenizer.model")
  assert (c.data.batch_size, c.data.max_seq_len, c.optimizer.lr) == (64, 4096, 2e-5)
  assert math.isclose(cfg.num_params() / 1e9, params_b, abs_tol=0.01)
  opt = optim.make_optimizer(c.optimizer, 100)
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  state = jax.eval_shape(functools.partial(init_train_state, optimizer=opt, seed=0), params)
  batch = {k: jax.ShapeDtypeStruct((c.data.batch_size, c.data.max_seq_len),
                                   jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in sft.SFT_KEYS}
  new_state, metrics = jax.eval_shape(functools.partial(
      sft.train_step, cfg=cfg, optimizer=opt, accum_steps=c.train.grad_accum_steps), state, batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


@pytest.mark.parametrize("name,preset,beta,params_b", [("ppo_13b", "llama2_13b", 0.01, 13.02),
                                                       ("ppo_34b", "llama2_34b", 0.005, 33.74),
                                                       ("ppo_70b", "llama2_70b", 0.005, 68.98)])
def test_ppo_scale_configs_follow_the_paper(name, preset, beta, params_b):
  """PPO at 13B / 34B / 70B: beta 0.01 (7B, 13B) or 0.005 (34B, 70B), batch 512 / minibatch 64,
  constant LR 1e-6; their PPO step builds abstractly for the configured mesh's shapes."""
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.stage, c.model.preset, c.ppo.beta) == ("ppo", preset, beta)
  assert (c.ppo.batch_size, c.ppo.minibatch_size, c.ppo.lr, c.ppo.clip_eps) == (512, 64, 1e-6, 0.2)
  cfg = build.model_config(c, vocab_size=build.planning_vocab_size(c))
  assert math.isclose(cfg.num_params() / 1e9, params_b, abs_tol=0.01)
  rollout.validate(c)
  exp = rollout.abstract_experience(c)
  assert exp["tokens"].shape == (512, c.ppo.max_prompt_len + c.ppo.max_new_tokens)


def test_rs_70b_config_samples_with_70b_and_can_distil():
  c = importlib.import_module("configs.rs_70b").get_config()
  assert (c.stage, c.model.preset, c.mesh.shape) == ("rejection_sampling", "llama2_70b", (1, 8, 8))
  r = c.rejection_sampling
  assert r.k == 10 and r.auto_temperature and 1.2 in [
      float(t) for t in r.plot_temperatures.split(",")]
  # The sampler is a separate checkpoint field, so a smaller init_from distils 70B's picks.
  assert r.sample_from == "" and "sample_from" in c.rejection_sampling
  assert c.model.dtype == "bfloat16" and c.model.remat == "full"
