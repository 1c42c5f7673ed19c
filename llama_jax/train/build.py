"""Builders shared by the training stages: model config, tokenizer, datasets, mesh and state.

Everything here turns an ``ml_collections`` config (``configs/base.py``) into objects, validating
fields early with ``ValueError`` naming them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import input_pipeline, tfds_builders, world, world_tokenizer
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")
EXEC_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")
SFT_SOURCES = ("world", "hh_rlhf", "self_instruct", "jsonl")
LLAMA2_VOCAB = 32000  # SentencePiece pieces of the Llama 2 tokenizer (paper Sec. 2.2)


def model_config(config, vocab_size: Optional[int] = None) -> LlamaConfig:
  """LlamaConfig from ``config.model`` (preset + overrides), or from ``config.init_from``'s
  ``params.json`` when set (then architecture overrides must agree with it).

  Raises:
    ValueError: naming the field, on an unknown preset or a disagreeing override.
    FileNotFoundError: if ``init_from`` has no ``params.json``.
  """
  m = config.model
  overrides = {k: m[k] for k in ARCH_FIELDS if m.get(k) is not None}
  execution = {k: m[k] for k in EXEC_FIELDS}
  init_from = config.get("init_from", "")
  if init_from:
    if not os.path.isfile(os.path.join(init_from, "params.json")):
      raise FileNotFoundError(f"config.init_from: {init_from} is not a checkpoint directory "
                              "with a params.json (a stage's final/ or convert --to orbax output)")
    base = LlamaConfig.from_params_json(os.path.join(init_from, "params.json"))
    for k, v in overrides.items():
      if getattr(base, k) != v:
        raise ValueError(f"config.model.{k}={v!r} disagrees with {init_from}/params.json "
                         f"({getattr(base, k)!r}); leave it unset when init_from is given")
    return base.replace(**execution)
  if vocab_size is not None and "vocab_size" not in overrides:
    overrides["vocab_size"] = vocab_size
  try:
    return LlamaConfig.preset(m.preset, **overrides, **execution)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e


def planning_vocab_size(config) -> int:
  """Vocab size used for planning: ``config.model.vocab_size``, the world tokenizer's size
  (``tokenizer.path == "world"``), else the Llama 2 tokenizer's 32000 (no file is read)."""
  if config.model.get("vocab_size") is not None:
    return int(config.model.vocab_size)
  if config.tokenizer.path == "world":
    return int(config.tokenizer.world_vocab_size)
  return LLAMA2_VOCAB


def planning_model_config(config) -> LlamaConfig:
  """The model config a dry run plans with: ``config.model`` at :func:`planning_vocab_size`."""
  return model_config(config, vocab_size=planning_vocab_size(config))


def tokenizer(config, workdir: str) -> Tokenizer:
  """The SentencePiece tokenizer of ``config.tokenizer.path``; ``"world"`` trains (or reuses)
  the synthetic world's tokenizer at ``<workdir>/tokenizer.model``."""
  path = config.tokenizer.path
  if path == "world":
    path = os.path.join(workdir, "tokenizer.model")
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      world_tokenizer.train_tokenizer(path, world_config(config),
                                      vocab_size=config.tokenizer.world_vocab_size)
  return Tokenizer(path)


def world_config(config) -> world.WorldConfig:
  """``world.WorldConfig`` from ``config.data.world_*`` (ValueError naming a bad field)."""
  data = config.data
  tasks = tuple(parse_list(data.get("world_careless_tasks", ""), "config.data.world_careless_tasks"))
  try:
    return world.WorldConfig(seed=data.get("world_seed", 0),
                             careless_fraction=data.get("world_careless_fraction", 0.0),
                             careless_tasks=tasks,
                             careless_task_fraction=data.get("world_careless_task_fraction", 0.6),
                             prompt_streams=data.get("prompt_streams", 8),
                             unsafe_fraction=data.get("world_unsafe_fraction", 0.0),
                             safety_preprompt_fraction=data.get(
                                 "world_safety_preprompt_fraction", 0.0),
                             instruction_fraction=data.get("world_instruction_fraction", 0.0),
                             multiturn_fraction=data.get("world_multiturn_fraction", 0.0),
                             max_turns=data.get("world_max_turns", 20))
  except ValueError as e:
    raise ValueError(f"config.data (synthetic world): {e}") from e


def tfds_dir(config, workdir: str) -> str:
  return config.data.tfds_dir or os.path.join(workdir, "tfds")


def _prepared(builder):
  """``builder`` after ``download_and_prepare``, without TFDS's console output (its
  "Downloading and preparing ... downloaded and prepared" lines and shuffling bars are noise for
  local files, printed by every stage); one log line instead."""
  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()
  log.info("TFDS %s ready in %s", builder.name, builder.data_dir)
  return builder


def file_digest(path: str) -> str:
  """8-hex-digit BLAKE2b digest of the bytes of a file, or of a directory's files (names and
  bytes, sorted): the TFDS cache key of a file source."""
  h = hashlib.blake2b(digest_size=4)
  files = ([os.path.join(d, f) for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
           if os.path.isdir(path) else [path])
  for name in files:
    h.update(os.path.relpath(name, path).encode())
    with open(name, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def source_builder(name: str, kind: str, config, workdir: str, *, num_train: int = 0,
                   num_held_out: int = 0, is_safety: bool = False):
  """A prepared TFDS builder of source ``name`` (world | hh_rlhf | self_instruct | jsonl | ...)
  for record ``kind``. Every record is validated before anything is written.

  Raises:
    ValueError: for an unknown source, or (from the readers) a bad record naming file and line.
    FileNotFoundError: if a source file is missing.
  """
  data = config.data
  data_dir = tfds_dir(config, workdir)
  if name == "world":
    wk = "prompt" if kind == "prompt" else kind
    careless = data.get("world_careless_fraction", 0.0)
    suffix = f"_c{round(careless * 1000)}" if careless else ""
    wcfg = world_config(config)
    if wcfg.careless_tasks:
      habits = f"{','.join(wcfg.careless_tasks)}|{wcfg.careless_task_fraction}"
      suffix += "_h" + hashlib.blake2b(habits.encode(), digest_size=4).hexdigest()
    for tag, share in (("u", wcfg.unsafe_fraction), ("p", wcfg.safety_preprompt_fraction),
                       ("i", wcfg.instruction_fraction), ("m", wcfg.multiturn_fraction)):
      suffix += f"_{tag}{round(share * 1000)}" if share else ""
    suffix += f"t{wcfg.max_turns}" if wcfg.multiturn_fraction else ""
    cfg = tfds_builders.WorldBuilderConfig(
        name=f"{wk}_s{data.get('world_seed', 0)}_{num_train}_{num_held_out}{suffix}", kind=wk,
        world=wcfg, num_train=num_train, num_held_out=num_held_out)
    return _prepared(tfds_builders.World(config=cfg, data_dir=data_dir))
  paths = {"hh_rlhf": data.hh_rlhf_path, "self_instruct": data.self_instruct_path,
           "jsonl": data.get("sft_jsonl_path", ""), "jsonl_preferences": data.get("preference_jsonl_path", "")}
  classes = {"hh_rlhf": tfds_builders.HhRlhf, "self_instruct": tfds_builders.SelfInstruct,
             "jsonl": tfds_builders.JsonlSft, "jsonl_preferences": tfds_builders.JsonlPreferences}
  if name not in classes:
    raise ValueError(f"unknown data source {name!r}; choose from {SFT_SOURCES + ('jsonl_preferences',)}")
  path = paths[name]
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"data source {name!r}: file {path!r} not found (set config.data.*_path)")
  digest = file_digest(path)  # the content, not size/mtime: an edited file is never stale
  cfg = tfds_builders.SourceConfig(
      name=f"{kind}_{digest}_{data.split_seed}_{int(data.heldout_fraction * 1000)}",
      source_path=path, kind=kind, held_out_fraction=data.heldout_fraction,
      split_seed=data.split_seed, is_safety=is_safety)
  return _prepared(classes[name](config=cfg, data_dir=data_dir))


def parse_list(text: str, field: str, cast=str) -> list:
  items = [x.strip() for x in str(text).split(",") if x.strip()]
  try:
    return [cast(x) for x in items]
  except ValueError as e:
    raise ValueError(f"{field}: cannot parse {text!r}: {e}") from e


def sft_sources(config, workdir: str) -> list:
  """Prepared builders of ``config.data.sft_sources``."""
  names = parse_list(config.data.sft_sources, "config.data.sft_sources")
  if not names:
    raise ValueError("config.data.sft_sources is empty")
  for name in names:
    if name not in SFT_SOURCES:
      raise ValueError(f"config.data.sft_sources: unknown source {name!r}; choose from {SFT_SOURCES}")
  return [source_builder(n, "sft", config, workdir, num_train=config.data.world_sft_examples,
                         num_held_out=config.data.world_heldout_prompts) for n in names]


def mixed_records(builders: Sequence[Any], weights_text: str, field: str, seed: int,
                  split: str = "train"):
  """Infinite, shuffled, per-process sharded mixture of the builders' ``split`` records."""
  return mixed_sources([b.as_data_source(split=split) for b in builders], weights_text, field,
                       seed)


def mixed_sources(sources: Sequence[Any], weights_text: str, field: str, seed: int):
  """:func:`mixed_records` of random-access sources (``len`` and ``__getitem__``), e.g. builders'
  data sources wrapped to add fields to each record."""
  weights = parse_list(weights_text, field, float) or [float(len(s)) for s in sources]
  if len(weights) != len(sources):
    raise ValueError(f"{field} has {len(weights)} weights for {len(sources)} sources")
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"{field} must be non-negative with a positive sum, got {weights}")
  datasets = [input_pipeline.records_dataset(s, seed=seed + i) for i, s in enumerate(sources)]
  return datasets[0] if len(datasets) == 1 else input_pipeline.mixture(datasets, weights)


def heldout_records(builders: Sequence[Any]) -> list:
  """All held-out records of the builders, in order (same on every process)."""
  return [input_pipeline.decode_record(x) for b in builders
          for x in b.as_data_source(split="held_out")]


def per_process_batch(global_batch: int, field: str = "config.data.batch_size") -> int:
  n = jax.process_count()
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f"{field}={global_batch} must be a positive multiple of the process count {n}")
  return global_batch // n


def mesh_and_rules(config):
  """(Mesh over (data, fsdp, tensor) from ``config.mesh.shape``, logical axis rules)."""
  return sharding.make_mesh(tuple(config.mesh.shape)), sharding.DEFAULT_RULES


def put_batch_fn(mesh, rules):
  """Host batch (this process's rows) -> global device arrays sharded over the batch axes."""
  batch_sh = sharding.batch_sharding(mesh, rules)

  def put(batch):
    arrays = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, (str, bytes))
              and np.asarray(v).dtype.kind in "biuf"}
    return sharding.global_batch_from_process_local(arrays, mesh, batch_sh)
  return put


def enable_compilation_cache(path: str, min_compile_secs: float = 1.0) -> Optional[str]:
  """Turn on JAX's persistent compilation cache in ``path`` (``~`` expanded; "" = leave JAX's
  setting alone). Stages of one pipeline compile the same steps again (three reward-model rounds,
  two PPOs): with the cache the later ones load the executables instead. Returns the directory."""
  if not path:
    return None
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path


def copy_config(config) -> ml_collections.ConfigDict:
  """An unlocked deep copy of a (possibly locked) config."""
  return ml_collections.ConfigDict(config.to_dict())


def split_for(records: list, fraction: float, seed: int):
  """(held-out fraction, split seed) giving both splits at least one record (small pooled sets:
  the fraction is raised to 2 / n and the seed advanced deterministically until both are
  non-empty)."""
  if len(records) < 2:
    raise ValueError(f"fine-tuning set: {len(records)} record(s); need at least 2 "
                     "(raise the number of prompts)")
  fraction = min(0.5, max(fraction, 2.0 / len(records)))
  for j in range(1000):
    parts = tfds_builders.split_records(records, fraction, seed + j)
    if parts["train"] and parts["held_out"]:
      return fraction, seed + j
  raise ValueError("fine-tuning set: cannot split the pooled set (all prompts identical?)")


def finetune_config(config, sft_jsonl: str, tokenizer_path: str,
                    sft_records: Optional[list] = None) -> ml_collections.ConfigDict:
  """The SFT-stage config that fine-tunes ``init_from`` on the dialogs of ``sft_jsonl`` with
  ``config.rejection_sampling``'s fine-tuning fields (``lr``, ``warmup_frac``, ``num_steps``,
  ``num_epochs``): the last step of rejection sampling, RAFT's rounds and context distillation.
  ``sft_records`` (the file's records) sizes the held-out split (:func:`split_for`)."""
  rc = config.rejection_sampling
  sub = copy_config(config)
  if sft_records is not None:
    sub.data.heldout_fraction, sub.data.split_seed = split_for(
        sft_records, config.data.heldout_fraction, config.data.split_seed)
  sub.stage = "sft"
  sub.tokenizer.path = tokenizer_path
  sub.data.sft_sources = "jsonl"
  sub.data.select = "all"  # the pooled picks are the fine-tuning set; no SFT data selection
  sub.data.sft_weights = ""
  sub.data.sft_jsonl_path = sft_jsonl
  sub.optimizer.lr = rc.lr
  sub.optimizer.warmup_steps = 0
  sub.optimizer.warmup_frac = rc.warmup_frac
  sub.train.num_steps = rc.num_steps
  sub.train.num_epochs = rc.num_epochs
  sub.eval.num_samples = 0
  return sub


def check_sampling_inputs(config, stage: str, policy: str, scored: bool = True) -> None:
  """The checks of a stage that samples ``config.init_from`` and (``scored``) scores with
  ``config.rejection_sampling``'s reward (RAFT, context distillation; Ghost Attention samples
  without scoring), before anything is written.

  Args:
    stage: the stage's name, for the message. policy: what ``init_from`` is, e.g. "the policy to
      distil". scored: the stage scores its samples with the reward.
  Raises:
    ValueError: ``init_from`` empty, or ``rejection_sampling.help_rm`` empty with the RM reward.
    FileNotFoundError: ``init_from`` without ``params.json``, or a reward-model directory that
      does not exist.
  """
  rc = config.rejection_sampling
  if not config.get("init_from", ""):
    raise ValueError(f"{stage}: config.init_from ({policy}) is empty")
  if not os.path.isfile(os.path.join(config.init_from, "params.json")):
    raise FileNotFoundError(f"config.init_from: {config.init_from!r} has no params.json (give a "
                            "stage's final/ or a converted checkpoint)")
  if rc.reward != "rm" or not scored:
    return
  if not rc.help_rm:
    raise ValueError("config.rejection_sampling.help_rm is empty: give a reward model "
                     '(<rm>/final), or set rejection_sampling.reward="oracle" on the world')
  for name in ("help_rm", "safety_rm"):
    if rc[name] and not os.path.isdir(rc[name]):
      raise FileNotFoundError(f"config.rejection_sampling.{name}: {rc[name]!r} not found")
