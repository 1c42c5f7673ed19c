"""The whole Llama-2-Chat recipe in one workdir: SFT -> RMs -> rejection sampling x k -> PPO.

Llama 2 paper, Sec. 3 (Fig. 4: RLHF-V1..V5: rejection sampling first, PPO on top of the last
rejection-sampled checkpoint). ``python train.py --config=configs/tiny.py``
(stage ``pipeline``). Sub-stages and their workdirs::

  <workdir>/sft             stage "sft"                 config as given (stage set to sft)
  <workdir>/annotate        stage "annotate"            init_from sft; only when
                                                        annotate.num_prompts > 0 (world only)
  <workdir>/rm_helpfulness  stage "reward"              init_from sft; pipeline.help_* mixture
                                                        (+ annotate's pairs)
  <workdir>/rm_safety       stage "reward"              init_from sft; pipeline.safety_* mixture,
                                                        seed + 1
  <workdir>/rs_<i>          stage "rejection_sampling"  init_from sft or rs_<i-1>; pools rs_1..i-1
  <workdir>/annotate_<j>,   annotation round j >= 2 (annotate.rounds), before rs_<j> or PPO:
    rm_helpfulness_<j>,     samples of rs_<j-1>, pairs accumulated with the earlier rounds', RMs
    rm_safety_<j>           retrained from sft on them; later stages use the newest RMs
  <workdir>/ppo             stage "ppo"                 init_from the last rs (or sft); value = help RM
  <workdir>/ppo_oracle      stage "ppo", reward oracle  pipeline.oracle_control: the gold-reward
                                                        control, same start and prompts as ppo
  <workdir>/rs_<k+1>        stage "rejection_sampling"  pipeline.rs_after_ppo: init_from ppo
  <workdir>/dpo, rrhf, raft, pipeline.methods: alternatives from sft with the first round's
    context_distillation,   data and RMs (DPO: the helpfulness RM's mixture; RRHF: rs_1's
    gatt                    scored samples; RAFT: its own samples scored by the RMs; context
                            distillation: the safety prompts of rs_1's stream; GAtt: dialogs
                            of rs_1's stream, no reward)
  <workdir>/sft_coreset,    pipeline.methods: SFT from init_from on pipeline.select_fraction
    sft_random              of the demonstrations (a coreset embedded by sft, or a random
                            subset), as many steps as sft

Every annotation round, rejection-sampling iteration and PPO draws train prompts from its own
stream (``llama_jax.data.prompts``); the safety RMs get ``pipeline.safety_aux_weight``.

A sub-stage with ``final/`` and ``result.json`` is done and skipped; an unfinished one resumes
from its own checkpoint; a stage that stops early (SIGTERM, ``train.stop_after_steps``) stops the
pipeline, and the next run continues there. ``<workdir>/result.json`` lists what ran,
``<workdir>/wall_s.json`` each stage's wall time (summed over resumed runs; ``eval.py`` reports it).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple


from llama_jax.recipe import annotate
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd

log = logging.getLogger(__name__)
# Alternatives to rejection sampling and PPO (pipeline.methods): sub-workdir -> report label.
WALL = "wall_s.json"  # seconds each sub-stage took, summed over the runs that worked on it
METHODS = {"dpo": "DPO", "rrhf": "RRHF", "raft": "RAFT",
           "context_distillation": "Context distillation", "gatt": "GAtt",
           "sft_coreset": "SFT (coreset subset)", "sft_random": "SFT (random subset)"}


def rm_name(kind: str, round_: int) -> str:
  """Sub-workdir of the ``kind`` ("helpfulness" | "safety") reward model of annotation round
  ``round_`` (1-based): ``rm_<kind>`` for the first, ``rm_<kind>_<round>`` after."""
  return f"rm_{kind}" if round_ == 1 else f"rm_{kind}_{round_}"


def annotate_name(round_: int) -> str:
  return "annotate" if round_ == 1 else f"annotate_{round_}"


def num_rounds(config) -> int:
  """Reward-model rounds of the pipeline: ``annotate.rounds`` when annotating, else 1.

  Raises:
    ValueError: if ``annotate.rounds`` is not in [1, rs_iterations + 1 (with PPO)].
  """
  if config.annotate.num_prompts <= 0:
    return 1
  rounds = int(config.annotate.get("rounds", 1))
  most = len(policy_positions(config))
  if not 1 <= rounds <= max(most, 1):
    raise ValueError(f"config.annotate.rounds must be in [1, {max(most, 1)}] (one round before "
                     f"each rejection-sampling iteration and PPO), got {rounds}")
  return rounds


def latest_reward_models(workdir: str) -> Tuple[str, str]:
  """``(helpfulness, safety)`` final dirs of the last finished reward-model round of a pipeline
  workdir (safety "" if absent)."""
  j = 1
  while wd.is_done(os.path.join(workdir, rm_name("helpfulness", j + 1))):
    j += 1
  safety = os.path.join(workdir, rm_name("safety", j), "final")
  return (os.path.join(workdir, rm_name("helpfulness", j), "final"),
          safety if os.path.isdir(safety) else "")


def policy_positions(config) -> List[str]:
  """Names of the policy stages in order: ``rs_1..rs_k``, ``ppo``, and ``rs_<k+1>`` with
  ``pipeline.rs_after_ppo`` (the gold-reward control ``ppo_oracle`` runs beside ``ppo``)."""
  p = config.pipeline
  names = [f"rs_{i}" for i in range(1, p.rs_iterations + 1)]
  names += ["ppo"] if p.ppo else []
  names += [f"rs_{p.rs_iterations + 1}"] if p.get("rs_after_ppo", False) and p.ppo else []
  return names


class _Plan:
  """The sub-stage configs of one pipeline (see :func:`stage_plan`); checks in ``__init__``."""

  def __init__(self, config, workdir: str):
    p = self.p = config.pipeline
    self.config, self.root = config, os.path.abspath(workdir)
    self.annotating = config.annotate.num_prompts > 0
    self.rounds = num_rounds(config)
    self.positions = policy_positions(config)
    self.ks = build.parse_list(p.get("rs_k", ""), "config.pipeline.rs_k", int)
    n_rs = sum(name.startswith("rs_") for name in self.positions)
    if self.ks and (len(self.ks) != n_rs or min(self.ks) < 1):
      raise ValueError(f"config.pipeline.rs_k must give K >= 1 for each of the {n_rs} "
                       f"rejection-sampling iterations, got {p.rs_k!r}")
    if p.get("oracle_control", False) and config.tokenizer.path != "world":
      raise ValueError("config.pipeline.oracle_control needs the synthetic world (an oracle)")
    self.methods = build.parse_list(p.get("methods", ""), "config.pipeline.methods")
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or len(set(self.methods)) < len(self.methods):
      raise ValueError(f"config.pipeline.methods: each of {tuple(METHODS)} at most once, got "
                       f"{p.methods!r}")
    if "rrhf" in self.methods and "rs_1" not in self.positions:
      raise ValueError("config.pipeline.methods: rrhf learns from rs_1's scored samples; set "
                       "config.pipeline.rs_iterations >= 1")
    streams = int(config.data.get("prompt_streams", 8))
    needed = (self.rounds if self.annotating else 0) + len(self.positions)
    if needed > streams:
      raise ValueError(f"the pipeline has {needed} prompt-drawing stages but "
                       f"config.data.prompt_streams={streams}; raise it")

  def final(self, name: str) -> str:
    return os.path.join(self.root, name, wd.FINAL)

  def policy(self, j: int) -> str:
    """The newest policy before position j (1-based)."""
    return self.final("sft" if j == 1 else self.positions[j - 2])

  def stream(self, j: int) -> int:
    return (self.rounds if self.annotating else 0) + j - 1

  def rms(self, j: int) -> Tuple[str, str]:
    """The newest RMs before position j."""
    r = min(j, self.rounds)
    return self.final(rm_name("helpfulness", r)), self.final(rm_name("safety", r))

  def stage(self, name: str, init_from: Optional[str] = None):
    sub = build.copy_config(self.config)
    sub.stage = name
    if init_from is not None:
      sub.init_from = init_from
    return sub

  def prefs(self, j: int) -> str:
    return os.path.join(self.final(annotate_name(j)), annotate.PREFERENCES)

  def annotate(self, j: int):
    sub = self.stage("annotate", self.policy(j))
    sub.annotate.round = j
    sub.annotate.accumulate_from = self.prefs(j - 1) if j > 1 else ""
    sub.annotate.prompt_stream = j - 1
    return sub

  def rm(self, kind: str, j: int):
    p, sub = self.p, self.stage("reward", self.final("sft"))
    sub.reward.model = kind
    # Distinct seeds (head init, data order): two RMs on the same data must not be one model.
    sub.seed = self.config.seed + (0 if kind == "helpfulness" else 1) + 2 * (j - 1)
    key = "help" if kind == "helpfulness" else "safety"
    sub.reward.sources, sub.reward.weights = p[f"{key}_sources"], p[f"{key}_weights"]
    if kind == "safety":
      sub.reward.safety_aux_weight = float(p.get("safety_aux_weight", 0.0))
    if self.annotating:
      if "jsonl_preferences" in build.parse_list(sub.reward.sources, "pipeline sources"):
        raise ValueError("config.annotate.num_prompts > 0 adds the annotated pairs as the "
                         f"jsonl_preferences source; pipeline.{key}_sources has one already")
      sub.reward.sources += ",jsonl_preferences"
      if build.parse_list(sub.reward.weights, f"config.pipeline.{key}_weights"):
        sub.reward.weights += f",{p[f'annotate_{key}_weight']}"
      sub.data.preference_jsonl_path = self.prefs(j)
    sub.optimizer.lr = p.reward_lr
    sub.optimizer.warmup_frac = p.reward_warmup_frac
    sub.train.num_epochs = p.reward_num_epochs
    sub.train.num_steps = p.reward_num_steps
    return sub

  def rs(self, j: int, name: str):
    i = int(name.split("_")[1])
    sub = self.stage("rejection_sampling", self.policy(j))
    r = sub.rejection_sampling
    r.iteration = i
    r.help_rm, r.safety_rm = self.rms(j)
    r.prompt_stream = self.stream(j)
    r.pool_from = ",".join(os.path.join(self.root, f"rs_{e}", "sampled.jsonl") for e in range(1, i))
    if self.ks:
      r.k = self.ks[i - 1]
    if self.p.get("rs_sample_from", ""):
      r.sample_from = self.p.rs_sample_from
    return sub

  def ppo(self, j: int, oracle: bool = False):
    sub = self.stage("ppo", self.policy(j))
    sub.ppo.help_rm, sub.ppo.safety_rm = self.rms(j)
    sub.ppo.prompt_stream = self.stream(j)
    sub.ppo.sft_from = self.final("sft")
    if oracle:
      sub.ppo.reward = "oracle"
    return sub


  def method(self, name: str):
    """An alternative method (:data:`METHODS`) from the SFT policy with the first round's data
    and reward models: ``dpo`` on the helpfulness RM's preference mixture, ``rrhf`` on rs_1's
    K scored samples of the SFT policy, ``raft`` sampling its own from rs_1's prompt stream
    (rs_1's ``num_prompts`` split over ``raft.num_rounds`` rounds, rs_1's K, at
    ``rejection_sampling.temperature``: no Fig. 8 per round), ``context_distillation`` on the
    safety prompts of rs_1's stream, scored by the first RM pair, ``gatt`` on dialogs of rs_1's
    stream; ``sft_coreset`` / ``sft_random``: SFT from ``init_from`` on
    ``pipeline.select_fraction`` of the demonstrations (the coreset embedded by the SFT
    policy), with the epochs scaled so the optimizer steps match the full SFT's."""
    p = self.p
    if name in ("sft_coreset", "sft_random"):
      sub = self.stage("sft")
      d = sub.data
      d.select, d.select_fraction = name[len("sft_"):], float(p.select_fraction)
      d.select_embed_from = self.final("sft") if name == "sft_coreset" else ""
      if int(sub.train.num_steps) == 0:
        sub.train.num_epochs = float(sub.train.num_epochs) / d.select_fraction
      return sub
    sub = self.stage(name, self.final("sft"))
    if name == "gatt":  # rs_1's prompt stream; no reward
      sub.gatt.prompt_stream = self.stream(1)
      return sub
    if name == "context_distillation":  # the first RMs, rs_1's prompt stream
      r = sub.rejection_sampling
      r.help_rm, r.safety_rm = self.rms(1)
      sub.context_distillation.prompt_stream = self.stream(1)
      return sub
    if name == "raft":  # rs_1's prompts, RMs and K, split into raft.num_rounds online rounds
      r = sub.rejection_sampling
      r.help_rm, r.safety_rm = self.rms(1)
      r.pool_from, r.sample_from, r.auto_temperature, r.iteration = "", "", False, 1
      r.prompt_stream = self.stream(1)
      r.num_prompts = max(1, int(r.num_prompts) // int(sub.raft.num_rounds))
      if self.ks:
        r.k = self.ks[0]
      return sub
    if p.get("method_lr", 0.0) > 0:
      sub.optimizer.lr = p.method_lr
    sub.optimizer.warmup_steps, sub.optimizer.warmup_frac = 0, 0.0
    if p.get("method_epochs", 0.0) > 0:
      sub.train.num_epochs, sub.train.num_steps = p.method_epochs, 0
    if name == "dpo":
      rm = self.rm("helpfulness", 1)
      sub.dpo.sources, sub.dpo.weights = rm.reward.sources, rm.reward.weights
      sub.data.preference_jsonl_path = rm.data.preference_jsonl_path
    else:
      sub.rrhf.sampled = os.path.join(self.root, "rs_1", "sampled.jsonl")
    return sub


def _add_wall_time(workdir: str, name: str, seconds: float) -> None:
  """Adds ``seconds`` to stage ``name``'s total in ``<workdir>/wall_s.json`` (:data:`WALL`; the
  sum over the runs that worked on it, resumed ones included; process 0 writes)."""
  path = os.path.join(workdir, WALL)
  times = wd.read_json(path) or {}
  times[name] = float(times.get(name, 0.0)) + float(seconds)
  wd.write_json(path, times)


def _round_stages(plan: _Plan, j: int) -> List[Tuple[str, Callable[[], Any]]]:
  out = [(annotate_name(j), functools.partial(plan.annotate, j))] if plan.annotating else []
  return out + [(rm_name(kind, j), functools.partial(plan.rm, kind, j))
                for kind in ("helpfulness", "safety")]


def stage_plan(config, workdir: str) -> List[Tuple[str, Callable[[], Any]]]:
  """``[(name, make_config)]`` in order; ``make_config()`` builds the sub-stage config (it reads
  nothing, so a plan can be listed before anything ran). Sub-workdirs are ``<workdir>/<name>``.

  With ``annotate.num_prompts`` > 0, annotation round ``j`` (``annotate``, ``annotate_2``, ...)
  samples the latest policy (SFT, then the stage before position j), accumulates its pairs with
  the earlier rounds', and retrains both RMs on them (Sec. 3.2.1: weekly batches, RMs kept on the
  newest policy's distribution); round ``j`` runs before policy position ``j`` (rs_j, PPO, ...),
  and each stage uses the newest RMs. Every annotation round, rejection-sampling iteration and PPO
  draws its train prompts from a stream of its own (``data.prompt_streams``); the gold-reward
  control ``ppo_oracle`` (``pipeline.oracle_control``) uses PPO's prompts and starting policy.

  Raises:
    ValueError: for an impossible ``annotate.rounds`` or ``pipeline.rs_k``, a mixture that
      already names ``jsonl_preferences`` while annotating, more prompt-drawing stages than
      ``data.prompt_streams``, or ``oracle_control`` off the synthetic world.
  """
  plan = _Plan(config, workdir)
  out = [("sft", functools.partial(plan.stage, "sft"))] + _round_stages(plan, 1)
  for j, name in enumerate(plan.positions, 1):
    out += _round_stages(plan, j) if 1 < j <= plan.rounds else []
    if name != "ppo":
      out.append((name, functools.partial(plan.rs, j, name)))
      continue
    out.append(("ppo", functools.partial(plan.ppo, j)))
    if plan.p.get("oracle_control", False):
      out.append(("ppo_oracle", functools.partial(plan.ppo, j, oracle=True)))
  return out + [(m, functools.partial(plan.method, m)) for m in plan.methods]


class PipelineStage(stage_lib.Stage):
  """Stage ``pipeline`` (module docstring). ``run_stage(config, workdir)`` runs a sub-stage by
  ``config.stage`` (the registry's ``recipe.stages.run``, given by the registry, so this module
  imports no stage runner); ``stages`` maps names to stages for the dry run."""

  name = "pipeline"

  def __init__(self, run_stage: Callable[[Any, str], dict], stages: Mapping[str, stage_lib.Stage]):
    self.run_stage, self.stages = run_stage, stages

  def run(self, config, workdir: str) -> dict:
    """Run (or resume) the pipeline in ``workdir``.

    Returns:
      dict with ``finished``, ``ran`` / ``skipped`` stage names, ``stopped_at`` (the stage that
      did not finish, if any), ``wall_s`` per stage that ran, and each stage's result.
    Raises:
      ValueError: if ``config.pipeline.rs_iterations`` < 0 or the plan is impossible
        (:func:`stage_plan`), the workdir holds a pipeline of another config
        (``workdir.check_resume``) or is in use; sub-stages raise their own errors.
    """
    if config.pipeline.rs_iterations < 0:
      raise ValueError(f"config.pipeline.rs_iterations must be >= 0, got "
                       f"{config.pipeline.rs_iterations}")
    plan = stage_plan(config, workdir)
    wd.check_resume(workdir, config, any(os.path.isdir(os.path.join(workdir, name))
                                         for name, _ in plan))
    with wd.Lock(workdir):
      return self._run(config, workdir, plan)

  def _run(self, config, workdir: str, plan) -> dict:
    wd.write_config(workdir, config)
    out: Dict[str, Any] = {"ran": [], "skipped": [], "wall_s": {}, "stages": {}}
    for name, make in plan:
      sub_dir = os.path.join(workdir, name)
      if wd.is_done(sub_dir):
        out["skipped"].append(name)
        out["stages"][name] = wd.read_json(os.path.join(sub_dir, wd.RESULT))
        continue
      if name != "sft":
        wd.share_tokenizer(config, os.path.join(workdir, "sft"), sub_dir)
      log.info("pipeline: running %s in %s", name, sub_dir)
      t0 = time.perf_counter()
      out["stages"][name] = self.run_stage(make(), sub_dir)
      out["wall_s"][name] = time.perf_counter() - t0
      _add_wall_time(workdir, name, out["wall_s"][name])
      out["ran"].append(name)
      if not wd.is_done(sub_dir):
        out.update(stopped_at=name, finished=False)
        log.warning("pipeline: stage %s stopped before finishing; rerun to resume", name)
        return out
    out["finished"] = True
    wd.write_result(workdir, out)
    return out

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """SFT's, the reward model's and PPO's steps."""
    return [s for name in ("sft", "reward", "ppo")
            for s in self.stages[name].abstract_steps(config, mesh)]

  def unavailable(self, config) -> List[str]:
    return self.stages["rejection_sampling"].unavailable(config)
