"""Supervised fine-tuning: the pure, top-level SFT step (train state: ``llama_jax.train.state``).

Llama 2 paper, Sec. 3.1: prompt and answer are packed into ``max_seq_len`` and the loss on prompt
(user) tokens is zeroed, so only answer tokens are trained.

Batch dict (from ``llama_jax.data``), all [b, t]: ``inputs`` int32, ``targets`` int32 (next token),
``loss_mask`` float32 (1 on supervised targets), ``segment_ids`` int32 (0 = padding, 1.. per
packed example), ``positions`` int32 (restarting at 0 per example).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.losses import cross_entropy
from llama_jax.model import forward
from llama_jax.train.state import Batch, TrainState, accumulate_gradients, apply_gradients

SFT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def sft_loss_terms(params, batch: Batch, cfg: LlamaConfig):
  """(summed NLL over supervised tokens, number of supervised tokens) for one [b, t] batch."""
  logits = forward(params, batch["inputs"], cfg, positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
  return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def train_step(state: TrainState, batch: Batch, rng: Optional[jax.Array] = None, *,
               cfg: LlamaConfig, optimizer: optax.GradientTransformation,
               accum_steps: int = 1):
  """One SFT optimizer step (pure; jit with ``donate_argnums=0``).

  Args:
    state: TrainState.
    batch: SFT batch dict, [b, t] arrays (``b`` divisible by ``accum_steps``).
    rng: unused by SFT (kept for the common step signature).
    cfg, optimizer, accum_steps: static (bind with functools.partial before jitting).
  Returns:
    (new_state, metrics) with float32 scalars ``loss`` (mean NLL per supervised token),
    ``tokens`` (supervised tokens), ``real_tokens`` (non-padding), ``grad_norm``, ``skipped``.
  """
  del rng
  loss_sum, count, grads = accumulate_gradients(
      lambda p, b: sft_loss_terms(p, b, cfg), state.params, batch, accum_steps)
  new_state, metrics = apply_gradients(state, grads, count, optimizer)
  metrics.update(loss=loss_sum / jnp.maximum(count, 1.0), tokens=count,
                 real_tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32))
  return new_state, metrics


def eval_step(params, batch: Batch, *, cfg: LlamaConfig):
  """Summed NLL and supervised-token count of one batch (for held-out loss / perplexity)."""
  loss_sum, count = sft_loss_terms(params, batch, cfg)
  return {"loss_sum": loss_sum, "tokens": count}
