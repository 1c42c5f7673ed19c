"""SFT step: gradient accumulation, skipping empty batches, packing, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.sft import step as sft
from llama_jax.train import optim
from llama_jax.train.state import init_train_state

CFG = lj.LlamaConfig.tiny(vocab_size=64)
OPT = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip=1.0, schedule="cosine",
           warmup_steps=0, warmup_frac=0.0, final_lr_ratio=0.1)


def _batch(b=4, t=16, seed=0, supervised=True):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  if supervised:
    mask[:, t // 2:] = 1.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def _state(total_steps=10):
  opt = optim.make_optimizer(OPT, total_steps)
  params = lj.init_params(CFG, jax.random.key(0))
  return init_train_state(params, opt, seed=0), opt


def test_gradient_accumulation_matches_full_batch():
  state, opt = _state()
  batch = _batch()
  batch["loss_mask"][0, :] = 1.0  # unequal token counts per microbatch
  one = jax.jit(functools.partial(sft.train_step, cfg=CFG, optimizer=opt, accum_steps=1))
  two = jax.jit(functools.partial(sft.train_step, cfg=CFG, optimizer=opt, accum_steps=2))
  s1, m1 = one(state, batch, None)
  s2, m2 = two(state, batch, None)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)


def test_batch_without_supervised_tokens_is_skipped():
  state, opt = _state()
  step = jax.jit(functools.partial(sft.train_step, cfg=CFG, optimizer=opt))
  new, metrics = step(state, _batch(supervised=False), None)
  assert float(metrics["skipped"]) == 1.0 and float(metrics["tokens"]) == 0.0
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
  assert int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)


def test_loss_is_mean_nll_over_supervised_tokens():
  state, opt = _state()
  batch = _batch()
  _, metrics = sft.train_step(state, batch, None, cfg=CFG, optimizer=opt)
  logits = np.asarray(lj.forward(state.params, jnp.asarray(batch["inputs"]), CFG), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  ref = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-5)


def test_packed_batch_gives_each_examples_own_losses():
  params = lj.init_params(CFG, jax.random.key(1))
  a, b = _batch(1, 7, seed=3), _batch(1, 5, seed=4)
  packed = {k: np.concatenate([a[k], b[k], np.zeros((1, 4), a[k].dtype)], axis=1) for k in a}
  packed["segment_ids"] = np.array([[1] * 7 + [2] * 5 + [0] * 4], np.int32)
  packed["positions"] = np.array([list(range(7)) + list(range(5)) + [0] * 4], np.int32)
  packed["loss_mask"][:, 12:] = 0
  logits = lj.forward(params, jnp.asarray(packed["inputs"]), CFG, positions=packed["positions"],
                      segment_ids=packed["segment_ids"])
  per_token = -lj.losses.token_logprobs(logits, jnp.asarray(packed["targets"]))
  for ex, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
    alone = -lj.losses.token_logprobs(lj.forward(params, jnp.asarray(ex["inputs"]), CFG),
                                      jnp.asarray(ex["targets"]))
    np.testing.assert_allclose(per_token[:, sl], alone, atol=1e-5)


def test_training_reduces_loss():
  state, opt = _state(total_steps=30)
  step = jax.jit(functools.partial(sft.train_step, cfg=CFG, optimizer=opt), donate_argnums=0)
  batch = _batch()
  losses_seen = []
  for _ in range(30):
    state, metrics = step(state, batch, None)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < 0.5 * losses_seen[0]


def test_cosine_schedule_follows_recipe():
  opt = dict(OPT, lr=2e-5, warmup_steps=5)
  sched = optim.make_schedule(opt, 105)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 2e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(105)), 2e-6, rtol=1e-5)
  mid = 5 + 50
  np.testing.assert_allclose(float(sched(mid)), 2e-6 + 0.5 * (2e-5 - 2e-6), rtol=1e-4)
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optim.make_schedule(dict(opt, schedule="linear"), 10)
  assert optim.warmup_steps_for(dict(warmup_steps=5, warmup_frac=0.03), 1000) == 30


def test_weight_decay_skips_norms():
  mask = optim.decay_mask(lj.init_params(CFG, jax.random.key(0)))
  assert not mask["norm"] and not mask["layers"]["attention_norm"] and mask["layers"]["attention"]["wq"]
