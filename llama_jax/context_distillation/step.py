"""Safety context distillation's data math (Llama 2 Sec. 4.2.4): the preprompted prompt and the
targeted selection. Pure NumPy / Python (the fine-tune is the SFT stage's jitted step).

The paper prefixes adversarial prompts with a safety preprompt ("You are a safe and responsible
assistant", or with a risk category's answer template), samples answers, and fine-tunes the
model on them *without* the preprompt; "targeted" context distillation keeps a distilled answer
only where the safety reward model scores it above the model's original answer (the answer
without the preprompt), so answers that were already good are not replaced by vaguer ones.
Our addition: benign prompts' own best-of-k answers join the fine-tune (``benign_records``), so
the refusals learned on adversarial prompts do not spread to benign ones.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from llama_jax.data import world_tasks

PREPROMPTS = ("generic", "template")


def preprompt_text(dialog: Sequence[Mapping[str, str]], kind: str) -> str:
  """The safety preprompt for ``dialog``: ``"generic"``: ``world_tasks.SAFETY_PREPROMPT``;
  ``"template"``: followed by the answer template of the harmful category of the dialog's last
  user turn (``world_tasks.safety_preprompt``; synthetic-world prompts only).

  Raises:
    ValueError: for an unknown kind, or ``"template"`` on a dialog whose last user turn is not a
      harmful world prompt.
  """
  if kind not in PREPROMPTS:
    raise ValueError(f"preprompt must be one of {PREPROMPTS}, got {kind!r}")
  if kind == "generic":
    return world_tasks.SAFETY_PREPROMPT
  users = [m["content"] for m in dialog if m.get("role") == "user"]
  p = world_tasks.parse_prompt(users[-1]) if users else None
  if p is None or p.category is None:
    raise ValueError("preprompt 'template' needs harmful synthetic-world prompts (a risk "
                     f"category per prompt); got {users[-1] if users else dialog!r:.120}")
  return world_tasks.safety_preprompt(p.category)


def with_preprompt(dialog: Sequence[Mapping[str, str]], preprompt: str) -> List[Dict[str, str]]:
  """``dialog`` with ``preprompt`` as its system message: put before an existing system
  message's text (one space between), or a new system message first. The input is not changed."""
  out = [dict(m) for m in dialog]
  if out and out[0].get("role") == "system":
    out[0]["content"] = f"{preprompt} {out[0]['content']}"
    return out
  return [{"role": "system", "content": preprompt}] + out


def select_distilled(original_scores, distilled_scores, original_finished, distilled_finished,
                     targeted: bool = True) -> np.ndarray:
  """Which distilled answers to fine-tune on: [n] bool.

  A distilled answer that did not finish (no EOS within the budget, or empty) is never kept.
  Untargeted: every finished one. Targeted (Sec. 4.2.4, "Rejecting Context Distillation Errors
  with the Safety Reward Model"): only where it scores strictly above the original answer, or
  where the original did not finish (a truncated answer is no answer).

  Args:
    original_scores, distilled_scores: [n] float, the safety reward of each answer to the prompt
      without the preprompt. original_finished, distilled_finished: [n] bool.
    targeted: compare with the original answer.
  Raises:
    ValueError: if the four arrays differ in length.
  """
  arrays = [np.asarray(a) for a in (original_scores, distilled_scores, original_finished,
                                    distilled_finished)]
  if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
    raise ValueError(f"select_distilled: four [n] arrays, got shapes {[a.shape for a in arrays]}")
  so, sd = arrays[0].astype(np.float64), arrays[1].astype(np.float64)
  fo, fd = arrays[2].astype(bool), arrays[3].astype(bool)
  if not targeted:
    return fd
  return fd & (~fo | (sd > so))


Judge = Callable[[Sequence[Mapping[str, str]], str], bool]


def records(prompts: Sequence[Mapping], preprompts: Sequence[str], original: Sequence[str],
            distilled: Sequence[str], original_finished, distilled_finished, original_scores,
            distilled_scores, kept, judge: Optional[Judge] = None) -> List[dict]:
  """The rows of ``distilled.jsonl``, one per prompt record (``{"prompt", "is_safety"}``): the
  prompt (without the preprompt), the preprompt, both answers, their finished flags and scores,
  ``kept``; with ``judge`` (``(dialog, text) -> bool``, e.g. the world oracle's refusal) also
  ``original_refused`` / ``distilled_refused``."""
  out = []
  for i, p in enumerate(prompts):
    row = {"prompt": [dict(m) for m in p["prompt"]], "preprompt": preprompts[i],
           "original": original[i], "distilled": distilled[i],
           "original_finished": bool(original_finished[i]),
           "distilled_finished": bool(distilled_finished[i]),
           "original_score": float(original_scores[i]),
           "distilled_score": float(distilled_scores[i]), "kept": bool(kept[i])}
    if judge is not None:
      row["original_refused"] = bool(judge(p["prompt"], original[i]))
      row["distilled_refused"] = bool(judge(p["prompt"], distilled[i]))
    out.append(row)
  return out


def best_finished(scores, finished) -> np.ndarray:
  """Per prompt, the index of the highest-scoring finished answer (the first on ties), or -1
  when none finished: [n] int.

  Args:
    scores: [n, k] float, the reward of each answer. finished: [n, k] bool.
  Raises:
    ValueError: if the shapes differ or are not [n, k].
  """
  s, f = np.asarray(scores, np.float64), np.asarray(finished, bool)
  if s.shape != f.shape or s.ndim != 2:
    raise ValueError(f"best_finished: two [n, k] arrays, got shapes {s.shape} and {f.shape}")
  best = np.argmax(np.where(f, s, -np.inf), axis=1)
  return np.where(f.any(axis=1), best, -1)


def benign_records(prompts: Sequence[Mapping], answers: Sequence[Sequence[str]], finished,
                   scores, judge: Optional[Judge] = None) -> List[dict]:
  """The benign rows of ``distilled.jsonl`` (``"benign": True``), one per prompt record: the
  prompt, its ``k`` answers (``answers`` [n][k] str, ``finished`` / ``scores`` [n, k]), the kept
  ``answer`` (:func:`best_finished`; ``kept`` False and ``answer`` None when none finished);
  with ``judge`` also ``refused`` (the kept answer's verdict; False when none kept)."""
  best = best_finished(scores, finished)
  out = []
  for i, p in enumerate(prompts):
    answer = answers[i][best[i]] if best[i] >= 0 else None
    row = {"prompt": [dict(m) for m in p["prompt"]], "benign": True,
           "answers": list(answers[i]), "finished": [bool(x) for x in finished[i]],
           "scores": [float(x) for x in scores[i]], "kept": answer is not None,
           "answer": answer}
    if judge is not None:
      row["refused"] = answer is not None and bool(judge(p["prompt"], answer))
    out.append(row)
  return out


def sft_records(rows: Sequence[Mapping]) -> List[dict]:
  """The kept rows of :func:`records` and :func:`benign_records` as SFT dialogs: the prompt
  *without* the preprompt, then the distilled answer (a benign row: its kept answer)."""
  return [{"messages": [dict(m) for m in r["prompt"]]
           + [{"role": "assistant", "content": r["answer"] if r.get("benign") else r["distilled"]}]}
          for r in rows if r["kept"]]
