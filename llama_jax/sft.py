"""Supervised fine-tuning: train state and the pure, top-level SFT step.

Llama 2 paper, Sec. 3.1: prompt and answer are packed into ``max_seq_len`` and the loss on prompt
(user) tokens is zeroed, so only answer tokens are trained.

Batch dict (from ``llama_jax.data``), all [b, t]: ``inputs`` int32, ``targets`` int32 (next token),
``loss_mask`` float32 (1 on supervised targets), ``segment_ids`` int32 (0 = padding, 1.. per
packed example), ``positions`` int32 (restarting at 0 per example).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llama_jax.config import LlamaConfig
from llama_jax.losses import cross_entropy
from llama_jax.model import forward

Batch = Dict[str, jax.Array]
SFT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step changes, as one pytree (checkpointed whole).

  Attributes:
    step: [] int32, number of steps taken (batches consumed, including skipped ones).
    params: model parameters (plus heads for reward/value models).
    opt_state: optax state of the optimizer.
    rng: [2] uint32 raw PRNG key data; step ``i`` uses ``fold_in(rng, i)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state at step 0 (jit it with ``out_shardings`` for sharded models)."""
  rng = jax.random.key_data(jax.random.key(seed))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def step_rng(state: TrainState) -> jax.Array:
  """The PRNG key of the state's current step."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def sft_loss_terms(params, batch: Batch, cfg: LlamaConfig):
  """(summed NLL over supervised tokens, number of supervised tokens) for one [b, t] batch."""
  logits = forward(params, batch["inputs"], cfg, positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
  return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def split_microbatches(batch: Batch, accum_steps: int) -> Batch:
  """[b, ...] -> [accum_steps, b / accum_steps, ...], interleaved (microbatch i = rows i,
  i + accum_steps, ...) so every microbatch spans all batch shards and needs no resharding.
  Raises ValueError if b is not divisible."""
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {accum_steps}")
    return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_terms, params, batch: Batch, accum_steps: int):
  """Sum ``loss_terms(params, microbatch) -> (loss_sum, count)`` and its gradient over microbatches.

  Returns (loss_sum, count, grad_of_loss_sum); the caller divides by the total count once, so
  every supervised token has the same weight however the batch was split.
  """
  grad_fn = jax.value_and_grad(loss_terms, has_aux=True)
  if accum_steps == 1:
    (total, count), grads = grad_fn(params, batch)
    return total, count, grads

  def body(carry, micro):
    total, count, grads = carry
    (t, c), g = grad_fn(params, micro)
    return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  (total, count, grads), _ = jax.lax.scan(body, init, split_microbatches(batch, accum_steps))
  return total, count, grads


def apply_gradients(state: TrainState, grads, count, optimizer: optax.GradientTransformation):
  """Optimizer update with grads of the loss *sum* divided by ``count``; a batch with no
  supervised token (count == 0) leaves params and optimizer state untouched (``skipped`` = 1),
  so it can never produce a NaN or a silent zero-loss update."""
  ok = count > 0
  grads = jax.tree.map(lambda g, p: (g / jnp.maximum(count, 1.0)).astype(p.dtype), grads, state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, {"grad_norm": optax.tree.norm(grads), "skipped": 1.0 - ok.astype(jnp.float32)}


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
