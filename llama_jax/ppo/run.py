"""The PPO stage: rollouts on a generation layout, RM scoring, clipped PPO updates, early stopping.

Llama 2 paper, Sec. 3.2.3; Huang et al. 2024 (arXiv 2403.17031). ``python train.py
--config=configs/ppo_tiny.py --config.init_from=<rs>/final --config.ppo.help_rm=<rm>/final ...``
(the pipeline stage sets these). Pieces:

* policy from ``config.init_from``; reference pi_0 = the same checkpoint, frozen; value model from
  ``ppo.value_from`` (default the helpfulness RM) with its head zeroed (``ppo.value_head_init``);
  both RMs frozen; ``ppo.reward = "oracle"`` replaces them by the world's judge (the gold-reward
  control, ``llama_jax.reward.scoring``).
* each iteration: ``ppo.batch_size`` prompts drawn with a seed of (``config.seed``, iteration),
  so a resumed run sees the same prompts; the policy is copied to ``sharding.GENERATION_RULES``
  (tensor-parallel, no FSDP split) for sampling and the copy dropped after; ``ppo.make_experience``
  scores the rollouts; ``ppo.ppo_update`` takes one step per minibatch (``ppo.rollout``: the
  jitted functions, prompts, rewards and the held-out evaluation).
* the stage skeleton (``train.stage``) runs it: one step = one iteration, so checkpoints,
  SIGTERM/SIGINT, ``train.stop_after_steps`` (counting iterations), resume and ``result.json``
  are those of every stage.
* metrics per iteration in ``<workdir>/logs`` (split ``train``): ``reward_raw`` (mean Rc),
  ``r_help``, ``r_safe``, ``reward_whitened`` (mean R~c after the EOS trick), ``kl`` (rollout KL
  to pi_0, summed over tokens), ``approxkl``, ``clipfrac``, ``entropy``, ``policy_loss``,
  ``value_loss``, ``response_length``, ``eos_rate``, ``time_generation`` / ``time_scoring`` /
  ``time_training`` (seconds), ``sampled_tokens`` / ``real_tokens`` (the iteration's response
  tokens; the rollouts' non-padding tokens x ``ppo.epochs``) with their running totals
  ``tokens_sampled`` / ``tokens_trained`` (also in ``result.json``); held-out evaluation (split
  ``eval``, :class:`HeldOut`) every ``ppo.eval_every`` iterations: mean reward of sampled
  completions at the PPO temperature, KL to the reference and to SFT, and on the world the
  oracle's gold reward and helpfulness.
* early stopping: after ``ppo.patience`` evaluations without a better held-out reward the run
  stops; ``final/`` is the best evaluated policy (``best/`` while running); ``result.json``'s
  ``improved`` says whether any evaluation beat the starting policy.
* checkpoints (``PPOState``: policy and value train states) every ``ppo.checkpoint_every``
  iterations, at an early stop, at the end and on SIGTERM, with ``ppo_progress.json`` beside.

``--dry_run`` plans ``ppo.ppo_train_step`` on one minibatch, the rollouts and the scoring pass
(:meth:`PPOStage.abstract_steps`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp

from llama_jax import sampling, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import prompts as prompts_lib
from llama_jax.ppo import rollout
from llama_jax.ppo import step as ppo
from llama_jax.reward import scoring
from llama_jax.train import build, settings
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd
from llama_jax.train.checkpoint import restore_params
from llama_jax.train.loop import LoopResult

log = logging.getLogger(__name__)
PROGRESS = "ppo_progress.json"


class PromptBatches:
  """The prompt batch of each iteration (seeded by ``config.seed`` and the iteration, so a
  resumed run sees the same prompts): yields ``(rows, prompt indices)``; ``seek(i)`` after a
  restore."""

  def __init__(self, prompts: rollout.Prompts, seed: int, batch_size: int):
    self.prompts, self.seed, self.batch_size, self.iteration = prompts, seed, batch_size, 0

  def seek(self, iteration: int) -> None:
    self.iteration = iteration

  def __iter__(self):
    return self

  def __next__(self):
    out = self.prompts.batch(self.seed, self.iteration, self.batch_size)
    self.iteration += 1
    return out


class Iteration:
  """One PPO iteration as the skeleton's step ``(state, (rows, idx), key) -> (state, metrics)``:
  sample on the generation layout, score (reward models or oracle), make the experience, update.
  Metrics: ``make_experience``'s and ``ppo_update``'s names, the reward models' ``r_help`` /
  ``r_safe``, and ``time_generation`` / ``time_scoring`` / ``time_training`` (seconds)."""

  def __init__(self, config, setup: rollout.Setup, tokenizer, scorer, rms, ref, prompts):
    self.c, self.setup, self.tok, self.scorer = config.ppo, setup, tokenizer, scorer
    self.rms, self.ref, self.prompts = rms, ref, prompts
    self.put = build.put_batch_fn(setup.mesh, setup.rules)

  def _sample(self, state, batch, key):
    """(rollouts, state): the policy copied to the generation layout, the train state parked in
    host memory meanwhile with ``ppo.offload_state`` (and brought back)."""
    cfg, mesh = self.setup.cfg, self.setup.mesh
    gen_params = sharding.to_generation_layout(state.policy.params, cfg, mesh)
    if self.c.offload_state:
      state = sharding.move_to_memory(state, "pinned_host")
    b = batch["prompt_tokens"].shape[0]
    chunk = int(self.c.get("generation_batch_size", 0)) or b
    parts = []
    with sharding.activate(mesh, sharding.GENERATION_RULES):
      for i, start in enumerate(range(0, b, chunk)):  # one chunk of rows at a time (KV cache)
        rows = slice(start, start + chunk)
        parts.append(jax.block_until_ready(sampling.sample(
            gen_params, batch["prompt_tokens"][rows], batch["prompt_mask"][rows],
            key if chunk == b else jax.random.fold_in(key, i), cfg=cfg,
            max_new_tokens=self.c.max_new_tokens, temperature=float(self.c.temperature),
            eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)))
    gen = parts[0] if len(parts) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *parts)
    del gen_params
    if self.c.offload_state:
      state = sharding.move_to_memory(state, "device")
    return gen, state

  def __call__(self, state, batch, key):
    rows, idx = batch
    batch = self.put(rows)
    t0 = time.perf_counter()
    gen, state = self._sample(state, batch, jax.random.fold_in(key, 0))
    t1 = time.perf_counter()
    with sharding.activate(self.setup.mesh, self.setup.rules):
      rc, rstats = rollout.rollout_rc(self.setup, self.scorer, self.rms, batch, gen,
                                      self.prompts, idx, self.tok)
      exp, stats = self.setup.experience(state.policy.params, self.ref, state.value.params,
                                         batch, gen, rc)
      exp = jax.block_until_ready(exp)
    t2 = time.perf_counter()
    # For the running totals (Run.totals): response tokens sampled, and the rollouts' non-padding
    # tokens times the passes the update makes over them.
    counts = {"sampled_tokens": float(jnp.sum(gen.lengths)),
              "real_tokens": float(jnp.sum(exp["segment_ids"] > 0)) * self.setup.ppo_cfg.epochs}
    state, upd = self.setup.update(state, exp, jax.random.fold_in(key, 1))
    upd = jax.device_get(upd)
    t3 = time.perf_counter()
    stats = jax.device_get(stats)
    m = {k: float(stats[k]) for k in ("reward_raw", "reward_whitened", "kl", "non_score_reward",
                                      "response_length", "eos_rate")}
    m.update(rstats)
    m.update({k: float(v) for k, v in upd.items() if k not in ("skipped", "steps")})
    m.update(time_generation=t1 - t0, time_scoring=t2 - t1, time_training=t3 - t2)
    m.update(counts)
    return state, m


class Selection:
  """Checkpoint selection and early stopping on held-out evaluations (``rollout.HeldOut``): the
  best evaluated policy in ``best/``, patience, and ``ppo_progress.json`` beside checkpoints."""

  def __init__(self, config, workdir: str, cfg: LlamaConfig, held_out: rollout.HeldOut,
               reward_kind: str):
    self.c, self.workdir, self.cfg, self.held_out = config.ppo, workdir, cfg, held_out
    self.reward_kind = reward_kind
    self.progress = wd.read_json(os.path.join(workdir, PROGRESS), default={
        "best": None, "best_iteration": None, "bad_evals": 0, "stopped_early": False})

  def evaluate(self, state, iteration: int) -> dict:
    ev = self.held_out(state.policy.params, sharding.to_generation_layout(
        state.policy.params, self.cfg, self.held_out.setup.mesh))
    p = self.progress
    if p["best"] is None or ev["reward"] > p["best"]:
      p.update(best=ev["reward"], best_iteration=iteration, bad_evals=0, best_eval=ev)
      wd.export_params(self.workdir, self.cfg, state.policy.params, "best")
    else:
      p["bad_evals"] += 1
    p.setdefault("evals", []).append({"iteration": iteration, **ev})
    log.info("ppo eval @%d: reward %.4f%s kl_ref %.3f (best %.4f @%s)", iteration, ev["reward"],
             f" gold {ev['gold']:.4f}" if "gold" in ev else "", ev["kl_ref"], p["best"],
             p["best_iteration"])
    return ev

  def should_stop(self) -> bool:
    """True once ``ppo.patience`` evaluations in a row did not beat the best (remembered)."""
    if self.c.patience > 0 and self.progress["bad_evals"] >= self.c.patience:
      self.progress["stopped_early"] = True
    return bool(self.progress["stopped_early"])

  def save(self, iteration: int) -> None:
    del iteration
    wd.write_json(os.path.join(self.workdir, PROGRESS), self.progress)

  def export(self, state) -> str:
    """``final/``: the best evaluated policy, or the last one without evaluations."""
    if self.c.eval_every > 0 and not self.progress["best_iteration"]:
      log.warning("ppo: no held-out evaluation beat the starting policy (iteration 0); final/ is "
                  "the starting policy. Raise ppo.lr or num_iterations, or check the reward.")
    best = os.path.join(self.workdir, "best")
    if os.path.isdir(best):
      return wd.copy_final(best, self.workdir)
    return wd.export_params(self.workdir, self.cfg, state.policy.params)

  def result(self, res: LoopResult) -> Dict[str, Any]:
    p = self.progress
    return {"best_iteration": p["best_iteration"], "improved": bool(p["best_iteration"]),
            "reward": self.reward_kind, "eval": p.get("best_eval", res.last_eval)}


def _models(config, workdir: str):
  """(tokenizer, policy cfg, scorer, value_from, value cfg), checked."""
  c = config.ppo
  rollout.validate(config)
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
  return tokenizer, cfg, scorer, value_from, vcfg


def _prompts(config, workdir: str, tokenizer):
  c = config.ppo
  train = rollout.Prompts(prompts_lib.load_prompts(config, workdir, "train", c.num_prompts,
                                                   stream=int(c.get("prompt_stream", -1))),
                          tokenizer, c.max_prompt_len, "ppo train prompts")
  held_out = rollout.Prompts(prompts_lib.load_prompts(
      config, workdir, "held_out", c.eval_prompts, stream=prompts_lib.SELECTION_STREAM,
      distinct=True), tokenizer, c.max_prompt_len, "ppo held-out prompts")
  return train, held_out


class PPOStage(stage_lib.TrainingStage):
  """Stage ``ppo`` (module docstring). ``result.json``: ``steps`` (iterations), ``finished``,
  ``stopped_early``, ``improved`` (a held-out evaluation after iteration 0 beat the starting
  policy), ``best_iteration``, ``reward`` (``rm`` / ``oracle``), ``eval`` (the best held-out
  evaluation), ``final_dir``."""

  name = "ppo"

  def prepare(self, config, workdir: str) -> stage_lib.Run:
    c = config.ppo
    tokenizer, cfg, scorer, value_from, vcfg = _models(config, workdir)
    mesh, rules = build.mesh_and_rules(config)
    setup = rollout.Setup(config, cfg, vcfg, scorer.rms.cfg if scorer.rms else None, mesh, rules)
    train_prompts, eval_prompts = _prompts(config, workdir, tokenizer)
    ref = restore_params(config.init_from, setup.policy.abstract_params)
    sft = restore_params(c.sft_from, setup.policy.abstract_params) if c.get("sft_from", "") else None
    rms, eval_scorer = None, scorer
    if scorer.kind == "rm":
      rms = scorer.rms.on_device(setup.replicated)
      eval_scorer = scoring.Scorer("rm", tokenizer, rms, threshold=scorer.threshold)
    selection = Selection(config, workdir, cfg, rollout.HeldOut(
        config, setup, eval_prompts, tokenizer, eval_scorer, ref, sft), scorer.kind)
    # The policy starts as a copy of the reference (init_from is read and verified once; a copy,
    # because the policy's state is donated to every update and the reference stays frozen).
    init_state = lambda: ppo.PPOState(
        setup.policy.fresh_state(lambda: jax.tree.map(jnp.copy, ref)),
        setup.value.fresh_state(lambda: rollout.value_init(config, setup, value_from)))
    train = settings.read(config, "train", settings.Train)
    base_key = jax.random.key(config.seed)
    return stage_lib.Run(
        cfg=cfg, total_steps=int(c.num_iterations),
        step_fn=Iteration(config, setup, tokenizer, scorer, rms, ref, train_prompts),
        batches=PromptBatches(train_prompts, config.seed, c.batch_size),
        abstract_state=setup.abstract_state(), init_state=init_state,
        rng_fn=lambda state, step: jax.random.fold_in(base_key, step),
        evaluate=selection.evaluate if c.eval_every > 0 else None, eval_every=int(c.eval_every),
        eval_at_start=selection.progress["best"] is None, final_eval=False,
        should_stop=selection.should_stop, on_save=selection.save, export=selection.export,
        result=selection.result, desc="ppo", tokens_key="", progress_key="reward_raw",
        totals={"real_tokens": "tokens_trained", "sampled_tokens": "tokens_sampled"},
        data_stats={"train_prompts": len(train_prompts), "train_dropped": train_prompts.dropped,
                    "held_out_prompts": len(eval_prompts)},
        checkpoint_every=int(c.checkpoint_every), log_every=1,
        stop_after_steps=train.stop_after_steps,
        max_nonfinite_steps=train.max_nonfinite_steps, stop_grace_s=train.stop_grace_s)

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """``ppo.ppo_train_step`` on one minibatch, the rollouts (``sampling.sample`` of
    ``ppo.batch_size`` prompts on the generation layout) and the scoring pass
    (``rollout.plan_scoring``); the value and reward models are assumed to have the policy's
    shape."""
    cfg = build.planning_model_config(config)
    rollout.check_plan(config, cfg, mesh)
    setup = rollout.Setup(config, cfg, cfg, cfg, mesh, sharding.DEFAULT_RULES)
    state = setup.abstract_state()
    mb = rollout.abstract_experience(config, setup.batch_sharding, rows=int(config.ppo.minibatch_size),
                                     keys=rollout.MINIBATCH_KEYS)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=setup.replicated)
    t0 = time.perf_counter()
    lowered = setup.minibatch_step.lower(state, mb, rng)
    train = stage_lib.StepPlan(
        "ppo.ppo_train_step (one minibatch)", lowered, setup.ppo_cfg.grad_accum_steps,
        {k: v.shape for k, v in mb.items()},
        state.policy.params, state.policy.opt_state, lower_s=time.perf_counter() - t0,
        detail={"value model state": stage_lib.shard_bytes(state.value)})
    return [train, rollout.plan_rollouts(config, setup, state),
            *rollout.plan_scoring(config, setup, state)]


STAGE = PPOStage()


def run(config, workdir: str) -> dict:
  """Run PPO per ``config`` in ``workdir`` (resuming from its latest checkpoint): ``STAGE.run``.

  Returns:
    ``result.json``'s dict (:class:`PPOStage`).
  Raises:
    ValueError / FileNotFoundError: on bad config fields or missing checkpoints, before step 0.
  """
  return STAGE.run(config, workdir)
