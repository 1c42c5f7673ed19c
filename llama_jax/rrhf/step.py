"""RRHF: rank responses to align language models with human feedback; the loss and the pure step.

Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback without
tears", Sec. 3. For a prompt ``x`` with ``k`` candidate responses ``y_i`` scored ``r_i`` (by the
reward models, the world oracle, or any source), the policy's length-normalized log-probability

  p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i| ** length_penalty

is trained to rank like the scores, plus cross-entropy on the best response ``i' = argmax r_i``::

  L_rank = sum_{r_i > r_j} max(0, p_j - p_i)          (Eq. 2, every ordered pair of the prompt)
  L_ft   = -sum_t log pi(y_i',t | x, y_i',<t) / |y_i'|   (Eq. 3: mean token NLL of the best)
  L      = rank_weight * L_rank + L_ft                (Eq. 4; rank_weight 1 in the paper)

averaged over the prompts of the batch. Metrics (the reference code's names): ``rrhf_loss``
(L_rank), ``sft_loss`` (L_ft), ``ranking_accuracy`` (share of ordered pairs with p_i > p_j),
``logps/best`` (p of the best response).

Batch dict, b prompts, k candidate rows each, t tokens: ``tokens`` [b, k, t] int32 (prompt +
response + EOS, right-padded), ``mask`` [b, k, t] bool (real tokens), ``response_mask``
[b, k, t] bool (the response and its EOS: the tokens scored), ``scores`` [b, k] float32,
``valid`` [b, k] bool (a real candidate; padding rows of a prompt with fewer than k and of a
short last batch are not). A prompt counts when it has a valid candidate with a response token.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.dpo.step import sequence_logprobs
from llama_jax.train.state import TrainState, accumulate_sums, apply_gradients

Batch = Dict[str, jax.Array]
KEYS = ("tokens", "mask", "response_mask", "scores", "valid")
# Per-prompt metrics averaged over counted prompts; ranking_accuracy over ordered pairs.
METRICS = ("rrhf_loss", "sft_loss", "logps/best")


def rrhf_terms(logps: jax.Array, lengths: jax.Array, scores: jax.Array, valid: jax.Array, *,
               length_penalty: float = 1.0):
  """Per-prompt RRHF terms (Yuan et al. 2023, Eqs. 2-3).

  Args:
    logps: [b, k] float32 summed response log-probs ``log pi(y_i|x)``.
    lengths: [b, k] response lengths in tokens (>= 0). scores: [b, k] rewards ``r_i``.
    valid: [b, k] bool, real candidates (others take part in nothing).
    length_penalty: ``p_i = logps / lengths ** length_penalty`` (>= 0; 1 = mean log-prob).
  Returns:
    dict of [b] float32: ``rank`` (sum over ordered valid pairs ``r_i > r_j`` of
    ``max(0, p_j - p_i)``), ``sft`` (``-logps / lengths`` of the best valid candidate, the first
    of equal scores), ``best_p`` (its ``p``), ``correct`` (pairs with ``p_i > p_j``), ``pairs``
    (ordered pairs), ``counted`` (1 when the best valid candidate has a response token).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  logps, lengths, scores = f32(logps), f32(lengths), f32(scores)
  valid = jnp.asarray(valid, bool) & (lengths > 0)
  p = logps / jnp.maximum(lengths, 1.0) ** length_penalty
  # ordered[b, i, j]: candidate i scored above candidate j, both valid.
  ordered = (valid[:, :, None] & valid[:, None, :]
             & (scores[:, :, None] > scores[:, None, :])).astype(jnp.float32)
  diff = p[:, :, None] - p[:, None, :]  # p_i - p_j
  best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=1)
  take = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
  counted = valid.any(axis=1).astype(jnp.float32)
  return {"rank": jnp.sum(ordered * jax.nn.relu(-diff), axis=(1, 2)),
          "sft": counted * -take(logps) / jnp.maximum(take(lengths), 1.0),
          "best_p": counted * take(p),
          "correct": jnp.sum(ordered * (diff > 0), axis=(1, 2)),
          "pairs": jnp.sum(ordered, axis=(1, 2)), "counted": counted}


def rrhf_sums(logps, lengths, scores, valid, *, rank_weight: float = 1.0,
              length_penalty: float = 1.0):
  """(loss sum over counted prompts, sums: ``prompts``, ``pairs``, ``correct`` and the
  :data:`METRICS` numerators). Divide once over the whole (accumulated) batch (:func:`means`)."""
  t = rrhf_terms(logps, lengths, scores, valid, length_penalty=length_penalty)
  w = t["counted"]
  sums = {"prompts": jnp.sum(w), "pairs": jnp.sum(t["pairs"]), "correct": jnp.sum(t["correct"]),
          "rrhf_loss": jnp.sum(w * t["rank"]), "sft_loss": jnp.sum(t["sft"]),
          "logps/best": jnp.sum(t["best_p"])}
  return rank_weight * sums["rrhf_loss"] + sums["sft_loss"], sums


def means(loss_sum: jax.Array, sums: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """``loss`` and :data:`METRICS` per counted prompt, ``ranking_accuracy`` per ordered pair (0
  when there is none)."""
  d = jnp.maximum(sums["prompts"], 1.0)
  return {"loss": loss_sum / d, **{k: sums[k] / d for k in METRICS},
          "ranking_accuracy": sums["correct"] / jnp.maximum(sums["pairs"], 1.0)}


def rrhf_loss(logps, lengths, scores, valid, *, rank_weight: float = 1.0,
              length_penalty: float = 1.0):
  """The RRHF loss of a batch of prompts (Yuan et al. 2023, Eq. 4) and its metrics.

  Args: as :func:`rrhf_terms`; rank_weight: weight of ``L_rank`` (>= 0; paper: 1).
  Returns:
    (loss [] float32: the mean over counted prompts of ``rank_weight * L_rank + L_ft``, metrics:
    ``rrhf_loss``, ``sft_loss``, ``logps/best``, ``ranking_accuracy``, ``prompts``, ``pairs``).
  """
  total, sums = rrhf_sums(logps, lengths, scores, valid, rank_weight=rank_weight,
                          length_penalty=length_penalty)
  metrics = means(total, sums)
  return metrics.pop("loss"), {**metrics, "prompts": sums["prompts"], "pairs": sums["pairs"]}


def candidate_logprobs(params: Any, cfg: LlamaConfig, batch: Batch):
  """(logps [b, k], lengths [b, k]) of every candidate row: one forward pass of [b * k, t]
  rows (``dpo.step.sequence_logprobs``); lengths count the scored response tokens."""
  b, k, t = batch["tokens"].shape
  flat = lambda x: jnp.reshape(x, (b * k, t))
  logps = sequence_logprobs(params, cfg, flat(batch["tokens"]), flat(batch["mask"]),
                            flat(batch["response_mask"]))
  lengths = jnp.sum(jnp.asarray(batch["response_mask"][:, :, 1:], jnp.float32), axis=2)
  return jnp.reshape(logps, (b, k)), lengths


def _loss_terms(params, batch: Batch, cfg: LlamaConfig, rank_weight: float,
                length_penalty: float):
  logps, lengths = candidate_logprobs(params, cfg, batch)
  return rrhf_sums(logps, lengths, batch["scores"], batch["valid"], rank_weight=rank_weight,
                   length_penalty=length_penalty)


def train_step(state: TrainState, batch: Batch, rng: Optional[jax.Array] = None, *,
               cfg: LlamaConfig, optimizer: optax.GradientTransformation,
               rank_weight: float = 1.0, length_penalty: float = 1.0, accum_steps: int = 1):
  """One RRHF optimizer step (pure; jit with ``donate_argnums=0``).

  Loss = the sum over counted prompts of ``rank_weight * L_rank + L_ft`` / their number, both
  over the whole batch, split into ``accum_steps`` microbatches of prompts
  (``train.state.accumulate_sums``: the same gradient as one pass).

  Args:
    state: TrainState of the policy. batch: the module docstring's batch (``b`` divisible by
      ``accum_steps``). rng: unused. cfg, optimizer, rank_weight, length_penalty, accum_steps:
      static.
  Returns:
    (new_state, metrics) float32 scalars: ``loss``, ``rrhf_loss``, ``sft_loss``, ``logps/best``,
    ``ranking_accuracy``, ``prompts``, ``pairs``, ``real_tokens``, ``grad_norm``, ``skipped``,
    ``nonfinite``.
  """
  del rng
  batch = {k: batch[k] for k in KEYS}
  total, sums, grads = accumulate_sums(
      lambda p, b: _loss_terms(p, b, cfg, rank_weight, length_penalty), state.params, batch,
      accum_steps)
  new_state, metrics = apply_gradients(state, grads, sums["prompts"], optimizer)
  metrics.update(means(total, sums), prompts=sums["prompts"], pairs=sums["pairs"],
                 real_tokens=jnp.sum(batch["mask"]).astype(jnp.float32))
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, cfg: LlamaConfig, rank_weight: float = 1.0,
              length_penalty: float = 1.0) -> dict:
  """Sums over the counted prompts of a held-out batch: ``loss_sum`` and ``rrhf_sums``' keys
  (replicated float32 scalars)."""
  total, sums = _loss_terms(params, batch, cfg, rank_weight, length_penalty)
  return {"loss_sum": total, **sums}
