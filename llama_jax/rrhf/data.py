"""RRHF's data: candidate sets read from sampled-set JSONL files, checked, split and batched.

A candidate set is one prompt with its scored responses::

  {"prompt": [{"role": ..., "content": ...}, ...], "responses": [str] * n, "scores": [float] * n}

built from a rejection-sampling record (``rejection_sampling.step``: ``samples``, ``scores``,
``finished``) by keeping its finished, non-empty samples: a truncated sample never ended, and
training on it with an EOS appended would teach an answer the policy did not give. Any source
(policy samples, a dataset's chosen / rejected, demonstrations) enters the same way: write it as
sampled-set records.

Batches (:func:`rrhf_batches`) hold ``rrhf.k`` rows per prompt: the first k responses of a set
(more are cut, fewer padded with ``valid`` False rows); keys, shapes and dtypes in
``rrhf.step``'s docstring.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Tuple

import grain
import numpy as np

from llama_jax.data import input_pipeline, tfds_builders
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.train import build


def candidate_set(record: Mapping[str, Any]) -> Dict[str, Any]:
  """The candidate set of a validated sampled-set record: its finished, non-empty samples and
  their scores, in the record's order."""
  keep = [j for j, (s, f) in enumerate(zip(record["samples"], record["finished"]))
          if f and s.strip()]
  return {"prompt": [dict(m) for m in record["prompt"]],
          "responses": [record["samples"][j] for j in keep],
          "scores": [float(record["scores"][j]) for j in keep]}


def load(config, tokenizer) -> Tuple[List[dict], List[dict], dict]:
  """(train sets, held-out sets, stats) of ``config.rrhf.sampled``: candidate sets checked
  against ``rrhf.max_seq_len`` and split by prompt (``data.heldout_fraction``,
  ``data.split_seed``; ``tfds_builders.split_records``).

  Stats: ``records``, ``candidates`` (kept), ``truncated_or_empty`` and ``overlong`` (left out),
  ``beyond_k`` (kept but cut from batches), ``sets_without_candidates``, ``train_prompts``,
  ``held_out_prompts``.
  Raises:
    ValueError: for an empty field, a record that is not a valid sampled-set record (file and
      line named), with ``rrhf.overlong="error"`` a candidate longer than ``rrhf.max_seq_len``
      (file, line, candidate and tokens named), or no train prompt with a candidate left.
    FileNotFoundError: for a missing file.
  """
  rc = config.rrhf
  paths = build.parse_list(rc.sampled, "config.rrhf.sampled")
  if not paths:
    raise ValueError("config.rrhf.sampled is empty: give sampled-set JSONL files (e.g. a "
                     "rejection-sampling stage's sampled.jsonl), comma-separated")
  stats = dict.fromkeys(("records", "candidates", "truncated_or_empty", "overlong", "beyond_k",
                         "sets_without_candidates"), 0)
  sets = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.rrhf.sampled: {path!r} not found")
    for n, record in rs_lib.iter_jsonl(path):
      stats["records"] += 1
      cs = candidate_set(record)
      stats["truncated_or_empty"] += len(record["samples"]) - len(cs["responses"])
      fits = []
      for j, resp in enumerate(cs["responses"]):
        ok = input_pipeline.encode_response(tokenizer, cs["prompt"], resp,
                                            rc.max_seq_len) is not None
        if not ok and rc.overlong == "error":
          tokens = len(tokenizer.encode_dialog(cs["prompt"] + [{"role": "assistant",
                                                                "content": resp}])[0])
          raise ValueError(f"{path}:{n}: candidate {j} has {tokens} tokens (prompt + response "
                           f"+ EOS), more than config.rrhf.max_seq_len={rc.max_seq_len}; raise "
                           "it, or set config.rrhf.overlong='drop' to leave such candidates out")
        fits.append(ok)
      stats["overlong"] += fits.count(False)
      cs = {**cs, "responses": [r for r, ok in zip(cs["responses"], fits) if ok],
            "scores": [s for s, ok in zip(cs["scores"], fits) if ok]}
      stats["candidates"] += len(cs["responses"])
      stats["beyond_k"] += max(0, len(cs["responses"]) - rc.k)
      if cs["responses"]:
        sets.append(cs)
      else:
        stats["sets_without_candidates"] += 1
  parts = tfds_builders.split_records(sets, config.data.heldout_fraction, config.data.split_seed)
  stats["train_prompts"], stats["held_out_prompts"] = len(parts["train"]), len(parts["held_out"])
  if not parts["train"]:
    raise ValueError(f"config.rrhf.sampled: no train prompt with a finished candidate that fits "
                     f"config.rrhf.max_seq_len={rc.max_seq_len} ({stats})")
  return parts["train"], parts["held_out"], stats


def rrhf_example(record: Mapping[str, Any], tokenizer: Any, k: int,
                 max_seq_len: int) -> Dict[str, np.ndarray]:
  """The [k, t] rows of one candidate set (its first k responses; missing or overlong ones are
  ``valid`` False rows of padding): ``tokens``, ``mask``, ``response_mask``, ``scores`` [k]
  float32, ``valid`` [k] bool."""
  out = {"tokens": np.full((k, max_seq_len), tokenizer.pad_id, np.int32),
         "mask": np.zeros((k, max_seq_len), bool),
         "response_mask": np.zeros((k, max_seq_len), bool),
         "scores": np.zeros(k, np.float32), "valid": np.zeros(k, bool)}
  for j, (resp, score) in enumerate(zip(record["responses"][:k], record["scores"][:k])):
    enc = input_pipeline.encode_response(tokenizer, record["prompt"], resp, max_seq_len)
    if enc is None:
      continue
    out["tokens"][j], out["mask"][j], out["response_mask"][j] = enc
    out["scores"][j], out["valid"][j] = score, True
  return out


def rrhf_batches(records: grain.MapDataset, tokenizer: Any, *, batch_size: int, k: int,
                 max_seq_len: int, drop_remainder: bool = True) -> grain.IterDataset:
  """Batches of ``batch_size`` candidate sets (:func:`rrhf_example` stacked: [b, k, t] rows).

  Raises:
    ValueError: if ``batch_size`` or ``k`` < 1 or ``max_seq_len`` < 2.
  """
  if batch_size < 1 or k < 1 or max_seq_len < 2:
    raise ValueError(f"batch_size and k must be >= 1 and max_seq_len >= 2, got {batch_size}, "
                     f"{k}, {max_seq_len}")
  ds = records.map(functools.partial(rrhf_example, tokenizer=tokenizer, k=k,
                                     max_seq_len=max_seq_len))
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)
