"""Ghost Attention's data math (Llama 2 Sec. 3.3). Pure Python / NumPy (the fine-tune is the SFT
stage's jitted step; the sampling and the evaluation are ``llama_jax.gatt.evaluate``).

The paper takes a multi-turn dialog ``[u1, a1, ..., un, an]`` and an instruction ``inst`` that
should hold for the whole dialog, concatenates ``inst`` to *every* user message, and samples the
answers with the latest RLHF model. The training sample keeps the instruction in the first turn
only and sets the loss to 0 on all tokens of the earlier turns, assistant messages included; the
model then learns to honour an instruction given many turns ago ("ghost" attention to it).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import numpy as np


def messages(instruction: str, users: Sequence[str], answers: Sequence[str]) -> List[dict]:
  """The dialog ``[system: instruction, u1, a1, ..., u_k (, a_k)]`` (``len(answers)`` is
  ``len(users)`` or one less: a generation prompt). Encode it with
  ``encode_dialog(..., system_every_turn=True)`` to concatenate the instruction to every user
  turn (GAtt's sampling), or plainly for the instruction in the first turn only.

  Raises:
    ValueError: if ``len(answers)`` is neither ``len(users)`` nor ``len(users) - 1`` or
      ``users`` is empty.
  """
  if not users or len(answers) not in (len(users), len(users) - 1):
    raise ValueError(f"need >= 1 user turn and as many answers or one fewer, got {len(users)} "
                     f"user turns and {len(answers)} answers")
  out = [{"role": "system", "content": instruction}]
  for i, u in enumerate(users):
    out.append({"role": "user", "content": u})
    if i < len(answers):
      out.append({"role": "assistant", "content": answers[i]})
  return out


def training_record(instruction: str, users: Sequence[str],
                    answers: Sequence[str]) -> Dict[str, Any]:
  """GAtt's training sample: the instruction as the first turn's system message only, every
  answer but the last with ``"weight": 0`` (no loss on earlier turns; Llama 2 Sec. 3.3).

  Raises:
    ValueError: if ``users`` and ``answers`` differ in length or are empty.
  """
  if not users or len(users) != len(answers):
    raise ValueError(f"need as many answers as user turns (>= 1), got {len(users)} and "
                     f"{len(answers)}")
  out = messages(instruction, users, answers)
  for m in out[2:-1:2]:  # the assistant messages before the last
    m["weight"] = 0
  return {"messages": out}


KEEP = ("finished", "following", "following_correct")


def keep(finished: Sequence[bool], follows_last: Sequence[bool], correct_last: Sequence[bool], *,
         mode: str) -> np.ndarray:
  """[n] bool: the sampled dialogs that become training samples: every answer finished (an EOS
  within the token budget) and, by ``mode`` (``KEEP``), nothing more (``"finished"``), the last
  answer follows the instruction (``"following"``), or it also is correct
  (``"following_correct"``).

  Raises:
    ValueError: for an unknown mode.
  """
  if mode not in KEEP:
    raise ValueError(f"keep mode must be one of {KEEP}, got {mode!r}")
  out = np.asarray(finished, bool)
  if mode != "finished":
    out = out & np.asarray(follows_last, bool)
  if mode == "following_correct":
    out = out & np.asarray(correct_last, bool)
  return out


def per_turn(values: np.ndarray) -> Dict[str, List[Any]]:
  """Per-turn means of ``values`` [n dialogs, T turns] float with NaN where a dialog had no such
  turn: ``{"turn": [1..T], "mean": [T] (None where no dialog reached the turn), "n": [T]}``."""
  values = np.asarray(values, float)
  n = np.sum(~np.isnan(values), axis=0)
  mean = np.nansum(values, axis=0) / np.maximum(n, 1)
  return {"turn": list(range(1, values.shape[1] + 1)),
          "mean": [float(m) if k else None for m, k in zip(mean, n)], "n": [int(k) for k in n]}


def judge_rows(texts: Sequence[Sequence[str]], turns: int,
               judge: Callable[[int, int, str], bool]) -> np.ndarray:
  """[n, turns] float: 1.0 where ``judge(i, t, text)`` holds for dialog i's answer ``text`` at
  turn index t (0-based), 0.0 where not, NaN past the dialog's last answer."""
  out = np.full((len(texts), turns), np.nan)
  for i, row in enumerate(texts):
    for t, text in enumerate(row[:turns]):
      out[i, t] = float(bool(judge(i, t, text)))
  return out


# Llama 2 Sec. 3.3's synthetic constraints ("Hobbies ('You enjoy e.g. Tennis'), Language ('Speak
# in e.g. French'), or Public Figure ('Act as e.g. Napoleon')"); the paper had Llama 2-Chat write
# its lists, these short ones are ours. Each kind: (verbose form, terse form, values).
CONSTRAINTS = {
    "hobby": ("You enjoy {}.", "Hobby: {}.",
              ("tennis", "chess", "gardening", "baking", "hiking", "painting", "astronomy",
               "birdwatching", "knitting", "sailing")),
    "language": ("Always answer in {}.", "Language: {}.",
                 ("French", "Spanish", "German", "Italian", "Portuguese", "Japanese")),
    "figure": ("Always act as {} from now on.", "Figure: {}.",
               ("Napoleon", "Marie Curie", "Albert Einstein", "Cleopatra", "Ada Lovelace",
                "Leonardo da Vinci", "Abraham Lincoln", "Jane Austen")),
}


def synthetic_instruction(rng: np.random.Generator) -> str:
  """A system instruction as Llama 2 Sec. 3.3 builds them off the synthetic world: one or two of
  :data:`CONSTRAINTS`' kinds (randomly combined), each with a random value, in its verbose form
  or, half of the time, its terse one ("Always act as Napoleon from now on." -> "Figure:
  Napoleon.")."""
  kinds = list(CONSTRAINTS)
  picked = rng.choice(len(kinds), size=int(rng.integers(1, 3)), replace=False)
  parts = []
  for i in sorted(picked):
    verbose, terse, values = CONSTRAINTS[kinds[i]]
    form = terse if rng.random() < 0.5 else verbose
    parts.append(form.format(values[rng.integers(len(values))]))
  return " ".join(parts)


def instruction_dialogs(user_texts: Sequence[str], n: int, min_turns: int, max_turns: int,
                        rng: np.random.Generator) -> List[Dict[str, Any]]:
  """``n`` dialogs ``{"instruction": synthetic_instruction(rng), "turns": [user text, ...]}``
  whose turn count is uniform in ``[min_turns, max_turns]`` and whose turns are drawn with
  replacement from ``user_texts`` (e.g. the last user turns of a prompt set): the file-data
  counterpart of ``data.world.instruction_dialogs``.

  Raises:
    ValueError: if ``user_texts`` is empty or ``not 1 <= min_turns <= max_turns``.
  """
  if not user_texts:
    raise ValueError("instruction_dialogs: no user text to build dialogs from")
  if not 1 <= min_turns <= max_turns:
    raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
  out = []
  for _ in range(n):
    instruction = synthetic_instruction(rng)
    turns = int(rng.integers(min_turns, max_turns + 1))
    out.append({"instruction": instruction,
                "turns": [user_texts[int(j)] for j in rng.integers(len(user_texts), size=turns)]})
  return out
