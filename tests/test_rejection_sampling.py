"""Rejection sampling: best-of-K, pooling across iterations, JSONL, curves (loop references)."""

from __future__ import annotations

import itertools
import json
import pathlib
import statistics

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.rejection_sampling import step as rs
from llama_jax.sampling import generate

P1 = [{"role": "user", "content": "Hi"}]
P2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_select_best_ties_lowest_index():
  scores = np.array([[0.1, 0.5, 0.5], [2.0, 2.0, 1.0], [-1.0, -3.0, -0.5], [7.0, 7.0, 7.0]])
  want = []
  for row in scores:
    best = 0
    for j in range(len(row)):
      if row[j] > row[best]:
        best = j
    want.append(best)
  assert rs.select_best(scores).tolist() == want == [1, 0, 2, 0]
  # Truncated samples (finished False) are never chosen; no finished sample -> -1.
  finished = np.array([[True, False, True], [False, True, True], [False, False, False],
                       [False, False, True]])
  want = []
  for row, done in zip(scores, finished):
    best = -1
    for j in range(len(row)):
      if done[j] and (best < 0 or row[j] > row[best]):
        best = j
    want.append(best)
  assert rs.select_best(scores, finished).tolist() == want == [2, 1, -1, 2]
  with pytest.raises(ValueError, match="finished"):
    rs.select_best(scores, finished[:2])
  with pytest.raises(ValueError, match="NaN"):
    rs.select_best([[0.0, float("nan")]])
  with pytest.raises(ValueError, match="n_prompts, K"):
    rs.select_best([1.0, 2.0])


def _records(iteration, scores_by_prompt):
  prompts = [P1, P2][:len(scores_by_prompt)]
  samples = [[f"it{iteration}-p{i}-s{j}" for j in range(len(s))]
             for i, s in enumerate(scores_by_prompt)]
  return rs.make_records(prompts, samples, scores_by_prompt, iteration=iteration, temperature=1.2)


def test_pool_keeps_best_across_iterations():
  it1 = _records(1, [[0.2, 0.9], [0.4, 0.1]])
  it2 = _records(2, [[0.5, 0.3], [0.4, 0.8]])  # p1 regresses (0.5 < 0.9), p2 improves
  it3 = _records(3, [[0.9, 0.0]])  # tie with it1 on p1: earlier one stays
  pooled = rs.pool(rs.pool(rs.pool({}, it1), it2), it3)
  best = {json.loads(k)[-1]["content"]: r for k, r in pooled.items()}
  assert best["Hi"]["samples"][best["Hi"]["chosen"]] == "it1-p0-s1"
  assert best["Hi"]["iteration"] == 1
  assert best["2+2?"]["samples"][best["2+2?"]["chosen"]] == "it2-p1-s1"
  # Choosing only among the last iteration would have kept the regression.
  last_only = rs.pool({}, it2)
  assert max(r["scores"][r["chosen"]] for r in last_only.values()) == 0.8
  assert rs.best_score(best["Hi"]) == 0.9
  # The previous pool is not modified.
  first = rs.pool({}, it1)
  snapshot = json.dumps(first, sort_keys=True)
  rs.pool(first, it2)
  assert json.dumps(first, sort_keys=True) == snapshot
  assert rs.pool_from_records(it1 + it2 + it3) == pooled


def test_jsonl_roundtrip_and_validation(tmp_path):
  records = _records(1, [[0.2, 0.9], [0.4, 0.1]])
  path = rs.write_records(tmp_path / "it1.jsonl", records)
  lines = pathlib.Path(path).read_text().splitlines()
  assert len(lines) == 2 and json.loads(lines[0])["chosen"] == 1
  assert rs.read_jsonl(path) == records
  bad = dict(records[0], chosen=5)
  (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1.*chosen"):
    rs.read_jsonl(tmp_path / "bad.jsonl")
  (tmp_path / "bad2.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match="invalid JSON"):
    rs.read_jsonl(tmp_path / "bad2.jsonl")
  with pytest.raises(ValueError, match="scores"):
    rs.write_records(tmp_path / "x.jsonl", [dict(records[0], scores=[0.1])])
  with pytest.raises(ValueError, match="must match"):
    rs.make_records([P1], [["a"], ["b"]], [[0.0], [1.0]], iteration=1, temperature=1.0)


def test_make_records_skips_truncated_samples_and_prompts():
  records = rs.make_records([P1, P2], [["a", "b"], ["c", "d"]], [[0.9, 0.1], [0.5, 0.7]],
                            iteration=1, temperature=1.0,
                            finished=[[False, True], [False, False]], is_safety=[True, False])
  assert len(records) == 1  # P2 has no finished sample
  assert records[0]["chosen"] == 1 and records[0]["finished"] == [False, True]
  assert records[0]["is_safety"] is True
  with pytest.raises(ValueError, match="truncated"):
    rs.validate_record(dict(records[0], chosen=0))
  with pytest.raises(ValueError, match="empty sample"):
    rs.validate_record(dict(records[0], samples=["a", " "]))


def test_pool_rescores_earlier_picks_with_the_current_reward():
  # Iteration 1 picked "old-best" under an RM that scored it 0.95; the retrained RM scores it 0.2.
  it1 = rs.make_records([P1, P2], [["old-best", "old-other"], ["keep", "x"]],
                        [[0.95, 0.1], [0.3, 0.2]], iteration=1, temperature=1.0,
                        is_safety=[False, True])
  it2 = rs.make_records([P1], [["new-a", "new-b"]], [[0.4, 0.6]], iteration=2, temperature=1.0)
  current = {"old-best": 0.2, "keep": 0.8}
  seen = []

  def score_fn(records):
    seen.extend((r["samples"][r["chosen"]], r["is_safety"]) for r in records)
    return [current[r["samples"][r["chosen"]]] for r in records]

  rescored = rs.rescore(it1, score_fn)
  assert seen == [("old-best", False), ("keep", True)]
  assert [(r["samples"], r["scores"], r["chosen"], r["iteration"]) for r in rescored] == [
      (["old-best"], [0.2], 0, 1), (["keep"], [0.8], 0, 1)]
  pooled = rs.pool(rs.pool_from_records(rescored), it2)
  best = {json.loads(k)[-1]["content"]: r["samples"][r["chosen"]] for k, r in pooled.items()}
  # Without re-scoring the stale 0.95 would have kept "old-best" over this iteration's 0.6.
  assert best == {"Hi": "new-b", "2+2?": "keep"}
  stale = rs.pool(rs.pool_from_records(it1), it2)
  assert {json.loads(k)[-1]["content"]: r["samples"][r["chosen"]]
          for k, r in stale.items()}["Hi"] == "old-best"
  assert rs.rescore([], score_fn) == []
  with pytest.raises(ValueError, match="shape"):
    rs.rescore(it1, lambda records: [0.1])


def test_to_sft_records():
  pooled = rs.pool({}, _records(1, [[0.2, 0.9], [0.4, 0.1]]))
  sft = rs.to_sft_records(pooled)
  assert len(sft) == 2
  by_last_user = {r["messages"][-2]["content"]: r for r in sft}
  assert by_last_user["Hi"]["messages"] == P1 + [{"role": "assistant", "content": "it1-p0-s1"}]
  assert by_last_user["2+2?"]["messages"] == P2 + [{"role": "assistant", "content": "it1-p1-s0"}]


def _ref_curve(scores, ns, estimator):
  out = {"n": list(ns), "max": [], "median": []}
  for n in ns:
    mx, med = [], []
    for row in scores.tolist():
      if estimator == "first":
        mx.append(max(row[:n]))
        med.append(statistics.median(row[:n]))
      else:  # brute force over all subsets
        subs = list(itertools.combinations(row, n))
        mx.append(sum(max(s) for s in subs) / len(subs))
        med.append(sum(statistics.median(s) for s in subs) / len(subs))
    out["max"].append(sum(mx) / len(mx))
    out["median"].append(sum(med) / len(med))
  return out


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(scores=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)),
                                    elements=st.floats(-5, 5)),
                  estimator=st.sampled_from(["first", "subsets"]))
def test_reward_vs_n_matches_reference(scores, estimator):
  ns = list(range(1, scores.shape[1] + 1))
  got = rs.reward_vs_n(scores, ns, estimator)
  want = _ref_curve(scores, ns, estimator)
  assert got["n"] == want["n"]
  np.testing.assert_allclose(got["max"], want["max"], atol=1e-9)
  np.testing.assert_allclose(got["median"], want["median"], atol=1e-9)
  if estimator == "subsets":  # the expected max never decreases with N
    assert all(b >= a - 1e-12 for a, b in zip(got["max"], got["max"][1:]))


def test_reward_vs_temperature_and_plots(tmp_path):
  rng = np.random.RandomState(0)
  by_t = {1.3: rng.randn(5, 8) + 1.0, 0.7: rng.randn(5, 8)}
  curve = rs.reward_vs_temperature(by_t, n=4)
  assert curve["temperature"] == [0.7, 1.3]
  assert curve["max"][1] == pytest.approx(float(np.mean(by_t[1.3][:, :4].max(axis=1))))
  with pytest.raises(ValueError, match="1..K"):
    rs.reward_vs_n(by_t[0.7], [9])
  p1 = rs.plot_reward_vs_n({"RLHF-V1": rs.reward_vs_n(by_t[0.7])}, tmp_path / "fig7.png")
  p2 = rs.plot_reward_vs_temperature({"RLHF-V1": curve}, tmp_path / "fig8.png")
  for p in (p1, p2):
    assert pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_k_reproducible_and_row_order(llama2_tokenizer_path):
  tok = lj.Tokenizer(llama2_tokenizer_path)
  cfg = lj.LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                       max_seq_len=128)
  params = lj.init_params(cfg, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 20, params)
  prompts = [P1, P2]
  a, done, lengths = rs.sample_k(params, cfg, tok, prompts, 3, jax.random.key(1), 1.0, 6)
  b, _, _ = rs.sample_k(params, cfg, tok, prompts, 3, jax.random.key(1), 1.0, 6)
  c, _, _ = rs.sample_k(params, cfg, tok, prompts, 3, jax.random.key(2), 1.0, 6)
  assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
  assert [len(x) for x in done] == [3, 3] and all(isinstance(f, bool) for x in done for f in x)
  assert a != c
  # A truncated sample used the whole budget; a finished one ended within it (EOS counted).
  assert all((n == 6) if not f else (1 <= n <= 6) for x, y in zip(done, lengths)
             for f, n in zip(x, y))
  assert len(set(a[0] + a[1])) > 1  # sampling, not one repeated string
  # Near-zero temperature: every sample of prompt i is prompt i's own greedy completion.
  cold, cold_done, cold_len = rs.sample_k(params, cfg, tok, prompts, 2, jax.random.key(3), 1e-4, 6)
  for i, p in enumerate(prompts):
    ids = tok.encode_dialog(p)[0].tolist()
    g = generate(params, cfg, [ids], jax.random.key(0), max_new_tokens=6, temperature=0.0,
                 eos_id=tok.eos_id, pad_id=tok.pad_id)
    n = int(g.lengths[0]) - int(g.finished[0])
    greedy = tok.decode(np.asarray(g.tokens[0, :n]).tolist()).strip()
    assert cold[i] == [greedy, greedy]
    assert cold_done[i] == [bool(g.finished[0])] * 2
    assert cold_len[i] == [int(g.lengths[0])] * 2
  with pytest.raises(ValueError, match="temperature"):
    rs.sample_k(params, cfg, tok, prompts, 2, jax.random.key(3), 0.0, 6)


def test_answered_needs_an_eos_and_some_text():
  texts = [["The answer is 5.", "", "  ", "Sorry."], ["x", "y", "z", " w "]]
  finished = [[True, True, True, False], [False, True, True, True]]
  assert rs.answered(texts, finished) == [[True, False, False, False], [False, True, True, True]]
