"""Plumbing every training stage shares: workdir hygiene, sharded state, init_from, export.

A stage's workdir holds ``config.json``, ``checkpoints/`` (orbax, resumable), ``logs/``
(TensorBoard events + ``metrics.jsonl``), ``samples/`` and, when finished, ``final/``
(``params.json`` + orbax ``params/``, the format of ``llama_jax.convert.save_orbax``, readable by
``config.init_from`` of the next stage).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from typing import Any, Callable, Optional

import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import convert, sharding
from llama_jax.checkpoint import Checkpointer
from llama_jax.config import LlamaConfig
from llama_jax.sft import TrainState, init_train_state

FINAL = "final"


@contextlib.contextmanager
def clean_on_failure(workdir: str):
  """If ``workdir`` did not exist before and the block raises, remove it: a run that fails
  validation (bad record, bad config) leaves nothing behind."""
  existed = os.path.exists(workdir)
  try:
    yield
  except BaseException:
    if not existed and jax.process_index() == 0:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def restore_params(path: str, abstract_params: Any) -> Any:
  """Params of a ``final/`` (or ``convert --to orbax``) directory, restored straight into the
  shardings of ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with ``sharding``).

  Raises:
    FileNotFoundError: if ``path/params`` is missing.
  """
  target = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"init_from: orbax params directory {target} not found")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(target, abstract_params)


def export_params(workdir: str, cfg: LlamaConfig, params: Any, name: str = FINAL) -> str:
  """Write ``<workdir>/<name>/`` (params.json + orbax params), replacing an older export."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  convert.save_orbax(path, cfg, params)
  return path


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
