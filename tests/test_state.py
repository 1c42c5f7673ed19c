"""train.state: the optimizer update skips (and counts) a non-finite gradient or an empty batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.train.checkpoint import all_finite, check_finite
from llama_jax.train.state import apply_gradients, init_train_state


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_gradient_leaves_the_state_untouched(bad):
  opt = optax.adamw(1e-2)
  state = init_train_state({"w": jnp.ones(3), "b": jnp.zeros(2)}, opt, 0)
  grads = {"w": jnp.array([1.0, bad, 0.5]), "b": jnp.ones(2)}
  new, m = apply_gradients(state, grads, jnp.float32(4.0), opt)
  assert float(m["skipped"]) == 1.0 and float(m["nonfinite"]) == 1.0
  assert int(new.step) == 1  # the batch is consumed
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_finite_and_empty_batches():
  opt = optax.sgd(0.5)
  state = init_train_state({"w": jnp.ones(2)}, opt, 0)
  new, m = apply_gradients(state, {"w": jnp.full(2, 2.0)}, jnp.float32(2.0), opt)
  assert float(m["skipped"]) == 0.0 and float(m["nonfinite"]) == 0.0
  np.testing.assert_allclose(np.asarray(new.params["w"]), [0.5, 0.5])  # 1 - 0.5 * 2 / 2
  new, m = apply_gradients(state, {"w": jnp.full(2, 2.0)}, jnp.float32(0.0), opt)
  assert float(m["skipped"]) == 1.0 and float(m["nonfinite"]) == 0.0  # empty, not non-finite
  np.testing.assert_array_equal(np.asarray(new.params["w"]), [1.0, 1.0])


def test_all_finite_and_check_finite_name_the_leaf():
  tree = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.nan])}, "k": jnp.arange(3)}
  assert not bool(all_finite(tree)) and bool(all_finite({"a": jnp.ones(2), "k": jnp.arange(3)}))
  with pytest.raises(ValueError, match=r"final: parameter \['b'\]\['c'\] holds NaN or Inf"):
    check_finite(tree, "final")
  check_finite({"a": jnp.ones(2)}, "ok")
