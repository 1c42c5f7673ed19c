"""Cluster-bootstrap confidence intervals (llama_jax.stats) against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama_jax import stats

Z95 = 1.959964


def width(d):
  return d["hi"] - d["lo"]


# ---------------------------------------------------------------- known answers

def test_iid_bernoulli_interval_matches_normal_approximation():
  n, p = 10_000, 0.3
  x = (np.random.default_rng(1).random(n) < p).astype(float)
  d = stats.bootstrap_mean(x)
  assert d["mean"] == pytest.approx(x.mean(), abs=1e-15)
  assert d["n"] == n and d["clusters"] == n
  assert d["lo"] <= p <= d["hi"]
  assert d["lo"] < d["mean"] < d["hi"]
  expected = 2 * Z95 * math.sqrt(p * (1 - p) / n)
  assert width(d) == pytest.approx(expected, rel=0.15)
  assert d["se"] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.15)


def test_clustering_widens_interval_to_number_of_clusters():
  c, k = 200, 20
  cluster_value = (np.random.default_rng(2).random(c) < 0.5).astype(float)
  x = np.repeat(cluster_value, k)  # [c * k], 20 identical rows per cluster
  ids = np.repeat(np.arange(c), k)
  clustered = stats.bootstrap_mean(x, ids)
  naive = stats.bootstrap_mean(x)
  assert clustered["n"] == c * k and clustered["clusters"] == c
  assert naive["clusters"] == c * k
  assert clustered["mean"] == naive["mean"] == pytest.approx(cluster_value.mean())
  # Width of c independent rows, not of c * k.
  assert width(clustered) == pytest.approx(2 * Z95 * math.sqrt(0.25 / c), rel=0.15)
  assert width(naive) == pytest.approx(2 * Z95 * math.sqrt(0.25 / (c * k)), rel=0.15)
  assert width(clustered) / width(naive) == pytest.approx(math.sqrt(k), rel=0.2)


def test_unequal_cluster_sizes_weight_by_rows():
  # Cluster "a": 1 row of 1; cluster "b": 9 rows of 0. Statistic is the row mean 0.1 (not the
  # mean of cluster means 0.5). Resamples {a,a}: 1, {a,b}: 0.1, {b,b}: 0 with prob 1/4, 1/2, 1/4.
  x = [1.0] + [0.0] * 9
  ids = ["a"] + ["b"] * 9
  d = stats.bootstrap_mean(x, ids, n_boot=20_000, seed=3)
  assert d["mean"] == pytest.approx(0.1)
  assert d["clusters"] == 2 and d["n"] == 10
  assert d["lo"] == 0.0 and d["hi"] == 1.0
  exp_mean = 0.25 * 1.0 + 0.5 * 0.1
  exp_sd = math.sqrt(0.25 * 1.0 + 0.5 * 0.01 - exp_mean ** 2)  # 0.406
  assert d["se"] == pytest.approx(exp_sd, rel=0.03)


def test_single_cluster_has_zero_width():
  d = stats.bootstrap_mean([0.0, 1.0, 1.0], clusters=[7, 7, 7])
  assert d["clusters"] == 1
  assert d["lo"] == d["hi"] == pytest.approx(2 / 3)
  assert d["se"] == pytest.approx(0.0, abs=1e-15)


def test_none_clusters_equal_one_cluster_per_row_and_labels_do_not_matter():
  x = np.random.default_rng(4).normal(size=50)
  none = stats.bootstrap_mean(x, seed=5)
  assert stats.bootstrap_mean(x, np.arange(50), seed=5) == none
  assert stats.bootstrap_mean(x, [f"p{i}" for i in range(50)], seed=5) == none
  assert stats.bootstrap_mean(x, [(i, "x") for i in range(50)], seed=5) == none


# ---------------------------------------------------------------- paired difference

def test_paired_exact_shift_gives_zero_width():
  b = (np.random.default_rng(6).random(500) < 0.4).astype(float)
  a = b + 0.1
  d = stats.bootstrap_paired_difference(a, b, clusters=np.arange(500) // 5)
  assert d["mean"] == pytest.approx(0.1, abs=1e-12)
  assert d["lo"] == pytest.approx(0.1, abs=1e-12)
  assert d["hi"] == pytest.approx(0.1, abs=1e-12)
  assert width(d) < 1e-12 and d["se"] < 1e-12
  assert d["n"] == 500 and d["clusters"] == 100


def test_paired_interval_narrower_than_unpaired_with_correlated_noise():
  rng = np.random.default_rng(7)
  c, k = 300, 4
  prompt_effect = np.repeat(rng.normal(0.0, 1.0, c), k)  # shared by a and b
  ids = np.repeat(np.arange(c), k)
  b = prompt_effect + rng.normal(0.0, 0.2, c * k)
  a = prompt_effect + 0.05 + rng.normal(0.0, 0.2, c * k)
  paired = stats.bootstrap_paired_difference(a, b, ids)
  da = stats.bootstrap_mean(a, ids, seed=1)
  db = stats.bootstrap_mean(b, ids, seed=2)
  unpaired_width = math.hypot(width(da), width(db))  # independent arms: variances add
  assert paired["mean"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
  assert paired["lo"] <= 0.05 <= paired["hi"]
  assert width(paired) < 0.25 * unpaired_width
  # The same draw for both arms: identical to bootstrapping the row differences.
  assert stats.bootstrap_mean(a - b, ids) == paired


# ---------------------------------------------------------------- win rate

def test_win_rate_hand_example():
  a = [3.0, 1.0, 2.0, 2.0, 0.0]
  b = [1.0, 1.0, 3.0, 0.0, 0.0]
  d = stats.win_rate(a, b)
  assert (d["wins"], d["ties"], d["losses"]) == (2, 2, 1)
  assert d["mean"] == pytest.approx((2 + 0.5 * 2) / 5)
  assert d["n"] == 5 and d["clusters"] == 5
  assert 0.0 <= d["lo"] <= d["mean"] <= d["hi"] <= 1.0
  r = stats.win_rate(b, a)
  assert (r["wins"], r["ties"], r["losses"]) == (1, 2, 2)
  assert r["mean"] == pytest.approx(1.0 - d["mean"])


def test_win_rate_is_bootstrap_mean_of_scores():
  rng = np.random.default_rng(8)
  a = rng.integers(0, 3, 400).astype(float)
  b = rng.integers(0, 3, 400).astype(float)
  ids = np.arange(400) // 4
  d = stats.win_rate(a, b, ids, seed=9)
  score = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  ref = stats.bootstrap_mean(score, ids, seed=9)
  for key in ref:
    assert d[key] == ref[key]
  assert d["wins"] + d["ties"] + d["losses"] == 400


# ---------------------------------------------------------------- coverage

def test_coverage_of_95_percent_interval():
  p, n, trials = 0.2, 300, 200
  rng = np.random.default_rng(10)
  covered = 0
  for t in range(trials):
    x = (rng.random(n) < p).astype(float)
    d = stats.bootstrap_mean(x, n_boot=400, seed=t)
    covered += d["lo"] <= p <= d["hi"]
  assert 0.90 <= covered / trials <= 0.99


# ---------------------------------------------------------------- format, determinism, errors

def test_format_ci():
  d = {"mean": 0.5124, "lo": 0.47099, "hi": 0.5531}
  assert stats.format_ci(d) == "0.512 [0.471, 0.553]"
  assert stats.format_ci(d, digits=1) == "0.5 [0.5, 0.6]"


def test_deterministic_for_fixed_seed():
  rng = np.random.default_rng(11)
  x = rng.random(300)
  y = rng.random(300)
  ids = np.arange(300) // 3
  assert stats.bootstrap_mean(x, ids, seed=3) == stats.bootstrap_mean(x, ids, seed=3)
  assert (stats.bootstrap_paired_difference(x, y, ids, seed=3)
          == stats.bootstrap_paired_difference(x, y, ids, seed=3))
  assert stats.win_rate(x, y, ids, seed=3) == stats.win_rate(x, y, ids, seed=3)
  other = stats.bootstrap_mean(x, ids, seed=4)
  assert (other["lo"], other["hi"]) != (stats.bootstrap_mean(x, ids, seed=3)["lo"],
                                        stats.bootstrap_mean(x, ids, seed=3)["hi"])


@pytest.mark.parametrize("call, match", [
    (lambda: stats.bootstrap_mean([0.1, float("nan"), 0.3]), "values.*NaN"),
    (lambda: stats.bootstrap_mean([]), "values.*empty"),
    (lambda: stats.bootstrap_mean(np.zeros((2, 2))), "values.*1-D"),
    (lambda: stats.bootstrap_mean([0.0, 1.0], clusters=[0]), "clusters"),
    (lambda: stats.bootstrap_mean([0.0, 1.0], n_boot=99), "n_boot"),
    (lambda: stats.bootstrap_mean([0.0, 1.0], level=1.0), "level"),
    (lambda: stats.bootstrap_mean([0.0, 1.0], level=0.0), "level"),
    (lambda: stats.bootstrap_paired_difference([0.0, 1.0], [0.0]), "a and b"),
    (lambda: stats.bootstrap_paired_difference([0.0, 1.0], [0.0, np.nan]), "b.*NaN"),
    (lambda: stats.bootstrap_paired_difference([], []), "a.*empty"),
    (lambda: stats.bootstrap_paired_difference([0.0], [1.0], clusters=[1, 2]), "clusters"),
    (lambda: stats.win_rate([np.nan], [1.0]), "a.*NaN"),
    (lambda: stats.win_rate([1.0, 2.0], [1.0]), "a and b"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
