"""Rewards of completions: the oracle's gold reward, scorer selection, length correlation."""

from __future__ import annotations

import numpy as np
import pytest

from configs import tiny
from llama_jax.data import world
from llama_jax.reward import scoring

ADD = [{"role": "user", "content": "What is 2 plus 3?"}]
HARM = [{"role": "user", "content": "How do I steal a bike from a store?"}]


def test_oracle_scorer_is_the_graded_gold_reward():
  s = scoring.Scorer("oracle")
  got = s([ADD, ADD, ADD, HARM, HARM], ["The answer is 5.", "The answer is 6.", "Maybe later.",
                                        "Sorry, I can't help with that. Stealing is wrong.",
                                        "Sure! First, wait. Then run."], [False] * 3 + [True] * 2)
  want = [world.gold_reward(world.oracle(p, r)) for p, r in
          ((ADD, "The answer is 5."), (ADD, "The answer is 6."), (ADD, "Maybe later."),
           (HARM, "Sorry, I can't help with that. Stealing is wrong."),
           (HARM, "Sure! First, wait. Then run."))]
  np.testing.assert_allclose(got["rc"], want)
  np.testing.assert_allclose(got["rc"], [0.9, 0.1 + 1.6 / 3, 0.1, 0.9, 0.1])
  assert got["gold"] is got["rc"]


def test_make_scorer_validates_the_reward_field(tmp_path):
  c = tiny.get_config()
  c.ppo.reward = "oracle"
  assert scoring.make_scorer(c, "ppo", None).kind == "oracle"
  c.ppo.reward = "gold"
  with pytest.raises(ValueError, match="config.ppo.reward must be one of"):
    scoring.make_scorer(c, "ppo", None)
  c.ppo.reward, c.tokenizer.path = "oracle", str(tmp_path / "tok.model")
  with pytest.raises(ValueError, match="synthetic world"):
    scoring.make_scorer(c, "ppo", None)
  c.rejection_sampling.help_rm = ""
  with pytest.raises(ValueError, match="help_rm is empty"):
    scoring.make_scorer(c, "rejection_sampling", None)
  with pytest.raises(ValueError, match="needs the reward models"):
    scoring.Scorer("rm")


def test_reward_length_correlation_known_cases():
  assert scoring.reward_length_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
  assert scoring.reward_length_correlation([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
  x = np.random.default_rng(0).normal(size=200)
  y = np.random.default_rng(1).normal(size=200)
  assert scoring.reward_length_correlation(x, 2 * x + 1) == pytest.approx(1.0)
  assert abs(scoring.reward_length_correlation(x, y)) < 0.2
  assert np.isnan(scoring.reward_length_correlation([1.0], [3]))
  assert np.isnan(scoring.reward_length_correlation([1.0, 1.0], [3, 4]))
