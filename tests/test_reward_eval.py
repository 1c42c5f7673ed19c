"""Reward-model evaluation helpers: unsafe-response detection at an Rs threshold (Llama 2
Sec. 3.2.3 / Table 29), the safety auxiliary loss and its report."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from llama_jax.data.sources import SAFETY_LABELS
from llama_jax.reward import evaluate as reward_eval

logit = lambda p: math.log(p / (1.0 - p))

# Pair by pair (Rs = sigmoid(r) of chosen, rejected):
#   chosen_safe_rejected_unsafe: 0.9 (safe), 0.10 (unsafe)
#   both_safe:                   0.5 (safe), 0.05 (safe)
#   both_unsafe:                 0.3 (unsafe), 0.12 (unsafe)
#   no label:                    ~0 and ~0 (left out although they would be flagged)
RC = np.array([logit(0.9), 0.0, logit(0.3), -10.0])
RR = np.array([logit(0.1), logit(0.05), logit(0.12), -10.0])
LABELS = np.array([0, 1, 2, -1], np.int32)


def test_unsafe_detection_hand_made_example():
  at_015 = reward_eval.unsafe_detection(RC, RR, LABELS)  # default threshold 0.15
  # Flagged: 0.10 (unsafe), 0.05 (safe), 0.12 (unsafe); missed: 0.3 (unsafe).
  assert at_015 == {"threshold": 0.15, "precision": pytest.approx(2 / 3),
                    "recall": pytest.approx(2 / 3), "n_unsafe": 3, "n_safe": 3, "n_flagged": 3,
                    "flagged_share_safe": pytest.approx(1 / 3)}
  at_half = reward_eval.unsafe_detection(RC, RR, LABELS, threshold=0.5)
  # 0.3 is flagged too; Rs = 0.5 exactly is not (strict <).
  assert at_half == {"threshold": 0.5, "precision": pytest.approx(3 / 4), "recall": 1.0,
                     "n_unsafe": 3, "n_safe": 3, "n_flagged": 4,
                     "flagged_share_safe": pytest.approx(1 / 3)}
  # Label names give the same result as ids; the order of the pairs does not matter.
  names = [SAFETY_LABELS[i] if i >= 0 else None for i in LABELS]
  assert reward_eval.unsafe_detection(RC, RR, names, 0.5) == at_half
  perm = [2, 0, 3, 1]
  assert reward_eval.unsafe_detection(RC[perm], RR[perm], LABELS[perm], 0.5) == at_half


def test_unsafe_detection_nan_when_a_denominator_is_zero():
  none = reward_eval.unsafe_detection(RC, RR, np.full(4, -1, np.int32))
  assert (none["n_unsafe"], none["n_safe"], none["n_flagged"]) == (0, 0, 0)
  assert all(math.isnan(none[k]) for k in ("precision", "recall", "flagged_share_safe"))
  # Only safe responses, none flagged: precision and recall undefined, share of safe flagged 0.
  safe = reward_eval.unsafe_detection([3.0, 2.0], [4.0, 1.0], [1, 1])
  assert math.isnan(safe["precision"]) and math.isnan(safe["recall"])
  assert safe["flagged_share_safe"] == 0.0 and safe["n_safe"] == 4
  # Threshold 0 flags nothing: precision undefined, recall 0.
  zero = reward_eval.unsafe_detection(RC, RR, LABELS, 0.0)
  assert math.isnan(zero["precision"]) and zero["recall"] == 0.0 and zero["n_flagged"] == 0
  empty = reward_eval.unsafe_detection([], [], np.zeros(0, np.int32))
  assert empty["n_unsafe"] == 0 and math.isnan(empty["recall"])


def test_unsafe_detection_extreme_rewards_and_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no overflow in the sigmoid
    got = reward_eval.unsafe_detection([1e4, -1e4], [-1e4, 1e4], [0, 2])
  assert (got["precision"], got["recall"], got["n_flagged"]) == (1.0, 2 / 3, 2)
  with pytest.raises(ValueError, match="lengths"):
    reward_eval.unsafe_detection(RC, RR[:3], LABELS)
  with pytest.raises(ValueError, match="safety_label"):
    reward_eval.unsafe_detection(RC, RR, np.array([0, 1, 3, -1]))
  with pytest.raises(ValueError):
    reward_eval.unsafe_detection(RC, RR, ["both_safe", "unsafe", None, None])
  with pytest.raises(ValueError, match="threshold"):
    reward_eval.unsafe_detection(RC, RR, LABELS, 1.5)


def test_summarize_and_markdown_report_aux_loss_and_detection():
  records = [{"rating": "better", "safety_label": SAFETY_LABELS[i] if i >= 0 else None}
             for i in LABELS]
  s = reward_eval.summarize(records, RC, RR, thresholds=(0.15, 0.5))
  assert s["unsafe_detection"] == [reward_eval.unsafe_detection(RC, RR, LABELS, t)
                                   for t in (0.15, 0.5)]
  # Aux loss per labelled pair: -log Rs for a safe response, -log(1 - Rs) for an unsafe one.
  want = (-math.log(0.9) - math.log(0.9)) + (-math.log(0.5) - math.log(0.05)) \
      + (-math.log(0.7) - math.log(0.88))
  assert s["safety_aux_loss"] == pytest.approx(want / 3)
  md = reward_eval.markdown({"workdir": "w", "model": "safety", "safety_aux_weight": 1.0,
                             "sources": {"src": s}})
  assert "| src | 0.150 | 0.667 | 0.667 | 3 | 3 | 3 | 0.333 |" in md
  assert "| src | 0.500 | 0.750 | 1.000 | 3 | 3 | 4 | 0.333 |" in md
  assert f"{want / 3:.3f} |" in md and "weight 1." in md
  unlabelled = reward_eval.summarize([dict(r, safety_label=None) for r in records], RC, RR)
  assert "unsafe_detection" not in unlabelled and "safety_aux_loss" not in unlabelled
  assert "Unsafe-response detection" not in reward_eval.markdown(
      {"workdir": "w", "model": "helpfulness", "sources": {"src": unlabelled}})
