"""The PPO stage: rollouts on a generation layout, RM scoring, clipped PPO updates, early stopping.

Llama 2 paper, Sec. 3.2.3; Huang et al. 2024 (arXiv 2403.17031). ``python train.py
--config=configs/ppo_tiny.py --config.init_from=<rs>/final --config.ppo.help_rm=<rm>/final ...``
(the pipeline stage sets these). Pieces:

* policy from ``config.init_from``; reference pi_0 = the same checkpoint, frozen; value model from
  ``ppo.value_from`` (default the helpfulness RM) with its head zeroed (``ppo.value_head_init``);
  both RMs frozen; ``ppo.reward = "oracle"`` replaces them by the world's judge (the gold-reward
  control, ``llama_jax.scoring``).
* each iteration: ``ppo.batch_size`` prompts drawn with a seed of (``config.seed``, iteration),
  so a resumed run sees the same prompts; the policy is copied to ``sharding.GENERATION_RULES``
  (tensor-parallel, no FSDP split) for sampling and the copy dropped after; ``ppo.make_experience``
  scores the rollouts; ``ppo.ppo_update`` takes one step per minibatch.
* metrics per iteration in ``<workdir>/logs`` (split ``train``): ``reward_raw`` (mean Rc),
  ``r_help``, ``r_safe``, ``reward_whitened`` (mean R~c after the EOS trick), ``kl`` (rollout KL
  to pi_0, summed over tokens), ``approxkl``, ``clipfrac``, ``entropy``, ``policy_loss``,
  ``value_loss``, ``response_length``, ``eos_rate``, ``time_generation`` / ``time_scoring`` /
  ``time_training`` (seconds); held-out evaluation (split ``eval``, :class:`HeldOut`) every
  ``ppo.eval_every`` iterations: mean reward of sampled completions at the PPO temperature, KL to
  the reference and to SFT, and on the world the oracle's gold reward and helpfulness.
* early stopping: after ``ppo.patience`` evaluations without a better held-out reward the run
  stops; ``final/`` is the best evaluated policy (``best/`` while running); ``result.json``'s
  ``improved`` says whether any evaluation beat the starting policy.
* checkpoints (``PPOState``: policy and value train states) every ``ppo.checkpoint_every``
  iterations, at the end and on SIGTERM; ``train.stop_after_steps`` counts iterations.

The dry run lowers the jitted update with :func:`lower_ppo_step` (inputs: :func:`abstract_step_inputs`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import build, evaluation, optim, ppo, reward, sampling, scoring, sharding, stage_lib
from llama_jax import prompts as prompts_lib
from llama_jax.checkpoint import Checkpointer, StopSignal
from llama_jax.config import LlamaConfig
from llama_jax.data import pipeline
from llama_jax.metrics import MetricWriter

log = logging.getLogger(__name__)
PROGRESS = "ppo_progress.json"


def ppo_config(config) -> ppo.PPOConfig:
  """``ppo.PPOConfig`` from ``config.ppo`` (ValueError naming the field on bad values)."""
  c = config.ppo
  return ppo.PPOConfig(beta=float(c.beta), kl_estimator=c.kl_estimator, clip_eps=float(c.clip_eps),
                       value_clip=float(c.value_clip), gamma=float(c.gamma), lam=float(c.lam),
                       temperature=float(c.temperature), safety_threshold=float(c.safety_threshold),
                       eos_penalty=None if c.eos_penalty is None else float(c.eos_penalty),
                       minibatch_size=int(c.minibatch_size), epochs=int(c.epochs))


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
    policy, value: ``stage_lib.StateSetup`` of the two optimized models.
    state_shardings: ``PPOState`` of shardings. update: the jitted ``ppo.ppo_update``
      (state donated). experience: the jitted ``ppo.make_experience``. rewards: the jitted
      ``ppo.rollout_rewards`` (None without reward models: ``rcfg`` None).
  """

  def __init__(self, config, cfg: LlamaConfig, vcfg: LlamaConfig, rcfg: LlamaConfig, mesh, rules):
    self.cfg, self.vcfg, self.rcfg, self.mesh, self.rules = cfg, vcfg, rcfg, mesh, rules
    self.ppo_cfg = ppo_config(config)
    policy_opt, value_opt = optimizers(config)
    self.policy = stage_lib.StateSetup(cfg, mesh, rules, policy_opt, config.seed)
    self.value = stage_lib.StateSetup(vcfg, mesh, rules, value_opt, config.seed + 1,
                                      abstract_params=reward.abstract_reward_params(vcfg, mesh, rules))
    self.state_shardings = ppo.PPOState(self.policy.state_shardings, self.value.state_shardings)
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = sharding.batch_sharding(mesh, rules)
    self.update = sharding.jit_step(
        functools.partial(ppo.ppo_update, cfg=cfg, policy_opt=policy_opt, value_opt=value_opt,
                          ppo_cfg=self.ppo_cfg, value_cfg=vcfg), mesh, rules,
        in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.experience = jax.jit(functools.partial(ppo.make_experience, cfg=cfg, ppo_cfg=self.ppo_cfg,
                                                value_cfg=vcfg))
    self.rewards = None if rcfg is None else jax.jit(functools.partial(
        ppo.rollout_rewards, reward_cfg=rcfg, ppo_cfg=self.ppo_cfg))

  def abstract_state(self) -> ppo.PPOState:
    return ppo.PPOState(self.policy.abstract_sharded_state(), self.value.abstract_sharded_state())


def abstract_experience(config, batch_sharding=None) -> dict:
  """``jax.ShapeDtypeStruct`` of a rollout's experience dict (``ppo.make_experience``):
  b = ``ppo.batch_size``, m = ``ppo.max_new_tokens``, s = ``ppo.max_prompt_len`` + m."""
  c = config.ppo
  b, m = c.batch_size, c.max_new_tokens
  s = c.max_prompt_len + m
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding)
  out = {k: sd((b, s), jnp.int32) for k in ("tokens", "positions", "segment_ids")}
  out["response_tokens"] = sd((b, m), jnp.int32)
  out["response_mask"] = sd((b, m), jnp.bool_)
  for k in ("old_logprobs", "ref_logprobs", "old_values", "kl", "rewards", "advantages", "returns"):
    out[k] = sd((b, m), jnp.float32)
  out["score"] = sd((b,), jnp.float32)
  return out


def _model_config(config) -> LlamaConfig:
  """The policy config: ``init_from``'s ``params.json`` when present, else ``config.model``
  (vocab ``config.model.vocab_size`` or Llama 2's 32,000)."""
  init_from = config.get("init_from", "")
  if init_from and os.path.exists(os.path.join(init_from, "params.json")):
    return build.model_config(config)
  from llama_jax.rs_run import copy_config  # pylint: disable=import-outside-toplevel
  sub = copy_config(config)
  sub.init_from = ""
  return build.model_config(sub, config.model.vocab_size or 32000)


def abstract_step_inputs(config):
  """(Setup, abstract PPOState, abstract experience, abstract rng) for ``config``'s mesh, without
  reading any checkpoint (the policy, value and reward models share ``config.model``'s shapes
  unless ``init_from`` points at a ``params.json``)."""
  validate(config)
  cfg = _model_config(config)
  mesh, rules = build.mesh_and_rules(config)
  setup = Setup(config, cfg, cfg, cfg, mesh, rules)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=setup.replicated)
  return setup, setup.abstract_state(), abstract_experience(config, setup.batch_sharding), rng


def lower_ppo_step(config):
  """AOT-lower the jitted PPO update (one iteration: every minibatch step of policy and value) for
  ``config``'s mesh; returns the ``jax.stages.Lowered`` (``.compile().memory_analysis()``)."""
  setup, state, exp, rng = abstract_step_inputs(config)
  return setup.update.lower(state, exp, rng)


# ---- data ------------------------------------------------------------------------------------------
class Prompts:
  """Tokenized, left-padded prompts; ``batch(i)`` = this process's rows of iteration ``i``."""

  def __init__(self, records, tokenizer, max_prompt_len: int, field: str):
    ex = [pipeline.prompt_example(r, tokenizer, max_prompt_len) for r in records]
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


# ---- the stage ---------------------------------------------------------------------------------------
def _read_progress(workdir: str) -> dict:
  path = os.path.join(workdir, PROGRESS)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"best": None, "best_iteration": None, "bad_evals": 0, "stopped_early": False}


def _value_init(config, setup: Setup, value_from: str):
  """Value params: a reward model (``ppo.value_from``, default ``ppo.help_rm``) or a policy
  checkpoint (``output`` dropped, a head added), with the head zeroed when
  ``ppo.value_head_init == "zero"`` (:func:`ppo.reset_value_head`)."""
  shardings = jax.tree.map(lambda s: s.sharding, setup.value.abstract_params)
  if reward.is_reward_model(value_from):
    params = stage_lib.restore_params(value_from, setup.value.abstract_params)
  else:
    llama = stage_lib.restore_params(value_from, sharding.abstract_params(
        setup.vcfg, setup.mesh, setup.rules))
    params = jax.jit(reward.init_reward_params, out_shardings=shardings)(
        llama, jax.random.key(config.seed + 1))
  if config.ppo.get("value_head_init", "zero") == "zero":
    params = jax.jit(ppo.reset_value_head, out_shardings=shardings)(params)
  return params


def _rollout_rc(setup: Setup, scorer, rms, batch, gen, prompts: Prompts, idx, tokenizer):
  """([b] Rc on device, stats of host floats) from the reward models (jitted) or the oracle."""
  if scorer.kind == "rm":
    rc, rstats = setup.rewards(rms[0], rms[1], batch, gen)
    return rc, {k: float(np.mean(np.asarray(v))) for k, v in jax.device_get(rstats).items()}
  texts = sampling.decode(gen, tokenizer)
  rc = scorer([prompts.messages[i] for i in idx], texts, prompts.is_safety[idx])["rc"]
  return jnp.asarray(rc, jnp.float32), {}


def run(config, workdir: str) -> dict:
  """Run PPO per ``config`` in ``workdir`` (resuming from its latest checkpoint).

  Returns:
    dict with ``iterations``, ``finished``, ``stopped_early``, ``improved`` (a held-out
    evaluation after iteration 0 beat the starting policy), ``best_iteration``, the best held-out
    evaluation and, when finished, ``final_dir`` (the best evaluated policy).
  Raises:
    ValueError / FileNotFoundError: on bad config fields or missing checkpoints, before step 0.
  """
  c = config.ppo
  with stage_lib.clean_on_failure(workdir):
    validate(config)
    if not config.get("init_from", ""):
      raise ValueError("ppo: config.init_from (the policy checkpoint) is empty")
    tokenizer = build.tokenizer(config, workdir)
    cfg = build.model_config(config)
    tokenizer.check_vocab(cfg)
    scorer = scoring.make_scorer(config, "ppo", tokenizer)
    if scorer.kind == "oracle" and jax.process_count() > 1:
      raise ValueError("config.ppo.reward='oracle' runs in a single process")
    value_from = c.value_from or c.help_rm or config.init_from
    vcfg = LlamaConfig.from_params_json(os.path.join(value_from, "params.json"))
    vcfg = vcfg.replace(**{k: config.model[k] for k in build.EXEC_FIELDS})
    if c.max_prompt_len + c.max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"config.ppo.max_prompt_len + max_new_tokens exceeds the model's "
                       f"max_seq_len={cfg.max_seq_len}")
    if c.get("sft_from", "") and not os.path.isdir(c.sft_from):
      raise FileNotFoundError(f"config.ppo.sft_from: {c.sft_from!r} not found")
    mesh, rules = build.mesh_and_rules(config)
    setup = Setup(config, cfg, vcfg, scorer.rms[0] if scorer.rms else None, mesh, rules)
    train_prompts = Prompts(prompts_lib.load_prompts(config, workdir, "train", c.num_prompts,
                                                     stream=int(c.get("prompt_stream", -1))),
                            tokenizer, c.max_prompt_len, "ppo train prompts")
    eval_prompts = Prompts(prompts_lib.load_prompts(
        config, workdir, "held_out", c.eval_prompts, stream=prompts_lib.SELECTION_STREAM,
        distinct=True), tokenizer, c.max_prompt_len, "ppo held-out prompts")
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  build.write_json(os.path.join(workdir, "data_stats.json"),
                   {"train_prompts": len(train_prompts), "train_dropped": train_prompts.dropped,
                    "held_out_prompts": len(eval_prompts)})
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 0, config.train.keep_checkpoints,
                      config.train.async_checkpoint)
  ref = stage_lib.restore_params(config.init_from, setup.policy.abstract_params)
  sft = (stage_lib.restore_params(c.sft_from, setup.policy.abstract_params)
         if c.get("sft_from", "") else None)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(setup.abstract_state())
    start = ckpt.latest_step()
  else:
    state = ppo.PPOState(
        setup.policy.fresh_state(lambda: stage_lib.restore_params(config.init_from,
                                                                  setup.policy.abstract_params)),
        setup.value.fresh_state(lambda: _value_init(config, setup, value_from)))
    start = 0
  rms, eval_scorer = (None, None), scorer
  if scorer.kind == "rm":
    rms = (jax.device_put(scorer.rms[1], setup.replicated),
           None if scorer.rms[2] is None else jax.device_put(scorer.rms[2], setup.replicated))
    eval_scorer = scoring.Scorer("rm", tokenizer, (scorer.rms[0], *rms),
                                 threshold=scorer.threshold)
  held_out = HeldOut(config, setup, eval_prompts, tokenizer, eval_scorer, ref, sft)
  progress = _read_progress(workdir)
  writer = MetricWriter(os.path.join(workdir, "logs"))
  put = build.put_batch_fn(mesh, rules)
  stop = StopSignal()
  end = c.num_iterations
  if config.train.stop_after_steps > 0:
    end = min(end, start + config.train.stop_after_steps)
  base_key = jax.random.key(config.seed)
  it = start

  def evaluate(iteration):
    ev = held_out(state.policy.params,
                  sharding.to_generation_layout(state.policy.params, cfg, mesh))
    writer.write(iteration, ev, "eval")
    if progress["best"] is None or ev["reward"] > progress["best"]:
      progress.update(best=ev["reward"], best_iteration=iteration, bad_evals=0, best_eval=ev)
      stage_lib.export_params(workdir, cfg, state.policy.params, "best")
    else:
      progress["bad_evals"] += 1
    progress.setdefault("evals", []).append({"iteration": iteration, **ev})
    log.info("ppo eval @%d: reward %.4f%s kl_ref %.3f (best %.4f @%s)", iteration, ev["reward"],
             f" gold {ev['gold']:.4f}" if "gold" in ev else "", ev["kl_ref"], progress["best"],
             progress["best_iteration"])

  def save(iteration):
    ckpt.save(iteration, state)
    ckpt.wait()
    build.write_json(os.path.join(workdir, PROGRESS), progress)

  try:
    if start == 0 and c.eval_every > 0 and progress["best"] is None:
      evaluate(0)
    while it < end and not progress["stopped_early"]:
      if stop.requested:
        log.warning("SIGTERM: saving PPO at iteration %d", it)
        break
      key = jax.random.fold_in(base_key, it)
      host_batch, idx = train_prompts.batch(config.seed, it, c.batch_size)
      batch = put(host_batch)
      t0 = time.perf_counter()
      gen_params = sharding.to_generation_layout(state.policy.params, cfg, mesh)
      with sharding.activate(mesh, sharding.GENERATION_RULES):
        gen = sampling.sample(gen_params, batch["prompt_tokens"], batch["prompt_mask"],
                              jax.random.fold_in(key, 0), cfg=cfg, max_new_tokens=c.max_new_tokens,
                              temperature=float(c.temperature), eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id)
        gen = jax.block_until_ready(gen)
      del gen_params
      t1 = time.perf_counter()
      with sharding.activate(mesh, rules):
        rc, rstats = _rollout_rc(setup, scorer, rms, batch, gen, train_prompts, idx, tokenizer)
        exp, stats = setup.experience(state.policy.params, ref, state.value.params, batch, gen, rc)
        exp = jax.block_until_ready(exp)
      t2 = time.perf_counter()
      state, upd = setup.update(state, exp, jax.random.fold_in(key, 1))
      upd = jax.device_get(upd)
      t3 = time.perf_counter()
      it += 1
      stats = jax.device_get(stats)
      m = {"reward_raw": stats["rc"], "reward_whitened": stats["score"], "kl": stats["kl"],
           "non_score_reward": stats["non_score_reward"], "response_length": stats["response_length"],
           "eos_rate": stats["finished"], **rstats,
           "approxkl": upd["approxkl"], "clipfrac": upd["clipfrac"], "entropy": upd["entropy"],
           "policy_loss": upd["policy_loss"], "value_loss": upd["value_loss"],
           "vf_clipfrac": upd["vf_clipfrac"], "ratio": upd["ratio"], "kl_policy": upd["kl"],
           "value": upd["value"], "policy_grad_norm": upd["policy_grad_norm"],
           "value_grad_norm": upd["value_grad_norm"],
           "time_generation": t1 - t0, "time_scoring": t2 - t1, "time_training": t3 - t2}
      writer.write(it, m, "train")
      log.info("ppo %d/%d: reward %.4f kl %.4f approxkl %.4g clipfrac %.3f vf_loss %.4f len %.1f "
               "(gen %.2fs score %.2fs train %.2fs)", it, c.num_iterations, m["reward_raw"],
               m["kl"], m["approxkl"], m["clipfrac"], m["value_loss"], m["response_length"],
               t1 - t0, t2 - t1, t3 - t2)
      if c.eval_every > 0 and it % c.eval_every == 0:
        evaluate(it)
        if c.patience > 0 and progress["bad_evals"] >= c.patience:
          progress["stopped_early"] = True
          log.info("ppo: early stop at iteration %d (best %s)", it, progress["best_iteration"])
      if (c.checkpoint_every > 0 and it % c.checkpoint_every == 0) or progress["stopped_early"]:
        save(it)
    if it not in ckpt.all_steps():
      save(it)
  finally:
    stop.restore()
  ckpt.close()
  finished = it >= c.num_iterations or progress["stopped_early"]
  improved = bool(progress["best_iteration"])
  out: dict[str, Any] = {"iterations": it, "num_iterations": c.num_iterations,
                         "finished": finished, "stopped_early": progress["stopped_early"],
                         "stopped": stop.requested, "best_iteration": progress["best_iteration"],
                         "improved": improved, "reward": scorer.kind,
                         "eval": progress.get("best_eval", {})}
  if finished:
    if c.eval_every > 0 and not improved:
      log.warning("ppo: no held-out evaluation beat the starting policy (iteration 0); final/ is "
                  "the starting policy. Raise ppo.lr or num_iterations, or check the reward.")
    final = os.path.join(workdir, stage_lib.FINAL)
    best = os.path.join(workdir, "best")
    if jax.process_index() == 0 and os.path.exists(final):
      shutil.rmtree(final)
    if os.path.isdir(best):
      if jax.process_index() == 0:
        shutil.copytree(best, final)
    else:
      stage_lib.export_params(workdir, cfg, state.policy.params)
    out["final_dir"] = final
    build.write_json(os.path.join(workdir, "result.json"), out)
  writer.close()
  return out
