"""The reward-model stage end to end: preference mixture -> sharded state -> loop -> eval -> export.

Llama 2 paper, Sec. 3.2.2. ``python train.py --config=configs/reward_tiny.py:helpfulness
--config.init_from=<sft workdir>/final`` (stage ``reward``). The model is initialized from an SFT
(chat) checkpoint: its ``output`` head is dropped and a scalar head added
(``reward.init_reward_params``); ``<workdir>/final/`` holds the reward model
(``reward.save_reward_model``).
"""

from __future__ import annotations

import functools
import logging
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.data import input_pipeline, sources
from llama_jax.reward import data
from llama_jax.reward import step as reward
from llama_jax.train import build, optim
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd
from llama_jax.train.checkpoint import restore_params
from llama_jax.train.state import StateSetup

log = logging.getLogger(__name__)

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
    records = input_pipeline.records_dataset([source[i] for i in range(n)], shuffle=False, num_epochs=1)
    ds = input_pipeline.preference_batches(records, self.tok, batch_size=self.batch_size,
                                     max_seq_len=self.max_len, drop_remainder=False)
    for batch in ds:
      # Pad the last batch with empty pairs (no real token: excluded from every sum).
      yield input_pipeline.pad_batch(batch, self.batch_size, {"rating": -1, "safety_label": -1})

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


def init_params_fn(config, cfg, setup: StateSetup):
  """Reward params: from an SFT ``final/`` (drop ``output``, add a head) or a reward model."""
  init_from = config.get("init_from", "")
  if init_from and reward.is_reward_model(init_from):
    return lambda: restore_params(init_from, setup.abstract_params)
  shardings = jax.tree.map(lambda s: s.sharding, setup.abstract_params)
  make = jax.jit(reward.init_reward_params, out_shardings=shardings)
  key = jax.random.key(config.seed)
  if init_from:
    llama = sharding.abstract_params(cfg, setup.mesh, setup.rules)
    return lambda: make(restore_params(init_from, llama), key)
  log.warning("reward: config.init_from is empty; the trunk is randomly initialized")
  return lambda: make(sharding.init_params_sharded(cfg, key, setup.mesh, setup.rules), key)


class RewardStage(stage_lib.TrainingStage):
  """Stage ``reward``: a helpfulness or safety reward model (``config.reward.model``) on
  ``config.reward.sources``, initialized from an SFT ``final/``. ``final/`` holds the reward
  model (``reward.save_reward_model``); ``result.json``: ``steps``, ``train``, held-out ``eval``
  (accuracy and loss per source and rating)."""

  name = "reward"

  def prepare(self, config, workdir: str) -> stage_lib.Run:
    rc = config.reward
    reward.margin_values(np.zeros(1, np.int32), rc.margin)  # validates the table name
    if not rc.safety_aux_weight >= 0:  # also rejects NaN
      raise ValueError(f"config.reward.safety_aux_weight must be >= 0, got {rc.safety_aux_weight}")
    names = build.parse_list(rc.sources, "config.reward.sources")
    builders = data.preference_builders(config, workdir)
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
    stats = data.check_lengths(config, names, builders, tokenizer)
    steps = data.total_steps(config, stats[f"{names[0]}/train"]["kept"])
    optimizer = optim.make_optimizer(config.optimizer, steps)
    mesh, rules = build.mesh_and_rules(config)
    setup = StateSetup(cfg, mesh, rules, optimizer, config.seed,
                       abstract_params=reward.abstract_reward_params(cfg, mesh, rules))
    put_batch = build.put_batch_fn(mesh, rules)
    records = build.mixed_records(builders, rc.weights, "config.reward.weights", config.seed)
    batches = iter(input_pipeline.preference_batches(records, tokenizer, batch_size=local_batch,
                                                     max_seq_len=rc.max_seq_len))
    init_params = init_params_fn(config, cfg, setup)
    log.info("reward (%s): %d steps, data %s", rc.model, steps, stats)
    return stage_lib.Run(
        cfg=cfg, total_steps=steps, step_fn=setup.jit_step(_train_step(config, cfg, optimizer)),
        batches=batches, abstract_state=setup.abstract_sharded_state(),
        init_state=lambda: setup.fresh_state(init_params), put_batch=put_batch,
        evaluate=HeldOut(config, cfg, tokenizer, names, builders, put_batch),
        export=lambda state: wd.publish(
            workdir, lambda path: reward.save_reward_model(path, cfg, state.params)),
        data_stats=stats, desc=f"reward/{rc.model}", **stage_lib.intervals(config))

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """``reward.train_step`` on [reward.batch_size, reward.max_seq_len] pairs."""
    cfg = build.planning_model_config(config)
    stage_lib.check_batch(config, "reward", cfg, mesh)
    b, t = int(config.reward.batch_size), int(config.reward.max_seq_len)
    batch = {"chosen_tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "chosen_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
             "rejected_tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "rejected_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
             "rating": jax.ShapeDtypeStruct((b,), jnp.int32)}
    optimizer = optim.make_optimizer(config.optimizer, optim.PLANNING_STEPS)
    rules = sharding.DEFAULT_RULES
    setup = StateSetup(cfg, mesh, rules, optimizer, int(config.seed),
                       abstract_params=reward.abstract_reward_params(cfg, mesh, rules))
    return [stage_lib.plan_train_step("reward.train_step", setup,
                                      _train_step(config, cfg, optimizer), batch,
                                      int(config.train.grad_accum_steps))]


def _train_step(config, cfg, optimizer):
  return functools.partial(reward.train_step, cfg=cfg, optimizer=optimizer,
                           margin=config.reward.margin,
                           accum_steps=config.train.grad_accum_steps,
                           safety_aux_weight=float(config.reward.safety_aux_weight))


STAGE = RewardStage()


def run(config, workdir: str) -> dict:
  """Train a reward model per ``config`` in ``workdir`` (resuming if it has a checkpoint).

  Returns:
    ``result.json``'s dict (``train.stage.run_stage``); ``train.stop_after_steps`` > 0 stops
    after that many steps in this call (checkpointed; the next call resumes).
  Raises:
    ValueError / FileNotFoundError: on bad config fields (e.g. a negative
      ``config.reward.safety_aux_weight``) or data (a malformed or overlong preference record
      names its file and line), before step 0 and, when the workdir is new, before anything is
      left in it.
  """
  return STAGE.run(config, workdir)
