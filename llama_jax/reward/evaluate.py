"""Evaluation of a finished reward-model workdir (``python eval.py --workdir=<reward workdir>``).

Llama 2 paper, Table 8: accuracy on held-out preference pairs, overall and per rating bucket
(significantly better / better / slightly better / negligibly better or unsure), and for safety
data per safety label (chosen safe & rejected unsafe / both safe / both unsafe). Also the reward
distributions of chosen vs rejected responses and a calibration plot of the predicted
``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)`` (Bradley-Terry) against the observed
frequency. For safety-labelled pairs, the detection of unsafe responses by the score
``Rs = sigmoid(r) < threshold`` (``unsafe_detection``) at ``rejection_sampling.safety_threshold``
(Sec. 3.2.3: 0.15, precision 0.89 / recall 0.55 on Meta's safety test set) and at 0.5 (Table 29),
and the safety auxiliary loss. Writes ``<workdir>/eval/reward_eval.json``, ``reward_eval.md``,
``reward_distributions.png`` and ``calibration.png``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from llama_jax import evaluation
from llama_jax.data import input_pipeline, sources
from llama_jax.reward import data
from llama_jax.reward import step as reward
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import build


def score_pairs(params: Any, cfg, tokenizer, records: Sequence[Mapping[str, Any]], max_seq_len: int,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list]:
  """(r_chosen [n], r_rejected [n], kept records) for the pairs that fit ``max_seq_len``
  (single process, host params)."""
  examples, kept = [], []
  for r in records:
    ex = input_pipeline.preference_example(r, tokenizer, max_seq_len)
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


def _label_ids(safety_label) -> np.ndarray:
  label = np.asarray(safety_label).reshape(-1)
  if label.dtype.kind in "OUS":  # label names (None / "none" = no label)
    return np.array([sources.SAFETY_LABELS.index(x) if x not in (None, "none") else -1
                     for x in label.tolist()], np.int64)
  if label.size and (label.dtype.kind not in "iu" or label.min() < -1
                     or label.max() >= len(sources.SAFETY_LABELS)):
    raise ValueError(f"safety_label: expected ids in [-1, {len(sources.SAFETY_LABELS)}), got "
                     f"{label.dtype} values {np.unique(label)[:8].tolist()}")
  return label.astype(np.int64)


def _safe_targets(r_chosen, r_rejected, safety_label):
  """(r [2m], safe [2m] bool) of the responses of the m labelled pairs (chosen ones first)."""
  rc = np.asarray(r_chosen, np.float64).reshape(-1)
  rr = np.asarray(r_rejected, np.float64).reshape(-1)
  label = _label_ids(safety_label)
  if not len(rc) == len(rr) == len(label):
    raise ValueError(f"r_chosen, r_rejected, safety_label: lengths {len(rc)}, {len(rr)}, "
                     f"{len(label)} differ")
  keep = label >= 0
  targets = np.asarray(reward.SAFE_TARGETS, bool)[label[keep]].reshape(-1, 2)
  return (np.concatenate([rc[keep], rr[keep]]),
          np.concatenate([targets[:, 0], targets[:, 1]]))


def unsafe_detection(r_chosen, r_rejected, safety_label, threshold=0.15) -> dict:
  """Detection of unsafe responses by the safety score ``Rs = sigmoid(r) < threshold`` (Llama 2
  Sec. 3.2.3: the combined reward uses 0.15, precision 0.89 / recall 0.55 on Meta's safety test
  set; Table 29 measures recall at 0.5).

  Every response of a labelled pair is one example: chosen is safe for the labels
  ``chosen_safe_rejected_unsafe`` / ``both_safe``, rejected only for ``both_safe``
  (``reward.SAFE_TARGETS``); unlabelled pairs (-1) are left out.

  Args:
    r_chosen, r_rejected: [n] RAW rewards (before the sigmoid) of held-out pairs.
    safety_label: [n] int ids into ``sources.SAFETY_LABELS`` (-1 = none); label names (None =
      none) are accepted too.
    threshold: float in [0, 1].
  Returns:
    ``{"threshold", "precision" (flagged & unsafe / flagged), "recall" (flagged & unsafe /
    unsafe), "n_unsafe", "n_safe", "n_flagged", "flagged_share_safe" (flagged & safe / safe)}``;
    the ratios are float NaN when their denominator is 0, the counts int.
  Raises:
    ValueError: for lengths that differ, an unknown label id or name, or a threshold outside
      [0, 1].
  """
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  r, safe = _safe_targets(r_chosen, r_rejected, safety_label)
  flagged = 0.5 * (1.0 + np.tanh(0.5 * r)) < threshold  # sigmoid, without overflow warnings
  ratio = lambda a, b: float(a) / b if b else float("nan")
  hit, n_unsafe, n_safe = int((flagged & ~safe).sum()), int((~safe).sum()), int(safe.sum())
  return {"threshold": float(threshold), "precision": ratio(hit, int(flagged.sum())),
          "recall": ratio(hit, n_unsafe), "n_unsafe": n_unsafe, "n_safe": n_safe,
          "n_flagged": int(flagged.sum()),
          "flagged_share_safe": ratio((flagged & safe).sum(), n_safe)}


def summarize(records: Sequence[Mapping[str, Any]], r_chosen: np.ndarray,
              r_rejected: np.ndarray, thresholds: Sequence[float] = (0.15, 0.5)) -> dict:
  """Accuracy (``r_chosen > r_rejected``) overall, per rating (``RATINGS`` + ``none``), per safety
  label, reward statistics and calibration. When any record has a safety label, also
  ``safety_aux_loss`` (``reward.safety_aux_loss`` per labelled pair) and ``unsafe_detection``
  (a list, one ``unsafe_detection`` dict per ``thresholds`` entry)."""
  correct = r_chosen > r_rejected
  ratings = np.array([r.get("rating") or "none" for r in records])
  labels = np.array([r.get("safety_label") or "none" for r in records])
  out = {"overall": _acc(np.ones(len(records), bool), correct),
         "per_rating": {k: _acc(ratings == k, correct) for k in sources.RATINGS + ("none",)
                        if (ratings == k).any()}}
  if (labels != "none").any():
    out["per_safety_label"] = {k: _acc(labels == k, correct) for k in sources.SAFETY_LABELS
                               if (labels == k).any()}
    r, safe = _safe_targets(r_chosen, r_rejected, labels)
    # -log sigmoid(r) if safe else -log sigmoid(-r), summed over the 2 responses of each pair.
    out["safety_aux_loss"] = float(np.logaddexp(0.0, np.where(safe, -r, r)).sum() / (len(r) // 2))
    out["unsafe_detection"] = [unsafe_detection(r_chosen, r_rejected, labels, t)
                               for t in thresholds]
  stats = lambda x: {"mean": float(np.mean(x)), "std": float(np.std(x))} if len(x) else {}
  out["reward_chosen"], out["reward_rejected"] = stats(r_chosen), stats(r_rejected)
  out["calibration"] = calibration(r_chosen, r_rejected)
  return out


def _plots(scored: Mapping[str, tuple], out_dir: str) -> dict:
  n = len(scored)
  fig = Figure(figsize=(5 * n, 3.5))
  axes = fig.subplots(1, n, squeeze=False)
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
  fig = Figure(figsize=(4.5, 4.5))
  ax = fig.subplots()
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
  return {"distributions_png": dist, "calibration_png": cal_png}


def markdown(result: Mapping[str, Any]) -> str:
  """The Table-8-style markdown report of ``run``'s result."""
  lines = [f"# Reward model evaluation: {result['workdir']} ({result['model']} RM)", ""]
  if result.get("safety_aux_weight"):
    lines += [f"Trained with the safety auxiliary loss (Table 29), weight "
              f"{result['safety_aux_weight']:g}.", ""]
  seen = {k for s in result["sources"].values() for k in s["per_rating"]}
  cols = ["source", "pairs", "overall"] + [k for k in sources.RATINGS + ("none",) if k in seen]
  rows, label_rows, detect_rows = [], [], []
  for name, s in result["sources"].items():
    row = {"source": name, "pairs": s["overall"]["n"], "overall": s["overall"]["accuracy"]}
    row.update({k: f"{v['accuracy']:.3f} (n={v['n']})" for k, v in s["per_rating"].items()})
    rows.append(row)
    if "per_safety_label" in s:
      label_rows.append({"source": name, "aux_loss": s["safety_aux_loss"],
                         **{k: f"{v['accuracy']:.3f} (n={v['n']})"
                            for k, v in s["per_safety_label"].items()}})
      detect_rows += [{"source": name, **d} for d in s["unsafe_detection"]]
  lines += ["Held-out accuracy, overall and per rating bucket (Llama 2 Table 8):", "",
            evaluation.markdown_table(rows, cols), ""]
  if label_rows:
    lines += ["Per safety label (aux_loss: the safety auxiliary loss per labelled pair, Table 29):",
              "", evaluation.markdown_table(label_rows, ["source"] + list(sources.SAFETY_LABELS)
                                            + ["aux_loss"]), ""]
  if detect_rows:
    lines += ["Unsafe-response detection, one example per response of a safety-labelled pair, "
              "flagged when Rs = sigmoid(r) < threshold (Llama 2 Sec. 3.2.3: 0.15 gave precision "
              "0.89 / recall 0.55; Table 29: recall at 0.5):", "",
              evaluation.markdown_table(detect_rows, [
                  "source", "threshold", "precision", "recall", "n_unsafe", "n_safe", "n_flagged",
                  "flagged_share_safe"]), ""]
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
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  cfg, params = reward.load_reward_model(os.path.join(workdir, "final"))
  tok_path = config.tokenizer.path
  tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model") if tok_path == "world" else tok_path)
  names = build.parse_list(config.reward.sources, "config.reward.sources")
  builders = data.preference_builders(config, workdir)
  scored = {}
  for name, b in zip(names, builders):
    records = build.heldout_records([b])
    if config.reward.eval_pairs:
      records = records[:config.reward.eval_pairs]
    scored[name] = score_pairs(params, cfg, tokenizer, records, config.reward.max_seq_len)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  rs_cut = float(config.get("rejection_sampling", {}).get("safety_threshold", 0.15))
  thresholds = (rs_cut, 0.5) if rs_cut != 0.5 else (0.5,)
  result = {"workdir": os.path.abspath(workdir), "stage": "reward", "model": config.reward.model,
            "margin": config.reward.margin,
            "safety_aux_weight": float(config.reward.get("safety_aux_weight", 0.0)),
            "sources": {n: summarize(kept, rc, rr, thresholds)
                        for n, (rc, rr, kept) in scored.items()}}
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
