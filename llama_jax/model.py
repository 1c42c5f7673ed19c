"""The Llama 2 network in Flax Linen, with params as plain pytrees in Meta's names.

Architecture (Llama 2 paper, Sec. 2.2; Meta's ``llama/model.py``): pre-normalization with RMSNorm,
grouped-query attention with rotary position embeddings applied to interleaved pairs
(``apply_rotary_emb``), SwiGLU feed-forward, untied output projection.

Parameter tree (``L`` = n_layers, stacked on a leading axis; Meta key = path + ``.weight``)::

  tok_embeddings                  [v, d]
  layers/attention_norm           [L, d]
  layers/attention/wq             [L, d, n, h]     (Meta: wq.weight [n*h, d], transposed)
  layers/attention/wk, wv         [L, d, k, h]
  layers/attention/wo             [L, n, h, d]
  layers/ffn_norm                 [L, d]
  layers/feed_forward/w1, w3      [L, d, f]
  layers/feed_forward/w2          [L, f, d]
  norm                            [d]
  output                          [d, v]

Shape letters: b batch, t query length, s key length, d dim, n heads, k kv heads, h head_dim,
f ffn hidden, v vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

Params = Any

# Logical axis names of activations (mapped to mesh axes by llama_jax.sharding rules).
ACT_BATCH, ACT_LENGTH, ACT_EMBED = "batch", "length", "act_embed"

_init = nn.initializers.normal(stddev=0.02)

# Causal block skipping in the CPU attention of full-sequence passes (see :func:`attention`):
# query chunks of CPU_CAUSAL_CHUNK positions, longer where that would make more than
# CPU_MAX_CAUSAL_CHUNKS chunks (each chunk adds its own ops to the compiled graph).
CPU_CAUSAL_CHUNK = 64
CPU_MAX_CAUSAL_CHUNKS = 8


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding.

  Attributes:
    k, v: [L, b, k, s, h] compute dtype, heads before slots so that the attention dots read the
      cache in place (no per-step transpose); slot ``j`` holds the keys/values written at step
      ``j``. :func:`decode_step` takes them as tuples of L per-layer [b, k, s, h] arrays (see
      :func:`unstack_cache`).
    mask: [b, s] bool; True where a slot holds a real (non-padding) token.
    index: [] int32; the next slot to write (all rows advance together).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of ``max_len`` slots for ``batch`` rows ([L, b, k, s, h] in cfg.dtype)."""
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be positive")
  shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
  zeros = jnp.zeros(shape, cfg.compute_dtype)
  return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding on interleaved pairs (x0,x1),(x2,x3),... as Meta's ``apply_rotary_emb``.

  Args:
    x: [b, t, n, h] queries or keys.
    positions: [b, t] int32 absolute positions.
    theta: RoPE base (``rope_theta``).
  Returns:
    [b, t, n, h] in x.dtype (rotation computed in float32).
  """
  h = x.shape[-1]
  # Meta's float32 formula, evaluated eagerly at trace time: inside a jit XLA may lower pow()
  # differently (1-ulp differences that grow to ~1e-4 in logits over long prompts).
  with jax.ensure_compile_time_eval():
    freqs = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [h/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [b, t, h/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], h // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


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
  lets no query attend to a later slot (as :func:`causal_mask`) and leaves every query some slot.

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


def _param(module: nn.Module, name: str, shape, axes, init=_init):
  cfg = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_kv=None, cache_index=None):
    cfg = self.cfg
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    wq = _param(self, "wq", (d, n, h), ("embed", "heads", "head_dim")).astype(dt)
    wk = _param(self, "wk", (d, k, h), ("embed", "kv_heads", "head_dim")).astype(dt)
    wv = _param(self, "wv", (d, k, h), ("embed", "kv_heads", "head_dim")).astype(dt)
    wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed")).astype(dt)
    b, t = x.shape[:2]
    x = x.reshape(b * t, d)  # flattened once for the three projections
    q = apply_rope(dense(x, wq).reshape(b, t, n, h), positions, cfg.rope_theta)
    key = apply_rope(dense(x, wk).reshape(b, t, k, h), positions, cfg.rope_theta)
    value = dense(x, wv).reshape(b, t, k, h)
    new_kv = None
    if cache_kv is not None:
      ck, cv = cache_kv  # [b, k, s, h]
      index = (0, 0, cache_index, 0)
      ck = jax.lax.dynamic_update_slice(ck, key.transpose(0, 2, 1, 3).astype(ck.dtype), index)
      cv = jax.lax.dynamic_update_slice(cv, value.transpose(0, 2, 1, 3).astype(cv.dtype), index)
      new_kv = (ck, cv)
      out = attention(q, ck.astype(dt), cv.astype(dt), mask)
    elif cfg.attention_impl == "cudnn" or (cfg.attention_impl == "auto" and
                                           jax.default_backend() != "cpu"):
      out = jax.nn.dot_product_attention(
          q, key, value, mask=mask[:, None, :, :],
          implementation=None if cfg.attention_impl == "auto" else cfg.attention_impl)
    else:
      chunk = max(CPU_CAUSAL_CHUNK, -(-t // CPU_MAX_CAUSAL_CHUNKS))
      out = attention(q, key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3), mask,
                      causal_chunk=chunk)
    return dense(out, wo, 2), new_kv


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
def _swiglu_down(gate, up, w2):
  """``swiglu(gate, up) @ w2``; the backward pass recomputes the [b*t, f] SwiGLU output from
  gate and up (elementwise) instead of storing a third [b*t, f] tensor per layer."""
  return dense(swiglu(gate, up), w2)


class FeedForward(nn.Module):
  """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d, f, dt = cfg.dim, cfg.ffn_hidden_dim, cfg.compute_dtype
    w1 = _param(self, "w1", (d, f), ("embed", "mlp")).astype(dt)
    w3 = _param(self, "w3", (d, f), ("embed", "mlp")).astype(dt)
    w2 = _param(self, "w2", (f, d), ("mlp", "embed")).astype(dt)
    x2 = x.reshape(-1, d)  # flattened once for both projections
    return _swiglu_down(dense(x2, w1), dense(x2, w3), w2).reshape(x.shape)


class Block(nn.Module):
  """One pre-norm transformer layer; signature fits ``nn.scan`` (carry x, scanned cache)."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_index, cache_kv):
    cfg = self.cfg
    ones = nn.initializers.ones
    attn_norm = _param(self, "attention_norm", (cfg.dim,), ("norm",), ones)
    ffn_norm = _param(self, "ffn_norm", (cfg.dim,), ("norm",), ones)
    attn_out, new_kv = Attention(cfg, name="attention")(
        rms_norm(x, attn_norm, cfg.norm_eps), positions, mask, cache_kv, cache_index)
    x = x + attn_out
    x = x + FeedForward(cfg, name="feed_forward")(rms_norm(x, ffn_norm, cfg.norm_eps))
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    return x, new_kv


_REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Transformer(nn.Module):
  """The Llama 2 decoder. Use the functional wrappers below rather than calling it directly.

  Without a cache, ``mask`` must be causal in slot order (as :func:`causal_mask`): on CPU the
  attention skips the blocks above the diagonal.
  """

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens, positions, mask, cache_kv=None, cache_index=None, return_hidden=False,
               last_only=False):
    cfg = self.cfg
    emb = _param(self, "tok_embeddings", (cfg.vocab_size, cfg.dim), ("vocab", "embed"))
    # Keep the vocab-sharded table for the gather (else XLA replicates the looked-up activations).
    emb = nn.with_logical_constraint(emb, ("vocab", None))
    x = jnp.take(emb, tokens, axis=0).astype(cfg.compute_dtype)
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, new_kv = layers(cfg, name="layers")(x, positions, mask, cache_index, cache_kv)
    if last_only:
      x = x[:, -1:]
    norm = _param(self, "norm", (cfg.dim,), ("norm",), nn.initializers.ones)
    x = rms_norm(x, norm, cfg.norm_eps)
    if return_hidden:
      return x.astype(jnp.float32), new_kv
    out = _param(self, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"))
    logits = dense(x, out.astype(cfg.compute_dtype), out_dtype=jnp.float32)
    return logits, new_kv


def _check_tokens(tokens, cfg: LlamaConfig):
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array, got {tokens.dtype}")


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
  """Random parameters (normal std 0.02, norms 1) as a plain nested dict; see module docstring."""
  return nn.meta.unbox(_boxed_init(cfg, key))


def _boxed_init(cfg: LlamaConfig, key):
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  return Transformer(cfg).init(key, tokens, tokens, mask)["params"]


def param_logical_axes(cfg: LlamaConfig) -> Params:
  """Pytree (same structure as params) of ``jax.sharding.PartitionSpec`` of logical axis names.

  Stacked layer params carry ``"layers"`` as their first axis name. Computed abstractly
  (``jax.eval_shape``), no memory is allocated.
  """
  boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def causal_mask(positions_q: jax.Array, segment_ids: Optional[jax.Array], t: int) -> jax.Array:
  """[b, t, t] bool: causal in slot order; with segment ids, no attention across segments."""
  idx = jnp.arange(t)
  mask = (idx[:, None] >= idx[None, :])[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return jnp.broadcast_to(mask, (positions_q.shape[0], t, t))


def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig, *,
            positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
            return_hidden: bool = False) -> jax.Array:
  """Full-sequence forward pass (training, scoring, teacher forcing).

  Args:
    params: parameter pytree (see module docstring).
    tokens: [b, t] int32 token ids.
    cfg: the model config.
    positions: [b, t] int32 RoPE positions; default ``arange(t)``. For packed sequences give
      per-segment positions (restarting at 0).
    segment_ids: [b, t] int32; tokens attend only within their own segment (packed sequences).
      Padding may use its own id (e.g. 0); its outputs are meaningless and must be masked.
    return_hidden: return the final RMSNorm-ed hidden states [b, t, d] float32 instead of logits
      (for reward and value heads).
  Returns:
    logits [b, t, v] float32, or hidden states [b, t, d] float32.
  Raises:
    ValueError: if tokens is not a 2-D integer array.
  """
  _check_tokens(tokens, cfg)
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = causal_mask(positions, segment_ids, t)
  out, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask,
                                  return_hidden=return_hidden)
  return out


def _cached_positions_and_mask(cache: KVCache, token_mask: jax.Array):
  """RoPE positions [b, t] (counting real tokens only), updated slot mask [b, s], attention mask
  [b, t, s] for ``t`` new tokens written at slots ``[cache.index, cache.index + t)``."""
  t = token_mask.shape[1]
  s = cache.mask.shape[1]
  start = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)  # tokens already seen per row
  positions = start[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
  positions = jnp.maximum(positions, 0)
  kv_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))
  slot_q = cache.index + jnp.arange(t)
  causal = slot_q[:, None] >= jnp.arange(s)[None, :]  # [t, s]
  return positions, kv_mask, causal[None] & kv_mask[:, None, :]


def forward_cached(params: Params, tokens: jax.Array, cfg: LlamaConfig, cache: KVCache,
                   token_mask: Optional[jax.Array] = None, return_hidden: bool = False,
                   last_only: bool = False):
  """Forward ``t`` new tokens per row, reading and extending the KV cache.

  The new tokens occupy slots ``[cache.index, cache.index + t)`` in every row. Positions are
  counted per row over real tokens only, so left padding (``token_mask`` False) changes nothing
  in the result for the real tokens.

  Args:
    tokens: [b, t] int32 new tokens.
    cache: a ``KVCache`` (stacked [L, b, k, s, h]) with room for ``t`` more slots.
    token_mask: [b, t] bool; False marks padding (never attended to). Default all True.
    last_only: compute logits (or hidden states) for the last position only (prefill).
  Returns:
    (logits [b, t, v] float32 (or hidden [b, t, d] float32; t = 1 if last_only), updated KVCache).
  """
  _check_tokens(tokens, cfg)
  b, t = tokens.shape
  if token_mask is None:
    token_mask = jnp.ones((b, t), bool)
  positions, kv_mask, mask = _cached_positions_and_mask(cache, token_mask)
  out, new_kv = Transformer(cfg).apply({"params": params}, tokens, positions, mask,
                                       (cache.k, cache.v), cache.index, return_hidden=return_hidden,
                                       last_only=last_only)
  new_cache = KVCache(new_kv[0], new_kv[1], kv_mask, cache.index + t)
  return out, new_cache


def unstack_layers(params: Params) -> Params:
  """The same params with ``params['layers']`` as a tuple of L per-layer dicts.

  Slicing happens here, once: call it outside a decode loop. Inside an XLA loop, slicing a layer
  out of a stacked [L, ...] weight is a copy on CPU (no dynamic-slice fusion into the dot), which
  per decode step costs as much as the matmuls themselves.
  """
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n_layers))
  return {**params, "layers": layers}


def unstack_cache(cache: KVCache) -> KVCache:
  """A stacked KVCache ([L, b, k, s, h] k/v) as tuples of L per-layer [b, k, s, h] arrays."""
  return cache._replace(k=tuple(cache.k), v=tuple(cache.v))


def stack_cache(cache: KVCache) -> KVCache:
  """Inverse of :func:`unstack_cache`."""
  return cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def decode_step(params: Params, tokens: jax.Array, cfg: LlamaConfig, cache: KVCache,
                token_mask: Optional[jax.Array] = None):
  """:func:`forward_cached` for unstacked params and cache, last-position logits only.

  A Python loop over the layers (unrolled in the compiled program) with each layer's weights
  and cache as separate buffers, so an XLA while-loop body reads them in place and updates the
  cache in place.

  Args:
    params: :func:`unstack_layers` output.
    tokens: [b, t] int32 new tokens (t = 1 when decoding).
    cache: :func:`unstack_cache` output with room for t more slots.
    token_mask: [b, t] bool, False on padding; default all True.
  Returns:
    (logits [b, v] float32 at the last position, updated unstacked KVCache).
  """
  _check_tokens(tokens, cfg)
  b, t = tokens.shape
  if token_mask is None:
    token_mask = jnp.ones((b, t), bool)
  positions, kv_mask, mask = _cached_positions_and_mask(cache, token_mask)
  x = jnp.take(params["tok_embeddings"], tokens, axis=0).astype(cfg.compute_dtype)
  ks, vs = [], []
  for layer, ck, cv in zip(params["layers"], cache.k, cache.v):
    x, (ck, cv) = Block(cfg).apply({"params": layer}, x, positions, mask, cache.index, (ck, cv))
    ks.append(ck)
    vs.append(cv)
  x = rms_norm(x[:, -1], params["norm"], cfg.norm_eps)
  logits = dense(x, params["output"].astype(cfg.compute_dtype), out_dtype=jnp.float32)
  return logits, KVCache(tuple(ks), tuple(vs), kv_mask, cache.index + t)
