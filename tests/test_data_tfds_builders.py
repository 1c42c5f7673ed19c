"""Tests of llama_jax.data.tfds_builders: array_record round trips without TensorFlow."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from llama_jax.data import sources, world, world_pairs
from llama_jax.data import tfds_builders as tb


def _read(source):
  return [json.loads(source[i]["record"]) for i in range(len(source))]


def _key(record):
  return json.dumps(record, sort_keys=True)


def _files(path):
  return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def test_tensorflow_is_absent():
  assert importlib.util.find_spec("tensorflow") is None
  assert "tensorflow" not in sys.modules


def test_world_round_trip(tmp_path):
  wcfg = world.WorldConfig(seed=5)
  cfg = tb.WorldBuilderConfig(name="helpful_s5", kind="helpfulness", world=wcfg, num_train=40,
                              num_held_out=12)
  builder = tb.World(config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare()
  for split, n in (("train", 40), ("held_out", 12)):
    source = builder.as_data_source(split=split)
    assert len(source) == n
    expected = world_pairs.helpfulness_pairs(wcfg, split, n)
    assert sorted(map(_key, _read(source))) == sorted(map(_key, expected))
  # Reading needs only the config name, or the directory.
  again = tb.World(config=tb.WorldBuilderConfig(name="helpful_s5"), data_dir=str(tmp_path))
  held_out = _read(builder.as_data_source(split="held_out"))
  assert _read(again.as_data_source(split="held_out")) == held_out
  from_dir = tfds.builder_from_directory(str(tmp_path / "world" / "helpful_s5" / "1.0.0"))
  assert len(from_dir.as_data_source(split="train")) == 40
  assert "tensorflow" not in sys.modules


def test_jsonl_preferences_split_by_prompt(tmp_path):
  rows = []
  for i in range(60):
    for j in range(2):  # two pairs per prompt: they must share a split
      rows.append({"prompt": f"question {i}", "chosen": f"good {j}", "rejected": f"bad {j}",
                   "rating": sources.RATINGS[(i + j) % 4]})
  path = tmp_path / "prefs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  cfg = tb.SourceConfig(name="prefs", source_path=str(path), held_out_fraction=0.25, split_seed=1)
  builder = tb.JsonlPreferences(config=cfg, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  splits = {s: _read(builder.as_data_source(split=s)) for s in ("train", "held_out")}
  assert sorted(map(_key, splits["train"] + splits["held_out"])) == sorted(
      map(_key, sources.read_jsonl_preferences(path)))
  prompts = {s: collections.Counter(r["prompt"][0]["content"] for r in recs)
             for s, recs in splits.items()}
  assert not set(prompts["train"]) & set(prompts["held_out"])
  assert all(c == 2 for c in prompts["held_out"].values())
  assert 5 <= len(prompts["held_out"]) <= 25  # 25% of 60 prompts, within sampling error
  # The split is a pure function of (split_seed, prompt).
  reference = tb.split_records(list(sources.read_jsonl_preferences(path)), 0.25, 1)
  assert sorted(map(_key, reference["held_out"])) == sorted(map(_key, splits["held_out"]))
  other = tb.split_records(list(sources.read_jsonl_preferences(path)), 0.25, 2)
  assert sorted(map(_key, other["held_out"])) != sorted(map(_key, splits["held_out"]))


def test_bad_record_writes_nothing(tmp_path):
  good = {"prompt": "q", "chosen": "a", "rejected": "b"}
  path = tmp_path / "prefs.jsonl"
  lines = [good, good, dict(good, rating="meh")]
  path.write_text("\n".join(json.dumps(x) for x in lines))
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  builder = tb.JsonlPreferences(config=tb.SourceConfig(name="bad", source_path=str(path)),
                                data_dir=str(data_dir))
  with pytest.raises(ValueError, match=rf"{path}, line 3, field 'rating'"):
    builder.download_and_prepare()
  assert list(data_dir.iterdir()) == []


def test_empty_split_is_a_clear_error(tmp_path):
  path = tmp_path / "prefs.jsonl"  # one prompt: its pairs all land in one split
  path.write_text("\n".join(json.dumps({"prompt": "q", "chosen": f"a{i}", "rejected": "b"})
                            for i in range(3)))
  data_dir = tmp_path / "tfds"
  builder = tb.JsonlPreferences(config=tb.SourceConfig(name="one", source_path=str(path)),
                                data_dir=str(data_dir))
  with pytest.raises(ValueError, match=rf"{path}: the '(train|held_out)' split is empty"):
    builder.download_and_prepare()
  assert _files(data_dir) == []  # nothing written


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="kind"):
    tb.JsonlSft(config=tb.SourceConfig(name="x", source_path="f.jsonl", kind="preference"),
                data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(ValueError, match="source_path"):
    tb.JsonlSft(config=tb.SourceConfig(name="y"), data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(ValueError, match="SourceConfig"):
    tb.JsonlSft(config=tb.WorldBuilderConfig(name="z"), data_dir=str(tmp_path))
  assert _files(tmp_path) == []


def test_hh_rlhf_real_data(tmp_path, hh_rlhf_path):
  cfg = tb.SourceConfig(name="harmless_base", source_path=str(hh_rlhf_path))
  builder = tb.HhRlhf(config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare()
  splits = {s: _read(builder.as_data_source(split=s)) for s in ("train", "held_out")}
  expected = list(sources.read_hh_rlhf_pairs(hh_rlhf_path))
  assert sorted(map(_key, splits["train"] + splits["held_out"])) == sorted(map(_key, expected))
  assert 0.03 < len(splits["held_out"]) / len(expected) < 0.07
  reread = tb.HhRlhf(config=tb.SourceConfig(name="harmless_base"), data_dir=str(tmp_path))
  assert reread.info.metadata["skipped"] == {"roles_not_alternating": 9, "empty_response": 4}

  prompts = tb.HhRlhf(config=tb.SourceConfig(name="harmless_prompts", source_path=str(hh_rlhf_path),
                                             kind="prompt", is_safety=True), data_dir=str(tmp_path))
  prompts.download_and_prepare()
  recs = _read(prompts.as_data_source(split="train"))
  assert recs and all(r["is_safety"] and r["prompt"][-1]["role"] == "user" for r in recs)


def test_self_instruct_real_data(tmp_path, self_instruct_path):
  cfg = tb.SourceConfig(name="seeds", source_path=str(self_instruct_path))
  builder = tb.SelfInstruct(config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare()
  recs = [r for s in ("train", "held_out") for r in _read(builder.as_data_source(split=s))]
  expected = sources.read_self_instruct(self_instruct_path)
  assert sorted(map(_key, recs)) == sorted(map(_key, expected))
