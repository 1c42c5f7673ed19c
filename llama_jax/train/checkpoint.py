"""Orbax checkpoints of a training stage: train state + data iterator state, async, keep-N.

Layout: ``<workdir>/checkpoints/<step>/{state,data,checksums.json}``. Orbax writes each step into
a temporary directory and renames it only once complete, so a save killed midway leaves the
previous checkpoint intact and ``latest_step`` never returns a partial one. Once a save is
complete, process 0 adds ``checksums.json`` (``convert.write_checksums``), and a restore checks
it first, so a file changed on disk afterwards (a flipped bit) is detected: ``restore_intact``
then falls back to the newest intact checkpoint. A checkpoint without the list (killed between
the two) restores unverified.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from llama_jax import convert

log = logging.getLogger(__name__)


class Checkpointer:
  """Save/restore ``TrainState`` (and a grain iterator) under ``directory``.

  Args:
    directory: checkpoint root (created on the first save, not before).
    save_every: save when ``step % save_every == 0`` (0 = only explicit/forced saves).
    keep: number of most recent checkpoints to keep.
    async_save: write in a background thread (orbax async checkpointing).
    checksums: write ``checksums.json`` into each completed checkpoint and verify it on restore
      (reading every file: ~1 GB/s).
  """

  def __init__(self, directory: str, save_every: int = 0, keep: int = 3, async_save: bool = True,
               checksums: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.checksums = checksums
    self._unlisted: Optional[int] = None  # the step whose save may still be in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        save_decision_policy=None)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metadata: Optional[dict] = None) -> bool:
    """Start saving (async unless disabled). Returns False if a checkpoint of ``step`` exists.
    ``metadata``: a small JSON dict kept with the step (orbax's ``custom_metadata``; e.g. the
    loop's running totals), read back by :meth:`metadata`."""
    if step in self.all_steps():
      return False
    self._list_finished()
    self._check_space(state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                               custom_metadata=metadata)
    if saved and self.checksums:
      self._unlisted = step
    return saved

  def metadata(self, step: int) -> dict:
    """The ``metadata`` dict saved with checkpoint ``step`` ({} when it was saved without one)."""
    return dict(self._manager.metadata(step).custom_metadata or {})

  def _check_space(self, state: Any):
    """Raises OSError(ENOSPC) before a save that cannot fit on the disk (orbax would fail
    midway in its background threads, burying the cause under hundreds of lines)."""
    need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) + (64 << 20)
    where = self.directory
    while not os.path.exists(where):
      where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < need:
      raise OSError(errno.ENOSPC, f"no space left for a checkpoint in {self.directory}: "
                    f"{free / 2**30:.2f} GiB free, a checkpoint needs ~{need / 2**30:.2f} GiB "
                    "(the last complete checkpoint is kept)")

  def step_dir(self, step: int) -> str:
    """The directory of checkpoint ``step`` (orbax's default step naming)."""
    return os.path.join(self.directory, str(step))

  def _list_finished(self):
    """Wait for the in-flight save, then write its ``checksums.json`` (process 0)."""
    if self._unlisted is None:
      return
    self._manager.wait_until_finished()
    step, self._unlisted = self._unlisted, None
    if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
      convert.write_checksums(self.step_dir(step))

  def restore(self, abstract_state: Any, data_iterator: Any = None, step: Optional[int] = None):
    """Restore ``step`` (default: latest) into the structure/shardings of ``abstract_state``
    (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``, e.g. from ``jax.eval_shape``).
    The data iterator, if given, is restored in place. Raises FileNotFoundError if none exists."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if self.checksums:
      convert.verify_checksums(self.step_dir(step))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_intact(self, abstract_state: Any, data_iterator: Any = None):
    """``(state, step)`` of the newest checkpoint that restores (state and data iterator): a
    damaged newer one (missing metadata, truncated shard, empty step directory, missing
    iterator state, a file that disagrees with its ``checksums.json``) is skipped with a warning naming it.

    Raises:
      FileNotFoundError: if there is no checkpoint. ValueError: if none restores, with each
        step's error.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for step in steps:
      try:
        state = self.restore(abstract_state, data_iterator, step)
      except Exception as err:  # pylint: disable=broad-except  (orbax, grain, tensorstore)
        errors.append(f"step {step}: {type(err).__name__}: {err}")
        log.warning("checkpoint %s/%d is damaged (%s); trying an older one", self.directory, step,
                    errors[-1][:300])
        continue
      self._set_aside(steps[:len(errors)])
      return state, step
    raise ValueError(f"no intact checkpoint in {self.directory}: " + "; ".join(
        e[:300] for e in errors))

  def _set_aside(self, damaged):
    """Rename damaged steps to ``damaged-<step>`` (kept for inspection, ignored by orbax) so the
    resumed run can save those steps again."""
    if not damaged:
      return
    if jax.process_count() > 1:  # every process has finished reading before they move
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    if jax.process_index() == 0:
      for step in damaged:
        target = os.path.join(self.directory, f"damaged-{step}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(self.step_dir(step), target)
        log.warning("moved the damaged checkpoint %s to %s", self.step_dir(step), target)
    self._manager.reload()

  def wait(self):
    """Block until the in-flight async save (if any) is complete (and its checksums written)."""
    self._manager.wait_until_finished()
    self._list_finished()

  def close(self):
    self.wait()
    self._manager.close()


def all_finite(tree: Any) -> jax.Array:
  """[] bool: every float leaf of ``tree`` is finite (one reduction per leaf; jit it)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_finite(params: Any, where: str) -> None:
  """Raises ValueError naming ``where`` and the first leaf path with a NaN or Inf."""
  if bool(jax.jit(all_finite)(params)):
    return
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"{where}: parameter {jax.tree_util.keystr(path)} holds NaN or Inf values; "
                       "refusing to use a non-finite model")
  raise ValueError(f"{where}: parameters hold NaN or Inf values; refusing to use them")


def restore_params(path: str, abstract_params: Any) -> Any:
  """Params of a ``final/`` (or ``convert --to orbax``) directory, restored straight into the
  shardings of ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with ``sharding``).

  Raises:
    FileNotFoundError: if ``path/params`` is missing. ValueError: if a parameter is not finite,
      its saved shape differs from ``abstract_params`` (naming it), or a file disagrees with ``path/checksums.json`` (``convert.verify_checksums``).
  """
  target = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"init_from: orbax params directory {target} not found")
  convert.verify_checksums(path)
  with ocp.StandardCheckpointer() as ckptr:
    _check_saved_shapes(ckptr.metadata(target).item_metadata.tree, abstract_params, path)
    params = ckptr.restore(target, abstract_params)
  check_finite(params, f"init_from {path}")
  return params


def _check_saved_shapes(saved: Any, abstract_params: Any, path: str) -> None:
  """Raises ValueError naming the first parameter whose saved shape (or presence) differs."""
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(saved), shapes(abstract_params)
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise ValueError(
          f"init_from {path}: parameter {name} is {got.get(name, 'absent')} there but the model "
          f"(config.model and {os.path.join(path, 'params.json')}) needs "
          f"{want.get(name, 'no such parameter')}: the checkpoint does not match its params.json")


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` tree (with shardings) mirroring concrete or abstract arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class StopSignal:
  """Turns SIGTERM and SIGINT into a flag the training loop checks between steps.

  The loop then calls :meth:`acknowledge`, waits for any in-flight save, saves at the current
  step, and exits 0. A run that does not reach the next step still ends: a second signal
  restores the previous handlers and re-delivers itself (a second Ctrl-C raises
  KeyboardInterrupt), and without an acknowledgment within ``grace_s`` seconds of the first
  signal (a step stuck waiting on data or a device) the process exits with status 128 + the
  signal number, so a cluster's single preemption SIGTERM ends it (no save: the last checkpoint
  stands). Only
  installable from the main thread; elsewhere it is a flag that never fires.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), grace_s: float = 300.0):
    self.requested = False
    self.grace_s = grace_s
    self._previous = {}
    self._timer: Optional[threading.Timer] = None
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      self._redeliver(signum)
      return
    self.requested = True
    if self.grace_s > 0:
      self._timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
      self._timer.daemon = True
      self._timer.start()

  def _expire(self, signum):
    # A timer thread cannot restore signal handlers (main thread only): exit as the signal would.
    log.error("no step finished within %.0f s of signal %d: ending the run without saving (the "
              "last checkpoint stands)", self.grace_s, signum)
    logging.shutdown()
    os._exit(128 + signum)  # pylint: disable=protected-access

  def _redeliver(self, signum):
    self.restore()
    os.kill(os.getpid(), signum)  # the previous (default) handling applies

  def acknowledge(self):
    """The loop saw the flag and is saving: stop the grace timer."""
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None

  def restore(self):
    self.acknowledge()
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
