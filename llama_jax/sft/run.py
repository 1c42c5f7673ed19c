"""The SFT stage on the stage skeleton: data -> sharded state -> loop -> held-out eval -> export.

Llama 2 paper, Sec. 3.1. ``python train.py --config=configs/tiny.py --config.stage=sft``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sampling, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import coreset, input_pipeline, world
from llama_jax.sft import step as sft
from llama_jax.train import build, optim
from llama_jax.train import stage as stage_lib
from llama_jax.train.checkpoint import restore_params
from llama_jax.train.state import StateSetup, init_params_fn

log = logging.getLogger(__name__)


def total_steps(config, epoch_tokens: int) -> int:
  """``train.num_steps``, or ``ceil(num_epochs * tokens / (batch_size * max_seq_len))``."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  if config.train.num_epochs <= 0:
    raise ValueError("config.train: set num_steps > 0 or num_epochs > 0")
  per_step = config.data.batch_size * config.data.max_seq_len
  return max(1, math.ceil(config.train.num_epochs * epoch_tokens / per_step))


def check_kept(stats: dict, where: str, max_seq_len: int) -> None:
  """ValueError if no record of ``stats`` (``input_pipeline.sft_stats``) survives the filters: the
  batch iterator would wait forever on a stream that yields nothing."""
  if stats["kept"] == 0:
    raise ValueError(
        f"{where}: none of its {stats['records']} SFT records can be trained on "
        f"({stats['dropped_overlong']} dropped as longer than config.data.max_seq_len="
        f"{max_seq_len}, {stats['dropped_no_target']} without an answer token in their first "
        f"{max_seq_len} tokens, e.g. a longer prompt); raise config.data.max_seq_len, shorten "
        "the records or drop the source")


def train_stats(config, builders, tokenizer, sources=None) -> dict:
  """``input_pipeline.sft_stats`` of the train split summed over the sources (``sources``: the
  train records of each builder, e.g. ``coreset.select``'s subsets; default its whole split).

  Raises:
    ValueError: naming the source, if one has no usable record (``check_kept``).
  """
  names = build.parse_list(config.data.sft_sources, "config.data.sft_sources")
  if sources is None:
    sources = [b.as_data_source(split="train") for b in builders]
  total: dict = {}
  for name, source in zip(names, sources):
    records = [input_pipeline.decode_record(x) for x in source]
    s = input_pipeline.sft_stats(records, tokenizer, config.data.max_seq_len)
    check_kept(s, f"config.data.sft_sources {name!r} (train split)", config.data.max_seq_len)
    total = {k: total.get(k, 0) + v for k, v in s.items()}
  return total


def _pad_rows(batch: dict, rows: int) -> dict:
  """Pad a short final batch with empty rows (segment 0, no loss) up to ``rows``."""
  have = len(batch["inputs"])
  if have == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - have,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


class HeldOut:
  """Held-out loss/perplexity and sampled completions (written to ``<workdir>/samples``)."""

  def __init__(self, config, cfg, tokenizer, builders, put_batch, workdir):
    self.config, self.cfg, self.tok, self.workdir = config, cfg, tokenizer, workdir
    self.put_batch = put_batch
    self.batch_size = build.per_process_batch(config.data.batch_size)
    self.records = build.heldout_records(builders)
    stats = input_pipeline.sft_stats(self.records, tokenizer, config.data.max_seq_len)
    check_kept(stats, "the held-out split of config.data.sft_sources", config.data.max_seq_len)
    per_batch = config.data.batch_size * config.data.max_seq_len
    self.num_batches = config.eval.num_batches or max(1, math.ceil(stats["tokens"] / per_batch))
    self.sources = [b.as_data_source(split="held_out") for b in builders]
    self.eval_step = jax.jit(functools.partial(sft.eval_step, cfg=cfg))

  def batches(self):
    records = [input_pipeline.records_dataset(s, shuffle=False) for s in self.sources]
    mixed = records[0] if len(records) == 1 else input_pipeline.mixture(records, [len(s) for s in self.sources])
    it = iter(input_pipeline.sft_batches(mixed, self.tok, batch_size=self.batch_size,
                                   max_seq_len=self.config.data.max_seq_len))
    for _ in range(self.num_batches):
      yield _pad_rows(next(it), self.batch_size)

  def loss(self, params) -> dict:
    total, count = 0.0, 0.0
    for batch in self.batches():
      out = jax.device_get(self.eval_step(params, self.put_batch(batch)))
      total += float(out["loss_sum"])
      count += float(out["tokens"])
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": count}

  def samples(self, params, step: int, n: Optional[int] = None) -> list:
    n = self.config.eval.num_samples if n is None else n
    dialogs = [r["messages"] for r in self.records[:n]]
    if not dialogs:
      return []
    prompts = [self.tok.encode_dialog(d[:-1])[0].tolist() for d in dialogs]
    out = sampling.generate(params, self.cfg, prompts, jax.random.key(step),
                            max_new_tokens=self.config.eval.max_new_tokens,
                            temperature=self.config.eval.temperature, eos_id=self.tok.eos_id,
                            pad_id=self.tok.pad_id, pad_to_multiple=16)
    rows = []
    for i, d in enumerate(dialogs):
      text = self.tok.decode(np.asarray(out.tokens[i, :int(out.lengths[i])]).tolist())
      row = {"step": step, "prompt": d[:-1], "completion": text.strip(), "reference": d[-1]["content"]}
      if self.config.tokenizer.path == "world" and world.is_world_prompt(d[:-1]):
        j = world.oracle(d[:-1], text)  # a user JSONL with the world tokenizer has no oracle
        row.update(helpful=bool(j.helpful), safe=bool(j.safe))
      rows.append(row)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
      with open(os.path.join(self.workdir, "samples", f"step_{step:06d}.jsonl"), "w") as f:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows

  def __call__(self, state, step: int) -> dict:
    metrics = self.loss(state.params)
    self.samples(state.params, step)
    return metrics


def _embedder(config, path: str, tokenizer, mesh, rules):
  """``() -> (cfg, params)`` of the coreset's embedding model ``path`` (``coreset.embed_from``),
  restored into the mesh's parameter shardings."""
  def load():
    ecfg = LlamaConfig.from_params_json(os.path.join(path, "params.json")).replace(
        **{k: config.model[k] for k in build.EXEC_FIELDS})
    try:
      tokenizer.check_vocab(ecfg)
    except ValueError as e:
      raise ValueError(f"config.data.select_embed_from ({path}): {e}") from e
    return ecfg, restore_params(path, sharding.abstract_params(ecfg, mesh, rules))
  return load


def _data(config, workdir: str, mesh, rules):
  """(builders, train sources, tokenizer, model config, train stats, selection stats) of
  ``config.data.sft_sources``, checked; the train sources are ``coreset.select``'s."""
  embed_path = coreset.embed_from(config)  # before anything is built
  builders = build.sft_sources(config, workdir)
  tokenizer = build.tokenizer(config, workdir)
  cfg = build.model_config(config, tokenizer.vocab_size)
  tokenizer.check_vocab(cfg)
  if config.data.max_seq_len > cfg.max_seq_len:
    raise ValueError(f"config.data.max_seq_len={config.data.max_seq_len} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  local_batch = build.per_process_batch(config.data.batch_size)
  if local_batch % config.train.grad_accum_steps:
    raise ValueError(f"config.data.batch_size per process ({local_batch}) is not divisible by "
                     f"config.train.grad_accum_steps ({config.train.grad_accum_steps})")
  names = build.parse_list(config.data.sft_sources, "config.data.sft_sources")
  sources, selection = coreset.select(
      config, names, [b.as_data_source(split="train") for b in builders], tokenizer,
      _embedder(config, embed_path, tokenizer, mesh, rules) if embed_path else None)
  return (builders, sources, tokenizer, cfg, train_stats(config, builders, tokenizer, sources),
          selection)


class SFTStage(stage_lib.TrainingStage):
  """Stage ``sft``: supervised fine-tuning on ``config.data.sft_sources`` (also the fine-tuning
  of rejection sampling). ``result.json``: ``steps``, ``train``, held-out ``eval`` (loss,
  perplexity), ``final_dir``."""

  name = "sft"

  def prepare(self, config, workdir: str) -> stage_lib.Run:
    mesh, rules = build.mesh_and_rules(config)
    builders, sources, tokenizer, cfg, stats, selection = _data(config, workdir, mesh, rules)
    steps = total_steps(config, stats["tokens"])
    optimizer = optim.make_optimizer(config.optimizer, steps)
    setup = StateSetup(cfg, mesh, rules, optimizer, config.seed)
    put_batch = build.put_batch_fn(mesh, rules)
    records = build.mixed_sources(sources, config.data.sft_weights, "config.data.sft_weights",
                                  config.seed)
    batches = iter(input_pipeline.sft_batches(
        records, tokenizer, batch_size=build.per_process_batch(config.data.batch_size),
        max_seq_len=config.data.max_seq_len, seed=config.seed))
    init_params = init_params_fn(config, cfg, setup)
    log.info("SFT: %d steps, train stats %s", steps, stats)
    return stage_lib.Run(
        cfg=cfg, total_steps=steps, step_fn=setup.jit_step(functools.partial(
            sft.train_step, cfg=cfg, optimizer=optimizer,
            accum_steps=config.train.grad_accum_steps)),
        batches=batches, abstract_state=setup.abstract_sharded_state(),
        init_state=lambda: setup.fresh_state(init_params), put_batch=put_batch,
        evaluate=HeldOut(config, cfg, tokenizer, builders, put_batch, workdir),
        data_stats={"train": stats, **({"selection": selection} if selection else {})},
        desc="sft", **stage_lib.intervals(config))

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """``sft.train_step`` on a [data.batch_size, data.max_seq_len] batch."""
    cfg = build.planning_model_config(config)
    stage_lib.check_batch(config, "data", cfg, mesh)
    accum = int(config.train.grad_accum_steps)
    b, t = int(config.data.batch_size), int(config.data.max_seq_len)
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in sft.SFT_KEYS}
    optimizer = optim.make_optimizer(config.optimizer, optim.PLANNING_STEPS)
    setup = StateSetup(cfg, mesh, sharding.DEFAULT_RULES, optimizer, int(config.seed))
    step = functools.partial(sft.train_step, cfg=cfg, optimizer=optimizer, accum_steps=accum)
    return [stage_lib.plan_train_step("sft.train_step", setup, step, batch, accum)]


STAGE = SFTStage()


def run(config, workdir: str) -> dict:
  """Train SFT per ``config`` in ``workdir`` (resuming if it has a checkpoint): ``STAGE.run``.

  Returns:
    ``result.json``'s dict (``train.stage.run_stage``).
  Raises:
    ValueError / FileNotFoundError: on bad config fields or data (before anything is written,
      when the workdir is new).
  """
  return STAGE.run(config, workdir)
