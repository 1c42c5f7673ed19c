"""Model tests: config validation, preset sizes, RoPE, masking, KV cache, scan/remat equivalence.
The hand-written backward passes (attention, RMSNorm, SwiGLU) are tested in tests/test_kernels.py.

Parity against HF transformers' LlamaForCausalLM lives in tests/test_convert.py (it needs the
HF importer).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.model import apply_rope

CFG = lj.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     ffn_dim_multiplier=1.3, rope_theta=5e5, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
  p = lj.init_params(CFG, jax.random.key(0))
  # Larger weights than the 0.02 init so that errors are visible in the logits.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 10, p)


@pytest.mark.parametrize("name,count", [("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
                                        ("llama2_70b", 68_976_648_192)])
def test_preset_param_counts(name, count):
  cfg = lj.LlamaConfig.preset(name)
  shapes = jax.eval_shape(lambda k: lj.init_params(cfg, k), jax.random.key(0))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
  assert cfg.num_params() == count


def test_preset_ffn_hidden_sizes():
  # RECIPE.md table (Llama 2 paper, Table 1 and Meta's params.json).
  assert lj.LlamaConfig.llama2_7b().ffn_hidden_dim == 11008
  assert lj.LlamaConfig.llama2_13b().ffn_hidden_dim == 13824
  assert lj.LlamaConfig.llama2_34b().ffn_hidden_dim == 22016
  assert lj.LlamaConfig.llama2_70b().ffn_hidden_dim == 28672


@pytest.mark.parametrize("kwargs,field", [
    (dict(dim=65), "dim"), (dict(n_kv_heads=3), "n_heads"), (dict(dtype="float8"), "dtype"),
    (dict(remat="some"), "remat"), (dict(n_layers=0), "n_layers"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(dim=24, n_heads=8), "head_dim"), (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier")])
def test_config_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    lj.LlamaConfig.tiny(**kwargs)


def test_params_json_round_trip(tmp_path):
  cfg = lj.LlamaConfig.llama2_70b()
  again = lj.LlamaConfig.from_params_json(cfg.to_params_json())
  assert again == cfg
  with pytest.raises(ValueError, match="unknown params.json keys"):
    lj.LlamaConfig.from_params_json({**cfg.to_params_json(), "hidden": 3})


@pytest.mark.parametrize("text,match", [("{not json", "not a JSON config"),
                                        ("[1, 2]", "expected a JSON object"),
                                        ("\udcff", "not a JSON config")])
def test_config_files_that_are_not_json_name_the_file(tmp_path, text, match):
  path = tmp_path / "params.json"
  path.write_bytes(b"\xff\xfe" if text == "\udcff" else text.encode())
  for load in (lj.LlamaConfig.from_params_json, lj.LlamaConfig.from_hf_config):
    with pytest.raises(ValueError, match=f"{path}: {match}"):
      load(str(path))


def test_hf_config_round_trip():
  for cfg in (CFG, lj.LlamaConfig.llama2_70b(), lj.LlamaConfig.llama2_13b()):
    again = lj.LlamaConfig.from_hf_config(cfg.to_hf_config())
    assert again.ffn_hidden_dim == cfg.ffn_hidden_dim
    assert (again.dim, again.kv_heads, again.rope_theta) == (cfg.dim, cfg.kv_heads, cfg.rope_theta)


def test_rope_matches_complex_reference():
  """Meta's apply_rotary_emb: view pairs as complex numbers, multiply by exp(i * pos * freq)."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 8).astype(np.float32)
  pos = rng.randint(0, 100, (2, 5))
  freqs = 1.0 / (1e4 ** (np.arange(0, 8, 2) / 8))
  xc = x.astype(np.float64).reshape(2, 5, 3, 4, 2)
  xc = xc[..., 0] + 1j * xc[..., 1]
  rot = xc * np.exp(1j * pos[:, :, None, None] * freqs)
  ref = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
  np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), 1e4), ref, atol=2e-5)


def _tokens(b, t, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_scan_unrolled_and_remat_agree(params):
  tokens = _tokens(2, 24)
  ref = lj.forward(params, tokens, CFG)
  assert ref.shape == (2, 24, CFG.vocab_size) and ref.dtype == jnp.float32
  for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="minimal", scan_layers=False)):
    np.testing.assert_allclose(lj.forward(params, tokens, CFG.replace(**kw)), ref, atol=1e-5)

  def loss(p, cfg):
    return jnp.mean(lj.forward(p, tokens, cfg) ** 2)
  g_ref = jax.grad(loss)(params, CFG)
  g_remat = jax.grad(loss)(params, CFG.replace(remat="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_ref, g_remat)


def test_causality(params):
  tokens = _tokens(1, 16)
  changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % CFG.vocab_size)
  a, b = lj.forward(params, tokens, CFG), lj.forward(params, changed, CFG)
  np.testing.assert_array_equal(a[:, :10], b[:, :10])
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3


def test_packed_segments_equal_separate_examples(params):
  """Two examples packed into one row (segment ids, restarting positions) give each example's
  own logits: no attention across segments."""
  a, b = _tokens(1, 9, seed=1), _tokens(1, 6, seed=2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 9 + [2] * 6 + [0] * 3])
  pos = jnp.asarray([list(range(9)) + list(range(6)) + [0] * 3])
  out = lj.forward(params, packed, CFG, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, :9], lj.forward(params, a, CFG), atol=1e-5)
  np.testing.assert_allclose(out[:, 9:15], lj.forward(params, b, CFG), atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(params):
  tokens = _tokens(2, 20)
  full = lj.forward(params, tokens, CFG)
  cache = lj.init_cache(CFG, 2, 32)
  out, cache = lj.forward_cached(params, tokens[:, :12], CFG, cache)
  outs = [out]
  for i in range(12, 20):
    out, cache = lj.forward_cached(params, tokens[:, i:i + 1], CFG, cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-5)
  assert int(cache.index) == 20 and bool(cache.mask[:, :20].all()) and not cache.mask[:, 20:].any()


def test_kv_cache_left_padding_is_invisible(params):
  tokens = _tokens(1, 10)
  cache = lj.init_cache(CFG, 1, 16)
  padded = jnp.concatenate([jnp.full((1, 4), 5, jnp.int32), tokens], axis=1)
  mask = jnp.asarray([[False] * 4 + [True] * 10])
  out, _ = lj.forward_cached(params, padded, CFG, cache, mask)
  np.testing.assert_allclose(out[:, 4:], lj.forward(params, tokens, CFG), atol=1e-4, rtol=1e-5)


def test_return_hidden(params):
  tokens = _tokens(2, 7)
  hidden = lj.forward(params, tokens, CFG, return_hidden=True)
  assert hidden.shape == (2, 7, CFG.dim)
  np.testing.assert_allclose(hidden @ params["output"], lj.forward(params, tokens, CFG), atol=1e-4)


def test_bf16_compute_close_to_f32(params):
  tokens = _tokens(2, 16)
  ref = lj.forward(params, tokens, CFG)
  out = lj.forward(params, tokens, CFG.replace(dtype="bfloat16"))
  assert out.dtype == jnp.float32
  corr = np.corrcoef(np.ravel(out), np.ravel(ref))[0, 1]
  assert corr > 0.99


def test_logical_axes_cover_every_param():
  axes = lj.param_logical_axes(CFG)
  shapes = jax.eval_shape(lambda k: lj.init_params(CFG, k), jax.random.key(0))
  flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  assert [p for p, _ in flat_axes] == [p for p, _ in flat_shapes]
  for (path, spec), (_, shape) in zip(flat_axes, flat_shapes):
    assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec), path
  assert axes["layers"]["attention"]["wq"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")


def test_bad_tokens_raise(params):
  with pytest.raises(ValueError, match="batch, seq"):
    lj.forward(params, jnp.zeros((4,), jnp.int32), CFG)
  with pytest.raises(ValueError, match="integer"):
    lj.forward(params, jnp.zeros((1, 4), jnp.float32), CFG)


def test_attention_impl_xla_calls_dot_product_attention_on_cpu(params, monkeypatch):
  """``attention_impl="xla"`` means jax.nn.dot_product_attention(implementation="xla") on every
  backend (it used to be ignored on CPU); "auto" keeps llama_jax's kernel on CPU. Same values."""
  calls = []
  original = jax.nn.dot_product_attention
  def spy(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    return original(*args, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 12)), jnp.int32)
  auto = lj.forward(params, tokens, CFG)
  assert calls == []
  xla = lj.forward(params, tokens, CFG.replace(attention_impl="xla"))
  assert calls and set(calls) == {"xla"}
  np.testing.assert_allclose(np.asarray(xla), np.asarray(auto), atol=2e-5, rtol=1e-5)
