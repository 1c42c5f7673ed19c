"""The reference log-probs of DPO: computed once before step 0, cached, delivered with the data.

The reference policy is the SFT policy (``config.init_from``). Instead of a second live model,
one jitted pass (``step.reference_logps``) scores every train pair (and the held-out pairs the
evaluation uses) with the SFT params, which are freed afterwards; each record then carries its
``ref_chosen_logps`` / ``ref_rejected_logps`` (:class:`WithReference`), so the ordinary grain
pipeline (shuffle, mixture, checkpointed iterator) delivers them in every batch
(:func:`dpo_batches`).

Resume: the tables are written to ``<workdir>/reference_logps.npz`` (process 0, atomically: a
temporary file renamed) with a fingerprint of everything they depend on (``init_from`` and its
checksums, the model, tokenizer and data settings, the DPO mixture and lengths). A resumed run
reads them back instead of recomputing, so it trains on bit-identical references even on another
mesh or machine; a missing file or another fingerprint means a fresh pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import convert, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import input_pipeline
from llama_jax.dpo import step as dpo

log = logging.getLogger(__name__)

CACHE = "reference_logps.npz"
# config.dpo fields the tables depend on (beta, batch size, LR, ... do not change them).
_DPO_FIELDS = ("sources", "max_seq_len", "overlong", "world_train_pairs", "world_heldout_pairs",
               "eval_pairs")
Table = Tuple[np.ndarray, np.ndarray]  # (chosen [n], rejected [n]) float32; NaN = pair dropped


class WithReference:
  """A random-access source of preference records (``len`` / ``__getitem__``, what
  ``input_pipeline.records_dataset`` takes) whose record ``i`` carries ``ref_chosen_logps`` /
  ``ref_rejected_logps`` = ``chosen[i]`` / ``rejected[i]`` (Python floats)."""

  def __init__(self, source: Any, table: Table):
    if len(table[0]) != len(source) or len(table[1]) != len(source):
      raise ValueError(f"reference tables of {len(table[0])} pairs for a source of {len(source)}")
    self.source, self.chosen, self.rejected = source, table[0], table[1]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    record = input_pipeline.decode_record(self.source[i])
    return {**record, "ref_chosen_logps": float(self.chosen[i]),
            "ref_rejected_logps": float(self.rejected[i])}


def dpo_example(record: Mapping[str, Any], tokenizer: Any, max_seq_len: int):
  """``input_pipeline.preference_example`` plus the record's reference log-probs ([] float32),
  or None if the pair is too long."""
  ex = input_pipeline.preference_example(record, tokenizer, max_seq_len)
  if ex is None:
    return None
  return {**ex, **{k: np.float32(record[k]) for k in dpo.REF_KEYS}}


def dpo_batches(records: grain.MapDataset, tokenizer: Any, *, batch_size: int, max_seq_len: int,
                drop_remainder: bool = True) -> grain.IterDataset:
  """Padded pair batches with reference log-probs: ``input_pipeline.preference_batches``' keys
  plus ``ref_chosen_logps`` / ``ref_rejected_logps`` [b] float32 (records from
  :class:`WithReference` sources)."""
  if batch_size < 1 or max_seq_len < 2:
    raise ValueError(f"batch_size must be >= 1 and max_seq_len >= 2, got {batch_size}, "
                     f"{max_seq_len}")
  ds = records.map(functools.partial(dpo_example, tokenizer=tokenizer, max_seq_len=max_seq_len))
  return ds.filter(lambda x: x is not None).to_iter_dataset().batch(batch_size,
                                                                    drop_remainder=drop_remainder)


def fingerprint(config) -> str:
  """JSON of what the tables depend on: ``init_from`` (path and checksums), ``config.model``,
  ``config.tokenizer``, ``config.data`` and the mixture fields of ``config.dpo``."""
  init_from = os.path.abspath(config.init_from)
  sums = os.path.join(init_from, convert.CHECKSUMS)
  digest = ""
  if os.path.isfile(sums):
    with open(sums, "rb") as f:
      digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
  return json.dumps({"init_from": init_from, "checksums": digest,
                     "model": config.model.to_dict(), "tokenizer": config.tokenizer.to_dict(),
                     "data": config.data.to_dict(),
                     "dpo": {k: config.dpo[k] for k in _DPO_FIELDS}}, sort_keys=True, default=str)


def _key(name: str, split: str, side: str) -> str:
  return f"{name}.{split}.{side}"


def load(path: str, want: str, parts: Sequence[Tuple[str, str, int]]):
  """The cached tables of ``parts`` ((source, split, pairs) triples) from ``path``, or None if
  it is missing, holds another fingerprint or other pair counts."""
  if not os.path.isfile(path):
    return None
  with np.load(path, allow_pickle=False) as z:
    if str(z["fingerprint"]) != want:
      log.warning("dpo: %s was computed for another config; recomputing", path)
      return None
    out = {}
    for name, split, n in parts:
      keys = (_key(name, split, "chosen"), _key(name, split, "rejected"))
      if any(k not in z.files or len(z[k]) != n for k in keys):
        return None
      out[(name, split)] = (z[keys[0]], z[keys[1]])
  return out


def save(path: str, fp: str, tables: Mapping[Tuple[str, str], Table]) -> None:
  """Write the tables (process 0; a temporary file renamed, so a kill leaves none or all)."""
  if jax.process_index() != 0:
    return
  arrays = {"fingerprint": np.asarray(fp)}
  for (name, split), (chosen, rejected) in tables.items():
    arrays[_key(name, split, "chosen")] = chosen
    arrays[_key(name, split, "rejected")] = rejected
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def reference_fn(cfg: LlamaConfig, mesh, rules, param_shardings: Any):
  """``step.reference_logps`` jitted with explicit shardings (params as ``param_shardings``, rows
  over the batch axes, the [b] outputs replicated so every process reads them all)."""
  return sharding.jit_step(functools.partial(dpo.reference_logps, cfg=cfg), mesh, rules,
                           in_shardings=(param_shardings, sharding.batch_sharding(mesh, rules)),
                           out_shardings=NamedSharding(mesh, P()), donate_argnums=())


def _empty_like(example: Mapping[str, np.ndarray]) -> dict:
  return {k: np.zeros_like(example[k]) for k in dpo.ROW_KEYS}


def compute(params: Any, cfg: LlamaConfig, mesh, rules, tokenizer: Any,
            parts: Sequence[Tuple[str, str, Sequence[Mapping[str, Any]]]], max_seq_len: int,
            rows: int, put_batch: Callable[[Any], Any]) -> Dict[Tuple[str, str], Table]:
  """Reference log-probs of every pair of ``parts`` ((source, split, records)) in batches of
  ``rows`` pairs (global; each process feeds its ``rows / processes`` slice of every batch, all
  processes read the replicated results). Pairs too long for ``max_seq_len`` get NaN (they never
  reach a batch)."""
  fn = reference_fn(cfg, mesh, rules, jax.tree.map(lambda x: x.sharding, params))
  n_proc, p = jax.process_count(), jax.process_index()
  if rows % n_proc:
    raise ValueError(f"reference batch of {rows} pairs is not divisible by {n_proc} processes")
  local = rows // n_proc
  out = {}
  for name, split, records in parts:
    examples = [input_pipeline.preference_example(input_pipeline.decode_record(r), tokenizer,
                                                  max_seq_len) for r in records]
    keep = [i for i, ex in enumerate(examples) if ex is not None]
    chosen = np.full(len(examples), np.nan, np.float32)
    rejected = np.full(len(examples), np.nan, np.float32)
    for start in range(0, len(keep), rows):
      idx = keep[start:start + rows]
      mine = [examples[i] for i in idx[p * local:(p + 1) * local]]
      mine += [_empty_like(examples[keep[0]])] * (local - len(mine))
      batch = {k: np.stack([ex[k] for ex in mine]) for k in dpo.ROW_KEYS}
      got = jax.device_get(fn(params, put_batch(batch)))
      chosen[idx] = got["ref_chosen_logps"][:len(idx)]
      rejected[idx] = got["ref_rejected_logps"][:len(idx)]
    out[(name, split)] = (chosen, rejected)
  return out


def tables(config, workdir: str, cfg: LlamaConfig, mesh, rules, tokenizer: Any,
           parts: Sequence[Tuple[str, str, Sequence[Any]]], rows: int,
           load_params: Callable[[], Any], put_batch: Callable[[Any], Any]):
  """(tables, info): the cached tables of ``parts`` when ``<workdir>/reference_logps.npz`` holds
  them for this config, else one :func:`compute` pass with ``load_params()`` (the SFT params,
  dropped afterwards) and the cache written. ``info``: ``cached``, ``seconds``, and per
  ``source/split`` the pairs scored and their mean reference log-probs."""
  t0 = time.perf_counter()
  path, fp = os.path.join(workdir, CACHE), fingerprint(config)
  got = load(path, fp, [(name, split, len(records)) for name, split, records in parts])
  cached = got is not None
  if not cached:
    params = load_params()
    got = compute(params, cfg, mesh, rules, tokenizer, parts, config.dpo.max_seq_len, rows,
                  put_batch)
    del params  # the reference model is not kept
    save(path, fp, got)
  info: Dict[str, Any] = {"cached": cached, "seconds": round(time.perf_counter() - t0, 3)}
  for (name, split), (chosen, rejected) in got.items():
    ok = np.isfinite(chosen)
    info[f"{name}/{split}"] = {
        "pairs": int(ok.sum()),
        "mean_ref_chosen_logps": float(chosen[ok].mean()) if ok.any() else 0.0,
        "mean_ref_rejected_logps": float(rejected[ok].mean()) if ok.any() else 0.0}
  log.info("dpo: reference log-probs %s in %.1f s", "read from the cache" if cached
           else "computed", info["seconds"])
  return got, info


def held_out(source: Any, limit: int) -> List[Any]:
  """The first ``limit`` records of a held-out source (all for 0)."""
  n = len(source) if not limit else min(limit, len(source))
  return [source[i] for i in range(n)]
