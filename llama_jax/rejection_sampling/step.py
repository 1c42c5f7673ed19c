"""Rejection-sampling fine-tuning: best-of-K selection, cross-iteration pooling, reward curves.

Llama 2 paper, Sec. 3.2.3: sample K outputs per prompt from the latest policy, score them with the
reward model, keep the best per prompt as the new gold standard and fine-tune on it (SFT-style).
Choosing only among the last iteration's samples caused regressions, so later iterations
"incorporate top-performing samples from all prior iterations": :func:`pool` keeps, per prompt,
the best sample seen in any iteration, after :func:`rescore` has scored the earlier iterations'
picks with the *current* reward (the paper: "the best reward model accessible"), so one pool never
compares scores of reward models retrained in between. A sample that did not end with EOS within
the token budget (``finished`` False) is truncated: it is never chosen (a prompt whose K samples
are all truncated has no pick and is left out). Figures 7 and 8 (max / median reward over N
samples, max reward vs temperature) are computed by :func:`reward_vs_n` and
:func:`reward_vs_temperature`.

A sampled-set record (one JSON object per line in a JSONL file)::

  {"prompt": [{"role": ..., "content": ...}, ...],   # the dialog so far (ends with a user turn)
   "samples": [str] * K, "scores": [float] * K,       # completions and their reward scores
   "chosen": int,                                     # index of the best finished sample
   "iteration": int, "temperature": float,            #   (ties -> lowest)
   "finished": [bool] * K,                            # optional: ended with EOS (default all)
   "is_safety": bool}                                 # optional: a safety prompt (default False)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import jax
from matplotlib.figure import Figure
import numpy as np
from tqdm.auto import tqdm

from llama_jax import convert, sampling, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import sources
from llama_jax.train import workdir as wd

Record = Dict[str, Any]
RECORD_KEYS = ("prompt", "samples", "scores", "chosen", "iteration", "temperature")


def select_best(scores, finished=None) -> np.ndarray:
  """Index of the best finished sample per prompt.

  Args:
    scores: [n_prompts, K] float reward scores.
    finished: [n_prompts, K] bool, the sample ended with EOS (default all True); truncated
      samples are never chosen.
  Returns:
    [n_prompts] int64 argmax over the finished samples (ties go to the lowest index); -1 for a
    prompt without a finished sample.
  Raises:
    ValueError: if ``scores`` is not 2-D with K >= 1, holds NaN, or ``finished`` has another
      shape.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] == 0:
    raise ValueError(f"scores must be [n_prompts, K] with K >= 1, got shape {scores.shape}")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  finished = np.ones(scores.shape, bool) if finished is None else np.asarray(finished, bool)
  if finished.shape != scores.shape:
    raise ValueError(f"finished has shape {finished.shape}, scores {scores.shape}")
  best = np.argmax(np.where(finished, scores, -np.inf), axis=1)  # the first maximal index
  return np.where(finished.any(axis=1), best, -1)


def validate_record(record: Mapping[str, Any], where: str = "record") -> Record:
  """Check a sampled-set record's fields and types; returns it as a plain dict.

  Raises:
    ValueError: naming ``where`` and the field, on a missing/extra field, wrong type, samples and
      scores of different lengths, an out-of-range ``chosen``, or NaN scores.
  """
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [k for k in RECORD_KEYS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  prompt = record["prompt"]
  if (not isinstance(prompt, list) or not prompt
      or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                 and isinstance(m.get("content"), str) for m in prompt)):
    raise ValueError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages")
  samples, scores = record["samples"], record["scores"]
  if not isinstance(samples, list) or not samples or not all(isinstance(s, str) for s in samples):
    raise ValueError(f"{where}: 'samples' must be a non-empty list of strings")
  if (not isinstance(scores, list) or len(scores) != len(samples)
      or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
    raise ValueError(f"{where}: 'scores' must be a list of {len(samples)} numbers")
  if any(math.isnan(s) for s in scores):
    raise ValueError(f"{where}: 'scores' contain NaN")
  chosen = record["chosen"]
  if not isinstance(chosen, int) or isinstance(chosen, bool) or not 0 <= chosen < len(samples):
    raise ValueError(f"{where}: 'chosen' must be an index in [0, {len(samples)}), got {chosen!r}")
  if not isinstance(record["iteration"], int) or isinstance(record["iteration"], bool):
    raise ValueError(f"{where}: 'iteration' must be an integer")
  if not isinstance(record["temperature"], (int, float)) or isinstance(record["temperature"], bool):
    raise ValueError(f"{where}: 'temperature' must be a number")
  finished = record.get("finished", [True] * len(samples))
  if (not isinstance(finished, list) or len(finished) != len(samples)
      or not all(isinstance(f, bool) for f in finished)):
    raise ValueError(f"{where}: 'finished' must be a list of {len(samples)} booleans")
  if not finished[chosen]:
    raise ValueError(f"{where}: 'chosen' ({chosen}) is a truncated sample (finished False)")
  if not samples[chosen].strip():
    raise ValueError(f"{where}: 'chosen' ({chosen}) is an empty sample")
  is_safety = record.get("is_safety", False)
  if not isinstance(is_safety, bool):
    raise ValueError(f"{where}: 'is_safety' must be a boolean")
  return {**{k: record[k] for k in RECORD_KEYS}, "finished": list(finished),
          "is_safety": is_safety}


def make_records(prompts: Sequence[Sequence[Mapping[str, str]]], samples: Sequence[Sequence[str]],
                 scores, *, iteration: int, temperature: float,
                 finished=None, is_safety: Optional[Sequence[bool]] = None) -> List[Record]:
  """Sampled-set records of one iteration, with ``chosen`` from :func:`select_best`; prompts
  without a finished sample get no record.

  Args:
    prompts: n_prompts dialogs. samples: [n_prompts][K] completions. scores: [n_prompts, K].
    iteration: the rejection-sampling iteration (RLHF-V1 = 1, ...). temperature: sampling T.
    finished: [n_prompts, K] bool, the sample ended with EOS (default all True).
    is_safety: [n_prompts] bool, the prompt is a safety prompt (default all False).
  Raises:
    ValueError: on mismatched sizes.
  """
  scores = np.asarray(scores, np.float64)
  if len(prompts) != len(samples) or scores.shape[0] != len(prompts):
    raise ValueError(f"{len(prompts)} prompts, {len(samples)} sample lists, "
                     f"{scores.shape[0]} score rows: they must match")
  if any(len(s) != scores.shape[1] for s in samples):
    raise ValueError(f"every prompt needs K = {scores.shape[1]} samples")
  finished = (np.ones(scores.shape, bool) if finished is None
              else np.asarray(finished, bool).reshape(scores.shape))
  best = select_best(scores, finished)
  safety = [False] * len(prompts) if is_safety is None else [bool(x) for x in is_safety]
  return [validate_record({"prompt": [dict(m) for m in p], "samples": list(s),
                           "scores": [float(x) for x in row], "chosen": int(c),
                           "iteration": int(iteration), "temperature": float(temperature),
                           "finished": [bool(f) for f in done], "is_safety": safe})
          for p, s, row, c, done, safe in zip(prompts, samples, scores, best, finished, safety)
          if c >= 0]


def best_score(record: Mapping[str, Any]) -> float:
  """The reward of a record's chosen sample."""
  return float(record["scores"][record["chosen"]])


def pool(previous_pool: Mapping[str, Record], new_records: Iterable[Record]) -> Dict[str, Record]:
  """Keep, per prompt, the best record across all iterations (Llama 2 Sec. 3.2.3).

  Args:
    previous_pool: ``prompt_key -> record`` from earlier iterations (not modified).
    new_records: this iteration's records.
  Returns:
    A new dict ``prompt_key -> record``: for each prompt, the record whose chosen sample has the
    highest score; on a tie the record already in the pool (the earlier one) stays.
  """
  out = dict(previous_pool)
  for i, record in enumerate(new_records):
    record = validate_record(record, f"new record {i}")
    key = sources.prompt_key(record["prompt"])
    old = out.get(key)
    if old is None or best_score(record) > best_score(old):
      out[key] = record
  return out


def write_records(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> str:
  """Write records (validated) one JSON object per line, atomically; returns the path.

  Raises:
    ValueError: naming the record, for a malformed one (nothing is written).
  """
  return sources.write_jsonl(path, [validate_record(r, f"record {i}")
                                    for i, r in enumerate(records)])


def iter_jsonl(path: str | os.PathLike):
  """``(line number, record)`` of each non-blank line of a sampled-set JSONL file, validated.

  Raises:
    ValueError: naming the file and line on invalid JSON or an invalid record.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: invalid JSON: {e}") from e
      yield n, validate_record(obj, f"{path}:{n}")


def read_jsonl(path: str | os.PathLike) -> List[Record]:
  """Read and validate a sampled-set JSONL file (:func:`iter_jsonl`'s records).

  Raises:
    ValueError: naming the file and line on invalid JSON or an invalid record.
  """
  return [r for _, r in iter_jsonl(path)]


def pool_from_records(records: Iterable[Record]) -> Dict[str, Record]:
  """A pool built from records of any number of iterations (e.g. all JSONL files so far)."""
  return pool({}, records)


def rescore(records: Sequence[Record], score_fn) -> List[Record]:
  """Earlier iterations' picks re-scored with the current reward, ready for :func:`pool`.

  Llama 2 Sec. 3.2.3 pools "top-performing samples from all prior iterations" and scores with
  "the best reward model accessible": scores written by reward models that have since been
  retrained are not comparable with this iteration's, so each record's chosen sample is scored
  again and kept as a one-sample record (its iteration and temperature unchanged).

  Args:
    records: sampled-set records of earlier iterations.
    score_fn: ``(records) -> [n] float`` current-reward scores of each record's chosen sample
      (its ``prompt``, ``samples[chosen]`` and ``is_safety``).
  Returns:
    One record per input: ``samples = [chosen sample]``, ``scores = [new score]``, ``chosen = 0``.
  Raises:
    ValueError: if ``score_fn`` returns the wrong number of scores or NaN.
  """
  records = [validate_record(r, f"pooled record {i}") for i, r in enumerate(records)]
  if not records:
    return []
  picks = [r["samples"][r["chosen"]] for r in records]
  scores = np.asarray(score_fn(records), np.float64)
  if scores.shape != (len(records),):
    raise ValueError(f"score_fn returned shape {scores.shape} for {len(records)} records")
  return [validate_record({**r, "samples": [pick], "scores": [float(x)], "chosen": 0,
                           "finished": [True]})
          for r, pick, x in zip(records, picks, scores)]


def to_sft_records(best: Mapping[str, Record] | Sequence[Record]) -> List[Dict[str, Any]]:
  """SFT dialog records ``{"messages": prompt + [{"role": "assistant", "content": chosen}]}``
  of each record's chosen sample: a pool (``prompt_key -> record``) sorted by prompt key, a list
  of records (e.g. RAFT's kept samples, several per prompt) in its order."""
  records = [r for _, r in sorted(best.items())] if isinstance(best, Mapping) else list(best)
  return [{"messages": [dict(m) for m in r["prompt"]]
           + [{"role": "assistant", "content": r["samples"][r["chosen"]]}]}
          for r in records]


def order_stat_weights(k: int, n: int, j: int) -> np.ndarray:
  """[k] float64: entry ``i - 1`` is P(the i-th smallest of k values (1-based) is the j-th
  smallest of a uniformly random n-subset) ``= C(i-1, j-1) C(k-i, n-j) / C(k, n)``; so
  ``sorted_row @ weights`` is the exact expected j-th order statistic of an n-subset (j = n: the
  subset's max, i.e. the best-of-n pick). Requires ``1 <= j <= n <= k``."""
  total = math.comb(k, n)
  return np.asarray([math.comb(i - 1, j - 1) * math.comb(k - i, n - j) / total
                     for i in range(1, k + 1)], np.float64)


def _expected_order_stat(sorted_row: np.ndarray, n: int, j: int) -> float:
  """E[j-th smallest (1-based) of a uniformly random n-subset] of the ascending ``sorted_row``."""
  return float(np.asarray(sorted_row, np.float64) @ order_stat_weights(len(sorted_row), n, j))


def reward_vs_n(scores, ns: Optional[Sequence[int]] = None,
                estimator: str = "first") -> Dict[str, list]:
  """Max and median reward among N samples (Llama 2 Fig. 7), averaged over prompts.

  Two estimators of "the max (median) reward among N samples of a prompt":
    * ``"first"``: the max (median) of the first N of the K samples (samples are i.i.d., so this is
      an unbiased single draw per prompt); the curve is the mean over prompts.
    * ``"subsets"``: the exact expectation over all C(K, N) N-subsets of the K samples (order
      statistics; lower variance); median of an even N is the mean of the two middle values.

  Args:
    scores: [n_prompts, K] float rewards.
    ns: the N values (each in 1..K); default 1..K.
    estimator: "first" or "subsets".
  Returns:
    ``{"n": [N...], "max": [float...], "median": [float...]}``.
  Raises:
    ValueError: on a bad shape, N outside 1..K, or an unknown estimator.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] == 0 or scores.shape[0] == 0:
    raise ValueError(f"scores must be [n_prompts, K] with both > 0, got shape {scores.shape}")
  k = scores.shape[1]
  ns = list(range(1, k + 1)) if ns is None else [int(n) for n in ns]
  if any(not 1 <= n <= k for n in ns):
    raise ValueError(f"every N must be in 1..K={k}, got {ns}")
  if estimator not in ("first", "subsets"):
    raise ValueError(f"estimator must be 'first' or 'subsets', got {estimator!r}")
  out = {"n": ns, "max": [], "median": []}
  srt = np.sort(scores, axis=1)
  for n in ns:
    if estimator == "first":
      out["max"].append(float(np.mean(np.max(scores[:, :n], axis=1))))
      out["median"].append(float(np.mean(np.median(scores[:, :n], axis=1))))
    else:
      mx = [_expected_order_stat(row, n, n) for row in srt]
      lo, hi = (n + 1) // 2, n // 2 + 1
      med = [0.5 * (_expected_order_stat(row, n, lo) + _expected_order_stat(row, n, hi))
             if n % 2 == 0 else _expected_order_stat(row, n, lo) for row in srt]
      out["max"].append(float(np.mean(mx)))
      out["median"].append(float(np.mean(med)))
  return out


def reward_vs_temperature(scores_by_temperature: Mapping[float, Any], n: Optional[int] = None,
                          estimator: str = "first") -> Dict[str, list]:
  """Max reward among N samples as a function of the sampling temperature (Llama 2 Fig. 8).

  Args:
    scores_by_temperature: ``T -> [n_prompts, K]`` scores sampled at temperature T.
    n: N (default K of each matrix). estimator: as in :func:`reward_vs_n`.
  Returns:
    ``{"temperature": [T...] ascending, "max": [float...]}``.
  """
  temps = sorted(float(t) for t in scores_by_temperature)
  lookup = {float(t): s for t, s in scores_by_temperature.items()}
  maxes = []
  for t in temps:
    s = np.asarray(lookup[t])
    maxes.append(reward_vs_n(s, [n or s.shape[1]], estimator)["max"][0])
  return {"temperature": temps, "max": maxes}


def _save(fig: Figure, ax, xlabel: str, ylabel: str, out_png: str | os.PathLike) -> str:
  """Label the axes, add the legend and write ``out_png`` (120 dpi); returns its path."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.fspath(out_png), dpi=120)
  return os.fspath(out_png)


def plot_reward_vs_n(curves: Mapping[str, Mapping[str, list]], out_png: str | os.PathLike) -> str:
  """Fig. 7-style plot: max (solid) and median (dashed) reward vs N, one colour per label
  (e.g. per iteration). ``curves``: label -> :func:`reward_vs_n` output. Returns the path."""
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for i, (label, c) in enumerate(curves.items()):
    color = f"C{i}"
    ax.plot(c["n"], c["max"], "-o", color=color, ms=3, label=f"{label} max")
    ax.plot(c["n"], c["median"], "--", color=color, label=f"{label} median")
  ax.set_xscale("log")
  return _save(fig, ax, "N samples", "reward score", out_png)


def plot_reward_vs_temperature(curves: Mapping[str, Mapping[str, list]],
                               out_png: str | os.PathLike) -> str:
  """Fig. 8-style plot: max reward vs temperature, one line per label (model / iteration).
  ``curves``: label -> :func:`reward_vs_temperature` output. Returns the path."""
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for label, c in curves.items():
    ax.plot(c["temperature"], c["max"], "-o", ms=3, label=label)
  return _save(fig, ax, "temperature", "max reward among N samples", out_png)


def sample_k(params, cfg, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], k: int,
             key: jax.Array, temperature: float, max_new_tokens: int, *, top_p: float = 1.0,
             pad_to_multiple: int = 16
             ) -> tuple[List[List[str]], List[List[bool]], List[List[int]]]:
  """K sampled completions per dialog prompt (one batch of K rows per prompt).

  Row ``i * K + j`` of the batch is sample ``j`` of prompt ``i``; generation is
  :func:`llama_jax.sampling.generate` (jitted ``sampling.sample``) with ``num_samples=K``: each
  prompt is prefilled once, and a fixed ``key`` reproduces the same samples. Completions are
  decoded up to (without) EOS and stripped.

  Args:
    params, cfg: the policy. tokenizer: ``llama_jax.tokenizer.Tokenizer`` (chat format).
    prompts: dialogs ending with a user turn. k: samples per prompt (K >= 1).
    key: PRNG key. temperature: > 0. max_new_tokens: per completion.
    top_p: nucleus filter. pad_to_multiple: prompt padding granularity (fewer recompiles).
  Returns:
    ([n_prompts][K] decoded strings, [n_prompts][K] bool: the sample ended with EOS within
    ``max_new_tokens``; False = truncated, [n_prompts][K] int: tokens generated, EOS included).
  Raises:
    ValueError: if ``k`` < 1, ``temperature`` <= 0 or ``prompts`` is empty.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for rejection sampling, got {temperature}")
  if not prompts:
    raise ValueError("prompts is empty")
  ids = [tokenizer.encode_dialog(list(p))[0].tolist() for p in prompts]
  out = sampling.generate(params, cfg, ids, key, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, pad_to_multiple=pad_to_multiple, num_samples=k)
  texts = sampling.decode(out, tokenizer)
  done = np.asarray(out.finished).tolist()
  lengths = np.asarray(out.lengths).tolist()
  rows = lambda flat: [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
  return rows(texts), rows(done), rows(lengths)


class Policy(NamedTuple):
  """A policy to sample: its model config and params (e.g. on the generation layout) and, for
  params on a mesh, that mesh: sampling then runs under ``sharding.GENERATION_RULES`` (rows
  split over data x fsdp, as ``--dry_run`` plans it); without it the batch's placement is left
  to XLA."""

  cfg: LlamaConfig
  params: Any
  mesh: Any = None


def load_policy(path: str, tokenizer, mesh) -> Policy:
  """The orbax checkpoint at ``path`` (a ``final/`` or converted directory) as a :class:`Policy`
  on ``mesh``'s generation layout (``sharding.to_generation_layout``).

  Raises:
    ValueError: if ``tokenizer``'s vocabulary does not fit the checkpoint's model.
  """
  cfg, params = convert.load_orbax(path)
  tokenizer.check_vocab(cfg)
  return Policy(cfg, sharding.to_generation_layout(params, cfg, mesh), mesh)


class SamplingStopped(Exception):
  """A stop was requested between two batches of :func:`sample_texts` (the finished batches
  are in its ``batch_dir``)."""


def answered(texts: Sequence[Sequence[str]], finished: Sequence[Sequence[bool]]
             ) -> List[List[bool]]:
  """[n][k] bool: which samples are answers to keep: finished (an EOS within the budget) and not
  empty (EOS first is no answer to fine-tune on). texts: [n][k] str; finished: [n][k] bool."""
  return [[bool(f) and bool(t.strip()) for t, f in zip(row, done)]
          for row, done in zip(texts, finished)]


def sample_texts(config, policy: Policy, tokenizer, prompts: List[dict], *, k: int, temperature: float,
                 key: jax.Array, batch_dir: Optional[str] = None,
                 stop: Optional[Callable[[], bool]] = None, desc: str = "sampling"
                 ) -> tuple[List[List[str]], List[List[bool]], Optional[int]]:
  """K samples per prompt record (``{"prompt": dialog, ...}``): ([n][k] texts, [n][k] finished,
  tokens sampled), generated in batches of ``config.rejection_sampling.batch_size`` prompts
  (batch at offset i with key ``fold_in(key, i)``) with its ``max_new_tokens`` and ``top_p``.
  policy: a :class:`Policy`. ``finished`` False marks a sample truncated at the token budget.
  The tokens sampled (generated tokens, EOS included, summed) are None when a reused batch
  file predates their count.

  ``batch_dir``: each finished batch is written there (process 0, ``batch_<i>.json``) and reused
  by a later call, so an interrupted pass resumes where it stopped with the same samples.
  ``stop``: checked after each batch; when it returns True, raises :class:`SamplingStopped`.
  ``desc``: the progress bar's label (process 0; prompts done, reused batches included).
  """
  rc = config.rejection_sampling
  cfg, params = policy.cfg, policy.params
  texts: List[List[str]] = []
  finished: List[List[bool]] = []
  tokens: List[Optional[int]] = []  # per batch
  bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  for start in range(0, len(prompts), rc.batch_size):
    path = batch_dir and os.path.join(batch_dir, f"batch_{start:07d}.json")
    if path and os.path.isfile(path):
      with open(path) as fh:
        done = json.load(fh)
      t, f, n = done["texts"], done["finished"], done.get("tokens")
    else:
      chunk = [p["prompt"] for p in prompts[start:start + rc.batch_size]]
      with (sharding.activate(policy.mesh, sharding.GENERATION_RULES) if policy.mesh is not None
            else contextlib.nullcontext()):
        t, f, lengths = sample_k(params, cfg, tokenizer, chunk, k, jax.random.fold_in(key, start),
                                 temperature, rc.max_new_tokens, top_p=rc.top_p)
      n = int(sum(map(sum, lengths)))
      if path and jax.process_index() == 0:
        os.makedirs(batch_dir, exist_ok=True)
        with open(path + ".tmp", "w") as fh:
          json.dump({"texts": t, "finished": [[bool(x) for x in row] for row in f],
                     "tokens": n}, fh)
        os.replace(path + ".tmp", path)
    texts += t
    finished += f
    tokens.append(n)
    bar.update(len(t))
    if stop is not None and stop():
      bar.close()
      raise SamplingStopped(f"stopped after {start + len(t)} of {len(prompts)} prompts")
  bar.close()
  return texts, finished, wd.sum_counts(tokens)
