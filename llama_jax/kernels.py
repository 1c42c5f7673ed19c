"""The Llama 2 layer math with hand-written backward passes (custom VJPs) and matmul layout.

Each op equals its plain JAX expression (tests/test_kernels.py checks values and gradients against
autodiff of it); what differs is what the backward pass stores and how XLA lays out the matmuls,
tuned on XLA:CPU (benchmarks/RESULTS.md) and harmless elsewhere:

- :func:`rms_norm`: keeps x and the inverse RMS only.
- :func:`dense`: every projection as one 2-D matmul; the reshaped weight is recomputed, not stored.
- :func:`attention`: FlashAttention-style backward (recomputed probabilities) and, on CPU, causal
  block skipping (``causal_chunk``); accelerators use ``jax.nn.dot_product_attention`` instead
  (``llama_jax.model.Attention``, ``LlamaConfig.attention_impl``).
- :func:`swiglu` / :func:`swiglu_down`: keep the two inputs only and recompute the product.

The architecture itself (which op runs where) is in ``llama_jax.model``. Shape letters: b batch,
t query length, s key length, d dim, n heads, k kv heads, h head_dim, f ffn hidden, g query heads
per kv head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Causal block skipping in the CPU attention of full-sequence passes (see :func:`attention`):
# query chunks of CPU_CAUSAL_CHUNK positions, longer where that would make more than
# CPU_MAX_CAUSAL_CHUNKS chunks (each chunk adds its own ops to the compiled graph).
CPU_CAUSAL_CHUNK = 64
CPU_MAX_CAUSAL_CHUNKS = 8


def cpu_causal_chunk(t: int) -> int:
  """The ``causal_chunk`` of :func:`attention` for a CPU full-sequence pass of t positions."""
  return max(CPU_CAUSAL_CHUNK, -(-t // CPU_MAX_CAUSAL_CHUNKS))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm as Meta's ``RMSNorm``: normalize in float32, cast back, scale by ``weight`` [d].

  Llama 2 paper Sec. 2.2 (pre-normalization). x: [..., d]; returns x's shape and dtype. The
  backward pass is written out and keeps only x and the [..., 1] float32 inverse RMS (autodiff
  of the expression stores the normalized activations too, a copy per layer under ``nn.scan``).
  """
  return _rms_norm_fwd(x, weight, eps)[0]


def _rms_norm_fwd(x, weight, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(x.dtype) * weight.astype(x.dtype), (x, weight, inv)


def _rms_norm_bwd(eps, res, d_out):
  x, weight, inv = res
  normed = x.astype(jnp.float32) * inv
  d_normed = d_out.astype(jnp.float32) * weight.astype(jnp.float32)
  d_x = inv * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  d_w = jnp.sum((d_out.astype(jnp.float32) * normed).reshape(-1, x.shape[-1]), axis=0)
  return d_x.astype(x.dtype), d_w.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
  """Contracts the last ``n_in`` axes of x with the first ``n_in`` of w as ONE 2-D matmul.

  ``x [..., i1..in] . w [i1..in, o1..om] -> [..., o1..om]`` (e.g. ``[b, t, d] . [d, n, h]``).
  Flattening the leading (batch, length) axes first matters on CPU: for a 3-D einsum such as
  ``btd,df->btf`` XLA:CPU forms the weight gradient from a transposed copy of the activation
  gradient, fused with the SwiGLU backward, which ran slower than the matmuls themselves; with
  ``[b*t, d] @ [d, f]`` the dot emitter computes ``x^T g`` directly. (A 3-D weight left unflattened
  in the ``dot_general`` makes XLA:CPU copy transposes of x and w in the backward pass instead;
  both cost about the same.) The matmul runs under ``jax.checkpoint(nothing_saveable)``: the
  backward pass recomputes the reshaped weight (a bitcast) instead of ``nn.scan`` storing a copy
  of every layer's weights; nothing else is recomputed (the backward pass of a matmul does not
  read its output), and an enclosing remat policy still sees the dot_general (``minimal`` still
  saves it). Pass x already flattened to ``[b*t, d]`` when several projections read it: under
  ``nn.scan`` autodiff stores each flattened copy per layer.
  """
  return _dense_2d(x, w, n_in, out_dtype)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                   prevent_cse=False, static_argnums=(2, 3))
def _dense_2d(x, w, n_in, out_dtype):
  lead, i, out = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in]), w.shape[n_in:]
  y = jnp.matmul(x.reshape(-1, i), w.reshape(i, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *out)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              causal_chunk: int = 0) -> jax.Array:
  """Softmax attention as batched matmuls; keys/values heads-major, query groups as rows.

  Grouped-query attention folds each kv head's ``g = n / k`` query heads into the query-row axis
  (``[b, k, t*g, h]``), so the dots are batched matmuls over (b, k) without repeating keys or
  values. The backward pass is written out (:func:`_attention_rows`), as in FlashAttention
  (Dao et al., 2022, Alg. 2): it keeps q, k, v, the output and the [b, k, t*g] row logsumexp,
  recomputes the probabilities (one more logits matmul) instead of storing [b, k, t*g, s] of them,
  and forms the softmax gradient from ``rowsum(dO * O)``.

  With ``causal_chunk = c > 0`` the queries go in chunks of c positions, each against only the
  keys up to its last position, so the blocks above the diagonal are never computed (about
  ``(C - 1) / 2C`` of the work for C chunks). Forward + backward on CPU at t = 255, c = 64:
  1.5x (k 8) to 1.8x (k 2) faster than one block (b 8, n 8, h 64). Valid only for a mask that
  lets no query attend to a later slot (as ``llama_jax.model.causal_mask``) and leaves every
  query some slot.

  Args:
    q: [b, t, n, h]; k, v: [b, k, s, h] (n a multiple of k); mask: [b, t, s] bool, True where a
      query may attend; causal_chunk: 0, or the query chunk length (then s must equal t).
  Returns:
    [b, t, n, h] in v.dtype. Logits and softmax in float32, scale 1/sqrt(h), masked logits set to
    the float32 minimum, as ``jax.nn.dot_product_attention``'s XLA implementation.
  Raises:
    ValueError: if causal_chunk > 0 and s != t.
  """
  b, t, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = n // kh
  if causal_chunk and s != t:
    raise ValueError(f"attention: causal_chunk needs as many keys as queries, got t={t}, s={s}")
  rows = (q * (h ** -0.5)).reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)  # [b, k, t, g, h]
  c = causal_chunk or t
  bounds = tuple((lo, min(lo + c, t)) for lo in range(0, t, c))
  mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, g, s))
  out = _attention_rows(bounds, rows.reshape(b, kh, t * g, h), k, v, mask.reshape(b, 1, t * g, s))
  return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _attention_chunks(bounds, rows, k):
  """(row slice, key end) per query chunk ``(lo, hi)`` of ``bounds``.

  rows [b, k, t*g, h] hold positions ``lo..hi`` at rows ``lo*g..hi*g``. With more than one chunk
  (causal), a chunk sees the keys up to ``hi``; a single chunk sees all s keys.
  """
  g = rows.shape[2] // bounds[-1][1]
  for lo, hi in bounds:
    yield slice(lo * g, hi * g), (hi if len(bounds) > 1 else k.shape[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_rows(bounds, rows, k, v, mask):
  """softmax(rows . k^T) . v per query chunk: rows [b, k, t*g, h] (scaled), k/v [b, k, s, h],
  mask [b, 1, t*g, s] bool -> [b, k, t*g, h] in v.dtype."""
  return _attention_rows_fwd(bounds, rows, k, v, mask)[0]


def _chunk_logits(rows, k, mask, sl, end):
  logits = jnp.einsum("bkqh,bksh->bkqs", rows[:, :, sl], k[:, :, :end],
                      preferred_element_type=jnp.float32)
  return jnp.where(mask[:, :, sl, :end], logits, jnp.finfo(jnp.float32).min)


def _attention_rows_fwd(bounds, rows, k, v, mask):
  outs, lses = [], []
  for sl, end in _attention_chunks(bounds, rows, k):
    logits = _chunk_logits(rows, k, mask, sl, end)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - lse).astype(v.dtype)
    outs.append(jnp.einsum("bkqs,bksh->bkqh", p, v[:, :, :end]))
    lses.append(lse)
  out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
  return out, (rows, k, v, mask, tuple(lses), out)


def _attention_rows_bwd(bounds, res, d_out):
  rows, k, v, mask, lses, out = res
  f32 = jnp.float32
  # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # [b, k, t*g, 1]
  d_rows, d_k, d_v = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
  for (sl, end), lse in zip(_attention_chunks(bounds, rows, k), lses):
    p = jnp.exp(_chunk_logits(rows, k, mask, sl, end) - lse)
    d_o = d_out[:, :, sl]
    d_v = d_v.at[:, :, :end].add(jnp.einsum("bkqs,bkqh->bksh", p.astype(v.dtype),
                                            d_o.astype(v.dtype), preferred_element_type=f32))
    d_p = jnp.einsum("bkqh,bksh->bkqs", d_o, v[:, :, :end], preferred_element_type=f32)
    d_logits = (p * (d_p - delta[:, :, sl])).astype(rows.dtype)
    d_rows.append(jnp.einsum("bkqs,bksh->bkqh", d_logits, k[:, :, :end]))
    d_k = d_k.at[:, :, :end].add(jnp.einsum("bkqs,bkqh->bksh", d_logits, rows[:, :, sl],
                                            preferred_element_type=f32))
  d_rows = jnp.concatenate(d_rows, axis=2) if len(d_rows) > 1 else d_rows[0]
  return d_rows.astype(rows.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention_rows.defvjp(_attention_rows_fwd, _attention_rows_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """``silu(gate) * up`` (Shazeer, 2020; Llama 2 paper Sec. 2.2), elementwise; gate and up of one
  shape and float dtype (e.g. [b*t, f]), result the same.

  The backward pass keeps only the two inputs and recomputes the sigmoid (autodiff of the plain
  expression stores three more tensors of the same size per layer).
  """
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, d_out):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  d_up = d_out * gate * sig
  d_gate = d_out * up * sig * (1 + gate * (1 - sig))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                   prevent_cse=False)
def swiglu_down(gate, up, w2):
  """``swiglu(gate, up) @ w2``; the backward pass recomputes the [b*t, f] SwiGLU output from
  gate and up (elementwise) instead of storing a third [b*t, f] tensor per layer."""
  return dense(swiglu(gate, up), w2)
