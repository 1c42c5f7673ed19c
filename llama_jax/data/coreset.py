"""Coreset selection of SFT demonstrations (Chen et al. 2023, "Maybe Only 0.5% Data is Needed").

Each demonstration is embedded by a model (the mean over its real tokens of the final,
RMSNorm-ed hidden states, L2-normalized: :func:`embed`), the embeddings are clustered by K-means
(``sklearn.cluster.KMeans``; the clusters stand for the paper's tasks) and, starting from the
example nearest each cluster's centre, greedy k-center (:func:`kcenter_greedy`: repeatedly the
example farthest from all picked so far) picks ``k = ceil(select_fraction * n)`` examples
(:func:`coreset_indices`). :func:`random_indices` is the baseline: a seeded uniform subset of
the same size.

The SFT stage calls :func:`select` in ``prepare`` on each source's train split (sources are
selected separately, so their mixture weights keep their meaning; held-out splits stay whole).
It writes nothing: the selection is recomputed, deterministically, when a run resumes, and its
summary goes to ``data_stats.json`` under ``selection``.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.config import LlamaConfig
from llama_jax.data import input_pipeline, world
from llama_jax.model import forward


def _embed_rows(params: Any, tokens: jax.Array, mask: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
  """[b, t] int32 tokens, [b, t] bool mask -> [b, d] float32 unit mean-pooled hidden states."""
  mask = jnp.asarray(mask, bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0) * mask
  hidden = forward(params, tokens, cfg, positions=positions, segment_ids=mask.astype(jnp.int32),
                   return_hidden=True)  # [b, t, d] float32
  m = mask.astype(jnp.float32)[..., None]
  mean = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def embed(params: Any, cfg: LlamaConfig, tokens: np.ndarray, mask: np.ndarray,
          batch_size: int) -> np.ndarray:
  """Embeddings of ``n`` token rows: the mean of the final hidden states (``model.forward(...,
  return_hidden=True)``, after the last RMSNorm) over each row's real tokens, L2-normalized.

  Rows are scored alone (padding is its own attention segment, positions count real tokens), in
  jitted batches of ``batch_size`` rows (the last one padded with empty rows, so one shape is
  compiled). With sharded ``params`` every process passes the same rows and reads all results.

  Args:
    params: Llama params (``output`` is not used). cfg: their config.
    tokens: [n, t] int token ids. mask: [n, t] bool, real tokens. batch_size: rows per call, >= 1.
  Returns:
    [n, d] float32 unit vectors (a row without a real token gives zeros).
  Raises:
    ValueError: on mismatched shapes or ``batch_size`` < 1.
  """
  tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
  if tokens.ndim != 2 or tokens.shape != mask.shape or batch_size < 1:
    raise ValueError(f"embed: tokens {tokens.shape} and mask {mask.shape} must be equal [n, t] "
                     f"shapes and batch_size >= 1 (got {batch_size})")
  sh = getattr(jax.tree.leaves(params)[0], "sharding", None)
  out = NamedSharding(sh.mesh, P()) if isinstance(sh, NamedSharding) else None
  fn = jax.jit(functools.partial(_embed_rows, cfg=cfg), out_shardings=out)
  n, pad = len(tokens), -len(tokens) % batch_size
  tokens, mask = np.pad(tokens, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
  parts = [np.asarray(jax.device_get(fn(params, tokens[i:i + batch_size], mask[i:i + batch_size])))
           for i in range(0, len(tokens), batch_size)] or [np.zeros((0, cfg.dim), np.float32)]
  return np.concatenate(parts)[:n].astype(np.float32)


def kcenter_greedy(x: np.ndarray, k: int, initial: Sequence[int] = ()) -> np.ndarray:
  """Greedy k-center (Gonzalez 1985; the KCenterGreedy of Sener & Savarese 2018's coreset).

  Starts from ``initial`` (or, if empty, the point nearest the mean of ``x``) and adds, until
  ``k`` are picked, the point whose Euclidean distance to its nearest picked point is largest
  (ties: the lowest index). Already-picked points are never picked again, so duplicates of a
  picked point come last.

  Args:
    x: [n, d] points (compared in float64). k: points to pick, 1 <= k <= n.
    initial: distinct indices picked first, in order (only the first ``k`` if more).
  Returns:
    [k] int64 distinct indices in the order picked.
  Raises:
    ValueError: ``x`` not 2-D, ``k`` out of range, or ``initial`` out of range or repeated.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"kcenter_greedy: x must be [n, d], got shape {x.shape}")
  n = len(x)
  if not 1 <= k <= n:
    raise ValueError(f"kcenter_greedy: k must be in [1, {n}], got {k}")
  picked = [int(i) for i in initial]
  if any(not 0 <= i < n for i in picked) or len(set(picked)) != len(picked):
    raise ValueError(f"kcenter_greedy: initial indices must be distinct in [0, {n}), got {picked}")
  if not picked:
    picked = [int(np.argmin(np.linalg.norm(x - x.mean(axis=0), axis=1)))]
  picked = picked[:k]
  nearest = np.full(n, np.inf)
  for i in picked:
    nearest = np.minimum(nearest, np.linalg.norm(x - x[i], axis=1))
  nearest[picked] = -1.0
  while len(picked) < k:
    i = int(np.argmax(nearest))
    picked.append(i)
    nearest = np.minimum(nearest, np.linalg.norm(x - x[i], axis=1))
    nearest[i] = -1.0
  return np.asarray(picked, np.int64)


def coreset_indices(embeddings: np.ndarray, k: int, n_clusters: int, seed: int) -> np.ndarray:
  """The ``k`` most representative rows of ``embeddings``: K-means with ``min(n_clusters, k)``
  clusters (``sklearn.cluster.KMeans``, ``random_state=seed``, 10 inits), then
  :func:`kcenter_greedy` started from each non-empty cluster's member nearest its centre.

  Args:
    embeddings: [n, d] float (e.g. :func:`embed`'s). k: 1 <= k <= n. n_clusters: >= 1.
    seed: K-means' random state.
  Returns:
    [k] int64 distinct indices, sorted (deterministic for the same inputs).
  Raises:
    ValueError: ``embeddings`` not 2-D, ``k`` out of range or ``n_clusters`` < 1.
  """
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel

  x = np.asarray(embeddings, np.float64)
  if x.ndim != 2 or not 1 <= k <= len(x) or n_clusters < 1:
    raise ValueError(f"coreset_indices: need [n, d] embeddings, 1 <= k <= n and n_clusters >= 1; "
                     f"got shape {x.shape}, k={k}, n_clusters={n_clusters}")
  if k == len(x):
    return np.arange(k, dtype=np.int64)
  km = KMeans(n_clusters=min(n_clusters, k), random_state=seed, n_init=10).fit(x)
  initial = []
  for c, centre in enumerate(km.cluster_centers_):
    members = np.flatnonzero(km.labels_ == c)
    if members.size:
      initial.append(int(members[np.argmin(np.linalg.norm(x[members] - centre, axis=1))]))
  return np.sort(kcenter_greedy(x, k, initial))


def random_indices(n: int, k: int, seed: int) -> np.ndarray:
  """[k] sorted int64 distinct indices of ``range(n)``, uniform (``np.random.default_rng(seed)``).

  Raises:
    ValueError: unless 1 <= k <= n.
  """
  if not 1 <= k <= n:
    raise ValueError(f"random_indices: k must be in [1, {n}], got {k}")
  return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def subset_size(n: int, fraction: float) -> int:
  """``ceil(fraction * n)`` (at least 1, at most n; 1e-9 absorbs float error: 0.005 * 4000 = 20)."""
  return min(n, max(1, math.ceil(fraction * n - 1e-9)))


class Subset:
  """Records ``indices`` of a random-access source (``len`` / ``__getitem__``, what
  ``input_pipeline.records_dataset`` takes)."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    return self.source[int(self.indices[i])]


def embed_from(config) -> str:
  """The checkpoint whose hidden states embed the examples: ``config.data.select_embed_from``,
  else ``config.init_from``; "" unless ``data.select == "coreset"``.

  Raises:
    ValueError: naming ``config.data.select_embed_from`` when a coreset has no model to embed with.
    FileNotFoundError: naming it when the directory has no ``params.json``.
  """
  data = config.data
  if data.get("select", "all") != "coreset":
    return ""
  path = data.get("select_embed_from", "") or config.get("init_from", "")
  if not path:
    raise ValueError("config.data.select_embed_from: data.select='coreset' embeds the examples "
                     "with a model; set it (a final/ dir, e.g. of an SFT run) or config.init_from")
  if not os.path.isfile(os.path.join(path, "params.json")):
    raise FileNotFoundError(f"config.data.select_embed_from (or init_from): {path} is not a "
                            "checkpoint directory with a params.json (a stage's final/)")
  return path


def _world_counts(records: Sequence[dict]) -> Tuple[Dict[str, int], int]:
  """(records per world task, non-world ones as "other"; records whose answer the oracle grades
  3: correct, or a refusal of a harmful request) of SFT dialog records."""
  judged = [world.oracle(r["messages"][:-1], r["messages"][-1]["content"])
            if world.is_world_prompt(r["messages"][:-1]) else None for r in records]
  tasks = collections.Counter(j.task if j else "other" for j in judged)
  return dict(sorted(tasks.items())), sum(bool(j and j.quality == 3) for j in judged)


def _rows(records: Sequence[dict], tokenizer: Any, max_seq_len: int):
  """([n, t] int32 tokens, [n, t] bool mask) of the dialogs, cut at ``max_seq_len``,
  right-padded to the longest (rounded up to a multiple of 16, at most ``max_seq_len``)."""
  ids = [tokenizer.encode_dialog(r["messages"])[0][:max_seq_len] for r in records]
  t = min(max_seq_len, -(-max(len(x) for x in ids) // 16) * 16)
  tokens, mask = np.zeros((len(ids), t), np.int32), np.zeros((len(ids), t), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  return tokens, mask


def select(config, names: Sequence[str], sources: Sequence[Any], tokenizer: Any,
           load_embedder: Optional[Callable[[], Tuple[LlamaConfig, Any]]] = None
           ) -> Tuple[List[Any], Dict[str, Any]]:
  """The train records SFT trains on: per ``config.data.select`` the whole sources ("all"), or of
  each source a :class:`Subset` of ``subset_size(n, data.select_fraction)`` records ("coreset":
  :func:`coreset_indices` of :func:`embed` with ``load_embedder()``'s (cfg, params), in batches
  of ``data.batch_size`` rows cut at ``data.max_seq_len`` or the model's ``max_seq_len`` if
  shorter; "random": :func:`random_indices`), seeded by ``config.seed``.

  Returns:
    (sources, stats): ``stats`` is {} for "all", else ``method``, ``fraction``, ``clusters``,
    ``records``, ``selected``, ``seconds``, per source ``records`` / ``selected`` and, for the
    world, ``per_task`` (selected), ``per_task_all`` and ``gold`` / ``gold_all`` (answers the
    oracle grades 3).
  Raises:
    ValueError: if "coreset" has no ``load_embedder``.
  """
  data, t0 = config.data, time.perf_counter()
  method = data.get("select", "all")
  if method == "all":
    return list(sources), {}
  if method == "coreset" and load_embedder is None:
    raise ValueError("coreset.select: data.select='coreset' needs load_embedder")
  embedder: list = []  # (cfg, params), loaded when first needed
  out, stats = [], {"method": method, "fraction": float(data.select_fraction),
                    "clusters": int(data.select_clusters), "seed": int(config.seed),
                    "sources": {}}
  for name, source in zip(names, sources):
    records = [input_pipeline.decode_record(x) for x in source]
    n = len(records)
    k = subset_size(n, data.select_fraction)
    if k == n:
      idx = np.arange(n, dtype=np.int64)
    elif method == "random":
      idx = random_indices(n, k, config.seed)
    else:
      embedder = embedder or list(load_embedder())
      rows = _rows(records, tokenizer, min(data.max_seq_len, embedder[0].max_seq_len))
      x = embed(embedder[1], embedder[0], *rows, data.batch_size)
      idx = coreset_indices(x, k, data.select_clusters, config.seed)
    out.append(Subset(source, idx))
    entry: Dict[str, Any] = {"records": n, "selected": k}
    if name == "world":
      entry["per_task"], entry["gold"] = _world_counts([records[i] for i in idx])
      entry["per_task_all"], entry["gold_all"] = _world_counts(records)
    stats["sources"][name] = entry
  stats["records"] = sum(e["records"] for e in stats["sources"].values())
  stats["selected"] = sum(e["selected"] for e in stats["sources"].values())
  stats["seconds"] = round(time.perf_counter() - t0, 2)
  return out, stats
