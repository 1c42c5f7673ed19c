"""RAFT (llama_jax.raft): local / global ranking against a loop reference, config checks, and the
stage end to end on tiny models (rounds, distinct prompts, round 2 sampling round 1's policy,
resume after a stop in round 2 bitwise equal to an uninterrupted run)."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny

import llama_jax as lj
from llama_jax import convert
from llama_jax.data import prompts as prompts_lib
from llama_jax.raft import run as raft_run
from llama_jax.raft import step as raft
from llama_jax.recipe import dry_run, sections, stages
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import settings
from train_helpers import (assert_same_run, rl_workdir, tiny_rl_models, tiny_sampling_config,
                           with_stand_in_inputs)


# ---- selection ---------------------------------------------------------------------------------
def _local_ref(scores, finished):
  keep = np.zeros(scores.shape, bool)
  for i in range(scores.shape[0]):
    best = -1
    for j in range(scores.shape[1]):
      if finished[i, j] and (best < 0 or scores[i, j] > scores[i, best]):
        best = j
    if best >= 0:
      keep[i, best] = True
  return keep


def _global_ref(scores, finished, fraction, total):
  m = int(math.floor(fraction * total + 1e-9))
  n, k = scores.shape
  cands = [(-scores[i, j], i * k + j) for i in range(n) for j in range(k) if finished[i, j]]
  keep = np.zeros(scores.shape, bool)
  for _, flat in sorted(cands)[:m]:
    keep[flat // k, flat % k] = True
  return keep


@pytest.mark.parametrize("seed", range(40))
def test_select_matches_a_loop_reference(seed):
  rng = np.random.default_rng(seed)
  n, k = rng.integers(1, 7), rng.integers(1, 6)
  # Few distinct values: many ties, which go to the lower (prompt, sample) index.
  scores = rng.integers(0, 4, (n, k)) / 4.0 if seed % 2 else rng.normal(size=(n, k))
  finished = rng.random((n, k)) < 0.7
  np.testing.assert_array_equal(raft.select(scores, finished), _local_ref(scores, finished))
  extra = int(rng.integers(0, 3)) * k  # prompts left out (no finished sample) still count
  for fraction in (1.0 / (n * k + extra), 1.0 / k, 0.3, 0.5, 1.0):
    if fraction * (n * k + extra) < 1:
      with pytest.raises(ValueError, match="keeps none"):
        raft.select(scores, finished, fraction, n * k + extra)
      continue
    got = raft.select(scores, finished, fraction, n * k + extra)
    want = _global_ref(scores, finished, fraction, n * k + extra)
    np.testing.assert_array_equal(got, want)
    assert not (got & ~finished).any()  # truncated samples are never kept
  assert raft.select(scores).sum() == n  # all finished: one per prompt


def test_ties_and_truncation_by_hand():
  scores = np.array([[0.5, 0.9, 0.9], [0.9, 0.1, 0.95]])
  finished = np.array([[True, True, True], [True, True, False]])
  # Local: row 0's tie goes to sample 1; row 1's best (0.95) is truncated.
  assert raft.select(scores, finished).tolist() == [[False, True, False], [True, False, False]]
  # Global, 3 of 6: the three 0.9s (0.95 is truncated); 2 of 6: the first two of them.
  assert raft.select(scores, finished, 0.5).tolist() == [[False, True, True], [True, False, False]]
  assert raft.select(scores, finished, 2 / 6).tolist() == [[False, True, True],
                                                           [False, False, False]]
  # All finished samples when the share asks for more.
  assert raft.select(scores, finished, 1.0).sum() == 5
  assert raft.num_kept(0.125, 512) == 64 and raft.num_kept(0.29, 100) == 29


def test_kept_records_are_one_sample_records_in_order():
  records = rs_lib.make_records(
      [[{"role": "user", "content": f"q{i}"}] for i in range(3)],
      [["a", "b"], ["c", "d"], ["e", "f"]], [[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]],
      iteration=2, temperature=1.0, finished=[[True, True], [True, False], [False, True]],
      is_safety=[False, True, False])
  kept = raft.kept_records(records, 0.5, num_samples=6)  # 3 of 6
  assert [(r["prompt"][0]["content"], r["samples"]) for r in kept] == [
      ("q0", ["b"]), ("q1", ["c"]), ("q2", ["f"])]
  assert all(r["chosen"] == 0 and r["finished"] == [True] and r["iteration"] == 2 for r in kept)
  assert kept[1]["is_safety"] and kept[1]["scores"] == [0.9]
  assert [r["samples"] for r in raft.kept_records(records, 2 / 6, 6)] == [["b"], ["c"]]
  assert rs_lib.to_sft_records(kept)[2]["messages"][-1] == {"role": "assistant", "content": "f"}


def test_kl_regularized_ranking_matches_a_loop_and_keeps_the_raw_scores():
  rng = np.random.default_rng(0)
  scores, ratios = rng.random((5, 4)), rng.normal(size=(5, 4)) * 3
  got = raft.kl_regularized(scores, ratios, 0.05)
  for i in range(5):
    for j in range(4):
      assert got[i, j] == pytest.approx(scores[i, j] - 0.05 * ratios[i, j])
  np.testing.assert_array_equal(raft.kl_regularized(scores, ratios, 0.0), scores)
  records = rs_lib.make_records([[{"role": "user", "content": f"q{i}"}] for i in range(2)],
                                [["a", "b"], ["c", "d"]], [[0.9, 0.8], [0.1, 0.2]],
                                iteration=2, temperature=1.0)
  # "a" outscores "b" by 0.1 but drifted 4 nats further from pi_0: at kl_coef 0.05, "b" wins.
  kept = raft.kept_records(records, 0.0, 4, ranking=raft.kl_regularized(
      [[0.9, 0.8], [0.1, 0.2]], [[4.0, 0.0], [0.0, 0.0]], 0.05))
  assert [r["samples"] for r in kept] == [["b"], ["d"]] and kept[0]["scores"] == [0.8]
  for bad, match in (((scores, ratios[:, :2], 0.1), "shape"), ((scores, ratios, -1.0), "kl_coef"),
                     ((scores, ratios * np.nan, 0.1), "NaN")):
    with pytest.raises(ValueError, match=match):
      raft.kl_regularized(*bad)


@pytest.mark.parametrize("args,match", [
    (([[np.nan, 1.0]],), "NaN"), (([[1.0, 2.0]], None, 1.5), "keep_fraction"),
    (([[1.0, 2.0]], None, -0.1), "keep_fraction"), (([[1.0, 2.0]], None, 0.4), "keeps none"),
    (([[1.0, 2.0]], None, 0.5, 1), "num_samples"), (([1.0, 2.0],), "n_prompts, K")])
def test_select_errors(args, match):
  with pytest.raises(ValueError, match=match):
    raft.select(*args)


# ---- the stage ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_rl_models(tmp_path_factory.mktemp("raft_models"))


def make_config(models, **raft_fields):
  """2 rounds x 4 prompts x K=3 (two generation batches per round), 8-token samples, one
  fine-tuning step per round on the tiny random policy and RMs."""
  c = tiny_sampling_config(models, "raft")
  r = c.rejection_sampling
  r.num_prompts, r.k, r.max_prompt_len, r.batch_size = 4, 3, 96, 2
  r.auto_temperature, r.plot_prompts = False, 0
  c.raft.num_rounds = 2
  for k, v in raft_fields.items():
    c.raft[k] = v
  return c


def test_log_ratios_match_a_row_by_row_reference(models, tmp_path):
  """raft_run.log_ratios (batched, padded, 64-token widths) against one unpadded forward pass
  per row and a loop over its response tokens; a policy against itself gives 0."""
  c = make_config(models)
  tok = Tokenizer(str(models / "tok" / "tokenizer.model"))
  other = tmp_path / "other"
  cfg, params = convert.load_orbax(str(models / "policy"))
  convert.save_orbax(other, cfg, jax.tree.map(lambda x: x * 1.1, params))
  prompts = [[{"role": "user", "content": "What is 2 plus 3?"}],
             [{"role": "user", "content": "Name a color."}]]
  records = rs_lib.make_records(prompts, [["The answer is 5.", ""], ["Red.", "Blue, I think."]],
                                [[0.5, 0.1], [0.2, 0.3]], iteration=2, temperature=1.0)
  c.rejection_sampling.batch_size, c.rejection_sampling.k = 1, 3  # 3 rows per pass: padded
  got = raft_run.log_ratios(c, records, tok, str(other))
  assert got.shape == (2, 2)
  def logp(p, prompt, text):
    ids, mask = tok.encode_dialog(prompt + [{"role": "assistant", "content": text}])
    logits = np.asarray(lj.forward(p, jnp.asarray([ids]), cfg)[0], np.float64)
    total = 0.0
    for i in range(1, len(ids)):
      if mask[i]:
        row = logits[i - 1]
        total += row[ids[i]] - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
    return total
  other_params = convert.load_orbax(str(other))[1]
  for i, r in enumerate(records):
    for j, text in enumerate(r["samples"]):
      want = logp(other_params, r["prompt"], text) - logp(params, r["prompt"], text)
      assert got[i, j] == pytest.approx(want, abs=2e-3), (i, j)
  np.testing.assert_allclose(raft_run.log_ratios(c, records, tok, str(models / "policy")), 0.0)


def test_stage_with_kl_coef_ranks_round_2_by_the_regularized_reward(models, tmp_path):
  work = rl_workdir(models, tmp_path, "kl")
  res = stages.run(make_config(models, kl_coef=0.5), str(work))
  assert res["finished"] and res["kl_coef"] == 0.5
  records = _records(work / "round_2" / "sampled.jsonl")
  tok = Tokenizer(str(work / "round_2" / "tokenizer.model"))
  ratios = raft_run.log_ratios(make_config(models, kl_coef=0.5), records, tok,
                               str(work / "round_1" / "final"))
  ranking = raft.kl_regularized([r["scores"] for r in records], ratios, 0.5)
  kept = lambda values: [[r["samples"][j]] for r, row in zip(records, raft.select(
      values, [r["finished"] for r in records])) for j in np.flatnonzero(row)]
  want = kept(ranking)
  assert [r["samples"] for r in _records(work / "round_2" / "pooled.jsonl")] == want
  assert kept([r["scores"] for r in records]) != want  # the penalty changed a pick


def _records(path):
  return [json.loads(x) for x in path.read_text().splitlines()]


def _prompts(work, r):
  return {json.dumps(x["prompt"]) for x in _records(work / f"round_{r}" / "sampled.jsonl")}


def _params(path):
  return [np.asarray(x) for x in jax.tree.leaves(convert.load_orbax(str(path))[1])]


def test_rounds_end_to_end_and_resume_bitwise(models, tmp_path, monkeypatch):
  sample_k, calls = rs_lib.sample_k, []
  def recording_sample_k(params, cfg, tok, chunk, k, *args, **kw):
    calls.append(np.asarray(jax.device_get(params["output"])))
    if stop_at == len(calls):
      os.kill(os.getpid(), signal.SIGTERM)  # stops the pass after this batch
    return sample_k(params, cfg, tok, chunk, k, *args, **kw)
  monkeypatch.setattr(rs_lib, "sample_k", recording_sample_k)

  stop_at, full = 0, rl_workdir(models, tmp_path, "full")
  res = stages.run(make_config(models), str(full))
  assert res["finished"] and res["ranking"] == "local" and len(res["rounds"]) == 2
  assert (full / "final" / "params.json").exists()
  assert json.loads((full / "result.json").read_text())["rounds"] == json.loads(
      json.dumps(res["rounds"]))
  for r, summary in enumerate(res["rounds"], 1):
    rd = full / f"round_{r}"
    assert (rd / "final").is_dir() and (rd / "result.json").exists()
    sub = json.loads((rd / "config.json").read_text())
    assert sub["stage"] == "rejection_sampling" and sub["rejection_sampling"]["iteration"] == r
    assert sub["init_from"] == (str(models / "policy") if r == 1 else str(full / "round_1" / "final"))
    # Local ranking: the fine-tuning set is the best finished sample of every prompt.
    sampled = _records(rd / "sampled.jsonl")
    assert summary["prompts"] == 4 and summary["kept"] == len(sampled) >= 1
    assert sorted(x["messages"][-1]["content"] for x in _records(rd / "sft_data.jsonl")) == sorted(
        x["samples"][x["chosen"]] for x in sampled)
    assert summary["kept_reward"] == pytest.approx(np.mean([x["scores"][x["chosen"]] for x in sampled]))
    assert not (rd / "figures" / "reward_vs_temperature.png").exists()
  assert not _prompts(full, 1) & _prompts(full, 2)  # each round draws new prompts
  # Round 1 sampled the initial policy, round 2 the policy round 1 fine-tuned (2 batches each).
  init_out, r1_out = (np.asarray(convert.load_orbax(str(p))[1]["output"])
                      for p in (models / "policy", full / "round_1" / "final"))
  assert len(calls) == 4 and not np.array_equal(init_out, r1_out)
  for i, want in enumerate((init_out, init_out, r1_out, r1_out)):
    np.testing.assert_array_equal(calls[i], want)
  np.testing.assert_array_equal(_params(full / "final")[0], _params(full / "round_2" / "final")[0])

  # A SIGTERM during round 2's first batch: round 1 is done, round 2 stopped after that batch.
  calls.clear()
  stop_at, part = 3, rl_workdir(models, tmp_path, "part")
  stopped = stages.run(make_config(models), str(part))
  assert not stopped["finished"] and stopped["stopped_at"] == "round_2"
  assert (part / "round_1" / "final").is_dir() and not (part / "final").exists()
  assert len(list((part / "round_2" / "sampling").rglob("batch_*.json"))) == 1
  calls.clear()
  stop_at = 0
  resumed = stages.run(make_config(models), str(part))
  assert resumed["finished"] and len(calls) == 1  # round 1 reused, round 2's 2nd batch only
  assert "wall_s" not in resumed["rounds"][0] and "wall_s" in resumed["rounds"][1]
  for key in ("tokens_sampled", "tokens_trained"):  # the rounds' counts, summed; same as full
    full_res = json.loads((full / "result.json").read_text())
    assert resumed[key] == full_res[key] == sum(r[key] for r in resumed["rounds"]) > 0
  for a, b in zip(_params(full / "final"), _params(part / "final")):
    np.testing.assert_array_equal(a, b)
  assert_same_run(full / "round_2" / "finetune", part / "round_2" / "finetune")
  # A finished workdir is not run again; another config is refused.
  assert stages.run(make_config(models), str(part))["rounds"] == resumed["rounds"]
  with pytest.raises(ValueError, match="raft.num_rounds"):
    stages.run(make_config(models, num_rounds=3), str(part))


def test_global_ranking_keeps_the_top_share_of_the_round(models, tmp_path):
  work = rl_workdir(models, tmp_path, "global")
  res = stages.run(make_config(models, num_rounds=1, keep_fraction=0.5), str(work))
  assert res["finished"] and res["ranking"] == "global"
  sampled = _records(work / "round_1" / "sampled.jsonl")
  kept = _records(work / "round_1" / "pooled.jsonl")
  assert kept == raft.kept_records(sampled, 0.5, 4 * 3)
  assert res["rounds"][0]["kept"] == len(kept) == min(6, sum(sum(x["finished"]) for x in sampled))
  finished_scores = sorted((s for x in sampled for s, f in zip(x["scores"], x["finished"]) if f),
                           reverse=True)
  assert sorted((x["scores"][0] for x in kept), reverse=True) == finished_scores[:len(kept)]
  assert [x["messages"][-1]["content"] for x in _records(work / "round_1" / "sft_data.jsonl")] == [
      x["samples"][0] for x in kept]


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "init_from", ""), "config.init_from"),
    (lambda c: c.raft.update(num_rounds=0), "config.raft.num_rounds"),
    (lambda c: c.raft.update(keep_fraction=1 / 13), "config.raft.keep_fraction"),
    (lambda c: c.raft.update(keep_fraction=1.5), "config.raft.keep_fraction"),
    (lambda c: c.raft.update(kl_coef=-0.1), "raft.kl_coef"),
    (lambda c: c.rejection_sampling.update(sample_from="x"), "rejection_sampling.sample_from"),
    (lambda c: c.rejection_sampling.update(pool_from="x"), "rejection_sampling.pool_from"),
    (lambda c: c.rejection_sampling.update(auto_temperature=True), "auto_temperature"),
    (lambda c: c.rejection_sampling.update(help_rm=""), "rejection_sampling.help_rm"),
])
def test_bad_settings_are_rejected_before_anything_is_written(models, tmp_path, change, match):
  c = make_config(models)
  change(c)
  with pytest.raises(ValueError, match=match):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_too_few_prompts_for_the_rounds_is_named(models, tmp_path, monkeypatch):
  load = prompts_lib.load_prompts
  monkeypatch.setattr(prompts_lib, "load_prompts", lambda *a, **kw: load(*a, **kw)[:7])
  with pytest.raises(ValueError, match="num_rounds x config.rejection_sampling.num_prompts = 2 x 4"):
    stages.run(make_config(models), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_missing_reward_model_is_named(models, tmp_path):
  c = make_config(models)
  c.rejection_sampling.safety_rm = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="rejection_sampling.safety_rm"):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# ---- plans and shipped configs -------------------------------------------------------------------
def test_dry_run_plans_a_rounds_finetune_step_and_sampling_pass():
  c = tiny.get_config()
  c.stage = "raft"
  c.rejection_sampling.batch_size, c.rejection_sampling.k = 4, 8
  p = dry_run.plan(c)
  assert [s["name"].split(" ")[0] for s in p["steps"]] == ["sft.train_step", "sampling.sample"]
  assert p["steps"][1]["batch_shapes"]["tokens"] == (4 * 8, c.rejection_sampling.max_new_tokens)
  assert any("scoring" in u for u in p["unavailable"])
  c.raft.kl_coef = 0.1  # the log-ratio pass: batch x K rows of prompt + answer, 64-rounded
  p = dry_run.plan(c)
  assert [s["name"].split(" ")[0] for s in p["steps"]] == [
      "sft.train_step", "sampling.sample", "dpo.step.sequence_logprobs"]
  width = -(-(c.rejection_sampling.max_prompt_len + c.rejection_sampling.max_new_tokens) // 64) * 64
  assert p["steps"][2]["batch_shapes"]["tokens"] == (4 * 8, min(width, c.model.max_seq_len))
  assert p["steps"][2]["per_device"]["optimizer_state"] == 0  # one model live, no AdamW state
  assert not any("kl_coef" in u for u in p["unavailable"])  # planned now, not listed as missing


@pytest.mark.parametrize("name,preset,mesh", [("raft_tiny", "tiny", (1, -1, 1)),
                                              ("raft_7b", "llama2_7b", (1, 8, 1)),
                                              ("raft_70b", "llama2_70b", (1, 8, 8))])
def test_shipped_configs_pass_the_stage_checks(name, preset, mesh, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.stage, c.model.preset, tuple(c.mesh.shape)) == ("raft", preset, mesh)
  assert (c.raft.keep_fraction, c.rejection_sampling.k, c.rejection_sampling.temperature) == (
      0.0, 8, 1.0)
  with_stand_in_inputs(c, tmp_path)
  settings.validate(c, str(tmp_path / "w"), sections.SECTIONS)
  raft_run.validate(c)
