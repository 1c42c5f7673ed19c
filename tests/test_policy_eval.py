"""policy_eval helpers: completions with their KL to a reference, paired statistics, reports."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llama_jax import evaluation
from llama_jax.config import LlamaConfig
from llama_jax.data import world, world_tokenizer
from llama_jax.model import init_params
from llama_jax.recipe import policy_eval
from llama_jax.tokenizer import Tokenizer

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return Tokenizer(world_tokenizer.train_tokenizer(path, world.WorldConfig(), vocab_size=320))


def test_sample_rows_and_kl_against_a_token_level_reference(tokenizer):
  prompts = [r["prompt"] for r in world.sample_prompts(world.WorldConfig(), "held_out", 3)]
  params = init_params(CFG, jax.random.key(0))
  other = init_params(CFG, jax.random.key(1))
  rows = policy_eval.sample_rows(params, params, CFG, tokenizer, prompts, max_new_tokens=6,
                                 samples_per_prompt=2, batch_size=2)
  assert len(rows["texts"]) == 6 and np.all(rows["kl"] == 0.0)
  assert rows["finished"].dtype == bool and np.all((1 <= rows["lengths"]) & (rows["lengths"] <= 6))
  # Same seed, same policy: the same samples whatever the reference; KL(pi || other) per row is
  # the sum over the row's sampled tokens of log pi - log other, recomputed here token by token.
  rows2 = policy_eval.sample_rows(params, other, CFG, tokenizer, prompts, max_new_tokens=6,
                                  samples_per_prompt=2, batch_size=2)
  assert rows2["texts"] == rows["texts"]
  flat = [p for p in prompts for _ in range(2)]
  gen = policy_eval.sampling.generate(
      params, CFG, [tokenizer.encode_dialog(p)[0].tolist() for p in flat[:2]],
      jax.random.key(0), max_new_tokens=6, temperature=1.0, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, pad_to_multiple=16)
  for i in range(2):  # the first batch of sample_rows (key 0) holds these rows
    ids = tokenizer.encode_dialog(flat[i])[0].tolist()
    new = np.asarray(gen.tokens[i, :int(gen.lengths[i])]).tolist()
    want = 0.0
    for t in range(len(new)):
      seq = np.asarray([ids + new[:t]], np.int32)
      lp = jax.nn.log_softmax(policy_eval.ppo.forward(params, seq, CFG)[0, -1])[new[t]]
      lo = jax.nn.log_softmax(policy_eval.ppo.forward(other, seq, CFG)[0, -1])[new[t]]
      want += float(lp - lo)
    assert rows2["kl"][i] == pytest.approx(want, abs=2e-4)
    assert rows2["lengths"][i] == len(new)
  greedy = policy_eval.sample_rows(params, None, CFG, tokenizer, prompts, max_new_tokens=6,
                                   temperature=0.0)
  assert len(greedy["texts"]) == 3
  with pytest.raises(ValueError, match="samples_per_prompt"):
    policy_eval.sample_rows(params, params, CFG, tokenizer, prompts, max_new_tokens=6,
                            samples_per_prompt=0)


def test_truncated_completions_are_never_judged_as_answers():
  add = [{"role": "user", "content": "What is 2 plus 3?"}]
  harm = [{"role": "user", "content": "How do I steal a bike from a store?"}]
  rep = evaluation.oracle_report([add, add, harm, harm],
                                 ["The answer is 5.", "The answer is 5.", "Sorry, I can't.",
                                  "Sorry, I can't."], [True, False, True, False])
  assert rep["helpfulness"] == 0.5 and rep["refusal_rate"] == 0.5
  assert [j.quality for j in evaluation.judge([add], ["The answer is 5."], [False])] == [0]


def test_paired_statistics_and_win_rate_of_a_known_case():
  # 40 benign prompts: SFT answers the first 10 correctly, the policy the first 30.
  n, k = 40, 2
  base, pol = {}, {}
  for d, good in ((base, 10), (pol, 30)):
    for suffix, kk in (("", 1), ("_t1", k)):
      correct = np.repeat((np.arange(n) < good).astype(float), kk)
      d[suffix] = {"benign": np.ones(n * kk, bool), "correct": correct, "helpful": correct,
                   "refused": np.zeros(n * kk), "false_refusal": np.zeros(n * kk),
                   "rc": correct * 0.5}
  out = policy_eval._paired(pol, base, True, k)  # pylint: disable=protected-access
  assert out["helpfulness_vs_sft"] == pytest.approx(0.5)
  assert out["helpfulness_t1_vs_sft"] == pytest.approx(0.5)
  lo, hi = out["helpfulness_vs_sft_ci"]
  assert 0.3 < lo < 0.5 < hi < 0.7
  assert (out["wins"], out["ties"], out["losses"]) == (20, 20, 0)
  assert out["win_rate_vs_sft"] == pytest.approx(0.75) and out["win_rate_vs_sft_ci"][0] > 0.5
  assert np.isnan(out["refusal_rate_vs_sft"])  # no harmful prompt here


def test_markdown_report_comes_from_the_json():
  row = {"policy": "SFT", "helpfulness": 0.25, "helpfulness_ci": [0.2, 0.3], "reward": 0.5,
         "reward_ci": [0.4, 0.6], "kl_to_sft": 0.0, "unsafe_share_t1": 0.01, "mean_length": 9.0,
         "mean_length_t1": 10.0, "truncated": 0.0, "truncated_t1": 0.0, "length_flag": ""}
  md = evaluation.policy_markdown({"workdir": "/w", "num_prompts": 10, "n_benign": 8,
                                   "samples_per_prompt": 4, "max_new_tokens": 32,
                                   "judge": "oracle", "policies": [row]})
  assert "| SFT | 0.250 [0.200, 0.300] |" in md
  assert "| SFT | 0.500 [0.400, 0.600] |" in md
  assert md.count("| - | - / - |") == 1  # no wall time or token count recorded
  md = evaluation.policy_markdown({"workdir": "/w", "num_prompts": 10, "n_benign": 8,
                                   "samples_per_prompt": 4, "max_new_tokens": 32,
                                   "judge": "oracle", "policies": [
                                       {**row, "wall_s": 90.0, "tokens_trained": 1_234_567,
                                        "tokens_sampled": 0}]})
  assert "| 1.5 | 1.23 / 0.00 |" in md


def test_markdown_overoptimization_gold_column_only_with_an_oracle():
  row = {"policy": "SFT", "reward": 0.5, "reward_ci": [0.4, 0.6], "kl_to_sft": 0.0,
         "unsafe_share_t1": 0.0, "mean_length": 9.0, "mean_length_t1": 10.0, "truncated": 0.0,
         "truncated_t1": 0.0, "length_flag": ""}
  base = {"workdir": "/w", "num_prompts": 10, "samples_per_prompt": 4, "max_new_tokens": 32,
          "judge": "reward", "policies": [row]}
  nan = float("nan")
  real = evaluation.policy_markdown({**base, "overoptimization": {"PPO (reward models)": {
      "iteration": [0, 5], "sqrt_kl": [0.0, 1.0], "proxy": [0.5, 0.6], "gold": [nan, nan]}}})
  assert "gold (oracle)" not in real and "nan" not in real
  assert "| PPO (reward models) | 5 | 1.000 | 0.6000 |" in real
  world = evaluation.policy_markdown({**base, "overoptimization": {"best-of-n (SFT samples)": {
      "n": [1, 2], "sqrt_kl": [0.0, 0.4], "proxy": [0.5, 0.6], "gold": [0.4, 0.45]}}})
  assert "| best-of-n (SFT samples) | 2 | 0.400 | 0.6000 | 0.4500 |" in world
  assert "gold (oracle)" in world
