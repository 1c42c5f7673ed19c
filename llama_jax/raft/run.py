"""The RAFT stage: rounds of sample -> rank by reward -> fine-tune on the top share (stage "raft").

Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment"
(arXiv 2304.06767), Sec. 3. ``python train.py --config=configs/raft_tiny.py --workdir=W
--config.init_from=<sft>/final --config.rejection_sampling.help_rm=<rm>/final ...``.

Round r = 1 .. ``raft.num_rounds``, each from the policy the round before left (round 1:
``config.init_from``):
  1. data collection: K samples (``rejection_sampling.k``, ``temperature``, ``top_p``,
     ``max_new_tokens``) for each of b new prompts (``rejection_sampling.num_prompts``);
  2. data ranking: their rewards (``rejection_sampling.reward``: the RMs' combined ``Rc`` or the
     world oracle); kept: the best sample of each prompt (local ranking, ``raft.keep_fraction = 0``,
     the paper's default) or the top ``keep_fraction`` of all b x K samples (global ranking,
     ``raft.step.select``); a truncated sample (no EOS) is never kept. With ``raft.kl_coef`` > 0
     the ranking is by the KL-regularized reward ``r - kl_coef * log(pi_r(y|x) / pi_0(y|x))``
     (``raft.step.kl_regularized``; :func:`log_ratios` scores every sample under the round's
     policy and ``init_from`` once, from round 2 on), which keeps the rounds from drifting
     toward what a learned reward over-rates;
  3. fine-tuning: SFT on the kept samples (``rejection_sampling.lr``, ``num_epochs`` /
     ``num_steps``, a fresh optimizer) from the current policy: the next round's policy.
Collection and fine-tuning are decoupled: a round is one iteration of the rejection-sampling
stage (given by the registry, ``recipe.stages``) on RAFT's prompts with RAFT's selection, without
pooling with earlier rounds and without Fig. 8 (``plot_prompts`` is set to 0; Fig. 7 stays).

Prompts: ``num_rounds x num_prompts`` distinct train prompts of
``rejection_sampling.prompt_stream`` (``data.prompts.load_prompts``), shuffled with
``config.seed`` and cut into one batch per round: no two rounds share a prompt, and every run of a
config draws the same batches. Sampling keys: ``fold_in(key(seed), r)`` (the iteration).

Files: ``<workdir>/config.json``; ``tokenizer.model`` (the world tokenizer, copied to each round);
``round_<r>/``: the round's rejection-sampling workdir (its ``config.json``: stage
``rejection_sampling``, ``init_from`` the previous round's ``final/``, iteration r;
``sampled.jsonl``: every sample and reward; ``sampled_stats.json``; ``figures/`` (Fig. 7);
``pooled.jsonl``: the kept samples; ``sft_data.jsonl``; ``finetune/``: the SFT run; ``final/``;
``result.json``); ``final/`` (the last round's) and ``result.json`` (per round: prompts, sample
reward, kept samples and their reward, fine-tuning steps).

Resume: a round with ``final/`` and ``result.json`` is reused; the first unfinished round resumes
inside (sampled batches in ``sampling/``, the fine-tune's checkpoint), so a killed run reruns
nothing finished. SIGTERM / SIGINT while sampling or fine-tuning stops the run after the current
batch or at a checkpoint (exit 0, ``finished`` False). Only the config that started the workdir
may resume it (``train.workdir.check_resume``, here and in every round).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.data import input_pipeline
from llama_jax.data import prompts as prompts_lib
from llama_jax.dpo import step as dpo_lib
from llama_jax.raft import step as raft_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd

log = logging.getLogger(__name__)


def validate(config) -> None:
  """RAFT's checks across fields and against files, before anything is written.

  Raises:
    ValueError: naming the field: ``init_from`` empty, ``raft.num_rounds`` < 1,
      ``raft.keep_fraction`` outside [0, 1] or keeping no sample of a round's
      ``num_prompts x k``, a ``rejection_sampling`` field RAFT cannot honour (``sample_from``,
      ``pool_from``, ``auto_temperature``), or ``help_rm`` empty with the RM reward.
    FileNotFoundError: for ``init_from`` without ``params.json`` or a missing RM directory.
  """
  rc, raft = config.rejection_sampling, config.raft
  build.check_sampling_inputs(config, "raft", "the policy of round 1")
  if int(raft.num_rounds) < 1:
    raise ValueError(f"config.raft.num_rounds must be >= 1, got {raft.num_rounds}")
  keep = float(raft.keep_fraction)
  if not 0.0 <= keep <= 1.0:
    raise ValueError(f"config.raft.keep_fraction must be in [0, 1], got {keep}")
  if keep > 0:
    total = int(rc.num_prompts) * int(rc.k)
    try:
      raft_lib.num_kept(keep, total)
    except ValueError:
      raise ValueError(f"config.raft.keep_fraction={keep} keeps no sample of a round's "
                       f"rejection_sampling.num_prompts x k = {total}; raise it to >= "
                       f"1/{total}") from None
  for name, why in (("sample_from", "every round samples its current policy"),
                    ("pool_from", "a round fine-tunes on its own samples only")):
    if rc[name]:
      raise ValueError(f"config.rejection_sampling.{name} must be empty for RAFT ({why}), got "
                       f"{rc[name]!r}")
  if rc.get("auto_temperature", False):
    raise ValueError("config.rejection_sampling.auto_temperature must be False for RAFT: rounds "
                     "draw no Fig. 8 curve and sample at rejection_sampling.temperature")


def round_prompts(config, workdir: str) -> List[List[dict]]:
  """The prompt records of every round: [num_rounds][num_prompts] ``{"prompt", "is_safety"}``,
  distinct across all rounds (module docstring).

  Raises:
    ValueError: if the stream has fewer than ``num_rounds x num_prompts`` distinct prompts.
  """
  rc, rounds = config.rejection_sampling, int(config.raft.num_rounds)
  n = int(rc.num_prompts)
  prompts = prompts_lib.load_prompts(config, workdir, "train", rounds * n,
                                     stream=int(rc.get("prompt_stream", -1)), distinct=True)
  if len(prompts) < rounds * n:
    raise ValueError(f"raft: {len(prompts)} distinct train prompts (stream "
                     f"{rc.prompt_stream}) for config.raft.num_rounds x "
                     f"config.rejection_sampling.num_prompts = {rounds} x {n}; lower one")
  order = np.random.default_rng([int(config.seed), 0x4AF7]).permutation(len(prompts))
  prompts = [prompts[i] for i in order[:rounds * n]]
  return [prompts[i * n:(i + 1) * n] for i in range(rounds)]


_sequence_logprobs = jax.jit(dpo_lib.sequence_logprobs, static_argnames="cfg")


def _logprobs(policy: rs_lib.Policy, tokenizer, rows: List[tuple], batch_size: int) -> np.ndarray:
  """[n] ``log pi(response | prompt)`` of ``rows`` ((dialog, response text) pairs, re-encoded in
  chat format with EOS), ``batch_size`` rows per pass (the last padded with empty rows, so
  every pass has one shape per 64-token width); 0 for a row longer than the context."""
  cfg, out = policy.cfg, np.zeros(len(rows))
  enc = [input_pipeline.encode_response(tokenizer, p, text, cfg.max_seq_len) for p, text in rows]
  for start in range(0, len(rows), batch_size):
    chunk = enc[start:start + batch_size]
    width = max([int(e[1].sum()) for e in chunk if e is not None] + [1])
    width = min(-(-width // 64) * 64, cfg.max_seq_len)
    arrays = [np.zeros((batch_size, width), t) for t in (np.int32, bool, bool)]
    for i, e in enumerate(chunk):
      if e is not None:
        for a, x in zip(arrays, e):
          a[i] = x[:width]
    with sharding.activate(policy.mesh, sharding.GENERATION_RULES):
      logps = _sequence_logprobs(policy.params, cfg=cfg, tokens=arrays[0], mask=arrays[1],
                                 response_mask=arrays[2])
    out[start:start + len(chunk)] = np.asarray(logps)[:len(chunk)]
  return out


def log_ratios(config, records: List[dict], tokenizer, policy_path: str) -> np.ndarray:
  """[n_records, K] ``log pi(y|x) - log pi_0(y|x)`` of every sample of ``records`` (a round's
  sampled set): ``pi`` the round's policy (``policy_path``), ``pi_0`` ``config.init_from``; one
  model in memory at a time, on the generation layout, ``rejection_sampling.batch_size x k``
  rows per pass. The samples are re-encoded from their text (the tokens sampled are not kept)."""
  rc = config.rejection_sampling
  rows = [(r["prompt"], text) for r in records for text in r["samples"]]
  mesh = build.mesh_and_rules(config)[0]
  logps = []
  for path in (policy_path, config.init_from):
    policy = rs_lib.load_policy(path, tokenizer, mesh)
    logps.append(_logprobs(policy, tokenizer, rows, int(rc.batch_size) * int(rc.k)))
    del policy
  return (logps[0] - logps[1]).reshape(len(records), -1)


def log_ratio_plan(config, mesh) -> stage_lib.StepPlan:
  """:class:`StepPlan` of one call of :func:`log_ratios`' forward pass: ``dpo.step.
  sequence_logprobs`` of ``rejection_sampling.batch_size x k`` rows of the longest width (prompt
  and answer budgets, rounded up to 64, at most the context) on the generation layout, one model
  live, rows split over data x fsdp."""
  rc = config.rejection_sampling
  cfg = build.planning_model_config(config)
  rows = int(rc.batch_size) * int(rc.k)
  width = min(-(-(int(rc.max_prompt_len) + int(rc.max_new_tokens)) // 64) * 64,
              int(cfg.max_seq_len))
  params = stage_lib.generation_params(cfg, mesh)
  batch_sh = sharding.batch_sharding(mesh, sharding.GENERATION_RULES)
  batch = {k: jax.ShapeDtypeStruct((rows, width), dt, sharding=batch_sh)
           for k, dt in (("tokens", jnp.int32), ("mask", jnp.bool_), ("response_mask", jnp.bool_))}
  fn = sharding.jit_step(
      lambda p, tokens, mask, response_mask: dpo_lib.sequence_logprobs(
          p, cfg, tokens, mask, response_mask),
      mesh, sharding.GENERATION_RULES,
      in_shardings=(jax.tree.map(lambda x: x.sharding, params), batch_sh, batch_sh, batch_sh),
      out_shardings=batch_sh, donate_argnums=())
  t0 = time.perf_counter()
  lowered = fn.lower(params, batch["tokens"], batch["mask"], batch["response_mask"])
  return stage_lib.StepPlan(
      f"dpo.step.sequence_logprobs (RAFT log-ratio pass: {rows} rows, generation layout)",
      lowered, 1, {k: (rows, width) for k in batch}, params,
      lower_s=time.perf_counter() - t0)


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(os.path.abspath(workdir), f"round_{r}")


def round_config(config, workdir: str, r: int):
  """The rejection-sampling config of round ``r`` (1-based): ``init_from`` the previous round's
  ``final/`` (round 1: ``config.init_from``), iteration r, no pooling, no Fig. 8."""
  sub = build.copy_config(config)
  sub.stage = "rejection_sampling"
  sub.init_from = config.init_from if r == 1 else os.path.join(round_dir(workdir, r - 1), wd.FINAL)
  rc = sub.rejection_sampling
  rc.iteration, rc.pool_from, rc.plot_prompts = r, "", 0
  return sub


def _summary(r: int, res: dict) -> Dict[str, Any]:
  s, ft = res.get("sampled", {}), res.get("finetune", {})
  out = {"round": r, "finished": bool(res.get("finished")),
         **{k: res.get(k) for k in wd.TOKEN_COUNTS}}
  out.update({k: s[k] for k in ("prompts", "temperature", "reward_mean", "reward_best",
                                "truncated") if k in s})
  if "pooled" in s:
    out.update(kept=s["pooled"], kept_reward=s["pooled_reward_best"])
  if ft:
    out.update(finetune_steps=ft.get("steps"),
               finetune_eval_loss=(ft.get("eval") or {}).get("loss"))
  return out


def _started(workdir: str, rounds: int) -> bool:
  """Whether any round of ``workdir`` holds more than the shared tokenizer (and its lock)."""
  return any(os.path.isdir(d) and set(os.listdir(d)) - {*wd.TOKENIZER_FILES, wd.LOCK}
             for d in (round_dir(workdir, r) for r in range(1, rounds + 1)))


class RAFTStage(stage_lib.Stage):
  """Stage ``raft`` (module docstring); each round runs on ``rejection_sampling`` (the
  rejection-sampling stage, given by the registry, so this package imports no other runner)."""

  name = "raft"

  def __init__(self, rejection_sampling: stage_lib.Stage):
    self.rs = rejection_sampling

  def run(self, config, workdir: str) -> dict:
    """Run (or resume) RAFT in ``workdir``.

    Returns:
      dict with ``finished``, ``rounds`` (per round: prompts, temperature, sample reward mean and
      best-of-K, truncated share, kept samples and their mean reward, fine-tuning steps and
      held-out loss, ``tokens_sampled`` / ``tokens_trained``, ``wall_s`` when it ran in this
      call), ``ranking`` ("local" | "global"), the rounds' summed ``tokens_sampled`` /
      ``tokens_trained``,
      ``final_dir`` when finished, ``stopped_at`` (a round) otherwise.
    Raises:
      ValueError / FileNotFoundError: from :func:`validate`, :func:`round_prompts`, a workdir of
        another config or in use, before anything is written (a new workdir is removed); a
        round raises its own (the rejection-sampling stage's) errors.
    """
    rounds = int(config.raft.num_rounds)
    existed = os.path.exists(workdir)
    with wd.Lock(workdir):
      with wd.clean_on_failure(workdir, existed):
        validate(config)
        batches = round_prompts(config, workdir)
        wd.check_resume(workdir, config, os.path.exists(os.path.join(workdir, wd.RESULT))
                        or _started(workdir, rounds))
        if config.tokenizer.path == "world":
          build.tokenizer(config, workdir)  # trained once (or reused), copied to every round
      if wd.is_done(workdir):
        log.info("raft: %s is finished; nothing to run", workdir)
        return wd.read_json(os.path.join(workdir, wd.RESULT))
      wd.write_config(workdir, config)
      try:
        return self._rounds(config, workdir, batches)
      except BaseException:
        if not existed and jax.process_index() == 0 and not _started(workdir, rounds):
          shutil.rmtree(workdir, ignore_errors=True)  # failed before round 1 kept anything
        raise

  def _rounds(self, config, workdir: str, batches: List[List[dict]]) -> dict:
    keep, kl_coef = float(config.raft.keep_fraction), float(config.raft.get("kl_coef", 0.0))
    out: Dict[str, Any] = {"ranking": "local" if keep == 0 else "global", "keep_fraction": keep,
                           "kl_coef": kl_coef, "rounds": [], "finished": False}
    for r, prompts in enumerate(batches, 1):
      select = self._select(config, workdir, r, keep, kl_coef)
      sub_dir = round_dir(workdir, r)
      if wd.is_done(sub_dir):
        out["rounds"].append(_summary(r, wd.read_json(os.path.join(sub_dir, wd.RESULT))))
        continue
      wd.share_tokenizer(config, workdir, sub_dir)
      log.info("raft: round %d of %d in %s", r, len(batches), sub_dir)
      t0 = time.perf_counter()
      res = self.rs.run(round_config(config, workdir, r), sub_dir, prompts=prompts, select=select)
      out["rounds"].append({**_summary(r, res), "wall_s": time.perf_counter() - t0})
      if not res.get("finished"):
        log.warning("raft: round %d stopped before finishing; rerun to resume", r)
        return {**out, "stopped_at": f"round_{r}"}
      log.info("raft: round %d: %s", r, out["rounds"][-1])
    out["final_dir"] = wd.copy_final(os.path.join(round_dir(workdir, len(batches)), wd.FINAL),
                                     workdir)
    out.update({k: wd.sum_counts(x[k] for x in out["rounds"]) for k in wd.TOKEN_COUNTS},
               finished=True)
    wd.write_result(workdir, out)
    return out

  def _select(self, config, workdir: str, r: int, keep: float, kl_coef: float):
    """Round ``r``'s ``select`` hook of the rejection-sampling stage (None = its own best per
    prompt): the kept records, ranked by the reward or, with ``kl_coef`` > 0 after round 1 (whose
    policy is ``pi_0``: every log-ratio 0), by the KL-regularized reward."""
    if keep == 0 and (kl_coef == 0 or r == 1):
      return None
    def select(records, num_samples):
      ranking = None
      if kl_coef > 0 and r > 1:
        tok = build.tokenizer(config, round_dir(workdir, r))
        ratios = log_ratios(config, records, tok, os.path.join(round_dir(workdir, r - 1),
                                                               wd.FINAL))
        ranking = raft_lib.kl_regularized([x["scores"] for x in records], ratios, kl_coef)
        log.info("raft: round %d: mean log-ratio to init_from %.3f nats per sample", r,
                 float(np.mean(ratios)))
      return raft_lib.kept_records(records, keep, num_samples, ranking=ranking)
    return select

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """A round's programs: the rejection-sampling stage's (the fine-tuning step, the sampling
    pass of ``rejection_sampling.batch_size`` prompts x K) and, with ``raft.kl_coef`` > 0, the
    log-ratio pass (:func:`log_ratio_plan`)."""
    plans = self.rs.abstract_steps(config, mesh)
    if float(config.raft.get("kl_coef", 0.0)) > 0:
      plans.append(log_ratio_plan(config, mesh))
    return plans

  def unavailable(self, config) -> List[str]:
    return self.rs.unavailable(config)
