"""Evaluation of a finished reward-model workdir (``python eval.py --workdir=<reward workdir>``).

Llama 2 paper, Table 8: accuracy on held-out preference pairs, overall and per rating bucket
(significantly better / better / slightly better / negligibly better or unsure), and for safety
data per safety label (chosen safe & rejected unsafe / both safe / both unsafe). Also the reward
distributions of chosen vs rejected responses and a calibration plot of the predicted
``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)`` (Bradley-Terry) against the observed
frequency. Writes ``<workdir>/eval/reward_eval.json``, ``reward_eval.md``,
``reward_distributions.png`` and ``calibration.png``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from llama_jax import build, evaluation, reward
from llama_jax.data import pipeline, sources
from llama_jax.tokenizer import Tokenizer


def score_pairs(params: Any, cfg, tokenizer, records: Sequence[Mapping[str, Any]], max_seq_len: int,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list]:
  """(r_chosen [n], r_rejected [n], kept records) for the pairs that fit ``max_seq_len``
  (single process, host params)."""
  examples, kept = [], []
  for r in records:
    ex = pipeline.preference_example(r, tokenizer, max_seq_len)
    if ex is not None:
      examples.append(ex)
      kept.append(r)
  step = jax.jit(functools.partial(reward.pair_scores, cfg=cfg))
  rc, rr = [], []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    pad = batch_size - len(chunk)
    batch = {k: np.stack([e[k] for e in chunk] + [np.zeros_like(chunk[0][k])] * pad)
             for k in reward.PAIR_KEYS}
    c, r, _ = step(params, batch=batch)
    rc.append(np.asarray(c)[:len(chunk)])
    rr.append(np.asarray(r)[:len(chunk)])
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)
  return cat(rc), cat(rr), kept


def _acc(mask: np.ndarray, correct: np.ndarray) -> dict:
  n = int(mask.sum())
  return {"accuracy": float(correct[mask].mean()) if n else float("nan"), "n": n}


def calibration(r_chosen: np.ndarray, r_rejected: np.ndarray, bins: int = 10) -> dict:
  """Reliability of ``p = sigmoid(r_chosen - r_rejected)``. Each pair is counted in both orders,
  ``(p, chosen wins = 1)`` and ``(1 - p, 0)``, so the observed frequency of a bin is the share of
  its entries whose first response is the human-preferred one.

  Returns:
    ``{"bin_edges", "predicted" (mean p per bin, None if empty), "observed", "count", "ece"}``
    (expected calibration error: count-weighted mean |observed - predicted|).
  """
  p = 1.0 / (1.0 + np.exp(-(r_chosen - r_rejected)))
  probs = np.concatenate([p, 1.0 - p])
  wins = np.concatenate([np.ones_like(p), np.zeros_like(p)])
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
  pred, obs, count = [], [], []
  for b in range(bins):
    sel = which == b
    count.append(int(sel.sum()))
    pred.append(float(probs[sel].mean()) if sel.any() else None)  # None: empty bin (JSON null)
    obs.append(float(wins[sel].mean()) if sel.any() else None)
  ece = sum(c * abs(o - q) for c, o, q in zip(count, obs, pred) if c) / max(sum(count), 1)
  return {"bin_edges": edges.tolist(), "predicted": pred, "observed": obs, "count": count,
          "ece": float(ece)}


def summarize(records: Sequence[Mapping[str, Any]], r_chosen: np.ndarray,
              r_rejected: np.ndarray) -> dict:
  """Accuracy (``r_chosen > r_rejected``) overall, per rating (``RATINGS`` + ``none``), per safety
  label (when any record has one), reward statistics and calibration."""
  correct = r_chosen > r_rejected
  ratings = np.array([r.get("rating") or "none" for r in records])
  labels = np.array([r.get("safety_label") or "none" for r in records])
  out = {"overall": _acc(np.ones(len(records), bool), correct),
         "per_rating": {k: _acc(ratings == k, correct) for k in sources.RATINGS + ("none",)
                        if (ratings == k).any()}}
  if (labels != "none").any():
    out["per_safety_label"] = {k: _acc(labels == k, correct) for k in sources.SAFETY_LABELS
                               if (labels == k).any()}
  stats = lambda x: {"mean": float(np.mean(x)), "std": float(np.std(x))} if len(x) else {}
  out["reward_chosen"], out["reward_rejected"] = stats(r_chosen), stats(r_rejected)
  out["calibration"] = calibration(r_chosen, r_rejected)
  return out


def _plots(scored: Mapping[str, tuple], out_dir: str) -> dict:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = len(scored)
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.5), squeeze=False)
  for ax, (name, (rc, rr, _)) in zip(axes[0], scored.items()):
    lo, hi = float(min(rc.min(), rr.min())), float(max(rc.max(), rr.max()))
    bins = np.linspace(lo, hi + 1e-6, 40)
    ax.hist(rc, bins=bins, alpha=0.6, label="chosen")
    ax.hist(rr, bins=bins, alpha=0.6, label="rejected")
    ax.set_xlabel("reward")
    ax.set_title(name)
    ax.legend()
  fig.tight_layout()
  dist = os.path.join(out_dir, "reward_distributions.png")
  fig.savefig(dist, dpi=100)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
  for name, (rc, rr, _) in scored.items():
    cal = calibration(rc, rr)
    pts = [(p, o) for p, o, c in zip(cal["predicted"], cal["observed"], cal["count"]) if c]
    ax.plot(*zip(*pts), marker="o", label=f"{name} (ECE {cal['ece']:.3f})")
  ax.set_xlabel("predicted P(first preferred)")
  ax.set_ylabel("observed frequency")
  ax.legend(fontsize=8)
  fig.tight_layout()
  cal_png = os.path.join(out_dir, "calibration.png")
  fig.savefig(cal_png, dpi=100)
  plt.close(fig)
  return {"distributions_png": dist, "calibration_png": cal_png}


def markdown(result: Mapping[str, Any]) -> str:
  """The Table-8-style markdown report of ``run``'s result."""
  lines = [f"# Reward model evaluation: {result['workdir']} ({result['model']} RM)", ""]
  seen = {k for s in result["sources"].values() for k in s["per_rating"]}
  cols = ["source", "pairs", "overall"] + [k for k in sources.RATINGS + ("none",) if k in seen]
  rows, label_rows = [], []
  for name, s in result["sources"].items():
    row = {"source": name, "pairs": s["overall"]["n"], "overall": s["overall"]["accuracy"]}
    row.update({k: f"{v['accuracy']:.3f} (n={v['n']})" for k, v in s["per_rating"].items()})
    rows.append(row)
    if "per_safety_label" in s:
      label_rows.append({"source": name, **{k: f"{v['accuracy']:.3f} (n={v['n']})"
                                            for k, v in s["per_safety_label"].items()}})
  lines += ["Held-out accuracy, overall and per rating bucket (Llama 2 Table 8):", "",
            evaluation.markdown_table(rows, cols), ""]
  if label_rows:
    lines += ["Per safety label:", "",
              evaluation.markdown_table(label_rows, ["source"] + list(sources.SAFETY_LABELS)), ""]
  stat_rows = [{"source": n, "reward_chosen": s["reward_chosen"].get("mean", float("nan")),
                "reward_rejected": s["reward_rejected"].get("mean", float("nan")),
                "ece": s["calibration"]["ece"]} for n, s in result["sources"].items()]
  lines += ["Mean rewards and calibration error:", "",
            evaluation.markdown_table(stat_rows, ["source", "reward_chosen", "reward_rejected", "ece"])]
  return "\n".join(lines) + "\n"


def run(workdir: str) -> dict:
  """Evaluate a reward workdir on the held-out split of each of its preference sources.

  Raises:
    FileNotFoundError: if ``config.json`` or the reward model ``final/`` is missing.
  """
  from llama_jax import reward_run  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  cfg, params = reward.load_reward_model(os.path.join(workdir, "final"))
  tok_path = config.tokenizer.path
  tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model") if tok_path == "world" else tok_path)
  names = build.parse_list(config.reward.sources, "config.reward.sources")
  builders = reward_run.preference_builders(config, workdir)
  scored = {}
  for name, b in zip(names, builders):
    records = build.heldout_records([b])
    if config.reward.eval_pairs:
      records = records[:config.reward.eval_pairs]
    scored[name] = score_pairs(params, cfg, tokenizer, records, config.reward.max_seq_len)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  result = {"workdir": os.path.abspath(workdir), "stage": "reward", "model": config.reward.model,
            "margin": config.reward.margin,
            "sources": {n: summarize(kept, rc, rr) for n, (rc, rr, kept) in scored.items()}}
  result.update(_plots({n: v for n, v in scored.items() if len(v[0])}, out_dir))
  metrics = os.path.join(workdir, "logs", "metrics.jsonl")
  if os.path.exists(metrics):
    result["loss_plot"] = evaluation.plot_curves(metrics, os.path.join(out_dir, "loss.png"),
                                                 keys=("loss", "accuracy"))
  with open(os.path.join(out_dir, "reward_eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "reward_eval.md"), "w") as f:
    f.write(markdown(result))
  return result
