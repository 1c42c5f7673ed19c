"""PPO math (llama_jax.rl) against loop-based NumPy references written here."""

from __future__ import annotations

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import rl

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- loop references

def ref_whiten(x, mask, shift_mean=True, eps=1e-8):
  vals = [float(v) for v, m in zip(np.ravel(x), np.ravel(mask)) if m]
  out = np.zeros(np.shape(x))
  if not vals:
    return out
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)
  flat_out = out.reshape(-1)
  for i, (v, m) in enumerate(zip(np.ravel(x), np.ravel(mask))):
    if m:
      w = (float(v) - mean) / math.sqrt(var + eps)
      flat_out[i] = w if shift_mean else w + mean
  return out


def ref_gae(rewards, values, mask, gamma, lam):
  b, t = rewards.shape
  adv = np.zeros((b, t))
  ret = np.zeros((b, t))
  for i in range(b):
    idx = [s for s in range(t) if mask[i, s]]
    a_next, v_next = 0.0, 0.0
    for s in reversed(idx):
      delta = rewards[i, s] + gamma * v_next - values[i, s]
      a = delta + gamma * lam * a_next
      adv[i, s] = a
      ret[i, s] = a + values[i, s]
      a_next, v_next = a, values[i, s]
  return adv, ret


def ref_policy_loss(logp, old, adv, mask, eps):
  total, n, clipped_count, sq = 0.0, 0, 0, 0.0
  for i in range(logp.shape[0]):
    for s in range(logp.shape[1]):
      if not mask[i, s]:
        continue
      r = math.exp(float(logp[i, s]) - float(old[i, s]))
      u = -adv[i, s] * r
      c = -adv[i, s] * min(max(r, 1 - eps), 1 + eps)
      total += max(u, c)
      clipped_count += c > u
      sq += (float(logp[i, s]) - float(old[i, s])) ** 2
      n += 1
  if n == 0:
    return 0.0, 0.0, 0.0
  return total / n, clipped_count / n, 0.5 * sq / n


def ref_value_loss(v, v_old, ret, mask, c):
  total, n, clipped = 0.0, 0, 0
  for i in range(v.shape[0]):
    for s in range(v.shape[1]):
      if mask[i, s]:
        vc = min(max(v[i, s], v_old[i, s] - c), v_old[i, s] + c)
        e, ec = (v[i, s] - ret[i, s]) ** 2, (vc - ret[i, s]) ** 2
        total += max(e, ec)
        clipped += ec > e
        n += 1
  return (0.5 * total / n, clipped / n) if n else (0.0, 0.0)


def ref_rewards(score, kl, mask, beta, finished, penalty):
  b, t = kl.shape
  out = np.zeros((b, t))
  for i in range(b):
    last = None
    for s in range(t):
      if mask[i, s]:
        out[i, s] = -beta * kl[i, s]
        last = s
    if last is not None:
      sc = score[i] if (penalty is None or finished[i]) else penalty
      out[i, last] += sc
  return out


def random_mask(rng, b, t, contiguous=True):
  if contiguous:
    lengths = rng.randint(0, t + 1, b)
    return np.arange(t)[None, :] < lengths[:, None]
  return rng.rand(b, t) < 0.6


# ---------------------------------------------------------------- whitening, logit, rewards

@SETTINGS
@hypothesis.given(x=hnp.arrays(np.float32, (3, 7), elements=st.floats(-50, 50, width=32)),
                  mask=hnp.arrays(bool, (3, 7)), shift=st.booleans())
def test_whiten_matches_masked_reference(x, mask, shift):
  got = np.asarray(rl.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift))
  np.testing.assert_allclose(got, ref_whiten(x, mask, shift), rtol=2e-3, atol=2e-3)
  assert np.all(got[~mask] == 0.0)


def test_whiten_ignores_padding_values():
  x = np.array([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 7.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 1]], bool)
  got = np.asarray(rl.whiten(x, mask))
  assert abs(got[mask].mean()) < 1e-5 and abs(got[mask].std() - 1.0) < 1e-4
  # A constant input whitens to 0 (no float32 rounding noise of the mean blown up by 1/sqrt(eps)).
  const = np.asarray(rl.whiten(jnp.full((3, 7), 2.964289, jnp.float32)))
  np.testing.assert_allclose(const, 0.0, atol=1e-6)
  x2 = np.where(mask, x, 0.0)
  np.testing.assert_allclose(got, np.asarray(rl.whiten(x2, mask)), atol=1e-6)


def test_logit_inverts_sigmoid_and_clips():
  p = np.array([0.01, 0.3, 0.5, 0.9], np.float32)
  np.testing.assert_allclose(np.asarray(rl.logit(p)), [math.log(v / (1 - v)) for v in p.tolist()],
                             rtol=1e-4)
  ends = np.asarray(rl.logit(np.array([0.0, 1.0], np.float32)))
  assert np.all(np.isfinite(ends))
  np.testing.assert_allclose(ends, [math.log(1e-6 / (1 - 1e-6)), -math.log(1e-6 / (1 - 1e-6))],
                             rtol=1e-2)


def test_combined_reward_threshold_and_safety_flag():
  below = np.nextafter(np.float32(0.15), np.float32(0))
  above = np.nextafter(np.float32(0.15), np.float32(1))
  r_safe = np.array([below, np.float32(0.15), above, 0.9, 0.9, 0.05], np.float32)
  r_help = np.full(6, 0.7, np.float32)
  is_safety = np.array([False, False, False, False, True, True])
  expected = []
  for h, s, f in zip(r_help.tolist(), r_safe.tolist(), is_safety.tolist()):
    expected.append(s if (f or s < np.float32(0.15)) else h)
  got = np.asarray(rl.combined_reward(r_help, r_safe, is_safety))
  np.testing.assert_array_equal(got, np.array(expected, np.float32))
  # Explicitly: just below -> safety score; equal and above -> helpfulness score.
  assert got[0] == below and got[1] == np.float32(0.7) and got[2] == np.float32(0.7)


def test_normalized_reward_is_whitened_logit():
  rc = np.array([0.2, 0.5, 0.8, 0.95], np.float32)
  logits = [math.log(p / (1 - p)) for p in rc.tolist()]
  np.testing.assert_allclose(np.asarray(rl.normalized_reward(rc)),
                             ref_whiten(np.array(logits), np.ones(4, bool)), rtol=1e-4, atol=1e-5)


def test_kl_estimators():
  rng = np.random.RandomState(0)
  logp, ref = -rng.rand(2, 5).astype(np.float32) * 3, -rng.rand(2, 5).astype(np.float32) * 3
  for kind in ("k1", "k2", "k3"):
    got = np.asarray(rl.kl_estimate(logp, ref, kind))
    for i in range(2):
      for s in range(5):
        lr = float(ref[i, s]) - float(logp[i, s])
        want = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[kind]
        assert abs(got[i, s] - want) < 1e-5
  assert np.all(np.asarray(rl.kl_estimate(logp, ref, "k3")) >= 0)
  np.testing.assert_array_equal(np.asarray(rl.kl_estimate(logp, logp, "k3")), 0.0)
  with pytest.raises(ValueError, match="kl estimator"):
    rl.kl_estimate(logp, ref, "k4")


@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), contiguous=st.booleans(),
                  penalty=st.sampled_from([None, -1.0, -3.5]))
def test_per_token_rewards_matches_reference(seed, contiguous, penalty):
  rng = np.random.RandomState(seed)
  b, t = 5, 6
  mask = random_mask(rng, b, t, contiguous)
  score = rng.randn(b).astype(np.float32)
  kl = rng.randn(b, t).astype(np.float32)
  finished = rng.rand(b) < 0.5
  rewards, kl_r = rl.per_token_rewards(score, kl, mask, 0.05, finished=finished,
                                       eos_penalty=penalty)
  np.testing.assert_allclose(np.asarray(rewards),
                             ref_rewards(score, kl, mask, 0.05, finished, penalty), atol=1e-6)
  assert np.all(np.asarray(rewards)[~mask] == 0) and np.all(np.asarray(kl_r)[~mask] == 0)


def test_eos_trick_only_on_rows_without_eos():
  score = np.array([0.5, 2.0, -1.0], np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)
  finished = np.array([True, False, True])
  rewards, _ = rl.per_token_rewards(score, np.zeros((3, 4), np.float32), mask, 0.1,
                                    finished=finished, eos_penalty=-7.0)
  np.testing.assert_array_equal(np.asarray(rewards),
                                [[0, 0.5, 0, 0], [0, 0, 0, -7.0], [0, 0, 0, -1.0]])
  with pytest.raises(ValueError, match="finished"):
    rl.per_token_rewards(score, np.zeros((3, 4)), mask, 0.1, eos_penalty=-1.0)


# ---------------------------------------------------------------- GAE

@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), contiguous=st.booleans(),
                  gamma=st.sampled_from([1.0, 0.9]), lam=st.sampled_from([0.95, 1.0, 0.0]))
def test_gae_matches_loop_reference(seed, contiguous, gamma, lam):
  rng = np.random.RandomState(seed)
  b, t = 4, 7
  mask = random_mask(rng, b, t, contiguous)
  rewards = rng.randn(b, t).astype(np.float32)
  values = rng.randn(b, t).astype(np.float32)
  adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  # Padding contributes nothing: garbage at masked positions changes no output.
  junk = rng.randn(b, t).astype(np.float32) * 1e3
  adv2, ret2 = rl.gae(jnp.where(mask, rewards, junk), jnp.where(mask, values, -junk), mask,
                      gamma, lam)
  np.testing.assert_array_equal(np.asarray(adv2), np.asarray(adv))
  np.testing.assert_array_equal(np.asarray(ret2), np.asarray(ret))


def test_gae_no_bootstrap_past_last_token():
  # One real token: A = r - V (V_next = 0 whatever the padded value says).
  adv, ret = rl.gae(jnp.array([[2.0, 0.0]]), jnp.array([[0.5, 100.0]]), jnp.array([[1, 0]], bool),
                    1.0, 0.95)
  np.testing.assert_allclose(np.asarray(adv), [[1.5, 0.0]])
  np.testing.assert_allclose(np.asarray(ret), [[2.0, 0.0]])


# ---------------------------------------------------------------- losses

@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), contiguous=st.booleans(),
                  eps=st.sampled_from([0.1, 0.2]))
def test_policy_loss_matches_reference(seed, contiguous, eps):
  rng = np.random.RandomState(seed)
  b, t = 4, 6
  mask = random_mask(rng, b, t, contiguous)
  old = -rng.rand(b, t).astype(np.float32) * 2
  logp = (old + rng.randn(b, t).astype(np.float32) * 0.3).astype(np.float32)
  adv = rng.randn(b, t).astype(np.float32)
  loss, m = rl.policy_loss(logp, old, adv, mask, eps)
  want_loss, want_cf, want_kl = ref_policy_loss(logp, old, adv, mask, eps)
  assert abs(float(loss) - want_loss) < 1e-4
  assert abs(float(m["clipfrac"]) - want_cf) < 1e-6
  assert abs(float(m["approxkl"]) - want_kl) < 1e-5


def test_policy_loss_clip_boundaries_and_gradients():
  # Ratio exactly on the clip boundaries 1 +- eps, both advantage signs: not clipped, loss = -A r.
  d_hi, d_lo = np.float32(0.18), np.float32(-0.22)
  r_hi, r_lo = float(jnp.exp(d_hi)), float(jnp.exp(d_lo))
  for r, d, eps in ((r_hi, d_hi, r_hi - 1.0), (r_lo, d_lo, 1.0 - r_lo)):
    for a in (1.0, -1.0):
      loss, m = rl.policy_loss(jnp.array([[d]]), jnp.zeros((1, 1)), jnp.array([[a]]),
                               jnp.ones((1, 1), bool), eps)
      assert float(m["ratio"]) == np.float32(r)
      assert float(m["clipfrac"]) == 0.0
      assert float(loss) == pytest.approx(-a * r, rel=1e-6)
  # Outside the range, the pessimistic side clips (zero gradient) and the other does not.
  eps = 0.2
  cases = [(math.log(1.5), 1.0, True), (math.log(1.5), -1.0, False),
           (math.log(0.5), -1.0, True), (math.log(0.5), 1.0, False)]
  for d, a, clipped in cases:
    f = lambda lp: rl.policy_loss(lp, jnp.zeros((1, 1)), jnp.array([[a]]),
                                  jnp.ones((1, 1), bool), eps)[0]
    lp = jnp.array([[d]], jnp.float32)
    loss, g = jax.value_and_grad(f)(lp)
    _, m = rl.policy_loss(lp, jnp.zeros((1, 1)), jnp.array([[a]]), jnp.ones((1, 1), bool), eps)
    r = math.exp(d)
    if clipped:
      assert float(m["clipfrac"]) == 1.0 and float(g[0, 0]) == 0.0
      assert float(loss) == pytest.approx(-a * min(max(r, 1 - eps), 1 + eps), rel=1e-5)
    else:
      assert float(m["clipfrac"]) == 0.0
      assert float(g[0, 0]) == pytest.approx(-a * r, rel=1e-5)
      assert float(loss) == pytest.approx(-a * r, rel=1e-5)


def test_policy_loss_padding_contributes_nothing():
  mask = jnp.array([[1, 1, 0]], bool)
  base = rl.policy_loss(jnp.array([[-1.0, -2.0, -3.0]]), jnp.array([[-1.1, -2.0, 0.0]]),
                        jnp.array([[1.0, -1.0, 9.0]]), mask)
  junk = rl.policy_loss(jnp.array([[-1.0, -2.0, 50.0]]), jnp.array([[-1.1, -2.0, -50.0]]),
                        jnp.array([[1.0, -1.0, -9.0]]), mask)
  assert float(base[0]) == float(junk[0])
  for k in base[1]:
    assert float(base[1][k]) == float(junk[1][k])
  g = jax.grad(lambda lp: rl.policy_loss(lp, jnp.array([[-1.1, -2.0, -50.0]]),
                                         jnp.array([[1.0, -1.0, -9.0]]), mask)[0])(
                                             jnp.array([[-1.0, -2.0, 50.0]]))
  assert np.all(np.isfinite(np.asarray(g))) and float(g[0, 2]) == 0.0
  v = rl.value_loss(jnp.array([[1.0, 2.0, 1e30]]), jnp.array([[1.0, 2.1, -1e30]]),
                    jnp.array([[0.0, 0.0, jnp.inf]]), mask)
  v_ref = rl.value_loss(jnp.array([[1.0, 2.0, 0.0]]), jnp.array([[1.0, 2.1, 0.0]]),
                        jnp.array([[0.0, 0.0, 0.0]]), mask)
  assert float(v[0]) == float(v_ref[0]) and np.isfinite(float(v[0]))
  w = rl.whiten(jnp.array([[1.0, 2.0, jnp.inf]]), mask)
  np.testing.assert_allclose(np.asarray(w), [[-1.0, 1.0, 0.0]], atol=1e-6)


@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), contiguous=st.booleans())
def test_value_loss_matches_reference(seed, contiguous):
  rng = np.random.RandomState(seed)
  b, t = 3, 5
  mask = random_mask(rng, b, t, contiguous)
  v_old = rng.randn(b, t).astype(np.float32)
  v = (v_old + rng.randn(b, t).astype(np.float32) * 0.4).astype(np.float32)
  ret = rng.randn(b, t).astype(np.float32)
  loss, m = rl.value_loss(v, v_old, ret, mask, 0.2)
  want, want_cf = ref_value_loss(v.astype(np.float64), v_old, ret, mask, 0.2)
  assert abs(float(loss) - want) < 1e-4
  assert abs(float(m["vf_clipfrac"]) - want_cf) < 1e-6


def test_losses_jit():
  mask = jnp.ones((2, 3), bool)
  x = jnp.zeros((2, 3))
  loss, _ = jax.jit(rl.policy_loss)(x, x, x + 1.0, mask)
  assert float(loss) == -1.0
  adv, _ = jax.jit(rl.gae, static_argnums=(3, 4))(x + 1.0, x, mask, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[3, 2, 1], [3, 2, 1]])
