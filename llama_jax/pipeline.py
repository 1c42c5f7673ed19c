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

Every annotation round, rejection-sampling iteration and PPO draws train prompts from its own
stream (``llama_jax.prompts``); the safety RMs get ``pipeline.safety_aux_weight``.

A sub-stage with ``final/`` and ``result.json`` is done and skipped; an unfinished one resumes
from its own checkpoint; a stage that stops early (SIGTERM, ``train.stop_after_steps``) stops the
pipeline, and the next run continues there. ``<workdir>/result.json`` lists what ran.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable, List, Tuple

import jax

from llama_jax import annotation, build
from llama_jax.rs_run import copy_config

log = logging.getLogger(__name__)


def is_done(path: str) -> bool:
  """A sub-stage is done when it has ``final/`` and ``result.json``."""
  return os.path.isdir(os.path.join(path, "final")) and os.path.isfile(os.path.join(path,
                                                                                    "result.json"))


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
  while is_done(os.path.join(workdir, rm_name("helpfulness", j + 1))):
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
  p = config.pipeline
  path = lambda name: os.path.join(os.path.abspath(workdir), name)
  final = lambda name: os.path.join(path(name), "final")
  annotating = config.annotate.num_prompts > 0
  rounds = num_rounds(config)
  positions = policy_positions(config)
  prefs = lambda j: os.path.join(final(annotate_name(j)), annotation.PREFERENCES)
  # The newest policy before position j (1-based).
  policy = lambda j: final("sft" if j == 1 else positions[j - 2])
  ks = build.parse_list(p.get("rs_k", ""), "config.pipeline.rs_k", int)
  n_rs = sum(name.startswith("rs_") for name in positions)
  if ks and (len(ks) != n_rs or min(ks) < 1):
    raise ValueError(f"config.pipeline.rs_k must give K >= 1 for each of the {n_rs} "
                     f"rejection-sampling iterations, got {p.rs_k!r}")
  if p.get("oracle_control", False) and config.tokenizer.path != "world":
    raise ValueError("config.pipeline.oracle_control needs the synthetic world (an oracle)")
  streams = int(config.data.get("prompt_streams", 8))
  needed = (rounds if annotating else 0) + len(positions)
  if needed > streams:
    raise ValueError(f"the pipeline has {needed} prompt-drawing stages but "
                     f"config.data.prompt_streams={streams}; raise it")
  stream_of_position = lambda j: (rounds if annotating else 0) + j - 1

  def stage(name, init_from=None):
    sub = copy_config(config)
    sub.stage = name
    if init_from is not None:
      sub.init_from = init_from
    return sub

  def sft():
    return stage("sft")

  def annotate(j):
    def make():
      sub = stage("annotate", policy(j))
      sub.annotate.round = j
      sub.annotate.accumulate_from = prefs(j - 1) if j > 1 else ""
      sub.annotate.prompt_stream = j - 1
      return sub
    return make

  def rm(kind, j):
    def make():
      sub = stage("reward", final("sft"))
      sub.reward.model = kind
      # Distinct seeds (head init, data order): two RMs on the same data must not be one model.
      sub.seed = config.seed + (0 if kind == "helpfulness" else 1) + 2 * (j - 1)
      key = "help" if kind == "helpfulness" else "safety"
      sub.reward.sources, sub.reward.weights = p[f"{key}_sources"], p[f"{key}_weights"]
      if kind == "safety":
        sub.reward.safety_aux_weight = float(p.get("safety_aux_weight", 0.0))
      if annotating:
        if "jsonl_preferences" in build.parse_list(sub.reward.sources, "pipeline sources"):
          raise ValueError("config.annotate.num_prompts > 0 adds the annotated pairs as the "
                           f"jsonl_preferences source; pipeline.{key}_sources has one already")
        sub.reward.sources += ",jsonl_preferences"
        weights = build.parse_list(sub.reward.weights, f"config.pipeline.{key}_weights")
        if weights:
          sub.reward.weights += f",{p[f'annotate_{key}_weight']}"
        sub.data.preference_jsonl_path = prefs(j)
      sub.optimizer.lr = p.reward_lr
      sub.optimizer.warmup_frac = p.reward_warmup_frac
      sub.train.num_epochs = p.reward_num_epochs
      sub.train.num_steps = p.reward_num_steps
      return sub
    return make

  def rms_for(j):  # the newest RMs before position j
    r = min(j, rounds)
    return final(rm_name("helpfulness", r)), final(rm_name("safety", r))

  def rs(j, name):
    i = int(name.split("_")[1])
    def make():
      sub = stage("rejection_sampling", policy(j))
      r = sub.rejection_sampling
      r.iteration = i
      r.help_rm, r.safety_rm = rms_for(j)
      r.prompt_stream = stream_of_position(j)
      r.pool_from = ",".join(os.path.join(path(f"rs_{e}"), "sampled.jsonl") for e in range(1, i))
      if ks:
        r.k = ks[i - 1]
      if p.get("rs_sample_from", ""):
        r.sample_from = p.rs_sample_from
      return sub
    return make

  def ppo_stage(j, oracle=False):
    def make():
      sub = stage("ppo", policy(j))
      sub.ppo.help_rm, sub.ppo.safety_rm = rms_for(j)
      sub.ppo.prompt_stream = stream_of_position(j)
      sub.ppo.sft_from = final("sft")
      if oracle:
        sub.ppo.reward = "oracle"
      return sub
    return make

  def round_stages(j):
    out = [(annotate_name(j), annotate(j))] if annotating else []
    return out + [(rm_name("helpfulness", j), rm("helpfulness", j)),
                  (rm_name("safety", j), rm("safety", j))]

  plan = [("sft", sft)] + round_stages(1)
  for j, name in enumerate(positions, 1):
    plan += round_stages(j) if 1 < j <= rounds else []
    if name == "ppo":
      plan.append(("ppo", ppo_stage(j)))
      if p.get("oracle_control", False):
        plan.append(("ppo_oracle", ppo_stage(j, oracle=True)))
    else:
      plan.append((name, rs(j, name)))
  return plan


def _share_tokenizer(config, workdir: str, sub_dir: str):
  """Copy the world tokenizer (model + settings sidecar) of the SFT stage into a sub-workdir, so
  ``build.tokenizer`` reuses it instead of training it again."""
  if config.tokenizer.path != "world" or jax.process_index() != 0:
    return
  os.makedirs(sub_dir, exist_ok=True)
  for name in ("tokenizer.model", "tokenizer.model.json"):
    src = os.path.join(workdir, "sft", name)
    if os.path.exists(src) and not os.path.exists(os.path.join(sub_dir, name)):
      shutil.copy2(src, os.path.join(sub_dir, name))


def run(config, workdir: str) -> dict:
  """Run (or resume) the pipeline in ``workdir``.

  Returns:
    dict with ``finished``, ``ran`` / ``skipped`` stage names, ``stopped_at`` (the stage that did
    not finish, if any), ``wall_s`` per stage that ran, and each stage's result.
  Raises:
    ValueError: if ``config.pipeline.rs_iterations`` < 0; sub-stages raise their own errors.
  """
  from llama_jax import stages  # pylint: disable=import-outside-toplevel
  if config.pipeline.rs_iterations < 0:
    raise ValueError(f"config.pipeline.rs_iterations must be >= 0, got "
                     f"{config.pipeline.rs_iterations}")
  os.makedirs(workdir, exist_ok=True)
  build.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  out: dict[str, Any] = {"ran": [], "skipped": [], "wall_s": {}, "stages": {}}
  for name, make in stage_plan(config, workdir):
    sub_dir = os.path.join(workdir, name)
    if is_done(sub_dir):
      out["skipped"].append(name)
      with open(os.path.join(sub_dir, "result.json")) as f:
        out["stages"][name] = json.load(f)
      continue
    if name != "sft":
      _share_tokenizer(config, workdir, sub_dir)
    log.info("pipeline: running %s in %s", name, sub_dir)
    t0 = time.perf_counter()
    res = stages.run(make(), sub_dir)
    out["wall_s"][name] = time.perf_counter() - t0
    out["ran"].append(name)
    out["stages"][name] = res
    if not is_done(sub_dir):
      out["stopped_at"] = name
      out["finished"] = False
      log.warning("pipeline: stage %s stopped before finishing; rerun to resume", name)
      return out
  out["finished"] = True
  build.write_json(os.path.join(workdir, "result.json"), out)
  return out
