"""The Llama 2 tokenizer: a thin SentencePiece wrapper plus Meta's chat (dialog) format.

``Tokenizer.encode`` is Meta's ``llama/tokenizer.py`` (meta-llama/llama, Llama 2): plain
``SentencePieceProcessor.encode`` with the BOS/EOS ids added around it by hand.
``Tokenizer.encode_dialog`` reproduces the token ids of Meta's ``Llama.chat_completion``
(``llama/generation.py``) exactly, and also returns a mask of the assistant tokens for supervised
fine-tuning (Llama 2 paper, Touvron et al. 2023, Sec. 3.1: "we zero-out the loss on tokens from the
user prompt, so as a result, we backpropagate only on answer tokens").

Note: the transformers (5.x) Llama tokenizer built from the same ``tokenizer.model`` differs from
SentencePiece on leading spaces and runs of spaces; it is not a reference for these ids.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import sentencepiece as spm

# Meta's llama/generation.py (Llama 2).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


def _check_encodable(text: str, where: str) -> None:
  """ValueError naming ``where`` and the index if ``text`` holds a lone UTF-16 surrogate (not valid
  Unicode text: it has no UTF-8 encoding, and SentencePiece fails on it with a raw RuntimeError)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: text has a lone surrogate {text[e.start]!r} at index {e.start} "
                     "(not valid Unicode: fix the source, or decode it with errors='replace')"
                     ) from e


class Tokenizer:
  """SentencePiece tokenizer with Llama 2's BOS/EOS conventions and chat format.

  Attributes:
    path: the ``tokenizer.model`` file this tokenizer was loaded from (``pathlib.Path``).
    vocab_size: number of pieces (32000 for Llama 2).
    bos_id: beginning-of-sequence id (1 for Llama 2).
    eos_id: end-of-sequence id (2 for Llama 2).
    pad_id: id used to fill padded positions. SentencePiece's own pad id when the model defines one,
      otherwise ``eos_id`` (Llama 2 has no pad piece: ``sp.pad_id() == -1``). Rationale: it must be
      a valid embedding index (Meta's ``-1`` is not, and a gather with it would silently clamp in
      JAX); ``eos_id`` is a control piece that decodes to ``""``, unlike ``0`` which is Llama 2's
      ``<unk>`` (decodes to ``" ⁇ "``). Padding is never identified by comparing ids with
      ``pad_id``: callers carry separate mask / segment arrays, so an EOS that ends a real sequence
      and an EOS used as padding are never confused.

  Raises:
    ValueError: naming the file, if ``path`` does not exist, is not a file, is not a SentencePiece
      model (e.g. a text, JSON or random-bytes file), or the model lacks a BOS or EOS piece.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise ValueError(f"tokenizer file {str(self.path)!r} does not exist")
    if not self.path.is_file():
      raise ValueError(f"tokenizer file {str(self.path)!r} is not a file (expected a SentencePiece "
                       "tokenizer.model)")
    self._load(self.path.read_bytes())

  def _load(self, model_proto: bytes) -> None:
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise ValueError(f"tokenizer file {str(self.path)!r} is not a SentencePiece model "
                       f"(e.g. Llama 2's tokenizer.model): {e}") from e
    if sp.vocab_size() <= 0 or sp.bos_id() < 0 or sp.eos_id() < 0:
      raise ValueError(f"tokenizer file {str(self.path)!r}: the SentencePiece model needs BOS and EOS "
                       f"pieces (got vocab_size={sp.vocab_size()}, bos_id={sp.bos_id()}, "
                       f"eos_id={sp.eos_id()})")
    self._sp = sp
    self._model_proto = model_proto
    self.vocab_size: int = sp.vocab_size()
    self.bos_id: int = sp.bos_id()
    self.eos_id: int = sp.eos_id()
    self.pad_id: int = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id

  # Pickling (e.g. into grain worker processes): ship the model bytes, not the file path.
  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path, "model_proto": self._model_proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.path = state["path"]
    self._load(state["model_proto"])

  def __repr__(self) -> str:
    return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

  @property
  def sp_model(self) -> spm.SentencePieceProcessor:
    """The underlying ``sentencepiece.SentencePieceProcessor``."""
    return self._sp

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Tokenizes ``text`` as Meta's ``Tokenizer.encode``: ``[bos] + sp.encode(text) + [eos]``.

    Args:
      text: the string to encode (no special-token parsing: ``"<s>"`` is plain text).
      bos: prepend ``bos_id``.
      eos: append ``eos_id``.

    Returns:
      The token ids, a list of ``t`` Python ints in ``[0, vocab_size)``.

    Raises:
      TypeError: if ``text`` is not a ``str``.
      ValueError: if ``text`` holds a lone surrogate (no UTF-8 encoding).
    """
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}")
    _check_encodable(text, "Tokenizer.encode")
    ids = self._sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Detokenizes ``ids`` [t] with ``sp.decode`` after dropping every ``pad_id``.

    BOS/EOS (and other control ids) decode to ``""``, as in SentencePiece.

    Args:
      ids: a sequence or 1-D integer array of ``t`` token ids.

    Returns:
      The decoded string.

    Raises:
      ValueError: if ``ids`` is not 1-D or an id is outside ``[0, vocab_size)`` (naming its position).
    """
    arr = np.asarray(ids)
    if arr.size == 0:
      return ""
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"Tokenizer.decode: ids must be a 1-D sequence of ints, got shape {arr.shape} "
                       f"and dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
    if bad.size:
      raise ValueError(f"Tokenizer.decode: id {int(arr[bad[0]])} at position {int(bad[0])} is outside "
                       f"[0, {self.vocab_size})")
    return self._sp.decode(arr[arr != self.pad_id].tolist())

  def check_vocab(self, cfg: Any) -> None:
    """Checks that a model config's vocabulary matches this tokenizer.

    Args:
      cfg: a ``llama_jax.config.LlamaConfig`` (anything with an int ``vocab_size``).

    Raises:
      ValueError: naming both sizes and the tokenizer file, if ``cfg.vocab_size != vocab_size``.
    """
    if cfg.vocab_size != self.vocab_size:
      raise ValueError(f"config vocab_size {cfg.vocab_size} does not match the tokenizer's vocab_size "
                       f"{self.vocab_size} (tokenizer file {str(self.path)!r})")

  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """``sp.encode(text)`` ids and, for each piece, its begin offset in ``text``'s UTF-8 bytes."""
    try:
      proto = self._sp.encode(text, out_type="proto")  # sentencepiece >= 0.2.1
    except ValueError:
      proto = self._sp.encode(text, out_type="immutable_proto")  # older sentencepiece
    return [p.id for p in proto.pieces], [p.begin for p in proto.pieces]

  def encode_dialog(self, messages: Sequence[Mapping[str, Any]], *,
                    system_every_turn: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a chat dialog in Llama-2-Chat's format, with a mask of the assistant tokens.

    The ids are exactly those of Meta's ``Llama.chat_completion`` (meta-llama/llama,
    ``llama/generation.py``): an optional leading system message is merged into the first user
    message as ``B_SYS + system + E_SYS + user``; then each (user, assistant) exchange is
    ``encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)``, and a final
    user message (a generation prompt) is ``encode(f"[INST] {user.strip()} [/INST]", bos=True,
    eos=False)``. Unlike Meta's code, the dialog may also end with an assistant message (a training
    example), in which case there is no final user part.

    Each exchange string is encoded once; its answer tokens are the pieces whose SentencePiece byte
    offset begins at or after the space that follows ``[/INST]`` (a piece straddling that boundary
    would count as prompt; with Llama 2's whitespace splitting none does). They include the trailing
    ``"▁"`` piece of Meta's format (and ``"▁▁"`` for an empty answer).

    An assistant message with ``"weight": 0`` (OpenAI's chat fine-tuning format) is context, not a
    target: its exchange is all False in the mask (Ghost Attention zeroes the loss on every earlier
    turn, Llama 2 Sec. 3.3).

    Args:
      messages: list of ``{"role": "system" | "user" | "assistant", "content": str}`` (assistant
        messages may carry ``"weight": 0 | 1``, default 1); an optional system message first,
        then user / assistant alternating, starting with user.
      system_every_turn: merge the system message into *every* user message, not only the first
        (Ghost Attention's sampling: the instruction concatenated to every user turn).

    Returns:
      ``(ids, mask)``: ``ids`` [t] int32 token ids; ``mask`` [t] bool, True on the answer tokens of
      every exchange and on the EOS that ends it; False on every BOS, every ``[INST] ... [/INST]``
      prompt token (system prompt included) and the whole final user prompt.

    Raises:
      ValueError: naming the message index, if the dialog is empty, a message is not a mapping with
        a known ``role`` and a str ``content``, a content contains one of ``SPECIAL_TAGS`` (Meta
        refuses these) or a lone surrogate, the system message is not first or not followed by a user message, or the
        roles do not alternate user / assistant starting with user, or a weight is not 0 or 1.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
      raise ValueError(f"encode_dialog: messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
      raise ValueError("encode_dialog: the dialog is empty")
    for i, msg in enumerate(messages):
      if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
        raise ValueError(f"encode_dialog: message {i} must be a dict with 'role' and 'content', "
                         f"got {msg!r:.100}")
      if msg["role"] not in ROLES:
        raise ValueError(f"encode_dialog: message {i} has role {msg['role']!r}, expected one of {ROLES}")
      if not isinstance(msg["content"], str):
        raise ValueError(f"encode_dialog: message {i} content must be a str, got "
                         f"{type(msg['content']).__name__}")
      if msg.get("weight", 1) not in (0, 1) or isinstance(msg.get("weight"), bool):
        raise ValueError(f"encode_dialog: message {i} has weight {msg['weight']!r}, expected 0 or 1")
      _check_encodable(msg["content"], f"encode_dialog: message {i}")
      for tag in SPECIAL_TAGS:
        if tag in msg["content"]:
          raise ValueError(f"encode_dialog: message {i} contains the special tag {tag!r}, which Meta's "
                           "chat format does not allow in message content")
    # (original index, role, content) after merging the system message, as Meta does.
    turns = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    weights = [m.get("weight", 1) for m in messages]
    if turns[0][1] == "system":
      if len(turns) < 2:
        raise ValueError("encode_dialog: message 0 is a system message but no user message follows it")
      system = turns[0][2]
      turns = [(i, role, B_SYS + system + E_SYS + content
                if role == "user" and (i == 1 or system_every_turn) else content)
               for i, role, content in turns[1:]]
    for k, (i, role, _) in enumerate(turns):
      expected = "user" if k % 2 == 0 else "assistant"
      if role != expected:
        raise ValueError(f"encode_dialog: message {i} has role {role!r} but {expected!r} was expected "
                         "(an optional system message first, then user / assistant alternating, "
                         "starting with user)")

    ids: list[int] = []
    mask: list[bool] = []
    for (_, _, prompt), (j, _, answer) in zip(turns[::2], turns[1::2]):
      head = f"{B_INST} {prompt.strip()} {E_INST}"
      pieces, begins = self._encode_with_offsets(f"{head} {answer.strip()} ")
      boundary = len(head.encode("utf-8"))  # byte offset of the space before the answer
      target = bool(weights[j])
      ids += [self.bos_id] + pieces + [self.eos_id]
      mask += [False] + [target and b >= boundary for b in begins] + [target]
    if len(turns) % 2 == 1:
      final = self.encode(f"{B_INST} {turns[-1][2].strip()} {E_INST}", bos=True, eos=False)
      ids += final
      mask += [False] * len(final)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
