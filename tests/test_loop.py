"""train.loop.run_loop: the final checkpoint is written before the final evaluation; early
stopping; a second stop signal ends a run that does not reach the next step."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.train import loop
from llama_jax.train.checkpoint import Checkpointer
from llama_jax.train.metrics import MetricWriter
from llama_jax.train.stage import Run
from llama_jax.train.state import init_train_state


def _step(state, batch, rng):
  del rng
  params = {"w": state.params["w"] + batch}
  return state.replace(step=state.step + 1, params=params), {"loss": jnp.sum(batch)}


def _run(tmp_path, eval_fn, total_steps=3, **kw):
  state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=kw.pop("save_every", 0), keep=2,
                      async_save=True)
  run = Run(cfg=None, total_steps=total_steps, step_fn=jax.jit(_step),
            batches=iter([jnp.ones(2)] * 10), abstract_state=None, init_state=None,
            evaluate=eval_fn, log_every=1, **kw)
  try:
    return loop.run_loop(run, state, 0, ckpt, MetricWriter(str(tmp_path / "logs")))
  finally:
    ckpt.close()


def test_failing_final_evaluation_keeps_the_final_checkpoint(tmp_path):
  def bad_eval(state, step):
    raise RuntimeError(f"evaluation failed at step {step}")

  with pytest.raises(RuntimeError, match="step 3"):
    _run(tmp_path, bad_eval)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
  assert ckpt.latest_step() == 3
  abstract = jax.eval_shape(lambda: init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0))
  restored = ckpt.restore(abstract)
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), [3.0, 3.0])
  ckpt.close()


def test_final_evaluation_sees_the_final_state(tmp_path):
  seen = []
  result = _run(tmp_path, lambda state, step: seen.append((step, float(state.params["w"][0])))
                or {"score": 1.0})
  assert seen == [(3, 3.0)] and result.last_eval == {"score": 1.0} and result.last_step == 3


def test_should_stop_ends_training_after_an_evaluation_and_saves(tmp_path):
  evals = []
  result = _run(tmp_path, lambda state, step: evals.append(step) or {"score": float(step)},
                total_steps=6, eval_every=2, final_eval=False, should_stop=lambda: len(evals) >= 2)
  assert evals == [2, 4] and result.stopped_early and result.last_step == 4
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_eval_at_start_and_on_save_hook(tmp_path):
  evals, saves = [], []
  _run(tmp_path, lambda state, step: evals.append(step) or {}, total_steps=4, eval_every=2,
       eval_at_start=True, final_eval=False, save_every=2, on_save=saves.append)
  assert evals == [0, 2, 4] and saves == [2, 4]


def _token_step(state, batch, rng):
  del rng
  return state.replace(step=state.step + 1), {"loss": 0.0, "real_tokens": jnp.sum(batch),
                                              "sampled_tokens": 2 * jnp.sum(batch)}


def _token_run(tmp_path, start, stop_after, **kw):
  """Steps ``start``.. of a run whose step i has i + 1 real tokens; checkpoints every 2 steps."""
  state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0).replace(step=start)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=5, async_save=True)
  run = Run(cfg=None, total_steps=7, step_fn=_token_step, abstract_state=None, init_state=None,
            batches=iter([jnp.array([i + 1.0]) for i in range(start, 7)]), log_every=3,
            stop_after_steps=stop_after, **kw)
  try:
    return loop.run_loop(run, state, start, ckpt, MetricWriter(str(tmp_path / "logs"),
                                                               resume_step=start))
  finally:
    ckpt.close()


def test_running_totals_count_every_step_across_a_resume(tmp_path):
  totals = {"real_tokens": "tokens_trained", "sampled_tokens": "tokens_sampled"}
  first = _token_run(tmp_path, 0, 5, totals=totals)  # steps 1-5, saved at 2, 4 and 5 (the stop)
  assert first.last_step == 5 and first.totals == {"tokens_trained": 15.0, "tokens_sampled": 30.0}
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=5, async_save=False)
  try:  # each checkpoint holds the totals of its own step, though the log window (3) straddles it
    assert [ckpt.metadata(s)["totals"]["tokens_trained"] for s in (2, 4, 5)] == [3.0, 10.0, 15.0]
  finally:
    ckpt.close()
  second = _token_run(tmp_path, 5, 0, totals=totals)
  assert second.totals == {"tokens_trained": 28.0, "tokens_sampled": 56.0}  # 1 + ... + 7
  assert second.last_metrics["tokens_trained"] == 28.0  # logged as a running total too


def test_a_total_missing_from_the_checkpoint_is_none(tmp_path):
  _token_run(tmp_path, 0, 4)  # the default totals: real_tokens only
  res = _token_run(tmp_path, 4, 0, totals={"real_tokens": "tokens_trained",
                                           "sampled_tokens": "tokens_sampled"})
  assert res.totals == {"tokens_trained": 28.0, "tokens_sampled": None}


def _nan_step(flags):
  """A step whose metrics say ``nonfinite`` per the list ``flags`` (one entry per step)."""
  def step(state, batch, rng):
    del batch, rng
    return state.replace(step=state.step + 1), {"loss": 0.0,
                                                "nonfinite": float(flags[int(state.step)])}
  return step


def _run_steps(tmp_path, step_fn, total, **kw):
  state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0)
  run = Run(cfg=None, total_steps=total, step_fn=step_fn, batches=iter([None] * total),
            abstract_state=None, init_state=None, log_every=kw.pop("log_every", 1), **kw)
  return loop.run_loop(run, state, 0, None, MetricWriter(str(tmp_path / "logs")))


def test_consecutive_nonfinite_steps_halt_with_a_clear_error(tmp_path):
  with pytest.raises(FloatingPointError, match="3 consecutive steps with a NaN/Inf"):
    _run_steps(tmp_path, _nan_step([0, 1, 1, 1, 0, 0]), 6, max_nonfinite_steps=3)
  # Interrupted runs of non-finite steps are skipped and counted, not fatal.
  res = _run_steps(tmp_path, _nan_step([1, 1, 0, 1, 1, 0]), 6, max_nonfinite_steps=3, log_every=3)
  assert res.last_step == 6
  # 0 = never halt.
  assert _run_steps(tmp_path, _nan_step([1] * 6), 6, max_nonfinite_steps=0).last_step == 6


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
  def bad(state, batch, rng):
    del batch, rng
    return state.replace(step=state.step + 1, params={"w": state.params["w"] * jnp.nan}), {}
  state = init_train_state({"w": jnp.ones(2)}, optax.sgd(0.1), 0)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2, async_save=False)
  run = Run(cfg=None, total_steps=2, step_fn=bad, batches=iter([None] * 2), abstract_state=None,
            init_state=None, log_every=1)
  try:
    with pytest.raises(FloatingPointError, match="state at step 1 holds NaN/Inf values; not saved"):
      loop.run_loop(run, state, 0, ckpt, MetricWriter(str(tmp_path / "logs")))
    assert ckpt.latest_step() is None
  finally:
    ckpt.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_run_between_steps(tmp_path, sig):
  def step(state, batch, rng):
    del batch, rng
    if int(state.step) == 1:
      os.kill(os.getpid(), sig)
    return state.replace(step=state.step + 1), {"loss": 0.0}
  res = _run_steps(tmp_path, step, 5)
  assert res.stopped_by_signal and res.last_step == 2


def test_a_second_sigint_interrupts_at_once(tmp_path):
  def step(state, batch, rng):
    del batch, rng
    stop = signal.getsignal(signal.SIGINT).__self__  # the loop's checkpoint.StopSignal
    os.kill(os.getpid(), signal.SIGINT)
    # Python runs a signal's handler once however often the signal arrived before the main thread
    # got to it (and another thread may take the delivery): wait until the first one was handled.
    deadline = time.monotonic() + 10
    while not stop.requested and time.monotonic() < deadline:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)  # a run stuck inside a step: the second one ends it
    while time.monotonic() < deadline:  # KeyboardInterrupt arrives here
      time.sleep(0.01)
    return state.replace(step=state.step + 1), {"loss": 0.0}
  before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran
  # No automatic garbage collection meanwhile: a KeyboardInterrupt raised inside a gc callback
  # (hypothesis registers one) is swallowed ("Exception ignored in ...") and never reaches us.
  gc.disable()
  try:
    with pytest.raises(KeyboardInterrupt):
      _run_steps(tmp_path, step, 5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    gc.enable()
    signal.signal(signal.SIGINT, before)


_STUCK = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp, optax
    from llama_jax.train import loop
    from llama_jax.train.metrics import MetricWriter
    from llama_jax.train.stage import Run
    from llama_jax.train.state import init_train_state

    def step(state, batch, rng):
      os.kill(os.getpid(), signal.SIGTERM)  # one preemption signal ...
      time.sleep(60)                        # ... while the step waits forever (e.g. on data)
      return state, {}

    run = Run(cfg=None, total_steps=3, step_fn=step, batches=iter([None] * 3), abstract_state=None,
              init_state=None, stop_grace_s=float(sys.argv[2]))
    loop.run_loop(run, init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0), 0, None,
                  MetricWriter(sys.argv[1]))
""")


def test_one_signal_ends_a_step_that_never_finishes(tmp_path):
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", _STUCK, str(tmp_path / "logs"), "1.0"],
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
  assert time.monotonic() - t0 < 45 and "ending the run without saving" in proc.stderr
