"""grain input pipelines: shuffled, per-process sharded, tokenized, packed, checkpointable.

Compose ``records_dataset`` (or ``mixture`` of several) with one of the batchers::

  records = records_dataset(builder.as_data_source(split="train"), seed=0)   # infinite, sharded
  ds = sft_batches(records, tokenizer, batch_size=8, max_seq_len=512)        # grain.IterDataset
  it = iter(ds)                       # grain DatasetIterator: it.get_state() / it.set_state(s)
  batch = next(it)

Batches (``b`` = per-process ``batch_size``, ``t`` = ``max_seq_len``, ``p`` = ``max_prompt_len``):

* ``sft_batches``: ``inputs`` [b,t] int32, ``targets`` [b,t] int32 (the next token),
  ``loss_mask`` [b,t] float32 (1 where the target is an assistant token or the EOS ending an
  exchange: ``encode_dialog``'s mask shifted by one), ``segment_ids`` [b,t] int32 (0 = padding,
  1, 2, ... per packed example), ``positions`` [b,t] int32 (0 at each example's first token).
  Examples are packed first-fit by grain (``grain.experimental.FirstFitPackIterDataset``).
  Padding holds ``tokenizer.pad_id`` with ``loss_mask`` 0 and ``segment_ids`` 0.
* ``preference_batches``: ``chosen_tokens`` / ``rejected_tokens`` [b,t] int32 (prompt + response
  + EOS, right-padded with ``pad_id``), ``chosen_mask`` / ``rejected_mask`` [b,t] bool (real
  tokens), ``chosen_response_mask`` / ``rejected_response_mask`` [b,t] bool (final response tokens
  and its EOS, for DPO-style losses), ``rating`` [b] int32 (index into ``sources.RATINGS``, -1 if
  none), ``safety_label`` [b] int32 (index into ``sources.SAFETY_LABELS``, -1 if none).
* ``prompt_batches``: ``prompt_tokens`` [b,p] int32 left-padded with ``pad_id`` (the layout of
  ``llama_jax.sampling.sample``), ``prompt_mask`` [b,p] bool, ``is_safety`` [b] bool,
  ``prompt_json`` [b] str (the prompt messages as JSON, to rebuild dialogs after sampling).

Dropping rules (deterministic; count them with ``sft_stats`` / ``preference_stats`` /
``prompt_stats`` over one epoch of records):
* SFT: a dialog longer than ``t + 1`` tokens is truncated to its first ``t + 1`` tokens
  (``overlong="truncate"``, default) or dropped (``overlong="drop"``). A dialog with no supervised
  target left (e.g. truncation cut every answer) is always dropped, so no batch row is silently
  all-zero loss; a batch can still have ``loss_mask.sum() == 0`` only if ``drop_remainder=False``.
* Preferences: a pair whose chosen or rejected dialog exceeds ``t`` tokens is dropped (truncating
  would cut the EOS that reward models read).
* Prompts: a prompt longer than ``p`` tokens is dropped.

Sharding: ``records_dataset`` gives process ``i`` of ``n`` (``jax.process_index()`` /
``jax.process_count()``) the records ``i, i + n, ...`` of the source, so ``batch_size`` is per
process. With ``num_epochs=None`` (infinite) every process yields batches forever; with finite
epochs processes can run out at different steps, so train for a step count instead.
"""

from __future__ import annotations

import collections
import functools
import json
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from llama_jax.data.sources import RATINGS, SAFETY_LABELS


def decode_record(element: Any) -> dict[str, Any]:
  """A record dict from a TFDS element ``{"record": <JSON bytes>}`` or from a record dict.

  Raises:
    ValueError: if ``element`` is neither.
  """
  if isinstance(element, Mapping):
    raw = element.get("record")
    if isinstance(raw, (bytes, str)) and len(element) == 1:
      return json.loads(raw)
    return dict(element)
  raise ValueError("expected a record dict or a TFDS element {'record': json}, got "
                   f"{element!r:.80}")


def records_dataset(source: Any, *, seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = None, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
  """Decoded records of this process's shard, shuffled per epoch, repeated.

  Args:
    source: a random-access source (``len`` and ``__getitem__``): a TFDS data source, a list of
      record dicts, or a ``grain`` source.
    seed: shuffle seed (each epoch is shuffled differently; the same on every run).
    shuffle: shuffle the records.
    num_epochs: number of passes; None repeats forever.
    process_index, process_count: shard of this process; default ``jax.process_index()`` and
      ``jax.process_count()``.

  Returns:
    A ``grain.MapDataset`` of record dicts.

  Raises:
    ValueError: if the shard is invalid, the source has fewer records than processes, or
      ``num_epochs`` < 1.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"invalid shard: process_index={index}, process_count={count}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  ds = grain.MapDataset.source(source)
  if len(ds) < count:
    raise ValueError(f"the source has {len(ds)} records, fewer than the {count} processes")
  ds = ds[index::count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs).map(decode_record)


def mixture(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
  """Mixes record datasets with the given ratios (``grain.MapDataset.mix``); deterministic.

  The interleaving is a fixed function of the weights (no randomness); shuffle the inputs
  (``records_dataset``) for random order. Pass infinite inputs (``num_epochs=None``): a finite
  mixture stops at the shortest input.

  Raises:
    ValueError: on mismatched lengths or non-positive weights.
  """
  if len(datasets) != len(weights) or not datasets:
    raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and "
                     f"{len(weights)} weights")
  if any(not w > 0 for w in weights):
    raise ValueError(f"mixture weights must be positive, got {list(weights)}")
  return grain.MapDataset.mix(list(datasets), [float(w) for w in weights])


# --- SFT -----------------------------------------------------------------------------------------

_OVERLONG = ("truncate", "drop")


def _sft_example(record: Mapping[str, Any], tokenizer: Any, max_seq_len: int,
                 overlong: str) -> tuple[dict[str, np.ndarray] | None, str]:
  """(example or None, status): kept, truncated, dropped_overlong or dropped_no_target."""
  ids, mask = tokenizer.encode_dialog(record["messages"])
  status = "kept"
  if len(ids) - 1 > max_seq_len:
    if overlong == "drop":
      return None, "dropped_overlong"
    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
    status = "truncated"
  loss_mask = np.asarray(mask[1:], np.float32)
  if not loss_mask.any():
    return None, "dropped_no_target"
  return {"inputs": np.asarray(ids[:-1], np.int32), "targets": np.asarray(ids[1:], np.int32),
          "loss_mask": loss_mask}, status


def sft_example(record: Mapping[str, Any], tokenizer: Any, max_seq_len: int,
                overlong: str = "truncate") -> dict[str, np.ndarray] | None:
  """One unpacked SFT example ``{inputs, targets, loss_mask}`` [s <= t], or None if dropped.

  ``inputs = ids[:-1]``, ``targets = ids[1:]``, ``loss_mask = mask[1:]`` for ``(ids, mask) =
  tokenizer.encode_dialog(record["messages"])`` (Llama 2 Sec. 3.1: loss on answer tokens only).

  Raises:
    ValueError: on an unknown ``overlong`` or a bad dialog (from ``encode_dialog``).
  """
  if overlong not in _OVERLONG:
    raise ValueError(f"overlong must be one of {_OVERLONG}, got {overlong!r}")
  return _sft_example(record, tokenizer, max_seq_len, overlong)[0]


def sft_stats(records: Sequence[Mapping[str, Any]] | Any, tokenizer: Any, max_seq_len: int,
              overlong: str = "truncate") -> dict[str, int]:
  """Counts what ``sft_batches`` does to each record of one pass over ``records``.

  Returns:
    ``{"records", "kept", "truncated", "dropped_overlong", "dropped_no_target", "tokens",
    "loss_tokens"}`` (``tokens`` / ``loss_tokens``: input and supervised tokens kept).
  """
  counts = collections.Counter({k: 0 for k in ("records", "kept", "truncated", "dropped_overlong",
                                                "dropped_no_target", "tokens", "loss_tokens")})
  for r in records:
    ex, status = _sft_example(decode_record(r), tokenizer, max_seq_len, overlong)
    counts["records"] += 1
    counts[status] += 1
    if ex is not None:
      counts["tokens"] += len(ex["inputs"])
      counts["loss_tokens"] += int(ex["loss_mask"].sum())
  return dict(counts)


def _not_none(x: Any) -> bool:
  return x is not None


def _check_sizes(batch_size: int, length: int, name: str) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if length < 2:
    raise ValueError(f"{name} must be >= 2, got {length}")


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "loss_mask": packed["loss_mask"], "segment_ids": packed["inputs_segment_ids"],
          "positions": packed["inputs_positions"]}


def sft_batches(records: grain.MapDataset, tokenizer: Any, *, batch_size: int, max_seq_len: int,
                overlong: str = "truncate", num_packing_bins: int | None = None, seed: int = 0,
                drop_remainder: bool = True) -> grain.IterDataset:
  """Packed SFT batches (keys, shapes and dtypes in the module docstring).

  Args:
    records: SFT dialog records (``records_dataset`` or ``mixture``).
    tokenizer: a ``llama_jax.tokenizer.Tokenizer``.
    batch_size: rows per batch (per process).
    max_seq_len: row length ``t``.
    overlong: ``"truncate"`` or ``"drop"`` dialogs longer than ``t + 1`` tokens.
    num_packing_bins: rows packed at once by first-fit (default ``batch_size``); more bins
      pack tighter but mix examples from further apart.
    seed: seed of grain's shuffle of the packed rows.
    drop_remainder: drop a last partial batch (finite epochs only).

  Returns:
    A ``grain.IterDataset``; ``iter()`` gives a checkpointable ``grain.DatasetIterator``.

  Raises:
    ValueError: on non-positive sizes or an unknown ``overlong``.
  """
  _check_sizes(batch_size, max_seq_len, "max_seq_len")
  if overlong not in _OVERLONG:
    raise ValueError(f"overlong must be one of {_OVERLONG}, got {overlong!r}")
  ds = records.map(functools.partial(sft_example, tokenizer=tokenizer, max_seq_len=max_seq_len,
                                     overlong=overlong))
  ds = ds.filter(_not_none).to_iter_dataset()
  lengths = {"inputs": max_seq_len, "targets": max_seq_len, "loss_mask": max_seq_len}
  pad = {"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id, "loss_mask": 0.0}
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_packing_bins or batch_size, seed=seed,
      shuffle_bins=True, padding_struct=pad)
  return ds.map(_rename_packed).batch(batch_size, drop_remainder=drop_remainder)


def pad_batch(batch: Mapping[str, np.ndarray], size: int,
              fill: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """A short last batch padded to ``size`` rows along axis 0 with ``fill[key]`` (default 0:
  rows without a real token, which evaluation sums exclude).

  Raises:
    ValueError: if the batch already has more than ``size`` rows.
  """
  have = len(next(iter(batch.values())))
  if have > size:
    raise ValueError(f"pad_batch: {have} rows exceed size {size}")
  fill = fill or {}
  return {k: np.concatenate([v, np.full((size - have,) + v.shape[1:], fill.get(k, 0), v.dtype)])
          for k, v in batch.items()}


def non_padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """Share of real (non-padding) tokens in an SFT batch: ``mean(segment_ids != 0)``."""
  return float(np.mean(np.asarray(batch["segment_ids"]) != 0))


def loss_token_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """Share of supervised tokens in an SFT batch: ``mean(loss_mask)``."""
  return float(np.mean(np.asarray(batch["loss_mask"])))


# --- Preferences ---------------------------------------------------------------------------------

def encode_response(tokenizer: Any, prompt: list[dict[str, str]], response: str,
                     max_seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(tokens [t] int32, real mask [t] bool, final-response mask [t] bool) of ``prompt`` (a dialog
  ending with a user turn) answered by ``response`` (chat format, EOS after the response),
  right-padded to t = ``max_seq_len``; None if longer."""
  ids, mask = tokenizer.encode_dialog(list(prompt) + [{"role": "assistant", "content": response}])
  if len(ids) > max_seq_len:
    return None
  # Exchanges are encoded independently, so the final one starts after the earlier exchanges.
  earlier = [m for m in prompt[:-1] if m["role"] != "system"]
  start = len(tokenizer.encode_dialog(list(prompt[:-1]))[0]) if earlier else 0
  n = len(ids)
  tokens = np.full(max_seq_len, tokenizer.pad_id, np.int32)
  tokens[:n] = ids
  real = np.arange(max_seq_len) < n
  response_mask = np.zeros(max_seq_len, bool)
  response_mask[start:n] = mask[start:]
  return tokens, real, response_mask


def preference_example(record: Mapping[str, Any], tokenizer: Any,
                       max_seq_len: int) -> dict[str, np.ndarray] | None:
  """One padded preference example (the row of ``preference_batches``), or None if too long."""
  chosen = encode_response(tokenizer, record["prompt"], record["chosen"], max_seq_len)
  rejected = encode_response(tokenizer, record["prompt"], record["rejected"], max_seq_len)
  if chosen is None or rejected is None:
    return None
  rating, label = record.get("rating"), record.get("safety_label")
  return {
      "chosen_tokens": chosen[0], "chosen_mask": chosen[1], "chosen_response_mask": chosen[2],
      "rejected_tokens": rejected[0], "rejected_mask": rejected[1],
      "rejected_response_mask": rejected[2],
      "rating": np.int32(RATINGS.index(rating) if rating is not None else -1),
      "safety_label": np.int32(SAFETY_LABELS.index(label) if label is not None else -1),
  }


def preference_stats(records: Any, tokenizer: Any, max_seq_len: int) -> dict[str, int]:
  """``{"records", "kept", "dropped_overlong"}`` for one pass over ``records``."""
  kept = total = 0
  for r in records:
    total += 1
    kept += preference_example(decode_record(r), tokenizer, max_seq_len) is not None
  return {"records": total, "kept": kept, "dropped_overlong": total - kept}


def preference_batches(records: grain.MapDataset, tokenizer: Any, *, batch_size: int,
                       max_seq_len: int, drop_remainder: bool = True) -> grain.IterDataset:
  """Padded preference-pair batches (keys, shapes and dtypes in the module docstring).

  Raises:
    ValueError: on non-positive sizes.
  """
  _check_sizes(batch_size, max_seq_len, "max_seq_len")
  ds = records.map(functools.partial(preference_example, tokenizer=tokenizer,
                                     max_seq_len=max_seq_len))
  ds = ds.filter(_not_none).to_iter_dataset()
  return ds.batch(batch_size, drop_remainder=drop_remainder)


# --- Prompts -------------------------------------------------------------------------------------

def _prompt_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
  return list(record["prompt"]) if "prompt" in record else list(record["messages"][:-1])


def prompt_example(record: Mapping[str, Any], tokenizer: Any,
                   max_prompt_len: int) -> dict[str, Any] | None:
  """One left-padded prompt (the row of ``prompt_batches``), or None if too long.

  Accepts prompt records, preference records (their ``prompt``) and SFT records (every turn but
  the final answer); ``is_safety`` defaults to False when the record has none.
  """
  messages = _prompt_messages(record)
  ids, _ = tokenizer.encode_dialog(messages)
  if len(ids) > max_prompt_len:
    return None
  tokens = np.full(max_prompt_len, tokenizer.pad_id, np.int32)
  tokens[max_prompt_len - len(ids):] = ids
  return {"prompt_tokens": tokens,
          "prompt_mask": np.arange(max_prompt_len) >= max_prompt_len - len(ids),
          "is_safety": np.bool_(record.get("is_safety", False)),
          "prompt_json": json.dumps(messages, ensure_ascii=False)}


def prompt_stats(records: Any, tokenizer: Any, max_prompt_len: int) -> dict[str, int]:
  """``{"records", "kept", "dropped_overlong"}`` for one pass over ``records``."""
  kept = total = 0
  for r in records:
    total += 1
    kept += prompt_example(decode_record(r), tokenizer, max_prompt_len) is not None
  return {"records": total, "kept": kept, "dropped_overlong": total - kept}


def prompt_batches(records: grain.MapDataset, tokenizer: Any, *, batch_size: int,
                   max_prompt_len: int, drop_remainder: bool = True) -> grain.IterDataset:
  """Left-padded prompt batches for sampling (keys, shapes and dtypes in the module docstring).

  Raises:
    ValueError: on non-positive sizes.
  """
  _check_sizes(batch_size, max_prompt_len, "max_prompt_len")
  ds = records.map(functools.partial(prompt_example, tokenizer=tokenizer,
                                     max_prompt_len=max_prompt_len))
  ds = ds.filter(_not_none).to_iter_dataset()
  return ds.batch(batch_size, drop_remainder=drop_remainder)
