"""The stage-independent training loop: steps, logging, evaluation, checkpoints, SIGTERM/SIGINT.

A stage hands :func:`run_loop` a prepared :class:`~llama_jax.train.stage.Run` (a step
``(state, batch, rng) -> (state, metrics)``, batches, optional evaluation and hooks); the loop
does the rest the same way for every stage, SFT, reward models and PPO alike.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

import jax
import numpy as np

from llama_jax.train.checkpoint import Checkpointer, StopSignal, all_finite
from llama_jax.train.metrics import MetricWriter, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopResult:
  """What a call to :func:`run_loop` did.

  Attributes:
    state: the state after the last step. last_step: steps taken in all (earlier runs included).
    stopped_by_signal: SIGTERM/SIGINT stopped the loop (it saved first).
    stopped_early: the stage's ``should_stop`` ended training (e.g. PPO's patience).
    last_metrics: the last logged train metrics. last_eval: the last evaluation's metrics.
    totals: running totals over every step of the stage (earlier runs included), e.g.
      ``tokens_trained`` (``Run.totals``); a total is None when the run resumed from a
      checkpoint saved without it (an older version).
  """

  state: Any
  last_step: int
  stopped_by_signal: bool
  stopped_early: bool
  last_metrics: dict
  last_eval: dict
  totals: dict = dataclasses.field(default_factory=dict)


class _Loop:
  """One call of :func:`run_loop` (its mutable bookkeeping, kept out of the step)."""

  def __init__(self, run, checkpointer: Optional[Checkpointer], writer: MetricWriter, start: int):
    self.run, self.ckpt, self.writer, self.start = run, checkpointer, writer, start
    self.progress = Progress(run.total_steps, start, run.desc)
    self.window: list = []
    self.tick = time.perf_counter()
    self.last_metrics: dict = {}
    self.last_eval: dict = {}
    self.saved_step = start
    self.nonfinite_run = 0  # consecutive steps skipped for a NaN/Inf loss or gradient
    self.finite = jax.jit(all_finite)
    saved = checkpointer.metadata(start).get("totals", {}) if checkpointer and start else {}
    self.totals = {name: (saved.get(name) if start else 0.0) for name in run.totals.values()}

  def _add(self, totals: dict, host: list) -> dict:
    """``totals`` plus the ``run.totals`` metrics summed over the steps ``host`` (None stays)."""
    out = dict(totals)
    for key, name in self.run.totals.items():
      if out[name] is not None:
        out[name] += float(sum(x.get(key, 0.0) for x in host))
    return out

  def current_totals(self) -> dict:
    """The running totals up to the last step taken (logged window or not)."""
    keys = set(self.run.totals)
    return self._add(self.totals, jax.device_get(
        [{k: v for k, v in x.items() if k in keys} for x in self.window]))

  def check_nonfinite(self, host: list, step: int) -> None:
    """Count consecutive non-finite steps of the window; halt after ``max_nonfinite_steps``.

    Raises:
      FloatingPointError: naming the step and the last checkpoint (its params are finite: a
        non-finite step never updates the state).
    """
    for m in host:
      self.nonfinite_run = self.nonfinite_run + 1 if m.get("nonfinite", 0.0) > 0 else 0
      limit = self.run.max_nonfinite_steps
      if limit and self.nonfinite_run >= limit:
        raise FloatingPointError(
            f"{self.run.desc}: {self.nonfinite_run} consecutive steps with a NaN/Inf loss or "
            f"gradient (skipped), up to step {step}; the last checkpoint (step "
            f"{self.saved_step}) is finite. Lower config.optimizer.lr, check the data, or raise "
            "config.train.max_nonfinite_steps")

  def log(self, step: int) -> None:
    """Average the window of step metrics, write them and advance the progress bar."""
    host = jax.device_get(self.window)
    now = time.perf_counter()
    m = {k: float(np.mean([x[k] for x in host])) for k in host[0]}
    if self.run.tokens_key in m:
      m["tokens_per_s"] = float(sum(x[self.run.tokens_key] for x in host)) / (now - self.tick)
    m["steps_per_s"] = len(host) / (now - self.tick)
    self.totals = self._add(self.totals, host)
    m.update({k: v for k, v in self.totals.items() if v is not None})
    self.writer.write(step, m, "train")
    key = self.run.progress_key
    shown = {key: f"{m.get(key, float('nan')):.4g}"}
    if "tokens_per_s" in m:
      shown["tok_s"] = f"{m['tokens_per_s']:.0f}"
    self.progress.update(len(host), **shown)
    self.last_metrics, self.window, self.tick = m, [], time.perf_counter()
    self.check_nonfinite(host, step)  # after the rows are written: they show the NaN steps

  def save(self, step: int, state, batches) -> None:
    """Checkpoint ``state`` (and a checkpointable iterator) at ``step``; ``on_save`` after."""
    if self.ckpt is None:
      return
    if not bool(self.finite(state)):  # cannot happen through apply_gradients; never saved
      raise FloatingPointError(f"{self.run.desc}: the state at step {step} holds NaN/Inf values; "
                               f"not saved (the last checkpoint, step {self.saved_step}, is kept)")
    self.ckpt.save(step, state, batches if hasattr(batches, "get_state") else None,
                   metadata={"totals": self.current_totals()})
    self.saved_step = step
    if self.run.on_save is not None:
      self.ckpt.wait()
      self.run.on_save(step)

  def evaluate(self, state, step: int) -> None:
    self.last_eval = dict(self.run.evaluate(state, step))
    self.writer.write(step, self.last_eval, "eval")

  def finish(self, state, step: int, batches) -> None:
    """Save the final state if it is not saved yet: before any final evaluation, so an
    evaluation that fails does not lose the run (the next call resumes and evaluates again)."""
    if self.window:
      self.log(step)
    if self.ckpt is not None and (self.saved_step != step or step not in self.ckpt.all_steps()):
      self.ckpt.wait()
      self.save(step, state, batches)
    if self.ckpt is not None:
      self.ckpt.wait()


def run_loop(run, state, start: int, checkpointer: Optional[Checkpointer],
             writer: MetricWriter) -> LoopResult:
  """Run ``run.step_fn`` from step ``start`` to ``run.total_steps``.

  Args:
    run: the prepared :class:`~llama_jax.train.stage.Run` (step, batches, hooks, intervals).
    state: the (possibly restored) state at step ``start``.
    checkpointer: saves every ``checkpointer.save_every`` steps and at the end (None = never).
    writer: metric writer (TensorBoard + JSONL); train metrics are averaged over
      ``run.log_every`` steps, evaluations written under ``eval``.
  Raises:
    FloatingPointError: after ``run.max_nonfinite_steps`` consecutive non-finite steps, or if
      a state to save is not finite (nothing non-finite is ever checkpointed or exported).
  Returns:
    LoopResult. On SIGTERM or SIGINT the loop stops between steps, waits for an in-flight save,
    saves at the current step and returns normally (so the program exits 0); with
    ``run.stop_after_steps`` > 0 it stops the same way after that many steps of this call.
  """
  stop = StopSignal(grace_s=run.stop_grace_s)
  loop = _Loop(run, checkpointer, writer, start)
  batches, step = run.batches, start
  early = run.should_stop()  # a resumed run that had stopped early stays stopped
  end = run.total_steps if run.stop_after_steps <= 0 else min(run.total_steps,
                                                               start + run.stop_after_steps)
  try:
    if run.evaluate is not None and run.eval_at_start and start == 0:
      loop.evaluate(state, 0)
    while step < end and not stop.requested and not early:
      state, metrics = run.step_fn(state, run.put_batch(next(batches)), run.rng_fn(state, step))
      step += 1
      loop.window.append(metrics)
      if step % run.log_every == 0 or step == end:
        loop.log(step)
      periodic_eval = run.eval_every > 0 and step % run.eval_every == 0
      if run.evaluate is not None and periodic_eval and (step != run.total_steps
                                                          or not run.final_eval):
        loop.evaluate(state, step)
        early = run.should_stop()
      if checkpointer is not None and (checkpointer.should_save(step) or early):
        loop.save(step, state, batches)
      if early:
        log.info("%s: stopped early at step %d", run.desc, step)
        break
    if stop.requested:
      stop.acknowledge()
      log.warning("stop signal received: saving at step %d and exiting", step)
    loop.finish(state, step, batches)
    if run.evaluate is not None and run.final_eval and step == run.total_steps and not stop.requested:
      loop.evaluate(state, step)
  finally:
    stop.restore()
    loop.progress.close()
  return LoopResult(state, step, stop.requested, early, loop.last_metrics, loop.last_eval,
                    loop.current_totals())
