"""Real-data sources: parsers that turn files into validated plain-Python records.

Every parser yields ``dict`` records of the three kinds below (JSON-serializable, so TFDS can store
them as one JSON string each) and raises ``ValueError("<file>, line <n>, field '<field>': ...")``
(line numbers 1-based) on the first bad record.

Record kinds (the in-memory form every stage consumes):

* SFT dialog: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``,
  an optional system message first, then user / assistant alternating, starting with a user turn
  and ending with an assistant turn; no content may be empty (after ``strip()``) or contain a
  Llama-2-chat tag (``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``). An assistant message
  may carry ``"weight": 0`` (OpenAI's chat fine-tuning format): context, not a training target.
* Preference pair: ``{"prompt": messages, "chosen": str, "rejected": str, "rating": str | None,
  "safety_label": str | None}``; ``prompt`` is a message list ending with a user turn, ``chosen``
  and ``rejected`` are the two final assistant responses (non-empty, different).
* Prompt: ``{"prompt": messages, "is_safety": bool}`` (generation prompts for rejection sampling
  and PPO; ``is_safety`` is the paper's ``IS_SAFETY(p)``, Llama 2 Sec. 3.2.3).

Generic JSONL schemas (one JSON object per line; UTF-8):

* SFT file (``read_jsonl_sft``): ``{"messages": [{"role": ..., "content": ...}, ...]}`` as above.
* Preference file (``read_jsonl_preferences``)::

    {"prompt": "text" | [messages ending with a user turn],
     "chosen": "preferred final assistant response",
     "rejected": "the other response",
     "rating": "significantly_better" | "better" | "slightly_better" |
               "negligibly_better_or_unsure",          # optional (absent or null = unknown)
     "safety_label": "chosen_safe_rejected_unsafe" | "both_safe" | "both_unsafe"}   # optional

  A string prompt is a single user turn. ``rating`` is the paper's 4-level helpfulness/safety
  rating of how much better ``chosen`` is (Llama 2 Sec. 3.2.1); ``safety_label`` the paper's safety
  bin ("chosen unsafe, rejected safe" does not exist: swap the pair instead). Rejected lines:
  invalid JSON, a non-object line, a missing field, an unknown rating or safety label, an empty
  response, ``chosen`` identical to ``rejected``, bad roles or role order, non-string content.

Sources with their own formats: Anthropic HH-RLHF ``*.jsonl.gz`` (``read_hh_rlhf_pairs``,
``read_hh_rlhf_sft``) and the Self-Instruct seed tasks (``read_self_instruct``).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import zlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

from llama_jax.tokenizer import ROLES, SPECIAL_TAGS

# Llama 2 Sec. 3.2.1; index i is the ``rating`` id in preference batches (0 = most separable).
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")
# Llama 2 Sec. 3.2.1 safety bins (paper shares 18% / 47% / 35%).
SAFETY_LABELS = ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")

PathLike = str | os.PathLike


def _err(where: str, field: str, problem: str) -> ValueError:
  return ValueError(f"{where}, field {field!r}: {problem}")


def _check_messages(messages: Any, where: str, field: str, *, last: str) -> list[dict[str, str]]:
  """Validates a message list; ``last`` is the role the list must end with."""
  if not isinstance(messages, list) or not messages:
    raise _err(where, field, f"must be a non-empty list of messages, got {messages!r:.80}")
  out = []
  for i, m in enumerate(messages):
    f = f"{field}[{i}]"
    if not isinstance(m, Mapping):
      raise _err(where, f, f"must be an object with 'role' and 'content', got {m!r:.80}")
    for key in ("role", "content"):
      if key not in m:
        raise _err(where, f"{f}.{key}", "missing")
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise _err(where, f"{f}.role", f"unknown role {role!r}, expected one of {ROLES}")
    if role == "system" and i != 0:
      raise _err(where, f"{f}.role", "a system message may only come first")
    if not isinstance(content, str):
      raise _err(where, f"{f}.content", f"must be a string, got {type(content).__name__}")
    if not content.strip():
      raise _err(where, f"{f}.content", "is empty")
    for tag in SPECIAL_TAGS:
      if tag in content:
        raise _err(where, f"{f}.content", f"contains the chat tag {tag!r}")
    msg = {"role": role, "content": content}
    if "weight" in m:  # OpenAI's chat fine-tuning format: weight 0 = context, not a target
      if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
        raise _err(where, f"{f}.weight", f"must be 0 or 1 on an assistant message, got "
                   f"{m['weight']!r} on a {role} message")
      msg["weight"] = int(m["weight"])
    out.append(msg)
  start = 1 if out[0]["role"] == "system" else 0
  for k, m in enumerate(out[start:]):
    expected = "user" if k % 2 == 0 else "assistant"
    if m["role"] != expected:
      raise _err(where, f"{field}[{start + k}].role",
                 f"is {m['role']!r} but {expected!r} was expected (user / assistant alternating, "
                 "starting with user)")
  if out[-1]["role"] != last:
    raise _err(where, field, f"must end with a {last} message, ends with {out[-1]['role']!r}")
  return out


def _check_response(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str):
    raise _err(where, field, f"must be a string, got {type(value).__name__}")
  if not value.strip():
    raise _err(where, field, "is an empty response")
  for tag in SPECIAL_TAGS:
    if tag in value:
      raise _err(where, field, f"contains the chat tag {tag!r}")
  return value


def _require_object(obj: Any, where: str, fields: tuple[str, ...]) -> None:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  for f in fields:
    if f not in obj:
      raise _err(where, f, "missing")


def validate_sft(obj: Any, where: str) -> dict[str, Any]:
  """Validates and normalizes an SFT dialog record (schema in the module docstring).

  Args:
    obj: the decoded JSON object.
    where: location used in error messages, e.g. ``"data.jsonl, line 3"``.

  Returns:
    ``{"messages": [...]}`` with only ``role`` / ``content`` (and an assistant's ``weight``)
    kept per message.

  Raises:
    ValueError: naming ``where`` and the field, on any schema violation.
  """
  _require_object(obj, where, ("messages",))
  return {"messages": _check_messages(obj["messages"], where, "messages", last="assistant")}


def validate_preference(obj: Any, where: str) -> dict[str, Any]:
  """Validates and normalizes a preference-pair record (schema in the module docstring).

  Returns:
    ``{"prompt": messages, "chosen", "rejected", "rating": str | None,
    "safety_label": str | None}``.

  Raises:
    ValueError: naming ``where`` and the field, on any schema violation.
  """
  _require_object(obj, where, ("prompt", "chosen", "rejected"))
  prompt = obj["prompt"]
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  prompt = _check_messages(prompt, where, "prompt", last="user")
  chosen = _check_response(obj["chosen"], where, "chosen")
  rejected = _check_response(obj["rejected"], where, "rejected")
  if chosen.strip() == rejected.strip():
    raise _err(where, "rejected", "is identical to 'chosen'")
  rating = obj.get("rating")
  if rating is not None and rating not in RATINGS:
    raise _err(where, "rating", f"unknown rating {rating!r}, expected one of {RATINGS} or null")
  label = obj.get("safety_label")
  if label is not None and label not in SAFETY_LABELS:
    raise _err(where, "safety_label",
               f"unknown safety label {label!r}, expected one of {SAFETY_LABELS} or null")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rating,
          "safety_label": label}


def validate_prompt(obj: Any, where: str) -> dict[str, Any]:
  """Validates a prompt record ``{"prompt": str | messages, "is_safety": bool (default False)}``.

  Raises:
    ValueError: naming ``where`` and the field, on any schema violation.
  """
  _require_object(obj, where, ("prompt",))
  prompt = obj["prompt"]
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  is_safety = obj.get("is_safety", False)
  if not isinstance(is_safety, bool):
    raise _err(where, "is_safety", f"must be true or false, got {is_safety!r}")
  return {"prompt": _check_messages(prompt, where, "prompt", last="user"), "is_safety": is_safety}


def prompt_from_preference(record: Mapping[str, Any], is_safety: bool) -> dict[str, Any]:
  """The prompt record of a preference pair (for rejection sampling / PPO prompt sets)."""
  return {"prompt": [dict(m) for m in record["prompt"]], "is_safety": bool(is_safety)}


def _open_text(path: PathLike):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: file not found")
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, "r", encoding="utf-8")


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> str:
  """Writes records one JSON object per line (UTF-8), atomically: a ``.tmp`` file renamed over
  ``path``, so a reader never sees a half-written file. Returns the path."""
  path = os.fspath(path)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
  return path


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _json_object(where: str, raw: bytes) -> Any:
  """The JSON object of one line (None for a blank line).

  Raises:
    ValueError: naming ``where``, for bytes that are not UTF-8, invalid or too deeply nested
      JSON, or a value that is not an object.
  """
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:
    raise ValueError(f"{where}: JSON nested too deeply") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  if _SURROGATE_ESCAPE.search(line):  # "\ud800" decodes to a str no tokenizer can encode
    try:
      json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"{where}: text holds a lone UTF-16 surrogate ({e.object[e.start]!r}), "
                       "which is not a Unicode character") from None
  return obj


def _json_lines(path: PathLike) -> Iterator[tuple[str, Any]]:
  """Yields (where, decoded object) for each non-blank line; where = "<file>, line <n>".

  Raises:
    ValueError: naming the file and line (:func:`_json_object`), or the file for a ``.gz`` that
      is truncated or not gzip.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: file not found")
  n = 0
  try:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
      for n, raw in enumerate(f, start=1):
        obj = _json_object(f"{path}, line {n}", raw)
        if obj is not None:
          yield f"{path}, line {n}", obj
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: not a complete gzip file after line {n} "
                     f"({type(e).__name__}: {e})") from None


def read_jsonl_sft(path: PathLike) -> Iterator[dict[str, Any]]:
  """Yields SFT dialog records from a generic JSONL file (``.gz`` allowed).

  Raises:
    ValueError: naming the file, the 1-based line and the field of the first bad record.
  """
  for where, obj in _json_lines(path):
    yield validate_sft(obj, where)


def read_jsonl_preferences(path: PathLike) -> Iterator[dict[str, Any]]:
  """Yields preference-pair records from a generic JSONL file (``.gz`` allowed).

  Raises:
    ValueError: naming the file, the 1-based line and the field of the first bad record.
  """
  for where, obj in _json_lines(path):
    yield validate_preference(obj, where)


def read_jsonl_prompts(path: PathLike) -> Iterator[dict[str, Any]]:
  """Yields prompt records ``{"prompt", "is_safety"}`` from a JSONL file (``.gz`` allowed).

  Raises:
    ValueError: naming the file, the 1-based line and the field of the first bad record.
  """
  for where, obj in _json_lines(path):
    yield validate_prompt(obj, where)


# --- Anthropic HH-RLHF --------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class HhSkip(Exception):
  """A known data-quality defect of an HH-RLHF record (skipped and counted unless strict)."""

  def __init__(self, reason: str, field: str):
    super().__init__(reason)
    self.reason, self.field = reason, field


def parse_hh_transcript(text: Any, where: str, field: str) -> list[dict[str, str]]:
  """Splits an HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into messages.

  Contents are stripped. The transcript must start with a Human turn and end with an Assistant
  turn (``ValueError`` otherwise). Defects found in the released data (an empty turn, two turns
  of the same speaker in a row, a chat tag in a turn) raise ``HhSkip``.

  Raises:
    ValueError: naming ``where`` and ``field`` if the text is not a string or not a transcript.
    HhSkip: on the data-quality defects above.
  """
  if not isinstance(text, str):
    raise _err(where, field, f"must be a string, got {type(text).__name__}")
  parts = _HH_TURN.split(text)
  if len(parts) < 3 or parts[0].strip() or parts[1] != "Human":
    raise _err(where, field, "is not an HH transcript starting with '\\n\\nHuman:'")
  messages = [{"role": _HH_ROLES[r], "content": c.strip()}
              for r, c in zip(parts[1::2], parts[2::2])]
  if messages[-1]["role"] != "assistant":
    raise _err(where, field, "does not end with an '\\n\\nAssistant:' turn")
  for i, m in enumerate(messages):
    if i and m["role"] == messages[i - 1]["role"]:
      raise HhSkip("roles_not_alternating", field)
    if any(tag in m["content"] for tag in SPECIAL_TAGS):
      raise HhSkip("chat_tag_in_content", field)
    if not m["content"]:
      raise HhSkip("empty_response" if i == len(messages) - 1 else "empty_turn", field)
  return messages


def read_hh_rlhf_pairs(path: PathLike, *, strict: bool = False,
                       skipped: collections.Counter | None = None) -> Iterator[dict[str, Any]]:
  """Yields preference pairs from an official Anthropic HH-RLHF file (``{"chosen", "rejected"}``).

  The two transcripts share every turn but the final assistant response: the record's ``prompt``
  is the shared turns (ending with the last user turn), ``chosen`` / ``rejected`` the final
  responses; ``rating`` and ``safety_label`` are None (HH has neither).

  Known defects of the released files are skipped and counted in ``skipped`` under these reasons
  (``harmless-base`` test: 13 of 2,312 pairs, 9 ``roles_not_alternating`` and 4
  ``empty_response``): ``empty_response``, ``empty_turn``,
  ``roles_not_alternating`` (a ``Human:`` marker inside a turn), ``prompt_mismatch`` (the two
  transcripts differ before the final response), ``identical_responses``, ``chat_tag_in_content``.

  Args:
    path: the ``*.jsonl.gz`` (or plain ``.jsonl``) file.
    strict: raise ``ValueError`` on those defects too instead of skipping.
    skipped: a ``collections.Counter`` updated with ``{reason: count}``.

  Raises:
    ValueError: naming the file, 1-based line and field on invalid JSON, a non-object line,
      a missing or non-string ``chosen`` / ``rejected``, or a text that is not a transcript.
  """
  for where, obj in _json_lines(path):
    _require_object(obj, where, ("chosen", "rejected"))
    try:
      chosen = parse_hh_transcript(obj["chosen"], where, "chosen")
      rejected = parse_hh_transcript(obj["rejected"], where, "rejected")
      if chosen[:-1] != rejected[:-1]:
        raise HhSkip("prompt_mismatch", "rejected")
      if chosen[-1]["content"] == rejected[-1]["content"]:
        raise HhSkip("identical_responses", "rejected")
    except HhSkip as e:
      if strict:
        raise _err(where, e.field, e.reason.replace("_", " ")) from None
      if skipped is not None:
        skipped[e.reason] += 1
      continue
    yield {"prompt": chosen[:-1], "chosen": chosen[-1]["content"],
           "rejected": rejected[-1]["content"], "rating": None, "safety_label": None}


def read_hh_rlhf_sft(path: PathLike, *, strict: bool = False,
                     skipped: collections.Counter | None = None) -> Iterator[dict[str, Any]]:
  """Yields the chosen HH-RLHF dialogs as SFT records (same skipping as ``read_hh_rlhf_pairs``).

  Raises:
    ValueError: as ``read_hh_rlhf_pairs``.
  """
  for pair in read_hh_rlhf_pairs(path, strict=strict, skipped=skipped):
    yield {"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]}


# --- Self-Instruct -------------------------------------------------------------------------------

def read_self_instruct(path: PathLike) -> Iterator[dict[str, Any]]:
  """Yields SFT records from Self-Instruct seed tasks (``seed_tasks.jsonl``).

  One record per instance: the user turn is the ``instruction``, followed by a blank line and the
  instance ``input`` when that is non-empty; the assistant turn is the instance ``output``.

  Raises:
    ValueError: naming the file, 1-based line and field (``instruction``, ``instances``,
      ``instances[i].input``, ``instances[i].output``) of the first bad task.
  """
  for where, obj in _json_lines(path):
    _require_object(obj, where, ("instruction", "instances"))
    instruction = _check_response(obj["instruction"], where, "instruction")
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
      raise _err(where, "instances", "must be a non-empty list")
    for i, inst in enumerate(instances):
      if not isinstance(inst, Mapping):
        raise _err(where, f"instances[{i}]", "must be an object with 'input' and 'output'")
      inp = inst.get("input", "")
      if not isinstance(inp, str):
        raise _err(where, f"instances[{i}].input", f"must be a string, got {type(inp).__name__}")
      if "output" not in inst:
        raise _err(where, f"instances[{i}].output", "missing")
      out = _check_response(inst["output"], where, f"instances[{i}].output")
      for tag in SPECIAL_TAGS:
        if tag in inp:
          raise _err(where, f"instances[{i}].input", f"contains the chat tag {tag!r}")
      user = f"{instruction.strip()}\n\n{inp.strip()}" if inp.strip() else instruction.strip()
      yield {"messages": [{"role": "user", "content": user},
                          {"role": "assistant", "content": out.strip()}]}


def prompt_key(prompt: Sequence[Mapping[str, str]]) -> str:
  """Canonical string key of a dialog prompt (JSON with sorted keys) for pooling."""
  return json.dumps([dict(m) for m in prompt], sort_keys=True, ensure_ascii=False)
