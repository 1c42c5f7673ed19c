"""The world tokenizer: Llama-2-like, deterministic, cached by its settings."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import sentencepiece as spm

from llama_jax.data import world, world_tokenizer
from llama_jax.tokenizer import Tokenizer

CFG = world.WorldConfig(seed=3)


def test_tokenizer_is_llama_like_deterministic_and_cached(tmp_path):
  a = world_tokenizer.train_tokenizer(tmp_path / "a" / "world.model", CFG, vocab_size=512)
  b = world_tokenizer.train_tokenizer(tmp_path / "b" / "world.model", CFG, vocab_size=512)
  assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
  mtime = a.stat().st_mtime_ns
  assert world_tokenizer.train_tokenizer(a, CFG, vocab_size=512) == a
  assert a.stat().st_mtime_ns == mtime
  c = world_tokenizer.train_tokenizer(tmp_path / "c.model", dataclasses.replace(CFG, seed=4),
                                      vocab_size=400)
  assert c.read_bytes() != a.read_bytes()

  sp = spm.SentencePieceProcessor(model_file=str(a))
  assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (512, 0, 1, 2, -1)
  assert sp.id_to_piece(3) == "<0x00>"  # byte fallback pieces, as Llama 2
  digits = sp.encode("What is 1234 plus 56?", out_type=str)
  assert [p for p in digits if any(ch.isdigit() for ch in p)] == list("123456")
  for text in ("[INST] <<SYS>>\nbe nice\n<</SYS>>\n\nhi [/INST]",
               "héllo wörld \u4e16\u754c \U0001F600"):
    assert sp.decode(sp.encode(text)) == text
    assert sp.unk_id() not in sp.encode(text)
  # The chat markers are learned pieces (a few tokens each), not bytes.
  assert len(sp.encode("[INST]")) <= 3 and len(sp.encode("[/INST]")) <= 3

  tok = Tokenizer(a)
  ids, mask = tok.encode_dialog(world.sft_demonstrations(CFG, "train", 1)[0]["messages"])
  assert ids[0] == 1 and ids[-1] == 2 and mask[-1]


def test_tokenizer_rejects_impossible_vocab(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    world_tokenizer.train_tokenizer(tmp_path / "x.model", CFG, vocab_size=100)
  with pytest.raises(ValueError, match="Vocabulary size too high"):
    world_tokenizer.train_tokenizer(tmp_path / "y.model", CFG, vocab_size=20000)


def test_tokenizer_does_not_depend_on_careless_demonstrations(tmp_path):
  a = world_tokenizer.train_tokenizer(tmp_path / "a.model", CFG, vocab_size=320)
  careless = dataclasses.replace(CFG, careless_fraction=0.3)
  # Same settings sidecar: the cached gold-world tokenizer is reused, not retrained.
  mtime = a.stat().st_mtime_ns
  assert world_tokenizer.train_tokenizer(a, careless, vocab_size=320) == a
  assert a.stat().st_mtime_ns == mtime
  b = world_tokenizer.train_tokenizer(tmp_path / "b.model", careless, vocab_size=320)
  assert b.read_bytes() == a.read_bytes()
