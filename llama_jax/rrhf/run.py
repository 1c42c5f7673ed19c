"""The RRHF stage on the stage skeleton: candidate sets -> loop -> eval -> export.

Yuan et al. 2023. ``python train.py --config=configs/rrhf_tiny.py --config.init_from=<sft
workdir>/final --config.rrhf.sampled=<rs workdir>/sampled.jsonl``. The policy starts from
``init_from`` and learns to rank each prompt's K scored responses like their rewards, plus
cross-entropy on the best (``rrhf.step``); the candidates come from sampled-set JSONL files
(``rrhf.data``: e.g. the rejection-sampling stage's K samples of the SFT policy scored by the
reward models, so RRHF and rejection sampling learn from the same samples). No reference model
and no sampling during training. ``<workdir>/final/`` holds the policy (``convert.save_orbax``).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.data import input_pipeline
from llama_jax.rrhf import data as rrhf_data
from llama_jax.rrhf import step as rrhf
from llama_jax.train import build, optim
from llama_jax.train import stage as stage_lib
from llama_jax.train.state import StateSetup, init_params_fn

log = logging.getLogger(__name__)
SECTION = "rrhf"


def _step_kwargs(config) -> dict:
  return {"rank_weight": float(config.rrhf.rank_weight),
          "length_penalty": float(config.rrhf.length_penalty)}


class HeldOut:
  """Held-out RRHF loss, its two terms and the ranking accuracy over the held-out prompts."""

  def __init__(self, config, cfg, tokenizer, sets, put_batch):
    rc = config.rrhf
    self.sets, self.put_batch, self.tok = sets, put_batch, tokenizer
    self.batch_size = build.per_process_batch(rc.batch_size, "config.rrhf.batch_size")
    self.k, self.max_len = int(rc.k), int(rc.max_seq_len)
    self.eval_step = jax.jit(functools.partial(rrhf.eval_step, cfg=cfg, **_step_kwargs(config)))

  def __call__(self, state, step: int) -> dict:
    del step
    if not self.sets:
      return {}
    records = input_pipeline.records_dataset(self.sets, shuffle=False, num_epochs=1)
    sums = None
    for batch in rrhf_data.rrhf_batches(records, self.tok, batch_size=self.batch_size, k=self.k,
                                        max_seq_len=self.max_len, drop_remainder=False):
      batch = input_pipeline.pad_batch(batch, self.batch_size)  # empty prompts: not counted
      got = jax.device_get(self.eval_step(state.params, self.put_batch(batch)))
      sums = got if sums is None else jax.tree.map(np.add, sums, got)
    m = rrhf.means(sums["loss_sum"], sums)
    return {**{k: float(v) for k, v in m.items()}, "prompts": float(sums["prompts"]),
            "pairs": float(sums["pairs"])}


def _check(config, cfg, mesh) -> None:
  """Cross-field checks of ``config.rrhf`` (ValueError naming the field)."""
  if not config.get("init_from", ""):
    raise ValueError("config.init_from is empty: RRHF starts from a policy (e.g. the SFT "
                     "stage's final/ directory)")
  stage_lib.check_batch(config, SECTION, cfg, mesh)
  local = build.per_process_batch(config.rrhf.batch_size, "config.rrhf.batch_size")
  if local % config.train.grad_accum_steps:
    raise ValueError(f"config.rrhf.batch_size per process ({local}) is not divisible by "
                     f"config.train.grad_accum_steps ({config.train.grad_accum_steps})")


def total_steps(config, train_prompts: int) -> int:
  """``train.num_steps``, or ``ceil(train.num_epochs * train_prompts / rrhf.batch_size)``."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  if config.train.num_epochs <= 0:
    raise ValueError("config.train: set num_steps > 0 or num_epochs > 0")
  return max(1, math.ceil(config.train.num_epochs * train_prompts / config.rrhf.batch_size))


class RRHFStage(stage_lib.TrainingStage):
  """Stage ``rrhf``: the policy in ``config.init_from`` trained on the candidate sets of
  ``config.rrhf.sampled``. ``final/`` holds the policy; ``result.json``: ``steps``, ``train``
  (``loss``, ``rrhf_loss``, ``sft_loss``, ``ranking_accuracy``, ...), held-out ``eval`` (the
  same over the held-out prompts); ``data_stats.json``: ``rrhf.data.load``'s counts."""

  name = SECTION

  def prepare(self, config, workdir: str) -> stage_lib.Run:
    rc = config.rrhf
    tokenizer = build.tokenizer(config, workdir)
    cfg = build.model_config(config, tokenizer.vocab_size)
    tokenizer.check_vocab(cfg)
    mesh, rules = build.mesh_and_rules(config)
    _check(config, cfg, mesh)
    train, held, stats = rrhf_data.load(config, tokenizer)
    steps = total_steps(config, len(train))
    optimizer = optim.make_optimizer(config.optimizer, steps)
    setup = StateSetup(cfg, mesh, rules, optimizer, config.seed)
    put_batch = build.put_batch_fn(mesh, rules)
    init_params = init_params_fn(config, cfg, setup)
    records = input_pipeline.records_dataset(train, seed=config.seed)
    batches = iter(rrhf_data.rrhf_batches(
        records, tokenizer, batch_size=build.per_process_batch(rc.batch_size,
                                                               "config.rrhf.batch_size"),
        k=rc.k, max_seq_len=rc.max_seq_len))
    log.info("rrhf: %d steps, k %d, data %s", steps, rc.k, stats)
    return stage_lib.Run(
        cfg=cfg, total_steps=steps, step_fn=setup.jit_step(_train_step(config, cfg, optimizer)),
        batches=batches, abstract_state=setup.abstract_sharded_state(),
        init_state=lambda: setup.fresh_state(init_params), put_batch=put_batch,
        evaluate=HeldOut(config, cfg, tokenizer, held, put_batch), data_stats=stats,
        desc="rrhf", **stage_lib.intervals(config))

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """``rrhf.train_step`` on [rrhf.batch_size, rrhf.k, rrhf.max_seq_len] candidate rows."""
    cfg = build.planning_model_config(config)
    stage_lib.check_batch(config, SECTION, cfg, mesh)
    b, k, t = int(config.rrhf.batch_size), int(config.rrhf.k), int(config.rrhf.max_seq_len)
    optimizer = optim.make_optimizer(config.optimizer, optim.PLANNING_STEPS)
    setup = StateSetup(cfg, mesh, sharding.DEFAULT_RULES, optimizer, int(config.seed))
    return [stage_lib.plan_train_step("rrhf.train_step", setup,
                                      _train_step(config, cfg, optimizer),
                                      abstract_batch(b, k, t),
                                      int(config.train.grad_accum_steps))]


def abstract_batch(b: int, k: int, t: int) -> dict:
  """The batch of ``rrhf.step`` as ``jax.ShapeDtypeStruct`` (b prompts, k rows, t tokens)."""
  rows = lambda dtype: jax.ShapeDtypeStruct((b, k, t), dtype)
  return {"tokens": rows(jnp.int32), "mask": rows(jnp.bool_), "response_mask": rows(jnp.bool_),
          "scores": jax.ShapeDtypeStruct((b, k), jnp.float32),
          "valid": jax.ShapeDtypeStruct((b, k), jnp.bool_)}


def _train_step(config, cfg, optimizer):
  return functools.partial(rrhf.train_step, cfg=cfg, optimizer=optimizer,
                           accum_steps=config.train.grad_accum_steps, **_step_kwargs(config))


STAGE = RRHFStage()


def run(config, workdir: str) -> dict:
  """Train a policy with RRHF per ``config`` in ``workdir`` (resuming if it has a checkpoint).

  Returns:
    ``result.json``'s dict (``train.stage.run_stage``).
  Raises:
    ValueError / FileNotFoundError: on bad config fields (``config.rrhf.*``, an empty
      ``config.init_from``) or data (a malformed record or, with ``overlong="error"``, an
      overlong candidate names its file and line), before step 0 and, when the workdir is new,
      before anything is left in it.
  """
  return STAGE.run(config, workdir)
