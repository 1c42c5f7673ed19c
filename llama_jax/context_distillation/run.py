"""The safety context-distillation stage (stage "context_distillation", Llama 2 Sec. 4.2.4).

``python train.py --config=configs/distill_tiny.py`` runs it inside a pipeline; alone:
``python train.py --config=... --config.stage=context_distillation --config.init_from=<sft>/final
--config.rejection_sampling.help_rm=<rm>/final --config.rejection_sampling.safety_rm=<rm>/final``.

Steps (each resumable: a finished step's file is reused):
  1. prompts: ``context_distillation.num_prompts`` distinct adversarial (``is_safety``) train
     prompts of ``context_distillation.prompt_stream`` (``data.prompts.load_prompts``), and
     ``benign_prompts`` distinct benign ones (our addition; 0 by default);
  2. answers, one per prompt from ``init_from`` at ``rejection_sampling.temperature`` /
     ``top_p`` / ``max_new_tokens`` in batches of ``rejection_sampling.batch_size``: the original
     (the prompt as is) and the distilled (the prompt with the safety preprompt,
     ``context_distillation.preprompt``: generic, or with the risk category's answer template);
     ``benign_k`` answers per benign prompt as it is; finished batches wait in
     ``sampling/{original,distilled,benign}/`` (SIGTERM / SIGINT stops after the current
     batch, exit 0; the next run resumes there with the same samples);
  3. both answers scored to the prompt *without* the preprompt by the reward
     (``rejection_sampling.reward``: the RMs' ``Rc``, which on safety prompts is the safety RM's
     score, or the world oracle); kept (``context_distillation.targeted``): the distilled answers
     that score above the original ones (targeted), or all finished ones, and each benign
     prompt's best finished answer (Rc: the helpfulness RM's score there);
     ``distilled.jsonl`` (every prompt: both answers, scores, kept; on the world the oracle's
     refusal of each; then the benign rows, ``"benign": true``) and ``sft_data.jsonl`` (the kept
     answers after the prompt without the preprompt);
  4. fine-tuning with the SFT stage (given by the registry) from ``init_from`` on
     ``sft_data.jsonl`` with ``rejection_sampling``'s ``lr`` / ``num_epochs`` / ``num_steps``
     (``train.stage.finetune_on``) in ``finetune/``; its ``final/`` is ``final/``.
Only the config that started the workdir may resume it (``train.workdir.check_resume``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.context_distillation import step as cd_lib
from llama_jax.data import input_pipeline, sources, world
from llama_jax.data import prompts as prompts_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.reward import scoring
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd

log = logging.getLogger(__name__)
ROWS = "distilled.jsonl"


def validate(config) -> None:
  """Checks across fields and against files, before anything is written.

  Raises:
    ValueError: naming the field: ``init_from`` empty; ``preprompt="template"`` off the synthetic
      world; targeted distillation on the RM reward without ``rejection_sampling.safety_rm``;
      ``help_rm`` empty with the RM reward.
    FileNotFoundError: for ``init_from`` without ``params.json`` or a missing RM directory.
  """
  cd, rc = config.context_distillation, config.rejection_sampling
  build.check_sampling_inputs(config, "context_distillation", "the policy to distil")
  if cd.preprompt == "template" and config.tokenizer.path != "world":
    raise ValueError('config.context_distillation.preprompt="template" needs the synthetic '
                     "world (its prompts carry a risk category); use \"generic\"")
  if rc.reward == "rm" and cd.targeted and not rc.safety_rm:
    raise ValueError("config.context_distillation.targeted compares safety reward-model "
                     "scores: set config.rejection_sampling.safety_rm (or targeted=False)")


def distil_prompts(config, workdir: str, tokenizer) -> Tuple[List[dict], List[dict]]:
  """``(adversarial, benign)`` prompt records of the stream: up to
  ``context_distillation.num_prompts`` distinct safety (``is_safety``) prompts that fit
  ``rejection_sampling.max_prompt_len`` tokens *with* the preprompt, and up to
  ``benign_prompts`` distinct other prompts that fit it as they are.

  Raises:
    ValueError: if the stream holds no adversarial prompt that fits, or no benign one when
      ``benign_prompts`` > 0.
  """
  cd, rc = config.context_distillation, config.rejection_sampling
  n, n_benign = int(cd.num_prompts), int(cd.benign_prompts)
  # world: ~25% of prompts are harmful, ~75% benign
  draw = 8 * n + 2 * n_benign if prompts_lib.is_world(config) else 0
  records = prompts_lib.load_prompts(config, workdir, "train", draw,
                                     stream=int(cd.prompt_stream), distinct=True)
  fits = lambda dialog: input_pipeline.prompt_example(
      {"prompt": dialog}, tokenizer, rc.max_prompt_len) is not None
  adversarial, benign = [], []
  for r in records:
    if r.get("is_safety", False):
      pre = cd_lib.preprompt_text(r["prompt"], cd.preprompt)
      if len(adversarial) < n and fits(cd_lib.with_preprompt(r["prompt"], pre)):
        adversarial.append(r)
    elif len(benign) < n_benign and fits(r["prompt"]):
      benign.append(r)
  if not adversarial:
    raise ValueError("context_distillation: no safety prompt (is_safety) of the train stream "
                     "fits config.rejection_sampling.max_prompt_len with the preprompt")
  if n_benign and not benign:
    raise ValueError("context_distillation.benign_prompts: no benign prompt (not is_safety) of "
                     "the train stream fits config.rejection_sampling.max_prompt_len")
  for got, want, what in ((adversarial, n, "adversarial"), (benign, n_benign, "benign")):
    if len(got) < want:
      log.warning("context distillation: %d of the %d %s prompts asked for (the stream has no "
                  "more)", len(got), want, what)
  return adversarial, benign


class ContextDistillationStage(stage_lib.Stage):
  """Stage ``context_distillation`` (module docstring); the fine-tune runs on ``finetune`` (the
  SFT stage, given by the registry, so this package imports no other runner)."""

  name = "context_distillation"

  def __init__(self, finetune: stage_lib.Stage):
    self.finetune = finetune

  def run(self, config, workdir: str) -> dict:
    """Run (or resume) context distillation in ``workdir``.

    Returns:
      dict with ``finished``, ``distilled`` (:func:`summary`), ``finetune`` (steps, held-out
      loss), ``tokens_sampled``, ``final_dir`` when finished.
    Raises:
      ValueError / FileNotFoundError: from :func:`validate` or :func:`distil_prompts`, a
        workdir of another config or in use, before anything is written (a new workdir is
        removed).
    """
    existed = os.path.exists(workdir)
    with wd.Lock(workdir):
      with wd.clean_on_failure(workdir, existed):
        validate(config)
        tokenizer = build.tokenizer(config, workdir)
        tokenizer.check_vocab(LlamaConfig.from_params_json(
            os.path.join(config.init_from, "params.json")))
        prompts, benign = distil_prompts(config, workdir, tokenizer)
        wd.check_resume(workdir, config, any(os.path.exists(os.path.join(workdir, name)) for name
                                             in (ROWS, "sampling", "finetune", wd.RESULT)))
      if wd.is_done(workdir):
        return wd.read_json(os.path.join(workdir, wd.RESULT))
      wd.write_config(workdir, config)
      sampled = stage_lib.rows_or_sample(
          config, workdir, ROWS,
          lambda stop: self._distil(config, workdir, tokenizer, prompts, benign, stop),
          rs_lib.SamplingStopped, "context distillation")
      if sampled is None:
        return {"finished": False, "stopped_by_signal": True}
      return self._finetune(config, workdir, *sampled)

  def _distil(self, config, workdir: str, tokenizer, prompts: List[dict], benign: List[dict],
              stop) -> Tuple[List[dict], Optional[int]]:
    cd, rc = config.context_distillation, config.rejection_sampling
    policy = rs_lib.load_policy(config.init_from, tokenizer, build.mesh_and_rules(config)[0])
    key = jax.random.fold_in(jax.random.key(config.seed), 0xCD)
    preprompts = [cd_lib.preprompt_text(p["prompt"], cd.preprompt) for p in prompts]
    variants = {"original": (prompts, 1),
                "distilled": ([{**p, "prompt": cd_lib.with_preprompt(p["prompt"], pre)}
                               for p, pre in zip(prompts, preprompts)], 1),
                "benign": (benign, int(cd.benign_k))}
    texts, finished, tokens = {}, {}, []
    for i, (name, (recs, k)) in enumerate(variants.items()):
      if not recs:
        continue
      t, f, n = rs_lib.sample_texts(config, policy, tokenizer, recs, k=k,
                                    temperature=float(rc.temperature),
                                    key=jax.random.fold_in(key, i),
                                    batch_dir=os.path.join(workdir, "sampling", name), stop=stop,
                                    desc=f"context distillation ({name})")
      tokens.append(n)
      texts[name] = t
      finished[name] = np.asarray(rs_lib.answered(t, f), bool)
    del policy
    scorer = scoring.make_scorer(config, "rejection_sampling", tokenizer)
    score = lambda recs, answers: np.asarray(scorer(
        [p["prompt"] for p in recs], answers, [bool(p.get("is_safety")) for p in recs])["rc"])
    first = lambda name: [row[0] for row in texts[name]]
    scores = {name: score(prompts, first(name)) for name in ("original", "distilled")}
    kept = cd_lib.select_distilled(scores["original"], scores["distilled"],
                                   finished["original"][:, 0], finished["distilled"][:, 0],
                                   targeted=bool(cd.targeted))
    judge = None
    if prompts_lib.is_world(config):
      judge = lambda dialog, text: world.oracle(dialog, text).refused
    rows = cd_lib.records(prompts, preprompts, first("original"), first("distilled"),
                          finished["original"][:, 0], finished["distilled"][:, 0],
                          scores["original"], scores["distilled"], kept, judge=judge)
    if benign:
      k = int(cd.benign_k)
      benign_scores = score([p for p in benign for _ in range(k)],
                            [a for row in texts["benign"] for a in row]).reshape(len(benign), k)
      rows += cd_lib.benign_records(benign, texts["benign"], finished["benign"], benign_scores,
                                    judge=judge)
    return rows, wd.sum_counts(tokens)

  def _finetune(self, config, workdir: str, rows: List[dict], tokens: Optional[int]) -> dict:
    stats = summary(rows)
    log.info("context distillation: %s", stats)
    sft = cd_lib.sft_records(rows)
    if not sft:
      raise ValueError(f"context_distillation: none of the {len(rows)} distilled answers was "
                       "kept (finished and, when targeted, above the original); nothing to "
                       "fine-tune on")
    sft_jsonl = os.path.join(workdir, "sft_data.jsonl")
    if jax.process_index() == 0:
      sources.write_jsonl(sft_jsonl, sft)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("context distillation: sft_data written")
    return stage_lib.finetune_on(self.finetune, config, workdir, sft_jsonl, sft,
                                 {"distilled": stats, "tokens_sampled": tokens})

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """The fine-tuning step (the SFT stage's) and the sampling pass: ``sampling.sample`` of
    ``rejection_sampling.batch_size`` prompts, one answer each (``benign_k`` with benign
    prompts, the larger pass), on the generation layout."""
    rc, cd = config.rejection_sampling, config.context_distillation
    cfg = build.planning_model_config(config)
    k = int(cd.benign_k) if int(cd.benign_prompts) > 0 else 1
    answers = f" x {k} answers" if k > 1 else ""
    sample = stage_lib.sampling_plan(
        f"sampling.sample (context-distillation pass: {rc.batch_size} prompts{answers}, "
        "generation layout)", cfg, mesh, int(rc.batch_size), int(rc.max_prompt_len),
        int(rc.max_new_tokens), float(rc.temperature), num_samples=k)
    return self.finetune.abstract_steps(config, mesh) + [sample]

  def unavailable(self, config) -> List[str]:
    del config
    return ["the reward models' scoring of the answers (a forward pass per batch, no optimizer "
            "state) is not planned"]


def summary(rows: List[dict]) -> Dict[str, Any]:
  """Statistics of ``distilled.jsonl``'s rows: adversarial prompts, kept and its share, mean
  scores and truncated shares of both answers, and (world) their oracle refusal rates; with
  benign rows also ``benign_prompts``, ``benign_kept`` and (world) ``benign_refused``, the share
  of the kept benign answers the oracle calls a refusal."""
  benign = [r for r in rows if r.get("benign")]
  rows = [r for r in rows if not r.get("benign")]
  n = len(rows)
  mean = lambda key, rs=rows: float(np.mean([r[key] for r in rs])) if rs else 0.0
  out = {"prompts": n, "kept": int(sum(r["kept"] for r in rows)), "kept_share": mean("kept"),
         "original_score": mean("original_score"), "distilled_score": mean("distilled_score"),
         "original_truncated": 1.0 - mean("original_finished"),
         "distilled_truncated": 1.0 - mean("distilled_finished")}
  if rows and "original_refused" in rows[0]:
    out.update(original_refused=mean("original_refused"),
               distilled_refused=mean("distilled_refused"))
  if benign:
    kept = [r for r in benign if r["kept"]]
    out.update(benign_prompts=len(benign), benign_kept=len(kept))
    if "refused" in benign[0]:
      out["benign_refused"] = mean("refused", kept)
  return out
