"""The DPO stage on the stage skeleton: preference mixture -> reference pass -> loop -> eval -> export.

Rafailov et al. 2023. ``python train.py --config=configs/dpo_tiny.py --config.init_from=<sft
workdir>/final``. The policy starts from the SFT checkpoint, which is also the reference: its
log-probs of every pair are computed once before step 0 (``dpo.reference``) and arrive with the
batches. The data are the reward models' preference mixtures (``config.dpo.sources``: world
pairs, HH-RLHF, a preference JSONL such as the on-policy annotation batches), read by
``reward.data``. ``<workdir>/final/`` holds the policy (``convert.save_orbax``), which
``eval.py`` and later stages read as any policy.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.dpo import reference
from llama_jax.dpo import step as dpo
from llama_jax.data import input_pipeline
from llama_jax.reward import data as preference_data
from llama_jax.train import build, optim
from llama_jax.train import stage as stage_lib
from llama_jax.train.state import StateSetup, init_params_fn

log = logging.getLogger(__name__)
SECTION = "dpo"


class HeldOut:
  """Held-out DPO loss, reward accuracy and margins per source and over all sources (the
  reference log-probs of the held-out pairs come from the same reference pass)."""

  def __init__(self, config, cfg, tokenizer, names, sources, put_batch):
    self.names, self.sources, self.put_batch, self.tok = names, sources, put_batch, tokenizer
    self.batch_size = build.per_process_batch(config.dpo.batch_size, "config.dpo.batch_size")
    self.max_len = config.dpo.max_seq_len
    self.eval_step = jax.jit(functools.partial(dpo.eval_step, cfg=cfg, beta=float(config.dpo.beta)))

  def _batches(self, source):
    records = input_pipeline.records_dataset(source, shuffle=False, num_epochs=1)
    for batch in reference.dpo_batches(records, self.tok, batch_size=self.batch_size,
                                       max_seq_len=self.max_len, drop_remainder=False):
      yield input_pipeline.pad_batch(batch, self.batch_size)  # empty pairs: excluded from sums

  def __call__(self, state, step: int) -> dict:
    del step
    out, total = {}, None
    for name, source in zip(self.names, self.sources):
      sums = None
      for batch in self._batches(source):
        got = jax.device_get(self.eval_step(state.params, self.put_batch(batch)))
        sums = got if sums is None else jax.tree.map(np.add, sums, got)
      if sums is None or sums["pairs"] == 0:
        continue
      total = sums if total is None else jax.tree.map(np.add, total, sums)
      out.update({f"{name}/{k}": float(v) for k, v in _means(sums).items()})
    if total is not None:
      out.update({k: float(v) for k, v in _means(total).items()})
    return out


def _means(sums) -> dict:
  m = dpo.means(sums["loss_sum"], sums)
  return {"loss": m["loss"], "rewards/accuracies": m["rewards/accuracies"],
          "rewards/margins": m["rewards/margins"], "rewards/chosen": m["rewards/chosen"],
          "rewards/rejected": m["rewards/rejected"], "pairs": sums["pairs"]}


def reference_rows(config) -> int:
  """Pairs per call of the reference pass: ``dpo.reference_batch_size``, or the train
  microbatch (``dpo.batch_size / train.grad_accum_steps``), whose activations fit anyway."""
  rows = int(config.dpo.reference_batch_size)
  return rows or int(config.dpo.batch_size) // int(config.train.grad_accum_steps)


def _check(config, cfg, mesh) -> None:
  """Cross-field checks of ``config.dpo`` (ValueError naming the field)."""
  dc = config.dpo
  if not dc.beta > 0:  # also rejects NaN
    raise ValueError(f"config.dpo.beta must be > 0, got {dc.beta}")
  if not config.get("init_from", ""):
    raise ValueError("config.init_from is empty: DPO starts from the SFT policy (its final/ "
                     "directory), which is also the reference policy")
  if dc.max_seq_len > cfg.max_seq_len:
    raise ValueError(f"config.dpo.max_seq_len={dc.max_seq_len} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  local = build.per_process_batch(dc.batch_size, "config.dpo.batch_size")
  if local % config.train.grad_accum_steps:
    raise ValueError(f"config.dpo.batch_size per process ({local}) is not divisible by "
                     f"config.train.grad_accum_steps ({config.train.grad_accum_steps})")
  rows, shards = reference_rows(config), mesh.shape["data"] * mesh.shape["fsdp"]
  if rows < 1 or rows % shards or rows % jax.process_count():
    raise ValueError(f"config.dpo.reference_batch_size: the reference pass's {rows} pairs per "
                     f"call must be a positive multiple of the batch mesh axes data x fsdp = "
                     f"{shards} and of the {jax.process_count()} processes")


class DPOStage(stage_lib.TrainingStage):
  """Stage ``dpo``: Direct Preference Optimization of the SFT policy in ``config.init_from`` on
  ``config.dpo.sources``. ``final/`` holds the policy; ``result.json``: ``steps``, ``train``
  (``loss``, ``rewards/*``, ``logps/*``), held-out ``eval`` (loss, reward accuracy and margins per
  source and overall); ``data_stats.json`` also the reference pass (``reference``)."""

  name = SECTION

  def prepare(self, config, workdir: str) -> stage_lib.Run:
    dc = config.dpo
    names = build.parse_list(dc.sources, "config.dpo.sources")
    builders = preference_data.preference_builders(config, workdir, SECTION)
    tokenizer = build.tokenizer(config, workdir)
    cfg = build.model_config(config, tokenizer.vocab_size)
    tokenizer.check_vocab(cfg)
    mesh, rules = build.mesh_and_rules(config)
    _check(config, cfg, mesh)
    stats = preference_data.check_lengths(config, names, builders, tokenizer, SECTION)
    steps = preference_data.total_steps(config, stats[f"{names[0]}/train"]["kept"], SECTION)
    optimizer = optim.make_optimizer(config.optimizer, steps)
    setup = StateSetup(cfg, mesh, rules, optimizer, config.seed)
    put_batch = build.put_batch_fn(mesh, rules)
    init_params = init_params_fn(config, cfg, setup)
    train = [b.as_data_source(split="train") for b in builders]
    held = [reference.held_out(b.as_data_source(split="held_out"), dc.eval_pairs)
            for b in builders]
    parts = ([(n, "train", s) for n, s in zip(names, train)]
             + [(n, "held_out", s) for n, s in zip(names, held)])
    tables, info = reference.tables(config, workdir, cfg, mesh, rules, tokenizer, parts,
                                    reference_rows(config), init_params, put_batch)
    records = build.mixed_sources(
        [reference.WithReference(s, tables[(n, "train")]) for n, s in zip(names, train)],
        dc.weights, "config.dpo.weights", config.seed)
    batches = iter(reference.dpo_batches(
        records, tokenizer, batch_size=build.per_process_batch(dc.batch_size,
                                                               "config.dpo.batch_size"),
        max_seq_len=dc.max_seq_len))
    held_sources = [reference.WithReference(s, tables[(n, "held_out")])
                    for n, s in zip(names, held)]
    log.info("dpo: %d steps, beta %g, data %s", steps, dc.beta, stats)
    return stage_lib.Run(
        cfg=cfg, total_steps=steps, step_fn=setup.jit_step(_train_step(config, cfg, optimizer)),
        batches=batches, abstract_state=setup.abstract_sharded_state(),
        init_state=lambda: setup.fresh_state(init_params), put_batch=put_batch,
        evaluate=HeldOut(config, cfg, tokenizer, names, held_sources, put_batch),
        data_stats={**stats, "reference": info}, desc="dpo", **stage_lib.intervals(config))

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """``dpo.train_step`` on [dpo.batch_size, dpo.max_seq_len] pairs and the reference pass
    (``dpo.reference_logps`` on one call's pairs, the SFT params alone live)."""
    cfg = build.planning_model_config(config)
    stage_lib.check_batch(config, SECTION, cfg, mesh)
    b, t = int(config.dpo.batch_size), int(config.dpo.max_seq_len)
    rows = reference_rows(config)
    optimizer = optim.make_optimizer(config.optimizer, optim.PLANNING_STEPS)
    rules = sharding.DEFAULT_RULES
    setup = StateSetup(cfg, mesh, rules, optimizer, int(config.seed))
    train = stage_lib.plan_train_step("dpo.train_step", setup,
                                      _train_step(config, cfg, optimizer), _abstract_batch(b, t),
                                      int(config.train.grad_accum_steps))
    params = setup.abstract_params
    fn = reference.reference_fn(cfg, mesh, rules, jax.tree.map(lambda x: x.sharding, params))
    batch_sh = sharding.batch_sharding(mesh, rules)
    rows_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                  for k, v in _abstract_batch(rows, t).items() if k in dpo.ROW_KEYS}
    t0 = time.perf_counter()
    lowered = fn.lower(params, rows_batch)
    ref = stage_lib.StepPlan("dpo.reference_logps", lowered, 1,
                             {k: tuple(v.shape) for k, v in rows_batch.items()}, params,
                             lower_s=time.perf_counter() - t0)
    return [train, ref]


def _abstract_batch(b: int, t: int) -> dict:
  out = {}
  for k in dpo.ROW_KEYS:
    out[k] = jax.ShapeDtypeStruct((b, t), jnp.int32 if k.endswith("tokens") else jnp.bool_)
  for k in dpo.REF_KEYS:
    out[k] = jax.ShapeDtypeStruct((b,), jnp.float32)
  return out


def _train_step(config, cfg, optimizer):
  return functools.partial(dpo.train_step, cfg=cfg, optimizer=optimizer,
                           beta=float(config.dpo.beta), accum_steps=config.train.grad_accum_steps)


STAGE = DPOStage()


def run(config, workdir: str) -> dict:
  """Train a policy with DPO per ``config`` in ``workdir`` (resuming if it has a checkpoint).

  Returns:
    ``result.json``'s dict (``train.stage.run_stage``).
  Raises:
    ValueError / FileNotFoundError: on bad config fields (``config.dpo.*``, an empty
      ``config.init_from``) or data (a malformed or overlong pair names its file and line), before
      step 0 and, when the workdir is new, before anything is left in it.
  """
  return STAGE.run(config, workdir)
