"""The conversion table of ``llama_jax.convert`` and the machinery that applies it.

``RULES`` lists every parameter once: our path, its Meta and Hugging Face keys, its shape in
the checkpoints (torch layout ``[out, in]``) and in our tree, the fairscale model-parallel axis of
Meta's shards, and whether Hugging Face permutes its rows for rotate-half RoPE. Loading and saving
in both formats go through these functions, never through per-parameter code.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig

Params = dict


class Rule(NamedTuple):
  """One parameter of the table. Shapes are space-separated letters (see ``sizes_of``)."""

  path: str  # our path, '/'-separated; 'layers/...' leaves are stacked [L, ...]
  meta: str  # Meta key without '.weight' ('layers.{i}.' prefixed for layer params)
  hf: str  # HF key without '.weight' ('model.layers.{i}.' prefixed for layer params)
  source: str  # shape in both checkpoints (torch layout [out, in])
  ours: str  # our (per-layer) shape; if != source: ours = source.T.reshape(ours)
  split: Optional[int]  # fairscale shard axis in Meta's files; None = replicated
  rope: str = ""  # 'n' or 'k': HF permutes rows (heads of that count) for rotate-half RoPE


RULES = (
    #    our path                  Meta               HF                          source  ours    split rope
    Rule("tok_embeddings",         "tok_embeddings",  "model.embed_tokens",       "v d",  "v d",   1),
    Rule("layers/attention_norm",  "attention_norm",  "input_layernorm",          "d",    "d",     None),
    Rule("layers/attention/wq",    "attention.wq",    "self_attn.q_proj",         "nh d", "d n h", 0, "n"),
    Rule("layers/attention/wk",    "attention.wk",    "self_attn.k_proj",         "kh d", "d k h", 0, "k"),
    Rule("layers/attention/wv",    "attention.wv",    "self_attn.v_proj",         "kh d", "d k h", 0),
    Rule("layers/attention/wo",    "attention.wo",    "self_attn.o_proj",         "d nh", "n h d", 1),
    Rule("layers/ffn_norm",        "ffn_norm",        "post_attention_layernorm", "d",    "d",     None),
    Rule("layers/feed_forward/w1", "feed_forward.w1", "mlp.gate_proj",            "f d",  "d f",   0),
    Rule("layers/feed_forward/w2", "feed_forward.w2", "mlp.down_proj",            "d f",  "f d",   1),
    Rule("layers/feed_forward/w3", "feed_forward.w3", "mlp.up_proj",              "f d",  "d f",   0),
    Rule("norm",                   "norm",            "model.norm",               "d",    "d",     None),
    Rule("output",                 "output",          "lm_head",                  "v d",  "d v",   0),
)  # fmt: skip
BY_PATH = {r.path: r for r in RULES}
_TILE = 128  # tile size of the blocked transpose in write_ours

# Keys present in some checkpoints that carry no parameter (recomputed from rope_theta).
IGNORED = {"meta": re.compile(r"rope\.freqs"), "hf": re.compile(r".*\.rotary_emb\.inv_freq")}


# ---- the machinery (shared by both formats) ------------------------------------------------------
def layered(rule: Rule) -> bool:
  return rule.path.startswith("layers/")


def key_of(rule: Rule, fmt: str, layer: Optional[int]) -> str:
  """Checkpoint key of ``rule`` in format ``fmt`` ('meta' or 'hf') for ``layer`` (None if global)."""
  name = rule.meta if fmt == "meta" else rule.hf
  if layer is not None:
    name = ("layers.{i}." if fmt == "meta" else "model.layers.{i}.").format(i=layer) + name
  return name + ".weight"


def entries(cfg: LlamaConfig) -> list[tuple[Rule, Optional[int]]]:
  """(rule, layer) pairs in checkpoint order: embeddings, layer 0..L-1, final norm, output."""
  first = next(j for j, r in enumerate(RULES) if layered(r))
  last = max(j for j, r in enumerate(RULES) if layered(r))
  out = [(r, None) for r in RULES[:first]]
  for i in range(cfg.n_layers):
    out += [(r, i) for r in RULES[first:last + 1]]
  return out + [(r, None) for r in RULES[last + 1:]]


def expected_keys(cfg: LlamaConfig, fmt: str) -> dict[str, tuple[Rule, Optional[int]]]:
  """Every checkpoint key of ``fmt`` for ``cfg`` -> (rule, layer)."""
  return {key_of(r, fmt, i): (r, i) for r, i in entries(cfg)}


def sizes_of(cfg: LlamaConfig) -> dict[str, int]:
  """Values of the shape letters used in ``RULES``."""
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  return {"v": cfg.vocab_size, "d": cfg.dim, "n": n, "k": k, "h": h, "f": cfg.ffn_hidden_dim,
          "nh": n * h, "kh": k * h}


def shape_of(spec: str, cfg: LlamaConfig) -> tuple[int, ...]:
  sizes = sizes_of(cfg)
  return tuple(sizes[letter] for letter in spec.split())


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Our full shape (``[L, ...]`` for layer params) of every path in ``RULES``."""
  return {r.path: ((cfg.n_layers,) if layered(r) else ()) + shape_of(r.ours, cfg) for r in RULES}


def write_ours(rule: Rule, w: np.ndarray, dest: np.ndarray) -> None:
  """Writes checkpoint tensor ``w`` (Meta, torch layout) into ``dest`` (our per-layer array, C order).

  Matrices are transposed in 128 x 128 tiles: numpy's plain strided copy of ``w.T`` runs 2-5x
  slower on large matrices. Casts to ``dest.dtype``.
  """
  if rule.source == rule.ours:
    dest[...] = w.reshape(dest.shape)
    return
  flat = np.reshape(dest, w.shape[::-1], copy=False)  # a view: raises rather than copy
  rows, cols = w.shape
  for i in range(0, rows, _TILE):
    for j in range(0, cols, _TILE):
      flat[j:j + _TILE, i:i + _TILE] = w[i:i + _TILE, j:j + _TILE].T


def from_ours(rule: Rule, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """Our per-layer array -> checkpoint (Meta, torch layout) tensor."""
  source = shape_of(rule.source, cfg)
  if rule.source != rule.ours:
    return a.reshape(source[::-1]).T
  return a.reshape(source)


def rope_rows(w: np.ndarray, heads: int, to_hf: bool) -> np.ndarray:
  """Permute [heads * h, d] rows between Meta's interleaved and HF's rotate-half RoPE order."""
  rows, d = w.shape
  h = rows // heads
  split = (heads, h // 2, 2, d) if to_hf else (heads, 2, h // 2, d)
  return w.reshape(split).transpose(0, 2, 1, 3).reshape(rows, d)


def np_dtype(dtype: Any) -> np.dtype:
  """numpy dtype (bfloat16 = ``ml_dtypes.bfloat16``); raises ValueError unless a float type."""
  dt = np.dtype(jnp.dtype(dtype))
  if dt.name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
  return dt


def get_leaf(params: Params, path: str) -> Any:
  node = params
  for part in path.split("/"):
    node = node[part]
  return node


def alloc(cfg: LlamaConfig, dtype: np.dtype) -> Params:
  """Uninitialized params (``np.empty``) of ``param_shapes(cfg)``."""
  params: Params = {}
  for path, shape in param_shapes(cfg).items():
    *parents, name = path.split("/")
    node = params
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = np.empty(shape, dtype)
  return params


def check_keys(found: set[str], expected: set[str], fmt: str, origin: str) -> None:
  """Raises ValueError naming ``origin`` if keys are missing or unexpected (``IGNORED`` aside)."""
  unexpected = sorted(k for k in found - expected if not IGNORED[fmt].fullmatch(k))
  missing = sorted(expected - found)
  if missing:
    raise ValueError(f"{origin}: {len(missing)} missing keys for this config, e.g. {missing[:5]}")
  if unexpected:
    raise ValueError(f"{origin}: {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")


def check_shape(key: str, origin: str, expected: tuple, found: tuple) -> None:
  if tuple(expected) != tuple(found):
    raise ValueError(f"{origin}: tensor {key} has shape {tuple(found)}, expected {tuple(expected)} "
                     "for the config")


def check_params(cfg: LlamaConfig, params: Params, origin: str = "params") -> None:
  """Raises ValueError naming the path if ``params`` lacks a leaf, has an extra one, or a shape differs."""
  shapes = param_shapes(cfg)
  found = {"/".join(str(getattr(k, "key", k)) for k in kp): leaf
           for kp, leaf in jax.tree_util.tree_leaves_with_path(params)}
  extra = sorted(set(found) - set(shapes))
  if extra:
    raise ValueError(f"{origin}: unexpected leaves {extra}")
  for path, shape in shapes.items():
    if path not in found:
      raise ValueError(f"{origin}: missing leaf {path}")
    if tuple(np.shape(found[path])) != shape:
      raise ValueError(f"{origin}: {path} has shape {tuple(np.shape(found[path]))}, expected {shape}")


def fill(cfg: LlamaConfig, fmt: str, keys: list[str], read: Callable[[str, tuple], np.ndarray],
         dtype: np.dtype) -> Params:
  """Preallocates our params, then streams ``read(key, source_shape)`` into them in ``keys`` order.

  ``read`` returns one tensor in Meta's layout (torch ``[out, in]``, interleaved RoPE rows); it is
  transposed/reshaped per ``RULES`` and cast to ``dtype`` as it is copied into the stacked array.
  Keys not in the table (ignored keys, already validated by ``check_keys``) are skipped.

  Raises:
    ValueError: naming the key (``fmt`` name) if a tensor holds NaN or Inf values.
  """
  expected = expected_keys(cfg, fmt)
  params = alloc(cfg, dtype)
  for key in keys:
    if key not in expected:
      continue  # ignored key (already validated)
    rule, layer = expected[key]
    dest = get_leaf(params, rule.path)
    w = read(key, shape_of(rule.source, cfg))
    if not np.all(np.isfinite(w)):
      raise ValueError(f"{fmt} checkpoint: tensor {key} holds NaN or Inf values; refusing to "
                       "convert a non-finite model")
    write_ours(rule, w, dest if layer is None else dest[layer])
  return params


def with_dtype(cfg: LlamaConfig, dtype: np.dtype) -> LlamaConfig:
  return cfg.replace(param_dtype=dtype.name)


def require_dir(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  return path


def require_file(path: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  return path


def confined(directory: str, name: str, origin: str) -> str:
  """``directory/name`` for a plain file name from an index (no paths, no '..')."""
  if not name or os.path.basename(name) != name or name in (".", ".."):
    raise ValueError(f"{origin}: file name {name!r} must be a plain name inside {directory}")
  return os.path.join(directory, name)


def empty_dir(path: str | os.PathLike) -> str:
  """Creates ``path`` if absent; raises FileExistsError if it exists and is not an empty directory."""
  path = os.fspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f"output directory {path} exists and is not empty")
  os.makedirs(path, exist_ok=True)
  return path
