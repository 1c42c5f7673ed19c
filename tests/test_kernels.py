"""Kernel tests: every op of llama_jax.kernels against its plain JAX expression, values and
gradients (autodiff of the expression; jax.nn.dot_product_attention for attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import kernels
from llama_jax.kernels import attention, dense, rms_norm, swiglu, swiglu_down
from llama_jax.model import causal_mask


def test_rms_norm_reference():
  x = np.random.RandomState(1).randn(3, 16).astype(np.float32)
  w = np.linspace(0.5, 1.5, 16).astype(np.float32)
  ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
  np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), ref, rtol=1e-5)


def _vjp(fn, args, d_out):
  out, pull = jax.vjp(fn, *args)
  return out, pull(d_out)


def _assert_close(ours, ref, atol):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                               rtol=atol)


@pytest.mark.parametrize("n_kv_heads,chunk,t,packed", [
    (2, 0, 37, False), (2, 8, 37, True), (4, 16, 40, True), (1, 64, 37, False), (4, 5, 5, False)])
def test_attention_matches_dot_product_attention(n_kv_heads, chunk, t, packed):
  """Values and gradients (custom VJP, causal chunks) vs jax.nn.dot_product_attention (XLA)."""
  rng = np.random.RandomState(t + chunk)
  b, n, h = 2, 4, 16
  q, d_out = (jnp.asarray(rng.randn(b, t, n, h), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.randn(b, n_kv_heads, t, h), jnp.float32) for _ in range(2))
  segments = jnp.asarray(np.sort(rng.randint(0, 3, (b, t)), axis=1)) if packed else None
  mask = causal_mask(jnp.zeros((b, t), jnp.int32), segments, t)
  ours = _vjp(lambda q, k, v: attention(q, k, v, mask, causal_chunk=chunk), (q, k, v), d_out)
  ref = _vjp(lambda q, k, v: jax.nn.dot_product_attention(
      q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
      implementation="xla"), (q, k, v), d_out)
  _assert_close(ours, ref, atol=1e-5)


def test_attention_causal_chunk_needs_as_many_keys_as_queries():
  q = jnp.zeros((1, 3, 2, 4))
  kv = jnp.zeros((1, 2, 5, 4))
  with pytest.raises(ValueError, match="causal_chunk"):
    attention(q, kv, kv, jnp.ones((1, 3, 5), bool), causal_chunk=2)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_rms_norm_and_swiglu_vjps_match_autodiff(dtype, atol):
  """The written-out backward passes vs autodiff of the plain expressions (computed in f32)."""
  rng = np.random.RandomState(2)
  x, d_out, up = (jnp.asarray(rng.randn(3, 5, 16), dtype) for _ in range(3))
  w = jnp.asarray(rng.rand(16) + 0.5, jnp.float32)

  def rms_ref(x, w):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5) * w

  f32 = lambda *a: [u.astype(jnp.float32) for u in a]  # noqa: E731
  _assert_close(_vjp(lambda x, w: rms_norm(x, w, 1e-5), (x, w), d_out),
                _vjp(rms_ref, f32(x, w), *f32(d_out)), atol)
  _assert_close(_vjp(swiglu, (x, up), d_out),
                _vjp(lambda a, b: jax.nn.silu(a) * b, f32(x, up), *f32(d_out)), atol)


def test_dense_is_the_einsum_values_and_gradients():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 5, 4, 6), jnp.float32)
  w = jnp.asarray(rng.randn(4, 6, 7), jnp.float32)
  d_out = jnp.asarray(rng.randn(2, 5, 7), jnp.float32)
  _assert_close(_vjp(lambda x, w: dense(x, w, 2), (x, w), d_out),
                _vjp(lambda x, w: jnp.einsum("btnh,nhd->btd", x, w), (x, w), d_out), 1e-5)
  out = dense(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 2, out_dtype=jnp.float32)
  assert out.shape == (2, 5, 7) and out.dtype == jnp.float32


def test_swiglu_down_values_and_gradients():
  rng = np.random.RandomState(4)
  gate, up = (jnp.asarray(rng.randn(6, 8), jnp.float32) for _ in range(2))
  w2, d_out = jnp.asarray(rng.randn(8, 3), jnp.float32), jnp.asarray(rng.randn(6, 3), jnp.float32)
  _assert_close(_vjp(swiglu_down, (gate, up, w2), d_out),
                _vjp(lambda g, u, w: (jax.nn.silu(g) * u) @ w, (gate, up, w2), d_out), 1e-5)


@pytest.mark.parametrize("t,chunk", [(1, 64), (64, 64), (255, 64), (512, 64), (1000, 125)])
def test_cpu_causal_chunk(t, chunk):
  assert kernels.cpu_causal_chunk(t) == chunk
  assert -(-t // kernels.cpu_causal_chunk(t)) <= kernels.CPU_MAX_CAUSAL_CHUNKS
