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

The layer math with hand-written backward passes (RMSNorm, projections, attention, SwiGLU) is in
``llama_jax.kernels``; this module is the architecture. Shape letters: b batch, t query length,
s key length, d dim, n heads, k kv heads, h head_dim, f ffn hidden, v vocab, L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax import kernels
from llama_jax.config import LlamaConfig
from llama_jax.kernels import attention, dense, rms_norm, swiglu_down

Params = Any

# Logical axis names of activations (mapped to mesh axes by llama_jax.sharding rules).
ACT_BATCH, ACT_LENGTH, ACT_EMBED = "batch", "length", "act_embed"

_init = nn.initializers.normal(stddev=0.02)


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
    elif cfg.attention_impl != "auto" or jax.default_backend() != "cpu":
      out = jax.nn.dot_product_attention(
          q, key, value, mask=mask[:, None, :, :],
          implementation=None if cfg.attention_impl == "auto" else cfg.attention_impl)
    else:
      out = attention(q, key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3), mask,
                      causal_chunk=kernels.cpu_causal_chunk(t))
    return dense(out, wo, 2), new_kv


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
    return swiglu_down(dense(x2, w1), dense(x2, w3), w2).reshape(x.shape)


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


def lm_head(params: Params, hidden: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """The output projection alone: ``hidden [..., d]`` (``forward(..., return_hidden=True)``,
  already RMSNorm-ed) -> logits ``[..., v]`` float32, equal to ``forward``'s logits at those
  positions. Apply it to the positions that need logits only (e.g. a response): the full
  ``[b, t, v]`` float32 logits of a long sequence are the largest activation of a step."""
  return dense(hidden.astype(cfg.compute_dtype), params["output"].astype(cfg.compute_dtype),
               out_dtype=jnp.float32)


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
