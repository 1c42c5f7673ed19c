"""The synthetic world's preference pairs (``llama_jax.data.world``): the helpfulness and safety
pairs of the RMs' data, drawn with their ratings and safety labels, and ``annotate``, the oracle
as annotator of a policy's own samples (Llama 2 Sec. 3.2.1).

A pair's rating is set by the oracle quality gap of its two responses (``world`` module
docstring); ``WorldConfig.label_noise`` swaps some pairs per rating.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from llama_jax.data import world_tasks
from llama_jax.data.sources import RATINGS, SAFETY_LABELS
from llama_jax.data.world import (WorldConfig, WorldPrompt, _messages, _rng, _sample_prompt,
                                  demonstration, oracle)

_RATING_BY_GAP = {3: 0, 2: 1, 1: 2, 0: 3}  # quality gap -> index into RATINGS


def _pair(p: WorldPrompt, combos: Sequence[tuple[int, int]], rng: np.random.Generator,
          cfg: WorldConfig) -> tuple[str, str, int] | None:
  """Draws (chosen, rejected, quality gap) for one of ``combos``; None if none is possible."""
  for k in rng.permutation(len(combos)):
    qc, qr = combos[k]
    for _ in range(10):
      if p.task == "harmful":
        c, r = world_tasks.harmful_response(p, qc, rng), world_tasks.harmful_response(p, qr, rng)
      else:
        c = world_tasks.benign_response(p, qc, rng, cfg)
        r = world_tasks.benign_response(p, qr, rng, cfg)
      if c is not None and r is not None and c != r:
        return c, r, qc - qr
  return None


_HELPFUL_COMBOS = {0: ((3, 0),), 1: ((3, 1), (2, 0)), 2: ((3, 2), (2, 1), (1, 0)),
                   3: ((1, 1), (2, 2))}  # rating index -> (chosen, rejected) qualities


def _record(cfg: WorldConfig, p: WorldPrompt, chosen: str, rejected: str, gap: int,
            rng: np.random.Generator, label: str | None, may_swap: bool) -> dict[str, Any]:
  rating = _RATING_BY_GAP[gap]
  if may_swap and rng.random() < cfg.label_noise[rating]:
    chosen, rejected = rejected, chosen
  return {"prompt": _messages(cfg, p, rng), "chosen": chosen, "rejected": rejected,
          "rating": RATINGS[rating], "safety_label": label}


def helpfulness_pairs(cfg: WorldConfig, split: str, n: int) -> list[dict[str, Any]]:
  """``n`` helpfulness preference pairs on benign prompts, ratings drawn uniformly.

  The rating is the oracle quality gap (module docstring); with probability
  ``cfg.label_noise[rating]`` chosen and rejected are swapped (rating kept). ``safety_label`` is
  None.

  Raises:
    ValueError: on an unknown split.
  """
  rng = _rng(cfg, split, 2)
  out = []
  while len(out) < n:
    p = _sample_prompt(cfg, split, rng, harmful=False)
    drawn = _pair(p, _HELPFUL_COMBOS[int(rng.integers(4))], rng, cfg)
    if drawn is not None:
      out.append(_record(cfg, p, *drawn, rng, None, may_swap=True))
  return out


_SAFETY_COMBOS = {  # (harmful prompt?, (chosen, rejected) qualities)
    "chosen_safe_rejected_unsafe": (True, ((3, 0), (3, 1), (2, 0), (2, 1))),
    "both_safe": (True, ((3, 2), (3, 3))),
    "both_unsafe": (True, ((1, 0), (0, 0), (1, 1))),
}


def safety_pairs(cfg: WorldConfig, split: str, n: int) -> list[dict[str, Any]]:
  """``n`` safety preference pairs with the paper's safety labels and a rating.

  Labels are drawn with ``cfg.safety_label_shares``. ``chosen_safe_rejected_unsafe``: a refusal
  against a (hedged) compliance; ``both_safe``: two refusals of a harmful prompt, or (one pair in
  three) a correct answer against a false refusal of a benign prompt; ``both_unsafe``: two
  compliances. Label noise swaps only ``both_safe`` / ``both_unsafe`` pairs.

  Raises:
    ValueError: on an unknown split.
  """
  rng = _rng(cfg, split, 3)
  out = []
  while len(out) < n:
    label = SAFETY_LABELS[rng.choice(3, p=np.asarray(cfg.safety_label_shares))]
    if label == "both_safe" and rng.random() < 1 / 3:
      p = _sample_prompt(cfg, split, rng, harmful=False)
      false_refusal = world_tasks.CURT[rng.integers(len(world_tasks.CURT))]
      out.append(_record(cfg, p, demonstration(p), false_refusal, 3, rng, label, may_swap=True))
      continue
    p = _sample_prompt(cfg, split, rng, harmful=True)
    drawn = _pair(p, _SAFETY_COMBOS[label][1], rng, cfg)
    if drawn is not None:
      out.append(_record(cfg, p, *drawn, rng, label,
                         may_swap=label != "chosen_safe_rejected_unsafe"))
  return out


def annotate(prompt: Sequence[Mapping[str, str]], responses: Sequence[str]) -> list[dict[str, Any]]:
  """The oracle as annotator of a policy's own samples (Llama 2 Sec. 3.2.1: new preference
  batches are collected on the latest model's samples, so the RMs stay on its distribution).

  Every pair of distinct responses whose oracle quality differs becomes a preference record:
  chosen = the higher quality, rating from the quality gap (as :func:`helpfulness_pairs`: 3 ->
  significantly_better, 2 -> better, 1 -> slightly_better); on a harmful prompt the safety label
  follows the oracle's ``safe`` of both (``chosen_safe_rejected_unsafe`` / ``both_safe`` /
  ``both_unsafe``), else None. Pairs of equal quality carry no preference and are left out. No
  label noise.

  Args:
    prompt: the dialog (message list ending with the user turn). responses: sampled texts.
  Returns:
    Preference records (``llama_jax.data.sources`` schema), in order of first appearance.
  Raises:
    ValueError: if the prompt is not a world prompt.
  """
  unique = list(dict.fromkeys(r.strip() for r in responses if r.strip()))
  judged = {r: oracle(prompt, r) for r in unique}
  out = []
  for i, a in enumerate(unique):
    for b in unique[i + 1:]:
      ja, jb = judged[a], judged[b]
      if ja.quality == jb.quality:
        continue
      (chosen, jc), (rejected, jr) = sorted(((a, ja), (b, jb)), key=lambda x: -x[1].quality)
      label = None
      if jc.harmful:
        label = ("both_safe" if jr.safe else "chosen_safe_rejected_unsafe") if jc.safe \
            else "both_unsafe"
      out.append({"prompt": [dict(m) for m in prompt], "chosen": chosen, "rejected": rejected,
                  "rating": RATINGS[_RATING_BY_GAP[jc.quality - jr.quality]],
                  "safety_label": label})
  return out
