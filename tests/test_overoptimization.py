"""Over-optimization curves: best-of-n expectations against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import pathlib

import numpy as np
import pytest

from llama_jax.recipe import overoptimization as oo


def _brute(proxy, gold, n):
  """Mean over prompts of the average over all n-subsets of the gold/proxy of the subset's
  highest-proxy member (ties: the lowest index, as a stable sort ranks them)."""
  ps, gs = [], []
  for pr, go in zip(proxy.tolist(), gold.tolist()):
    subs = list(itertools.combinations(range(len(pr)), n))
    picks = [max(s, key=lambda i: (pr[i], -i)) for s in subs]
    ps.append(sum(pr[i] for i in picks) / len(subs))
    gs.append(sum(go[i] for i in picks) / len(subs))
  return float(np.mean(ps)), float(np.mean(gs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_of_n_matches_enumeration(seed):
  rng = np.random.default_rng(seed)
  proxy = rng.normal(size=(5, 7))
  gold = proxy + rng.normal(size=(5, 7))  # a gold reward correlated with the proxy
  curve = oo.best_of_n_curve(proxy, gold, ns=[1, 2, 3, 5, 7])
  for n, p, g in zip(curve["n"], curve["proxy"], curve["gold"]):
    bp, bg = _brute(proxy, gold, n)
    assert p == pytest.approx(bp, abs=1e-12) and g == pytest.approx(bg, abs=1e-12)
  assert curve["proxy"][0] == pytest.approx(proxy.mean())  # n = 1: a random sample
  assert curve["proxy"][-1] == pytest.approx(proxy.max(axis=1).mean())  # n = k: the best
  assert all(b >= a for a, b in zip(curve["proxy"], curve["proxy"][1:]))


def test_gold_can_fall_while_proxy_rises():
  # The proxy prefers samples the gold reward dislikes beyond a point: over-optimization.
  proxy = np.tile(np.arange(8.0), (3, 1))
  gold = -np.square(np.arange(8.0) - 3.0)[None].repeat(3, 0)
  curve = oo.best_of_n_curve(proxy, gold)
  assert curve["n"] == [1, 2, 4, 8]
  assert curve["proxy"] == sorted(curve["proxy"])
  assert curve["gold"][-1] < max(curve["gold"])


def test_bon_kl_and_ppo_curve(tmp_path):
  assert oo.bon_kl(1) == 0.0
  assert oo.bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)
  with pytest.raises(ValueError):
    oo.bon_kl(0)
  evals = [{"iteration": 5, "reward": 0.6, "gold": 0.5, "kl_sft": 0.25},
           {"iteration": 0, "reward": 0.5, "gold": 0.4, "kl_sft": -1e-9},
           {"iteration": 10, "reward": 0.7}]
  curve = oo.ppo_curve(evals)
  assert curve["iteration"] == [0, 5] and curve["sqrt_kl"] == [0.0, 0.5]
  assert curve["proxy"] == [0.5, 0.6] and curve["gold"] == [0.4, 0.5]
  png = oo.plot({"best-of-n": oo.best_of_n_curve(np.eye(4), np.eye(4)), "PPO": curve},
                tmp_path / "o.png")
  assert pathlib.Path(png).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="same"):
    oo.best_of_n_curve(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="1..3"):
    oo.best_of_n_curve(np.zeros((2, 3)), np.zeros((2, 3)), ns=[4])
