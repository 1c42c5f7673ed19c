"""Prompt streams: disjoint per stage, deterministic, distinct held-out sets, file sources."""

from __future__ import annotations

import json

import pytest

from configs import sft_hh_tiny, tiny
from llama_jax.data import prompts
from llama_jax.data.sources import prompt_key


def _keys(records):
  return {prompt_key(r["prompt"]) for r in records}


def test_world_streams_are_disjoint_and_cover_the_split(tmp_path):
  c = tiny.get_config()
  streams = [prompts.load_prompts(c, str(tmp_path), "train", 200, stream=s) for s in range(3)]
  texts = [{r["prompt"][-1]["content"] for r in recs} for recs in streams]
  assert all(not texts[a] & texts[b] for a in range(3) for b in range(a + 1, 3))
  for s, recs in enumerate(streams):
    assert all(prompts.stream_of(c, r) == s for r in recs)
  assert prompts.load_prompts(c, str(tmp_path), "train", 200, stream=1) == streams[1]
  everything = prompts.load_prompts(c, str(tmp_path), "train", 400)
  assert len({prompts.stream_of(c, r) for r in everything}) == c.data.prompt_streams
  held = prompts.load_prompts(c, str(tmp_path), "held_out", 300, distinct=True)
  assert len(_keys(held)) == len(held) == 300
  with pytest.raises(ValueError, match="prompt stream 8"):
    prompts.load_prompts(c, str(tmp_path), "train", 5, stream=8)


def test_file_streams_are_disjoint_and_distinct(tmp_path, hh_rlhf_path, self_instruct_path,
                                               llama2_tokenizer_path):
  c = sft_hh_tiny.get_config()
  c.data.hh_rlhf_path, c.data.self_instruct_path = str(hh_rlhf_path), str(self_instruct_path)
  c.tokenizer.path = str(llama2_tokenizer_path)
  c.data.prompt_streams = 3
  whole = prompts.load_prompts(c, str(tmp_path), "train", 0)
  assert len(_keys(whole)) == len(whole) > 1500  # de-duplicated
  streams = [prompts.load_prompts(c, str(tmp_path), "train", 0, stream=s) for s in range(3)]
  keys = [_keys(s) for s in streams]
  assert sum(len(k) for k in keys) == len(whole)  # a partition of the split
  assert all(not keys[a] & keys[b] for a in range(3) for b in range(a + 1, 3))
  assert all(prompts.file_stream_of(r["prompt"], 3, c.data.split_seed) == 1 for r in streams[1])
  some = prompts.load_prompts(c, str(tmp_path), "train", 50, stream=2)
  assert len(some) == 50 and _keys(some) <= keys[2]
  assert json.dumps(some) == json.dumps(prompts.load_prompts(c, str(tmp_path), "train", 50,
                                                             stream=2))
  assert any(r["is_safety"] for r in whole) and not all(r["is_safety"] for r in whole)
