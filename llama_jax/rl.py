"""The math of RLHF with PPO, as pure jittable functions (no model code).

Sources: Llama 2 paper (Touvron et al. 2023, arXiv 2307.09288), Sec. 3.2.3 (combined reward, logit +
whitening, KL penalty); Huang et al. 2024, "The N+ implementation details of RLHF with PPO"
(arXiv 2403.17031) and TRL's ``PPOTrainer`` (reward at the EOS token, the EOS trick, GAE, clipped
policy and value losses, metric names ``approxkl``, ``clipfrac``, ``policy_loss``, ``value_loss``);
Schulman 2020, "Approximating KL divergence" (the k1/k2/k3 estimators); Schulman et al. 2016 (GAE).

Shape letters: b batch (rollouts), t response tokens. Every ``mask`` is [b, t] bool or float, True /
1 on real response tokens; values at masked-out positions never reach a result (they are zeroed).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from llama_jax.losses import masked_mean

LOGIT_EPS = 1e-6
WHITEN_EPS = 1e-8
KL_ESTIMATORS = ("k1", "k2", "k3")


def _mask_like(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  if mask is None:
    return jnp.ones(x.shape, jnp.float32)
  return jnp.broadcast_to(mask, x.shape).astype(jnp.float32)


def whiten(x: jax.Array, mask: Optional[jax.Array] = None, shift_mean: bool = True,
           eps: float = WHITEN_EPS) -> jax.Array:
  """Normalize ``x`` to zero mean and unit variance over the masked-in entries.

  ``(x - mean) / sqrt(var + eps)`` with the masked mean and the masked *population* variance
  (divide by the count, not count - 1; TRL's ``masked_whiten`` uses the unbiased form, which differs
  by a factor ``n / (n - 1)``, negligible at PPO batch sizes). With ``shift_mean=False`` the mean is
  added back (scale only, as TRL does for rewards).

  Args:
    x: any shape, float.
    mask: same shape (or broadcastable), bool/float; default all entries.
    shift_mean: subtract the mean (True) or only rescale (False).
    eps: added to the variance (1e-8).
  Returns:
    float32 array shaped like ``x``; 0 where ``mask`` is False. All zeros if nothing is masked in.
  """
  m = _mask_like(x, mask)
  x = jnp.where(m > 0, x.astype(jnp.float32), 0.0)  # padded inf/NaN must not reach the mean
  # Shifted-data variance: subtract one real entry first, so (near-)constant inputs whiten to
  # (near-)0 instead of float32 rounding noise of the mean amplified by 1/sqrt(eps).
  flat_m = m.reshape(-1)
  pivot = jnp.where(jnp.any(flat_m > 0), x.reshape(-1)[jnp.argmax(flat_m > 0)], 0.0)
  d = jnp.where(m > 0, x - pivot, 0.0)
  mean_d = masked_mean(d, m)
  var = masked_mean(jnp.square(d - mean_d), m)
  out = (d - mean_d) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean_d + pivot
  return jnp.where(m > 0, out, 0.0)


def logit(p: jax.Array, eps: float = LOGIT_EPS) -> jax.Array:
  """Inverse sigmoid ``log(p) - log(1 - p)`` with ``p`` clipped to ``[eps, 1 - eps]``.

  The clip (eps = 1e-6 by default, i.e. outputs within about +-13.8) keeps saturated reward-model
  probabilities (exactly 0 or 1 in float32) finite. Llama 2 Sec. 3.2.3: ``LOGIT`` reverses the
  sigmoid.
  """
  p = jnp.clip(jnp.asarray(p, jnp.float32), eps, 1.0 - eps)
  return jnp.log(p) - jnp.log1p(-p)


def combined_reward(r_help: jax.Array, r_safe: jax.Array, is_safety: jax.Array,
                    threshold: float = 0.15) -> jax.Array:
  """Llama 2's piecewise reward ``Rc`` (Sec. 3.2.3).

  ``Rc = Rs if IS_SAFETY(p) or Rs < threshold else Rh``: the safety score wins on prompts tagged as
  safety prompts and whenever the safety model judges the answer unsafe (``Rs < 0.15``, precision
  0.89 / recall 0.55 on Meta's safety test set). ``Rs == threshold`` counts as safe (uses ``Rh``).

  Args:
    r_help, r_safe: [b] float, *sigmoid* scores (probabilities) of the helpfulness / safety RMs.
    is_safety: [b] bool, the prompt comes from the safety prompt set.
    threshold: the safety cut (0.15).
  Returns:
    [b] float32 ``Rc`` (still a probability; see :func:`normalized_reward`).
  """
  r_help = jnp.asarray(r_help, jnp.float32)
  r_safe = jnp.asarray(r_safe, jnp.float32)
  use_safe = jnp.asarray(is_safety, bool) | (r_safe < threshold)
  return jnp.where(use_safe, r_safe, r_help)


def normalized_reward(rc: jax.Array, mask: Optional[jax.Array] = None,
                      eps: float = LOGIT_EPS) -> jax.Array:
  """``R~c = WHITEN(LOGIT(Rc))`` over the batch (Llama 2 Sec. 3.2.3).

  Args:
    rc: [b] float probabilities (from :func:`combined_reward`).
    mask: [b] bool, rows that enter the whitening statistics (default all); others get 0.
    eps: the :func:`logit` clip.
  Returns:
    [b] float32, zero mean / unit variance over the masked-in rows.
  """
  return whiten(logit(rc, eps), mask)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token estimator of KL(pi || pi_ref) from the sampled token's log-probs (Schulman 2020).

  With ``log r = ref_logp - logp`` (tokens sampled from pi):
    * ``k1 = logp - ref_logp = -log r`` (unbiased, can be negative; TRL's default ``kl``),
    * ``k2 = 0.5 (log r)^2`` (biased, low variance),
    * ``k3 = (r - 1) - log r`` (unbiased, always >= 0).

  Args:
    logp, ref_logp: [b, t] float log-probabilities of the same tokens.
    kind: "k1", "k2" or "k3".
  Returns:
    [b, t] float32 (not masked: multiply by the response mask).
  Raises:
    ValueError: if ``kind`` is not one of ``KL_ESTIMATORS``.
  """
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
  log_r = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  if kind == "k1":
    return -log_r
  if kind == "k2":
    return 0.5 * jnp.square(log_r)
  return jnp.expm1(log_r) - log_r


def last_index(mask: jax.Array) -> jax.Array:
  """[b, t] mask -> [b] int32 index of the last True entry per row (-1 for an empty row)."""
  t = mask.shape[-1]
  idx = jnp.where(mask.astype(bool), jnp.arange(t, dtype=jnp.int32), -1)
  return jnp.max(idx, axis=-1)


def apply_eos_trick(score: jax.Array, finished: jax.Array,
                    penalty: Optional[float]) -> jax.Array:
  """Huang et al. 2024's "EOS trick": rows that did not emit EOS within the budget
  (``finished`` False) get the fixed ``penalty`` score instead of their reward-model score.

  Args:
    score: [b] float. finished: [b] bool. penalty: the replacement score, or None (no-op).
  Returns:
    [b] float32.
  """
  score = jnp.asarray(score, jnp.float32)
  if penalty is None:
    return score
  return jnp.where(jnp.asarray(finished, bool), score, jnp.float32(penalty))


def per_token_rewards(score: jax.Array, kl: jax.Array, response_mask: jax.Array, beta: float,
                      finished: Optional[jax.Array] = None,
                      eos_penalty: Optional[float] = None) -> Tuple[jax.Array, jax.Array]:
  """PPO's per-token reward ``R(g|p) = R~c(g|p) - beta * KL`` (Llama 2 Sec. 3.2.3; TRL).

  ``rewards[i, s] = -beta * kl[i, s]`` on every response token, plus the scalar ``score[i]`` added
  at the row's last real response token ``e_i`` (the EOS token when the row finished; Huang et al.
  2024: the reward is read at EOS only). With ``eos_penalty`` set, ``score`` is first replaced by
  ``eos_penalty`` on rows with ``finished`` False (:func:`apply_eos_trick`). Padding gets 0, and a
  row with no response token gets no reward at all.

  Args:
    score: [b] float scalar rewards (e.g. :func:`normalized_reward`).
    kl: [b, t] float per-token KL estimates (:func:`kl_estimate`).
    response_mask: [b, t] bool, True on generated tokens (EOS included).
    beta: KL coefficient (0.01 for 7B/13B, 0.005 for 34B/70B).
    finished: [b] bool, the row emitted EOS; required when ``eos_penalty`` is set.
    eos_penalty: score for rows without EOS, or None.
  Returns:
    (rewards [b, t] float32, kl_rewards [b, t] float32 = ``-beta * kl`` masked).
  Raises:
    ValueError: if ``eos_penalty`` is set without ``finished``.
  """
  if eos_penalty is not None and finished is None:
    raise ValueError("per_token_rewards: eos_penalty needs `finished`")
  m = response_mask.astype(bool)
  kl_rewards = jnp.where(m, -beta * jnp.where(m, kl.astype(jnp.float32), 0.0), 0.0)
  if finished is not None:
    score = apply_eos_trick(score, finished, eos_penalty)
  end = last_index(m)
  at_end = jnp.arange(m.shape[-1])[None, :] == end[:, None]  # all False on an empty row
  rewards = kl_rewards + jnp.where(at_end & m, jnp.asarray(score, jnp.float32)[:, None], 0.0)
  return rewards, kl_rewards


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation (Schulman et al. 2016), backwards with ``lax.scan``.

  Over the real (masked-in) tokens of a row, in order, with ``V_{T} = 0`` after the last one
  (no bootstrapping past the last real token: the episode ends there):
    ``delta_s = r_s + gamma * V_{s+1} - V_s``,
    ``A_s = delta_s + gamma * lam * A_{s+1}``,
    ``returns_s = A_s + V_s``.
  Masked-out positions are skipped (they neither take part nor break the chain) and get 0.
  Huang et al. 2024 / TRL use gamma = 1, lam = 0.95.

  Args:
    rewards: [b, t] float per-token rewards (:func:`per_token_rewards`).
    values: [b, t] float value estimates ``V_s`` of the state before token ``s``.
    mask: [b, t] bool response mask.
    gamma, lam: discount and GAE lambda.
  Returns:
    (advantages [b, t] float32, returns [b, t] float32), 0 on masked-out positions.
  """
  m = mask.astype(bool)
  r = jnp.where(m, rewards.astype(jnp.float32), 0.0)
  v = jnp.where(m, values.astype(jnp.float32), 0.0)

  def step(carry, x):
    next_v, next_a = carry
    r_s, v_s, m_s = x
    delta = r_s + gamma * next_v - v_s
    a = delta + gamma * lam * next_a
    carry = (jnp.where(m_s, v_s, next_v), jnp.where(m_s, a, next_a))
    return carry, jnp.where(m_s, a, 0.0)

  b = r.shape[0]
  init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
  xs = (r.T, v.T, m.T)
  _, adv = jax.lax.scan(step, init, xs, reverse=True)
  adv = adv.T
  return adv, jnp.where(m, adv + v, 0.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float = 0.2) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """PPO's clipped surrogate loss (Schulman et al. 2017; TRL ``pg_loss``).

  ``ratio = exp(logp - old_logp)``;
  ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

  Metrics: ``clipfrac`` = share of tokens where the clipped term is strictly larger (the clip is
  active; a ratio exactly at ``1 +- eps`` is not clipped); ``approxkl = 0.5 * masked_mean((logp -
  old_logp)^2)`` (the k2 estimator of KL(old || new), TRL's ``approxkl``); ``ratio`` = masked mean.

  Args:
    logp: [b, t] float log-probs of the rollout tokens under the current policy (differentiable).
    old_logp: [b, t] float log-probs recorded at rollout time (constants).
    advantages: [b, t] float (constants, usually whitened).
    mask: [b, t] bool response mask.
    clip_eps: 0.2 (Llama 2 Sec. 3.2.3).
  Returns:
    (loss float32 scalar, {"clipfrac", "approxkl", "ratio"} float32 scalars).
  """
  m = jnp.broadcast_to(mask, logp.shape).astype(bool)
  # Zero padded entries *before* exp: garbage there (e.g. exp(100) = inf, inf * 0 = NaN) must not
  # leak into the masked mean or the gradient.
  log_ratio = jnp.where(m, logp.astype(jnp.float32)
                        - jax.lax.stop_gradient(old_logp.astype(jnp.float32)), 0.0)
  ratio = jnp.exp(log_ratio)
  adv = jax.lax.stop_gradient(jnp.where(m, advantages.astype(jnp.float32), 0.0))
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approxkl": 0.5 * masked_mean(jnp.square(jax.lax.stop_gradient(log_ratio)), mask),
      "ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
  }
  return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float = 0.2) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Clipped value loss (TRL ``vf_loss``; Huang et al. 2024).

  ``V_clip = clip(V, V_old - c, V_old + c)``;
  ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

  Args:
    values: [b, t] float current value predictions (differentiable).
    old_values: [b, t] float values recorded at rollout time.
    returns: [b, t] float GAE returns (targets).
    mask: [b, t] bool response mask.
    clip: the value clip range c (0.2).
  Returns:
    (loss float32 scalar, {"vf_clipfrac"}: share of tokens where the clipped error is strictly
    larger).
  """
  m = jnp.broadcast_to(mask, values.shape).astype(bool)
  v = jnp.where(m, values.astype(jnp.float32), 0.0)  # padded garbage never reaches the mean
  v_old = jax.lax.stop_gradient(jnp.where(m, old_values.astype(jnp.float32), 0.0))
  ret = jax.lax.stop_gradient(jnp.where(m, returns.astype(jnp.float32), 0.0))
  v_clip = jnp.clip(v, v_old - clip, v_old + clip)
  err = jnp.square(v - ret)
  err_clip = jnp.square(v_clip - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clip), mask)
  return loss, {"vf_clipfrac": masked_mean((err_clip > err).astype(jnp.float32), mask)}
