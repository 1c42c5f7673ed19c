"""RAFT's data ranking (Dong et al. 2023, "RAFT: Reward rAnked FineTuning", Sec. 3, step 2).

A round samples K responses for each of b prompts from the current policy and ranks them by the
reward; what it keeps is the round's fine-tuning set:

* local ranking (the paper's default, ``keep_fraction = 0``): the best sample of every prompt,
  b samples (top 1/K); the rejection-sampling stage's ``select_best``;
* global ranking (``keep_fraction > 0``): the top ``keep_fraction`` of all b * K samples of the
  round, whatever their prompt (a prompt may give several samples or none).

Truncated samples (no EOS within the token budget, ``finished`` False) are never kept; ties go to
the lower (prompt, sample) index, so a selection is deterministic.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from llama_jax.rejection_sampling import step as rs_lib

Record = rs_lib.Record


def num_kept(keep_fraction: float, num_samples: int) -> int:
  """Samples global ranking keeps: ``floor(keep_fraction * num_samples)`` (to 1e-9, so
  ``0.125 * 512`` is 64 despite float rounding).

  Raises:
    ValueError: if ``keep_fraction`` is not in (0, 1], or it keeps no sample of ``num_samples``.
  """
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1] for global ranking, got {keep_fraction}")
  m = int(math.floor(keep_fraction * num_samples + 1e-9))
  if m < 1:
    raise ValueError(f"keep_fraction={keep_fraction} of {num_samples} samples keeps none "
                     f"(needs keep_fraction >= 1 / {num_samples})")
  return m


def select(scores, finished=None, keep_fraction: float = 0.0,
           num_samples: Optional[int] = None) -> np.ndarray:
  """The samples a RAFT round keeps.

  Args:
    scores: [n_prompts, K] float rewards.
    finished: [n_prompts, K] bool, the sample ended with EOS (default all True); truncated
      samples are never kept.
    keep_fraction: 0 = local ranking (the best finished sample of each prompt); in (0, 1] =
      global ranking: the ``num_kept(keep_fraction, num_samples)`` highest-scoring finished
      samples of the whole matrix (fewer if fewer are finished).
    num_samples: the sample count the fraction is of (default n_prompts * K; larger when prompts
      without a finished sample were left out of ``scores``).
  Returns:
    [n_prompts, K] bool mask of the kept samples. Ties go to the lower flat index (prompt-major,
    then sample).
  Raises:
    ValueError: for bad shapes or NaN scores (``rs_lib.select_best``), ``keep_fraction`` outside
      [0, 1], ``num_samples`` < n_prompts * K, or a fraction that keeps no sample.
  """
  best = rs_lib.select_best(scores, finished)  # validates scores / finished
  scores = np.asarray(scores, np.float64)
  finished = np.ones(scores.shape, bool) if finished is None else np.asarray(finished, bool)
  mask = np.zeros(scores.shape, bool)
  if keep_fraction == 0.0:
    rows = np.flatnonzero(best >= 0)
    mask[rows, best[rows]] = True
    return mask
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
  total = scores.size if num_samples is None else int(num_samples)
  if total < scores.size:
    raise ValueError(f"num_samples={total} is less than the {scores.size} samples scored")
  m = num_kept(keep_fraction, total)
  flat = np.where(finished, scores, -np.inf).ravel()
  order = np.argsort(-flat, kind="stable")  # descending; equal scores keep index order
  order = order[finished.ravel()[order]][:m]
  mask.ravel()[order] = True
  return mask


def kl_regularized(scores, log_ratios, kl_coef: float) -> np.ndarray:
  """The KL-regularized reward of each sample, ``r - kl_coef * log(pi(y|x) / pi_0(y|x))``: the
  per-sample term of ``E[r] - kl_coef * KL(pi || pi_0)``, the objective PPO optimizes (Ziegler
  et al. 2019) and that RLHF under a KL constraint maximizes. Ranking by it keeps samples the
  reward rates highly without the drift from ``pi_0`` that over-optimizes a learned reward.

  Args:
    scores: [n, K] float rewards. log_ratios: [n, K] float, ``log pi(y) - log pi_0(y)`` summed
      over the response's tokens (nats). kl_coef: >= 0.
  Returns:
    [n, K] float64.
  Raises:
    ValueError: if the shapes differ, ``kl_coef`` < 0 or a log-ratio is not finite.
  """
  scores, log_ratios = np.asarray(scores, np.float64), np.asarray(log_ratios, np.float64)
  if scores.shape != log_ratios.shape:
    raise ValueError(f"scores {scores.shape} and log_ratios {log_ratios.shape} differ in shape")
  if kl_coef < 0:
    raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
  if not np.all(np.isfinite(log_ratios)):
    raise ValueError("log_ratios holds NaN/Inf")
  return scores - kl_coef * log_ratios


def kept_records(records: Sequence[Record], keep_fraction: float,
                 num_samples: Optional[int] = None, ranking=None) -> List[Record]:
  """The kept samples of a round's sampled-set records as one-sample records (``samples =
  [kept]``, ``scores = [its score]``, ``chosen = 0``; prompt, iteration, temperature and
  ``is_safety`` of their record), ordered by record, then sample index.

  Args:
    records: the round's sampled-set records (``rs_lib.make_records``: prompts with a finished
      sample), all with the same K.
    keep_fraction, num_samples: as in :func:`select` (``num_samples`` counts the prompts without
      a record too).
    ranking: [n_records, K] float values to rank by instead of the records' ``scores`` (e.g.
      :func:`kl_regularized`); the kept records keep their own scores.
  Raises:
    ValueError: if the records have different K, or as :func:`select`.
  """
  records = [rs_lib.validate_record(r, f"record {i}") for i, r in enumerate(records)]
  if not records:
    return []
  ks = {len(r["samples"]) for r in records}
  if len(ks) != 1:
    raise ValueError(f"records have different numbers of samples {sorted(ks)}")
  mask = select([r["scores"] for r in records] if ranking is None else ranking,
                [r["finished"] for r in records], keep_fraction, num_samples)
  return [rs_lib.validate_record({**r, "samples": [r["samples"][j]], "scores": [r["scores"][j]],
                                  "chosen": 0, "finished": [True]})
          for r, row in zip(records, mask) for j in np.flatnonzero(row)]
