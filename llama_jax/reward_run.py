"""The reward-model stage end to end: preference mixture -> sharded state -> loop -> eval -> export.

Llama 2 paper, Sec. 3.2.2. ``python train.py --config=configs/reward_tiny.py:helpfulness
--config.init_from=<sft workdir>/final`` (stage ``reward``). The model is initialized from an SFT
(chat) checkpoint: its ``output`` head is dropped and a scalar head added
(``reward.init_reward_params``); ``<workdir>/final/`` holds the reward model
(``reward.save_reward_model``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from typing import Any

import jax
import numpy as np

from llama_jax import build, optim, reward, sharding, stage_lib
from llama_jax.checkpoint import Checkpointer
from llama_jax.data import pipeline, sources
from llama_jax.metrics import MetricWriter
from llama_jax.trainer import run_loop

log = logging.getLogger(__name__)

PREFERENCE_SOURCES = ("world_helpfulness", "world_safety", "hh_rlhf", "jsonl_preferences")
_PATH_FIELDS = {"hh_rlhf": "hh_rlhf_path", "jsonl_preferences": "preference_jsonl_path"}


def preference_builders(config, workdir: str) -> list:
  """Prepared builders of ``config.reward.sources`` (records validated, file and line named).

  Raises:
    ValueError: for an empty list or an unknown source; FileNotFoundError for a missing file.
  """
  names = build.parse_list(config.reward.sources, "config.reward.sources")
  if not names:
    raise ValueError("config.reward.sources is empty")
  out = []
  for name in names:
    if name not in PREFERENCE_SOURCES:
      raise ValueError(f"config.reward.sources: unknown source {name!r}; choose from "
                       f"{PREFERENCE_SOURCES}")
    if name.startswith("world_"):
      out.append(build.source_builder("world", name[len("world_"):], config, workdir,
                                      num_train=config.reward.world_train_pairs,
                                      num_held_out=config.reward.world_heldout_pairs))
    else:
      out.append(build.source_builder(name, "preference", config, workdir, is_safety=True))
  return out


def _strings(obj: Any) -> str:
  if isinstance(obj, dict):
    return "\x00".join(_strings(v) for v in obj.values())
  if isinstance(obj, list):
    return "\x00".join(_strings(v) for v in obj)
  return obj if isinstance(obj, str) else ""


def _line_of(path: str, record: dict) -> str:
  """``"<file>, line <n>"`` of the source line holding ``record``: the line that validates to it
  (preference JSONL), else the first line containing its prompt turns and both responses (HH)."""
  def holds(obj, where):
    try:
      return sources.validate_preference(obj, where) == record
    except ValueError:
      text = _strings(obj)
      return all(m["content"] in text for m in record["prompt"]) and all(
          record[k] in text for k in ("chosen", "rejected"))
  try:
    with sources._open_text(path) as f:  # pylint: disable=protected-access
      for n, line in enumerate(f, start=1):
        obj = json.loads(line) if line.strip() else None
        if isinstance(obj, dict) and holds(obj, f"{path}, line {n}"):
          return f"{path}, line {n}"
  except (OSError, ValueError):
    pass
  return f"{path} (record not located)"


def check_lengths(config, names, builders, tokenizer) -> dict:
  """Per-source ``preference_stats`` of both splits. With ``config.reward.overlong == "error"``
  an overlong pair (prompt + response + EOS > ``config.reward.max_seq_len`` tokens) raises.

  Raises:
    ValueError: naming the file and line (file sources) or the world record, the token count
      and the limit, for the first overlong pair; for an unknown ``overlong``; or naming the
      source, when no train pair of a source fits (with ``overlong="drop"``).
  """
  rc, max_len = config.reward, config.reward.max_seq_len
  if rc.overlong not in ("error", "drop"):
    raise ValueError(f"config.reward.overlong must be 'error' or 'drop', got {rc.overlong!r}")
  stats = {}
  for name, b in zip(names, builders):
    for split in ("train", "held_out"):
      records = [pipeline.decode_record(x) for x in b.as_data_source(split=split)]
      s = pipeline.preference_stats(records, tokenizer, max_len)
      stats[f"{name}/{split}"] = s
      if split == "train" and s["kept"] == 0:  # the batch iterator would wait forever
        raise ValueError(f"reward source {name!r} (train split): none of its {s['records']} "
                         f"preference pairs fits config.reward.max_seq_len={max_len} "
                         f"({s['dropped_overlong']} too long); raise it or drop the source")
      if s["dropped_overlong"] and rc.overlong == "error":
        i, r = next((i, r) for i, r in enumerate(records)
                    if pipeline.preference_example(r, tokenizer, max_len) is None)
        n = max(len(tokenizer.encode_dialog(r["prompt"] + [{"role": "assistant", "content": x}])[0])
                for x in (r["chosen"], r["rejected"]))
        path = config.data.get(_PATH_FIELDS.get(name, ""), "")
        where = _line_of(path, r) if path else f"source {name!r}, {split} record {i + 1}"
        raise ValueError(f"{where}: preference pair has {n} tokens (prompt + response + EOS), more "
                         f"than config.reward.max_seq_len={max_len}; raise it, or set "
                         "config.reward.overlong='drop' to skip such pairs")
  return stats


def total_steps(config, primary_pairs: int) -> int:
  """``train.num_steps``, or one epoch over the first (primary) source: ``ceil(num_epochs *
  primary_pairs / (share_of_primary * reward.batch_size))`` (the paper's "all helpfulness data plus
  an equal amount of ..."; ``share`` from ``reward.weights``, or 1 for a single source)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  if config.train.num_epochs <= 0:
    raise ValueError("config.train: set num_steps > 0 or num_epochs > 0")
  weights = build.parse_list(config.reward.weights, "config.reward.weights", float)
  share = weights[0] / sum(weights) if weights else 1.0
  return max(1, math.ceil(config.train.num_epochs * primary_pairs / (share * config.reward.batch_size)))


class HeldOut:
  """Held-out ranking loss and accuracy (overall and per rating bucket / safety label) per source;
  for safety-labelled pairs also the safety auxiliary loss (per labelled pair) and the precision /
  recall of flagging unsafe responses at Rs = sigmoid(r) < 0.5 (Llama 2 Table 29)."""

  def __init__(self, config, cfg, tokenizer, names, builders, put_batch):
    self.names, self.put_batch, self.tok = names, put_batch, tokenizer
    self.batch_size = build.per_process_batch(config.reward.batch_size, "config.reward.batch_size")
    self.max_len, self.limit = config.reward.max_seq_len, config.reward.eval_pairs
    self.sources = [b.as_data_source(split="held_out") for b in builders]
    self.eval_step = jax.jit(functools.partial(reward.eval_step, cfg=cfg, margin=config.reward.margin))

  def _batches(self, source):
    n = len(source) if not self.limit else min(self.limit, len(source))
    records = pipeline.records_dataset([source[i] for i in range(n)], shuffle=False, num_epochs=1)
    ds = pipeline.preference_batches(records, self.tok, batch_size=self.batch_size,
                                     max_seq_len=self.max_len, drop_remainder=False)
    for batch in ds:
      have = len(batch["rating"])
      # Pad the last batch with empty pairs (no real token: excluded from every sum).
      yield {k: np.concatenate([v, np.full((self.batch_size - have,) + v.shape[1:],
                                           -1 if k in ("rating", "safety_label") else 0, v.dtype)])
             for k, v in batch.items()}

  def __call__(self, state, step: int) -> dict:
    del step
    out = {}
    for name, source in zip(self.names, self.sources):
      sums = None
      for batch in self._batches(source):
        got = jax.device_get(self.eval_step(state.params, self.put_batch(batch)))
        sums = got if sums is None else jax.tree.map(np.add, sums, got)
      if sums is None or sums["pairs"] == 0:
        continue
      out[f"{name}/accuracy"] = float(sums["correct"] / sums["pairs"])
      out[f"{name}/loss"] = float(sums["loss_sum"] / sums["pairs"])
      out[f"{name}/pairs"] = float(sums["pairs"])
      for i, rating in enumerate(sources.RATINGS):
        if sums["pairs_by_rating"][i]:
          out[f"{name}/accuracy_{rating}"] = float(sums["correct_by_rating"][i]
                                                   / sums["pairs_by_rating"][i])
      for i, label in enumerate(sources.SAFETY_LABELS):
        if sums["pairs_by_label"][i]:
          out[f"{name}/accuracy_{label}"] = float(sums["correct_by_label"][i]
                                                  / sums["pairs_by_label"][i])
      labelled = float(sums["unsafe"] + sums["safe"]) / 2
      if labelled:
        out[f"{name}/safety_aux_loss"] = float(sums["safety_aux_sum"]) / labelled
        flagged = float(sums["unsafe_flagged"] + sums["safe_flagged"])
        if sums["unsafe"]:
          out[f"{name}/unsafe_recall_at_0.5"] = float(sums["unsafe_flagged"] / sums["unsafe"])
        if flagged:
          out[f"{name}/unsafe_precision_at_0.5"] = float(sums["unsafe_flagged"]) / flagged
    return out


def init_params_fn(config, cfg, setup: stage_lib.StateSetup):
  """Reward params: from an SFT ``final/`` (drop ``output``, add a head) or a reward model."""
  init_from = config.get("init_from", "")
  if init_from and reward.is_reward_model(init_from):
    return lambda: stage_lib.restore_params(init_from, setup.abstract_params)
  shardings = jax.tree.map(lambda s: s.sharding, setup.abstract_params)
  make = jax.jit(reward.init_reward_params, out_shardings=shardings)
  key = jax.random.key(config.seed)
  if init_from:
    llama = sharding.abstract_params(cfg, setup.mesh, setup.rules)
    return lambda: make(stage_lib.restore_params(init_from, llama), key)
  log.warning("reward: config.init_from is empty; the trunk is randomly initialized")
  return lambda: make(sharding.init_params_sharded(cfg, key, setup.mesh, setup.rules), key)


def run(config, workdir: str) -> dict:
  """Train a reward model per ``config`` in ``workdir`` (resuming if it has a checkpoint).

  Returns:
    dict with ``steps``, ``total_steps``, ``finished``, the last train metrics and, when
    finished, ``final_dir`` and held-out ``eval`` metrics. ``train.stop_after_steps`` > 0 stops
    after that many steps in this call (checkpointed; the next call resumes).
  Raises:
    ValueError / FileNotFoundError: on bad config fields (e.g. a negative
      ``config.reward.safety_aux_weight``) or data (a malformed or overlong
      preference record names its file and line), before step 0 and, when the workdir is new,
      before anything is left in it.
  """
  rc = config.reward
  with stage_lib.clean_on_failure(workdir):
    reward.margin_values(np.zeros(1, np.int32), rc.margin)  # validates the table name
    if not rc.safety_aux_weight >= 0:  # also rejects NaN
      raise ValueError(f"config.reward.safety_aux_weight must be >= 0, got {rc.safety_aux_weight}")
    names = build.parse_list(rc.sources, "config.reward.sources")
    builders = preference_builders(config, workdir)
    tokenizer = build.tokenizer(config, workdir)
    cfg = build.model_config(config, tokenizer.vocab_size)
    tokenizer.check_vocab(cfg)
    if rc.max_seq_len > cfg.max_seq_len:
      raise ValueError(f"config.reward.max_seq_len={rc.max_seq_len} exceeds the model's "
                       f"max_seq_len={cfg.max_seq_len}")
    local_batch = build.per_process_batch(rc.batch_size, "config.reward.batch_size")
    if local_batch % config.train.grad_accum_steps:
      raise ValueError(f"config.reward.batch_size per process ({local_batch}) is not divisible by "
                       f"config.train.grad_accum_steps ({config.train.grad_accum_steps})")
    stats = check_lengths(config, names, builders, tokenizer)
    steps = total_steps(config, stats[f"{names[0]}/train"]["kept"])
    optimizer = optim.make_optimizer(config.optimizer, steps)
    mesh, rules = build.mesh_and_rules(config)
    setup = stage_lib.StateSetup(cfg, mesh, rules, optimizer, config.seed,
                                 abstract_params=reward.abstract_reward_params(cfg, mesh, rules))
    put_batch = build.put_batch_fn(mesh, rules)
    records = build.mixed_records(builders, rc.weights, "config.reward.weights", config.seed)
    batches = iter(pipeline.preference_batches(records, tokenizer, batch_size=local_batch,
                                               max_seq_len=rc.max_seq_len))
    held_out = HeldOut(config, cfg, tokenizer, names, builders, put_batch)
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  build.write_json(os.path.join(workdir, "data_stats.json"), stats)
  log.info("reward (%s): %d steps, data %s", rc.model, steps, stats)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every,
                              config.train.keep_checkpoints, config.train.async_checkpoint)
  state = setup.start(checkpointer, batches, init_params_fn(config, cfg, setup))
  step_fn = setup.jit_step(functools.partial(
      reward.train_step, cfg=cfg, optimizer=optimizer, margin=rc.margin,
      accum_steps=config.train.grad_accum_steps, safety_aux_weight=float(rc.safety_aux_weight)))
  writer = MetricWriter(os.path.join(workdir, "logs"))
  result = run_loop(state, step_fn, batches, total_steps=steps, checkpointer=checkpointer,
                    writer=writer, log_every=config.train.log_every,
                    eval_every=config.train.eval_every, eval_fn=held_out, put_batch=put_batch,
                    desc=f"reward/{rc.model}", stop_after_steps=config.train.stop_after_steps)
  checkpointer.close()
  finished = result.last_step >= steps
  out: dict[str, Any] = {"steps": result.last_step, "total_steps": steps,
                         "train": result.last_metrics, "stopped": result.stopped_by_signal,
                         "finished": finished}
  if finished:
    final = os.path.join(workdir, stage_lib.FINAL)
    if jax.process_index() == 0 and os.path.exists(final):
      shutil.rmtree(final)
    reward.save_reward_model(final, cfg, result.state.params)
    out["final_dir"] = final
    out["eval"] = result.last_eval
    build.write_json(os.path.join(workdir, "result.json"), out)
  writer.close()
  return out
