"""Generation tests: HF greedy parity, padding invariance, samplers vs NumPy references, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.sampling import generate, left_pad, sample, sample_logits

CFG = lj.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     rope_theta=5e5, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
  p = lj.init_params(CFG, jax.random.key(0))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 12, p)


def _prompts():
  rng = np.random.RandomState(3)
  return [list(rng.randint(3, CFG.vocab_size, n)) for n in (5, 11, 1, 8)]


def test_greedy_matches_hf_generate(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from llama_jax import convert
  hf_cfg = {k: v for k, v in CFG.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.25) if p.ndim > 1 else p.uniform_(0.5, 1.5)
  model.save_pretrained(tmp_path)
  cfg, params = convert.load_hf(tmp_path)
  prompts = _prompts()
  out = generate(params, cfg, prompts, jax.random.key(0), max_new_tokens=12, temperature=0.0)
  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    n = int(out.lengths[i])
    assert np.asarray(out.tokens[i, :n]).tolist() == ref, f"prompt {i}"


def test_padding_does_not_change_continuations(params):
  prompts = _prompts()
  key = jax.random.key(7)
  for temperature in (0.0, 1.0):
    a = generate(params, CFG, prompts, key, max_new_tokens=10, temperature=temperature)
    b = generate(params, CFG, prompts, key, max_new_tokens=10, temperature=temperature,
                 pad_to_multiple=32)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  # A prompt alone gives the same greedy continuation as inside a padded batch.
  batch = generate(params, CFG, prompts, key, max_new_tokens=10, temperature=0.0)
  for i, prompt in enumerate(prompts):
    alone = generate(params, CFG, [prompt], key, max_new_tokens=10, temperature=0.0)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])


def test_reproducible_for_a_key(params):
  prompts = _prompts()
  a = generate(params, CFG, prompts, jax.random.key(1), max_new_tokens=8, temperature=1.0, top_p=0.9)
  b = generate(params, CFG, prompts, jax.random.key(1), max_new_tokens=8, temperature=1.0, top_p=0.9)
  c = generate(params, CFG, prompts, jax.random.key(2), max_new_tokens=8, temperature=1.0, top_p=0.9)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_logprobs_equal_teacher_forced_forward(params):
  """The recorded log-probs equal log_softmax(logits / T) of a full forward over the same tokens."""
  prompts = _prompts()
  temperature = 0.7
  out = generate(params, CFG, prompts, jax.random.key(4), max_new_tokens=9, temperature=temperature)
  for i, prompt in enumerate(prompts):
    n = int(out.lengths[i])
    seq = np.asarray(prompt + np.asarray(out.tokens[i, :n]).tolist())[None]
    logp = jax.nn.log_softmax(lj.forward(params, jnp.asarray(seq), CFG) / temperature, axis=-1)
    ref = [float(logp[0, len(prompt) - 1 + j, seq[0, len(prompt) + j]]) for j in range(n)]
    np.testing.assert_allclose(out.logprobs[i, :n], ref, atol=1e-4)
    assert np.all(np.asarray(out.logprobs[i, n:]) == 0)


def test_eos_stops_each_row(params):
  prompts = _prompts()
  # Reference rows generated with an EOS id that never occurs.
  greedy = generate(params, CFG, prompts, jax.random.key(0), max_new_tokens=10, temperature=0.0,
                    eos_id=-1)
  rows = np.asarray(greedy.tokens)
  assert int(greedy.lengths.min()) == 10 and not greedy.finished.any()
  eos = next(int(t) for t in rows[1, 1:] if t not in rows[1, :1])
  out = generate(params, CFG, prompts, jax.random.key(0), max_new_tokens=10, temperature=0.0,
                 eos_id=eos, pad_id=1)
  stopped = 0
  for i, row in enumerate(rows):
    hits = np.flatnonzero(row == eos)
    n = hits[0] + 1 if len(hits) else 10
    stopped += bool(len(hits))
    assert int(out.lengths[i]) == n
    assert bool(out.finished[i]) == bool(len(hits))
    np.testing.assert_array_equal(out.tokens[i, :n], row[:n])
    assert np.all(np.asarray(out.tokens[i, n:]) == 1)
  assert stopped >= 1 and int(out.lengths[1]) < 10


def _nucleus_reference(logits, top_p):
  """Loop reference of Meta's sample_top_p: sort, cumsum, drop tokens past the mass top_p."""
  allowed = []
  for row in logits:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep, mass = [], 0.0
    for idx in order:
      if mass >= top_p:
        break
      keep.append(idx)
      mass += probs[idx]
    allowed.append(set(keep))
  return allowed


def test_top_p_and_top_k_support_against_reference():
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 40).astype(np.float32) * 3
  allowed_p = _nucleus_reference(logits, 0.8)
  allowed_k = [set(np.argsort(-row)[:5]) for row in logits]
  seen_p = [set() for _ in range(6)]
  seen_k = [set() for _ in range(6)]
  for s in range(300):
    tok_p, _ = sample_logits(jnp.asarray(logits), jax.random.key(s), 1.0, top_p=0.8)
    tok_k, _ = sample_logits(jnp.asarray(logits), jax.random.key(s), 1.0, top_k=5)
    for i in range(6):
      seen_p[i].add(int(tok_p[i]))
      seen_k[i].add(int(tok_k[i]))
  for i in range(6):
    assert seen_p[i] <= allowed_p[i] and seen_k[i] <= allowed_k[i]
  assert sum(len(s) for s in seen_k) > 6 * 3  # sampling really spreads over the top-k set


def test_sampling_frequencies_follow_softmax():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  keys = jax.random.split(jax.random.key(0), 4000)
  toks = jax.vmap(lambda k: sample_logits(logits, k, 2.0)[0][0])(keys)
  freq = np.bincount(np.asarray(toks), minlength=4) / 4000
  expected = np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / 2.0)
  np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.03)


def test_bad_arguments(params):
  with pytest.raises(ValueError, match="empty"):
    left_pad([[1, 2], []])
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(params, CFG, [[1] * 100], jax.random.key(0), max_new_tokens=50)
  with pytest.raises(ValueError, match="top_p"):
    generate(params, CFG, [[1]], jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="left-padded"):
    generate(params, CFG, (np.ones((1, 3), np.int32), np.array([[True, True, False]])),
             jax.random.key(0), max_new_tokens=2)


def test_chunked_prefill_equals_one_pass(params):
  """A prompt longer than ``prefill_chunk`` is prefilled in chunks (padded on the left to a
  multiple): the same tokens and log-probs as one pass, for ragged left-padded prompts."""
  rng = np.random.RandomState(0)
  tokens, mask = left_pad([list(rng.randint(3, CFG.vocab_size, n)) for n in (11, 3, 7, 1)])
  args = (params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(1))
  one = sample(*args, cfg=CFG, max_new_tokens=6, temperature=1.0, eos_id=-1)
  for chunk in (4, 5):  # 11 tokens: 3 chunks of 4 (1 padding column), 3 of 5 (4 padding)
    chunked = sample(*args, cfg=CFG, max_new_tokens=6, temperature=1.0, eos_id=-1,
                     prefill_chunk=chunk)
    np.testing.assert_array_equal(np.asarray(chunked.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(chunked.logprobs), np.asarray(one.logprobs), atol=1e-5)


def test_weights_in_the_compute_dtype_sample_exactly_as_f32_params(params):
  """The generation copy is cast to cfg.dtype (sharding.to_generation_layout): the model casts
  every weight to it before use, so bf16 weights sample exactly as f32 params with bf16 compute."""
  cfg = CFG.replace(dtype="bfloat16")
  tokens, mask = left_pad([[5, 6, 7, 8], [9, 10]])
  args = (jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(2))
  f32 = sample(params, *args, cfg=cfg, max_new_tokens=6, eos_id=-1)
  bf16 = sample(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), *args, cfg=cfg,
                max_new_tokens=6, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(bf16.tokens), np.asarray(f32.tokens))
  np.testing.assert_array_equal(np.asarray(bf16.logprobs), np.asarray(f32.logprobs))


def test_k_samples_per_prompt_prefill_once_and_equal_repeated_prompts(params):
  """num_samples=K (rejection sampling): each prompt prefilled once, its cache copied K times;
  row i * K + j is sample j of prompt i, the same tokens as the K-times repeated prompts (the
  log-probs within float error: prefill over 3 rows instead of 12)."""
  rng = np.random.RandomState(1)
  prompts = [list(rng.randint(3, CFG.vocab_size, n)) for n in (5, 9, 3)]
  k = 4
  for chunk in (256, 4):  # one prefill pass, and prefill in chunks
    kw = dict(max_new_tokens=8, temperature=1.0, eos_id=-1)
    tokens, mask = left_pad([p for p in prompts for _ in range(k)])
    rep = sample(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(3), cfg=CFG,
                 prefill_chunk=chunk, **kw)
    tokens, mask = left_pad(prompts)
    once = sample(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(3), cfg=CFG,
                  prefill_chunk=chunk, num_samples=k, **kw)
    assert once.tokens.shape == (3 * k, 8)
    np.testing.assert_array_equal(np.asarray(once.tokens), np.asarray(rep.tokens))
    np.testing.assert_allclose(np.asarray(once.logprobs), np.asarray(rep.logprobs), atol=1e-5)
    assert len({tuple(r) for r in np.asarray(once.tokens)[:k].tolist()}) > 1  # K distinct draws
  with pytest.raises(ValueError, match="num_samples"):
    generate(params, CFG, prompts, jax.random.key(0), max_new_tokens=2, num_samples=0)
