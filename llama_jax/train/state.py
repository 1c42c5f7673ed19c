"""Train state and the generic parts of a training step every stage shares: PRNG per step,
microbatching with gradient accumulation, the optimizer update, and the shape-first sharded
construction of the state and its jitted step (:class:`StateSetup`).

Batch dicts hold [b, ...] arrays with the batch first; a stage's step function
``(state, batch, rng) -> (state, metrics)`` builds on these.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.train.checkpoint import Checkpointer, restore_params

Batch = Dict[str, jax.Array]


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
  return accumulate_sums(loss_terms, params, batch, accum_steps)


def accumulate_sums(loss_terms, params, batch: Batch, accum_steps: int):
  """:func:`accumulate_gradients` with any pytree of sums as ``loss_terms``' aux
  (``(loss_sum, aux_sums)``): returns ``(loss_sum, aux_sums, grad_of_loss_sum)``, each summed
  over the ``accum_steps`` microbatches (:func:`split_microbatches`; one pass, no scan, for 1).
  Only one microbatch's activations are live at a time."""
  grad_fn = jax.value_and_grad(loss_terms, has_aux=True)
  if accum_steps == 1:
    (total, aux), grads = grad_fn(params, batch)
    return total, aux, grads

  def body(carry, micro):
    (t, a), g = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (t, a, g)), None

  micro = split_microbatches(batch, accum_steps)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  (t0, a0), g0 = shapes
  init = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (t0, a0, g0))
  (total, aux, grads), _ = jax.lax.scan(body, init, micro)
  return total, aux, grads


def apply_gradients(state: TrainState, grads, count, optimizer: optax.GradientTransformation):
  """Optimizer update with grads of the loss *sum* divided by ``count``.

  A batch with no supervised token (count == 0) or a non-finite gradient (NaN/Inf anywhere: a
  non-finite loss gives one too) leaves params and optimizer state untouched, so a NaN never
  enters the state. Metrics: ``grad_norm``, ``skipped`` (1 when not applied), ``nonfinite`` (1
  when skipped for a non-finite gradient; the loop halts after
  ``train.max_nonfinite_steps`` such steps in a row).
  """
  grads = jax.tree.map(lambda g, p: (g / jnp.maximum(count, 1.0)).astype(p.dtype), grads, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)
  ok = (count > 0) & finite
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, {"grad_norm": grad_norm, "skipped": 1.0 - ok.astype(jnp.float32),
                     "nonfinite": ((count > 0) & ~finite).astype(jnp.float32)}



class StateSetup:
  """Shape-first construction of a sharded TrainState and its jitted step.

  Args:
    cfg: model config; mesh, rules: from ``build.mesh_and_rules``.
    optimizer: optax transformation; seed: base seed of the state's RNG.
    abstract_params: params tree of ``jax.ShapeDtypeStruct`` with shardings (default: the Llama
      params of ``cfg``; stages with extra heads pass their own).
  """

  def __init__(self, cfg: LlamaConfig, mesh, rules, optimizer: optax.GradientTransformation,
               seed: int, abstract_params: Optional[Any] = None):
    self.cfg, self.mesh, self.rules, self.optimizer, self.seed = cfg, mesh, rules, optimizer, seed
    self.abstract_params = (abstract_params if abstract_params is not None
                            else sharding.abstract_params(cfg, mesh, rules))
    self.abstract_state = jax.eval_shape(
        functools.partial(init_train_state, optimizer=optimizer, seed=seed), self.abstract_params)
    self.state_shardings = sharding.state_shardings(self.abstract_state, self.abstract_params, mesh)
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = sharding.batch_sharding(mesh, rules)

  def abstract_sharded_state(self):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.abstract_state, self.state_shardings)

  def fresh_state(self, init_params: Callable[[], Any]) -> TrainState:
    """A step-0 state from params returned by ``init_params()`` (already sharded)."""
    make = jax.jit(functools.partial(init_train_state, optimizer=self.optimizer, seed=self.seed),
                   out_shardings=self.state_shardings)
    return make(init_params())

  def start(self, checkpointer: Checkpointer, data_iterator: Any, init_params: Callable[[], Any]):
    """Resume from the latest checkpoint (restoring the data iterator in place) or start fresh."""
    if checkpointer.latest_step() is not None:
      return checkpointer.restore(self.abstract_sharded_state(), data_iterator)
    return self.fresh_state(init_params)

  def jit_step(self, step_fn: Callable, donate: bool = True):
    """``step_fn(state, batch, rng)`` jitted with explicit shardings and a donated state."""
    return sharding.jit_step(step_fn, self.mesh, self.rules,
                             in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=(0,) if donate else ())

  def lower_step(self, step_fn: Callable, abstract_batch: Any):
    """AOT-lower the jitted step on abstract inputs (for ``--dry_run`` memory plans)."""
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding),
                         abstract_batch)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    return self.jit_step(step_fn).lower(self.abstract_sharded_state(), batch, rng)


def init_params_fn(config, cfg: LlamaConfig, setup: StateSetup) -> Callable[[], Any]:
  """Params initializer: ``config.init_from`` restored into the shardings, or random init."""
  if config.get("init_from", ""):
    return lambda: restore_params(config.init_from, setup.abstract_params)
  return lambda: sharding.init_params_sharded(cfg, jax.random.key(config.seed), setup.mesh, setup.rules)
