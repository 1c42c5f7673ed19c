"""The preference data of a reward model (and of DPO): ``config.<section>.sources`` as prepared
builders, checked before step 0 (an overlong pair named by file and line; a source with no usable
pair refused), and the run length in steps.

``section`` is the config section holding the mixture: ``"reward"`` (default) or ``"dpo"``; both
have the fields ``sources``, ``weights``, ``batch_size``, ``max_seq_len``, ``overlong``,
``world_train_pairs`` and ``world_heldout_pairs`` (``recipe.sections``).

Llama 2 paper, Sec. 3.2.2 (helpfulness / safety mixtures).
"""

from __future__ import annotations

import json
import math
from typing import Any

from llama_jax.data import input_pipeline, sources
from llama_jax.train import build

PREFERENCE_SOURCES = ("world_helpfulness", "world_safety", "hh_rlhf", "jsonl_preferences")
_PATH_FIELDS = {"hh_rlhf": "hh_rlhf_path", "jsonl_preferences": "preference_jsonl_path"}


def preference_builders(config, workdir: str, section: str = "reward") -> list:
  """Prepared builders of ``config.<section>.sources`` (records validated, file and line named).

  Raises:
    ValueError: for an empty list or an unknown source; FileNotFoundError for a missing file.
  """
  sec = config[section]
  names = build.parse_list(sec.sources, f"config.{section}.sources")
  if not names:
    raise ValueError(f"config.{section}.sources is empty")
  out = []
  for name in names:
    if name not in PREFERENCE_SOURCES:
      raise ValueError(f"config.{section}.sources: unknown source {name!r}; choose from "
                       f"{PREFERENCE_SOURCES}")
    if name.startswith("world_"):
      out.append(build.source_builder("world", name[len("world_"):], config, workdir,
                                      num_train=sec.world_train_pairs,
                                      num_held_out=sec.world_heldout_pairs))
    else:
      out.append(build.source_builder(name, "preference", config, workdir, is_safety=True))
  return out


def _strings(obj: Any) -> str:
  if isinstance(obj, dict):
    return "\x00".join(_strings(v) for v in obj.values())
  if isinstance(obj, list):
    return "\x00".join(_strings(v) for v in obj)
  return obj if isinstance(obj, str) else ""


def _line_of(path: str, record: dict) -> str:
  """``"<file>, line <n>"`` of the source line holding ``record``: the line that validates to it
  (preference JSONL), else the first line containing its prompt turns and both responses (HH)."""
  def holds(obj, where):
    try:
      return sources.validate_preference(obj, where) == record
    except ValueError:
      text = _strings(obj)
      return all(m["content"] in text for m in record["prompt"]) and all(
          record[k] in text for k in ("chosen", "rejected"))
  try:
    with sources._open_text(path) as f:  # pylint: disable=protected-access
      for n, line in enumerate(f, start=1):
        obj = json.loads(line) if line.strip() else None
        if isinstance(obj, dict) and holds(obj, f"{path}, line {n}"):
          return f"{path}, line {n}"
  except (OSError, ValueError):
    pass
  return f"{path} (record not located)"


def check_lengths(config, names, builders, tokenizer, section: str = "reward") -> dict:
  """Per-source ``preference_stats`` of both splits. With ``config.<section>.overlong ==
  "error"`` an overlong pair (prompt + response + EOS > ``config.<section>.max_seq_len`` tokens)
  raises.

  Raises:
    ValueError: naming the file and line (file sources) or the world record, the token count
      and the limit, for the first overlong pair; for an unknown ``overlong``; or naming the
      source, when no train pair of a source fits (with ``overlong="drop"``).
  """
  rc, max_len = config[section], config[section].max_seq_len
  if rc.overlong not in ("error", "drop"):
    raise ValueError(f"config.{section}.overlong must be 'error' or 'drop', got {rc.overlong!r}")
  stats = {}
  for name, b in zip(names, builders):
    for split in ("train", "held_out"):
      records = [input_pipeline.decode_record(x) for x in b.as_data_source(split=split)]
      s = input_pipeline.preference_stats(records, tokenizer, max_len)
      stats[f"{name}/{split}"] = s
      if split == "train" and s["kept"] == 0:  # the batch iterator would wait forever
        raise ValueError(f"{section} source {name!r} (train split): none of its {s['records']} "
                         f"preference pairs fits config.{section}.max_seq_len={max_len} "
                         f"({s['dropped_overlong']} too long); raise it or drop the source")
      if s["dropped_overlong"] and rc.overlong == "error":
        i, r = next((i, r) for i, r in enumerate(records)
                    if input_pipeline.preference_example(r, tokenizer, max_len) is None)
        n = max(len(tokenizer.encode_dialog(r["prompt"] + [{"role": "assistant", "content": x}])[0])
                for x in (r["chosen"], r["rejected"]))
        path = config.data.get(_PATH_FIELDS.get(name, ""), "")
        where = _line_of(path, r) if path else f"source {name!r}, {split} record {i + 1}"
        raise ValueError(f"{where}: preference pair has {n} tokens (prompt + response + EOS), more "
                         f"than config.{section}.max_seq_len={max_len}; raise it, or set "
                         f"config.{section}.overlong='drop' to skip such pairs")
  return stats


def total_steps(config, primary_pairs: int, section: str = "reward") -> int:
  """``train.num_steps``, or one epoch over the first (primary) source: ``ceil(num_epochs *
  primary_pairs / (share_of_primary * <section>.batch_size))`` (the paper's "all helpfulness data
  plus an equal amount of ..."; ``share`` from ``<section>.weights``, or 1 for a single source)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  if config.train.num_epochs <= 0:
    raise ValueError("config.train: set num_steps > 0 or num_epochs > 0")
  sec = config[section]
  weights = build.parse_list(sec.weights, f"config.{section}.weights", float)
  share = weights[0] / sum(weights) if weights else 1.0
  return max(1, math.ceil(config.train.num_epochs * primary_pairs / (share * sec.batch_size)))
