"""The PPO stage: rollouts on a generation layout, RM scoring, clipped PPO updates, early stopping.

Llama 2 paper, Sec. 3.2.3; Huang et al. 2024 (arXiv 2403.17031). ``python train.py
--config=configs/ppo_tiny.py --config.init_from=<rs>/final --config.ppo.help_rm=<rm>/final ...``
(the pipeline stage sets these). Pieces:

* policy from ``config.init_from``; reference pi_0 = the same checkpoint, frozen; value model from
  ``ppo.value_from`` (default the helpfulness RM); both RMs frozen.
* each iteration: ``ppo.batch_size`` prompts drawn with a seed of (``config.seed``, iteration),
  so a resumed run sees the same prompts; the policy is copied to ``sharding.GENERATION_RULES``
  (tensor-parallel, no FSDP split) for sampling and the copy dropped after; ``ppo.make_experience``
  scores the rollouts; ``ppo.ppo_update`` takes one step per minibatch.
* metrics per iteration in ``<workdir>/logs`` (split ``train``): ``reward_raw`` (mean Rc),
  ``r_help``, ``r_safe``, ``reward_whitened`` (mean R~c after the EOS trick), ``kl`` (rollout KL
  to pi_0, summed over tokens), ``approxkl``, ``clipfrac``, ``entropy``, ``policy_loss``,
  ``value_loss``, ``response_length``, ``eos_rate``, ``time_generation`` / ``time_scoring`` /
  ``time_training`` (seconds); held-out evaluation (split ``eval``) every ``ppo.eval_every``
  iterations: mean combined reward of greedy completions (+ oracle helpfulness on the world).
* early stopping: after ``ppo.patience`` evaluations without a better held-out reward the run
  stops; ``final/`` is the best evaluated policy (``best/`` while running).
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

from llama_jax import build, evaluation, optim, ppo, reward, rl, sampling, sharding, stage_lib
from llama_jax.checkpoint import Checkpointer, StopSignal
from llama_jax.config import LlamaConfig
from llama_jax.data import pipeline
from llama_jax.metrics import MetricWriter
from llama_jax.rs_run import load_prompts, load_reward_models

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
  ppo_config(config)


class Setup:
  """Shardings and jitted functions of PPO for one mesh (shape-first, nothing allocated).

  Attributes:
    policy, value: ``stage_lib.StateSetup`` of the two optimized models.
    state_shardings: ``PPOState`` of shardings. update: the jitted ``ppo.ppo_update``
      (state donated). experience: the jitted ``ppo.make_experience``.
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
                                                reward_cfg=rcfg, value_cfg=vcfg))

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

  def batch(self, seed: int, iteration: int, global_batch: int) -> dict:
    rng = np.random.default_rng([seed, iteration])
    idx = rng.choice(len(self), global_batch, replace=len(self) < global_batch)
    local = global_batch // jax.process_count()
    return self.rows(idx[jax.process_index() * local:(jax.process_index() + 1) * local])


# ---- evaluation ------------------------------------------------------------------------------------
class HeldOut:
  """Mean combined reward (and world oracle) of greedy completions of held-out prompts."""

  def __init__(self, config, setup: Setup, prompts: Prompts, tokenizer, rms):
    self.config, self.setup, self.prompts, self.tok = config, setup, prompts, tokenizer
    self.rcfg, self.help, self.safe = rms
    self.score = jax.jit(functools.partial(reward.score, cfg=self.rcfg, probability=True))

  def __call__(self, gen_params) -> dict:
    c = self.config.ppo
    rows = self.prompts.rows(np.arange(len(self.prompts)))
    with sharding.activate(self.setup.mesh, sharding.GENERATION_RULES):
      gen = sampling.sample(gen_params, rows["prompt_tokens"], rows["prompt_mask"],
                            jax.random.key(0), cfg=self.setup.cfg, max_new_tokens=c.max_new_tokens,
                            temperature=0.0, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    ro = ppo.rollout_tensors(jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"]),
                             gen)
    r_help = np.asarray(self.score(self.help, tokens=ro["tokens"], mask=ro["mask"]))
    out = {"r_help": float(r_help.mean()), "eos_rate": float(np.mean(np.asarray(gen.finished)))}
    rc = r_help
    if self.safe is not None:
      r_safe = np.asarray(self.score(self.safe, tokens=ro["tokens"], mask=ro["mask"]))
      rc = np.asarray(rl.combined_reward(r_help, r_safe, rows["is_safety"], c.safety_threshold))
      out["r_safe"] = float(r_safe.mean())
    out["reward"] = float(rc.mean())
    if self.config.tokenizer.path == "world":
      toks, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
      texts = [self.tok.decode(toks[i, :lens[i]].tolist()).strip() for i in range(len(toks))]
      rep = evaluation.oracle_report(self.prompts.messages, texts)
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


def run(config, workdir: str) -> dict:
  """Run PPO per ``config`` in ``workdir`` (resuming from its latest checkpoint).

  Returns:
    dict with ``iterations``, ``finished``, ``stopped_early``, the best held-out evaluation and,
    when finished, ``final_dir`` (the best evaluated policy).
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
    rms = load_reward_models(c.help_rm, c.safety_rm, "config.ppo")
    value_from = c.value_from or c.help_rm
    vcfg = LlamaConfig.from_params_json(os.path.join(value_from, "params.json"))
    vcfg = vcfg.replace(**{k: config.model[k] for k in build.EXEC_FIELDS})
    if c.max_prompt_len + c.max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"config.ppo.max_prompt_len + max_new_tokens exceeds the model's "
                       f"max_seq_len={cfg.max_seq_len}")
    mesh, rules = build.mesh_and_rules(config)
    setup = Setup(config, cfg, vcfg, rms[0], mesh, rules)
    train_prompts = Prompts(load_prompts(config, workdir, "train", c.num_prompts), tokenizer,
                            c.max_prompt_len, "ppo train prompts")
    eval_prompts = Prompts(load_prompts(config, workdir, "held_out", c.eval_prompts), tokenizer,
                           c.max_prompt_len, "ppo held-out prompts")
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  build.write_json(os.path.join(workdir, "data_stats.json"),
                   {"train_prompts": len(train_prompts), "train_dropped": train_prompts.dropped,
                    "held_out_prompts": len(eval_prompts)})
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 0, config.train.keep_checkpoints,
                      config.train.async_checkpoint)
  ref = stage_lib.restore_params(config.init_from, setup.policy.abstract_params)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(setup.abstract_state())
    start = ckpt.latest_step()
  else:
    state = ppo.PPOState(
        setup.policy.fresh_state(lambda: stage_lib.restore_params(config.init_from,
                                                                  setup.policy.abstract_params)),
        setup.value.fresh_state(lambda: stage_lib.restore_params(value_from,
                                                                 setup.value.abstract_params)))
    start = 0
  help_p = jax.device_put(rms[1], setup.replicated)
  safe_p = None if rms[2] is None else jax.device_put(rms[2], setup.replicated)
  held_out = HeldOut(config, setup, eval_prompts, tokenizer, (rms[0], help_p, safe_p))
  progress = _read_progress(workdir)
  writer = MetricWriter(os.path.join(workdir, "logs"))
  put = build.put_batch_fn(mesh, rules)
  stop = StopSignal()
  end = c.num_iterations
  if config.train.stop_after_steps > 0:
    end = min(end, start + config.train.stop_after_steps)
  base_key = jax.random.key(config.seed)
  it = start

  def evaluate(iteration, gen_params):
    ev = held_out(gen_params)
    writer.write(iteration, ev, "eval")
    if progress["best"] is None or ev["reward"] > progress["best"]:
      progress.update(best=ev["reward"], best_iteration=iteration, bad_evals=0, best_eval=ev)
      stage_lib.export_params(workdir, cfg, state.policy.params, "best")
    else:
      progress["bad_evals"] += 1
    log.info("ppo eval @%d: %s (best %.4f @%s)", iteration, ev, progress["best"],
             progress["best_iteration"])

  def save(iteration):
    ckpt.save(iteration, state)
    ckpt.wait()
    build.write_json(os.path.join(workdir, PROGRESS), progress)

  try:
    if start == 0 and c.eval_every > 0 and progress["best"] is None:
      evaluate(0, sharding.to_generation_layout(state.policy.params, cfg, mesh))
    while it < end and not progress["stopped_early"]:
      if stop.requested:
        log.warning("SIGTERM: saving PPO at iteration %d", it)
        break
      key = jax.random.fold_in(base_key, it)
      batch = put(train_prompts.batch(config.seed, it, c.batch_size))
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
        exp, stats = setup.experience(state.policy.params, ref, state.value.params, help_p, safe_p,
                                      batch, gen)
        exp = jax.block_until_ready(exp)
      t2 = time.perf_counter()
      state, upd = setup.update(state, exp, jax.random.fold_in(key, 1))
      upd = jax.device_get(upd)
      t3 = time.perf_counter()
      it += 1
      stats = jax.device_get(stats)
      m = {"reward_raw": stats["rc"], "r_help": stats["r_help"],
           "reward_whitened": stats["score"], "kl": stats["kl"],
           "non_score_reward": stats["non_score_reward"], "response_length": stats["response_length"],
           "eos_rate": stats["finished"], "safety_used": stats["safety_used"],
           "approxkl": upd["approxkl"], "clipfrac": upd["clipfrac"], "entropy": upd["entropy"],
           "policy_loss": upd["policy_loss"], "value_loss": upd["value_loss"],
           "vf_clipfrac": upd["vf_clipfrac"], "ratio": upd["ratio"], "kl_policy": upd["kl"],
           "policy_grad_norm": upd["policy_grad_norm"], "value_grad_norm": upd["value_grad_norm"],
           "time_generation": t1 - t0, "time_scoring": t2 - t1, "time_training": t3 - t2}
      if "r_safe" in stats:
        m["r_safe"] = stats["r_safe"]
      writer.write(it, m, "train")
      log.info("ppo %d/%d: reward %.4f kl %.4f approxkl %.4g clipfrac %.3f len %.1f "
               "(gen %.2fs score %.2fs train %.2fs)", it, c.num_iterations, m["reward_raw"],
               m["kl"], m["approxkl"], m["clipfrac"], m["response_length"], t1 - t0, t2 - t1,
               t3 - t2)
      if c.eval_every > 0 and it % c.eval_every == 0:
        evaluate(it, sharding.to_generation_layout(state.policy.params, cfg, mesh))
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
  out: dict[str, Any] = {"iterations": it, "num_iterations": c.num_iterations,
                         "finished": finished, "stopped_early": progress["stopped_early"],
                         "stopped_by_signal": stop.requested, "best_iteration":
                         progress["best_iteration"], "eval": progress.get("best_eval", {})}
  if finished:
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
