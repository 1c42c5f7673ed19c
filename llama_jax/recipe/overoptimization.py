"""Reward over-optimization curves: proxy (learned RM) and gold (oracle) reward against sqrt(KL).

Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": optimizing a learned (proxy)
reward raises the proxy score monotonically while the gold score rises, peaks and falls as the
policy moves away from its initialization; both are plotted against ``d = sqrt(KL(pi || pi_init))``
(nats). Two optimizers are measured:

* best-of-n (rejection sampling's selection): for n samples of the initial policy, the one with
  the highest proxy reward; ``KL_bon(n) = log n - (n - 1) / n`` (Stiennon et al. 2020, Gao et al.
  2022 Sec. 2), and the expected proxy / gold reward of the pick is computed exactly from K >= n
  samples per prompt (:func:`best_of_n_curve`, an average over all n-subsets);
* PPO: its held-out evaluations (proxy reward, gold reward, sequence KL to SFT), read from the
  PPO stage's ``ppo_progress.json``.

Shape letters: p prompts, k samples per prompt.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence

from matplotlib.figure import Figure
import numpy as np

from llama_jax.rejection_sampling import step as rs_lib


def bon_kl(n: int) -> float:
  """KL(best-of-n || initial policy) in nats: ``log n - (n - 1) / n`` (exact for a continuous
  reward without ties; Stiennon et al. 2020, App. G.3)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  return math.log(n) - (n - 1) / n


def best_of_n_curve(proxy, gold, ns: Optional[Sequence[int]] = None) -> Dict[str, list]:
  """Expected proxy and gold reward of the best-of-n pick (by proxy), averaged over prompts.

  For each prompt the k samples are ranked by proxy reward (ties in the order given); the pick
  of a uniformly random n-subset is its highest-ranked member, so the expectation over all
  ``C(k, n)`` subsets is a weighted sum over ranks (``rejection_sampling.order_stat_weights`` with j = n), with no resampling
  noise.

  Args:
    proxy: [p, k] float proxy (reward-model) rewards of k samples per prompt.
    gold: [p, k] float gold (oracle) rewards of the same samples.
    ns: the n values, each in 1..k (default 1, 2, 4, ..., up to k).
  Returns:
    ``{"n", "kl", "sqrt_kl", "proxy", "gold"}`` lists (KL from :func:`bon_kl`).
  Raises:
    ValueError: on mismatched or non-2-D shapes, NaN, or an n outside 1..k.
  """
  proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
  if proxy.ndim != 2 or proxy.shape != gold.shape or proxy.size == 0:
    raise ValueError(f"proxy and gold must be the same [p, k] shape, got {proxy.shape}, "
                     f"{gold.shape}")
  if np.isnan(proxy).any() or np.isnan(gold).any():
    raise ValueError("proxy/gold contain NaN")
  k = proxy.shape[1]
  if ns is None:
    ns = [2 ** i for i in range(int(math.log2(k)) + 1)]
  if any(not 1 <= n <= k for n in ns):
    raise ValueError(f"every n must be in 1..{k}, got {list(ns)}")
  order = np.argsort(proxy, axis=1, kind="stable")
  p_sorted = np.take_along_axis(proxy, order, axis=1)
  g_sorted = np.take_along_axis(gold, order, axis=1)
  out: Dict[str, list] = {"n": [], "kl": [], "sqrt_kl": [], "proxy": [], "gold": []}
  for n in ns:
    w = rs_lib.order_stat_weights(k, int(n), int(n))
    out["n"].append(int(n))
    out["kl"].append(bon_kl(int(n)))
    out["sqrt_kl"].append(math.sqrt(bon_kl(int(n))))
    out["proxy"].append(float(np.mean(p_sorted @ w)))
    out["gold"].append(float(np.mean(g_sorted @ w)))
  return out


def ppo_curve(evals: Sequence[Mapping[str, Any]]) -> Dict[str, list]:
  """PPO's held-out evaluations as a curve: ``{"iteration", "kl", "sqrt_kl", "proxy", "gold"}``
  (``kl`` = ``kl_sft``, the sequence KL to SFT, clipped at 0 for the square root; ``proxy`` =
  the stage's ``reward``; ``gold`` NaN where absent). Evaluations without ``kl_sft`` are
  skipped."""
  rows = sorted((e for e in evals if "kl_sft" in e), key=lambda e: e["iteration"])
  return {"iteration": [int(e["iteration"]) for e in rows],
          "kl": [float(e["kl_sft"]) for e in rows],
          "sqrt_kl": [math.sqrt(max(float(e["kl_sft"]), 0.0)) for e in rows],
          "proxy": [float(e["reward"]) for e in rows],
          "gold": [float(e.get("gold", float("nan"))) for e in rows]}


def plot(curves: Mapping[str, Mapping[str, list]], out_png: str | os.PathLike) -> str:
  """Gao et al.-style figure: one panel per curve (label -> :func:`best_of_n_curve` or
  :func:`ppo_curve` output), proxy (dashed) and gold (solid) reward against sqrt(KL)."""
  fig = Figure(figsize=(4.2 * max(len(curves), 1), 3.4))
  axes = fig.subplots(1, max(len(curves), 1), squeeze=False)
  for ax, (label, c) in zip(axes[0], curves.items()):
    ax.plot(c["sqrt_kl"], c["proxy"], "--o", ms=3, label="proxy (reward model)")
    if not all(math.isnan(g) for g in c["gold"]):
      ax.plot(c["sqrt_kl"], c["gold"], "-o", ms=3, label="gold (oracle)")
    ax.set_xlabel("sqrt(KL to SFT) [sqrt(nats)]")
    ax.set_ylabel("reward")
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.fspath(out_png), dpi=110)
  return os.fspath(out_png)
