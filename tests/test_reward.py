"""Reward model: ranking loss with margins, last-token reward under padding, gradients, the safety
auxiliary loss (Llama 2 Table 29), save/load."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

import llama_jax as lj
from llama_jax.data.sources import RATINGS, SAFETY_LABELS
from llama_jax.model import forward
from llama_jax.reward import step as reward
from llama_jax.train import optim
from llama_jax.train.state import init_train_state

CFG = lj.LlamaConfig.tiny(vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, multiple_of=16)
T = 12
OPT = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip=1.0, schedule="cosine",
           warmup_steps=0, warmup_frac=0.0, final_lr_ratio=0.1)


@pytest.fixture(scope="module")
def params():
  llama = lj.init_params(CFG, jax.random.key(0))
  return reward.init_reward_params(llama, jax.random.key(1))


def _np_bt(diff):
  return np.log1p(np.exp(-diff))  # -log sigmoid(diff), the loop-free NumPy reference


@functools.partial(jax.jit, static_argnums=2)
def _hidden(trunk, tokens, cfg):
  return forward(trunk, tokens, cfg, return_hidden=True)


def _ref_rewards(params, rows):
  """Reference: each row alone at positions 0..n-1 (plain causal forward, no mask, no segments;
  filler after the row cannot reach it), the head applied in NumPy at its last token."""
  trunk = {k: v for k, v in params.items() if k != "head"}
  tokens = np.full((len(rows), T), 5, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
  hidden = np.asarray(_hidden(trunk, tokens, CFG))
  w, b = np.asarray(params["head"]["weight"]), float(params["head"]["bias"])
  return np.array([hidden[i, len(ids) - 1] @ w + b for i, ids in enumerate(rows)])


def _pad(ids, side, t=T, pad=0):
  n = len(ids)
  tokens, mask = np.full(t, pad, np.int32), np.zeros(t, bool)
  sl = slice(0, n) if side == "right" else slice(t - n, t)
  tokens[sl], mask[sl] = ids, True
  return tokens, mask


def test_margin_tables_are_paper_table_27():
  assert RATINGS[0] == "significantly_better" and RATINGS[3] == "negligibly_better_or_unsure"
  np.testing.assert_allclose(reward.MARGINS["small"], [1.0, 2 / 3, 1 / 3, 0.0])
  np.testing.assert_allclose(reward.MARGINS["large"], [3.0, 2.0, 1.0, 0.0])
  np.testing.assert_allclose(reward.MARGINS["none"], [0.0, 0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="margin table"):
    reward.margin_values(np.zeros(2, np.int32), "medium")


def test_ranking_loss_against_numpy_and_margins():
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(size=40).astype(np.float32) * 3, rng.normal(size=40).astype(np.float32) * 3
  rating = rng.integers(-1, 4, size=40).astype(np.int32)
  plain = np.asarray(reward.ranking_loss(rc, rr, reward.margin_values(rating, "none")))
  np.testing.assert_allclose(plain, _np_bt(rc - rr), rtol=1e-5, atol=1e-6)
  table = {"small": [1.0, 2 / 3, 1 / 3, 0.0], "large": [3.0, 2.0, 1.0, 0.0]}
  for name, values in table.items():
    m = np.array([values[k] if k >= 0 else 0.0 for k in rating])
    got = np.asarray(reward.ranking_loss(rc, rr, reward.margin_values(rating, name)))
    np.testing.assert_allclose(got, _np_bt(rc - rr - m), rtol=1e-5, atol=1e-6)
    # A positive margin raises the loss of every pair it applies to; none elsewhere.
    assert np.all(got[m > 0] > plain[m > 0]) and np.allclose(got[m == 0], plain[m == 0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, T), min_size=1, max_size=6), st.sampled_from(["left", "right"]))
def test_last_token_index_property(lengths, side):
  mask = np.stack([_pad(np.ones(n, np.int32), side)[1] for n in lengths])
  want = [max(i for i in range(T) if row[i]) if row.any() else 0 for row in mask]
  np.testing.assert_array_equal(np.asarray(reward.last_token_index(mask)), want)


_score = jax.jit(reward.score, static_argnums=1)
_score_prob = jax.jit(functools.partial(reward.score, probability=True), static_argnums=1)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(1, T), min_size=3, max_size=3), st.integers(0, 2**16))
def test_score_reads_last_real_token_under_left_and_right_padding(params, lengths, seed):
  rng = np.random.default_rng(seed)
  rows = [rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  want = _ref_rewards(params, rows)
  for side in ("left", "right"):
    tokens, mask = map(np.stack, zip(*[_pad(ids, side, pad=int(rng.integers(64))) for ids in rows]))
    got = np.asarray(_score(params, CFG, tokens, mask))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  prob = np.asarray(_score_prob(params, CFG, tokens, mask))
  np.testing.assert_allclose(prob, 1 / (1 + np.exp(-want)), rtol=1e-4, atol=1e-5)


def _pair_batch(rng, side="right", pad_token=None):
  """4 pairs; padding holds ``pad_token``, or random tokens when None (drawn from another RNG,
  so the real tokens depend on ``rng`` alone)."""
  noise = np.random.default_rng(99)
  rows = {}
  for key in ("chosen", "rejected"):
    lens = rng.integers(2, T + 1, 4)
    toks, masks = [], []
    for n in lens:
      tok, mask = _pad(rng.integers(3, 64, n), side, pad=0)
      tok[~mask] = noise.integers(3, 64, (~mask).sum()) if pad_token is None else pad_token
      toks.append(tok)
      masks.append(mask)
    rows[f"{key}_tokens"], rows[f"{key}_mask"] = np.stack(toks), np.stack(masks)
  rows["rating"] = np.array([0, 1, 3, -1], np.int32)
  rows["safety_label"] = np.array([0, -1, 2, 1], np.int32)
  return rows


@pytest.mark.parametrize("side", ["left", "right"])
def test_no_gradient_flows_from_padding(params, side):
  loss = lambda p, b: reward._loss_terms(p, b, CFG, "small")[0]  # pylint: disable=protected-access
  grad = jax.jit(jax.grad(loss))
  a = _pair_batch(np.random.default_rng(3), side, pad_token=0)
  b = _pair_batch(np.random.default_rng(3), side)  # same real tokens, random tokens in the padding
  assert not np.array_equal(a["chosen_tokens"], b["chosen_tokens"])
  ga, gb = grad(params, a), grad(params, b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)
  assert float(jnp.abs(ga["head"]["weight"]).sum()) > 0


def test_train_and_eval_metrics_against_numpy(params):
  batch = _pair_batch(np.random.default_rng(5))
  refs = {k: _ref_rewards(params, [t[m] for t, m in zip(batch[f"{k}_tokens"], batch[f"{k}_mask"])])
          for k in ("chosen", "rejected")}
  margin = np.array([1.0, 2 / 3, 0.0, 0.0])  # "small" for ratings 0, 1, 3, none
  want_loss = _np_bt(refs["chosen"] - refs["rejected"] - margin)
  correct = refs["chosen"] > refs["rejected"]
  out = jax.device_get(jax.jit(functools.partial(reward.eval_step, cfg=CFG, margin="small"))(
      params, batch))
  np.testing.assert_allclose(out["loss_sum"], want_loss.sum(), rtol=1e-4)
  assert out["pairs"] == 4 and out["correct"] == correct.sum()
  np.testing.assert_array_equal(out["pairs_by_rating"], [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(out["correct_by_rating"], correct[[0, 1, 0, 2, 3]] * [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(out["correct_by_label"], correct[[0, 3, 2, 1]])
  opt = optim.make_optimizer(OPT, 10)
  state = init_train_state(params, opt, seed=0)
  step = jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, margin="small"))
  new, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss"], want_loss.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["accuracy"], correct.mean())
  np.testing.assert_allclose(metrics["reward_chosen"], refs["chosen"].mean(), rtol=1e-4, atol=1e-5)
  assert float(metrics["skipped"]) == 0 and int(new.step) == 1


def test_gradient_accumulation_and_empty_batches(params):
  opt = optim.make_optimizer(OPT, 10)
  state = init_train_state(params, opt, seed=0)
  batch = _pair_batch(np.random.default_rng(7))
  batch["chosen_mask"][3] = False  # an empty pair: excluded from the loss
  one = jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, accum_steps=1))
  two = jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, accum_steps=2))
  s1, m1 = one(state, batch)
  s2, m2 = two(state, batch)
  assert float(m1["pairs"]) == 3
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)
  empty = dict(batch, chosen_mask=np.zeros_like(batch["chosen_mask"]))
  s3, m3 = one(state, empty)
  assert float(m3["skipped"]) == 1 and np.isfinite(float(m3["loss"]))
  jax.tree.map(np.testing.assert_array_equal, s3.params, state.params)


def _np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _loop_aux(rc, rr, labels):
  """Loop reference of the safety auxiliary loss per pair: explicit targets per label name,
  math.log of the sigmoid."""
  out = []
  for c, r, lab in zip(rc, rr, labels):
    if lab < 0:
      out.append(0.0)
      continue
    name = SAFETY_LABELS[lab]
    if name == "chosen_safe_rejected_unsafe":
      chosen_safe, rejected_safe = True, False
    elif name == "both_safe":
      chosen_safe, rejected_safe = True, True
    elif name == "both_unsafe":
      chosen_safe, rejected_safe = False, False
    else:
      raise AssertionError(name)
    loss = 0.0
    for x, is_safe in ((c, chosen_safe), (r, rejected_safe)):
      loss -= math.log(_np_sigmoid(x)) if is_safe else math.log(1.0 - _np_sigmoid(x))
    out.append(loss)
  return np.array(out)


def _labelled_batch(seed=11):
  """8 pairs: every safety label, two unlabelled pairs and (index 5, label both_unsafe) an
  invalid pair with an empty chosen row."""
  rng = np.random.default_rng(seed)
  a, b = _pair_batch(rng), _pair_batch(rng)
  batch = {k: np.concatenate([a[k], b[k]]) for k in a}
  batch["safety_label"] = np.array([0, 1, 2, -1, 0, 2, 1, -1], np.int32)
  batch["rating"] = np.array([0, 1, 2, 3, -1, 0, 1, 2], np.int32)
  batch["chosen_mask"][5] = False
  return batch


def _batch_refs(params, batch):
  """Reference rewards (NaN for empty rows) and the valid-pair mask."""
  refs = {}
  for k in ("chosen", "rejected"):
    rows = [t[m] for t, m in zip(batch[f"{k}_tokens"], batch[f"{k}_mask"])]
    got = _ref_rewards(params, [r if len(r) else np.array([5]) for r in rows])
    refs[k] = np.where([len(r) > 0 for r in rows], got, np.nan)
  return refs["chosen"], refs["rejected"], ~np.isnan(refs["chosen"] + refs["rejected"])


def test_safety_aux_loss_function_against_loop_reference():
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(size=24) * 3, rng.normal(size=24) * 3
  labels = np.tile(np.array([0, 1, 2, -1], np.int32), 6)
  got = np.asarray(reward.safety_aux_loss(rc.astype(np.float32), rr.astype(np.float32), labels))
  np.testing.assert_allclose(got, _loop_aux(rc, rr, labels), rtol=1e-5, atol=1e-6)
  assert np.all(got[labels < 0] == 0) and np.all(got[labels >= 0] > 0)
  # Stable far from 0 (log_sigmoid, no log(0)): a confidently wrong score costs ~|r|.
  far = np.asarray(reward.safety_aux_loss(np.float32([-200.0]), np.float32([200.0]),
                                          np.int32([0])))
  np.testing.assert_allclose(far, [400.0], rtol=1e-5)


def test_safety_aux_loss_train_metrics_against_loop_reference(params):
  batch = _labelled_batch()
  rc, rr, valid = _batch_refs(params, batch)
  assert valid.sum() == 7 and not valid[5]
  margin = np.array([1.0, 2 / 3, 1 / 3, 0.0, 0.0, 1.0, 2 / 3, 1 / 3])  # "small" table
  rank = np.array([-math.log(_np_sigmoid(c - r - m)) if v else 0.0
                   for c, r, m, v in zip(rc, rr, margin, valid)])
  aux = np.where(valid, _loop_aux(np.nan_to_num(rc), np.nan_to_num(rr), batch["safety_label"]), 0)
  labelled = valid & (batch["safety_label"] >= 0)  # 5 pairs: the invalid one has a label
  opt = optim.make_optimizer(OPT, 10)
  state = init_train_state(params, opt, seed=0)
  for weight in (0.0, 0.7):
    step = jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, margin="small",
                                     safety_aux_weight=weight))
    _, m = step(state, batch)
    np.testing.assert_allclose(m["loss"], (rank.sum() + weight * aux.sum()) / 7, rtol=1e-4)
    np.testing.assert_allclose(m["ranking_loss"], rank.sum() / 7, rtol=1e-4)
    # Reported whatever the weight: the mean per labelled valid pair.
    np.testing.assert_allclose(m["safety_aux_loss"], aux.sum() / labelled.sum(), rtol=1e-4)
    assert float(m["safety_labelled"]) == 5 and float(m["pairs"]) == 7
  # eval_step's sums: the aux loss and the counts of unsafe_detection at 0.5 on the valid pairs.
  from llama_jax.reward import evaluate as reward_eval  # pylint: disable=import-outside-toplevel
  ev = jax.device_get(jax.jit(functools.partial(reward.eval_step, cfg=CFG, margin="small"))(
      params, batch))
  np.testing.assert_allclose(ev["safety_aux_sum"], aux.sum(), rtol=1e-4)
  det = reward_eval.unsafe_detection(rc[valid], rr[valid], batch["safety_label"][valid], 0.5)
  assert (ev["unsafe"], ev["safe"]) == (det["n_unsafe"], det["n_safe"]) == (4, 6)
  assert ev["unsafe_flagged"] + ev["safe_flagged"] == det["n_flagged"]
  assert ev["unsafe_flagged"] == round(det["recall"] * det["n_unsafe"])
  unlabelled = dict(batch, safety_label=np.full(8, -1, np.int32))
  _, m = step(state, unlabelled)
  assert float(m["safety_aux_loss"]) == 0 and float(m["safety_labelled"]) == 0
  np.testing.assert_allclose(m["loss"], rank.sum() / 7, rtol=1e-4)
  with pytest.raises(ValueError, match="safety_aux_weight"):
    reward.train_step(state, batch, cfg=CFG, optimizer=opt, safety_aux_weight=-1.0)
  with pytest.raises(ValueError, match="safety_label"):
    reward.train_step(state, {k: v for k, v in batch.items() if k != "safety_label"}, cfg=CFG,
                      optimizer=opt, safety_aux_weight=1.0)


def test_safety_aux_gradient_accumulation_matches_one_batch(params):
  batch = _labelled_batch()
  # Microbatches interleave rows (0, 2, 4, 6) / (1, 3, 5, 7): 4 / 3 valid pairs, 3 / 2 labelled.
  acc = jax.jit(reward._accumulate, static_argnums=(2, 3, 4, 5))  # pylint: disable=protected-access
  t1, s1, g1 = acc(params, batch, 1, CFG, "small", 1.5)
  t2, s2, g2 = acc(params, batch, 2, CFG, "small", 1.5)
  np.testing.assert_allclose(t1, t2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s1, s2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  assert float(s1["labelled"]) == 5 and float(s1["aux"]) > 0
  # The aux term is in the gradient: it differs from the ranking loss's alone.
  _, _, g0 = acc(params, batch, 1, CFG, "small", 0.0)
  assert not np.allclose(g0["head"]["bias"], g1["head"]["bias"])
  opt = optim.make_optimizer(OPT, 10)
  state = init_train_state(params, opt, seed=0)
  steps = [jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, margin="small",
                                     accum_steps=k, safety_aux_weight=1.5)) for k in (1, 2)]
  (n1, m1), (n2, m2) = (f(state, batch) for f in steps)
  for key in ("loss", "ranking_loss", "safety_aux_loss", "pairs", "safety_labelled"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), n1.params, n2.params)


def test_safety_aux_weight_zero_is_the_plain_ranking_loss_exactly(params):
  batch = _labelled_batch()

  def old_loss_terms(p, b):  # the ranking loss alone, as before the auxiliary term
    rc, rr, valid = reward.pair_scores(p, CFG, b)
    w = valid.astype(jnp.float32)
    return jnp.sum(w * reward.ranking_loss(rc, rr, reward.margin_values(b["rating"], "small")))

  terms = reward._loss_terms  # pylint: disable=protected-access
  new = jax.jit(jax.value_and_grad(lambda p, b: terms(p, b, CFG, "small", 0.0)[0]))
  old = jax.jit(jax.value_and_grad(old_loss_terms))
  (l_new, g_new), (l_old, g_old) = new(params, batch), old(params, batch)
  assert float(l_new) == float(l_old)
  jax.tree.map(np.testing.assert_array_equal, g_new, g_old)
  # Through train_step: labels (or none at all) change nothing at weight 0, bit for bit.
  opt = optim.make_optimizer(OPT, 10)
  state = init_train_state(params, opt, seed=0)
  step = jax.jit(functools.partial(reward.train_step, cfg=CFG, optimizer=opt, margin="small"))
  s_a, m_a = step(state, batch)
  s_b, m_b = step(state, dict(batch, safety_label=np.full(8, -1, np.int32)))
  s_c, m_c = step(state, {k: v for k, v in batch.items() if k != "safety_label"})
  assert float(m_a["loss"]) == float(m_b["loss"]) == float(m_c["loss"])
  jax.tree.map(np.testing.assert_array_equal, s_a.params, s_b.params)
  jax.tree.map(np.testing.assert_array_equal, s_a.params, s_c.params)


def _safety_world(rng, n):
  """n pairs whose responses are made of "safe" tokens (3..20) or "unsafe" ones (40..60), labels
  cycling over the three safety labels, random prompts; right padded to T."""
  safe_ids, unsafe_ids = np.arange(3, 21), np.arange(40, 61)
  batch = {k: [] for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
  labels = np.arange(n, dtype=np.int32) % 3
  for lab in labels:
    targets = reward.SAFE_TARGETS[lab]
    for key, is_safe in zip(("chosen", "rejected"), targets):
      ids = np.concatenate([rng.integers(21, 40, 3), rng.choice(safe_ids if is_safe else unsafe_ids,
                                                                 int(rng.integers(2, T - 3)))])
      tok, mask = _pad(ids, "right")
      batch[f"{key}_tokens"].append(tok)
      batch[f"{key}_mask"].append(mask)
  batch = {k: np.stack(v) for k, v in batch.items()}
  return dict(batch, rating=np.full(n, -1, np.int32), safety_label=labels)


def test_safety_aux_term_raises_unsafe_recall_at_half():
  """Table 29: the auxiliary term raises the share of unsafe responses with Rs < 0.5 (tiny random
  model, 12 AdamW steps on synthetic labelled pairs, scored on held-out pairs)."""
  from llama_jax.reward import evaluate as reward_eval  # pylint: disable=import-outside-toplevel
  cfg = CFG.replace(n_layers=1)
  rng = np.random.default_rng(0)
  train, held = _safety_world(rng, 24), _safety_world(rng, 24)
  init = reward.init_reward_params(lj.init_params(cfg, jax.random.key(0)), jax.random.key(1))
  opt = optim.make_optimizer(dict(OPT, lr=1e-2, weight_decay=0.0), 12)
  pair_scores = jax.jit(functools.partial(reward.pair_scores, cfg=cfg))
  got = {}
  for weight in (0.0, 1.0):
    step = jax.jit(functools.partial(reward.train_step, cfg=cfg, optimizer=opt,
                                     safety_aux_weight=weight))
    state = init_train_state(init, opt, seed=0)
    for _ in range(12):
      state, _ = step(state, train)
    rc, rr, _ = pair_scores(state.params, batch=held)
    got[weight] = reward_eval.unsafe_detection(np.asarray(rc), np.asarray(rr),
                                               held["safety_label"], 0.5)
  assert got[1.0]["recall"] > got[0.0]["recall"] + 0.2
  assert got[1.0]["recall"] >= 0.9 and got[1.0]["flagged_share_safe"] <= 0.2


def test_params_tree_shardings_and_token_scores(params):
  assert "output" not in params and params["head"]["weight"].shape == (CFG.dim,)
  assert params["head"]["bias"].shape == () and params["head"]["weight"].dtype == jnp.float32
  assert reward.head_logical_axes() == {"weight": P("embed"), "bias": P()}
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  sh = reward.reward_param_shardings(CFG, mesh)
  assert sh["head"]["weight"].spec == P("fsdp") and sh["head"]["bias"].spec == P()
  assert "output" not in sh and sh["layers"]["attention"]["wq"].spec == P(None, "fsdp", "tensor", None)
  tokens = np.random.default_rng(0).integers(3, 64, (2, T)).astype(np.int32)
  scores = np.asarray(reward.token_scores(params, CFG, tokens))
  assert scores.shape == (2, T) and scores.dtype == np.float32
  assert abs(scores[1, -1] - _ref_rewards(params, [tokens[1]])[0]) < 2e-4
  with pytest.raises(ValueError, match="Llama params"):
    reward.init_reward_params({"tok_embeddings": 0}, jax.random.key(0))


def test_save_load_roundtrip(params, tmp_path):
  reward.save_reward_model(str(tmp_path / "rm"), CFG, params)
  cfg, loaded = reward.load_reward_model(str(tmp_path / "rm"))
  assert cfg == CFG.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  with pytest.raises(FileExistsError):
    reward.save_reward_model(str(tmp_path / "rm"), CFG, params)
  with pytest.raises(FileNotFoundError, match="not a reward model"):
    reward.load_reward_model(str(tmp_path))
  bad = dict(params, head={"weight": np.zeros(CFG.dim + 1, np.float32), "bias": np.float32(0)})
  with pytest.raises(ValueError, match="head"):
    reward.save_reward_model(str(tmp_path / "bad"), CFG, bad)
