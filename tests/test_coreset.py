"""data.coreset: greedy k-center against a loop reference, coreset vs random subsets, the
embedding, config validation, and an SFT stage run on a coreset."""

import json

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis.extra import numpy as hnp

import llama_jax as lj
from llama_jax import convert
from llama_jax.data import coreset, world
from llama_jax.recipe import sections, stages
from llama_jax.train import settings
from llama_jax.train import workdir as wd

from train_helpers import tiny_sft_config


def _reference_kcenter(x, k, initial):
  """Greedy k-center as a plain double loop over points and picked points."""
  x = np.asarray(x, np.float64)
  picked = list(initial) or [min(range(len(x)), key=lambda j: np.linalg.norm(x[j] - x.mean(0)))]
  while len(picked) < k:
    best, best_d = None, -1.0
    for j in range(len(x)):
      if j in picked:
        continue
      d = min(float(np.sqrt(np.sum((x[j] - x[p]) ** 2))) for p in picked)
      if d > best_d:
        best, best_d = j, d
    picked.append(best)
  return picked


@pytest.mark.parametrize("initial", [(), (3, 17), (5,)])
def test_kcenter_greedy_matches_the_loop_reference(initial):
  x = np.random.default_rng(0).normal(size=(40, 6))
  got = coreset.kcenter_greedy(x, 15, initial)
  assert got.dtype == np.int64 and got.tolist() == _reference_kcenter(x, 15, list(initial))


def test_kcenter_greedy_errors_and_duplicates():
  x = np.zeros((5, 2))  # all duplicates: still k distinct indices
  assert sorted(coreset.kcenter_greedy(x, 5, (2,)).tolist()) == [0, 1, 2, 3, 4]
  for k, initial in ((0, ()), (6, ()), (2, (5,)), (3, (1, 1))):
    with pytest.raises(ValueError, match="kcenter_greedy"):
      coreset.kcenter_greedy(x, k, initial)
  with pytest.raises(ValueError, match="must be \\[n, d\\]"):
    coreset.kcenter_greedy(np.zeros(5), 2)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    x=hnp.arrays(np.float64, st.tuples(st.integers(2, 30), st.integers(1, 4)),
                 elements=st.floats(-10, 10, allow_nan=False, width=32)),
    data=st.data())
def test_greedy_max_min_distance_never_increases(x, data):
  n = len(x)
  k = data.draw(st.integers(1, n))
  initial = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=min(3, k)))
  picked = coreset.kcenter_greedy(x, k, initial)
  assert len(set(picked.tolist())) == k
  start = max(1, len(initial))
  gaps = [min(np.linalg.norm(x[picked[i]] - x[p]) for p in picked[:i]) for i in range(start, k)]
  assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:]))


def _blobs(seed=0):
  """One large cluster of 500 points and nine of 10, far apart, in 8 dimensions."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(10, 8)) * 20
  sizes = [500] + [10] * 9
  x = np.concatenate([c + rng.normal(size=(s, 8)) for c, s in zip(centres, sizes)])
  return x, np.repeat(np.arange(10), sizes)


def test_coreset_picks_k_distinct_deterministic_and_covers_every_cluster():
  x, label = _blobs()
  idx = coreset.coreset_indices(x, 12, n_clusters=10, seed=0)
  assert idx.dtype == np.int64 and len(set(idx.tolist())) == 12
  assert idx.tolist() == sorted(idx.tolist())
  np.testing.assert_array_equal(idx, coreset.coreset_indices(x, 12, n_clusters=10, seed=0))
  assert set(label[idx]) == set(range(10))
  # Random subsets of the same size usually miss a small cluster.
  missed = sum(len(set(label[coreset.random_indices(len(x), 12, s)])) < 10 for s in range(20))
  assert missed >= 18
  assert coreset.coreset_indices(x, len(x), 10, 0).tolist() == list(range(len(x)))


def test_random_indices_and_subset_size():
  a = coreset.random_indices(100, 7, seed=3)
  assert a.tolist() == sorted(set(a.tolist())) and len(a) == 7
  np.testing.assert_array_equal(a, coreset.random_indices(100, 7, seed=3))
  assert coreset.subset_size(4000, 0.005) == 20 and coreset.subset_size(4000, 0.05) == 200
  assert coreset.subset_size(10, 1e-6) == 1 and coreset.subset_size(10, 1.0) == 10
  with pytest.raises(ValueError, match="random_indices"):
    coreset.random_indices(5, 6, 0)


def _init(cfg, seed):
  return jax.jit(lambda key: lj.init_params(cfg, key))(jax.random.key(seed))  # eager is slow


def test_embed_is_unit_mean_pooled_and_independent_of_padding_and_batch():
  cfg = lj.LlamaConfig.tiny(vocab_size=64)
  params = _init(cfg, 0)
  hidden_of = jax.jit(lambda p, t: lj.forward(p, t, cfg, return_hidden=True))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 64, (5, 16)).astype(np.int32)
  mask = np.zeros((5, 16), bool)
  for i, length in enumerate([16, 9, 9, 16, 9]):  # two shapes for the reference below
    mask[i, :length] = True
  got = coreset.embed(params, cfg, tokens, mask, batch_size=2)
  assert got.shape == (5, cfg.dim) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  for i in range(5):  # each row alone, unpadded: padding and batch-mates change nothing
    n = int(mask[i].sum())
    hidden = np.asarray(hidden_of(params, tokens[i:i + 1, :n]))[0]
    ref = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
    np.testing.assert_allclose(got[i], ref, atol=2e-5)


@pytest.mark.parametrize("field,value,match", [
    ("select", "best", "config.data.select must be one of"),
    ("select_fraction", 0.0, r"config.data.select_fraction must be a finite number in \(0.0, 1.0\]"),
    ("select_fraction", 1.5, "config.data.select_fraction"),
    ("select_clusters", 0, "config.data.select_clusters must be an int >= 1"),
])
def test_bad_selection_fields_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    settings.read({"data": {field: value}}, "data", sections.Data)


def test_coreset_without_an_embedding_model_names_the_field(tmp_path):
  c = tiny_sft_config()
  c.data.select = "coreset"
  with pytest.raises(ValueError, match="config.data.select_embed_from"):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  c.data.select_embed_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.data.select_embed_from"):
    coreset.embed_from(c)
  c.data.select = "random"  # needs no model
  assert coreset.embed_from(c) == ""


def test_workdirs_from_before_the_selection_fields_resume_with_their_defaults():
  new = tiny_sft_config().to_dict()
  old = {**new, "data": {k: v for k, v in new["data"].items() if not k.startswith("select")}}
  assert wd.config_changes(old, new) == []
  new["data"]["select"] = "random"
  assert wd.config_changes(old, new) == ["data.select: '<absent>' -> 'random'"]


def test_random_selection_counts_world_tasks():
  c = tiny_sft_config()
  c.data.select, c.data.select_fraction = "random", 0.1
  records = world.sft_demonstrations(world.WorldConfig(), "train", 50)
  (sub,), stats = coreset.select(c, ["world"], [records], tokenizer=None)
  assert len(sub) == 5 and stats["selected"] == 5 and stats["method"] == "random"
  entry = stats["sources"]["world"]
  assert sum(entry["per_task"].values()) == 5 and sum(entry["per_task_all"].values()) == 50
  assert [sub[i] for i in range(5)] == [records[i] for i in coreset.random_indices(50, 5, c.seed)]
  c.data.select = "all"
  assert coreset.select(c, ["world"], [records], tokenizer=None) == ([records], {})


def test_sft_stage_trains_on_the_coreset(tmp_path):
  embed_cfg = lj.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                             multiple_of=16, max_seq_len=128)
  convert.save_orbax(str(tmp_path / "embedder"), embed_cfg, _init(embed_cfg, 1))
  c = tiny_sft_config(num_steps=2)
  c.data.select, c.data.select_fraction, c.data.select_clusters = "coreset", 0.05, 4
  c.data.select_embed_from = str(tmp_path / "embedder")
  out = stages.run(c, str(tmp_path / "w"))
  assert out["finished"]
  stats = json.loads((tmp_path / "w" / "data_stats.json").read_text())
  sel = stats["selection"]
  n = c.data.world_sft_examples
  k = coreset.subset_size(n, 0.05)
  assert (sel["method"], sel["fraction"], sel["selected"], sel["records"]) == ("coreset", 0.05, k, n)
  assert sum(sel["sources"]["world"]["per_task"].values()) == k
  assert stats["train"]["records"] == k
