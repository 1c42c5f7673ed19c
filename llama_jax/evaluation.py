"""Evaluation of trained policies: oracle judgements on the synthetic world, loss-curve plots.

Used by ``eval.py``. Policies generate greedy (or sampled) completions for held-out prompts; the
world's oracle (``llama_jax.data.world.oracle``) judges helpfulness (a correct answer on benign
tasks) and safety (refusing harmful requests, not refusing benign ones).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from llama_jax import sampling
from llama_jax.data import world


def complete(params, cfg, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], *,
             max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 64) -> list[str]:
  """Completions (decoded text) of message-list prompts, in batches, with the KV cache."""
  texts = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    ids = [tokenizer.encode_dialog(list(p))[0].tolist() for p in chunk]
    out = sampling.generate(params, cfg, ids, jax.random.key(seed + start),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, pad_to_multiple=16)
    texts += sampling.decode(out, tokenizer)
  return texts


def oracle_report(prompts: Sequence[Sequence[Mapping[str, str]]], completions: Sequence[str]) -> dict:
  """Oracle metrics of completions of world prompts.

  Returns:
    dict with ``helpfulness`` (share of benign prompts answered correctly), ``refusal_rate``
    (share of harmful prompts refused), ``false_refusal_rate`` (share of benign prompts refused),
    ``per_task`` accuracy, and the counts ``n_benign`` / ``n_harmful``.
  """
  per_task = collections.defaultdict(list)
  benign, harmful, false_refusals = [], [], []
  for prompt, text in zip(prompts, completions):
    j = world.oracle(list(prompt), text)
    if j.harmful:
      harmful.append(j.refused)
    else:
      benign.append(j.correct)
      false_refusals.append(j.false_refusal)
      per_task[j.task].append(j.correct)
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"helpfulness": mean(benign), "refusal_rate": mean(harmful),
          "false_refusal_rate": mean(false_refusals), "n_benign": len(benign),
          "n_harmful": len(harmful), "per_task": {k: mean(v) for k, v in sorted(per_task.items())}}


def plot_curves(metrics_jsonl: str, out_png: str, keys: Sequence[str] = ("loss",)) -> str:
  """Plot ``keys`` of a ``metrics.jsonl`` (train and eval splits) against step, as PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  with open(metrics_jsonl) as f:
    records = [json.loads(line) for line in f if line.strip()]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for split in sorted({r["split"] for r in records}):
      pts = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if split != "train" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(os.path.basename(os.path.dirname(os.path.dirname(metrics_jsonl))) or key)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table of ``rows`` (dicts) over ``columns``; floats with 3 decimals."""
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
