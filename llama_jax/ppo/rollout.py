"""PPO's pieces around the pure step: settings, the jitted functions of one mesh, prompts,
rollout rewards and the held-out evaluation that selects the checkpoint.

Llama 2 paper, Sec. 3.2.3; Huang et al. 2024 (arXiv 2403.17031). The stage itself
(``llama_jax.ppo.run``) puts these on the stage skeleton.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import evaluation, sampling, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import input_pipeline
from llama_jax.ppo import step as ppo
from llama_jax.reward import scoring
from llama_jax.reward import step as reward
from llama_jax.train import build, optim
from llama_jax.train.checkpoint import restore_params
from llama_jax.train.stage import StepPlan, sampling_plan, shard_bytes
from llama_jax.train.state import StateSetup


def ppo_config(config) -> ppo.PPOConfig:
  """``ppo.PPOConfig`` from the fields of ``config.ppo`` it has (its defaults are
  ``PPOConfig``'s, which ``configs/base.py`` uses too) and ``config.train.grad_accum_steps``.
  Raises ValueError naming the field."""
  fields = {f.name: config.ppo[f.name] for f in dataclasses.fields(ppo.PPOConfig)
            if f.name in config.ppo}
  accum = int(config.train.get("grad_accum_steps", 1))
  if config.ppo.minibatch_size % accum:
    raise ValueError(f"config.ppo.minibatch_size={config.ppo.minibatch_size} is not divisible "
                     f"by config.train.grad_accum_steps={accum}")
  return ppo.PPOConfig(**fields, grad_accum_steps=accum)


def optimizers(config):
  """(policy, value) optimizers: ``config.optimizer``'s AdamW settings with constant LRs
  ``ppo.lr`` / ``ppo.value_lr`` (paper: 1e-6)."""
  c = config.ppo
  steps = max(1, c.num_iterations * (c.batch_size // max(c.minibatch_size, 1)) * c.epochs)
  base = dict(config.optimizer.to_dict(), schedule="constant", warmup_steps=0, warmup_frac=0.0)
  return (optim.make_optimizer(dict(base, lr=c.lr), steps),
          optim.make_optimizer(dict(base, lr=c.value_lr), steps))


def validate(config):
  """Checks ``config.ppo`` sizes. Raises ValueError naming the field."""
  c = config.ppo
  for name in ("num_iterations", "batch_size", "minibatch_size", "max_new_tokens", "max_prompt_len",
               "eval_prompts"):
    if int(c[name]) < 1:
      raise ValueError(f"config.ppo.{name} must be >= 1, got {c[name]}")
  if c.batch_size % c.minibatch_size:
    raise ValueError(f"config.ppo.batch_size={c.batch_size} is not divisible by "
                     f"config.ppo.minibatch_size={c.minibatch_size}")
  build.per_process_batch(c.batch_size, "config.ppo.batch_size")
  for name in ("generation_batch_size", "forward_batch_size"):
    rows = int(c.get(name, 0))
    if rows and c.batch_size % rows:
      raise ValueError(f"config.ppo.{name}={rows} does not divide "
                       f"config.ppo.batch_size={c.batch_size}")
  if c.num_prompts < 0:
    raise ValueError(f"config.ppo.num_prompts must be >= 0, got {c.num_prompts}")
  if c.eval_every < 0 or c.patience < 0 or c.checkpoint_every < 0:
    raise ValueError("config.ppo.eval_every, patience and checkpoint_every must be >= 0")
  if c.get("value_head_init", "zero") not in ("zero", "keep"):
    raise ValueError(f"config.ppo.value_head_init must be 'zero' or 'keep', "
                     f"got {c.value_head_init!r}")
  ppo_config(config)


class Setup:
  """Shardings and jitted functions of PPO for one mesh (shape-first, nothing allocated).

  Attributes:
    policy, value: ``train.state.StateSetup`` of the two optimized models.
    state_shardings: ``PPOState`` of shardings. update: the jitted ``ppo.ppo_update`` (every
      minibatch step of one iteration; state donated). minibatch_step: the jitted
      ``ppo.ppo_train_step`` (one minibatch; what the dry run plans). experience: the jitted
      ``ppo.make_experience``. rewards: the jitted ``ppo.rollout_rewards`` (None without reward
      models: ``rcfg`` None).
  """

  def __init__(self, config, cfg: LlamaConfig, vcfg: LlamaConfig, rcfg: LlamaConfig, mesh, rules):
    self.cfg, self.vcfg, self.rcfg, self.mesh, self.rules = cfg, vcfg, rcfg, mesh, rules
    self.ppo_cfg = ppo_config(config)
    policy_opt, value_opt = optimizers(config)
    self.policy = StateSetup(cfg, mesh, rules, policy_opt, config.seed)
    self.value = StateSetup(vcfg, mesh, rules, value_opt, config.seed + 1,
                                      abstract_params=reward.abstract_reward_params(vcfg, mesh, rules))
    self.state_shardings = ppo.PPOState(self.policy.state_shardings, self.value.state_shardings)
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = sharding.batch_sharding(mesh, rules)
    self.update = sharding.jit_step(
        functools.partial(ppo.ppo_update, cfg=cfg, policy_opt=policy_opt, value_opt=value_opt,
                          ppo_cfg=self.ppo_cfg, value_cfg=vcfg), mesh, rules,
        in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.minibatch_step = sharding.jit_step(
        functools.partial(ppo.ppo_train_step, cfg=cfg, policy_opt=policy_opt, value_opt=value_opt,
                          ppo_cfg=self.ppo_cfg, value_cfg=vcfg), mesh, rules,
        in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.experience = jax.jit(functools.partial(ppo.make_experience, cfg=cfg, ppo_cfg=self.ppo_cfg,
                                                value_cfg=vcfg))
    self.rewards = None if rcfg is None else jax.jit(functools.partial(
        ppo.rollout_rewards, reward_cfg=rcfg, ppo_cfg=self.ppo_cfg))

  def abstract_state(self) -> ppo.PPOState:
    return ppo.PPOState(self.policy.abstract_sharded_state(), self.value.abstract_sharded_state())


MINIBATCH_KEYS = ("tokens", "positions", "segment_ids", "response_tokens", "response_mask",
                  "old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")


def abstract_experience(config, batch_sharding=None, rows: Optional[int] = None,
                        keys: Optional[Sequence[str]] = None) -> dict:
  """``jax.ShapeDtypeStruct`` of a rollout's experience dict (``ppo.make_experience``):
  b = ``rows`` (default ``ppo.batch_size``), m = ``ppo.max_new_tokens``, s =
  ``ppo.max_prompt_len`` + m; only ``keys`` when given (a minibatch: :data:`MINIBATCH_KEYS`)."""
  c = config.ppo
  b, m = rows or c.batch_size, c.max_new_tokens
  s = c.max_prompt_len + m
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding)
  out = {k: sd((b, s), jnp.int32) for k in ("tokens", "positions", "segment_ids")}
  out["response_tokens"] = sd((b, m), jnp.int32)
  out["response_mask"] = sd((b, m), jnp.bool_)
  for k in ("old_logprobs", "ref_logprobs", "old_values", "kl", "rewards", "advantages", "returns"):
    out[k] = sd((b, m), jnp.float32)
  out["score"] = sd((b,), jnp.float32)
  return {k: v for k, v in out.items() if keys is None or k in keys}


def check_plan(config, cfg: LlamaConfig, mesh) -> None:
  """The PPO sizes fit the model and split over the mesh's data x fsdp axes.

  Raises:
    ValueError: naming the field.
  """
  pc = config.ppo
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if pc.max_prompt_len + pc.max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"config.ppo.max_prompt_len + max_new_tokens = "
                     f"{pc.max_prompt_len + pc.max_new_tokens} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  for name in ("batch_size", "minibatch_size"):
    if pc[name] % shards:
      raise ValueError(f"config.ppo.{name}={pc[name]} is not divisible by the batch mesh axes "
                       f"data x fsdp = {shards}")
  for name in ("generation_batch_size", "forward_batch_size"):
    rows = int(pc.get(name, 0))
    if rows and (pc.batch_size % rows or rows % shards):
      raise ValueError(f"config.ppo.{name}={rows} must divide batch_size={pc.batch_size} and "
                       f"be a multiple of data x fsdp = {shards}")
  accum = int(config.train.get("grad_accum_steps", 1))
  if pc.minibatch_size % (accum * shards):
    raise ValueError(f"config.ppo.minibatch_size={pc.minibatch_size} is not divisible by "
                     f"config.train.grad_accum_steps x data x fsdp = {accum} x {shards}: each "
                     "microbatch must split over the batch mesh axes")


def plan_rollouts(config, setup: Setup, state) -> StepPlan:
  """:class:`~llama_jax.train.stage.StepPlan` of rollout generation (``sampling.sample`` of
  ``ppo.batch_size`` prompts on the generation layout, ``stage.sampling_plan``); the frozen
  reference policy and two reward models (the policy's shape) stay resident and are added to
  the total, and so is the train state ``state`` unless ``ppo.offload_state`` parks it in host
  memory."""
  pc = config.ppo
  frozen = 3 * shard_bytes(setup.policy.abstract_params)
  extra, name = {"resident_frozen_models": frozen}, "sampling.sample (rollouts, generation layout"
  if pc.get("offload_state", False):
    name += f"; train state, {shard_bytes(state) / 2**30:.2f} GiB, parked in pinned_host"
  else:
    extra["resident_train_state"] = shard_bytes(state)
  rows = int(pc.get("generation_batch_size", 0)) or int(pc.batch_size)
  return sampling_plan(name + ")", setup.cfg, setup.mesh, rows,
                       int(pc.max_prompt_len), int(pc.max_new_tokens), float(pc.temperature),
                       extra=extra)


def plan_scoring(config, setup: Setup, state) -> List[StepPlan]:
  """:class:`~llama_jax.train.stage.StepPlan` s of the scoring pass over the whole rollout batch
  (``ppo.batch_size`` rows of ``max_prompt_len + max_new_tokens`` tokens, in the train layout),
  lowered exactly as ``ppo.run.Iteration`` calls them: ``setup.rewards`` (the helpfulness and
  safety reward models; the train state and the reference policy stay resident) and
  ``setup.experience`` (reference and value passes, GAE; the rest of the train state and both
  reward models stay resident; its "parameters" are the reference's). Reward models are assumed
  to have the policy's shape."""
  pc = config.ppo
  b, p, m = int(pc.batch_size), int(pc.max_prompt_len), int(pc.max_new_tokens)
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=setup.batch_sharding)
  batch = {"prompt_tokens": sd((b, p), jnp.int32), "prompt_mask": sd((b, p), jnp.bool_),
           "is_safety": sd((b,), jnp.bool_)}
  gen = sampling.GenerateOutput(sd((b, m), jnp.int32), sd((b, m), jnp.float32),
                                sd((b,), jnp.int32), sd((b,), jnp.bool_))
  rm = reward.abstract_reward_params(setup.cfg, setup.mesh, setup.rules)
  shapes = {"prompt_tokens": (b, p), "response_tokens": (b, m)}
  plans = []
  with sharding.activate(setup.mesh, setup.rules):
    t0 = time.perf_counter()
    lowered = setup.rewards.lower(rm, rm, batch, gen)
    plans.append(StepPlan(
        "ppo.rollout_rewards (both reward models over the rollouts)", lowered, 1, shapes, rm,
        extra={"resident_train_state": shard_bytes(state),
               "resident_reference": shard_bytes(state.policy.params)},
        detail={"safety reward model": shard_bytes(rm)}, lower_s=time.perf_counter() - t0))
    t0 = time.perf_counter()
    lowered = setup.experience.lower(state.policy.params, state.policy.params, state.value.params,
                                     batch, gen, sd((b,), jnp.float32))
    # With the sampler's log-probs the policy params are unused: jit prunes them from the
    # arguments, but they stay live in the train state.
    resident = (state.policy.opt_state, state.value.opt_state)
    if setup.ppo_cfg.old_logprobs == "sampler":
      resident += (state.policy.params,)
    plans.append(StepPlan(
        "ppo.make_experience (reference and value passes over the rollouts)", lowered, 1, shapes,
        state.policy.params,
        extra={"resident_train_state_not_an_argument": shard_bytes(resident),
               "resident_reward_models": 2 * shard_bytes(rm)},
        detail={"value params": shard_bytes(state.value.params)},
        lower_s=time.perf_counter() - t0))
  return plans


# ---- data ------------------------------------------------------------------------------------------
class Prompts:
  """Tokenized, left-padded prompts; ``batch(i)`` = this process's rows of iteration ``i``."""

  def __init__(self, records, tokenizer, max_prompt_len: int, field: str):
    ex = [input_pipeline.prompt_example(r, tokenizer, max_prompt_len) for r in records]
    ex = [e for e in ex if e is not None]
    if not ex:
      raise ValueError(f"{field}: no prompt fits config.ppo.max_prompt_len={max_prompt_len}")
    self.dropped = len(records) - len(ex)
    self.tokens = np.stack([e["prompt_tokens"] for e in ex])
    self.mask = np.stack([e["prompt_mask"] for e in ex])
    self.is_safety = np.asarray([e["is_safety"] for e in ex], bool)
    self.messages = [json.loads(e["prompt_json"]) for e in ex]

  def __len__(self):
    return len(self.tokens)

  def rows(self, idx) -> dict:
    return {"prompt_tokens": self.tokens[idx], "prompt_mask": self.mask[idx],
            "is_safety": self.is_safety[idx]}

  def batch(self, seed: int, iteration: int, global_batch: int):
    """(this process's rows of iteration ``iteration``, their prompt indices)."""
    rng = np.random.default_rng([seed, iteration])
    idx = rng.choice(len(self), global_batch, replace=len(self) < global_batch)
    local = global_batch // jax.process_count()
    idx = idx[jax.process_index() * local:(jax.process_index() + 1) * local]
    return self.rows(idx), idx


# ---- evaluation ------------------------------------------------------------------------------------
class HeldOut:
  """Held-out evaluation of sampled completions at the PPO temperature: what PPO selects its
  checkpoint and stops early with (the distribution it optimizes, not greedy decoding).

  On distinct held-out prompts of stream ``prompts_lib.SELECTION_STREAM`` (``eval.py`` leaves
  them out), one sample per prompt with a fixed key (common random numbers: evaluations
  differ only by the policy). Reports ``reward`` (mean ``Rc`` of the stage's reward; a
  truncated completion counts 0), ``truncated``, ``response_length``, sequence-level KL (k1,
  summed over tokens, mean over rows) to the PPO reference (``kl_ref``) and, with
  ``ppo.sft_from``, to SFT (``kl_sft``: the x-axis of Gao et al. 2022's over-optimization
  curves); with reward-model rewards also ``r_help`` / ``r_safe``; on the world the oracle's
  ``gold`` reward (truncated 0), ``helpfulness``, ``refusal_rate`` and ``false_refusal_rate``.
  """

  def __init__(self, config, setup: Setup, prompts: Prompts, tokenizer, scorer, ref, sft=None):
    self.config, self.setup, self.prompts, self.tok = config, setup, prompts, tokenizer
    self.scorer, self.ref, self.sft = scorer, ref, sft
    self.logprobs = jax.jit(functools.partial(ppo.response_logprobs, cfg=setup.cfg,
                                              temperature=float(config.ppo.temperature)))

  def _seq_kl(self, params, other, ro, mask) -> float:
    args = (ro["tokens"], ro["positions"], ro["segment_ids"], ro["response_tokens"])
    lp, lo = np.asarray(self.logprobs(params, *args)[0]), np.asarray(self.logprobs(other, *args)[0])
    return float(np.mean(np.sum(np.where(mask, lp - lo, 0.0), axis=1)))

  def __call__(self, params, gen_params) -> dict:
    c = self.config.ppo
    rows = self.prompts.rows(np.arange(len(self.prompts)))
    with sharding.activate(self.setup.mesh, sharding.GENERATION_RULES):
      gen = sampling.sample(gen_params, rows["prompt_tokens"], rows["prompt_mask"],
                            jax.random.key(self.config.seed + 7919), cfg=self.setup.cfg,
                            max_new_tokens=c.max_new_tokens, temperature=float(c.temperature),
                            eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    texts, finished = sampling.decode(gen, self.tok), np.asarray(gen.finished)
    scores = self.scorer(self.prompts.messages, texts, rows["is_safety"])
    done = lambda x: float(np.mean(np.where(finished, x, 0.0)))
    out = {"reward": done(scores["rc"]), "truncated": float(1.0 - finished.mean()),
           "response_length": float(np.mean(np.asarray(gen.lengths)))}
    for k in ("r_help", "r_safe"):
      if k in scores:
        out[k] = done(scores[k])
    with sharding.activate(self.setup.mesh, self.setup.rules):
      ro = ppo.rollout_tensors(jnp.asarray(rows["prompt_tokens"]),
                               jnp.asarray(rows["prompt_mask"]), gen)
      mask = np.asarray(ro["response_mask"])
      out["kl_ref"] = self._seq_kl(params, self.ref, ro, mask)
      if self.sft is not None:
        out["kl_sft"] = self._seq_kl(params, self.sft, ro, mask)
    if self.config.tokenizer.path == "world":
      gold = (scores["gold"] if "gold" in scores  # the oracle is the reward: scored already
              else scoring.oracle_scores(self.prompts.messages, texts)["gold"])
      out["gold"] = done(gold)
      rep = evaluation.oracle_report(self.prompts.messages, texts, finished)
      out.update(helpfulness=rep["helpfulness"], refusal_rate=rep["refusal_rate"],
                 false_refusal_rate=rep["false_refusal_rate"])
    return out


def value_init(config, setup: Setup, value_from: str):
  """Value params: a reward model (``ppo.value_from``, default ``ppo.help_rm``) or a policy
  checkpoint (``output`` dropped, a head added), with the head zeroed when
  ``ppo.value_head_init == "zero"`` (:func:`ppo.reset_value_head`)."""
  shardings = jax.tree.map(lambda s: s.sharding, setup.value.abstract_params)
  if reward.is_reward_model(value_from):
    params = restore_params(value_from, setup.value.abstract_params)
  else:
    llama = restore_params(value_from, sharding.abstract_params(
        setup.vcfg, setup.mesh, setup.rules))
    params = jax.jit(reward.init_reward_params, out_shardings=shardings)(
        llama, jax.random.key(config.seed + 1))
  if config.ppo.get("value_head_init", "zero") == "zero":
    params = jax.jit(ppo.reset_value_head, out_shardings=shardings)(params)
  return params


def rollout_rc(setup: Setup, scorer, rms: Optional[scoring.RewardModels], batch, gen,
               prompts: Prompts, idx, tokenizer):
  """([b] Rc on device, stats of host floats) from the reward models ``rms`` (jitted; their
  params on the mesh) or, when ``scorer.kind == "oracle"``, the world's judge."""
  if scorer.kind == "rm":
    rc, rstats = setup.rewards(rms.help, rms.safety, batch, gen)
    return rc, {k: float(np.mean(np.asarray(v))) for k, v in jax.device_get(rstats).items()}
  texts = sampling.decode(gen, tokenizer)
  rc = scorer([prompts.messages[i] for i in idx], texts, prompts.is_safety[idx])["rc"]
  return jnp.asarray(rc, jnp.float32), {}
