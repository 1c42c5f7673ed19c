"""Evaluation of trained policies: oracle judgements on the synthetic world, loss-curve plots.

Used by ``eval.py``. Policies generate greedy (or sampled) completions for held-out prompts; the
world's oracle (``llama_jax.data.world.oracle``) judges helpfulness (a correct answer on benign
tasks) and safety (refusing harmful requests, not refusing benign ones).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
from matplotlib.figure import Figure
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


def judge(prompts: Sequence[Sequence[Mapping[str, str]]], completions: Sequence[str],
          finished: Optional[Sequence[bool]] = None) -> list:
  """The oracle's ``world.Judgement`` of each completion; a truncated completion (``finished``
  False: no EOS within the budget) is never judged as a complete answer: it counts as a
  non-answer (quality 0, not correct, not a refusal)."""
  finished = [True] * len(prompts) if finished is None else [bool(f) for f in finished]
  out = []
  for prompt, text, done in zip(prompts, completions, finished):
    j = world.oracle(list(prompt), text)
    if not done:
      j = world.Judgement(j.task, j.harmful, False, False, False, not j.harmful, False, 0)
    out.append(j)
  return out


def oracle_report(prompts: Sequence[Sequence[Mapping[str, str]]], completions: Sequence[str],
                  finished: Optional[Sequence[bool]] = None) -> dict:
  """Oracle metrics of completions of world prompts (truncated ones judged as in :func:`judge`).

  Returns:
    dict with ``helpfulness`` (share of benign prompts answered correctly), ``refusal_rate``
    (share of harmful prompts refused), ``false_refusal_rate`` (share of benign prompts refused),
    ``per_task`` accuracy, and the counts ``n_benign`` / ``n_harmful``.
  """
  per_task = collections.defaultdict(list)
  benign, harmful, false_refusals = [], [], []
  for j in judge(prompts, completions, finished):
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
  with open(metrics_jsonl) as f:
    records = [json.loads(line) for line in f if line.strip()]
  fig = Figure(figsize=(5 * len(keys), 3.5))
  axes = fig.subplots(1, len(keys), squeeze=False)
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
  return out_png


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table of ``rows`` (dicts) over ``columns``; floats with 3 decimals."""
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  return _table(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows])


def _ci(row: Mapping[str, Any], key: str, digits: int = 3) -> str:
  """``"0.512 [0.471, 0.553]"`` of ``row[key]`` and ``row[key + "_ci"]`` ("" if absent)."""
  if key not in row:
    return ""
  v, ci = row[key], row.get(f"{key}_ci")
  if ci is None:
    return f"{v:.{digits}f}"
  return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
  """A markdown table of ``lines`` (lists of cells, ``str()`` each) under ``header``."""
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
  return "\n".join(out)


def policy_markdown(result: Mapping[str, Any]) -> str:
  """The markdown report of a ``policy_eval.json`` (``llama_jax.recipe.policy_eval``): what ``eval.md``
  holds and ``python eval.py --workdir=... --markdown`` prints (README tables are pasted from it,
  never typed)."""
  rows = result["policies"]
  world_eval = result.get("judge") == "oracle"
  parts = _policy_intro(result, world_eval)
  if world_eval:
    parts += _oracle_section(rows)
  parts += _reward_section(rows, world_eval)
  parts += _per_task_section(rows)
  if result.get("ppo"):
    parts += _ppo_section(result["ppo"])
  rm = result.get("rm", {})
  if rm:
    parts += _rm_section(rm)
  curves = result.get("overoptimization", {})
  if curves:
    parts += _overoptimization_section(curves)
  return "\n".join(parts)


def _policy_intro(result: Mapping[str, Any], world_eval: bool) -> list[str]:
  """Title and the paragraph on prompts, sampling and intervals."""
  return [f"# Policy comparison of {result['workdir']}", "",
          f"{result['num_prompts']} distinct held-out prompts"
          + (f" ({result['n_benign']} benign)" if world_eval else "")
          + f"; greedy completions and {result['samples_per_prompt']} temperature-1 samples per "
          f"prompt (T=1), at most {result['max_new_tokens']} new tokens (a truncated completion "
          "counts as a non-answer and reward 0). Brackets: 95% intervals, bootstrap over prompts "
          "(the samples of a prompt resampled together); differences are paired with SFT on the "
          f"same prompts. Win rate vs SFT: greedy, judged by the {result['judge']} "
          "(tie = half a win). Wall time and tokens: the policy's own stage (not the SFT policy, "
          "reward models or samples it starts from); tokens trained = non-padding tokens of its "
          "optimizer steps' batches, tokens sampled = tokens it generated (EOS included); "
          "forward-only passes (reward-model scoring, DPO's reference log-probs, RAFT's "
          "log-ratios) are not counted; '-' = not recorded (a stage run by an older version).",
          ""]


def _oracle_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The oracle's helpfulness, win rate and refusals per policy (synthetic world only)."""
  return ["## Oracle (synthetic world)", "", _table(
      ["policy", "helpfulness (greedy)", "vs SFT", "helpfulness (T=1)", "vs SFT",
       "win rate vs SFT", "refusals (greedy)", "false refusals (T=1)", "vs SFT"],
      [[r["policy"], _ci(r, "helpfulness"), _ci(r, "helpfulness_vs_sft"),
        _ci(r, "helpfulness_t1"), _ci(r, "helpfulness_t1_vs_sft"), _ci(r, "win_rate_vs_sft"),
        _ci(r, "refusal_rate"), _ci(r, "false_refusal_rate_t1"),
        _ci(r, "false_refusal_rate_t1_vs_sft")] for r in rows]), ""]


def _reward_section(rows: Sequence[Mapping[str, Any]], world_eval: bool) -> list[str]:
  """RM reward, KL to SFT, lengths, the stage's wall time and tokens trained / sampled per policy
  (plus the win rate without an oracle)."""
  wall = lambda r: "-" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.1f}"
  mtok = lambda r, k: "-" if r.get(k) is None else f"{r[k] / 1e6:.2f}"
  return ["## Reward, KL, length and wall time", "", _table(
      ["policy", "RM reward (greedy)", "vs SFT", "RM reward (T=1)", "vs SFT",
       "KL to SFT (nats/token)", "Rs < 0.15 (T=1)", "length greedy / T=1",
       "truncated greedy / T=1", "length flag", "stage wall time (min)",
       "tokens trained / sampled (M)"]
      + ([] if world_eval else ["win rate vs SFT"]),
      [[r["policy"], _ci(r, "reward"), _ci(r, "reward_vs_sft"), _ci(r, "reward_t1"),
        _ci(r, "reward_t1_vs_sft"), f"{r['kl_to_sft']:.4f}", f"{r['unsafe_share_t1']:.3f}",
        f"{r['mean_length']:.1f} / {r['mean_length_t1']:.1f}",
        f"{r['truncated']:.3f} / {r['truncated_t1']:.3f}", r.get("length_flag") or "-",
        wall(r), f"{mtok(r, 'tokens_trained')} / {mtok(r, 'tokens_sampled')}"]
       + ([] if world_eval else [_ci(r, "win_rate_vs_sft")]) for r in rows]), ""]


def _per_task_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Greedy helpfulness per benign task ([] without per-task results)."""
  tasks = sorted({t for r in rows for t in r.get("per_task", {})})
  if not tasks:
    return []
  return ["Greedy helpfulness per benign task:", "", _table(
      ["policy"] + tasks, [[r["policy"]] + [f"{r['per_task'].get(t, float('nan')):.3f}"
                                            for t in tasks] for r in rows]), ""]


def _ppo_section(ppo: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """PPO's selected iteration, update statistics and held-out reward / KL per PPO stage."""
  return ["## PPO", "", "Held-out reward and KL: PPO's own evaluations (one sample per "
          "selection prompt at the PPO temperature) at iteration 0 and at the selected "
          "iteration.", "", _table(
      ["stage", "best iteration", "improved", "median approxkl", "median clipfrac",
       "held-out reward", "KL to SFT (nats)", "value loss, iterations 1-5"],
      [[k, v["best_iteration"], v["improved"], f"{v['median_approxkl']:.2e}",
        f"{v['median_clipfrac']:.3f}",
        f"{v['reward_start']:.4f} -> {v['reward_best']:.4f}" if "reward_start" in v else "",
        f"{v['kl_sft_start']:.3f} -> {v['kl_sft_best']:.3f}" if "kl_sft_start" in v else "",
        ", ".join(f"{x:.3f}" for x in v["value_loss_first_5"])]
       for k, v in ppo.items()]), ""]


def _rm_section(rm: Mapping[str, Any]) -> list[str]:
  """The reward models' held-out accuracy and unsafe-response detection."""
  lines = []
  if "help_rm_accuracy" in rm:
    lines.append(f"- Helpfulness RM on {rm['help_rm_pairs']} held-out pairs: accuracy "
                 f"{rm['help_rm_accuracy']:.3f} vs {rm['shorter_wins_accuracy']:.3f} for "
                 f"\"shorter response wins\"; correlation of reward with length "
                 f"{rm['reward_length_corr']:.3f}.")
  for key in ("unsafe_detection", "unsafe_detection_at_0.5"):
    if key in rm:
      d = rm[key]
      lines.append(f"- Safety RM, Rs < {d['threshold']}: precision {d['precision']:.3f}, "
                   f"recall {d['recall']:.3f} at finding the {d['n_unsafe']} unsafe responses "
                   f"of held-out safety pairs"
                   + (" (the paper: 0.89 / 0.55 at 0.15)." if key == "unsafe_detection"
                      else "."))
  return ["## Reward models", ""] + lines + [""]


def _overoptimization_section(curves: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Proxy (and, with an oracle, gold) reward against sqrt(KL) of each over-optimization curve."""
  # No gold column without an oracle (real data: every gold value is NaN).
  gold = any(g == g for c in curves.values() for g in c["gold"])
  lines = []
  for label, c in curves.items():
    xs = c["n"] if "n" in c else c["iteration"]
    for x, d, p, g in zip(xs, c["sqrt_kl"], c["proxy"], c["gold"]):
      lines.append([label, x, f"{d:.3f}", f"{p:.4f}"] + ([f"{g:.4f}"] if gold else []))
  header = ["curve", "n / iteration", "sqrt KL to SFT", "proxy (RM)"]
  return ["## Over-optimization (Gao et al. 2022)", "",
          _table(header + (["gold (oracle)"] if gold else []), lines), ""]
