"""Tests of llama_jax.data.input_pipeline: packing, masks, sharding, mixtures, checkpoint/restore."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_jax.data import input_pipeline as pl
from llama_jax.data import sources, world, world_pairs, world_tokenizer
from llama_jax.data import tfds_builders as tb
from llama_jax.tokenizer import B_SYS, E_SYS, Tokenizer

CFG = world.WorldConfig(seed=7)
ONE = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "world.model"
  return Tokenizer(world_tokenizer.train_tokenizer(path, CFG))


def _records(recs, seed=0, num_epochs=1, **kw):
  return pl.records_dataset(recs, seed=seed, num_epochs=num_epochs, **{**ONE, **kw})


_TEXT = st.text(alphabet="abcdefgh 0123456789.,?", min_size=1, max_size=30).filter(str.strip)


@st.composite
def _dialogs(draw):
  n = draw(st.integers(1, 3))
  messages = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
  for _ in range(n):
    messages += [{"role": "user", "content": draw(_TEXT)},
                 {"role": "assistant", "content": draw(_TEXT)}]
  return {"messages": messages}


def _segments(batch):
  """Yields (row, segment id, index array) for every packed segment."""
  for row, seg in enumerate(batch["segment_ids"]):
    for s in range(1, int(seg.max()) + 1):
      yield row, s, np.flatnonzero(seg == s)


@given(dialogs=st.lists(_dialogs(), min_size=1, max_size=8), max_seq_len=st.integers(8, 96),
       batch_size=st.integers(1, 3), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_packed_sft_batches_match_the_dialog_mask(tok, dialogs, max_seq_len, batch_size, seed):
  expected = collections.Counter()
  masks = {}
  for d in dialogs:  # reference: the tokenizer's dialog mask, truncated to max_seq_len + 1
    ids, mask = tok.encode_dialog(d["messages"])
    ids, mask = tuple(ids[:max_seq_len + 1]), mask[:max_seq_len + 1]
    if mask[1:].any():
      expected[ids] += 1
      masks[ids] = mask
  ds = pl.sft_batches(_records(dialogs, seed=seed), tok, batch_size=batch_size,
                      max_seq_len=max_seq_len, seed=seed, drop_remainder=False)
  seen = collections.Counter()
  for batch in ds:
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                       ("segment_ids", np.int32), ("positions", np.int32)):
      assert batch[key].dtype == dtype and batch[key].shape[1] == max_seq_len
    pad = batch["segment_ids"] == 0
    assert (batch["loss_mask"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
    for row, s, idx in _segments(batch):
      assert (idx == np.arange(idx[0], idx[0] + len(idx))).all()  # contiguous
      assert (batch["positions"][row, idx] == np.arange(len(idx))).all()
      inputs, targets = batch["inputs"][row, idx], batch["targets"][row, idx]
      assert (targets[:-1] == inputs[1:]).all()
      ids = tuple(inputs) + (targets[-1],)
      assert ids in masks
      np.testing.assert_array_equal(batch["loss_mask"][row, idx], masks[ids][1:].astype(np.float32))
      seen[ids] += 1
    for row in range(len(batch["segment_ids"])):  # segment ids 1..k in order, padding at the end
      seg = batch["segment_ids"][row]
      real = seg[seg != 0]
      assert (np.diff(real) >= 0).all() and (seg[len(real):] == 0).all()
  assert seen == expected
  stats = pl.sft_stats(dialogs, tok, max_seq_len)
  assert stats["kept"] + stats["truncated"] == sum(expected.values())
  assert stats["records"] == len(dialogs)


def test_loss_tokens_are_the_answer_text(tok):
  recs = world.sft_demonstrations(CFG, "train", 40)
  answers = collections.Counter(r["messages"][-1]["content"] for r in recs)
  decoded = collections.Counter()
  for batch in pl.sft_batches(_records(recs), tok, batch_size=2, max_seq_len=128,
                              drop_remainder=False):
    for row, _, idx in _segments(batch):
      sel = idx[batch["loss_mask"][row, idx] == 1]
      assert batch["targets"][row, sel[-1]] == tok.eos_id
      decoded[tok.decode(batch["targets"][row, sel]).strip()] += 1
  assert decoded == answers


def test_truncation_and_empty_target_drops_are_counted(tok):
  long_user = " ".join(["apple"] * 40)
  recs = [
      {"messages": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": long_user}]},
      {"messages": [{"role": "user", "content": long_user},
                    {"role": "assistant", "content": "ok"}]},
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
  ]
  stats = pl.sft_stats(recs, tok, 24)
  assert (stats["truncated"], stats["dropped_no_target"], stats["kept"]) == (1, 1, 1)
  assert pl.sft_example(recs[1], tok, 24) is None
  rows = list(pl.sft_batches(_records(recs, shuffle=False), tok, batch_size=1, max_seq_len=24,
                             drop_remainder=False))
  n_segments = sum(int(b["segment_ids"].max()) for b in rows)
  assert n_segments == 2 and all(b["loss_mask"].sum() > 0 for b in rows)
  dropped = pl.sft_stats(recs, tok, 24, overlong="drop")
  assert (dropped["dropped_overlong"], dropped["kept"]) == (2, 1)
  with pytest.raises(ValueError, match="overlong"):
    pl.sft_batches(_records(recs), tok, batch_size=1, max_seq_len=24, overlong="cut")


def test_non_padding_fraction():
  batch = {"segment_ids": np.array([[1, 1, 2, 0], [1, 0, 0, 0]]),
           "loss_mask": np.array([[0, 1, 1, 0], [1, 0, 0, 0]], np.float32)}
  assert pl.non_padding_fraction(batch) == 4 / 8 and pl.loss_token_fraction(batch) == 3 / 8


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt"])
def test_checkpoint_restore_reproduces_the_stream(tok, kind):
  if kind == "sft":
    recs = world.sft_demonstrations(CFG, "train", 30)
    make = lambda: pl.sft_batches(_records(recs, seed=1, num_epochs=None), tok, batch_size=2,
                                  max_seq_len=64, seed=3)
  elif kind == "preference":
    recs = world_pairs.safety_pairs(CFG, "train", 30)
    make = lambda: pl.preference_batches(_records(recs, seed=1, num_epochs=None), tok,
                                         batch_size=4, max_seq_len=80)
  else:
    recs = world.sample_prompts(CFG, "train", 30)
    make = lambda: pl.prompt_batches(_records(recs, seed=1, num_epochs=None), tok, batch_size=4,
                                     max_prompt_len=48)
  it = iter(make())
  head = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serializable
  rest = _take(it, 25)  # crosses several epoch boundaries
  restored = iter(make())
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 25), rest)
  _assert_batches_equal(_take(iter(make()), 30), head + rest)  # deterministic from scratch


def test_sharding_splits_records_between_processes():
  recs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "is_safety": False} for i in range(11)]
  shards = [list(_records(recs, seed=4, process_index=i, process_count=2)) for i in range(2)]
  keys = [[r["prompt"][0]["content"] for r in s] for s in shards]
  assert len(keys[0]) == 6 and len(keys[1]) == 5 and not set(keys[0]) & set(keys[1])
  assert sorted(keys[0] + keys[1]) == sorted(f"q{i}" for i in range(11))
  assert keys[0] != sorted(keys[0], key=lambda k: int(k[1:]))  # shuffled
  two = list(_records(recs, seed=4, num_epochs=2, process_index=0, process_count=2))
  assert sorted(map(json.dumps, two[:6])) == sorted(map(json.dumps, two[6:])) and two[:6] != two[6:]
  with pytest.raises(ValueError, match="shard"):
    _records(recs, process_index=2, process_count=2)


def test_mixture_ratios_and_determinism(tok):
  a = [dict(r, rating=None) for r in world_pairs.helpfulness_pairs(CFG, "train", 50)]
  b = world_pairs.safety_pairs(CFG, "train", 50)

  def build(seed):
    return pl.mixture([_records(a, seed=seed, num_epochs=None),
                       _records(b, seed=seed + 1, num_epochs=None)], [0.9, 0.1])

  n = 2000
  ds = build(0)
  mixed = [ds[i] for i in range(n)]
  share = sum(r["safety_label"] is not None for r in mixed) / n
  assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
  again, other = build(0), build(1)
  assert mixed[:100] == [again[i] for i in range(100)]
  assert mixed[:100] != [other[i] for i in range(100)]
  batch = next(iter(pl.preference_batches(build(0), tok, batch_size=20, max_seq_len=96)))
  assert batch["chosen_tokens"].shape == (20, 96)
  with pytest.raises(ValueError, match="positive"):
    pl.mixture([build(0), build(1)], [1.0, 0.0])


def test_preference_batches(tok):
  prompt = [{"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "The answer is 5."},
            {"role": "user", "content": "What is 4 plus 3?"}]
  recs = [{"prompt": prompt, "chosen": "The answer is 7.", "rejected": "Maybe later.",
           "rating": "better", "safety_label": None},
          {"prompt": prompt[-1:], "chosen": "7", "rejected": "6", "rating": None,
           "safety_label": "both_safe"},
          {"prompt": prompt[-1:], "chosen": "apple " * 60, "rejected": "6", "rating": None,
           "safety_label": None}]  # too long: dropped
  assert pl.preference_stats(recs, tok, 64) == {"records": 3, "kept": 2, "dropped_overlong": 1}
  b = next(iter(pl.preference_batches(_records(recs, shuffle=False), tok, batch_size=2,
                                      max_seq_len=64)))
  assert b["rating"].tolist() == [1, -1] and b["safety_label"].tolist() == [-1, 1]
  assert b["rating"].dtype == np.int32 and b["chosen_mask"].dtype == bool
  for i, rec in enumerate(recs[:2]):
    for side in ("chosen", "rejected"):
      # Reference: Meta's chat_completion formula on the plain tokenizer.
      ref = []
      turns = rec["prompt"] + [{"role": "assistant", "content": rec[side]}]
      for u, a in zip(turns[::2], turns[1::2]):
        ref += tok.encode(f"[INST] {u['content']} [/INST] {a['content']} ", bos=True, eos=True)
      tokens, mask = b[f"{side}_tokens"][i], b[f"{side}_mask"][i]
      assert mask.sum() == len(ref) and mask[:len(ref)].all()
      assert tokens[:len(ref)].tolist() == ref and tokens[len(ref) - 1] == tok.eos_id
      response = b[f"{side}_response_mask"][i]
      assert response[len(ref) - 1] and not (response & ~mask).any()
      assert tok.decode(tokens[response]).strip() == rec[side]


def test_prompt_batches(tok):
  recs = [{"prompt": [{"role": "system", "content": "Be kind."},
                      {"role": "user", "content": "What is 1 plus 1?"}], "is_safety": False},
          {"prompt": [{"role": "user", "content": "How do I steal a bike from a store?"}],
           "is_safety": True},
          {"prompt": [{"role": "user", "content": "apple " * 80}], "is_safety": False}]
  assert pl.prompt_stats(recs, tok, 40)["dropped_overlong"] == 1
  b = next(iter(pl.prompt_batches(_records(recs, shuffle=False), tok, batch_size=2,
                                  max_prompt_len=40)))
  assert b["is_safety"].tolist() == [False, True] and b["prompt_tokens"].dtype == np.int32
  refs = [tok.encode(f"[INST] {B_SYS}Be kind.{E_SYS}What is 1 plus 1? [/INST]", bos=True),
          tok.encode("[INST] How do I steal a bike from a store? [/INST]", bos=True)]
  for i, ref in enumerate(refs):
    mask = b["prompt_mask"][i]
    assert mask[-len(ref):].all() and not mask[:-len(ref)].any()  # left-padded
    assert b["prompt_tokens"][i, -len(ref):].tolist() == ref
    assert json.loads(b["prompt_json"][i]) == recs[i]["prompt"]
  sft_record = {"messages": recs[1]["prompt"] + [{"role": "assistant", "content": "No."}]}
  sft = pl.prompt_example(sft_record, tok, 40)
  assert sft["prompt_tokens"][-len(refs[1]):].tolist() == refs[1] and not sft["is_safety"]


def test_tfds_source_to_batches(tok, tmp_path):
  cfg = tb.WorldBuilderConfig(name="sft", kind="sft", world=CFG, num_train=20, num_held_out=5)
  builder = tb.World(config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare()
  records = _records(builder.as_data_source(split="held_out"), shuffle=False)
  assert sorted(map(json.dumps, records)) == sorted(
      map(json.dumps, world.sft_demonstrations(CFG, "held_out", 5)))
  batches = list(pl.sft_batches(records, tok, batch_size=2, max_seq_len=64, drop_remainder=False))
  assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 5


def test_hh_rlhf_with_llama2_tokenizer(hh_rlhf_path, llama2_tokenizer_path):
  llama = Tokenizer(llama2_tokenizer_path)
  recs = list(sources.read_hh_rlhf_sft(hh_rlhf_path))[:64]
  stats = pl.sft_stats(recs, llama, 512)
  assert stats["records"] == 64 and stats["dropped_no_target"] == 0
  answers = {r["messages"][-1]["content"] for r in recs}
  fractions, checked = [], 0
  for batch in pl.sft_batches(_records(recs), llama, batch_size=4, max_seq_len=512,
                              num_packing_bins=8, drop_remainder=False):
    fractions.append(pl.non_padding_fraction(batch))
    for row, _, idx in _segments(batch):
      if batch["targets"][row, idx[-1]] != llama.eos_id:
        continue  # truncated example
      sel = idx[batch["loss_mask"][row, idx] == 1]
      ends = np.flatnonzero(batch["targets"][row, sel] == llama.eos_id)
      last = sel[ends[-2] + 1:] if len(ends) > 1 else sel
      assert llama.decode(batch["targets"][row, last]).strip() in answers
      checked += 1
  assert checked >= 40 and np.mean(fractions) > 0.5


def test_pad_batch_fills_the_missing_rows_and_refuses_a_long_batch():
  batch = {"tokens": np.ones((2, 3), np.int32), "rating": np.array([1, 2], np.int32)}
  out = pl.pad_batch(batch, 4, {"rating": -1})
  np.testing.assert_array_equal(out["tokens"], [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(out["rating"], [1, 2, -1, -1])
  assert out["tokens"].dtype == np.int32 and out["rating"].dtype == np.int32
  with pytest.raises(ValueError, match="exceed size 1"):
    pl.pad_batch(batch, 1)
