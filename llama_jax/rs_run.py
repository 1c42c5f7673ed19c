"""The rejection-sampling stage: sample K per prompt, keep the best, pool, fine-tune (RLHF-V<i>).

Llama 2 paper, Sec. 3.2.3 and Figures 7-8. ``python train.py --config=configs/tiny.py
--config.stage=rejection_sampling --config.init_from=<policy>/final
--config.rejection_sampling.help_rm=<rm>/final ...`` (the pipeline stage sets these for you).

Steps (each resumable: a finished step's file is reused):
  1. ``<workdir>/figures/``: Fig. 8 (max reward vs temperature on ``plot_prompts`` prompts); with
     ``rejection_sampling.auto_temperature`` its best temperature is the sampling temperature.
  2. ``<workdir>/sampled.jsonl``: for every prompt of the stage's stream
     (``rejection_sampling.prompt_stream``) K completions (batched, KV cache, from ``init_from``
     or ``rejection_sampling.sample_from``), their rewards ``Rc`` (``rejection_sampling.reward``:
     the two RMs' combined reward, or the world oracle) and the chosen (best finished) index;
     truncated samples (no EOS) are never chosen. Keys derive from ``config.seed`` and the
     iteration, so the file is reproducible. ``sampled_stats.json``: temperature, truncation.
  3. Fig. 7 (max / median reward over N samples) as JSON + PNG.
  4. ``<workdir>/pooled.jsonl``: per prompt the best record over this iteration and the earlier
     iterations' picks (``rejection_sampling.pool_from``), re-scored with this iteration's reward
     first; ``sft_data.jsonl``: the pooled best samples as SFT dialogs.
  5. Fine-tuning with the SFT stage (``llama_jax.sft_run``) from ``init_from`` on ``sft_data.jsonl``
     in ``<workdir>/finetune``; its ``final/`` becomes ``<workdir>/final``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, List, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from llama_jax import build, convert, prompts as prompts_lib, scoring, sft_run, sharding, stage_lib
from llama_jax import rejection_sampling as rs_lib
from llama_jax.data import pipeline, sources

log = logging.getLogger(__name__)


def copy_config(config) -> ml_collections.ConfigDict:
  """An unlocked deep copy of a (possibly locked) config."""
  return ml_collections.ConfigDict(config.to_dict())


# ---- the stage -----------------------------------------------------------------------------------
def _validate(config):
  rc = config.rejection_sampling
  if not config.get("init_from", ""):
    raise ValueError("rejection_sampling: config.init_from (the policy to fine-tune) is empty")
  for name in ("num_prompts", "k", "max_new_tokens", "batch_size", "max_prompt_len"):
    if int(rc[name]) < 1:
      raise ValueError(f"config.rejection_sampling.{name} must be >= 1, got {rc[name]}")
  if rc.temperature <= 0:
    raise ValueError(f"config.rejection_sampling.temperature must be > 0, got {rc.temperature}")
  if rc.iteration < 1:
    raise ValueError(f"config.rejection_sampling.iteration must be >= 1, got {rc.iteration}")
  for p in build.parse_list(rc.pool_from, "config.rejection_sampling.pool_from"):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"config.rejection_sampling.pool_from: {p!r} not found")


def sample_texts(config, policy, tokenizer, prompts: List[dict], *, k: int, temperature: float,
                 key: jax.Array) -> tuple[List[List[str]], List[List[bool]]]:
  """K samples per prompt record (``{"prompt": dialog, ...}``): ([n][k] texts, [n][k] finished),
  generated in batches of ``config.rejection_sampling.batch_size`` prompts (batch at offset i
  with key ``fold_in(key, i)``) with its ``max_new_tokens`` and ``top_p``. policy:
  ``(cfg, params)``. ``finished`` False marks a sample truncated at the token budget."""
  rc = config.rejection_sampling
  cfg, params = policy
  texts: List[List[str]] = []
  finished: List[List[bool]] = []
  for start in range(0, len(prompts), rc.batch_size):
    chunk = [p["prompt"] for p in prompts[start:start + rc.batch_size]]
    t, f = rs_lib.sample_k(params, cfg, tokenizer, chunk, k, jax.random.fold_in(key, start),
                           temperature, rc.max_new_tokens, top_p=rc.top_p)
    texts += t
    finished += f
  return texts, finished


def sample_and_score(config, policy, tokenizer, scorer, prompts: List[dict], *, k: int,
                     temperature: float, key: jax.Array):
  """K samples per prompt and their rewards: ([n][k] texts, [n, k] bool finished, [n, k] float
  scores ``Rc`` of ``scorer`` (``scoring.Scorer``); truncated samples are scored too, but
  callers never pick them. An empty sample (EOS first) counts as not finished: it is no answer
  to fine-tune on."""
  texts, finished = sample_texts(config, policy, tokenizer, prompts, k=k, temperature=temperature,
                                 key=key)
  finished = [[f and bool(t.strip()) for t, f in zip(row, done)]
              for row, done in zip(texts, finished)]
  flat_prompts = [p["prompt"] for p in prompts for _ in range(k)]
  flat_safety = [bool(p.get("is_safety", False)) for p in prompts for _ in range(k)]
  scores = scorer(flat_prompts, [t for row in texts for t in row], flat_safety)["rc"]
  return texts, np.asarray(finished, bool), scores.reshape(len(prompts), k)


def curve_scores(scores, finished) -> np.ndarray:
  """Scores for Figures 7/8: a truncated sample counts as the worst reward (0; ``Rc`` is a
  probability), never as a complete answer."""
  return np.where(np.asarray(finished, bool), np.asarray(scores, np.float64), 0.0)


def temperature_curve(config, policy, tokenizer, scorer, prompts, key) -> Optional[dict]:
  """Fig. 8 on ``rejection_sampling.plot_prompts`` prompts: max reward among ``plot_k`` samples
  per temperature of ``plot_temperatures`` (``reward_vs_temperature``), or None if disabled."""
  rc = config.rejection_sampling
  temps = build.parse_list(rc.plot_temperatures, "config.rejection_sampling.plot_temperatures",
                           float)
  if rc.plot_prompts <= 0 or not temps:
    return None
  sub, by_t = prompts[:rc.plot_prompts], {}
  for i, t in enumerate(temps):
    _, done, s = sample_and_score(config, policy, tokenizer, scorer, sub, k=rc.plot_k,
                                  temperature=t, key=jax.random.fold_in(key, 1000 + i))
    by_t[t] = curve_scores(s, done)
  return rs_lib.reward_vs_temperature(by_t, estimator="subsets")


def best_temperature(curve: dict) -> float:
  """The temperature of the highest max-reward point of a Fig. 8 curve (ties: the lowest T)."""
  return float(curve["temperature"][int(np.argmax(curve["max"]))])


def _split_for(records: list, fraction: float, seed: int):
  """(held-out fraction, split seed) giving both splits at least one record (small pooled sets:
  the fraction is raised to 2 / n and the seed advanced deterministically until both are
  non-empty)."""
  from llama_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  if len(records) < 2:
    raise ValueError(f"rejection_sampling: {len(records)} pooled record(s); need at least 2 "
                     "(raise config.rejection_sampling.num_prompts)")
  fraction = min(0.5, max(fraction, 2.0 / len(records)))
  for j in range(1000):
    parts = tfds_builders.split_records(records, fraction, seed + j)
    if parts["train"] and parts["held_out"]:
      return fraction, seed + j
  raise ValueError("rejection_sampling: cannot split the pooled set (all prompts identical?)")


def finetune_config(config, sft_jsonl: str, tokenizer_path: str,
                    sft_records: Optional[list] = None) -> ml_collections.ConfigDict:
  """The SFT-stage config of the fine-tuning step: ``init_from`` on ``sft_jsonl``."""
  rc = config.rejection_sampling
  sub = copy_config(config)
  if sft_records is not None:
    sub.data.heldout_fraction, sub.data.split_seed = _split_for(
        sft_records, config.data.heldout_fraction, config.data.split_seed)
  sub.stage = "sft"
  sub.tokenizer.path = tokenizer_path
  sub.data.sft_sources = "jsonl"
  sub.data.sft_weights = ""
  sub.data.sft_jsonl_path = sft_jsonl
  sub.optimizer.lr = rc.lr
  sub.optimizer.warmup_steps = 0
  sub.optimizer.warmup_frac = rc.warmup_frac
  sub.train.num_steps = rc.num_steps
  sub.train.num_epochs = rc.num_epochs
  sub.eval.num_samples = 0
  return sub


def _read_json(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write_figures(fig_dir: str, figures: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(fig_dir, exist_ok=True)
  if "reward_vs_n" in figures:
    rs_lib.plot_reward_vs_n(figures["reward_vs_n"], os.path.join(fig_dir, "reward_vs_n.png"))
  if "reward_vs_temperature" in figures:
    rs_lib.plot_reward_vs_temperature(figures["reward_vs_temperature"],
                                      os.path.join(fig_dir, "reward_vs_temperature.png"))
  build.write_json(os.path.join(fig_dir, "figures.json"), figures)


def run(config, workdir: str) -> dict:
  """Run one rejection-sampling iteration in ``workdir`` (resuming its finished steps).

  Order: Fig. 8 (max reward vs temperature on ``plot_prompts``) first, so that with
  ``rejection_sampling.auto_temperature`` the main sampling uses its best temperature (the paper
  re-tunes T per iteration: the optimum drifts to 1.2-1.3 after RLHF); then K samples per prompt
  at that temperature, Fig. 7, the pool (earlier picks re-scored with the current reward), and
  the fine-tune.

  Returns:
    dict with ``final_dir`` (when finished), ``finished``, sampled-set statistics (temperature,
    mean / median / best reward, truncated share, pooled size) and the fine-tuning result.
  Raises:
    ValueError / FileNotFoundError: on bad config fields or missing checkpoints, before sampling.
  """
  rc = config.rejection_sampling
  with stage_lib.clean_on_failure(workdir):
    _validate(config)
    tokenizer = build.tokenizer(config, workdir)
    pcfg, pparams = convert.load_orbax(config.init_from)
    tokenizer.check_vocab(pcfg)
    sample_from = rc.sample_from or config.init_from
    scfg, sparams = convert.load_orbax(sample_from) if rc.sample_from else (pcfg, pparams)
    tokenizer.check_vocab(scfg)
    scorer = scoring.make_scorer(config, "rejection_sampling", tokenizer)
    prompts = prompts_lib.load_prompts(config, workdir, "train", rc.num_prompts,
                                       stream=int(rc.get("prompt_stream", -1)))
    prompts = [p for p in prompts
               if pipeline.prompt_example(p, tokenizer, rc.max_prompt_len) is not None]
    if not prompts:
      raise ValueError("rejection_sampling: no prompt fits config.rejection_sampling.max_prompt_len")
    mesh, _ = build.mesh_and_rules(config)
    os.makedirs(workdir, exist_ok=True)
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  del pparams
  key = jax.random.fold_in(jax.random.key(config.seed), rc.iteration)
  label = f"RLHF-V{rc.iteration}"
  fig_dir = os.path.join(workdir, "figures")
  figures = _read_json(os.path.join(fig_dir, "figures.json"))
  policy = None

  def get_policy():
    nonlocal policy
    if policy is None:
      policy = (scfg, sharding.to_generation_layout(sparams, scfg, mesh))
    return policy

  if "reward_vs_temperature" not in figures and rc.plot_prompts > 0:
    curve = temperature_curve(config, get_policy(), tokenizer, scorer, prompts, key)
    if curve is not None:
      figures["reward_vs_temperature"] = {label: curve}
      _write_figures(fig_dir, figures)
  curve = figures.get("reward_vs_temperature", {}).get(label)
  temperature = float(rc.temperature)
  if rc.get("auto_temperature", False):
    if curve is None:
      raise ValueError("config.rejection_sampling.auto_temperature needs the Fig. 8 curve: set "
                       "plot_prompts > 0 and plot_temperatures")
    temperature = best_temperature(curve)
    log.info("rejection sampling V%d: temperature %.2f (best of %s)", rc.iteration, temperature,
             curve["temperature"])
  sampled_path = os.path.join(workdir, "sampled.jsonl")
  stats_path = os.path.join(workdir, "sampled_stats.json")
  if os.path.exists(sampled_path) and os.path.exists(stats_path):
    records = rs_lib.read_jsonl(sampled_path)
    sample_stats = _read_json(stats_path)
    log.info("rejection sampling: reusing %s (%d prompts)", sampled_path, len(records))
  else:
    texts, finished, scores = sample_and_score(config, get_policy(), tokenizer, scorer, prompts,
                                               k=rc.k, temperature=temperature, key=key)
    records = rs_lib.make_records([p["prompt"] for p in prompts], texts, scores,
                                  iteration=rc.iteration, temperature=temperature,
                                  finished=finished,
                                  is_safety=[bool(p.get("is_safety", False)) for p in prompts])
    curve_s = curve_scores(scores, finished)
    best = curve_s.max(axis=1)
    sample_stats = {
        "prompts": len(prompts), "k": int(rc.k), "temperature": temperature,
        "truncated": float(1.0 - finished.mean()),  # no EOS within the budget, or empty
        "empty": float(np.mean([not t.strip() for row in texts for t in row])),
        "prompts_without_finished_sample": int((~finished.any(axis=1)).sum()),
        "reward_mean": float(curve_s.mean()),
        "reward_median": float(np.median(curve_s, axis=1).mean()),
        "reward_best": float(best.mean())}
    figures["reward_vs_n"] = {label: rs_lib.reward_vs_n(curve_s, estimator="subsets")}
    _write_figures(fig_dir, figures)
    if jax.process_index() == 0:
      rs_lib.write_jsonl(sampled_path, records)
      build.write_json(stats_path, sample_stats)
  policy = None
  del sparams
  previous = [r for p in build.parse_list(rc.pool_from, "config.rejection_sampling.pool_from")
              for r in rs_lib.read_jsonl(p)]
  # Earlier picks are re-scored with this iteration's reward before pooling (Sec. 3.2.3).
  rescored = rs_lib.rescore(previous, lambda rs: scorer([r["prompt"] for r in rs],
                                                        [r["samples"][r["chosen"]] for r in rs],
                                                        [r["is_safety"] for r in rs])["rc"])
  pooled = rs_lib.pool(rs_lib.pool_from_records(rescored), records)
  if not pooled:
    raise ValueError(f"rejection_sampling: none of the {len(prompts)} prompts has a sample that "
                     "ended with EOS within config.rejection_sampling.max_new_tokens="
                     f"{rc.max_new_tokens} (truncated samples are never chosen); raise it")
  sft_jsonl = os.path.join(workdir, "sft_data.jsonl")
  sft_records = rs_lib.to_sft_records(pooled)
  if jax.process_index() == 0:
    rs_lib.write_jsonl(os.path.join(workdir, "pooled.jsonl"), [pooled[k] for k in sorted(pooled)])
    sources.write_jsonl(sft_jsonl, sft_records)
  if jax.process_count() > 1:  # the fine-tune reads sft_data.jsonl on every process
    multihost_utils.sync_global_devices("rejection sampling: sft_data written")
  stats = {**sample_stats, "pooled": len(pooled), "rescored_from_earlier": len(rescored),
           "pooled_reward_best": float(np.mean([rs_lib.best_score(r) for r in pooled.values()])),
           "from_earlier_iterations": int(sum(r["iteration"] != rc.iteration
                                              for r in pooled.values()))}
  log.info("rejection sampling V%d: %s", rc.iteration, stats)
  tok_path = os.path.join(workdir, "tokenizer.model") if config.tokenizer.path == "world" \
      else config.tokenizer.path
  ft = sft_run.run(finetune_config(config, sft_jsonl, tok_path, sft_records),
                  os.path.join(workdir, "finetune"))
  out: dict[str, Any] = {"iteration": rc.iteration, "sampled": stats, "figures": figures,
                         "finetune": {k: ft.get(k) for k in ("steps", "total_steps", "eval",
                                                              "finished")},
                         "finished": bool(ft.get("finished"))}
  if ft.get("finished"):
    final = os.path.join(workdir, stage_lib.FINAL)
    if jax.process_index() == 0:
      if os.path.exists(final):
        shutil.rmtree(final)
      shutil.copytree(ft["final_dir"], final)
    out["final_dir"] = final
    build.write_json(os.path.join(workdir, "result.json"), out)
  return out
