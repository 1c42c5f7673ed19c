"""DPO step (Rafailov et al. 2023, Eq. 7): the loss and TRL's metrics against a loop-based NumPy
reference, sequence log-probs against a loop over the model's logits, gradient accumulation,
padding pairs, and the loss falling on a fixed batch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.dpo import step as dpo
from llama_jax.model import forward
from llama_jax.train import optim
from llama_jax.train.state import init_train_state

CFG = lj.LlamaConfig.tiny(vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, multiple_of=16)
T = 16
OPT = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, grad_clip=1.0, schedule="constant",
           warmup_steps=0, warmup_frac=0.0, final_lr_ratio=0.1)


@pytest.fixture(scope="module")
def params():
  return lj.init_params(CFG, jax.random.key(0))


def _loop_dpo(pc, pr, rc, rr, beta, w):
  """Loss and TRL metrics, one pair at a time."""
  n = loss = chosen = rejected = correct = margin = lc = lr = 0.0
  for i in range(len(pc)):
    if not w[i]:
      continue
    r_w = beta * (float(pc[i]) - float(rc[i]))
    r_l = beta * (float(pr[i]) - float(rr[i]))
    loss += np.log1p(np.exp(-(r_w - r_l)))  # -log sigmoid(x)
    chosen, rejected, margin = chosen + r_w, rejected + r_l, margin + (r_w - r_l)
    correct += float(r_w > r_l)
    lc, lr, n = lc + float(pc[i]), lr + float(pr[i]), n + 1
  return loss / n, {"rewards/chosen": chosen / n, "rewards/rejected": rejected / n,
                    "rewards/accuracies": correct / n, "rewards/margins": margin / n,
                    "logps/chosen": lc / n, "logps/rejected": lr / n, "pairs": n}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_metrics_against_a_loop(beta):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-30.0, 8.0, 12).astype(np.float32) for _ in range(4))
  w = (rng.random(12) < 0.75).astype(np.float32)
  w[0] = 1.0
  loss, metrics = dpo.dpo_loss(pc, pr, rc, rr, beta, weights=w)
  want_loss, want = _loop_dpo(pc, pr, rc, rr, beta, w)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  assert set(metrics) == set(dpo.METRICS) | {"pairs"}
  for k, v in want.items():
    assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
  # The policy equal to the reference: loss log 2, zero rewards, no pair ranked right.
  loss, metrics = dpo.dpo_loss(pc, pr, pc, pr, beta)
  assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
  assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


def test_dpo_loss_is_stable_for_large_margins():
  loss, _ = dpo.dpo_loss(np.array([0.0, -1e4]), np.array([-1e4, 0.0]), np.zeros(2), np.zeros(2), 1.0)
  assert np.isfinite(float(loss)) and float(loss) == pytest.approx(1e4 / 2, rel=1e-6)


def _row(rng, prompt_len, response_len, t=T):
  """(tokens [t], mask [t], response_mask [t]) right-padded with 0."""
  n = prompt_len + response_len
  tokens = np.zeros(t, np.int32)
  tokens[:n] = rng.integers(3, CFG.vocab_size, n)
  mask = np.arange(t) < n
  return tokens, mask, mask & (np.arange(t) >= prompt_len)


def _pairs(seed=0, b=4, empty=()):
  rng = np.random.default_rng(seed)
  batch = {k: [] for k in dpo.ROW_KEYS}
  for i in range(b):
    p = int(rng.integers(2, 6))
    for side in ("chosen", "rejected"):
      tok, m, r = _row(rng, p, 0 if i in empty else int(rng.integers(1, T - p + 1)))
      batch[f"{side}_tokens"].append(tok)
      batch[f"{side}_mask"].append(m)
      batch[f"{side}_response_mask"].append(r)
  out = {k: np.stack(v) for k, v in batch.items()}
  out["ref_chosen_logps"] = rng.normal(-20.0, 3.0, b).astype(np.float32)
  out["ref_rejected_logps"] = rng.normal(-20.0, 3.0, b).astype(np.float32)
  return out


@functools.partial(jax.jit, static_argnums=2)
def _logits(params, tokens, cfg):
  return forward(params, tokens, cfg)


def _loop_logprob(params, tokens, mask, response_mask):
  """Sum over response tokens i of log softmax(logits[i - 1])[token i], the row alone, unpadded."""
  n = int(mask.sum())
  logits = np.asarray(_logits(params, jnp.asarray(tokens[None, :n]), CFG), np.float64)[0]
  total = 0.0
  for i in range(1, n):
    if response_mask[i]:
      row = logits[i - 1]
      total += row[tokens[i]] - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
  return total


def test_sequence_logprobs_against_a_loop_over_tokens(params):
  batch = _pairs(seed=1, b=5)
  got = np.asarray(dpo.sequence_logprobs(params, CFG, batch["chosen_tokens"],
                                         batch["chosen_mask"], batch["chosen_response_mask"]))
  assert got.shape == (5,) and got.dtype == np.float32
  for i in range(5):
    want = _loop_logprob(params, batch["chosen_tokens"][i], batch["chosen_mask"][i],
                         batch["chosen_response_mask"][i])
    assert got[i] == pytest.approx(want, rel=1e-4, abs=1e-4)
  # Left padding, or other tokens in the padding slots, change nothing.
  shift = [T - int(m.sum()) for m in batch["chosen_mask"]]
  left = [np.stack([np.roll(batch[f"chosen_{k}"][i], shift[i]) for i in range(5)])
          for k in ("tokens", "mask", "response_mask")]
  np.testing.assert_allclose(np.asarray(dpo.sequence_logprobs(params, CFG, *left)), got,
                             rtol=1e-5, atol=1e-4)
  junk = np.where(batch["chosen_mask"], batch["chosen_tokens"], 7)
  np.testing.assert_array_equal(np.asarray(dpo.sequence_logprobs(
      params, CFG, junk, batch["chosen_mask"], batch["chosen_response_mask"])), got)


def _state(params):
  return init_train_state(params, optim.make_optimizer(OPT, 100), 0)


def _step(accum, beta=0.1):
  return jax.jit(functools.partial(dpo.train_step, cfg=CFG, optimizer=optim.make_optimizer(OPT, 100),
                                   beta=beta, accum_steps=accum))


def test_train_metrics_against_numpy_and_accumulation_equals_one_pass(params):
  batch = _pairs(seed=2, b=8, empty=(5,))  # one pair without a response: excluded
  one, m1 = _step(1)(_state(params), batch)
  four, m4 = _step(4)(_state(params), batch)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  pc = [_loop_logprob(params, batch["chosen_tokens"][i], batch["chosen_mask"][i],
                      batch["chosen_response_mask"][i]) for i in range(8)]
  pr = [_loop_logprob(params, batch["rejected_tokens"][i], batch["rejected_mask"][i],
                      batch["rejected_response_mask"][i]) for i in range(8)]
  w = np.ones(8)
  w[5] = 0
  want_loss, want = _loop_dpo(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.1, w)
  for m in (m1, m4):
    assert float(m["loss"]) == pytest.approx(want_loss, rel=1e-4)
    assert float(m["pairs"]) == 7 and float(m["skipped"]) == 0
    for k in dpo.METRICS:
      assert float(m[k]) == pytest.approx(want[k], rel=1e-4, abs=1e-4), k


def test_batch_without_a_valid_pair_is_skipped(params):
  batch = _pairs(seed=3, b=2, empty=(0, 1))
  state, m = _step(1)(_state(params), batch)
  assert float(m["skipped"]) == 1 and float(m["pairs"]) == 0 and float(m["loss"]) == 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_falls_and_accuracy_rises_on_a_fixed_batch(params):
  batch = _pairs(seed=4, b=8)
  ref = jax.jit(functools.partial(dpo.reference_logps, cfg=CFG))(
      params, {k: batch[k] for k in dpo.ROW_KEYS})
  batch.update({k: np.asarray(v) for k, v in ref.items()})  # the reference = the start policy
  step, state = _step(1, beta=0.5), _state(params)
  losses, accs = [], []
  for _ in range(25):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    accs.append(float(m["rewards/accuracies"]))
  assert losses[0] == pytest.approx(np.log(2.0), rel=1e-5) and accs[0] == 0.0
  assert losses[-1] < 0.5 * losses[0] and accs[-1] == 1.0
  assert all(b <= a + 1e-6 for a, b in zip(losses[:5], losses[1:6]))
