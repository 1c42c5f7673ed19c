"""RRHF step (Yuan et al. 2023, Eqs. 2-4): the loss and its metrics against a loop-based NumPy
reference, the train step against per-row log-probs from a loop over the model's logits,
gradient accumulation, padding rows and prompts, the loss falling on a fixed batch, and the
candidate sets read from sampled-set files."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.rrhf import data as rrhf_data
from llama_jax.rrhf import step as rrhf
from llama_jax.train import optim
from llama_jax.train.state import init_train_state
from test_dpo import CFG, OPT, T, _loop_logprob, _row


@pytest.fixture(scope="module")
def params():
  return lj.init_params(CFG, jax.random.key(0))


def _loop_rrhf(logps, lengths, scores, valid, rank_weight=1.0, length_penalty=1.0):
  """The loss and metrics one prompt and one pair at a time."""
  loss = rank_total = sft_total = best_total = correct = pairs = prompts = 0.0
  for b in range(len(logps)):
    idx = [i for i in range(len(logps[b])) if valid[b][i] and lengths[b][i] > 0]
    if not idx:
      continue
    p = {i: float(logps[b][i]) / float(lengths[b][i]) ** length_penalty for i in idx}
    rank = 0.0
    for i in idx:
      for j in idx:
        if scores[b][i] > scores[b][j]:
          rank += max(0.0, p[j] - p[i])
          correct += float(p[i] > p[j])
          pairs += 1
    best = idx[0]
    for i in idx:
      if scores[b][i] > scores[b][best]:
        best = i
    sft = -float(logps[b][best]) / float(lengths[b][best])
    loss += rank_weight * rank + sft
    rank_total, sft_total, best_total = rank_total + rank, sft_total + sft, best_total + p[best]
    prompts += 1
  return loss / prompts, {"rrhf_loss": rank_total / prompts, "sft_loss": sft_total / prompts,
                          "logps/best": best_total / prompts,
                          "ranking_accuracy": correct / max(pairs, 1), "prompts": prompts,
                          "pairs": pairs}


@pytest.mark.parametrize("rank_weight, length_penalty", [(1.0, 1.0), (0.5, 0.0), (2.0, 1.5)])
def test_loss_and_metrics_against_a_loop(rank_weight, length_penalty):
  rng = np.random.default_rng(0)
  b, k = 6, 5
  lengths = rng.integers(1, 20, (b, k)).astype(np.float32)
  logps = (-lengths * rng.uniform(0.2, 3.0, (b, k))).astype(np.float32)
  scores = rng.integers(0, 4, (b, k)).astype(np.float32)  # ties: no pair, the first is best
  valid = rng.random((b, k)) < 0.8
  valid[0] = False  # a prompt without candidates: not counted
  valid[1] = [True, False, False, False, False]  # one candidate: cross-entropy only
  lengths[2, 0] = 0  # a row without a response token is no candidate
  loss, m = rrhf.rrhf_loss(logps, lengths, scores, valid, rank_weight=rank_weight,
                           length_penalty=length_penalty)
  want_loss, want = _loop_rrhf(logps, lengths, scores, valid, rank_weight, length_penalty)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  assert set(m) == set(want)
  for key, v in want.items():
    assert float(m[key]) == pytest.approx(v, rel=1e-5, abs=1e-6), key
  assert want["pairs"] > 10 and 0 < want["ranking_accuracy"] < 1


def test_ranked_like_the_scores_leaves_only_cross_entropy():
  logps = np.array([[-2.0, -4.0, -6.0]], np.float32)
  lengths = np.ones((1, 3), np.float32)
  loss, m = rrhf.rrhf_loss(logps, lengths, np.array([[3.0, 2.0, 1.0]]), np.ones((1, 3), bool))
  assert float(m["rrhf_loss"]) == 0 and float(m["ranking_accuracy"]) == 1
  assert float(loss) == pytest.approx(2.0)  # -log p of the best, one token
  # Reversed scores: every pair wrong; hinge 2 + 4 + 2, cross-entropy on the third row (6).
  loss, m = rrhf.rrhf_loss(logps, lengths, np.array([[1.0, 2.0, 3.0]]), np.ones((1, 3), bool))
  assert float(m["rrhf_loss"]) == pytest.approx(8.0) and float(m["ranking_accuracy"]) == 0
  assert float(loss) == pytest.approx(14.0)


def _batch(seed=0, b=4, k=3, empty_rows=(), empty_prompts=()):
  rng = np.random.default_rng(seed)
  out = {key: np.zeros((b, k, T), bool) for key in ("mask", "response_mask")}
  out["tokens"] = np.zeros((b, k, T), np.int32)
  out["scores"] = rng.normal(size=(b, k)).astype(np.float32)
  out["valid"] = np.ones((b, k), bool)
  for i in range(b):
    p = int(rng.integers(2, 6))
    for j in range(k):
      if i in empty_prompts or (i, j) in empty_rows:
        out["valid"][i, j] = False
        continue
      out["tokens"][i, j], out["mask"][i, j], out["response_mask"][i, j] = _row(
          rng, p, int(rng.integers(1, T - p + 1)))
  return out


def _state(params):
  return init_train_state(params, optim.make_optimizer(OPT, 100), 0)


def _step(accum, **kw):
  return jax.jit(functools.partial(rrhf.train_step, cfg=CFG,
                                   optimizer=optim.make_optimizer(OPT, 100), accum_steps=accum,
                                   **kw))


def test_train_metrics_against_numpy_and_accumulation_equals_one_pass(params):
  batch = _batch(seed=2, b=8, empty_rows=((1, 2), (4, 0)), empty_prompts=(6,))
  one, m1 = _step(1)(_state(params), batch)
  four, m4 = _step(4)(_state(params), batch)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  logps = np.zeros((8, 3))
  lengths = batch["response_mask"][:, :, 1:].sum(-1)
  for i in range(8):
    for j in range(3):
      if batch["valid"][i, j]:
        logps[i, j] = _loop_logprob(params, batch["tokens"][i, j], batch["mask"][i, j],
                                    batch["response_mask"][i, j])
  want_loss, want = _loop_rrhf(logps, lengths, batch["scores"], batch["valid"])
  for m in (m1, m4):
    assert float(m["loss"]) == pytest.approx(want_loss, rel=1e-4)
    assert float(m["prompts"]) == 7 and float(m["skipped"]) == 0
    for key in ("rrhf_loss", "sft_loss", "logps/best", "ranking_accuracy", "pairs"):
      assert float(m[key]) == pytest.approx(want[key], rel=1e-4, abs=1e-4), key


def test_batch_without_a_candidate_is_skipped(params):
  state, m = _step(1)(_state(params), _batch(seed=3, b=2, empty_prompts=(0, 1)))
  assert float(m["skipped"]) == 1 and float(m["prompts"]) == 0 and float(m["loss"]) == 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_falls_and_ranking_is_learned_on_a_fixed_batch(params):
  batch = _batch(seed=4, b=4, k=4)
  step, state = _step(1, rank_weight=1.0), _state(params)
  accs, ranks = [], []
  for _ in range(30):
    state, m = step(state, batch)
    accs.append(float(m["ranking_accuracy"]))
    ranks.append(float(m["rrhf_loss"]))
  assert accs[0] < 0.8 and accs[-1] == 1.0
  assert ranks[-1] < 0.1 * ranks[0]


class _Tok:
  """A character tokenizer with the chat-format calls ``encode_response`` uses."""

  pad_id = 0

  def encode_dialog(self, messages):
    ids = [3 + (ord(c) % 50) for m in messages for c in m["content"]]
    if messages and messages[-1]["role"] == "assistant":
      ids += [2]  # EOS after the answer
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _record(i, samples, scores, finished=None):
  return {"prompt": [{"role": "user", "content": f"question {i}"}], "samples": samples,
          "scores": scores, "chosen": 0, "iteration": 1, "temperature": 1.0,
          "finished": finished or [True] * len(samples)}


def test_candidate_sets_keep_finished_samples_and_name_the_line_of_an_overlong_one(tmp_path):
  from configs import rrhf_tiny
  c = rrhf_tiny.get_config()
  c.rrhf.k, c.rrhf.max_seq_len = 2, 24
  c.data.heldout_fraction = 0.01
  path = _write(tmp_path / "s.jsonl", [
      _record(0, ["good", "bad", "cut"], [0.9, 0.1, 0.95], [True, True, False]),
      _record(1, ["a", " ", "b", "c"], [0.1, 0.9, 0.3, 0.2]),
      _record(2, ["x" * 40], [0.5])])
  c.rrhf.sampled = path
  train, held, stats = rrhf_data.load(c, _Tok())
  sets = {s["prompt"][0]["content"]: s for s in train + held}
  assert sets["question 0"]["responses"] == ["good", "bad"]  # the truncated one left out
  assert sets["question 1"]["scores"] == [0.1, 0.3, 0.2]  # the empty one left out
  assert "question 2" not in sets  # its only sample is overlong (dropped)
  assert stats["truncated_or_empty"] == 2 and stats["overlong"] == 1
  assert stats["beyond_k"] == 1 and stats["sets_without_candidates"] == 1
  ex = rrhf_data.rrhf_example(sets["question 1"], _Tok(), 4, 24)
  assert ex["tokens"].shape == (4, 24) and ex["valid"].tolist() == [True, True, True, False]
  np.testing.assert_allclose(ex["scores"], [0.1, 0.3, 0.2, 0.0])
  c.rrhf.overlong = "error"
  with pytest.raises(ValueError, match=r"s\.jsonl:3: candidate 0 has 51 tokens"):
    rrhf_data.load(c, _Tok())
  c.rrhf.sampled = path + ",missing.jsonl"
  c.rrhf.overlong = "drop"
  with pytest.raises(FileNotFoundError, match="config.rrhf.sampled"):
    rrhf_data.load(c, _Tok())
  c.rrhf.sampled = _write(tmp_path / "bad.jsonl", [_record(0, ["a"], [0.1]), {"prompt": []}])
  with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
    rrhf_data.load(c, _Tok())
