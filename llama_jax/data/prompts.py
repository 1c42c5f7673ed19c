"""Prompt sets of the policy stages (annotation, rejection sampling, PPO, evaluation).

Every stage that samples the policy draws its prompts with :func:`load_prompts`. Prompts of one
split are divided into ``config.data.prompt_streams`` disjoint *streams* by a seeded hash of the
prompt (the world: :func:`llama_jax.data.world.stream_of` of its text; file sources: of the whole
dialog), and each stage names its stream (``annotate.prompt_stream``,
``rejection_sampling.prompt_stream``, ``ppo.prompt_stream``; the pipeline gives every annotation
round, rejection-sampling iteration and PPO its own), so no two stages train on the same prompts.
Stream ``-1`` means the whole split. Held-out sets are distinct prompts (greedy decoding is
deterministic per prompt: a repeated prompt is not a new observation); PPO selects its checkpoint
with prompts of held-out stream ``SELECTION_STREAM``, and ``eval.py`` leaves those prompts out, so
the reported numbers are not on the prompts the checkpoint was chosen with.
"""

from __future__ import annotations

import hashlib
from typing import List

import numpy as np

from llama_jax.data import input_pipeline, world
from llama_jax.data.sources import prompt_key
from llama_jax.train import build

PROMPT_SOURCES = ("hh_rlhf", "self_instruct", "jsonl")
SELECTION_STREAM = 0  # held-out stream of PPO's checkpoint selection prompts


def file_stream_of(messages, num_streams: int, seed: int) -> int:
  """Stream (0 .. ``num_streams - 1``) of a file-source prompt: a seeded hash of its dialog."""
  digest = hashlib.blake2b(f"{seed}\x00stream\x00{prompt_key(messages)}".encode(),
                           digest_size=8).digest()
  return int.from_bytes(digest, "big") % num_streams


def is_world(config) -> bool:
  """Whether ``config`` draws its prompts from the synthetic world (its tokenizer or its SFT
  source)."""
  return config.tokenizer.path == "world" or config.data.sft_sources == "world"


def _num_streams(config) -> int:
  return int(config.data.get("prompt_streams", 8))


def stream_of(config, record) -> int:
  """The stream of a prompt record under ``config`` (world: its last user text; files: the
  dialog)."""
  if is_world(config):
    users = [m["content"] for m in record["prompt"] if m["role"] == "user"]
    return world.stream_of(build.world_config(config), users[-1])
  return file_stream_of(record["prompt"], _num_streams(config), config.data.split_seed)


def _check_stream(config, stream: int) -> None:
  n = _num_streams(config)
  if n < 1:
    raise ValueError(f"config.data.prompt_streams must be >= 1, got {n}")
  if not -1 <= stream < n:
    raise ValueError(f"prompt stream {stream} is outside [-1, config.data.prompt_streams={n})")


def load_prompts(config, workdir: str, split: str, n: int, *, stream: int = -1,
                 distinct: bool = False) -> List[dict]:
  """Prompt records ``{"prompt": messages, "is_safety": bool}`` of ``split`` ("train" |
  "held_out").

  The synthetic world: ``n`` prompts drawn i.i.d. from the split (or from ``stream``);
  ``distinct`` skips repeats (see ``world.sample_prompts``). File sources: the prompts of
  ``config.data.sft_sources`` (HH-RLHF prompts are safety prompts) of ``stream``, de-duplicated,
  a fixed-seed random ``n`` of them (0 = all).

  Args:
    config: the stage config. workdir: where TFDS builders are prepared. split: "train" or
      "held_out". n: prompts wanted (world: >= 1; files: 0 = all). stream: -1 or a stream in
      ``[0, config.data.prompt_streams)``. distinct: no repeated dialog (world; files always).
  Raises:
    ValueError: for an unknown source, a bad stream, or when no prompt is found.
  """
  _check_stream(config, stream)
  if is_world(config):
    out = world.sample_prompts(build.world_config(config), split, n,
                               stream=None if stream < 0 else stream, distinct=distinct)
  else:
    out, seen = [], set()
    for name in build.parse_list(config.data.sft_sources, "config.data.sft_sources"):
      if name not in PROMPT_SOURCES:
        raise ValueError(f"config.data.sft_sources: no prompts for source {name!r}")
      b = build.source_builder(name, "prompt", config, workdir, is_safety=name == "hh_rlhf")
      for x in b.as_data_source(split=split):
        r = input_pipeline.decode_record(x)
        key = prompt_key(r["prompt"])
        if key in seen or (stream >= 0 and stream_of(config, r) != stream):
          continue
        seen.add(key)
        out.append(r)
    if n and len(out) > n:
      rng = np.random.default_rng([config.data.split_seed, len(out)])
      out = [out[i] for i in sorted(rng.permutation(len(out))[:n])]
  if not out:
    raise ValueError(f"no {split} prompts (stream {stream}) in config.data.sft_sources="
                     f"{config.data.sft_sources!r}")
  return out
