"""Multi-turn rollouts for Ghost Attention: GAtt's data sampling and its evaluation, instruction
adherence per turn index (Llama 2 Sec. 3.3, the analogue of the paper's 20-turn check).

:func:`rollout` plays each dialog turn by turn: at turn t every dialog still going gets the
policy's answer to ``[system: instruction, u1, a1, ..., u_t]``, where ``a1 .. a_{t-1}`` are the
policy's own earlier answers. :func:`adherence` does so greedily with the instruction in the
first turn only and judges every answer with the world's checkers; :func:`compare` pairs two
policies' adherence dialog by dialog, with bootstrap intervals, and :func:`plot` draws it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np
from tqdm.auto import tqdm

from llama_jax import sampling, sharding, stats
from llama_jax.data import world, world_tasks
from llama_jax.gatt import step as gatt_lib

log = logging.getLogger(__name__)


class Stopped(Exception):
  """A rollout stopped by its ``stop`` callback after a finished turn (resumable)."""


def _generate(policy, tokenizer, ids: List[List[int]], key: jax.Array, temperature: float,
              max_new_tokens: int, batch_size: int, pad_to_multiple: int):
  """(texts, finished) for token prompts, in batches of ``batch_size`` rows (the last batch
  padded with copies of its first prompt, so every batch has one shape)."""
  texts, finished = [], []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))
    with (sharding.activate(policy.mesh, sharding.GENERATION_RULES) if policy.mesh is not None
          else contextlib.nullcontext()):
      out = sampling.generate(policy.params, policy.cfg, rows, jax.random.fold_in(key, start),
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              pad_to_multiple=pad_to_multiple)
    texts += sampling.decode(out, tokenizer)[:len(chunk)]
    finished += np.asarray(out.finished).tolist()[:len(chunk)]
  return texts, finished


def rollout(policy, tokenizer, dialogs: Sequence[dict], *, system_every_turn: bool,
            temperature: float, max_new_tokens: int, batch_size: int, key: jax.Array,
            turn_dir: Optional[str] = None, stop: Optional[Callable[[], bool]] = None,
            pad_to_multiple: int = 64, desc: str = "gatt rollout",
            end_on_unfinished: bool = True) -> Dict[str, Any]:
  """Plays ``dialogs`` (``{"instruction", "turns": [user text, ...]}``) turn by turn.

  Args:
    policy: ``rejection_sampling.step.Policy`` (cfg, params, mesh). tokenizer: chat tokenizer.
    system_every_turn: the instruction concatenated to every user turn (GAtt's sampling) or in
      the first turn only (evaluation).
    temperature: 0 = greedy. max_new_tokens: per answer. batch_size: rows per generate call.
    key: PRNG key (turn t uses ``fold_in(key, t)``).
    turn_dir: each finished turn is written there (process 0, ``turn_<t>.json``) and reused by a
      later call, so an interrupted rollout resumes with the same answers.
    stop: checked after each turn; True raises :class:`Stopped`.
    pad_to_multiple: prompt padding granularity (fewer compiles as the dialogs grow).
    desc: label of the progress bar (one tick per turn; process 0).
    end_on_unfinished: a dialog ends at its first unfinished answer (truncated at the token
      budget, or empty); False: the dialog goes on with that answer as it is.
  Returns:
    ``{"texts": [n][<= turns] answers, "finished": [n][...] bool, "context_stops": n dialogs
    cut short because the next prompt plus ``max_new_tokens`` would exceed the model's
    ``max_seq_len``}``.
  """
  n = len(dialogs)
  texts: List[List[str]] = [[] for _ in range(n)]
  finished: List[List[bool]] = [[] for _ in range(n)]
  alive = [True] * n
  context_stops = 0
  turns = max((len(d["turns"]) for d in dialogs), default=0)
  bar = tqdm(total=turns, desc=desc, unit="turn", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  for t in range(turns):
    path = turn_dir and os.path.join(turn_dir, f"turn_{t + 1:03d}.json")
    if path and os.path.isfile(path):
      with open(path) as f:
        done = json.load(f)
    else:
      active, ids = [], []
      for i, d in enumerate(dialogs):
        if not alive[i] or t >= len(d["turns"]):
          continue
        msgs = gatt_lib.messages(d["instruction"], d["turns"][:t + 1], texts[i])
        prompt = tokenizer.encode_dialog(msgs, system_every_turn=system_every_turn)[0].tolist()
        padded = -(-len(prompt) // pad_to_multiple) * pad_to_multiple
        if padded + max_new_tokens > policy.cfg.max_seq_len:
          context_stops += 1
          alive[i] = False
          continue
        active.append(i)
        ids.append(prompt)
      t_texts, t_done = (_generate(policy, tokenizer, ids, jax.random.fold_in(key, t),
                                   temperature, max_new_tokens, batch_size, pad_to_multiple)
                         if ids else ([], []))
      done = {"active": active, "texts": t_texts, "finished": [bool(x) for x in t_done],
              "context_stops": context_stops}
      if path and jax.process_index() == 0:
        os.makedirs(turn_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
          json.dump(done, f)
        os.replace(path + ".tmp", path)
    context_stops = done["context_stops"]
    alive = [False] * n
    for i, text, ok in zip(done["active"], done["texts"], done["finished"]):
      texts[i].append(text.strip())
      finished[i].append(bool(ok) and bool(text.strip()))
      alive[i] = finished[i][-1] or not end_on_unfinished
    bar.update(1)
    bar.set_postfix(dialogs=len(done["active"]), context_stops=context_stops)
    if stop is not None and stop():
      bar.close()
      raise Stopped(f"stopped after turn {t + 1}")
  bar.close()
  return {"texts": texts, "finished": finished, "context_stops": context_stops}


def adherence(policy, tokenizer, dialogs: Sequence[dict], *, max_new_tokens: int,
              batch_size: int) -> Dict[str, Any]:
  """Greedy rollout with the instruction in the first turn only, every answer judged; an
  unfinished (truncated or empty) answer stays in the dialog and counts as not following and not
  correct.

  Returns:
    ``{"follows": [n, T] float (1 / 0; NaN past a dialog's end), "correct": [n, T] float (the
    world oracle's ``helpful`` of the answer to that turn's prompt), "texts", "context_stops"}``
    with T the longest dialog's turns.
  """
  out = rollout(policy, tokenizer, dialogs, system_every_turn=False, temperature=0.0,
                max_new_tokens=max_new_tokens, batch_size=batch_size, key=jax.random.key(0),
                desc="gatt adherence", end_on_unfinished=False)
  turns = max(len(d["turns"]) for d in dialogs)
  follows = gatt_lib.judge_rows(out["texts"], turns, lambda i, t, text: world_tasks.follows_instruction(
      dialogs[i]["instruction"], text))
  correct = gatt_lib.judge_rows(out["texts"], turns, lambda i, t, text: world.oracle(
      dialogs[i]["turns"][t], text).helpful)
  return {"follows": follows, "correct": correct, "texts": out["texts"],
          "context_stops": out["context_stops"]}


def compare(before: Dict[str, Any], after: Dict[str, Any], *, late_turn: int = 10,
            seed: int = 0) -> Dict[str, Any]:
  """Two policies' :func:`adherence` on the same dialogs, paired dialog by dialog.

  Returns:
    ``{"per_turn": {"turn", "before", "after", "n_before", "n_after", "difference": [T] dicts
    of stats.bootstrap_paired_difference (None where a turn lacks pairs)}, "late": pooled over
    turns >= late_turn (clustered by dialog): before, after, difference, "all": pooled over every
    turn, "correct": the same for the oracle's correctness, "correct_if_following": per policy,
    the correctness of the answers that follow the instruction, at turn 1, turns 2+ and turns >=
    late_turn (None where none does)}``. Only turns both policies reached are paired.
  """
  def pooled(a: np.ndarray, b: np.ndarray, lo: int) -> Optional[Dict[str, Any]]:
    a, b = a[:, lo:], b[:, lo:]
    both = ~np.isnan(a) & ~np.isnan(b)
    if not both.any():
      return None
    dialog = np.broadcast_to(np.arange(a.shape[0])[:, None], a.shape)[both]
    d = stats.bootstrap_paired_difference(b[both], a[both], clusters=dialog, seed=seed)
    return {"before": float(a[both].mean()), "after": float(b[both].mean()), "pairs":
            int(both.sum()), "difference": {k: d[k] for k in ("mean", "lo", "hi")}}

  out: Dict[str, Any] = {}
  for name in ("follows", "correct"):
    a, b = np.asarray(before[name], float), np.asarray(after[name], float)
    pb, pa = gatt_lib.per_turn(a), gatt_lib.per_turn(b)
    diffs = [pooled(a[:, t:t + 1], b[:, t:t + 1], 0) for t in range(a.shape[1])]
    out[name] = {"turn": pb["turn"], "before": pb["mean"], "after": pa["mean"],
                 "n_before": pb["n"], "n_after": pa["n"],
                 "difference": [d and d["difference"] for d in diffs],
                 "late": pooled(a, b, late_turn - 1), "all": pooled(a, b, 0)}
  def if_following(r: Dict[str, Any], lo: int, hi: Optional[int]) -> Optional[float]:
    f, c = np.asarray(r["follows"], float)[:, lo:hi], np.asarray(r["correct"], float)[:, lo:hi]
    return float(c[f == 1].mean()) if (f == 1).any() else None

  out["correct_if_following"] = {
      name: {"turn_1": if_following(r, 0, 1), "turns_2+": if_following(r, 1, None),
             "late": if_following(r, late_turn - 1, None)}
      for name, r in (("before", before), ("after", after))}
  out["late_turn"] = late_turn
  return out


def plot(comparison: Dict[str, Any], path: str, labels=("without GAtt", "with GAtt")) -> None:
  """Instruction adherence (solid) and the oracle's correctness (dashed) per turn index for both
  policies of a :func:`compare` result, written to ``path`` (PNG)."""
  fig = Figure(figsize=(6.4, 4.6))
  ax = fig.subplots()
  f = comparison["follows"]
  for key, label, color in (("before", labels[0], "tab:gray"), ("after", labels[1], "tab:blue")):
    turns = [t for t, v in zip(f["turn"], f[key]) if v is not None]
    ax.plot(turns, [v for v in f[key] if v is not None], "o-", color=color,
            label=f"{label}: follows the instruction")
    c = comparison["correct"]
    ax.plot(turns, [v for v in c[key] if v is not None], "--", color=color, alpha=0.6,
            label=f"{label}: correct answer")
  ax.set_xlabel("turn index (instruction given in turn 1)")
  ax.set_ylabel("share of dialogs")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("Ghost Attention: system instruction adherence per turn (greedy)")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
