"""The rejection-sampling stage: sample K per prompt, keep the best, pool, fine-tune (RLHF-V<i>).

Llama 2 paper, Sec. 3.2.3 and Figures 7-8. ``python train.py --config=configs/tiny.py
--config.stage=rejection_sampling --config.init_from=<policy>/final
--config.rejection_sampling.help_rm=<rm>/final ...`` (the pipeline stage sets these for you).

Steps (each resumable: a finished step's file is reused):
  1. ``<workdir>/sampled.jsonl``: for every prompt K completions (batched, KV cache, temperature
     ``rejection_sampling.temperature``, from ``init_from`` or ``rejection_sampling.sample_from``),
     their combined rewards ``Rc`` (:func:`llama_jax.rl.combined_reward` of the two RMs' sigmoid
     scores, the prompt's ``is_safety`` flag) and the chosen (best) index. Sampling keys derive from
     ``config.seed`` and the iteration, so the file is reproducible.
  2. ``<workdir>/pooled.jsonl``: per prompt the best record over this and the earlier iterations'
     files (``rejection_sampling.pool_from``); ``sft_data.jsonl``: the pooled best samples as SFT
     dialogs.
  3. ``<workdir>/figures/``: Fig. 7 (max / median reward over N samples) and Fig. 8 (max reward vs
     temperature) as JSON + PNG.
  4. Fine-tuning with the SFT stage (``llama_jax.sft_run``) from ``init_from`` on ``sft_data.jsonl``
     in ``<workdir>/finetune``; its ``final/`` becomes ``<workdir>/final``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from typing import Any, List, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from llama_jax import build, convert, reward, rl, sft_run, sharding, stage_lib
from llama_jax import rejection_sampling as rs_lib
from llama_jax.data import pipeline, sources, world

log = logging.getLogger(__name__)
PROMPT_SOURCES = ("hh_rlhf", "self_instruct", "jsonl")


# ---- shared helpers (also used by ppo_run and policy_eval) ----------------------------------------
def load_prompts(config, workdir: str, split: str, n: int) -> List[dict]:
  """Prompt records ``{"prompt": messages, "is_safety": bool}`` of ``split`` ("train" |
  "held_out"): the synthetic world's (``n`` i.i.d. prompts) or, for file sources, the prompts of
  ``config.data.sft_sources`` (HH-RLHF prompts are safety prompts), the first ``n`` (0 = all).

  Raises:
    ValueError: for an unknown source or when no prompt is found.
  """
  if config.tokenizer.path == "world" or config.data.sft_sources == "world":
    return world.sample_prompts(build.world_config(config), split, n)
  out = []
  for name in build.parse_list(config.data.sft_sources, "config.data.sft_sources"):
    if name not in PROMPT_SOURCES:
      raise ValueError(f"config.data.sft_sources: no prompts for source {name!r}")
    b = build.source_builder(name, "prompt", config, workdir, is_safety=name == "hh_rlhf")
    out += [pipeline.decode_record(x) for x in b.as_data_source(split=split)]
  if not out:
    raise ValueError(f"no {split} prompts in config.data.sft_sources={config.data.sft_sources!r}")
  if n:
    rng = np.random.default_rng([config.data.split_seed, len(out)])
    out = [out[i] for i in sorted(rng.permutation(len(out))[:n])]
  return out


def load_reward_models(help_rm: str, safety_rm: str, field: str):
  """(reward cfg, help params, safety params or None) from reward-model directories.

  Raises:
    ValueError: if ``help_rm`` is empty or the two models' configs differ (naming ``field``).
    FileNotFoundError: if a directory is not a reward model.
  """
  if not help_rm:
    raise ValueError(f"{field}.help_rm is empty: give a reward model directory (<rm>/final)")
  rcfg, help_params = reward.load_reward_model(help_rm)
  safe_params = None
  if safety_rm:
    scfg, safe_params = reward.load_reward_model(safety_rm)
    if scfg.to_params_json() != rcfg.to_params_json():
      raise ValueError(f"{field}: help_rm and safety_rm have different model shapes")
  return rcfg, help_params, safe_params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(params, tokens, mask, *, cfg):
  return reward.score(params, cfg, tokens, mask, probability=True)


def score_dialogs(rcfg, help_params, safe_params, tokenizer, prompts: Sequence[Sequence[Mapping]],
                  completions: Sequence[str], is_safety: Sequence[bool], *,
                  threshold: float = 0.15, batch_size: int = 64) -> dict:
  """Reward-model scores of (prompt, completion) dialogs, as the RMs were trained: prompt +
  assistant answer + EOS, each row scored alone at its last token.

  Returns:
    dict of [n] float64 arrays: ``r_help``, ``r_safe`` (= r_help without a safety RM) sigmoid
    scores and ``rc``, the combined reward (Llama 2 Sec. 3.2.3).
  """
  rows = [tokenizer.encode_dialog(list(p) + [{"role": "assistant", "content": c}])[0]
          for p, c in zip(prompts, completions)]
  r_help, r_safe = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    t = -(-max(len(r) for r in chunk) // 16) * 16
    tokens = np.full((batch_size, t), tokenizer.pad_id, np.int32)
    mask = np.zeros((batch_size, t), bool)
    for i, r in enumerate(chunk):
      tokens[i, :len(r)], mask[i, :len(r)] = r, True
    mask[len(chunk):, 0] = True  # filler rows: one token, discarded
    r_help.append(np.asarray(_score(help_params, tokens, mask, cfg=rcfg))[:len(chunk)])
    if safe_params is not None:
      r_safe.append(np.asarray(_score(safe_params, tokens, mask, cfg=rcfg))[:len(chunk)])
  h = np.concatenate(r_help).astype(np.float64)
  s = np.concatenate(r_safe).astype(np.float64) if safe_params is not None else h
  rc = np.asarray(rl.combined_reward(h, s, np.asarray(is_safety, bool), threshold), np.float64)
  if safe_params is None:
    rc = h
  return {"r_help": h, "r_safe": s, "rc": rc}


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
                 key: jax.Array) -> List[List[str]]:
  """K samples per prompt record (``{"prompt": dialog, ...}``): [n][k] texts, generated in
  batches of ``config.rejection_sampling.batch_size`` prompts (batch at offset i with key
  ``fold_in(key, i)``) with its ``max_new_tokens`` and ``top_p``. policy: ``(cfg, params)``."""
  rc = config.rejection_sampling
  cfg, params = policy
  texts: List[List[str]] = []
  for start in range(0, len(prompts), rc.batch_size):
    chunk = [p["prompt"] for p in prompts[start:start + rc.batch_size]]
    texts += rs_lib.sample_k(params, cfg, tokenizer, chunk, k, jax.random.fold_in(key, start),
                             temperature, rc.max_new_tokens, top_p=rc.top_p)
  return texts


def sample_and_score(config, policy, tokenizer, rms, prompts: List[dict], *, k: int,
                     temperature: float, key: jax.Array):
  """K samples per prompt and their combined rewards: ([n][k] texts, [n, k] scores)."""
  rc = config.rejection_sampling
  texts = sample_texts(config, policy, tokenizer, prompts, k=k, temperature=temperature, key=key)
  flat_prompts = [p["prompt"] for p in prompts for _ in range(k)]
  flat_safety = [bool(p.get("is_safety", False)) for p in prompts for _ in range(k)]
  scores = score_dialogs(*rms, tokenizer, flat_prompts, [t for row in texts for t in row],
                         flat_safety, threshold=rc.safety_threshold)["rc"]
  return texts, scores.reshape(len(prompts), k)


def _figures(config, workdir, policy, tokenizer, rms, prompts, scores, key) -> dict:
  rc = config.rejection_sampling
  fig_dir = os.path.join(workdir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  label = f"RLHF-V{rc.iteration}"
  out = {"reward_vs_n": {label: rs_lib.reward_vs_n(scores, estimator="subsets")}}
  rs_lib.plot_reward_vs_n(out["reward_vs_n"], os.path.join(fig_dir, "reward_vs_n.png"))
  temps = build.parse_list(rc.plot_temperatures, "config.rejection_sampling.plot_temperatures", float)
  if rc.plot_prompts > 0 and temps:
    sub = prompts[:rc.plot_prompts]
    by_t = {}
    for i, t in enumerate(temps):
      _, s = sample_and_score(config, policy, tokenizer, rms, sub, k=rc.plot_k, temperature=t,
                              key=jax.random.fold_in(key, 1000 + i))
      by_t[t] = s
    out["reward_vs_temperature"] = {label: rs_lib.reward_vs_temperature(by_t, estimator="subsets")}
    rs_lib.plot_reward_vs_temperature(out["reward_vs_temperature"],
                                      os.path.join(fig_dir, "reward_vs_temperature.png"))
  with open(os.path.join(fig_dir, "figures.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


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


def run(config, workdir: str) -> dict:
  """Run one rejection-sampling iteration in ``workdir`` (resuming its finished steps).

  Returns:
    dict with ``final_dir`` (when finished), ``finished``, sampled-set statistics (mean / max /
    median reward, pooled size) and the fine-tuning result.
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
    rms = load_reward_models(rc.help_rm, rc.safety_rm, "config.rejection_sampling")
    prompts = load_prompts(config, workdir, "train", rc.num_prompts)
    prompts = [p for p in prompts
               if pipeline.prompt_example(p, tokenizer, rc.max_prompt_len) is not None]
    if not prompts:
      raise ValueError("rejection_sampling: no prompt fits config.rejection_sampling.max_prompt_len")
    mesh, _ = build.mesh_and_rules(config)
    os.makedirs(workdir, exist_ok=True)
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  del pparams
  key = jax.random.fold_in(jax.random.key(config.seed), rc.iteration)
  sampled_path = os.path.join(workdir, "sampled.jsonl")
  policy = None
  if os.path.exists(sampled_path):
    records = rs_lib.read_jsonl(sampled_path)
    log.info("rejection sampling: reusing %s (%d prompts)", sampled_path, len(records))
  else:
    gen_params = sharding.to_generation_layout(sparams, scfg, mesh)
    policy = (scfg, gen_params)
    texts, scores = sample_and_score(config, policy, tokenizer, rms, prompts, k=rc.k,
                                     temperature=rc.temperature, key=key)
    records = rs_lib.make_records([p["prompt"] for p in prompts], texts, scores,
                                  iteration=rc.iteration, temperature=rc.temperature)
    if jax.process_index() == 0:
      rs_lib.write_jsonl(sampled_path, records)
  scores = np.asarray([r["scores"] for r in records])
  fig_json = os.path.join(workdir, "figures", "figures.json")
  if not os.path.exists(fig_json):
    if policy is None:
      policy = (scfg, sharding.to_generation_layout(sparams, scfg, mesh))
    figures = _figures(config, workdir, policy, tokenizer, rms, prompts, scores, key)
  else:
    with open(fig_json) as f:
      figures = json.load(f)
  del policy, sparams
  previous = [r for p in build.parse_list(rc.pool_from, "config.rejection_sampling.pool_from")
              for r in rs_lib.read_jsonl(p)]
  pooled = rs_lib.pool(rs_lib.pool_from_records(previous), records)
  sft_jsonl = os.path.join(workdir, "sft_data.jsonl")
  sft_records = rs_lib.to_sft_records(pooled)
  if jax.process_index() == 0:
    rs_lib.write_jsonl(os.path.join(workdir, "pooled.jsonl"), [pooled[k] for k in sorted(pooled)])
    sources.write_jsonl(sft_jsonl, sft_records)
  if jax.process_count() > 1:  # the fine-tune reads sft_data.jsonl on every process
    multihost_utils.sync_global_devices("rejection sampling: sft_data written")
  best = np.asarray([rs_lib.best_score(r) for r in records])
  stats = {"prompts": len(records), "k": int(scores.shape[1]), "reward_mean": float(scores.mean()),
           "reward_median": float(np.median(scores, axis=1).mean()),
           "reward_best": float(best.mean()), "pooled": len(pooled),
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
