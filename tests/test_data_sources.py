"""Tests of llama_jax.data.sources: schemas, bad records (file, line, field), real data."""

from __future__ import annotations

import collections
import gzip
import json
import re

import pytest

from llama_jax.data import sources

USER = {"role": "user", "content": "Hi there"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
GOOD_SFT = {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]}
GOOD_PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "rating": "better",
             "safety_label": "both_safe"}


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
  if name.endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def _expect_error(reader, path, line, field):
  with pytest.raises(ValueError) as e:
    list(reader(path))
  msg = str(e.value)
  assert str(path) in msg and f"line {line}" in msg, msg
  if field is not None:
    assert f"field {field!r}" in msg, msg
  return msg


def test_jsonl_sft_round_trip(tmp_path):
  path = _write(tmp_path, [GOOD_SFT, "", {"messages": [USER, ASSISTANT, USER, ASSISTANT]}],
                name="sft.jsonl.gz")
  records = list(sources.read_jsonl_sft(path))
  assert records == [GOOD_SFT, {"messages": [USER, ASSISTANT, USER, ASSISTANT]}]


@pytest.mark.parametrize("bad,field", [
    ({"dialog": []}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [USER]}, "messages"),  # does not end with an assistant turn
    ({"messages": [ASSISTANT]}, "messages[0].role"),
    ({"messages": [USER, USER, ASSISTANT]}, "messages[1].role"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1].role"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages[1].content"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "messages[1].content"),
    ({"messages": [USER, {"role": "assistant", "content": 3}]}, "messages[1].content"),
    ({"messages": [USER, {"role": "system", "content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "[INST] hi"}, ASSISTANT]}, "messages[0].content"),
    ({"messages": ["hi", ASSISTANT]}, "messages[0]"),
])
def test_jsonl_sft_bad_records(tmp_path, bad, field):
  path = _write(tmp_path, [GOOD_SFT, GOOD_SFT, bad])
  _expect_error(sources.read_jsonl_sft, path, 3, field)


@pytest.mark.parametrize("line,pattern", [("{not json", "invalid JSON"), ("[1, 2]", "JSON object"),
                                          ('"text"', "JSON object")])
def test_jsonl_bad_lines(tmp_path, line, pattern):
  path = _write(tmp_path, [GOOD_PAIR, line])
  msg = _expect_error(sources.read_jsonl_preferences, path, 2, None)
  assert pattern in msg


def test_non_utf8_and_deeply_nested_lines_name_file_and_line(tmp_path):
  path = tmp_path / "bytes.jsonl"
  path.write_bytes((json.dumps(GOOD_PAIR) + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
  assert "not UTF-8 text" in _expect_error(sources.read_jsonl_preferences, path, 2, None)
  deep = _write(tmp_path, [GOOD_PAIR, "[" * 100000 + "]" * 100000], name="deep.jsonl")
  assert "nested too deeply" in _expect_error(sources.read_jsonl_preferences, deep, 2, None)


@pytest.mark.parametrize("reader", [sources.read_jsonl_preferences, sources.read_hh_rlhf_pairs])
def test_truncated_or_fake_gzip_names_the_file(tmp_path, reader):
  good = _write(tmp_path, [GOOD_PAIR] * 200, name="full.jsonl.gz")
  cut = tmp_path / "cut.jsonl.gz"
  cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  fake = tmp_path / "fake.jsonl.gz"
  fake.write_text(json.dumps(GOOD_PAIR) + "\n")
  for path in (cut, fake):
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a complete gzip file"):
      list(reader(path))


def test_jsonl_preferences_round_trip(tmp_path):
  messages_prompt = {"prompt": [USER, ASSISTANT, USER], "chosen": "a", "rejected": "b"}
  path = _write(tmp_path, [GOOD_PAIR, messages_prompt])
  a, b = sources.read_jsonl_preferences(path)
  assert a == {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4",
               "rejected": "5", "rating": "better", "safety_label": "both_safe"}
  assert b == {"prompt": [USER, ASSISTANT, USER], "chosen": "a", "rejected": "b", "rating": None,
               "safety_label": None}


def test_write_jsonl_round_trips_and_replaces_atomically(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text("stale\n")
  records = [{"prompt": "Zähle: 1, 2?", "chosen": "Drei.", "rejected": "Zwei.",
              "rating": "better", "safety_label": None}]
  assert sources.write_jsonl(path, records) == str(path)
  assert list(sources.read_jsonl_preferences(path)) == [
      dict(records[0], prompt=[{"role": "user", "content": "Zähle: 1, 2?"}])]
  assert "Zähle" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
  assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no .tmp left


@pytest.mark.parametrize("change,field", [
    ({"chosen": None}, "chosen"), ({"rejected": ""}, "rejected"), ({"chosen": "   "}, "chosen"),
    ({"rejected": "4"}, "rejected"), ({"rejected": " 4 "}, "rejected"),
    ({"rating": "much better"}, "rating"), ({"rating": 2}, "rating"),
    ({"safety_label": "chosen_unsafe_rejected_safe"}, "safety_label"),
    ({"prompt": [ASSISTANT]}, "prompt[0].role"), ({"prompt": [USER, ASSISTANT]}, "prompt"),
    ({"prompt": ""}, "prompt[0].content"), ({"prompt": 7}, "prompt"),
])
def test_jsonl_preferences_bad_records(tmp_path, change, field):
  bad = dict(GOOD_PAIR, **change)
  path = _write(tmp_path, [GOOD_PAIR, bad])
  _expect_error(sources.read_jsonl_preferences, path, 2, field)


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_jsonl_preferences_missing_field(tmp_path, missing):
  bad = {k: v for k, v in GOOD_PAIR.items() if k != missing}
  path = _write(tmp_path, [bad])
  msg = _expect_error(sources.read_jsonl_preferences, path, 1, missing)
  assert "missing" in msg


def test_jsonl_prompts(tmp_path):
  path = _write(tmp_path, [{"prompt": "hi", "is_safety": True}, {"prompt": [USER]}])
  assert list(sources.read_jsonl_prompts(path)) == [
      {"prompt": [{"role": "user", "content": "hi"}], "is_safety": True},
      {"prompt": [USER], "is_safety": False}]
  path = _write(tmp_path, [{"prompt": "hi", "is_safety": "yes"}])
  _expect_error(sources.read_jsonl_prompts, path, 1, "is_safety")


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    list(sources.read_jsonl_sft(tmp_path / "nope.jsonl"))


def _hh(*turns):
  return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_hh_transcript_parsing(tmp_path):
  prompt = [("Human", "How do I bake bread?"), ("Assistant", "With flour."), ("Human", "Then?")]
  good = {"chosen": _hh(*prompt, ("Assistant", "Knead it.")),
          "rejected": _hh(*prompt, ("Assistant", "No idea."))}
  empty = {"chosen": _hh(*prompt, ("Assistant", "")), "rejected": good["rejected"]}
  same = {"chosen": good["rejected"], "rejected": good["rejected"]}
  path = _write(tmp_path, [good, empty, same], name="hh.jsonl.gz")
  skipped = collections.Counter()
  pairs = list(sources.read_hh_rlhf_pairs(path, skipped=skipped))
  assert pairs == [{"prompt": [{"role": "user", "content": "How do I bake bread?"},
                               {"role": "assistant", "content": "With flour."},
                               {"role": "user", "content": "Then?"}],
                    "chosen": "Knead it.", "rejected": "No idea.", "rating": None,
                    "safety_label": None}]
  assert skipped == {"empty_response": 1, "identical_responses": 1}
  sft = list(sources.read_hh_rlhf_sft(path))
  assert sft == [{"messages": pairs[0]["prompt"] + [{"role": "assistant", "content": "Knead it."}]}]
  with pytest.raises(ValueError, match=r"line 2, field 'chosen': empty response"):
    list(sources.read_hh_rlhf_pairs(path, strict=True))


@pytest.mark.parametrize("bad,line,field", [
    ({"chosen": _hh(("Human", "a"), ("Assistant", "b"))}, 1, "rejected"),
    ({"chosen": "Human: a Assistant: b", "rejected": _hh(("Human", "a"), ("Assistant", "c"))},
     1, "chosen"),
    ({"chosen": _hh(("Human", "a"), ("Assistant", "b")), "rejected": _hh(("Human", "a"))}, 1,
     "rejected"),
    ({"chosen": 5, "rejected": _hh(("Human", "a"), ("Assistant", "c"))}, 1, "chosen"),
])
def test_hh_bad_records(tmp_path, bad, line, field):
  path = _write(tmp_path, [bad], name="hh.jsonl.gz")
  _expect_error(sources.read_hh_rlhf_pairs, path, line, field)


def test_hh_real_data(hh_rlhf_path):
  skipped = collections.Counter()
  pairs = list(sources.read_hh_rlhf_pairs(hh_rlhf_path, skipped=skipped))
  raw = [json.loads(x) for x in gzip.open(hh_rlhf_path, "rt", encoding="utf-8")]
  assert len(raw) == 2312 and len(pairs) + sum(skipped.values()) == 2312
  assert skipped == {"roles_not_alternating": 9, "empty_response": 4}

  def norm(text):
    return re.sub(r"\s+", " ", text).strip()

  def transcript(prompt, response):
    turns = [("Human" if m["role"] == "user" else "Assistant", m["content"]) for m in prompt]
    return norm(_hh(*turns, ("Assistant", response)))

  # Pairs come in file order: rebuilding both transcripts gives the raw texts back.
  k = 0
  for r in raw:
    if k < len(pairs) and transcript(pairs[k]["prompt"], pairs[k]["chosen"]) == norm(r["chosen"]):
      assert transcript(pairs[k]["prompt"], pairs[k]["rejected"]) == norm(r["rejected"])
      k += 1
  assert k == len(pairs)
  # Reference: TRL-style extraction (split at the last "\n\nAssistant:") agrees on responses.
  marker = "\n\nAssistant:"
  reference = collections.Counter()
  for r in raw:
    cut = r["chosen"].rfind(marker)
    if r["rejected"].startswith(r["chosen"][:cut + len(marker)]):
      reference[(r["chosen"][cut + len(marker):].strip(),
                 r["rejected"][cut + len(marker):].strip())] += 1
  ours = collections.Counter((p["chosen"], p["rejected"]) for p in pairs)
  assert not ours - reference
  for pair in pairs:
    sources.validate_preference(pair, "hh")
  sft = list(sources.read_hh_rlhf_sft(hh_rlhf_path))
  assert len(sft) == len(pairs) and sft[0]["messages"][-1]["content"] == pairs[0]["chosen"]


def test_self_instruct_real_data(self_instruct_path):
  records = list(sources.read_self_instruct(self_instruct_path))
  raw = [json.loads(x) for x in open(self_instruct_path, encoding="utf-8")]
  assert len(records) == sum(len(t["instances"]) for t in raw) == 175
  for rec, task in zip(records, raw):
    user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
    inp = task["instances"][0]["input"].strip()
    assert user.startswith(task["instruction"].strip())
    assert user.endswith(inp) and (inp == "" or "\n\n" + inp in user)
    assert answer == task["instances"][0]["output"].strip()
    sources.validate_sft(rec, "self-instruct")


@pytest.mark.parametrize("change,field", [
    ({"instruction": ""}, "instruction"), ({"instances": []}, "instances"),
    ({"instances": [{"input": "x"}]}, "instances[0].output"),
    ({"instances": [{"input": 3, "output": "y"}]}, "instances[0].input"),
    ({"instances": [{"input": "", "output": "  "}]}, "instances[0].output"),
])
def test_self_instruct_bad_records(tmp_path, change, field):
  good = {"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}]}
  path = _write(tmp_path, [good, dict(good, **change)])
  _expect_error(sources.read_self_instruct, path, 2, field)
