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
     Until the file is written, finished batches wait in ``<workdir>/sampling/``: SIGTERM or
     SIGINT stops the pass after the current batch (exit 0, ``stopped_by_signal``), and the next
     run, like one after a kill, resumes from those batches with the same samples.
  3. Fig. 7 (max / median reward over N samples) as JSON + PNG.
  4. ``<workdir>/pooled.jsonl``: per prompt the best record over this iteration and the earlier
     iterations' picks (``rejection_sampling.pool_from``), re-scored with this iteration's reward
     first (``run``'s ``select`` hook, RAFT's: the records it keeps instead);
     ``sft_data.jsonl``: the pooled best samples as SFT dialogs.
  5. Fine-tuning with the SFT stage (injected by the registry, ``recipe.stages``) from ``init_from`` on ``sft_data.jsonl``
     in ``<workdir>/finetune``; its ``final/`` becomes ``<workdir>/final``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, List, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from llama_jax import convert, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import input_pipeline, sources
from llama_jax.data import prompts as prompts_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.reward import scoring
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd
from llama_jax.train.checkpoint import StopSignal

log = logging.getLogger(__name__)


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


def sample_and_score(config, policy, tokenizer, scorer, prompts: List[dict], *, k: int,
                     temperature: float, key: jax.Array, batch_dir: Optional[str] = None,
                     stop=None, desc: str = "sampling"):
  """K samples per prompt and their rewards: ([n][k] texts, [n, k] bool finished, [n, k] float
  scores ``Rc`` of ``scorer`` (``scoring.Scorer``), tokens sampled (``rs_lib.sample_texts``));
  truncated samples are scored too, but callers never pick them. An empty sample (EOS first)
  counts as not finished: it is no answer to fine-tune on. ``batch_dir``, ``stop``, ``desc``: as
  in ``rs_lib.sample_texts`` (resumable batches; raises ``rs_lib.SamplingStopped``; the progress
  bar's label)."""
  texts, finished, tokens = rs_lib.sample_texts(config, policy, tokenizer, prompts, k=k,
                                                temperature=temperature, key=key,
                                                batch_dir=batch_dir, stop=stop, desc=desc)
  finished = rs_lib.answered(texts, finished)
  flat_prompts = [p["prompt"] for p in prompts for _ in range(k)]
  flat_safety = [bool(p.get("is_safety", False)) for p in prompts for _ in range(k)]
  scores = scorer(flat_prompts, [t for row in texts for t in row], flat_safety)["rc"]
  return texts, np.asarray(finished, bool), scores.reshape(len(prompts), k), tokens


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
    _, done, s, _ = sample_and_score(config, policy, tokenizer, scorer, sub, k=rc.plot_k,
                                     temperature=t, key=jax.random.fold_in(key, 1000 + i),
                                     desc=f"Fig. 8 sweep, T={t:g}")
    by_t[t] = curve_scores(s, done)
  return rs_lib.reward_vs_temperature(by_t, estimator="subsets")


def best_temperature(curve: dict) -> float:
  """The temperature of the highest max-reward point of a Fig. 8 curve (ties: the lowest T)."""
  return float(curve["temperature"][int(np.argmax(curve["max"]))])


def _write_figures(fig_dir: str, figures: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(fig_dir, exist_ok=True)
  if "reward_vs_n" in figures:
    rs_lib.plot_reward_vs_n(figures["reward_vs_n"], os.path.join(fig_dir, "reward_vs_n.png"))
  if "reward_vs_temperature" in figures:
    rs_lib.plot_reward_vs_temperature(figures["reward_vs_temperature"],
                                      os.path.join(fig_dir, "reward_vs_temperature.png"))
  wd.write_json(os.path.join(fig_dir, "figures.json"), figures)


def _sample_stats(prompts, k: int, temperature: float, texts, finished, scores,
                  tokens: Optional[int]) -> dict:
  curve_s = curve_scores(scores, finished)
  return {"prompts": len(prompts), "k": int(k), "temperature": temperature,
          "tokens_sampled": tokens,
          "truncated": float(1.0 - finished.mean()),  # no EOS within the budget, or empty
          "empty": float(np.mean([not t.strip() for row in texts for t in row])),
          "prompts_without_finished_sample": int((~finished.any(axis=1)).sum()),
          "reward_mean": float(curve_s.mean()),
          "reward_median": float(np.median(curve_s, axis=1).mean()),
          "reward_best": float(curve_s.max(axis=1).mean())}


class _Iteration:
  """One rejection-sampling iteration in ``workdir``: its inputs, checked and loaded (nothing
  written), and the steps of the module docstring as methods (each reusing a finished file);
  ``prompts``: the prompt records to sample instead of the stage's stream."""

  def __init__(self, config, workdir: str, prompts: Optional[List[dict]] = None):
    rc = self.rc = config.rejection_sampling
    self.config, self.workdir = config, workdir
    _validate(config)
    self.tokenizer = build.tokenizer(config, workdir)
    pcfg = LlamaConfig.from_params_json(os.path.join(config.init_from, "params.json"))
    self.tokenizer.check_vocab(pcfg)
    self.sample_from = rc.sample_from or config.init_from
    self.scfg, self.sparams = convert.load_orbax(self.sample_from)
    self.tokenizer.check_vocab(self.scfg)
    self.scorer = scoring.make_scorer(config, "rejection_sampling", self.tokenizer)
    if prompts is None:
      prompts = prompts_lib.load_prompts(config, workdir, "train", rc.num_prompts,
                                         stream=int(rc.get("prompt_stream", -1)))
    self.prompts = [p for p in prompts if input_pipeline.prompt_example(
        p, self.tokenizer, rc.max_prompt_len) is not None]
    if not self.prompts:
      raise ValueError("rejection_sampling: no prompt fits config.rejection_sampling.max_prompt_len")
    self.mesh, _ = build.mesh_and_rules(config)
    self.key = jax.random.fold_in(jax.random.key(config.seed), rc.iteration)
    self.label = f"RLHF-V{rc.iteration}"
    self.fig_dir = os.path.join(workdir, "figures")
    self.figures = wd.read_json(os.path.join(self.fig_dir, "figures.json"), default={})
    self._policy = None

  def policy(self) -> rs_lib.Policy:
    """The sampling policy (params on the generation layout), built on first use."""
    if self._policy is None:
      self._policy = rs_lib.Policy(
          self.scfg, sharding.to_generation_layout(self.sparams, self.scfg, self.mesh), self.mesh)
    return self._policy

  def release(self) -> None:
    """Drop the sampling policy (its generation copy too) before the fine-tune."""
    self.sparams = self._policy = None

  def temperature(self) -> float:
    """Fig. 8 (once), then the sampling temperature: its best with ``auto_temperature``."""
    rc = self.rc
    if "reward_vs_temperature" not in self.figures and rc.plot_prompts > 0:
      curve = temperature_curve(self.config, self.policy(), self.tokenizer, self.scorer,
                                self.prompts, self.key)
      if curve is not None:
        self.figures["reward_vs_temperature"] = {self.label: curve}
        _write_figures(self.fig_dir, self.figures)
    curve = self.figures.get("reward_vs_temperature", {}).get(self.label)
    if not rc.get("auto_temperature", False):
      return float(rc.temperature)
    if curve is None:
      raise ValueError("config.rejection_sampling.auto_temperature needs the Fig. 8 curve: set "
                       "plot_prompts > 0 and plot_temperatures")
    log.info("rejection sampling V%d: temperature %.2f (best of %s)", rc.iteration,
             best_temperature(curve), curve["temperature"])
    return best_temperature(curve)

  def sample(self, temperature: float, stop=None) -> Tuple[list, dict]:
    """``sampled.jsonl`` records and ``sampled_stats.json`` (reused when both exist), Fig. 7.
    The pass keeps its finished batches in ``sampling/`` until then (a stop or a kill resumes
    from them); raises ``rs_lib.SamplingStopped`` when ``stop()`` turns True between batches."""
    rc, prompts = self.rc, self.prompts
    sampled_path = os.path.join(self.workdir, "sampled.jsonl")
    stats_path = os.path.join(self.workdir, "sampled_stats.json")
    if os.path.exists(sampled_path) and os.path.exists(stats_path):
      log.info("rejection sampling: reusing %s", sampled_path)
      return rs_lib.read_jsonl(sampled_path), wd.read_json(stats_path)
    batch_dir = os.path.join(self.workdir, "sampling", f"T{temperature:g}")
    texts, finished, scores, tokens = sample_and_score(
        self.config, self.policy(), self.tokenizer, self.scorer, prompts, k=rc.k,
        temperature=temperature, key=self.key, batch_dir=batch_dir, stop=stop,
        desc=f"rejection sampling V{rc.iteration} (K={rc.k}, T={temperature:g})")
    records = rs_lib.make_records([p["prompt"] for p in prompts], texts, scores,
                                  iteration=rc.iteration, temperature=temperature,
                                  finished=finished,
                                  is_safety=[bool(p.get("is_safety", False)) for p in prompts])
    stats = _sample_stats(prompts, rc.k, temperature, texts, finished, scores, tokens)
    self.figures["reward_vs_n"] = {self.label: rs_lib.reward_vs_n(
        curve_scores(scores, finished), estimator="subsets")}
    _write_figures(self.fig_dir, self.figures)
    if jax.process_index() == 0:
      rs_lib.write_records(sampled_path, records)
      wd.write_json(stats_path, stats)
      shutil.rmtree(os.path.join(self.workdir, "sampling"), ignore_errors=True)
    return records, stats

  def pool(self, records: list) -> Tuple[dict, list]:
    """(pooled best records per prompt, earlier picks re-scored with this iteration's reward)."""
    rc, scorer = self.rc, self.scorer
    previous = [r for p in build.parse_list(rc.pool_from, "config.rejection_sampling.pool_from")
                for r in rs_lib.read_jsonl(p)]
    # Earlier picks are re-scored with this iteration's reward before pooling (Sec. 3.2.3).
    rescored = rs_lib.rescore(previous, lambda rs: scorer([r["prompt"] for r in rs],
                                                          [r["samples"][r["chosen"]] for r in rs],
                                                          [r["is_safety"] for r in rs])["rc"])
    pooled = rs_lib.pool(rs_lib.pool_from_records(rescored), records)
    if not pooled:
      raise ValueError(f"rejection_sampling: none of the {len(self.prompts)} prompts has a sample "
                       "that ended with EOS within config.rejection_sampling.max_new_tokens="
                       f"{rc.max_new_tokens} (truncated samples are never chosen); raise it")
    return pooled, rescored

  def write_pool(self, kept: list) -> Tuple[str, list]:
    """``pooled.jsonl`` (the ``kept`` records) and ``sft_data.jsonl`` (their chosen samples, in
    that order: the fine-tuning data; every process waits)."""
    sft_jsonl = os.path.join(self.workdir, "sft_data.jsonl")
    sft_records = rs_lib.to_sft_records(kept)
    if jax.process_index() == 0:
      rs_lib.write_records(os.path.join(self.workdir, "pooled.jsonl"), kept)
      sources.write_jsonl(sft_jsonl, sft_records)
    if jax.process_count() > 1:  # the fine-tune reads sft_data.jsonl on every process
      multihost_utils.sync_global_devices("rejection sampling: sft_data written")
    return sft_jsonl, sft_records


class RejectionSamplingStage(stage_lib.Stage):
  """Stage ``rejection_sampling``: one iteration (module docstring); its fine-tuning runs on
  ``finetune`` (the SFT stage, given by the registry, so this stage imports no other runner)."""

  name = "rejection_sampling"

  def __init__(self, finetune: stage_lib.Stage):
    self.finetune = finetune

  def run(self, config, workdir: str, *, prompts: Optional[List[dict]] = None,
          select: Optional[Callable[[List[dict], int], List[dict]]] = None) -> dict:
    """Run one rejection-sampling iteration in ``workdir`` (resuming its finished steps).

    Order: Fig. 8 (max reward vs temperature on ``plot_prompts``) first, so that with
    ``rejection_sampling.auto_temperature`` the main sampling uses its best temperature (the
    paper re-tunes T per iteration: the optimum drifts to 1.2-1.3 after RLHF); then K samples per
    prompt at that temperature, Fig. 7, the pool (earlier picks re-scored with the current
    reward), and the fine-tune.

    Hooks for stages built on this one (RAFT, ``llama_jax.raft``; a resume passes the same):
      prompts: the prompt records (``{"prompt": dialog, "is_safety": bool}``) to sample instead
        of ``rejection_sampling.num_prompts`` of its ``prompt_stream``.
      select: ``(records, num_samples) -> kept records``, in place of the pool: from this
        iteration's sampled-set records (the prompts with a finished sample) and its sample
        count (prompts x K, truncated samples included), the records to fine-tune on (one
        chosen sample each; several records of one prompt allowed); ``pool_from`` is not read.

    Returns:
      dict with ``final_dir`` (when finished), ``finished``, sampled-set statistics
      (temperature, mean / median / best reward, truncated share, pooled size) and the
      fine-tuning result.
    Raises:
      ValueError / FileNotFoundError: on bad config fields or missing checkpoints, before
        sampling.
    """
    existed = os.path.exists(workdir)
    with wd.Lock(workdir):
      with wd.clean_on_failure(workdir, existed):
        it = _Iteration(config, workdir, prompts)
        wd.check_resume(workdir, config, any(os.path.exists(os.path.join(workdir, name)) for name
                                             in ("sampled.jsonl", "sampling", "figures", "finetune")))
      wd.write_config(workdir, config)
      stop = StopSignal(grace_s=float(config.train.stop_grace_s))
      try:
        records, sample_stats = it.sample(it.temperature(), stop=lambda: stop.requested)
      except rs_lib.SamplingStopped as err:
        log.info("rejection sampling: %s by a signal; the next run resumes from %s", err,
                 os.path.join(workdir, "sampling"))
        return {"iteration": config.rejection_sampling.iteration, "finished": False,
                "stopped_by_signal": True}
      finally:
        stop.restore()
      return self._run(config, workdir, it, records, sample_stats, select)

  def _run(self, config, workdir: str, it: _Iteration, records: list, sample_stats: dict,
           select=None) -> dict:
    rc = config.rejection_sampling
    it.release()
    if select is None:
      pooled, rescored = it.pool(records)
      kept = [pooled[k] for k in sorted(pooled)]
    else:
      kept, rescored = select(records, len(it.prompts) * int(rc.k)), []
      if not kept:
        raise ValueError(f"rejection_sampling: the selection kept none of the "
                         f"{len(it.prompts) * rc.k} samples (truncated samples are never kept)")
    sft_jsonl, sft_records = it.write_pool(kept)
    stats = {**sample_stats, "pooled": len(kept), "rescored_from_earlier": len(rescored),
             "pooled_reward_best": float(np.mean([rs_lib.best_score(r) for r in kept])),
             "from_earlier_iterations": int(sum(r["iteration"] != rc.iteration for r in kept))}
    log.info("rejection sampling V%d: %s", rc.iteration, stats)
    return stage_lib.finetune_on(self.finetune, config, workdir, sft_jsonl, sft_records,
                                 {"iteration": rc.iteration, "sampled": stats,
                                  "figures": it.figures,
                                  "tokens_sampled": stats.get("tokens_sampled")})

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """The fine-tuning step (the SFT stage's) and the sampling pass: ``sampling.sample`` of
    ``rejection_sampling.batch_size`` prompts, K completions each, on the generation layout
    (the sampled model: ``init_from``'s, or the config's model for ``sample_from``'s shape)."""
    rc = config.rejection_sampling
    cfg = build.planning_model_config(config)
    sample = stage_lib.sampling_plan(
        f"sampling.sample (rejection-sampling pass: {rc.batch_size} prompts x K={rc.k}, "
        "generation layout)", cfg, mesh, int(rc.batch_size), int(rc.max_prompt_len),
        int(rc.max_new_tokens), float(rc.temperature), num_samples=int(rc.k))
    return self.finetune.abstract_steps(config, mesh) + [sample]

  def unavailable(self, config) -> List[str]:
    del config
    return ["the reward models' scoring of the samples (a forward pass per batch, no optimizer "
            "state) is not planned"]
