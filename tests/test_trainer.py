"""trainer.run_loop: the final checkpoint is written before the final evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import trainer
from llama_jax.checkpoint import Checkpointer
from llama_jax.metrics import MetricWriter
from llama_jax.sft import init_train_state


def _step(state, batch, rng):
  del rng
  params = {"w": state.params["w"] + batch}
  return state.replace(step=state.step + 1, params=params), {"loss": jnp.sum(batch)}


def _run(tmp_path, eval_fn, total_steps=3):
  state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=0, keep=2, async_save=True)
  batches = iter([jnp.ones(2)] * 10)
  try:
    return trainer.run_loop(state, jax.jit(_step), batches, total_steps=total_steps,
                            checkpointer=ckpt, writer=MetricWriter(str(tmp_path / "logs")),
                            log_every=1, eval_fn=eval_fn)
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
