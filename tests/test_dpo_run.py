"""DPO stage end to end on tiny models: the reference pass and its cache, resume bitwise equal to
an uninterrupted run, the policy export, bad settings rejected before anything is written, and
the dry run."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import llama_jax as lj
from configs import dpo_tiny
from llama_jax import convert
from llama_jax.dpo import reference
from llama_jax.recipe import dry_run, eval_run, stages
from llama_jax.train import build
from train_helpers import assert_same_run


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory):
  """A tiny random "SFT" policy on disk (the start and the reference)."""
  c = _config("")
  cfg = build.model_config(c, 512)
  path = str(tmp_path_factory.mktemp("sft") / "final")
  convert.save_orbax(path, cfg, lj.init_params(cfg, jax.random.key(3)))
  return path


def _config(init_from, **dpo_fields):
  c = dpo_tiny.get_config()
  c.init_from = init_from
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.multiple_of = 16
  c.dpo.batch_size, c.dpo.world_train_pairs, c.dpo.world_heldout_pairs = 4, 24, 8
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 0
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 2
  c.train.eval_every, c.train.async_checkpoint = 0, False
  for k, v in dpo_fields.items():
    c.dpo[k] = v
  return c


def _reference_info(work):
  return json.load(open(work / "data_stats.json"))["reference"]


def test_run_resume_bitwise_and_final_policy(tmp_path, sft_final):
  c = _config(sft_final)
  full = stages.run(c, str(tmp_path / "full"))
  assert full["finished"] and full["steps"] == 4
  tr = full["train"]
  for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"):
    assert np.isfinite(tr[k]), k
  assert tr["pairs"] == 4 and tr["logps/chosen"] < 0
  ev = full["eval"]
  assert ev["pairs"] == 16 and ev["world_helpfulness/pairs"] == 8 and 0 <= ev["rewards/accuracies"] <= 1
  info = _reference_info(tmp_path / "full")
  assert not info["cached"] and info["world_helpfulness/train"]["pairs"] == 24
  assert info["world_safety/held_out"]["pairs"] == 8
  assert (tmp_path / "full" / reference.CACHE).is_file()
  # final/ is a policy (convert.save_orbax), moved off the SFT start by 4 small steps.
  _, params = convert.load_orbax(full["final_dir"])
  _, start = convert.load_orbax(sft_final)
  assert "output" in params
  drift = np.abs(np.asarray(params["output"]) - np.asarray(start["output"])).max()
  assert 0 < drift < 0.1
  # eval.py reads it as a policy: the oracle on world prompts, SFT start vs DPO.
  report = eval_run.run(str(tmp_path / "full"), num_prompts=4)
  assert report["stage"] == "dpo" and set(report) >= {"initial", "trained"}
  assert "reward accuracy" in (tmp_path / "full" / "eval" / "eval.md").read_text()

  # Stopped after 2 steps (a checkpoint), then resumed: bitwise the uninterrupted run; the
  # resume reads the reference tables back from the cache.
  c.train.stop_after_steps = 2
  first = stages.run(c, str(tmp_path / "split"))
  assert first["steps"] == 2 and not first["finished"]
  c.train.stop_after_steps = 0
  rest = stages.run(c, str(tmp_path / "split"))
  assert rest["finished"] and _reference_info(tmp_path / "split")["cached"]
  assert_same_run(tmp_path / "full", tmp_path / "split")
  assert rest["eval"] == full["eval"]

  # Without the cache the resume recomputes the same tables (one deterministic pass).
  c.train.stop_after_steps = 2
  stages.run(c, str(tmp_path / "nocache"))
  os.remove(tmp_path / "nocache" / reference.CACHE)
  c.train.stop_after_steps = 0
  stages.run(c, str(tmp_path / "nocache"))
  assert not _reference_info(tmp_path / "nocache")["cached"]
  assert_same_run(tmp_path / "full", tmp_path / "nocache")


def test_cache_of_another_config_is_not_used(tmp_path, sft_final):
  c = _config(sft_final)
  tables = {("world_helpfulness", "train"): (np.zeros(3, np.float32), np.ones(3, np.float32))}
  path = str(tmp_path / reference.CACHE)
  reference.save(path, reference.fingerprint(c), tables)
  parts = [("world_helpfulness", "train", 3)]
  got = reference.load(path, reference.fingerprint(c), parts)
  np.testing.assert_array_equal(got[("world_helpfulness", "train")][1], np.ones(3))
  c.dpo.max_seq_len = 96
  assert reference.load(path, reference.fingerprint(c), parts) is None
  assert reference.load(path, reference.fingerprint(_config(sft_final)),
                        [("world_helpfulness", "train", 4)]) is None


@pytest.mark.parametrize("change, match", [
    (dict(beta=0.0), "config.dpo.beta"),
    (dict(beta=float("nan")), "config.dpo.beta"),
    (dict(batch_size=0), "config.dpo.batch_size"),
    (dict(batch_size=6), "config.dpo.batch_size"),  # not divisible by grad_accum_steps = 4
    (dict(overlong="cut"), "config.dpo.overlong"),
    (dict(sources="world_helpfulness,bogus"), "config.dpo.sources"),
    (dict(max_seq_len=4096), "config.dpo.max_seq_len"),
    (dict(reference_batch_size=-1), "config.dpo.reference_batch_size"),
    (dict(init_from=""), "config.init_from"),
])
def test_bad_settings_are_rejected_before_anything_is_written(tmp_path, sft_final, change, match):
  c = _config(sft_final)
  c.train.grad_accum_steps = 4
  change = dict(change)
  if "init_from" in change:
    c.init_from = change.pop("init_from")
  for k, v in change.items():
    c.dpo[k] = v
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    stages.run(c, str(workdir))
  assert not workdir.exists()


def test_dry_run_plans_the_train_step_and_the_reference_pass():
  c = dpo_tiny.get_config()
  p = dry_run.plan(c)
  names = [s["name"] for s in p["steps"]]
  assert names == ["dpo.train_step", "dpo.reference_logps"]
  train, ref = p["steps"]
  assert train["batch_shapes"]["chosen_tokens"] == (16, 128)
  assert train["batch_shapes"]["ref_chosen_logps"] == (16,)
  assert ref["batch_shapes"]["chosen_tokens"] == (16, 128)
  assert ref["per_device"]["optimizer_state"] == 0 < ref["per_device"]["params"]
  assert train["per_device"]["optimizer_state"] >= 2 * train["per_device"]["params"]
  assert "dpo.reference_logps" in dry_run.format_plan(p)
  c.dpo.batch_size = 10
  c.train.grad_accum_steps = 4
  with pytest.raises(ValueError, match="config.dpo.batch_size"):
    dry_run.plan(c)
