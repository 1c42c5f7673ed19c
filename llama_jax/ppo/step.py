"""PPO for Llama-2-Chat: state, pure rollout processing and the pure, top-level train step.

Llama 2 paper, Sec. 3.2.3: maximize ``E[R(g|p)]`` with ``R = R~c - beta * KL(pi || pi_0)``,
``R~c = WHITEN(LOGIT(Rc))``, clip 0.2, minibatch 64 of a 512-prompt batch, one gradient step per
minibatch. Practice from Huang et al. 2024 ("The N+ implementation details of RLHF with PPO") and
TRL's ``PPOTrainer``: the reward is read at the EOS token, completions without EOS get a fixed
penalty score (the EOS trick), log-probs use ``log_softmax(logits / T)`` with the sampling
temperature T (policy, old and reference alike), GAE with gamma 1 / lambda 0.95, whitened
advantages, clipped value loss, and the value model is a separate network (initialized from the
reward model) with its own optimizer.

Design: :class:`PPOState` holds the two things that are optimized, the policy and the value model,
each a ``train.state.TrainState`` (own optimizer, own step counter). Frozen pieces (reference policy pi_0,
helpfulness and safety reward models) are plain arguments, never part of the state. A runner is::

  gen = sampling.sample(state.policy.params, batch["prompt_tokens"], batch["prompt_mask"], key,
                        cfg=cfg, max_new_tokens=m, temperature=ppo_cfg.temperature, ...)
  exp, stats = make_experience_jit(state.policy.params, ref, state.value.params, help, safe,
                                   batch, gen)
  state, metrics = ppo_update_jit(state, exp, key2)

Shape letters: b rollouts, p padded prompt length, m max new tokens, s = p + m, v vocab, n
minibatches, c minibatch size.

Rollout batch dict: ``prompt_tokens`` [b, p] int32 left-padded, ``prompt_mask`` [b, p] bool,
optional ``is_safety`` [b] bool (prompt from the safety set; default False).

Experience dict (every entry has leading axis b, so it can be shuffled into minibatches):
``tokens`` [b, s] int32 (prompt then response), ``positions`` [b, s] int32, ``segment_ids`` [b, s]
int32 (1 real, 0 padding), ``response_tokens`` [b, m] int32, ``response_mask`` [b, m] bool (EOS
included), ``old_logprobs``, ``ref_logprobs``, ``old_values``, ``kl``, ``rewards``, ``advantages``,
``returns`` [b, m] float32, ``score`` [b] float32 (the scalar reward placed at the last token).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llama_jax import rl
from llama_jax.config import LlamaConfig
from llama_jax.losses import masked_mean, token_entropy, token_logprobs
from llama_jax.model import forward, lm_head
from llama_jax.reward import step as reward
from llama_jax.sampling import GenerateOutput
from llama_jax.train.state import (TrainState, accumulate_sums, apply_gradients,
                                   init_train_state)

Batch = Dict[str, jax.Array]


OLD_LOGPROBS = ("sampler", "recompute")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyper-parameters (hashable: pass as a static argument).

  Attributes:
    beta: KL coefficient (Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B).
    kl_estimator: per-token KL estimator of the reward penalty, "k1" (TRL default), "k2", "k3".
    clip_eps: policy ratio clip (0.2, Llama 2).
    value_clip: value clip range around the rollout values (0.2, TRL ``cliprange_value``).
    gamma, lam: GAE discount and lambda (1.0, 0.95; Huang et al. 2024).
    temperature: the sampling temperature; all log-probs are ``log_softmax(logits / T)``.
    safety_threshold: Rs cut of the combined reward (0.15, Llama 2).
    eos_penalty: score (in whitened R~c units) for completions without EOS, or None to disable
      the EOS trick. Default -1.0 (our choice; one standard deviation below the batch mean).
    whiten_advantages: whiten advantages over the batch's response tokens (TRL, Huang et al.).
    minibatch_size: rollouts per gradient step (64 of 512, Llama 2).
    epochs: passes over the batch per PPO iteration (1: one gradient step per minibatch).
    old_logprobs: where the rollout-time log-probs come from: "sampler" (the ones the sampler
      computed while decoding, ``GenerateOutput.logprobs``: no extra forward pass; valid when
      it samples the policy's own params in the same dtype, as ``ppo.run`` does) or "recompute"
      (a teacher-forced forward pass, for a sampler that runs another copy, e.g. in bf16).
    grad_accum_steps: microbatches per minibatch gradient step (``config.train.grad_accum_steps``):
      the same gradient, with one microbatch's activations live at a time.
    forward_batch_size: rollouts per forward pass of the scoring pass (reward models,
      reference, value; :func:`map_row_chunks`), 0 = the whole batch in one pass (TRL's
      ``local_rollout_forward_batch_size``). Must divide the rollout batch; the batch-wide
      statistics (whitening, EOS rate) still use every row.
  Raises:
    ValueError: on an out-of-range field (named).
  """

  beta: float = 0.01
  kl_estimator: str = "k1"
  clip_eps: float = 0.2
  value_clip: float = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  temperature: float = 1.0
  safety_threshold: float = 0.15
  eos_penalty: Optional[float] = -1.0
  whiten_advantages: bool = True
  minibatch_size: int = 64
  epochs: int = 1
  old_logprobs: str = "sampler"
  grad_accum_steps: int = 1
  forward_batch_size: int = 0

  def __post_init__(self):
    if self.beta < 0:
      raise ValueError(f"PPOConfig.beta must be >= 0, got {self.beta}")
    if self.kl_estimator not in rl.KL_ESTIMATORS:
      raise ValueError(f"PPOConfig.kl_estimator must be one of {rl.KL_ESTIMATORS}, "
                       f"got {self.kl_estimator!r}")
    if not 0 < self.clip_eps < 1:
      raise ValueError(f"PPOConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
    if self.value_clip <= 0:
      raise ValueError(f"PPOConfig.value_clip must be > 0, got {self.value_clip}")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if self.temperature <= 0:
      raise ValueError(f"PPOConfig.temperature must be > 0, got {self.temperature}")
    if not 0 < self.safety_threshold < 1:
      raise ValueError(f"PPOConfig.safety_threshold must be in (0, 1), got {self.safety_threshold}")
    if self.minibatch_size < 1 or self.epochs < 1 or self.grad_accum_steps < 1:
      raise ValueError("PPOConfig.minibatch_size, epochs and grad_accum_steps must be >= 1")
    if self.minibatch_size % self.grad_accum_steps:
      raise ValueError(f"PPOConfig.minibatch_size={self.minibatch_size} is not divisible by "
                       f"grad_accum_steps={self.grad_accum_steps}")
    if self.forward_batch_size < 0:
      raise ValueError(f"PPOConfig.forward_batch_size must be >= 0, got {self.forward_batch_size}")
    if self.old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"PPOConfig.old_logprobs must be one of {OLD_LOGPROBS}, "
                       f"got {self.old_logprobs!r}")


class PPOState(flax.struct.PyTreeNode):
  """What PPO optimizes: the policy and the value model, each with its own optimizer state.

  Attributes:
    policy: ``train.state.TrainState`` of the policy (Llama params).
    value: ``train.state.TrainState`` of the value model (reward-model params: trunk + ``head``).
  """

  policy: TrainState
  value: TrainState


def init_ppo_state(policy_params, value_params, policy_opt: optax.GradientTransformation,
                   value_opt: optax.GradientTransformation, seed: int = 0) -> PPOState:
  """Fresh PPO state (policy from the SFT / rejection-sampled checkpoint, value from the RM)."""
  return PPOState(init_train_state(policy_params, policy_opt, seed),
                  init_train_state(value_params, value_opt, seed + 1))


def rollout_tensors(prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    gen: GenerateOutput) -> Batch:
  """Prompt + response as one sequence for teacher-forced passes.

  Args:
    prompt_tokens: [b, p] int32 left-padded. prompt_mask: [b, p] bool.
    gen: ``sampling.sample`` output ([b, m] tokens, [b] lengths incl. EOS).
  Returns:
    dict ``tokens`` [b, s], ``mask`` [b, s] bool (real tokens, contiguous), ``positions`` [b, s]
    (real tokens counted from 0, as the sampler's KV cache does), ``segment_ids`` [b, s] (1 real,
    0 padding), ``response_tokens`` [b, m], ``response_mask`` [b, m] bool (``j < lengths``).
  """
  m = gen.tokens.shape[1]
  response_mask = jnp.arange(m)[None, :] < gen.lengths[:, None]
  tokens = jnp.concatenate([prompt_tokens.astype(jnp.int32), gen.tokens.astype(jnp.int32)], 1)
  mask = jnp.concatenate([prompt_mask.astype(bool), response_mask], axis=1)
  return {"tokens": tokens, "mask": mask, "positions": reward.positions_from_mask(mask),
          "segment_ids": mask.astype(jnp.int32), "response_tokens": gen.tokens.astype(jnp.int32),
          "response_mask": response_mask}


def _response_slice(x: jax.Array, m: int) -> jax.Array:
  """[b, s, ...] -> [b, m, ...]: the outputs at slots p-1 .. s-2, which predict response tokens."""
  return x[:, x.shape[1] - m - 1:x.shape[1] - 1]


def map_row_chunks(fn, chunk: int, *arrays):
  """``fn(*arrays)`` computed ``chunk`` rows at a time (``lax.map``; pure, for row-wise ``fn``).

  Chunk i holds rows ``i, i + n, i + 2n, ...`` (n = rows / chunk): rows split over devices stay
  split the same way inside every chunk, so no chunk gathers rows from other devices. Results
  are put back in row order; peak activations are those of one chunk.

  Args:
    fn: row-wise function of arrays with a leading row axis b; returns a pytree of arrays
      with leading axis b. chunk: rows per call (0 or >= b: one call).
  Raises:
    ValueError: if ``chunk`` does not divide b.
  """
  rows = arrays[0].shape[0]
  if not chunk or chunk >= rows:
    return fn(*arrays)
  if rows % chunk:
    raise ValueError(f"forward_batch_size {chunk} does not divide the {rows} rollouts")
  n = rows // chunk
  split = lambda x: jnp.swapaxes(x.reshape(chunk, n, *x.shape[1:]), 0, 1)
  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(rows, *y.shape[2:]), out)


def response_logprobs(params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      response_tokens: jax.Array, *, cfg: LlamaConfig, temperature: float):
  """Teacher-forced ``log_softmax(logits / T)`` of the response tokens, and their entropy.

  Args:
    params: policy (or reference) params. tokens, positions, segment_ids: [b, s].
    response_tokens: [b, m] (the last m columns of ``tokens``).
    cfg: the model config. temperature: T > 0 (the sampling temperature).
  Returns:
    (logprobs [b, m] float32, entropy [b, m] float32 of the tempered distribution, nats).
    Logits exist for the m response positions only ([b, m, v], not [b, s, v]).
  """
  hidden = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                   return_hidden=True)
  logits = lm_head(params, _response_slice(hidden, response_tokens.shape[1]), cfg) / temperature
  return token_logprobs(logits, response_tokens), token_entropy(logits)


def response_values(value_params, tokens: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, m: int, *, cfg: LlamaConfig) -> jax.Array:
  """Value model ``V_j`` of the state before response token j: [b, m] float32."""
  scores = reward.token_scores(value_params, cfg, tokens, positions=positions,
                               segment_ids=segment_ids)
  return _response_slice(scores, m)


def rollout_rewards(help_params, safe_params, batch: Batch, gen: GenerateOutput, *,
                    reward_cfg: LlamaConfig, ppo_cfg: PPOConfig
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Llama 2's combined reward ``Rc`` of a rollout from the two reward models (pure; jit it).

  Each RM reads its sigmoid score at the row's last real token (the EOS, or the last generated
  token of a truncated row); ``Rc = Rs if IS_SAFETY(p) or Rs < threshold else Rh``
  (:func:`llama_jax.rl.combined_reward`; ``Rh`` alone without a safety RM).

  Args:
    help_params: helpfulness RM. safe_params: safety RM, or None.
    batch: rollout batch dict (module docstring). gen: ``sampling.sample`` output for it.
    reward_cfg: the reward models' config. ppo_cfg: :class:`PPOConfig` (``safety_threshold``).
  Returns:
    (rc [b] float32 in (0, 1), stats of [b] float32: ``r_help``, ``safety_used`` and, with a
    safety RM, ``r_safe``).
  """
  ro = rollout_tensors(batch["prompt_tokens"], batch["prompt_mask"], gen)
  score = lambda params: map_row_chunks(
      functools.partial(reward.score, params, reward_cfg, probability=True),
      ppo_cfg.forward_batch_size, ro["tokens"], ro["mask"])
  r_help = score(help_params)
  stats = {"r_help": r_help, "safety_used": jnp.zeros(r_help.shape, jnp.float32)}
  if safe_params is None:
    return r_help, stats
  r_safe = score(safe_params)
  is_safety = jnp.asarray(batch.get("is_safety", jnp.zeros(r_help.shape, bool)), bool)
  stats["r_safe"] = r_safe
  stats["safety_used"] = (is_safety | (r_safe < ppo_cfg.safety_threshold)).astype(jnp.float32)
  return rl.combined_reward(r_help, r_safe, is_safety, ppo_cfg.safety_threshold), stats


def make_experience(policy_params, ref_params, value_params, batch: Batch, gen: GenerateOutput,
                    rc: jax.Array, *, cfg: LlamaConfig, ppo_cfg: PPOConfig,
                    value_cfg: Optional[LlamaConfig] = None) -> Tuple[Batch, Dict[str, jax.Array]]:
  """Everything PPO trains on, from a rollout and its rewards (pure; jit it).

  Old log-probs are the sampler's (``ppo_cfg.old_logprobs="sampler"``; the teacher-forced
  recomputation of ``"recompute"`` equals them up to float error: ``test_ppo.py``). The
  scalar reward is ``R~c = whiten(logit(Rc))`` (Llama 2 Sec. 3.2.3), whitened over the rows that
  ended with EOS when the EOS trick is on; rows without EOS then get ``eos_penalty`` instead
  (Huang et al. 2024), so truncated answers neither get an RM score nor shift the statistics of
  the finished ones. ``-beta * KL`` is added per token; advantages come from GAE.

  Args:
    policy_params: pi_theta at rollout time. ref_params: pi_0 (frozen).
    value_params: value model (reward params layout).
    batch: rollout batch dict (see module docstring). gen: ``sampling.sample`` output for it.
    rc: [b] float combined reward in (0, 1): :func:`rollout_rewards`, or a gold reward
      (``llama_jax.reward.scoring``).
    cfg: policy / reference config. ppo_cfg: :class:`PPOConfig`.
    value_cfg: config of the value model (default ``cfg``).
  Returns:
    (experience dict (module docstring), stats dict of float32 scalars: ``reward_whitened``
    (mean R~c after the EOS trick), ``reward_raw`` (mean Rc over finished rows), ``kl`` (mean
    over rows of the summed per-token KL), ``non_score_reward`` (mean summed -beta KL),
    ``kl_coef``, ``response_length``, ``eos_rate`` (share with EOS)).
  """
  value_cfg = value_cfg or cfg
  t = ppo_cfg.temperature
  ro = rollout_tensors(batch["prompt_tokens"], batch["prompt_mask"], gen)
  tokens, pos, seg = ro["tokens"], ro["positions"], ro["segment_ids"]
  resp, rmask = ro["response_tokens"], ro["response_mask"]
  m = resp.shape[1]
  chunk = ppo_cfg.forward_batch_size
  logprobs = lambda params: map_row_chunks(
      lambda *x: response_logprobs(params, *x, cfg=cfg, temperature=t)[0], chunk,
      tokens, pos, seg, resp)
  if ppo_cfg.old_logprobs == "sampler":
    old_logp = jnp.asarray(gen.logprobs, jnp.float32)
  else:
    old_logp = logprobs(policy_params)
  ref_logp = logprobs(ref_params)
  values = map_row_chunks(lambda *x: response_values(value_params, *x, m, cfg=value_cfg), chunk,
                          tokens, pos, seg)

  finished = jnp.asarray(gen.finished, bool)
  whiten_mask = finished if ppo_cfg.eos_penalty is not None else None
  score = rl.apply_eos_trick(rl.normalized_reward(rc, whiten_mask), finished, ppo_cfg.eos_penalty)
  kl = jnp.where(rmask, rl.kl_estimate(old_logp, ref_logp, ppo_cfg.kl_estimator), 0.0)
  rewards, kl_rewards = rl.per_token_rewards(score, kl, rmask, ppo_cfg.beta)
  zero = lambda x: jnp.where(rmask, x, 0.0)
  values = zero(values)
  adv, returns = rl.gae(rewards, values, rmask, ppo_cfg.gamma, ppo_cfg.lam)
  if ppo_cfg.whiten_advantages:
    adv = rl.whiten(adv, rmask)
  exp = {"tokens": tokens, "positions": pos, "segment_ids": seg, "response_tokens": resp,
         "response_mask": rmask, "old_logprobs": zero(old_logp), "ref_logprobs": zero(ref_logp),
         "old_values": values, "kl": kl, "rewards": rewards, "advantages": adv,
         "returns": returns, "score": score}
  f32 = lambda x: jnp.mean(jnp.asarray(x, jnp.float32))
  rc = jnp.asarray(rc, jnp.float32)
  n_done = jnp.maximum(jnp.sum(finished), 1)
  stats = {"reward_whitened": f32(score),
           "reward_raw": jnp.sum(jnp.where(finished, rc, 0.0)) / n_done,
           "kl": f32(kl.sum(1)), "non_score_reward": f32(kl_rewards.sum(1)),
           "kl_coef": jnp.float32(ppo_cfg.beta), "response_length": f32(gen.lengths),
           "eos_rate": f32(finished)}
  return exp, stats


def reset_value_head(value_params):
  """Value params with the scalar head zeroed (``V = 0`` everywhere at PPO start).

  The value model starts from the reward model (Huang et al. 2024), but its head predicts raw
  RM logits while PPO's returns are whitened ``R~c`` (zero mean, unit variance) minus the KL
  penalty: a head on the wrong scale makes the first iterations' advantages noise, and the
  clipped value loss moves it only ``value_clip`` per step. Zeroing the head keeps the trunk's
  features and starts the values on the returns' scale.
  """
  out = dict(value_params)
  out["head"] = jax.tree.map(jnp.zeros_like, value_params["head"])
  return out


def ppo_train_step(state: PPOState, minibatch: Batch, rng: Optional[jax.Array] = None, *,
                   cfg: LlamaConfig, policy_opt: optax.GradientTransformation,
                   value_opt: optax.GradientTransformation, ppo_cfg: PPOConfig,
                   value_cfg: Optional[LlamaConfig] = None
                   ) -> Tuple[PPOState, Dict[str, jax.Array]]:
  """One gradient step of the policy and one of the value model on a minibatch (pure).

  Args:
    state: :class:`PPOState`.
    minibatch: experience dict rows (any leading size c); see the module docstring.
    rng: unused (no dropout; kept for the common step signature).
    cfg: policy config. policy_opt, value_opt: optax optimizers. ppo_cfg: :class:`PPOConfig`.
    value_cfg: value-model config (default ``cfg``).
  Returns:
    (new state, metrics: float32 scalars ``policy_loss``, ``value_loss``, ``approxkl``,
    ``clipfrac``, ``vf_clipfrac``, ``ratio``, ``entropy`` (mean per response token),
    ``kl_policy`` (mean over rows of the summed k1 KL of the *current* policy to the reference), ``value``,
    ``policy_grad_norm``, ``value_grad_norm``, ``skipped`` (1 if the minibatch had no response
    token, or a non-finite policy gradient, and the policy was not updated), ``nonfinite`` (1 if
    the policy's or the value model's gradient was not finite: that model was not updated)).
  """
  del rng
  value_cfg = value_cfg or cfg
  m = minibatch["response_mask"].shape[1]
  rows = minibatch["response_mask"].shape[0]

  def policy_terms(params, mb):
    mask = mb["response_mask"]
    n = jnp.sum(mask).astype(jnp.float32)
    logp, ent = response_logprobs(params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                  mb["response_tokens"], cfg=cfg, temperature=ppo_cfg.temperature)
    loss, metrics = rl.policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask,
                                   ppo_cfg.clip_eps)
    sums = {k: v * n for k, v in metrics.items()}
    sums["entropy"] = masked_mean(ent, mask) * n
    sums["kl_policy"] = jnp.sum(jnp.where(mask, logp - mb["ref_logprobs"], 0.0))
    return loss * n, dict(sums, count=n)

  def value_terms(params, mb):
    mask = mb["response_mask"]
    n = jnp.sum(mask).astype(jnp.float32)
    v = response_values(params, mb["tokens"], mb["positions"], mb["segment_ids"], m,
                        cfg=value_cfg)
    loss, metrics = rl.value_loss(v, mb["old_values"], mb["returns"], mask, ppo_cfg.value_clip)
    return loss * n, {"vf_clipfrac": metrics["vf_clipfrac"] * n, "value": masked_mean(v, mask) * n}

  # Token sums over microbatches, divided once by the minibatch's token count: the gradient and
  # the metrics of the whole minibatch's masked means, however it is split.
  accum = ppo_cfg.grad_accum_steps
  p_sum, p_sums, p_grads = accumulate_sums(policy_terms, state.policy.params, minibatch, accum)
  v_sum, v_sums, v_grads = accumulate_sums(value_terms, state.value.params, minibatch, accum)
  count = p_sums.pop("count")
  per_token = lambda x: x / jnp.maximum(count, 1.0)
  policy, p_info = apply_gradients(state.policy, p_grads, count, policy_opt)
  value, v_info = apply_gradients(state.value, v_grads, count, value_opt)
  metrics = {"policy_loss": per_token(p_sum), "value_loss": per_token(v_sum),
             **{k: per_token(x) for k, x in p_sums.items() if k != "kl_policy"},
             "kl_policy": p_sums["kl_policy"] / rows,
             **{k: per_token(x) for k, x in v_sums.items()},
             "policy_grad_norm": p_info["grad_norm"], "value_grad_norm": v_info["grad_norm"],
             "skipped": p_info["skipped"],
             "nonfinite": jnp.maximum(p_info["nonfinite"], v_info["nonfinite"])}
  return PPOState(policy, value), metrics


def shuffle_minibatches(experience: Batch, minibatch_size: int, key: jax.Array) -> Batch:
  """Shuffle rows and split into [n, c, ...] minibatches (n = b / c).

  Raises:
    ValueError: if the batch size is not divisible by ``minibatch_size``.
  """
  b = experience["tokens"].shape[0]
  if b % minibatch_size:
    raise ValueError(f"rollout batch {b} is not divisible by minibatch_size {minibatch_size}")
  perm = jax.random.permutation(key, b)
  return jax.tree.map(
      lambda x: x[perm].reshape(b // minibatch_size, minibatch_size, *x.shape[1:]), experience)


def ppo_update(state: PPOState, experience: Batch, rng: jax.Array, *, cfg: LlamaConfig,
               policy_opt: optax.GradientTransformation, value_opt: optax.GradientTransformation,
               ppo_cfg: PPOConfig,
               value_cfg: Optional[LlamaConfig] = None) -> Tuple[PPOState, Dict[str, jax.Array]]:
  """One PPO iteration's optimization: ``ppo_cfg.epochs`` passes over the shuffled experience,
  one :func:`ppo_train_step` per minibatch (``lax.scan``; pure, jit it).

  Returns:
    (new state, metrics averaged over the steps; plus ``steps``).
  Raises:
    ValueError: if the batch is not divisible by ``ppo_cfg.minibatch_size``.
  """
  def one_step(st, mb):
    return ppo_train_step(st, mb, None, cfg=cfg, policy_opt=policy_opt, value_opt=value_opt,
                          ppo_cfg=ppo_cfg, value_cfg=value_cfg)

  all_metrics = []
  for epoch in range(ppo_cfg.epochs):
    mbs = shuffle_minibatches(experience, ppo_cfg.minibatch_size, jax.random.fold_in(rng, epoch))
    state, metrics = jax.lax.scan(one_step, state, mbs)
    all_metrics.append(metrics)
  stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *all_metrics)
  out = jax.tree.map(jnp.mean, stacked)
  out["steps"] = jnp.float32(stacked["policy_loss"].shape[0])
  return state, out
