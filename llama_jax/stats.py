"""Confidence intervals for policy-evaluation metrics, by a cluster bootstrap over prompts.

Pure NumPy (float64), no JAX. Every function returns a point estimate and a two-sided percentile
bootstrap interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", Ch. 13): draw
``n_boot`` resamples, recompute the statistic on each, and report the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles of the resampled statistics.

The resampling unit is a *cluster* (typically the prompt), not a row: a resample draws ``c``
clusters with replacement and takes the mean over all rows of the drawn clusters (so each cluster
weighs by its number of rows; the statistic is always the plain mean over rows). This is the
cluster (or "case") bootstrap for clustered data, e.g. Field & Welsh 2007, "Bootstrapping
clustered data", JRSS B 69(3). Clustering matters because rows of one prompt are not independent
draws: several samples of the same prompt share its difficulty, and greedy outputs of one prompt
are near copies. Treating them as independent rows overstates the effective sample size and gives
intervals that are too narrow (up to ``sqrt(rows per prompt)`` times, when a prompt's rows agree).
With ``clusters=None`` each row is its own cluster (the ordinary iid bootstrap).

Paired comparisons (``bootstrap_paired_difference``, ``win_rate``) resample both arms with the
same draw, so the pairing of rows (same prompt, same sample slot) is kept and correlated
prompt-level noise cancels.

Shape letters: n rows (samples), c clusters. The percentile interval of a single cluster
(``c == 1``) has zero width: the data hold no information on between-cluster variation.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

import numpy as np

DEFAULT_N_BOOT = 2000
DEFAULT_LEVEL = 0.95
MIN_N_BOOT = 100
# Largest number of drawn cluster indices held at once ([chunk, c] int64: 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _as_values(x: Any, name: str) -> np.ndarray:
  """``x`` as a 1-D float64 array; ValueError naming ``name`` if empty, not 1-D or not finite."""
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {e}") from e
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D [n], got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name} is empty")
  if np.isnan(arr).any():
    raise ValueError(f"{name} contains NaN at rows {np.flatnonzero(np.isnan(arr))[:10].tolist()}")
  if not np.isfinite(arr).all():
    raise ValueError(f"{name} contains +-inf")
  return arr


def _cluster_codes(clusters: Optional[Sequence[Hashable]], n: int) -> Tuple[np.ndarray, int]:
  """Integer codes [n] in [0, c) (by first appearance) and ``c`` for the cluster ids."""
  if clusters is None:
    return np.arange(n), n
  if isinstance(clusters, np.ndarray):
    if clusters.ndim != 1:
      raise ValueError(f"clusters must be 1-D [n], got shape {clusters.shape}")
    ids = clusters.tolist()
  else:
    ids = list(clusters)
  if len(ids) != n:
    raise ValueError(f"clusters has {len(ids)} entries but there are {n} rows")
  table: Dict[Hashable, int] = {}
  codes = np.empty(n, dtype=np.int64)
  for i, key in enumerate(ids):
    try:
      codes[i] = table.setdefault(key, len(table))
    except TypeError as e:
      raise ValueError(f"clusters[{i}] = {key!r} is not hashable") from e
  return codes, len(table)


def _check_options(n_boot: int, level: float) -> None:
  if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)):
    raise ValueError(f"n_boot must be an int, got {n_boot!r}")
  if n_boot < MIN_N_BOOT:
    raise ValueError(f"n_boot must be >= {MIN_N_BOOT}, got {n_boot}")
  if not (isinstance(level, (int, float, np.floating)) and 0.0 < float(level) < 1.0):
    raise ValueError(f"level must be in (0, 1), got {level!r}")


def _bootstrap(values: np.ndarray, codes: np.ndarray, c: int, n_boot: int, level: float,
               seed: Any) -> Dict[str, Any]:
  """Percentile cluster bootstrap of the row mean; inputs already validated."""
  sums = np.bincount(codes, weights=values, minlength=c)  # [c] float64
  counts = np.bincount(codes, minlength=c).astype(np.float64)  # [c]
  rng = np.random.default_rng(seed)
  means = np.empty(n_boot, dtype=np.float64)
  chunk = max(1, _CHUNK_ELEMENTS // c)
  for start in range(0, n_boot, chunk):
    stop = min(n_boot, start + chunk)
    idx = rng.integers(0, c, size=(stop - start, c))  # [chunk, c] drawn clusters
    means[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
  alpha = (1.0 - float(level)) / 2.0
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(values.size),
          "clusters": int(c), "se": float(means.std(ddof=1))}


def bootstrap_mean(values: Sequence[float], clusters: Optional[Sequence[Hashable]] = None, *,
                   n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                   seed: Any = 0) -> Dict[str, Any]:
  """Mean over rows with a percentile cluster-bootstrap confidence interval.

  Each resample draws ``c`` clusters with replacement (an [n_boot, c] index matrix from
  ``np.random.default_rng(seed)``) and takes the mean over all rows of the drawn clusters, i.e.
  ``sum(cluster sums) / sum(cluster sizes)``; per-cluster sums and sizes are computed once.

  Args:
    values: [n] float (e.g. 0/1 judgements of each sample); cast to float64.
    clusters: [n] hashable ids (e.g. prompt index or prompt text); rows sharing an id are resampled
      together. None: every row is its own cluster (iid bootstrap).
    n_boot: number of bootstrap resamples, >= 100.
    level: two-sided confidence level in (0, 1).
    seed: anything ``np.random.default_rng`` accepts; a fixed seed gives identical results.
  Returns:
    dict: ``mean`` (float, the row mean of ``values``), ``lo`` / ``hi`` (float, the interval),
    ``n`` (int, rows), ``clusters`` (int, distinct ids), ``se`` (float, standard deviation of the
    bootstrap means, ddof=1).
  Raises:
    ValueError: ``values`` empty, not 1-D, non-numeric, NaN or +-inf; ``clusters`` of another
      length or with an unhashable id; ``n_boot`` < 100 or not an int; ``level`` not in (0, 1).
  """
  _check_options(n_boot, level)
  vals = _as_values(values, "values")
  codes, c = _cluster_codes(clusters, vals.size)
  return _bootstrap(vals, codes, c, n_boot, level, seed)


def _paired(a: Any, b: Any) -> Tuple[np.ndarray, np.ndarray]:
  a = _as_values(a, "a")
  b = _as_values(b, "b")
  if a.size != b.size:
    raise ValueError(f"a and b must be paired rows of equal length, got {a.size} and {b.size}")
  return a, b


def bootstrap_paired_difference(a: Sequence[float], b: Sequence[float],
                                clusters: Optional[Sequence[Hashable]] = None, *,
                                n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                                seed: Any = 0) -> Dict[str, Any]:
  """``mean(a) - mean(b)`` over paired rows, with a percentile cluster-bootstrap interval.

  Row i of ``a`` and of ``b`` belong together (same prompt / sample slot, e.g. policy vs SFT
  judgements). Both are resampled with the same cluster draw, so the pairing is kept; since the
  row means share a denominator this equals ``bootstrap_mean(a - b, clusters)`` with the same seed.

  Args:
    a: [n] float, first arm.
    b: [n] float, second arm, paired with ``a`` row by row.
    clusters: [n] hashable ids, or None (every row its own cluster); see ``bootstrap_mean``.
    n_boot: number of bootstrap resamples, >= 100.
    level: two-sided confidence level in (0, 1).
    seed: anything ``np.random.default_rng`` accepts.
  Returns:
    dict with the keys of ``bootstrap_mean``; ``mean``, ``lo``, ``hi`` are of the difference.
  Raises:
    ValueError: ``a`` or ``b`` empty, not 1-D, NaN or +-inf; lengths of ``a``, ``b`` and
      ``clusters`` differ; ``n_boot`` < 100; ``level`` not in (0, 1).
  """
  _check_options(n_boot, level)
  a, b = _paired(a, b)
  codes, c = _cluster_codes(clusters, a.size)
  return _bootstrap(a - b, codes, c, n_boot, level, seed)


def win_rate(a: Sequence[float], b: Sequence[float],
             clusters: Optional[Sequence[Hashable]] = None, *, n_boot: int = DEFAULT_N_BOOT,
             level: float = DEFAULT_LEVEL, seed: Any = 0) -> Dict[str, Any]:
  """Win rate of ``a`` over ``b`` (ties count one half), with a cluster-bootstrap interval.

  Per row the score is 1 if ``a > b``, 0.5 if ``a == b`` and 0 if ``a < b`` (exact comparison);
  the result is ``bootstrap_mean`` of the scores, i.e. ``(wins + ties / 2) / n``.

  Args:
    a: [n] float, scores of the first system (e.g. reward or judge score per sample).
    b: [n] float, scores of the second system on the same rows.
    clusters: [n] hashable ids, or None; see ``bootstrap_mean``.
    n_boot: number of bootstrap resamples, >= 100.
    level: two-sided confidence level in (0, 1).
    seed: anything ``np.random.default_rng`` accepts.
  Returns:
    the ``bootstrap_mean`` dict plus ``wins``, ``ties``, ``losses`` (int row counts).
  Raises:
    ValueError: as ``bootstrap_paired_difference``.
  """
  _check_options(n_boot, level)
  a, b = _paired(a, b)
  codes, c = _cluster_codes(clusters, a.size)
  score = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  out = _bootstrap(score, codes, c, n_boot, level, seed)
  out["wins"] = int(np.count_nonzero(a > b))
  out["ties"] = int(np.count_nonzero(a == b))
  out["losses"] = int(np.count_nonzero(a < b))
  return out


def format_ci(d: Dict[str, Any], digits: int = 3) -> str:
  """``"mean [lo, hi]"`` with ``digits`` decimals, e.g. ``"0.512 [0.471, 0.553]"``.

  Args:
    d: dict with float ``mean``, ``lo``, ``hi`` (any result of this module).
    digits: decimals, >= 0.
  Raises:
    KeyError: a key is missing. ValueError: ``digits`` < 0.
  """
  if digits < 0:
    raise ValueError(f"digits must be >= 0, got {digits}")
  return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"
