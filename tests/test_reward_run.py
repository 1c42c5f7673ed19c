"""Reward stage end to end: mixture ratios, record rejection before step 0, smoke runs, eval."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from llama_jax import convert
import llama_jax as lj
from llama_jax.recipe import eval_run
from llama_jax.reward import data as reward_data
from llama_jax.reward import run as reward_run
from llama_jax.reward import step as reward
from llama_jax.train import build
from configs import reward_hh_tiny, reward_tiny

GOOD = {"prompt": "What is 2 plus 2?", "chosen": "The answer is 4.", "rejected": "I like turtles.",
        "rating": "better"}


def _tiny_config(tmp_path, model="helpfulness", **reward_fields):
  c = reward_tiny.get_config(model)
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.multiple_of = 16
  c.data.tfds_dir = str(tmp_path / "tfds")
  c.reward.batch_size, c.reward.world_train_pairs, c.reward.world_heldout_pairs = 4, 24, 8
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 3, 1, 0
  c.train.async_checkpoint = False
  for k, v in reward_fields.items():
    c.reward[k] = v
  return c


def test_mixture_ratios_and_determinism(tmp_path):
  c = _tiny_config(tmp_path, "safety")
  c.reward.world_train_pairs = 200
  builders = reward_data.preference_builders(c, str(tmp_path / "w"))
  n = 2000

  def draw(seed):
    ds = build.mixed_records(builders, c.reward.weights, "w", seed)
    return [ds[i] for i in range(n)]

  a = draw(0)
  share = np.mean([r["safety_label"] is not None for r in a])  # world safety pairs carry a label
  assert abs(share - 0.9) < 4 * np.sqrt(0.9 * 0.1 / n), share
  assert a == draw(0) and a != draw(1)


def _write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


@pytest.mark.parametrize("bad, field", [
    ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen"),
    (dict(GOOD, rejected=GOOD["chosen"]), "rejected"),
    (dict(GOOD, rating="much_better"), "rating"),
    (dict(GOOD, chosen="   "), "chosen"),
])
def test_malformed_records_rejected_before_step_0(tmp_path, bad, field):
  path = _write(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
  c = _tiny_config(tmp_path, sources="jsonl_preferences", weights="")
  c.data.preference_jsonl_path = path
  c.data.tfds_dir = ""
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=re.escape(f"{path}, line 3, field '{field}'")):
    reward_run.run(c, workdir)
  assert not os.path.exists(workdir)


def test_overlong_pair_rejected_with_file_and_line(tmp_path):
  good = [dict(GOOD, prompt=f"What is {i} plus 2?") for i in range(20)]
  long = dict(GOOD, prompt="count the words: " + " ".join(["apple"] * 200))
  path = _write(tmp_path / "prefs.jsonl", good[:5] + [long] + good[5:])
  c = _tiny_config(tmp_path, sources="jsonl_preferences", weights="")
  c.data.preference_jsonl_path = path
  c.data.tfds_dir, c.data.heldout_fraction = "", 0.3
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=re.escape(path) + r", line 6: .* more than config.reward.max_seq_len=128"):
    reward_run.run(c, workdir)
  assert not os.path.exists(workdir)


def test_negative_safety_aux_weight_rejected_before_step_0(tmp_path):
  c = _tiny_config(tmp_path, "safety", safety_aux_weight=-0.5)
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=re.escape("config.reward.safety_aux_weight")):
    reward_run.run(c, workdir)
  assert not os.path.exists(workdir)


def test_tiny_world_smoke_from_sft_checkpoint_and_eval(tmp_path):
  c = _tiny_config(tmp_path, safety_aux_weight=0.5)  # the aux term on the world_safety pairs
  cfg = build.model_config(c, 512)
  sft_final = str(tmp_path / "sft_final")
  llama = lj.init_params(cfg, jax.random.key(3))
  convert.save_orbax(sft_final, cfg, llama)
  c.init_from = sft_final
  workdir = str(tmp_path / "rm")
  out = reward_run.run(c, workdir)
  assert out["steps"] == 3 and np.isfinite(out["train"]["loss"])
  # The weight reaches train_step: loss = ranking + 0.5 * aux sum / pairs (log_every 1: last step).
  tr = out["train"]
  assert tr["safety_labelled"] > 0 and tr["safety_aux_loss"] > 0
  assert tr["loss"] == pytest.approx(tr["ranking_loss"] + 0.5 * tr["safety_aux_loss"]
                                     * tr["safety_labelled"] / tr["pairs"], rel=1e-5)
  assert 0.0 <= out["eval"]["world_helpfulness/accuracy"] <= 1.0
  assert out["eval"]["world_safety/safety_aux_loss"] > 0
  assert 0.0 <= out["eval"]["world_safety/unsafe_recall_at_0.5"] <= 1.0
  assert "world_helpfulness/safety_aux_loss" not in out["eval"]  # no labelled pair there
  assert out["eval"]["world_helpfulness/pairs"] == 8
  got_cfg, params = reward.load_reward_model(out["final_dir"])
  assert got_cfg.dim == 32 and "output" not in params
  # The trunk starts from the SFT checkpoint: embeddings moved by at most 3 small AdamW steps.
  drift = np.abs(params["tok_embeddings"] - np.asarray(llama["tok_embeddings"])).max()
  assert 0 < drift < 0.1
  result = eval_run.run(workdir)
  assert result["stage"] == "reward"
  helpful = result["sources"]["world_helpfulness"]
  assert helpful["overall"]["n"] == 8 and sum(v["n"] for v in helpful["per_rating"].values()) == 8
  safety = result["sources"]["world_safety"]
  assert "per_safety_label" in safety and result["safety_aux_weight"] == 0.5
  # Unsafe detection at rejection_sampling.safety_threshold (0.15) and at 0.5, and the aux loss:
  # the same quantities the held-out eval of the last step computed with reward.eval_step.
  assert [d["threshold"] for d in safety["unsafe_detection"]] == [0.15, 0.5]
  at_half = safety["unsafe_detection"][1]
  assert at_half["n_unsafe"] + at_half["n_safe"] == 2 * sum(
      v["n"] for v in safety["per_safety_label"].values())
  if at_half["n_unsafe"]:
    assert at_half["recall"] == pytest.approx(out["eval"]["world_safety/unsafe_recall_at_0.5"],
                                              abs=1e-6)
  assert safety["safety_aux_loss"] == pytest.approx(out["eval"]["world_safety/safety_aux_loss"],
                                                    rel=1e-4)
  assert "unsafe_detection" not in helpful
  md = open(os.path.join(workdir, "eval", "reward_eval.md")).read()
  assert "Unsafe-response detection" in md and "| world_safety | 0.150 |" in md
  for name in ("reward_eval.json", "reward_eval.md", "calibration.png", "reward_distributions.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0


def test_stop_after_steps_then_resume_equals_uninterrupted(tmp_path):
  c = _tiny_config(tmp_path)
  full = reward_run.run(c, str(tmp_path / "full"))
  c.train.stop_after_steps = 1
  first = reward_run.run(c, str(tmp_path / "split"))
  assert first["steps"] == 1 and not first["finished"] and "final_dir" not in first
  assert not os.path.exists(tmp_path / "split" / "result.json")
  c.train.stop_after_steps = 0
  rest = reward_run.run(c, str(tmp_path / "split"))
  assert rest["finished"] and rest["steps"] == full["steps"] == 3
  _, a = reward.load_reward_model(full["final_dir"])
  _, b = reward.load_reward_model(rest["final_dir"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hh_rlhf_safety_smoke(tmp_path, hh_rlhf_path, llama2_tokenizer_path):
  c = reward_hh_tiny.get_config()
  c.tokenizer.path = str(llama2_tokenizer_path)
  c.data.hh_rlhf_path = str(hh_rlhf_path)
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 2, 1
  c.model.multiple_of = 16
  c.reward.batch_size, c.reward.max_seq_len, c.reward.eval_pairs = 2, 128, 4
  c.train.num_steps, c.train.checkpoint_every, c.train.async_checkpoint = 2, 0, False
  out = reward_run.run(c, str(tmp_path / "rm_hh"))
  assert out["steps"] == 2 and np.isfinite(out["train"]["loss"]) and out["train"]["margin"] == 0.0
  stats = json.load(open(tmp_path / "rm_hh" / "data_stats.json"))
  assert stats["hh_rlhf/train"]["dropped_overlong"] > 0  # counted, not silently lost
  assert 0 < out["eval"]["hh_rlhf/pairs"] <= 4  # the first 4 held-out pairs, minus overlong ones


def test_every_pair_dropped_fails_before_step_0_naming_the_source(tmp_path):
  long = [dict(GOOD, prompt=f"count the words {i}: " + " ".join(["apple"] * 200)) for i in range(8)]
  path = _write(tmp_path / "prefs.jsonl", long)
  c = _tiny_config(tmp_path, sources="jsonl_preferences", weights="")
  c.data.preference_jsonl_path = path
  c.data.tfds_dir, c.data.heldout_fraction = "", 0.3
  c.reward.overlong = "drop"
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"reward source 'jsonl_preferences' \(train split\): none of its \d+ pref"):
    reward_run.run(c, workdir)
  assert not os.path.exists(workdir)
