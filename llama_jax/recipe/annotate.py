"""On-policy preference annotation: the latest policy's samples, compared by an annotator.

Llama 2 paper, Sec. 3.2.1: preference data was collected in weekly batches on samples of the
latest models, and the reward models were retrained on it so they "stay on the distribution" of
the policy they score. On the synthetic world the annotator is the world's oracle
(:func:`llama_jax.data.world_pairs.annotate`): for each of ``annotate.num_prompts`` train
prompts, K samples (temperature ``annotate.temperature``) of the policy ``init_from``; every pair of
distinct samples whose oracle quality differs becomes a preference pair with a rating (and a
safety label on harmful prompts). Real data has no oracle, so the stage needs the world.

``python train.py --config=configs/tiny.py --config.stage=annotate --config.init_from=<sft>/final``
(the pipeline runs it after SFT when ``annotate.num_prompts`` > 0). Writes
``<workdir>/final/preferences.jsonl`` (the ``jsonl_preferences`` schema of
``llama_jax.data.sources``; the pipeline's reward models add it to their mixture),
``<workdir>/samples.jsonl`` (prompt and samples) and ``<workdir>/result.json`` (counts per rating
and the oracle helpfulness of the samples). With ``annotate.accumulate_from`` (the pipeline's later
rounds) the earlier round's pairs come first in ``preferences.jsonl``: the RMs retrain on all
batches so far.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, List

import jax
from jax.experimental import multihost_utils
import numpy as np

from llama_jax import convert, evaluation, sharding
from llama_jax.data import input_pipeline, sources, world_pairs
from llama_jax.data import prompts as prompts_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd

PREFERENCES = "preferences.jsonl"


def _validate(config):
  ac = config.annotate
  if not config.get("init_from", ""):
    raise ValueError("annotate: config.init_from (the policy to sample) is empty")
  if config.tokenizer.path != "world" or config.data.sft_sources != "world":
    raise ValueError("annotate: the annotator is the synthetic world's oracle; it needs "
                     "config.tokenizer.path = 'world' and config.data.sft_sources = 'world' "
                     "(set config.annotate.num_prompts = 0 for real data)")
  if int(ac.num_prompts) < 1:
    raise ValueError(f"config.annotate.num_prompts must be >= 1, got {ac.num_prompts}")
  if int(ac.k) < 2:
    raise ValueError(f"config.annotate.k must be >= 2 (pairs of samples), got {ac.k}")
  if ac.temperature <= 0:
    raise ValueError(f"config.annotate.temperature must be > 0, got {ac.temperature}")


def _inputs(config, workdir: str):
  """(tokenizer, cfg, params, prompts, earlier pairs), checked before anything is written."""
  ac, rc = config.annotate, config.rejection_sampling
  _validate(config)
  tokenizer = build.tokenizer(config, workdir)
  cfg, params = convert.load_orbax(config.init_from)
  tokenizer.check_vocab(cfg)
  prompts = [p for p in prompts_lib.load_prompts(config, workdir, "train", int(ac.num_prompts),
                                                 stream=int(ac.get("prompt_stream", -1)))
             if input_pipeline.prompt_example(p, tokenizer, rc.max_prompt_len) is not None]
  if not prompts:
    raise ValueError("annotate: no prompt fits config.rejection_sampling.max_prompt_len")
  earlier = []
  if ac.get("accumulate_from", ""):
    if not os.path.isfile(ac.accumulate_from):
      raise FileNotFoundError(f"config.annotate.accumulate_from: {ac.accumulate_from!r} not found")
    earlier = list(sources.read_jsonl_preferences(ac.accumulate_from))
  return tokenizer, cfg, params, prompts, earlier


def _summary(prompts, texts, finished, pairs, new_pairs: int, final: str) -> Dict[str, Any]:
  judged = [j for p, row, done in zip(prompts, texts, finished)
            for j in evaluation.judge([p["prompt"]] * len(row), row, done)]
  benign = [j.correct for j in judged if not j.harmful]
  harmful = [j.refused for j in judged if j.harmful]
  ratings = collections.Counter(r["rating"] for r in pairs)
  return {"prompts": len(prompts), "samples": len(judged),
          "pairs": {"total": len(pairs), "new": new_pairs,
                    **{k: ratings.get(k, 0) for k in sources.RATINGS}},
          "truncated": float(1.0 - np.mean(finished)),
          "sample_helpfulness": float(np.mean(benign)) if benign else float("nan"),
          "sample_refusal_rate": float(np.mean(harmful)) if harmful else float("nan"),
          "final_dir": final}


class AnnotateStage(stage_lib.Stage):
  """Stage ``annotate`` (module docstring)."""

  name = "annotate"

  def run(self, config, workdir: str) -> dict:
    """Sample, annotate with the oracle, write the preference pairs (see the module docstring).

    Generation settings (max new tokens, top-p, prompt length, batch size) are
    ``config.rejection_sampling``'s (``rs_lib.sample_texts``). Every process samples the same
    prompts; process 0 writes, and all processes wait for it before returning. The pipeline
    skips a finished stage (``final/`` + ``result.json``).

    Returns:
      dict with ``final_dir``, ``pairs`` (total with the accumulated ones, ``new`` of this
      round, per rating), ``prompts``, ``samples``, ``sample_helpfulness`` /
      ``sample_refusal_rate`` (oracle, over the samples) and ``tokens_sampled`` (generated
      tokens, EOS included).
    Raises:
      ValueError: for a non-world config or bad ``config.annotate`` fields, before sampling;
        FileNotFoundError for a missing ``init_from``.
    """
    ac = config.annotate
    final = os.path.join(workdir, wd.FINAL)
    with wd.clean_on_failure(workdir):
      tokenizer, cfg, params, prompts, earlier = _inputs(config, workdir)
      mesh, _ = build.mesh_and_rules(config)
    wd.write_config(workdir, config)
    gen_params = sharding.to_generation_layout(params, cfg, mesh)
    del params
    # A key of its own per round: the rejection-sampling iterations fold in 1, 2, ...
    key = jax.random.fold_in(jax.random.key(config.seed), (1 << 20) + int(ac.get("round", 1)))
    texts, finished, tokens = rs_lib.sample_texts(config, rs_lib.Policy(cfg, gen_params),
                                                  tokenizer, prompts, k=int(ac.k),
                                                  temperature=float(ac.temperature), key=key,
                                                  desc=f"annotation round {ac.get('round', 1)}")
    # A truncated sample (no EOS within the budget) is not a complete answer: never annotated.
    pairs = [r for p, row, done in zip(prompts, texts, finished)
             for r in world_pairs.annotate(p["prompt"], [t for t, d in zip(row, done) if d])]
    if not pairs:
      raise ValueError("annotate: the samples gave no preference pair (all of equal quality); "
                       "raise config.annotate.num_prompts, k or temperature")
    out = {**_summary(prompts, texts, finished, earlier + pairs, len(pairs), final),
           "tokens_sampled": tokens}
    if jax.process_index() == 0:
      sources.write_jsonl(os.path.join(workdir, "samples.jsonl"),
                          [{"prompt": p["prompt"], "samples": row, "finished": done}
                           for p, row, done in zip(prompts, texts, finished)])
      os.makedirs(final, exist_ok=True)
      sources.write_jsonl(os.path.join(final, PREFERENCES), earlier + pairs)
      wd.write_result(workdir, out)
    if jax.process_count() > 1:  # the next stage reads the pairs on every process
      multihost_utils.sync_global_devices("annotate: preferences written")
    return out

  def unavailable(self, config) -> List[str]:
    del config
    return ["the annotation pass (K samples per prompt, judged by the world's oracle) has no plan "
            "of its own; it runs on the synthetic world only"]


STAGE = AnnotateStage()
