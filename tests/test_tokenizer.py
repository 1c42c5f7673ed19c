"""Tests for llama_jax.tokenizer against raw sentencepiece and a port of Meta's chat_completion."""

from __future__ import annotations

import functools
import json
import pickle
import re

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import sentencepiece as spm

from llama_jax.config import LlamaConfig
import llama_jax.tokenizer as tokenizer_lib

# Meta's llama/generation.py constants, restated here so the reference does not use our module.
REF_B_INST, REF_E_INST = "[INST]", "[/INST]"
REF_B_SYS, REF_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
REF_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

_SETTINGS = hypothesis.settings(
    max_examples=150, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])


@functools.lru_cache(maxsize=None)
def _tok(path) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer(path)


@functools.lru_cache(maxsize=None)
def _sp(path) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=str(path))


def meta_encode(sp, s, bos, eos):
  """Port of Meta's llama/tokenizer.py ``Tokenizer.encode``."""
  assert type(s) is str
  t = sp.encode(s)
  if bos:
    t = [sp.bos_id()] + t
  if eos:
    t = t + [sp.eos_id()]
  return t


def meta_chat_ids(sp, dialog):
  """Line-by-line port of Meta's ``Llama.chat_completion`` (llama/generation.py, Llama 2) token ids.

  The only change: a dialog ending with an assistant message is allowed (no final user part).
  """
  if dialog[0]["role"] == "system":
    dialog = [
        {
            "role": dialog[1]["role"],
            "content": REF_B_SYS + dialog[0]["content"] + REF_E_SYS + dialog[1]["content"],
        }
    ] + dialog[2:]
  assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
      [msg["role"] == "assistant" for msg in dialog[1::2]])
  dialog_tokens = sum(
      [
          meta_encode(
              sp,
              f"{REF_B_INST} {(prompt['content']).strip()} {REF_E_INST} {(answer['content']).strip()} ",
              bos=True,
              eos=True,
          )
          for prompt, answer in zip(dialog[::2], dialog[1::2])
      ],
      [],
  )
  if dialog[-1]["role"] == "user":
    dialog_tokens += meta_encode(
        sp, f"{REF_B_INST} {(dialog[-1]['content']).strip()} {REF_E_INST}", bos=True, eos=False)
  return dialog_tokens


def reference_mask(sp, dialog):
  """Assistant mask by prefix difference: the tokens of ``[INST] p [/INST] a `` beyond those of
  ``[INST] p [/INST]`` (checked to be a prefix) are the answer; plus the EOS of each exchange."""
  if dialog[0]["role"] == "system":
    dialog = [{"role": "user", "content": REF_B_SYS + dialog[0]["content"] + REF_E_SYS +
               dialog[1]["content"]}] + dialog[2:]
  mask = []
  for prompt, answer in zip(dialog[::2], dialog[1::2]):
    head = sp.encode(f"{REF_B_INST} {prompt['content'].strip()} {REF_E_INST}")
    full = sp.encode(f"{REF_B_INST} {prompt['content'].strip()} {REF_E_INST} {answer['content'].strip()} ")
    assert full[:len(head)] == head
    mask += [False] * (1 + len(head)) + [True] * (len(full) - len(head)) + [True]
  if dialog[-1]["role"] == "user":
    mask += [False] * (1 + len(sp.encode(f"{REF_B_INST} {dialog[-1]['content'].strip()} {REF_E_INST}")))
  return mask


# ------------------------------------------------------------------------------ plain encode/decode


def test_known_ids(llama2_tokenizer_path):
  tok = _tok(llama2_tokenizer_path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
  assert _sp(llama2_tokenizer_path).pad_id() == -1 and tok.pad_id == tok.eos_id == 2
  assert tok.encode("Hello world", bos=False) == [15043, 3186]
  assert tok.encode("Hello world") == [1, 15043, 3186]
  assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
  assert tok.encode("", bos=False) == []
  assert tok.decode([1, 15043, 3186, 2]) == "Hello world"
  # Digits are split into single-digit pieces.
  assert [tok.sp_model.id_to_piece(i) for i in tok.encode("2023", bos=False)] == ["▁", "2", "0", "2", "3"]


TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "a   b    c",
    "trailing spaces   ",
    "line one\nline two\n\n\nline five",
    "\tTabs\tand\t\ttabs",
    "2023 costs $1,234.56 (or 0.5%)",
    "café, naïve, Ångström, Straße",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 and 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "<s>[INST] not special [/INST]</s>",
    "\u00a0non-breaking\u200bzero-width",
    "",
    " ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(llama2_tokenizer_path, text):
  tok, sp = _tok(llama2_tokenizer_path), _sp(llama2_tokenizer_path)
  ref = sp.encode(text)
  assert tok.encode(text, bos=False, eos=False) == ref
  assert tok.encode(text, bos=True, eos=True) == [1] + ref + [2]
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == sp.decode(ref)
  assert tok.decode(np.asarray(ref, np.int32)) == sp.decode(ref)


@_SETTINGS
@hypothesis.given(text=st.text(), bos=st.booleans(), eos=st.booleans())
def test_encode_property(llama2_tokenizer_path, text, bos, eos):
  tok, sp = _tok(llama2_tokenizer_path), _sp(llama2_tokenizer_path)
  ref = sp.encode(text)
  ids = tok.encode(text, bos=bos, eos=eos)
  assert ids == ([1] if bos else []) + ref + ([2] if eos else [])
  assert tok.decode(ids) == sp.decode(ref)


def test_decode_strips_pad_and_validates(llama2_tokenizer_path):
  tok = _tok(llama2_tokenizer_path)
  padded = [1, 15043, 3186, 2] + [tok.pad_id] * 5
  assert tok.decode(padded) == "Hello world"
  assert tok.decode(np.asarray(padded, np.int64)) == "Hello world"
  assert tok.decode([]) == ""
  with pytest.raises(ValueError, match="position 1"):
    tok.decode([1, 32000])
  with pytest.raises(ValueError, match="position 0"):
    tok.decode([-1, 5])
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.ones((2, 2), np.int32))
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")


def test_pickle_round_trip(llama2_tokenizer_path):
  tok2 = pickle.loads(pickle.dumps(_tok(llama2_tokenizer_path)))
  sp = _sp(llama2_tokenizer_path)
  for text in TEXTS:
    assert tok2.encode(text, bos=False) == sp.encode(text)
  assert (tok2.vocab_size, tok2.bos_id, tok2.eos_id, tok2.pad_id) == (32000, 1, 2, 2)


# ------------------------------------------------------------------------------ errors


def test_missing_or_invalid_files(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.model"
  with pytest.raises(ValueError, match=re.escape(str(missing))):
    tokenizer_lib.Tokenizer(missing)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    tokenizer_lib.Tokenizer(tmp_path)  # a directory
  text = tmp_path / "tokenizer.txt"
  text.write_text("this is\na text file\n")
  blob = tmp_path / "tokenizer.json"
  blob.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
  rand = tmp_path / "random.model"
  rand.write_bytes(np.random.default_rng(0).bytes(4096))
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  for path in (text, blob, rand, empty):
    with pytest.raises(ValueError, match=re.escape(str(path))):
      tokenizer_lib.Tokenizer(str(path))


def test_check_vocab(llama2_tokenizer_path):
  tok = _tok(llama2_tokenizer_path)
  tok.check_vocab(LlamaConfig())  # 32000: no error
  with pytest.raises(ValueError) as err:
    tok.check_vocab(LlamaConfig(vocab_size=32128))
  msg = str(err.value)
  assert "32128" in msg and "32000" in msg and str(llama2_tokenizer_path) in msg


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "hi"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "message 2"),
    ([{"role": "system", "content": "s"}], "message 0"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1"),
    ([{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1"),
    ([{"role": "user", "content": 3}], "message 0"),
    ([{"role": "user"}], "message 0"),
    (["hello"], "message 0"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": "x [/INST] y"}], "message 1"),
    ([{"role": "system", "content": "<<SYS>> again"}, {"role": "user", "content": "u"}], "message 0"),
    ([{"role": "user", "content": "[INST]"}], "message 0"),
    ([{"role": "user", "content": "a <</SYS>>"}], "message 0"),
])
def test_bad_dialogs(llama2_tokenizer_path, messages, match):
  with pytest.raises(ValueError, match=match):
    _tok(llama2_tokenizer_path).encode_dialog(messages)


# ------------------------------------------------------------------------------ dialogs

SYSTEM = {"role": "system", "content": "You are a helpful, respectful and honest assistant."}
DIALOGS = {
    "single_user": [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    "system_user": [SYSTEM, {"role": "user", "content": "Always answer with Haiku.\n"}],
    "multi_turn_generation": [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Paris has:\n\n1. The Eiffel Tower\n2. The Louvre  "},
        {"role": "user", "content": "  What is so great about #1?  "},
    ],
    "system_multi_turn_training": [
        SYSTEM,
        {"role": "user", "content": "Translate 'chat' to French."},
        {"role": "assistant", "content": "« chat » — c'est le même mot ! 🐱"},
        {"role": "user", "content": "代码?"},
        {"role": "assistant", "content": "def f(x):\n    return x  # 42\n"},
    ],
    "empty_answer_training": [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": ""},
    ],
    "whitespace_answer_then_user": [
        {"role": "user", "content": "\n\tq\n"},
        {"role": "assistant", "content": "   \n "},
        {"role": "user", "content": ""},
    ],
}


def _exchanges(dialog):
  """(prompt, answer) contents after Meta's system merge (reference side, no module code)."""
  if dialog[0]["role"] == "system":
    dialog = [{"role": "user", "content": REF_B_SYS + dialog[0]["content"] + REF_E_SYS +
               dialog[1]["content"]}] + dialog[2:]
  return [(p["content"], a["content"]) for p, a in zip(dialog[::2], dialog[1::2])], dialog


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_dialog_matches_meta(llama2_tokenizer_path, name):
  tok, sp = _tok(llama2_tokenizer_path), _sp(llama2_tokenizer_path)
  dialog = DIALOGS[name]
  ids, mask = tok.encode_dialog(dialog)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
  assert ids.tolist() == meta_chat_ids(sp, dialog)
  assert mask.tolist() == reference_mask(sp, dialog)

  # Split at BOS: one segment per exchange, then the final user prompt (if any).
  starts = np.flatnonzero(ids == 1).tolist()
  exchanges, merged = _exchanges(dialog)
  assert len(starts) == len(merged) // 2 + len(merged) % 2
  segments = np.split(np.arange(len(ids)), starts[1:])
  for seg, (prompt, answer) in zip(segments, exchanges):
    assert not mask[seg[0]] and ids[seg[-1]] == 2 and mask[seg[-1]]
    # The masked tokens are a contiguous tail of the exchange: the answer, then EOS.
    first = seg[np.argmax(mask[seg])]
    assert mask[first:seg[-1] + 1].all() and not mask[seg[0]:first].any()
    assert tok.decode(ids[first:seg[-1] + 1]) == sp.decode(ids[seg][mask[seg]].tolist())
    assert sp.decode(ids[seg][mask[seg]].tolist()) == answer.strip() + " "
    assert sp.decode(ids[seg[0]:first].tolist()) == f"{REF_B_INST} {prompt.strip()} {REF_E_INST}"
  if merged[-1]["role"] == "user":
    assert not mask[segments[-1]].any()
    assert sp.decode(ids[segments[-1]].tolist()) == f"{REF_B_INST} {merged[-1]['content'].strip()} {REF_E_INST}"


def test_dialog_known_ids(llama2_tokenizer_path):
  """Hand-checked ids for a one-exchange dialog, independent of any reference code."""
  tok = _tok(llama2_tokenizer_path)
  ids, mask = tok.encode_dialog([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "Hello world"}])
  # <s> ▁[ INST ] ▁hi ▁[ / INST ] ▁Hello ▁world ▁ </s>
  assert ids.tolist() == [1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962, 15043, 3186, 29871, 2]
  assert mask.tolist() == [False] * 9 + [True] * 4


_CONTENT = st.text(
    # Lone surrogates (category Cs) are not text: encode_dialog rejects them (test below).
    alphabet=st.one_of(st.sampled_from(list(" \n\t  []/<>SYINTabc1é日😀")),
                       st.characters(blacklist_categories=("Cs",))),
    max_size=24).filter(lambda s: not any(tag in s for tag in REF_TAGS))


@st.composite
def _dialogs(draw):
  n = draw(st.integers(1, 6))  # number of user/assistant messages
  dialog = [{"role": "system", "content": draw(_CONTENT)}] if draw(st.booleans()) else []
  dialog += [{"role": "user" if i % 2 == 0 else "assistant", "content": draw(_CONTENT)} for i in range(n)]
  return dialog


@_SETTINGS
@hypothesis.given(dialog=_dialogs())
def test_dialog_property(llama2_tokenizer_path, dialog):
  tok, sp = _tok(llama2_tokenizer_path), _sp(llama2_tokenizer_path)
  ids, mask = tok.encode_dialog(dialog)
  assert ids.tolist() == meta_chat_ids(sp, dialog)
  assert mask.tolist() == reference_mask(sp, dialog)
  exchanges, _ = _exchanges(dialog)
  n_answer = sum(len(sp.encode(f"{REF_B_INST} {p.strip()} {REF_E_INST} {a.strip()} ")) -
                 len(sp.encode(f"{REF_B_INST} {p.strip()} {REF_E_INST}")) for p, a in exchanges)
  assert int(mask.sum()) == n_answer + len(exchanges)  # + one EOS per exchange
  assert not mask[ids == 1].any() and mask[ids == 2].all()


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff tail"])
def test_lone_surrogate_is_a_value_error(llama2_tokenizer_path, text):
  # Regression: hypothesis once drew "\ud800" and sentencepiece raised a raw RuntimeError.
  tok = _tok(llama2_tokenizer_path)
  with pytest.raises(ValueError, match="lone surrogate"):
    tok.encode(text)
  with pytest.raises(ValueError, match="message 1: text has a lone surrogate"):
    tok.encode_dialog([{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}])
