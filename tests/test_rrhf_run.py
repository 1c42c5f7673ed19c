"""RRHF stage end to end on tiny models: training on a sampled-set file, resume bitwise equal to an
uninterrupted run, the policy export, bad settings rejected before anything is written, and the
dry run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import llama_jax as lj
from configs import rrhf_tiny
from llama_jax import convert
from llama_jax.recipe import dry_run, eval_run, stages
from llama_jax.train import build
from train_helpers import assert_same_run


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory):
  """A tiny random "SFT" policy on disk (the start)."""
  c = _config("", "")
  cfg = build.model_config(c, 512)
  path = str(tmp_path_factory.mktemp("sft") / "final")
  convert.save_orbax(path, cfg, lj.init_params(cfg, jax.random.key(3)))
  return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
  """A sampled-set file: 40 prompts, 3 scored samples each (one truncated per 5th prompt)."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(40):
    samples = [f"answer {i} {'abc'[j] * int(rng.integers(1, 9))}" for j in range(3)]
    lines.append(json.dumps({
        "prompt": [{"role": "user", "content": f"what is {i} plus {i % 7}?"}],
        "samples": samples, "scores": [float(x) for x in rng.random(3)], "chosen": 0,
        "iteration": 1, "temperature": 1.0, "finished": [True, True, i % 5 != 0]}))
  path = tmp_path_factory.mktemp("rs") / "sampled.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _config(init_from, sampled, **rrhf_fields):
  c = rrhf_tiny.get_config()
  c.init_from, c.rrhf.sampled = init_from, sampled
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.multiple_of = 16
  c.rrhf.batch_size, c.rrhf.k, c.rrhf.max_seq_len = 4, 3, 64
  c.data.heldout_fraction = 0.2
  c.optimizer.lr = 1e-3
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 2
  c.train.eval_every, c.train.async_checkpoint = 0, False
  for k, v in rrhf_fields.items():
    c.rrhf[k] = v
  return c


def test_run_resume_bitwise_and_final_policy(tmp_path, sft_final, sampled):
  c = _config(sft_final, sampled)
  full = stages.run(c, str(tmp_path / "full"))
  assert full["finished"] and full["steps"] == 4
  tr, ev = full["train"], full["eval"]
  for k in ("loss", "rrhf_loss", "sft_loss", "ranking_accuracy", "logps/best"):
    assert np.isfinite(tr[k]) and np.isfinite(ev[k]), k
  assert tr["prompts"] == 4 and tr["sft_loss"] > 0 and 0 <= ev["ranking_accuracy"] <= 1
  stats = json.load(open(tmp_path / "full" / "data_stats.json"))
  assert stats["records"] == 40 and stats["truncated_or_empty"] == 8
  assert stats["train_prompts"] + stats["held_out_prompts"] == 40
  assert ev["prompts"] == stats["held_out_prompts"] > 0
  _, params = convert.load_orbax(full["final_dir"])
  _, start = convert.load_orbax(sft_final)
  drift = np.abs(np.asarray(params["output"]) - np.asarray(start["output"])).max()
  assert 0 < drift < 0.1
  report = eval_run.run(str(tmp_path / "full"), num_prompts=4)  # eval.py reads it as a policy
  assert report["stage"] == "rrhf" and set(report) >= {"initial", "trained"}

  # Stopped after 2 steps (a checkpoint), then resumed: bitwise the uninterrupted run.
  c.train.stop_after_steps = 2
  first = stages.run(c, str(tmp_path / "split"))
  assert first["steps"] == 2 and not first["finished"]
  c.train.stop_after_steps = 0
  rest = stages.run(c, str(tmp_path / "split"))
  assert rest["finished"]
  assert_same_run(tmp_path / "full", tmp_path / "split")
  assert rest["eval"] == full["eval"]


@pytest.mark.parametrize("change, match", [
    (dict(k=1), "config.rrhf.k"),
    (dict(batch_size=6), "config.rrhf.batch_size"),  # not divisible by grad_accum_steps = 4
    (dict(overlong="cut"), "config.rrhf.overlong"),
    (dict(max_seq_len=4096), "config.rrhf.max_seq_len"),
    (dict(rank_weight=-1.0), "config.rrhf.rank_weight"),
    (dict(max_seq_len=8, overlong="error"), "config.rrhf.max_seq_len"),
    (dict(sampled=""), "config.rrhf.sampled"),
    (dict(init_from=""), "config.init_from"),
])
def test_bad_settings_are_rejected_before_anything_is_written(tmp_path, sft_final, sampled,
                                                             change, match):
  c = _config(sft_final, sampled)
  c.train.grad_accum_steps = 4
  change = dict(change)
  if "init_from" in change:
    c.init_from = change.pop("init_from")
  for k, v in change.items():
    c.rrhf[k] = v
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    stages.run(c, str(workdir))
  assert not workdir.exists()


def test_dry_run_plans_the_train_step():
  c = rrhf_tiny.get_config()
  p = dry_run.plan(c)
  assert [s["name"] for s in p["steps"]] == ["rrhf.train_step"]
  (train,) = p["steps"]
  assert train["batch_shapes"]["tokens"] == (16, 4, 128)
  assert train["batch_shapes"]["scores"] == (16, 4)
  assert train["per_device"]["optimizer_state"] >= 2 * train["per_device"]["params"]
  c.rrhf.batch_size = 10
  c.train.grad_accum_steps = 4
  with pytest.raises(ValueError, match="config.rrhf.batch_size"):
    dry_run.plan(c)
