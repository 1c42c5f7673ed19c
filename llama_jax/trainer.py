"""The stage-independent training loop: steps, logging, evaluation, checkpoints, SIGTERM.

A stage (SFT, reward, ...) supplies a jitted step ``(state, batch, rng) -> (state, metrics)``, a
checkpointable iterator of host batches, and an optional evaluation callback; this loop does the
rest the same way for every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

from llama_jax.checkpoint import Checkpointer, StopSignal
from llama_jax.metrics import MetricWriter, Progress
from llama_jax.sft import TrainState, step_rng

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopResult:
  """What a call to :func:`run_loop` did."""

  state: TrainState
  last_step: int
  stopped_by_signal: bool
  last_metrics: dict
  last_eval: dict


def run_loop(state: TrainState, step_fn: Callable, batches: Iterator, *, total_steps: int,
             checkpointer: Optional[Checkpointer], writer: MetricWriter,
             log_every: int = 10, eval_every: int = 0,
             eval_fn: Optional[Callable[[TrainState, int], Mapping[str, float]]] = None,
             put_batch: Callable[[Any], Any] = lambda b: b, desc: str = "train",
             tokens_key: str = "real_tokens", stop_after_steps: int = 0) -> LoopResult:
  """Run ``step_fn`` from ``state.step`` to ``total_steps``.

  Args:
    state: the (possibly restored) train state.
    step_fn: jitted ``(state, batch, rng) -> (state, metrics)`` (state donated).
    batches: iterator of host batches; saved with the checkpoint if it has ``get_state``.
    total_steps: stop after this many steps in all (counting earlier runs).
    checkpointer: saves every ``checkpointer.save_every`` steps and at the end (None = never).
    writer: metric writer (TensorBoard + JSONL).
    log_every: write train metrics (averaged over the interval) every N steps.
    eval_every: call ``eval_fn(state, step)`` every N steps (and at the end if given, after
      the final checkpoint is written).
    put_batch: host batch -> device arrays (e.g. a sharded ``device_put``).
    desc: progress bar label. tokens_key: metric counted for tokens/s.
    stop_after_steps: if > 0, stop after this many steps in this call (checkpointing as on
      SIGTERM), e.g. to split a long run into time-limited jobs; resume continues exactly.
  Returns:
    LoopResult. On SIGTERM the loop stops between steps, waits for an in-flight save, saves at
    the current step and returns normally (so the program exits 0).
  """
  stop = StopSignal()
  start = int(state.step)
  progress = Progress(total_steps, start, desc)
  window: list[dict] = []
  tick = time.perf_counter()
  last_metrics: dict = {}
  last_eval: dict = {}
  saved_step = start
  try:
    end = total_steps if stop_after_steps <= 0 else min(total_steps, start + stop_after_steps)
    for _ in range(start, end):
      if stop.requested:
        log.warning("SIGTERM received: saving at step %d and exiting", int(state.step))
        break
      batch = put_batch(next(batches))
      state, metrics = step_fn(state, batch, step_rng(state))
      step = int(state.step)
      window.append(metrics)
      if step % log_every == 0 or step == end:
        host = jax.device_get(window)
        now = time.perf_counter()
        last_metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        if tokens_key in last_metrics:
          last_metrics["tokens_per_s"] = float(sum(m[tokens_key] for m in host)) / (now - tick)
        last_metrics["steps_per_s"] = len(host) / (now - tick)
        writer.write(step, last_metrics, "train")
        progress.update(len(host), loss=last_metrics.get("loss", float("nan")),
                        tok_s=f"{last_metrics.get('tokens_per_s', 0.0):.0f}")
        window, tick = [], time.perf_counter()
      if checkpointer is not None and checkpointer.should_save(step):
        checkpointer.save(step, state, batches if hasattr(batches, "get_state") else None)
        saved_step = step
      if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step != total_steps:
        last_eval = dict(eval_fn(state, step))
        writer.write(step, last_eval, "eval")
    if window:
      progress.update(len(window))
    step = int(state.step)
    # Save before the final evaluation: an evaluation that fails must not lose the run (the
    # next call resumes at total_steps and evaluates again).
    if checkpointer is not None and (saved_step != step or step not in checkpointer.all_steps()):
      checkpointer.wait()
      checkpointer.save(step, state, batches if hasattr(batches, "get_state") else None)
    if checkpointer is not None:
      checkpointer.wait()
    if eval_fn is not None and step == total_steps and not stop.requested:
      last_eval = dict(eval_fn(state, step))
      writer.write(step, last_eval, "eval")
  finally:
    stop.restore()
    progress.close()
  return LoopResult(state, int(state.step), stop.requested, last_metrics, last_eval)
