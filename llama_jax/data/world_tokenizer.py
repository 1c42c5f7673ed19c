"""The synthetic world's tokenizer: a small Llama-2-like SentencePiece BPE model trained on
chat-formatted world dialogs (``llama_jax.data.world``), so the whole pipeline runs without
downloads. ``train_tokenizer`` is deterministic for a seed and cached by its settings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from typing import Iterator

import sentencepiece as spm

from llama_jax.data import world, world_pairs


def tokenizer_corpus(cfg: world.WorldConfig, n: int = 2000) -> Iterator[str]:
  """Training lines for the world tokenizer: chat-formatted dialogs of every response kind
  (independent of the careless and unsafe annotators: their answers are among the pairs'
  responses; the safety preprompts are in it when ``cfg.safety_preprompt_fraction`` > 0, the
  system instructions when ``cfg.instruction_fraction`` > 0)."""
  cfg = dataclasses.replace(cfg, careless_fraction=0.0, careless_tasks=(), unsafe_fraction=0.0)
  records = (world.sft_demonstrations(cfg, "train", n)
             + world_pairs.helpfulness_pairs(cfg, "train", n // 2)
             + world_pairs.safety_pairs(cfg, "train", n // 2))
  for r in records:
    if "messages" in r:
      turns, answers = r["messages"][:-1], [r["messages"][-1]["content"]]
    else:
      turns, answers = r["prompt"], [r["chosen"], r["rejected"]]
    user = turns[-1]["content"]
    if turns[0]["role"] == "system":
      user = f"<<SYS>>\n{turns[0]['content']}\n<</SYS>>\n\n{user}"
    for answer in answers:
      yield from f"[INST] {user} [/INST] {answer}".split("\n")


def train_tokenizer(path: str | os.PathLike, cfg: world.WorldConfig = world.WorldConfig(),
                    vocab_size: int = 512, num_dialogs: int = 2000) -> pathlib.Path:
  """Trains (or reuses) a SentencePiece BPE tokenizer for the world; returns ``path``.

  Llama-2-like (Sec. 2.2): BPE, unk 0 / bos 1 / eos 2, no pad piece, digits split, byte fallback
  (any UTF-8 text encodes), identity normalization with a dummy prefix. Trained with one thread
  on ``tokenizer_corpus(cfg, num_dialogs)``, so the model file is byte-identical for a seed. A
  sidecar ``<path>.json`` records the settings; an existing model with the same settings is reused.

  Raises:
    ValueError: if ``vocab_size`` < 300 (259 ids are specials and bytes) or more than the corpus
      supports (about 1,300 pieces with the default settings).
  """
  if vocab_size < 300:
    raise ValueError(f"vocab_size must be >= 300 (3 specials + 256 byte pieces), got {vocab_size}")
  path = pathlib.Path(path)
  meta_path = path.with_name(path.name + ".json")
  world_fields = dataclasses.asdict(cfg)
  for name in ("careless_fraction", "careless_tasks", "careless_task_fraction", "prompt_streams",
               "unsafe_fraction"):
    world_fields.pop(name)  # the corpus does not depend on them
  for name in ("safety_preprompt_fraction", "instruction_fraction", "multiturn_fraction"):
    if not getattr(cfg, name):
      world_fields.pop(name)  # as before the field existed
  if not cfg.multiturn_fraction:
    world_fields.pop("max_turns")
  meta = {"world": world_fields, "vocab_size": vocab_size, "num_dialogs": num_dialogs,
          "sentencepiece": spm.__version__}
  meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back
  if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
    return path
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_corpus(cfg, num_dialogs), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, split_digits=True, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
  except RuntimeError as e:  # e.g. "Vocabulary size too high (2048). Please set it to <= 1372."
    raise ValueError(f"cannot train a {vocab_size}-piece world tokenizer: {e}") from None
  path.parent.mkdir(parents=True, exist_ok=True)
  for target, data in ((path, buf.getvalue()), (meta_path, json.dumps(meta).encode())):
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
  return path
