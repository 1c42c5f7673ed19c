"""PPO: rollout log-probs vs teacher forcing, reward placement, EOS trick, a tiny PPO run."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama_jax as lj
from llama_jax.ppo import step as ppo
from llama_jax.reward import step as reward
from llama_jax.sampling import GenerateOutput, left_pad, sample

CFG = lj.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                     max_seq_len=64)
EOS, PAD = 2, 0
M = 6  # max new tokens


def _scaled(params, factor):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * factor, params)


@pytest.fixture(scope="module")
def models():
  init = jax.jit(lambda key: _scaled(lj.init_params(CFG, key), 8))
  head = jax.jit(reward.init_reward_params)
  policy = init(jax.random.key(0))
  value = head(init(jax.random.key(1)), jax.random.key(2))
  help_rm = head(init(jax.random.key(3)), jax.random.key(4))
  safe_rm = head(init(jax.random.key(5)), jax.random.key(6))
  return policy, policy, value, help_rm, safe_rm  # reference == initial policy


B = 8  # rollouts (one shape everywhere: every jitted function compiles once)


def _prompts():
  rng = np.random.RandomState(3)
  lengths = [5, 2, 7, 3, 4, 6, 1, 5]
  tokens, mask = left_pad([list(rng.randint(3, CFG.vocab_size, k)) for k in lengths], PAD)
  return {"prompt_tokens": jnp.asarray(tokens), "prompt_mask": jnp.asarray(mask),
          "is_safety": jnp.asarray([False, True, False, False, True, False, False, True])}


def _gen_by_hand():
  """A GenerateOutput with rows that finished (EOS) and rows that hit the budget."""
  rng = np.random.RandomState(4)
  tokens = rng.randint(3, CFG.vocab_size, (B, M)).astype(np.int32)
  lengths = np.array([3, M, 1, M, 2, M, 5, 4], np.int32)
  finished = np.array([True, False, True, True, True, False, True, True])
  for i in range(B):
    if finished[i]:
      tokens[i, lengths[i] - 1] = EOS
    tokens[i, lengths[i]:] = PAD
  return GenerateOutput(jnp.asarray(tokens), jnp.zeros((B, M)), jnp.asarray(lengths),
                        jnp.asarray(finished))


# Teacher-forced old log-probs: exact (KL 0 when policy == reference) and independent of the
# sampler, so hand-made rollouts work; the sampler's are compared with them below.
PCFG = ppo.PPOConfig(beta=0.05, temperature=0.7, eos_penalty=-3.0, minibatch_size=4,
                     old_logprobs="recompute")


@functools.lru_cache(maxsize=None)
def _experience_fn(ppo_cfg):
  """Reward-model rewards then the experience, as ppo_run does."""
  rewards = jax.jit(functools.partial(ppo.rollout_rewards, reward_cfg=CFG, ppo_cfg=ppo_cfg))
  experience = jax.jit(functools.partial(ppo.make_experience, cfg=CFG, ppo_cfg=ppo_cfg))

  def fn(policy, ref, value, help_rm, safe_rm, batch, gen):
    rc, rstats = rewards(help_rm, safe_rm, batch, gen)
    exp, stats = experience(policy, ref, value, batch, gen, rc)
    return exp, dict(stats, safety_used=jnp.mean(rstats["safety_used"]), rc_rows=rc)
  return fn


OPT = optax.adam(3e-3)


@functools.lru_cache(maxsize=None)
def _step():
  return jax.jit(functools.partial(ppo.ppo_train_step, cfg=CFG, policy_opt=OPT, value_opt=OPT,
                                   ppo_cfg=PCFG))


def test_rollout_logprobs_equal_teacher_forced(models):
  policy = models[0]
  batch = _prompts()
  for temperature in (0.7, 1.3):
    gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(9), cfg=CFG,
                 max_new_tokens=M, temperature=temperature, eos_id=EOS, pad_id=PAD)
    ro = ppo.rollout_tensors(batch["prompt_tokens"], batch["prompt_mask"], gen)
    logp, _ = ppo.response_logprobs(policy, ro["tokens"], ro["positions"], ro["segment_ids"],
                                    ro["response_tokens"], cfg=CFG, temperature=temperature)
    mask = np.asarray(ro["response_mask"])
    assert mask.sum() > 4
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(gen.logprobs)[mask],
                               atol=2e-4, rtol=1e-4)
    # Response mask: the first `lengths` tokens, i.e. up to and including EOS.
    for i in range(B):
      assert mask[i].tolist() == [j < int(gen.lengths[i]) for j in range(M)]


def test_response_only_logits_and_sampler_logprobs_match_the_full_path(models):
  """The speed paths (logits of the response positions only; the sampler's log-probs as the old
  ones) give the full-logits, recomputed path's log-probs, experience and losses within 1e-5."""
  policy, ref, value, help_rm, safe_rm = models
  policy = jax.tree.map(lambda x: x * 0.5, policy)  # pi != ref: a non-zero KL
  batch = _prompts()
  gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(5), cfg=CFG,
               max_new_tokens=M, temperature=0.7, eos_id=EOS, pad_id=PAD)
  ro = ppo.rollout_tensors(batch["prompt_tokens"], batch["prompt_mask"], gen)
  mask = np.asarray(ro["response_mask"])
  logits = lj.forward(policy, ro["tokens"], CFG, positions=ro["positions"],
                      segment_ids=ro["segment_ids"])[:, -M - 1:-1] / 0.7  # the old full path
  full = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                            np.asarray(ro["response_tokens"])[..., None], -1)[..., 0]
  fast, _ = ppo.response_logprobs(policy, ro["tokens"], ro["positions"], ro["segment_ids"],
                                  ro["response_tokens"], cfg=CFG, temperature=0.7)
  np.testing.assert_allclose(np.asarray(fast)[mask], full[mask], atol=1e-5, rtol=0)
  sampler_cfg = dataclasses.replace(PCFG, old_logprobs="sampler")
  exp_r, st_r = _experience_fn(PCFG)(policy, ref, value, help_rm, safe_rm, batch, gen)
  exp_s, st_s = _experience_fn(sampler_cfg)(policy, ref, value, help_rm, safe_rm, batch, gen)
  for k in ("old_logprobs", "kl", "rewards", "advantages", "returns"):
    np.testing.assert_allclose(np.asarray(exp_s[k]), np.asarray(exp_r[k]), atol=1e-5, rtol=0,
                               err_msg=k)
  assert float(st_r["kl"]) != 0.0
  state = ppo.init_ppo_state(policy, value, OPT, OPT)
  _, m_r = _step()(state, exp_r, None)
  _, m_s = _step()(state, exp_s, None)
  for k in ("policy_loss", "value_loss", "approxkl", "ratio", "entropy", "kl_policy"):
    assert abs(float(m_s[k]) - float(m_r[k])) < 1e-5, k


def test_microbatched_step_equals_one_pass(models):
  """grad_accum_steps=4 (config.train.grad_accum_steps): the minibatch's gradient, update and
  metrics as one pass (token-weighted), within float error."""
  policy, ref, value, help_rm, safe_rm = models
  batch = _prompts()
  gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(6), cfg=CFG,
               max_new_tokens=M, temperature=0.7, eos_id=EOS, pad_id=PAD)
  exp, _ = _experience_fn(PCFG)(policy, ref, value, help_rm, safe_rm, batch, gen)
  state = ppo.init_ppo_state(jax.tree.map(lambda x: x * 0.9, policy), value, OPT, OPT)
  accum = jax.jit(functools.partial(ppo.ppo_train_step, cfg=CFG, policy_opt=OPT, value_opt=OPT,
                                    ppo_cfg=dataclasses.replace(PCFG, grad_accum_steps=4)))
  one_state, one = _step()(state, exp, None)
  acc_state, acc = accum(state, exp, None)
  assert set(one) == set(acc)
  for k in one:
    np.testing.assert_allclose(float(acc[k]), float(one[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(acc_state), jax.tree.leaves(one_state)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
    ppo.PPOConfig(minibatch_size=4, grad_accum_steps=3)


def test_scoring_in_row_chunks_equals_one_pass(models):
  """ppo.forward_batch_size=2 (the scoring pass 2 rows at a time, strided chunks): the same
  rewards and experience as one pass over the 8 rollouts (within 1e-5: float error); a chunk
  that does not divide fails."""
  policy, ref, value, help_rm, safe_rm = models
  policy = jax.tree.map(lambda x: x * 0.5, policy)
  batch = _prompts()
  gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(7), cfg=CFG,
               max_new_tokens=M, temperature=0.7, eos_id=EOS, pad_id=PAD)
  one, one_st = _experience_fn(PCFG)(policy, ref, value, help_rm, safe_rm, batch, gen)
  chunked, ch_st = _experience_fn(dataclasses.replace(PCFG, forward_batch_size=2))(
      policy, ref, value, help_rm, safe_rm, batch, gen)
  for k in one:
    np.testing.assert_allclose(np.asarray(chunked[k]), np.asarray(one[k]), atol=1e-5, rtol=0,
                               err_msg=k)
  np.testing.assert_allclose(np.asarray(ch_st["rc_rows"]), np.asarray(one_st["rc_rows"]),
                             atol=1e-6, rtol=0)
  assert float(jnp.std(one["ref_logprobs"])) > 0.1  # rows differ: a mix-up would show
  rows = jnp.arange(12.0)[:, None] * jnp.ones((1, 3))
  seen = ppo.map_row_chunks(lambda x: x + jnp.arange(x.shape[0])[:, None] * 0, 4, rows)
  np.testing.assert_array_equal(np.asarray(seen), np.asarray(rows))  # back in row order
  with pytest.raises(ValueError, match="does not divide"):
    ppo.map_row_chunks(lambda x: x, 5, rows)
  with pytest.raises(ValueError, match="forward_batch_size"):
    ppo.PPOConfig(forward_batch_size=-1)


def _right_padded_rm_probs(params, batch, gen):
  """Reference: each row re-packed as prompt + response from position 0 with *right* padding (no
  left padding, no segment ids, default positions): by causality the last real token's score
  depends on the real tokens only."""
  rows = []
  for i in range(B):
    p = np.asarray(batch["prompt_tokens"])[i][np.asarray(batch["prompt_mask"])[i]]
    r = np.asarray(gen.tokens)[i, :int(gen.lengths[i])]
    rows.append(np.concatenate([p, r]))
  width = max(len(r) for r in rows)
  seq = np.full((B, width), 7, np.int32)  # junk padding, never attended by earlier tokens
  for i, r in enumerate(rows):
    seq[i, :len(r)] = r
  scores = np.asarray(reward.token_scores(params, CFG, jnp.asarray(seq)))
  return [1.0 / (1.0 + math.exp(-float(scores[i, len(r) - 1]))) for i, r in enumerate(rows)]


def test_rewards_placement_and_eos_trick(models):
  policy, ref, value, help_rm, safe_rm = models
  batch, gen = _prompts(), _gen_by_hand()
  exp, stats = _experience_fn(PCFG)(policy, ref, value, help_rm, safe_rm, batch, gen)
  rewards, kl = np.asarray(exp["rewards"]), np.asarray(exp["kl"])
  lengths = np.asarray(gen.lengths)
  # Independent reference for the scalar score: per-row unpadded RM passes, Rc, logit, whiten.
  rc = []
  r_help = _right_padded_rm_probs(help_rm, batch, gen)
  r_safe = _right_padded_rm_probs(safe_rm, batch, gen)
  for i in range(B):
    rh, rsafe = r_help[i], r_safe[i]
    rc.append(rsafe if (bool(batch["is_safety"][i]) or rsafe < 0.15) else rh)
  finished = np.asarray(gen.finished)
  np.testing.assert_allclose(np.asarray(stats["rc_rows"]), rc, atol=2e-4)
  # EOS-aware whitening: logit(Rc) is whitened over the rows that ended with EOS only; the
  # truncated rows get the penalty and do not enter the statistics.
  lg = [math.log(p / (1 - p)) for p in rc]
  done = [lg[i] for i in range(B) if finished[i]]
  mean = sum(done) / len(done)
  std = math.sqrt(sum((x - mean) ** 2 for x in done) / len(done) + 1e-8)
  want_score = [(x - mean) / std for x in lg]
  for i in range(B):
    last = lengths[i] - 1
    for j in range(M):
      if j >= lengths[i]:
        assert rewards[i, j] == 0.0 and kl[i, j] == 0.0  # never on padding
        assert exp["advantages"][i, j] == 0.0 and exp["returns"][i, j] == 0.0
      elif j < last:
        assert rewards[i, j] == pytest.approx(-0.05 * kl[i, j], abs=1e-7)
    at_end = rewards[i, last] + 0.05 * kl[i, last]
    if finished[i]:
      assert at_end == pytest.approx(want_score[i], abs=2e-3)
    else:  # the EOS trick, exactly on the row without EOS
      assert at_end == pytest.approx(-3.0, abs=1e-6)
  assert float(stats["eos_rate"]) == 0.75
  assert 0 < float(stats["safety_used"]) < 1  # both branches of Rc were exercised


def test_policy_equals_reference_kl_zero_ratio_one(models):
  policy, ref, value, help_rm, safe_rm = models
  batch = _prompts()
  gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(1), cfg=CFG,
               max_new_tokens=M, temperature=0.7, eos_id=EOS, pad_id=PAD)
  exp, stats = _experience_fn(PCFG)(policy, ref, value, help_rm, safe_rm, batch, gen)
  assert np.all(np.asarray(exp["kl"]) == 0.0) and float(stats["kl"]) == 0.0
  state = ppo.init_ppo_state(policy, value, OPT, OPT)
  _, metrics = _step()(state, exp, None)
  assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-5)
  assert float(metrics["approxkl"]) < 1e-10 and float(metrics["clipfrac"]) == 0.0
  assert abs(float(metrics["kl_policy"])) < 1e-4
  assert float(metrics["entropy"]) > 0.0


def test_ppo_steps_decrease_objective_on_fixed_batch(models):
  policy, ref, value, help_rm, safe_rm = models
  batch = _prompts()
  gen = sample(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(2), cfg=CFG,
               max_new_tokens=M, temperature=0.7, eos_id=EOS, pad_id=PAD)
  cfg4 = PCFG
  exp, _ = _experience_fn(cfg4)(policy, ref, value, help_rm, safe_rm, batch, gen)
  opt = OPT
  state = ppo.init_ppo_state(policy, value, opt, opt)
  step = _step()
  losses, vlosses = [], []
  for _ in range(6):
    state, metrics = step(state, exp, None)
    losses.append(float(metrics["policy_loss"]))
    vlosses.append(float(metrics["value_loss"]))
  assert all(np.isfinite(losses + vlosses))
  assert losses[-1] < losses[0] - 1e-3, losses
  assert vlosses[-1] < vlosses[0], vlosses
  assert int(state.policy.step) == 6 and int(state.value.step) == 6
  # Frozen pieces are untouched; the policy moved away from the reference.
  assert float(metrics["approxkl"]) > 0.0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ref, policy))
  # A full PPO iteration (shuffled minibatches, lax.scan) runs: 8 rollouts / 4 = 2 steps.
  update = jax.jit(functools.partial(ppo.ppo_update, cfg=CFG, policy_opt=opt, value_opt=opt,
                                     ppo_cfg=cfg4))
  state2, m2 = update(state, exp, jax.random.key(0))
  assert float(m2["steps"]) == 2.0 and int(state2.policy.step) == 8
  assert np.isfinite(float(m2["policy_loss"]))


def test_minibatch_and_config_validation():
  exp = {"tokens": jnp.zeros((6, 3), jnp.int32)}
  with pytest.raises(ValueError, match="divisible"):
    ppo.shuffle_minibatches(exp, 4, jax.random.key(0))
  mbs = ppo.shuffle_minibatches({"tokens": jnp.arange(6)[:, None]}, 3, jax.random.key(0))
  assert mbs["tokens"].shape == (2, 3, 1)
  assert sorted(np.asarray(mbs["tokens"]).ravel().tolist()) == list(range(6))
  with pytest.raises(ValueError, match="kl_estimator"):
    ppo.PPOConfig(kl_estimator="k7")
  with pytest.raises(ValueError, match="clip_eps"):
    ppo.PPOConfig(clip_eps=1.5)
  with pytest.raises(ValueError, match="temperature"):
    ppo.PPOConfig(temperature=0.0)


def test_reset_value_head_starts_values_at_zero_and_keeps_the_trunk(models):
  _, _, value, _, _ = models
  zeroed = ppo.reset_value_head(value)
  assert float(jnp.abs(zeroed["head"]["weight"]).sum()) == 0.0
  assert float(zeroed["head"]["bias"]) == 0.0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   {k: v for k, v in zeroed.items() if k != "head"},
                                   {k: v for k, v in value.items() if k != "head"}))
  batch = _prompts()
  gen = _gen_by_hand()
  ro = ppo.rollout_tensors(batch["prompt_tokens"], batch["prompt_mask"], gen)
  v = ppo.response_values(zeroed, ro["tokens"], ro["positions"], ro["segment_ids"], M, cfg=CFG)
  assert float(jnp.abs(v).max()) == 0.0
