"""Direct Preference Optimization: sequence log-probs, the DPO loss and the pure train step.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", Eq. 7::

  L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

with ``y_w`` the chosen and ``y_l`` the rejected response, ``log pi(y|x)`` the summed log-probs of
the response tokens (the prompt excluded), and ``pi_ref`` the SFT policy. The implicit rewards
``beta * (log pi(y|x) - log pi_ref(y|x))`` give TRL's metrics (``DPOTrainer``): ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (share of pairs with chosen reward > rejected),
``rewards/margins`` (chosen - rejected), ``logps/chosen``, ``logps/rejected`` (policy).

The reference log-probs are precomputed once (``dpo.run``), not a second live model, and arrive
with the batch. Batch dict (``input_pipeline.preference_batches`` plus the reference), b pairs,
t tokens: ``chosen_tokens`` / ``rejected_tokens`` [b, t] int32 (prompt + response + EOS,
right-padded), ``chosen_mask`` / ``rejected_mask`` [b, t] bool (real tokens),
``chosen_response_mask`` / ``rejected_response_mask`` [b, t] bool (the final response and its EOS:
the tokens scored), ``ref_chosen_logps`` / ``ref_rejected_logps`` [b] float32. A pair is valid if
both rows have a response token (padding pairs of a short last batch are not).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.losses import token_logprobs
from llama_jax.model import forward, lm_head
from llama_jax.reward.step import positions_from_mask
from llama_jax.train.state import TrainState, accumulate_sums, apply_gradients

Batch = Dict[str, jax.Array]
ROW_KEYS = ("chosen_tokens", "chosen_mask", "chosen_response_mask", "rejected_tokens",
            "rejected_mask", "rejected_response_mask")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
DPO_KEYS = ROW_KEYS + REF_KEYS
# Pair metrics (TRL's DPOTrainer names), averaged over valid pairs.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def sequence_logprobs(params: Any, cfg: LlamaConfig, tokens: jax.Array, mask: jax.Array,
                      response_mask: jax.Array) -> jax.Array:
  """``log pi(y|x)``: the summed log-probs of each row's response tokens under the policy.

  Token ``i`` of a row is predicted by the logits at ``i - 1`` (teacher forcing); only tokens
  with ``response_mask`` count (the prompt and padding never do). Positions count real tokens
  and padding is its own attention segment, as reward models read rows
  (``reward.step.score``), so right or left padding gives the same sums.

  Args:
    params: Llama params (with ``output``). tokens: [b, t] int32. mask: [b, t] bool, real
      tokens. response_mask: [b, t] bool, the tokens scored (a subset of ``mask``).
  Returns:
    [b] float32 sums of log-probabilities (nats; 0 for a row with no response token).
  """
  mask = jnp.asarray(mask, bool)
  hidden = forward(params, tokens, cfg, positions=positions_from_mask(mask),
                   segment_ids=mask.astype(jnp.int32), return_hidden=True)
  logp = token_logprobs(lm_head(params, hidden[:, :-1], cfg), tokens[:, 1:])
  return jnp.sum(logp * jnp.asarray(response_mask[:, 1:], jnp.float32), axis=1)


def pair_logprobs(params: Any, cfg: LlamaConfig, batch: Batch):
  """(log pi(chosen) [b], log pi(rejected) [b], valid [b] bool) of a pair batch: both responses in
  one forward pass of [2b, t] rows; valid = both rows have a response token."""
  b = batch["chosen_tokens"].shape[0]
  cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
  logps = sequence_logprobs(params, cfg, cat("tokens"), cat("mask"), cat("response_mask"))
  valid = (jnp.asarray(batch["chosen_response_mask"], bool).any(1)
           & jnp.asarray(batch["rejected_response_mask"], bool).any(1))
  return logps[:b], logps[b:], valid


def dpo_pair_terms(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
                   ref_rejected: jax.Array, beta: float):
  """Per-pair DPO loss and implicit rewards (Rafailov et al. 2023, Eq. 7).

  Args:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected: [b] summed response log-probs.
    beta: the KL coefficient of the implicit reward (> 0; paper: 0.1).
  Returns:
    (losses, chosen_rewards, rejected_rewards), each [b] float32: ``-log sigmoid(beta *
    ((pc - rc) - (pr - rr)))``, ``beta * (pc - rc)``, ``beta * (pr - rr)``.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_ratio = f32(policy_chosen) - f32(ref_chosen)
  rejected_ratio = f32(policy_rejected) - f32(ref_rejected)
  losses = -jax.nn.log_sigmoid(beta * (chosen_ratio - rejected_ratio))
  return losses, beta * chosen_ratio, beta * rejected_ratio


def dpo_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             weights: Optional[jax.Array] = None):
  """(loss sum, sums of the :data:`METRICS` numerators and ``pairs``) over pairs weighted by
  ``weights`` ([b] float, 1 = a valid pair; default all ones). Divide by ``pairs`` once over the
  whole (accumulated) batch."""
  losses, rc, rr = dpo_pair_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
  w = jnp.ones_like(losses) if weights is None else jnp.asarray(weights, jnp.float32)
  s = lambda x: jnp.sum(w * jnp.asarray(x, jnp.float32))
  sums = {"pairs": jnp.sum(w), "rewards/chosen": s(rc), "rewards/rejected": s(rr),
          "rewards/accuracies": s(rc > rr), "rewards/margins": s(rc - rr),
          "logps/chosen": s(policy_chosen), "logps/rejected": s(policy_rejected)}
  return s(losses), sums


def means(loss_sum: jax.Array, sums: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """``loss`` and :data:`METRICS` as means over ``sums["pairs"]`` (0 when there is no pair)."""
  d = jnp.maximum(sums["pairs"], 1.0)
  return {"loss": loss_sum / d, **{k: sums[k] / d for k in METRICS}}


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, weights: Optional[jax.Array] = None):
  """The DPO loss of a batch of pairs and its metrics (Rafailov et al. 2023, Eq. 7; TRL names).

  Args:
    policy_chosen, policy_rejected: [b] float32 ``log pi(y|x)`` of the policy.
    ref_chosen, ref_rejected: [b] float32 ``log pi_ref(y|x)`` of the reference (SFT) policy.
    beta: > 0 (paper: 0.1). weights: optional [b] pair weights (1 = valid, 0 = padding).
  Returns:
    (loss [] float32: the mean over pairs of ``-log sigmoid(beta * (chosen log-ratio - rejected
    log-ratio))``, metrics: ``rewards/chosen``, ``rewards/rejected`` (mean implicit rewards
    ``beta * (log pi - log pi_ref)``), ``rewards/accuracies`` (share of pairs with chosen reward
    > rejected), ``rewards/margins`` (mean chosen - rejected reward), ``logps/chosen``,
    ``logps/rejected`` (mean policy log-probs), ``pairs``).
  """
  total, sums = dpo_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, weights)
  metrics = means(total, sums)
  return metrics.pop("loss"), {**metrics, "pairs": sums["pairs"]}


def _loss_terms(params, batch: Batch, cfg: LlamaConfig, beta: float):
  pc, pr, valid = pair_logprobs(params, cfg, batch)
  return dpo_sums(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta,
                  valid.astype(jnp.float32))


def train_step(state: TrainState, batch: Batch, rng: Optional[jax.Array] = None, *,
               cfg: LlamaConfig, optimizer: optax.GradientTransformation, beta: float,
               accum_steps: int = 1):
  """One DPO optimizer step (pure; jit with ``donate_argnums=0``).

  Loss = the sum over valid pairs of the DPO loss / the number of valid pairs, both taken over
  the whole batch, which is split into ``accum_steps`` microbatches
  (``train.state.accumulate_sums``: the same gradient as one pass, only one microbatch's
  activations live).

  Args:
    state: TrainState of the policy (Llama params).
    batch: the module docstring's pair batch ([b, t] rows, [b] reference log-probs; ``b``
      divisible by ``accum_steps``).
    rng: unused (the common step signature). cfg, optimizer, beta, accum_steps: static.
  Returns:
    (new_state, metrics) float32 scalars: ``loss``, :data:`METRICS` (means over valid pairs),
    ``pairs``, ``real_tokens``, ``grad_norm``, ``skipped`` (no valid pair, or a non-finite
    gradient), ``nonfinite``.
  """
  del rng
  batch = {k: batch[k] for k in DPO_KEYS}
  total, sums, grads = accumulate_sums(lambda p, b: _loss_terms(p, b, cfg, beta), state.params,
                                       batch, accum_steps)
  new_state, metrics = apply_gradients(state, grads, sums["pairs"], optimizer)
  metrics.update(means(total, sums), pairs=sums["pairs"],
                 real_tokens=(jnp.sum(batch["chosen_mask"]) + jnp.sum(batch["rejected_mask"]))
                 .astype(jnp.float32))
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, cfg: LlamaConfig, beta: float) -> dict:
  """Sums over the valid pairs of a held-out batch: ``loss_sum`` and ``dpo_sums``' keys
  (replicated float32 scalars)."""
  total, sums = _loss_terms(params, batch, cfg, beta)
  return {"loss_sum": total, **sums}


def reference_logps(params: Any, batch: Batch, *, cfg: LlamaConfig) -> Dict[str, jax.Array]:
  """The reference pass: ``ref_chosen_logps`` / ``ref_rejected_logps`` [b] float32 of a pair
  batch (``ROW_KEYS``) under ``params`` (the SFT policy), computed once before step 0."""
  pc, pr, _ = pair_logprobs(params, cfg, batch)
  return {"ref_chosen_logps": pc, "ref_rejected_logps": pr}
