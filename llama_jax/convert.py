"""Checkpoint conversion: Meta ``.pth``, Hugging Face safetensors and orbax <-> our params.

Every parameter is described once, in ``RULES`` (a Tunix-style table, in ``_convert_table.py``):
our path, its Meta and Hugging Face keys, its shape in the checkpoints (torch layout ``[out, in]``
for matrices) and in our tree, the fairscale model-parallel axis of Meta's shards, and whether
Hugging Face permutes its rows for rotate-half RoPE. Both formats load and save through that table.

Our params are a nested dict of host ``numpy`` arrays in the layout of ``llama_jax.model``
(matrices ``[in, out]`` with heads split out, layers stacked on axis 0)::

  tok_embeddings [v, d]; layers/attention_norm [L, d]; layers/attention/wq [L, d, n, h];
  wk, wv [L, d, k, h]; wo [L, n, h, d]; layers/ffn_norm [L, d]; layers/feed_forward/w1, w3
  [L, d, f]; w2 [L, f, d]; norm [d]; output [d, v]

dtype: ``dtype=None`` keeps the checkpoint's dtype (that of its token embeddings; every tensor is
cast to it); bfloat16 arrays are ``ml_dtypes.bfloat16``. The returned config's ``param_dtype``
names the dtype of the returned arrays.

Loading is streamed: each tensor is read alone (safetensors ``safe_open``; ``torch.load(...,
mmap=True, weights_only=True)`` for ``.pth``) and written into preallocated stacked arrays, so
the host holds one copy of the model plus a tensor or two (and reclaimable page cache of the
memory-mapped files). ``save_hf`` materializes one output shard at a time.

Facts used (Meta ``llama/model.py`` and fairscale; HF ``convert_llama_weights_to_hf.py``):
ColumnParallelLinear (wq, wk, wv, w1, w3, output) is split on dim 0, RowParallelLinear (wo, w2)
and ParallelEmbedding (tok_embeddings) on dim 1, norms are replicated. HF stores wq/wk rows as
``meta.reshape(heads, h // 2, 2, d).transpose(0, 2, 1, 3).reshape(heads * h, d)``.

CLI::

  python -m llama_jax.convert --from {meta,hf,orbax} --to {orbax,hf} SRC DST [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
from typing import Any, Optional

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from llama_jax import _convert_table as table
from llama_jax.config import LlamaConfig

Params = dict
# The conversion table and helpers, re-exported for callers and tests.
RULES, Rule, key_of, param_shapes, check_params = (
    table.RULES, table.Rule, table.key_of, table.param_shapes, table.check_params)

HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
META_CONFIG = "params.json"
ORBAX_PARAMS = "params"  # orbax StandardCheckpointer directory inside the save_orbax directory
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # as transformers' "5GB"


# ---- Hugging Face safetensors -------------------------------------------------------------------
def _hf_files(path: str) -> tuple[list[str], str]:
  """(safetensors files, the file that lists them) of an HF checkpoint directory."""
  index = os.path.join(path, HF_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dictionary")
    files = [table.confined(path, name, index) for name in dict.fromkeys(weight_map.values())]
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} (named in {index}) not found")
    return files, index
  single = os.path.join(path, HF_SINGLE)
  if not os.path.isfile(single):
    raise FileNotFoundError(f"neither {single} nor {index} found")
  return [single], single


def _safetensors(read, file: str):
  """``read()``, with safetensors' errors (a truncated or corrupt file) as a ValueError naming
  ``file``."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError is not importable alone)
    if isinstance(e, (ValueError, FileNotFoundError)):
      raise
    raise ValueError(f"{file}: not a complete safetensors file ({type(e).__name__}: {e})") from None


def load_hf(path: str | os.PathLike, dtype: Any = None) -> tuple[LlamaConfig, Params]:
  """Loads a Hugging Face ``LlamaForCausalLM`` checkpoint directory into our params.

  Args:
    path: directory with ``config.json`` and ``model.safetensors``, or sharded
      ``model-0000x-of-0000y.safetensors`` files and ``model.safetensors.index.json``.
    dtype: output dtype (float32, bfloat16, float16); None keeps the checkpoint's dtype.
  Returns:
    (config with ``param_dtype`` = the arrays' dtype, params of host numpy arrays; see module doc).
  Raises:
    FileNotFoundError: naming the directory, ``config.json`` or a safetensors file that is absent.
    ValueError: naming key and file if a tensor's shape does not fit ``config.json``, or if keys are
      missing or unexpected; naming the field if the config is not a plain Llama 2; naming the
      file if it is a truncated or corrupt safetensors file.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  path = table.require_dir(path)
  cfg = LlamaConfig.from_hf_config(table.require_file(os.path.join(path, HF_CONFIG)))
  files, origin = _hf_files(path)
  expected = table.expected_keys(cfg, "hf")
  handles = {}
  try:
    key_file = {}
    for file in files:
      handles[file] = _safetensors(lambda: safe_open(file, framework="np"), file)
      for key in handles[file].keys():
        key_file[key] = file
    table.check_keys(set(key_file), set(expected), "hf", origin)
    if dtype is None:
      emb = table.key_of(table.BY_PATH["tok_embeddings"], "hf", None)
      stored = handles[key_file[emb]].get_slice(emb).get_dtype()
      dtype = _SAFETENSORS_DTYPES.get(stored)
      if dtype is None:
        raise ValueError(f"{key_file[emb]}: {emb} has dtype {stored}; pass dtype= to convert it")
    dtype = table.np_dtype(dtype)

    def read(key: str, shape: tuple) -> np.ndarray:
      f = handles[key_file[key]]
      table.check_shape(key, key_file[key], shape, f.get_slice(key).get_shape())
      w = _safetensors(lambda: f.get_tensor(key), key_file[key])
      rule = expected[key][0]
      if rule.rope:
        w = table.rope_rows(w, table.sizes_of(cfg)[rule.rope], to_hf=False)
      return w

    params = table.fill(cfg, "hf", list(key_file), read, dtype)
  finally:
    handles.clear()
  return table.with_dtype(cfg, dtype), params


def save_hf(out_dir: str | os.PathLike, cfg: LlamaConfig, params: Params, dtype: Any = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes ``config.json`` and safetensors that ``LlamaForCausalLM.from_pretrained`` loads.

  One ``model.safetensors`` if everything fits in ``max_shard_bytes``, else
  ``model-0000x-of-0000y.safetensors`` plus ``model.safetensors.index.json``. Only one shard's
  tensors are materialized at a time.

  Args:
    out_dir: output directory; created if absent, must be empty if present.
    cfg: the model config.
    params: our params (see module docstring).
    dtype: output dtype (float32, bfloat16, float16); None keeps the params' dtype.
    max_shard_bytes: largest shard size in bytes (a single larger tensor gets its own shard).
  Returns:
    The safetensors file paths written.
  Raises:
    ValueError: if params do not match ``cfg`` (naming the path) or max_shard_bytes <= 0.
    FileExistsError: if ``out_dir`` is not empty.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  table.check_params(cfg, params)
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  out_dir = table.empty_dir(out_dir)
  out_dtype = table.np_dtype(dtype if dtype is not None else params["tok_embeddings"].dtype)
  shards: list[list[tuple[table.Rule, Optional[int]]]] = [[]]
  size = 0
  for rule, layer in table.entries(cfg):  # plan shards from shapes alone
    nbytes = int(np.prod(table.shape_of(rule.source, cfg))) * out_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((rule, layer))
    size += nbytes
  names = ([HF_SINGLE] if len(shards) == 1 else
           [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
  weight_map, total, written = {}, 0, []
  for name, shard in zip(names, shards):
    tensors = {}
    for rule, layer in shard:
      a = table.get_leaf(params, rule.path)
      w = table.from_ours(rule, np.asarray(a if layer is None else a[layer]), cfg)
      if rule.rope:
        w = table.rope_rows(w, table.sizes_of(cfg)[rule.rope], to_hf=True)
      key = table.key_of(rule, "hf", layer)
      tensors[key] = np.ascontiguousarray(w, dtype=out_dtype)
      weight_map[key] = name
      total += tensors[key].nbytes
    file = os.path.join(out_dir, name)
    save_file(tensors, file, metadata={"format": "pt"})
    written.append(file)
    del tensors
  if len(shards) > 1:
    with open(os.path.join(out_dir, HF_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf_config = cfg.to_hf_config()
  hf_config["torch_dtype"] = out_dtype.name
  with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
    json.dump(hf_config, f, indent=2)
  return written


# ---- Meta consolidated.NN.pth -------------------------------------------------------------------
def _meta_shard_files(path: str) -> list[str]:
  found = {}
  for file in glob.glob(os.path.join(glob.escape(path), "consolidated.*.pth")):
    m = re.fullmatch(r"consolidated\.(\d+)\.pth", os.path.basename(file))
    if m:
      found[int(m.group(1))] = file
  if not found:
    raise FileNotFoundError(f"no {os.path.join(path, 'consolidated.00.pth')} (Meta shards) found")
  for j in range(max(found) + 1):
    if j not in found:
      raise FileNotFoundError(f"{os.path.join(path, f'consolidated.{j:02d}.pth')} not found "
                              f"(shards up to consolidated.{max(found):02d}.pth exist)")
  return [found[j] for j in range(len(found))]


def _torch_to_numpy(t) -> np.ndarray:
  """Zero-copy numpy view of a CPU tensor; bfloat16 through ``ml_dtypes``."""
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def load_meta(path: str | os.PathLike, dtype: Any = None) -> tuple[LlamaConfig, Params]:
  """Loads Meta's ``params.json`` + ``consolidated.NN.pth`` (all model-parallel shards merged).

  Shards are memory-mapped (``torch.load(..., map_location="cpu", weights_only=True,
  mmap=True)``); each tensor's pieces are concatenated along its fairscale axis (see ``RULES``).
  A ``vocab_size`` of -1 (or absent) in ``params.json`` is read from ``tok_embeddings``.

  Args:
    path: directory with ``params.json`` and ``consolidated.00.pth`` ... ``consolidated.NN.pth``.
    dtype: output dtype (float32, bfloat16, float16); None keeps the checkpoint's dtype.
  Returns:
    (config with ``param_dtype`` = the arrays' dtype, params of host numpy arrays).
  Raises:
    FileNotFoundError: naming the directory, ``params.json`` or a shard that is absent (including
      one implied by the shard sizes in ``consolidated.00.pth``).
    ValueError: naming key and file if a tensor's shape does not fit ``params.json``, or if keys
      are missing or unexpected.
  """
  import torch  # pylint: disable=g-import-not-at-top

  path = table.require_dir(path)
  config_file = table.require_file(os.path.join(path, META_CONFIG))
  with open(config_file) as f:
    params_json = json.load(f)
  files = _meta_shard_files(path)
  shards = [torch.load(file, map_location="cpu", weights_only=True, mmap=True) for file in files]
  emb_key = table.key_of(table.BY_PATH["tok_embeddings"], "meta", None)
  if emb_key not in shards[0]:
    raise ValueError(f"{files[0]}: missing key {emb_key}")
  emb = shards[0][emb_key]
  if params_json.get("vocab_size", -1) == -1:
    params_json["vocab_size"] = int(emb.shape[0])
  try:
    cfg = LlamaConfig.from_params_json(params_json)
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from e
  # Norms are replicated: they confirm dim before ParallelEmbedding's split of dim (axis 1) tells
  # how many shards there must be.
  norm_key = table.key_of(table.BY_PATH["norm"], "meta", None)
  if norm_key in shards[0]:
    table.check_shape(norm_key, files[0], (cfg.dim,), tuple(shards[0][norm_key].shape))
  if emb.ndim != 2 or emb.shape[1] == 0 or cfg.dim % emb.shape[1]:
    table.check_shape(emb_key, files[0], (cfg.vocab_size, cfg.dim // len(files)), tuple(emb.shape))
  n_implied = cfg.dim // emb.shape[1]
  if n_implied > len(files):
    missing = os.path.join(path, f"consolidated.{len(files):02d}.pth")
    raise FileNotFoundError(f"{missing} not found: {emb_key} in {files[0]} has {emb.shape[1]} of "
                            f"dim {cfg.dim} columns, implying {n_implied} shards")
  expected = table.expected_keys(cfg, "meta")
  for file, shard in zip(files, shards):
    table.check_keys(set(shard), set(expected), "meta", file)
  if dtype is None:
    dtype = _torch_to_numpy(emb[:1, :1]).dtype
  dtype = table.np_dtype(dtype)

  def read(key: str, shape: tuple) -> np.ndarray:
    axis = expected[key][0].split
    piece_shape = list(shape)
    if axis is not None:
      if shape[axis] % len(files):
        raise ValueError(f"{files[0]}: {key} axis {axis} of size {shape[axis]} cannot be split "
                         f"into {len(files)} model-parallel shards")
      piece_shape[axis] = shape[axis] // len(files)
    pieces = []
    for file, shard in zip(files if axis is not None else files[:1], shards):
      table.check_shape(key, file, tuple(piece_shape), tuple(shard[key].shape))
      pieces.append(_torch_to_numpy(shard[key]))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)

  params = table.fill(cfg, "meta", list(shards[0].keys()), read, dtype)
  return table.with_dtype(cfg, dtype), params


# ---- orbax ---------------------------------------------------------------------------------------
def save_orbax(path: str | os.PathLike, cfg: LlamaConfig, params: Params) -> str:
  """Saves params with ``orbax.checkpoint.StandardCheckpointer`` plus Meta's ``params.json``.

  Layout: ``path/params.json`` and ``path/params/`` (a StandardCheckpointHandler checkpoint of the
  params pytree: the format of one item of an ``ocp.CheckpointManager`` step saved with
  ``ocp.args.StandardSave``). Restore it straight into sharded device arrays with
  ``ocp.StandardCheckpointer().restore(path / "params", abstract_params)`` where the leaves of
  ``abstract_params`` are ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.

  Returns:
    The orbax directory ``path/params``.
  Raises:
    ValueError: if params do not match ``cfg`` (naming the path).
    FileExistsError: if ``path`` exists and is not empty.
  """
  table.check_params(cfg, params)
  path = os.path.abspath(table.empty_dir(path))
  with open(os.path.join(path, META_CONFIG), "w") as f:
    json.dump(cfg.to_params_json(), f, indent=2)
  target = os.path.join(path, ORBAX_PARAMS)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
    ckptr.wait_until_finished()
  return target


CHECKSUMS = "checksums.json"


def _digests(path: str) -> dict:
  """``{relative file path: BLAKE2b-128 hex}`` of every file below ``path`` but the checksums."""
  out = {}
  for d, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(d, name)
      rel = os.path.relpath(full, path)
      if rel in (CHECKSUMS, CHECKSUMS + ".tmp"):
        continue
      h = hashlib.blake2b(digest_size=16)
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def write_checksums(path: str | os.PathLike) -> str:
  """``path/checksums.json``: a digest of every file of a finished directory (e.g. a stage's
  ``final/``), which :func:`verify_checksums` (and every loader here) checks. Returns its path."""
  out = os.path.join(os.fspath(path), CHECKSUMS)
  digests = _digests(os.fspath(path))
  with open(out + ".tmp", "w") as f:  # renamed when complete: a kill never leaves half a list
    json.dump(digests, f, indent=1, sort_keys=True)
  os.replace(out + ".tmp", out)
  return out


def verify_checksums(path: str | os.PathLike) -> None:
  """Checks ``path`` against its ``checksums.json`` (no-op without one).

  Raises:
    ValueError: naming the first file that is missing, added or changed (e.g. a flipped bit).
  """
  path = os.fspath(path)
  listed = os.path.join(path, CHECKSUMS)
  if not os.path.isfile(listed):
    return
  with open(listed) as f:
    want = json.load(f)
  got = _digests(path)
  for rel in sorted(set(want) | set(got)):
    if want.get(rel) != got.get(rel):
      what = ("missing" if rel not in got else "not listed" if rel not in want
              else "changed since it was written")
      raise ValueError(f"{os.path.join(path, rel)}: {what} ({CHECKSUMS} of {path} disagrees); "
                       "the checkpoint is damaged, refusing to load it")


def load_orbax(path: str | os.PathLike, dtype: Any = None) -> tuple[LlamaConfig, Params]:
  """Loads a ``save_orbax`` directory: (config from ``params.json``, params as host numpy).

  Args:
    path: directory holding ``params.json`` and the orbax checkpoint ``params/``.
    dtype: output dtype; None keeps the saved dtype.
  Raises:
    FileNotFoundError: naming the directory, ``params.json`` or ``params/`` that is absent.
    ValueError: if the saved tree does not match ``params.json`` (naming the leaf), or a file
      disagrees with ``checksums.json`` (:func:`verify_checksums`).
  """
  path = os.path.abspath(table.require_dir(path))
  verify_checksums(path)
  cfg = LlamaConfig.from_params_json(table.require_file(os.path.join(path, META_CONFIG)))
  target = os.path.join(path, ORBAX_PARAMS)
  if not os.path.isdir(target):
    raise FileNotFoundError(f"orbax checkpoint directory {target} not found")
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(target).item_metadata.tree
    table.check_params(cfg, saved, origin=target)
    out_dtype = table.np_dtype(dtype if dtype is not None else saved["tok_embeddings"].dtype)
    # ShapeDtypeStructs without sharding restore as host numpy arrays, cast to out_dtype.
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), out_dtype), saved)
    params = ckptr.restore(target, abstract)
  return table.with_dtype(cfg, out_dtype), jax.tree.map(np.asarray, params)


# ---- command line --------------------------------------------------------------------------------
_LOADERS = {"meta": load_meta, "hf": load_hf, "orbax": load_orbax}


def main(argv: Optional[list[str]] = None) -> None:
  """``python -m llama_jax.convert --from {meta,hf,orbax} --to {orbax,hf} SRC DST``."""
  parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--from", dest="src_format", choices=sorted(_LOADERS), required=True)
  parser.add_argument("--to", dest="dst_format", choices=("orbax", "hf"), required=True)
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="output dtype (default: the source checkpoint's dtype)")
  parser.add_argument("--max_shard_bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                      help="largest safetensors shard for --to hf")
  parser.add_argument("src", help="source checkpoint directory")
  parser.add_argument("dst", help="output directory (must not exist or be empty)")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")  # conversion is host-side: never grab accelerators
  cfg, params = _LOADERS[args.src_format](args.src, dtype=args.dtype)
  if args.dst_format == "hf":
    save_hf(args.dst, cfg, params, max_shard_bytes=args.max_shard_bytes)
  else:
    save_orbax(args.dst, cfg, params)
  print(f"converted {args.src_format} {args.src} -> {args.dst_format} {args.dst} "
        f"({cfg.num_params():,} params, {cfg.param_dtype})")


if __name__ == "__main__":
  main()
