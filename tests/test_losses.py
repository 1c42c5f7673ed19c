"""Token losses against loop-based NumPy references."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from llama_jax import losses


def _ref_ce(logits, targets, mask):
  total, count = 0.0, 0.0
  for i in range(logits.shape[0]):
    for j in range(logits.shape[1]):
      row = logits[i, j].astype(np.float64)
      lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      total += mask[i, j] * (lse - row[targets[i, j]])
      count += mask[i, j]
  return total, count


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9), st.integers(0, 10_000))
def test_cross_entropy_matches_loop_reference(b, t, v, seed):
  rng = np.random.RandomState(seed)
  logits = rng.randn(b, t, v).astype(np.float32) * 3
  targets = rng.randint(0, v, (b, t))
  mask = (rng.rand(b, t) > 0.4).astype(np.float32)
  total, count = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  ref_total, ref_count = _ref_ce(logits, targets, mask)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5, atol=1e-5)
  assert float(count) == ref_count


def test_masked_mean_never_nan():
  assert float(losses.masked_mean(jnp.ones(4), jnp.zeros(4))) == 0.0
  np.testing.assert_allclose(float(losses.masked_mean(jnp.arange(4.0), jnp.array([0, 1, 1, 0]))), 1.5)


def test_entropy_reference():
  logits = np.random.RandomState(0).randn(2, 3, 5).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.token_entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)
